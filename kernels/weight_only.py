"""Weight-only int8 / int4 linear, for the LM head: ``y = x @ (q * s)^T + b`` without materialising ``W``.

Format (``bits`` 8 or 4, ``group_size`` a multiple of 32, or None for one group per row):

- ``scale [N, G]`` (``G = ceil(K / group_size)``, 1 when None), symmetric: int8 ``s[n, g] = max |W[n, group g]|
  / 127``; int4 ``s[n, g] = c * max |W[n, group g]| / 7`` with the clip ``c`` in [0.55, 1] of least squared error
  (:func:`quantize_weight_only`; :func:`gptq_weight_only` applies the same rule to error-compensated columns);
  an all-zero group has ``s = 0`` and ``q = 0``.
- bits 8: ``qweight`` int8 ``[N, K]``, ``q = round(W / s)`` in [-127, 127].
- bits 4: ``qweight`` uint8 ``[N, 16 * ceil(K / 32)]``: for each block of 32 columns, byte ``j`` (0..15) holds
  ``q[32 b + j] + 8`` in its low nibble and ``q[32 b + 16 + j] + 8`` in its high nibble, q in [-7, 7]; columns
  past K are ``q = 0``. Lows then highs of one block are 32 consecutive columns, so a SIMD kernel widens them
  without a shuffle.

The CPU kernel (:file:`weight_only.cpp`, few rows) streams ``qweight`` once, in one of two arithmetics:

- fp32 activations (exact up to fp32 accumulation): per 32 weights one widening load and int-to-float conversion,
  then an FMA per row of ``x``.
- int8 activations (``int8_activations=True``; the backend's ``cpu_tables="int8"``): ``x`` is rounded per block
  of 32 columns, ``d[b] = max |x_b| / 127``, ``q = round(x / d)`` (:func:`quantize_activations`), every block's
  dot product is an exact integer (AVX-512 VNNI ``vpdpbusd``: 64 weights an instruction; AVX2 ``vpmaddubsw``), and
  ``y[n] = sum_b s[n, g(b)] d[b] dot_b``: what :func:`weight_only_linear_reference` computes from
  :func:`dequantize_activations`. The rounding moves each ``x`` by at most ``d / 2``.

AVX-512, AVX2 and portable paths, chosen when the C++ is built (Inductor's toolchain) from the ISA Inductor detects
(the AVX-512 build takes the AVX2 integer path on a CPU without VNNI); tests build all three. More rows, or another
device, take the reference (dequantize once, one matmul).

Two operators: ``rabit::weight_only_linear`` (a Python custom op: any rows, any device, with autograd) and
``rabit::weight_only_gemv`` (C++, :file:`weight_only_op.cpp`: the decode kernel alone, at most
:data:`KERNEL_MAX_ROWS` CPU rows, with an AOTInductor C shim), which the CPU lowering puts in a decode graph so that
a compiled step calls the head without Python (:func:`load_operator` builds it and registers the kernel).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from . import cpp_build

BLOCK = 32
QMAX = {8: 127, 4: 7}
ISAS = ("avx512", "avx2", "portable")
KERNEL_MAX_ROWS = 4
# int4 scales tried per group, as fractions of max |w| / 7 (quantize_weight_only keeps the least squared error)
CLIP_FRACTIONS = tuple(1.0 - 0.03 * i for i in range(16))


@dataclass
class WeightOnlyQuantized:
    """``qweight`` and ``scale`` of one ``[N, K]`` weight in the format of the module docstring."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bits: int
    group_size: int | None
    in_features: int


def check_scheme(bits: int, group_size: int | None) -> None:
    """Raise ValueError unless ``bits`` is 8 or 4 and ``group_size`` is None or a positive multiple of 32."""
    if bits not in QMAX:
        raise ValueError(f"weight-only bits must be 8 or 4, got {bits!r}")
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                   or group_size <= 0 or group_size % BLOCK):
        raise ValueError(f"group_size must be None (per row) or a positive multiple of {BLOCK}, got {group_size!r}")


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-in_features // group_size)


