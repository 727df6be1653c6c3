"""Decode attention on the CPU: the C++ operator ``rabit::decode_attention`` (source: ``cpu_attention.cpp``).

For ``query [B, H, M, D]`` (a few rows: one decode position, or the ``r`` query heads of a grouped-query group),
``key [B, H, L, D]``, ``value [B, H, L, Dv]`` (a static KV cache of ``L`` slots) and a boolean ``attn_mask
[B or 1, 1, 1, L]`` (True: attend; the same for every head and row) or None::

    P[b]         = {l : attn_mask[b, 0, 0, l]}                                  (every l without a mask)
    s[b, h, m, l] = scale * query[b, h, m] . key[b, h, l]                         (l in P[b])
    out[b, h, m]  = sum_{l in P[b]} softmax_P(s[b, h, m])[l] * value[b, h, l]

which is ``scaled_dot_product_attention(query, key, value, attn_mask, scale=scale)``. Why a kernel of its own: at
one query position a static cache's slots past the current length are masked, yet ATen's CPU flash attention
computes them all, through matmul-library calls whose fixed cost dominates at these sizes; this kernel reads only
the positions in ``P``. It computes in fp32 (inputs of fp16/bf16 are converted as they are read, the output is
rounded to their dtype), with the max subtracted before ``exp``: against a float64 reference the error is fp32
rounding (the sums of ``D`` and ``|P|`` products, ATen's vectorised ``exp``, 1 ulp). A batch row whose mask lets nothing
through gives zeros, as ``scaled_dot_product_attention`` does.

The library is built and loaded by :mod:`.cpp_build`; :func:`decode_attention` is the call.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from . import cpp_build

OP_NAME = "rabit::decode_attention"
# the op's AOTInductor C shim (cpu_attention.cpp), for aot_inductor.custom_ops_to_c_shims
C_SHIM = ("AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle, AtenTensorHandle, AtenTensorHandle, "
          "AtenTensorHandle*, double, AtenTensorHandle*)")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SOURCE = Path(__file__).with_name("cpu_attention.cpp")


def load_library() -> ctypes.CDLL:
    """Build if needed and load ``rabit::decode_attention`` (idempotent)."""
    return cpp_build.load_library(_SOURCE, "CPU decode attention kernel", {OP_NAME: _decode_attention_fake})


def _decode_attention_fake(query, key, value, attn_mask, scale):
    return query.new_empty(*query.shape[:3], value.shape[-1])


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                     scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rabit::decode_attention`` (module docstring): ``[B, H, M, Dv]`` in ``query.dtype``, written into ``out``
    (contiguous, that shape and dtype) if given."""
    load_library()
    if out is None:
        return torch.ops.rabit.decode_attention(query, key, value, attn_mask, scale)
    return torch.ops.rabit.decode_attention.out(query, key, value, attn_mask, scale, out=out)
