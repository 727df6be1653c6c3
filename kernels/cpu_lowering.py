"""CPU lowering of the packed residual-binary linear: plain aten ops that Inductor's C++ backend fuses.

For ``x [..., K]``, ``packed_signs`` int32 ``[k, N, W = ceil(K/32)]`` (format v1: bit ``j`` of word ``w`` is
column ``32 w + j``, set = -1), ``row_scale g [k, N]``, ``col_scale h [k, K]``, ``bias [N]`` or None::

    y = sum_i g_i * (B_i @ (h_i * x)) + b                                       -> [..., N]

Two forms, both accumulating in :func:`.reference.accumulation_dtype` (fp32, fp64 for fp64 input):

* ``"bitwise"`` (few rows; only when asked for: the C++ LUT kernel is faster on every shape measured) is
  matmul-free. With ``v_i = h_i * x`` zero-padded
  to ``32 W`` columns and ``bit_i[n, c]`` in {0, 1}, ``B_i @ v_i = sum_c v_i[c] - 2 sum_c bit_i[n, c] v_i[c]``,
  so each packed word is shifted by ``0..31``, masked to one bit per lane, converted to 0/1 and multiplied
  into ``v_i`` (an FMA). ``v_i`` is stored once (``k x 32 W`` elements); then Inductor emits one vectorized
  reduction loop nest over (word, bit) per output row: nothing of ``N x K`` elements is ever materialized,
  only ``k N W`` words are read.
* ``"dense"`` (prefill, many rows) materializes ``W_hat = sum_i g_i B_i h_i``
  (``N x K``) once per call and does one ``x @ W_hat.T``: the unpack is amortized over the rows and the
  matmul library beats a per-row bit loop there (see ``benchmarks/cpu_layers.py``).

:func:`cpu_form` picks, from the number of rows, ``"kernel"`` (the lookup-table C++ operator of :mod:`.cpu_lut`)
or ``"dense"``. Every function here uses only ``in_features`` (and ``out_features`` for siblings) as
static sizes and broadcasts over the leading dimensions of ``x``, so FX proxies with symbolic batch sizes trace
through it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .cpu_lut import KERNEL_MAX_ROWS
from .packing import BITS_PER_WORD, segment_starts, words_per_row
from .reference import accumulation_dtype


def cpu_form(rows: int) -> str:
    """The CPU form for ``rows`` rows: ``"kernel"`` (at most :data:`.cpu_lut.KERNEL_MAX_ROWS`) or ``"dense"``."""
    return "kernel" if rows <= KERNEL_MAX_ROWS else "dense"


def _bits(packed_signs: torch.Tensor) -> torch.Tensor:
    """int32 ``[k, N, W]`` -> int32 ``[k, N, W, 32]`` of 0/1, ``[..., w, j]`` = bit j of word w (1 means -1)."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32)
    return torch.bitwise_and(torch.bitwise_right_shift(packed_signs.unsqueeze(-1), shifts), 1)


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, but Inductor must write it to a buffer (its stride order pinned) instead of inlining
    its computation into every consumer: ``h_i * x`` (and whatever produced ``x``, e.g. an RMSNorm) is then
    computed once, not once per output row inside the bit loop (1.6x faster at 576 x 576, measured)."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

    return torch.ops.prims.inductor_force_stride_order(tensor, tensor.stride())


def _bitwise(x: torch.Tensor, packed_signs: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
             bias: torch.Tensor | None, in_features: int, accumulate: torch.dtype) -> torch.Tensor:
    """``y = sum_i g_i * (S_i - 2 sum_c bit_i[n, c] v_i[c]) + b`` with ``v_i = h_i * x``, ``S_i = sum_c v_i[c]``."""
    num_words = words_per_row(in_features)
    scaled = x.unsqueeze(-2).to(accumulate) * col_scale.to(accumulate)                # [..., k, K]
    scaled = F.pad(scaled, (0, num_words * BITS_PER_WORD - in_features))                # [..., k, 32 W]
    scaled = _stored(scaled.unflatten(-1, (num_words, BITS_PER_WORD))).unsqueeze(-3)  # [..., k, 1, W, 32]
    negated = (_bits(packed_signs).to(accumulate) * scaled).sum((-2, -1))            # [..., k, N]
    total = scaled.sum((-2, -1))                                                        # [..., k, 1]
    out = ((total - 2 * negated) * row_scale.to(accumulate)).sum(-2)                   # [..., N]
    if bias is not None:
        out = out + bias.to(accumulate)
    return out.type_as(x)


def _dense(x: torch.Tensor, packed_signs: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
           bias: torch.Tensor | None, in_features: int, accumulate: torch.dtype) -> torch.Tensor:
    """``y = x @ W_hat.T + b`` with ``W_hat [N, K] = sum_i g_i * (1 - 2 bit_i) * h_i`` built in ``accumulate``."""
    signs = (1 - 2 * _bits(packed_signs)).flatten(-2)[..., :in_features].to(accumulate)   # [k, N, K]
    weight = (row_scale.to(accumulate).unsqueeze(-1) * signs * col_scale.to(accumulate).unsqueeze(-2)).sum(0)
    bias = None if bias is None else bias.to(accumulate)
    return F.linear(x.to(accumulate), weight, bias).type_as(x)


_FORMS = {"bitwise": _bitwise, "dense": _dense}


def residual_binary_linear_cpu(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    form: str,
    accumulate: torch.dtype | None = None,
) -> torch.Tensor:
    """The packed linear in the given ``form`` (``"bitwise"`` / ``"dense"``), accumulating in ``accumulate``
    (default ``accumulation_dtype(x.dtype)``; give it explicitly when ``x`` is an FX proxy). Shapes as in the
    module docstring; returns ``x.dtype``."""
    if form not in _FORMS:
        raise ValueError(f"unknown CPU form {form!r}; expected one of {sorted(_FORMS)}")
    accumulate = accumulate or accumulation_dtype(x.dtype)
    return _FORMS[form](x, packed_signs, row_scale, col_scale, bias, in_features, accumulate)


def residual_binary_linear_siblings_cpu(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: Sequence[int],
    form: str,
    accumulate: torch.dtype | None = None,
) -> torch.Tensor:
    """S siblings sharing ``x`` (``packed_signs [k, N_total, W]``, ``row_scale [k, N_total]``,
    ``col_scale [S, k, K]``, ``bias [N_total]`` or None; sibling s owns ``out_features[s]`` consecutive rows):
    each one by :func:`residual_binary_linear_cpu`, concatenated along the last dim -> ``[..., N_total]``."""
    starts = segment_starts(out_features)
    parts = [
        residual_binary_linear_cpu(
            x, packed_signs[:, start:end], row_scale[:, start:end], col_scale[segment],
            None if bias is None else bias[start:end], in_features, form, accumulate,
        )
        for segment, (start, end) in enumerate(zip(starts[:-1], starts[1:], strict=True))
    ]
    return torch.cat(parts, dim=-1)