def _group_view(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[N, K]`` -> zero-padded ``[N, G, group]``."""
    n, k = weight.shape
    size = k if group_size is None else group_size
    groups = num_groups(k, group_size)
    return torch.nn.functional.pad(weight, (0, groups * size - k)).view(n, groups, size)


def _round(grouped: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``q = clamp(round(w / s), -qmax, qmax)`` per group (0 where ``s == 0``), as floats."""
    divisor = scale.float().unsqueeze(-1)
    q = torch.where(divisor > 0, torch.round(grouped / divisor.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    return q.clamp(-QMAX[bits], QMAX[bits])


def _clipped_scales(grouped: torch.Tensor, bits: int, scale_dtype: torch.dtype, rows: int = 4096) -> torch.Tensor:
    """Per group, of the scales ``c * max|w| / qmax`` for ``c`` in :data:`CLIP_FRACTIONS` (rounded to
    ``scale_dtype``), the one with the least squared error ``sum (q s - w)^2`` (the first, i.e. the largest ``c``, on
    a tie); ``rows`` rows at a time."""
    scales = []
    for part in grouped.split(rows):
        top = part.abs().amax(dim=-1) / QMAX[bits]
        candidates = torch.stack([(top * fraction).to(scale_dtype) for fraction in CLIP_FRACTIONS])
        errors = torch.stack([(_round(part, scale, bits) * scale.float().unsqueeze(-1) - part).square().sum(-1)
                              for scale in candidates])
        scales.append(candidates.gather(0, errors.argmin(0, keepdim=True)).squeeze(0))
    return torch.cat(scales)


def quantize_weight_only(weight: torch.Tensor, bits: int, group_size: int | None,
                         scale_dtype: torch.dtype = torch.float16) -> WeightOnlyQuantized:
    """Symmetric round-to-nearest of ``weight [N, K]`` (finite) to the format above; scales in ``scale_dtype``.

    int8: ``s = max |w| / 127`` per group. int4 (15 levels): the clipped scale of least squared error per group
    (:func:`_clipped_scales`; the largest weights may round to ``+-7 s`` rather than their own level, which the
    other weights of the group gain)."""
    check_scheme(bits, group_size)
    if weight.dim() != 2 or weight.numel() == 0 or not torch.isfinite(weight).all():
        raise ValueError(f"expected a finite, non-empty 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    grouped = _group_view(weight.detach().float(), group_size)
    scale = _group_scales(grouped, bits, scale_dtype)
    q = _round(grouped, scale, bits).reshape(n, -1)[:, :k].to(torch.int8)
    return _packed(q, scale, bits, group_size)


def gptq_weight_only(weight: torch.Tensor, bits: int, group_size: int | None, inverse_factor: torch.Tensor,
                     scale_dtype: torch.dtype = torch.float16, block_size: int = 128) -> WeightOnlyQuantized:
    """GPTQ's column loop with this format's quantizer, for ``weight [N, K]`` and ``inverse_factor`` ``U [K, K]``
    (``H^-1 = U^T U`` for the dampened second moment ``H`` of the layer's inputs): column ``c`` is rounded with its
    group's scale and its error, divided by ``U[c, c]``, is moved into the later columns along ``U[c, c+1:]``, so
    they compensate it; this lowers ``tr((W_hat - W) H (W_hat - W)^T)``, the output error on those inputs. A group's
    scale is :func:`quantize_weight_only`'s rule applied to its compensated columns when the loop reaches them (per
    row: to the original row). With a diagonal ``H`` nothing moves and the result is :func:`quantize_weight_only`'s.
    """
    check_scheme(bits, group_size)
    n, k = weight.shape
    if inverse_factor.shape != (k, k):
        raise ValueError(f"inverse_factor must be [{k}, {k}] for a weight of {k} columns, got "
                         f"{tuple(inverse_factor.shape)}")
    work = weight.detach().float().T.contiguous()  # [K, N]: a column of the weight is a contiguous row here
    factor = inverse_factor.to(work.device, torch.float32)
    q = torch.empty_like(work)
    if group_size is None:
        scale = _group_scales(_group_view(weight.detach().float(), None), bits, scale_dtype)
    else:
        scale = torch.empty(n, num_groups(k, group_size), dtype=scale_dtype, device=work.device)
        block_size = group_size * max(1, block_size // group_size)  # a group never straddles two blocks
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        block, errors = work[start:end], torch.empty(end - start, n, device=work.device)
        for j in range(end - start):
            column = start + j
            group = 0 if group_size is None else column // group_size
            if group_size is not None and column % group_size == 0:
                scale[:, group] = _group_scales(block[j:j + group_size].T.unsqueeze(1), bits, scale_dtype)[:, 0]
            column_scale = scale[:, group].unsqueeze(-1)
            q[column] = _round(block[j].view(n, 1, 1), column_scale, bits)[:, 0, 0]
            error = (block[j] - q[column] * column_scale.float()[:, 0]).div_(factor[column, column])
            block[j + 1:].addr_(factor[column, column + 1:end], error, alpha=-1)
            errors[j] = error
        work[end:].addmm_(factor[start:end, end:].T, errors, alpha=-1)
    return _packed(q.T.to(torch.int8), scale, bits, group_size)


def _group_scales(grouped: torch.Tensor, bits: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scales ``[N, G]`` of ``grouped [N, G, size]``: int8 ``max |w| / 127``, int4 :func:`_clipped_scales`."""
    if bits == 4:
        return _clipped_scales(grouped, bits, scale_dtype)
    return (grouped.abs().amax(dim=-1) / QMAX[bits]).to(scale_dtype)


def _packed(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None) -> WeightOnlyQuantized:
    """int8 ``q [N, K]`` and ``scale [N, G]`` in the format of the module docstring."""
    qweight = q if bits == 8 else pack_int4(q)
    return WeightOnlyQuantized(qweight.contiguous(), scale.contiguous(), bits, group_size, q.shape[1])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 ``[N, K]`` in [-8, 7] -> uint8 ``[N, 16 * ceil(K / 32)]`` (block layout of the module docstring)."""
    n, k = q.shape
    blocks = -(-k // BLOCK)
    padded = torch.nn.functional.pad(q.to(torch.int16) + 8, (0, blocks * BLOCK - k), value=8).view(n, blocks, 2, 16)
    return (padded[:, :, 0] | (padded[:, :, 1] << 4)).to(torch.uint8).reshape(n, blocks * 16)


def unpack_int4(qweight: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[N, 16 * ceil(K / 32)]`` -> int8 ``[N, K]``."""
    n = qweight.shape[0]
    nibbles = qweight.view(n, -1, 1, 16).to(torch.int16)
    both = torch.cat([nibbles & 15, nibbles >> 4], dim=2) - 8
    return both.reshape(n, -1)[:, :in_features].to(torch.int8)


def dequantize_weight_only(qweight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None,
                           in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W_hat [N, K] = q * s`` in ``dtype``."""
    q = qweight if bits == 8 else unpack_int4(qweight, in_features)
    grouped = _group_view(q.to(dtype), group_size)
    return (grouped * scale.to(dtype).unsqueeze(-1)).reshape(q.shape[0], -1)[:, :in_features]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x [..., K]`` -> int8 ``q [..., K]`` and fp32 steps ``d [..., ceil(K / 32)]``, per block of 32
    columns: ``d = max |x_b| / 127``, ``q = round(x * (127 / max |x_b|))`` (0 where the block is all zero), the
    kernel's rounding, operation for operation."""
    k = x.shape[-1]
    blocks = -(-k // BLOCK)
    grouped = torch.nn.functional.pad(x.to(torch.float32), (0, blocks * BLOCK - k)).unflatten(-1, (blocks, BLOCK))
    top = grouped.abs().amax(-1, keepdim=True)
    inverse = torch.where(top > 0, 127.0 / top.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    q = torch.round(grouped * inverse).clamp(-127, 127).to(torch.int8).flatten(-2)[..., :k]
    return q, (top / 127.0).squeeze(-1)


def dequantize_activations(q: torch.Tensor, step: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``q * d`` in ``dtype`` -> ``[..., K]``: the ``x`` that the int8-activation kernel multiplies exactly."""
    k = q.shape[-1]
    return q.to(dtype) * step.to(dtype).repeat_interleave(BLOCK, dim=-1)[..., :k]


def weight_only_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                 bias: torch.Tensor | None, bits: int, group_size: int | None,
                                 in_features: int) -> torch.Tensor:
    """Dequantize once and one matmul, accumulating in fp32 (fp64 for fp64 ``x``) -> ``[..., N]`` in x.dtype."""
    accumulate = torch.promote_types(x.dtype, torch.float32)
    weight = dequantize_weight_only(qweight, scale, bits, group_size, in_features, accumulate)
    out = torch.nn.functional.linear(x.to(accumulate), weight, None if bias is None else bias.to(accumulate))
    return out.to(x.dtype)


_SOURCE = cpp_build.source_text(Path(__file__).parent / "weight_only.cpp")

_ARGUMENT_TYPES = ["const float*", "const uint8_t*", "const SCALE_T*", "const float*", "float*"] + ["int64_t"] * 8
_CPP_SCALE_TYPES = {torch.float32: "float", torch.float16: "at::Half", torch.bfloat16: "at::BFloat16"}
_BUILT: dict[tuple[int, str, torch.dtype], object] = {}


@functools.cache
def native_isa() -> str:
    """The widest path this build can take: what Inductor's C++ toolchain compiles for on this CPU (asked once: the
    question costs more than a decode call of the head)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    name = str(pick_vec_isa())
    return "avx512" if name.startswith("avx512") else "avx2" if name.startswith("avx2") else "portable"


def _built_kernel(bits: int, isa: str, scale_dtype: torch.dtype):
    key = (bits, isa, scale_dtype)
    if key not in _BUILT:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        defines = f"#define RABIT_BITS {bits}\n#define RABIT_ISA {2 - ISAS.index(isa)}\n"
        scale_type = _CPP_SCALE_TYPES[scale_dtype]
        arguments = [a.replace("SCALE_T", scale_type) for a in _ARGUMENT_TYPES]
        try:
            _BUILT[key] = CppPythonBindingsCodeCache.load_pybinding(
                arguments, defines + _SOURCE.replace("SCALE_T", scale_type))
        except Exception as error:
            raise RuntimeError("rabit: building the weight-only CPU kernel with Inductor's C++ toolchain failed (it "
                               f"needs the C++ compiler that torch.compile uses on the CPU): {error}") from error
    return _BUILT[key]


def weight_only_linear_kernel(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                              bits: int, group_size: int | None, in_features: int, isa: str | None = None,
                              threads: int | None = None, out: torch.Tensor | None = None,
                              int8_activations: bool = False) -> torch.Tensor:
    """The C++ kernel on CPU ``x [..., K]`` (at most :data:`KERNEL_MAX_ROWS` rows) -> ``[..., N]`` in x.dtype.

    ``int8_activations``: the integer arithmetic of the module docstring; ``isa`` forces a path (one of
    :data:`ISAS`, at most :func:`native_isa`); ``threads`` defaults to torch's; ``out``: a contiguous fp32
    ``[rows, N]`` to write the kernel's result into (tests poison it first)."""
    isa = isa or native_isa()
    if isa not in ISAS or ISAS.index(isa) < ISAS.index(native_isa()):
        raise ValueError(f"isa must be one of {ISAS[ISAS.index(native_isa()):]} on this CPU, got {isa!r}")
    if scale.dtype not in _CPP_SCALE_TYPES:
        raise TypeError(f"scale must be fp32, fp16 or bf16, got {scale.dtype}")
    rows = x.reshape(-1, in_features).to(torch.float32).contiguous()
    if rows.shape[0] > KERNEL_MAX_ROWS:
        raise ValueError(f"the kernel takes at most {KERNEL_MAX_ROWS} rows, got {rows.shape[0]}")
    out_features = qweight.shape[0]
    if out is None:
        out = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    elif out.shape != (rows.shape[0], out_features) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {(rows.shape[0], out_features)}")
    group = in_features if group_size is None else group_size
    _built_kernel(bits, isa, scale.dtype)(
        rows, qweight.contiguous().view(torch.uint8), scale.contiguous(),
        rows if bias is None else bias.to(torch.float32).contiguous(), out, rows.shape[0], out_features, in_features,
        group, num_groups(in_features, group_size), int(bias is not None),
        torch.get_num_threads() if threads is None else threads, int(int8_activations))
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _check_inputs(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
                  group_size: int, in_features: int) -> None:
    torch._check(x.shape[-1] == in_features, lambda: f"x has {x.shape[-1]} features, layer expects {in_features}")
    torch._check(bits in QMAX, lambda: f"bits must be 8 or 4, got {bits}")
    row_bytes = in_features if bits == 8 else 16 * -(-in_features // BLOCK)
    torch._check(qweight.dim() == 2 and qweight.shape[1] == row_bytes,
                 lambda: f"qweight must be [N, {row_bytes}] for bits={bits}, K={in_features}")
    groups = num_groups(in_features, group_size or None)
    torch._check(scale.shape == (qweight.shape[0], groups), lambda: f"scale must be [N, {groups}]")
    if bias is not None:
        torch._check(bias.shape == qweight.shape[:1], lambda: "bias must be [N]")


GEMV_OP_NAME = "rabit::weight_only_gemv"
# the C++ operator's AOTInductor C shim (weight_only_op.cpp), for aot_inductor.custom_ops_to_c_shims
GEMV_C_SHIM = ("AOTITorchError aoti_torch_cpu_weight_only_gemv(AtenTensorHandle, AtenTensorHandle, AtenTensorHandle, "
               "AtenTensorHandle*, int64_t, int64_t, int64_t, int32_t, AtenTensorHandle*)")
_OPERATOR_SOURCE = Path(__file__).with_name("weight_only_op.cpp")
_REGISTERED: dict[tuple[int, torch.dtype], ctypes.CDLL] = {}


def _gemv_fake(x, qweight, scale, bias, bits, group_size, in_features, int8_activations):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def load_library() -> ctypes.CDLL:
    """Build if needed and load ``rabit::weight_only_gemv`` (idempotent, :mod:`.cpp_build`), with no kernel
    registered yet (:func:`load_operator`); the library."""
    return cpp_build.load_library(_OPERATOR_SOURCE, "weight-only operator", {GEMV_OP_NAME: _gemv_fake})


def load_operator(bits: int, scale_dtype: torch.dtype) -> None:
    """:func:`load_library`, and register the kernel for ``bits`` and ``scale_dtype`` scales, built for this CPU
    (idempotent)."""
    check_scheme(bits, None)
    if scale_dtype not in _CPP_SCALE_TYPES:
        raise TypeError(f"scale must be fp32, fp16 or bf16, got {scale_dtype}")
    library = load_library()
    if (bits, scale_dtype) not in _REGISTERED:
        kernel = ctypes.CDLL(_built_kernel(bits, native_isa(), scale_dtype).__self__.__file__)
        address = ctypes.cast(kernel.kernel, ctypes.c_void_p).value
        library.rabit_weight_only_register.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        if library.rabit_weight_only_register(bits, list(_CPP_SCALE_TYPES).index(scale_dtype), address) != 0:
            raise RuntimeError(f"rabit: registering the weight-only kernel for bits={bits}, {scale_dtype} failed")
        _REGISTERED[(bits, scale_dtype)] = kernel


def _kernel_takes(x: torch.Tensor, scale: torch.Tensor, in_features: int) -> bool:
    """The C++ kernel takes these: a CPU ``x`` of at most :data:`KERNEL_MAX_ROWS` rows, ``x`` and scales of a
    kernel dtype."""
    return (x.device.type == "cpu" and x.numel() <= KERNEL_MAX_ROWS * max(in_features, 1)
            and x.dtype in _CPP_SCALE_TYPES and scale.dtype in _CPP_SCALE_TYPES)


def gemv_takes(x: torch.Tensor | None, qweight: torch.Tensor | None, scale: torch.Tensor | None) -> bool:
    """``rabit::weight_only_gemv`` takes these (examples of a graph's tensors): what the kernel takes
    (:func:`_kernel_takes`), with ``x`` of a static shape and ``qweight`` on the CPU."""
    if x is None or qweight is None or scale is None:
        return False
    static = all(isinstance(size, int) for size in x.shape)
    return static and qweight.device.type == "cpu" and _kernel_takes(x, scale, x.shape[-1])


@torch.library.custom_op("rabit::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       bits: int, group_size: int, in_features: int, int8_activations: bool = False) -> torch.Tensor:
    """``y = x @ (q * s)^T + b`` -> ``[..., N]`` (format in the module docstring; ``group_size`` 0 = per row).

    CPU: the C++ kernel for at most :data:`KERNEL_MAX_ROWS` rows of fp32/fp16/bf16 (``int8_activations``: in the
    integer arithmetic), else the reference; other devices: the reference (dequantize + one matmul). The
    reference, and so any call of more rows, keeps ``x`` as it is: int8 activations are a decode-kernel mode."""
    _check_inputs(x, qweight, scale, bias, bits, group_size, in_features)
    if _kernel_takes(x, scale, in_features):
        return weight_only_linear_kernel(x, qweight, scale, bias, bits, group_size or None, in_features,
                                         int8_activations=int8_activations)
    return weight_only_linear_reference(x, qweight, scale, bias, bits, group_size or None, in_features)


@weight_only_linear.register_fake
def _(x, qweight, scale, bias, bits, group_size, in_features, int8_activations=False):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, scale, bias, bits, group_size, in_features, *_ = inputs
    ctx.save_for_backward(qweight, scale)
    ctx.scheme = (bits, group_size or None, in_features)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad_out):
    """Gradients for x (``grad @ W_hat``) and the bias; the quantized weight is a constant."""
    qweight, scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        accumulate = torch.promote_types(grad_out.dtype, torch.float32)
        weight = dequantize_weight_only(qweight, scale, *ctx.scheme, accumulate)
        grad_x = (grad_out.to(accumulate) @ weight).to(grad_out.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, grad_bias, None, None, None, None


weight_only_linear.register_autograd(_backward, setup_context=_setup_context)
