"""Weight-only int8 / int4 linear, for the LM head: ``y = x @ (q * s)^T + b`` without materialising ``W``.

Format (``bits`` 8 or 4, ``group_size`` a multiple of 32, or None for one group per row):

- ``scale [N, G]`` (``G = ceil(K / group_size)``, 1 when None): ``s[n, g] = max |W[n, group g]| / qmax``,
  symmetric, ``qmax`` = 127 (int8) or 7 (int4); an all-zero group has ``s = 0`` and ``q = 0``.
- bits 8: ``qweight`` int8 ``[N, K]``, ``q = round(W / s)`` in [-127, 127].
- bits 4: ``qweight`` uint8 ``[N, 16 * ceil(K / 32)]``: for each block of 32 columns, byte ``j`` (0..15) holds
  ``q[32 b + j] + 8`` in its low nibble and ``q[32 b + 16 + j] + 8`` in its high nibble, q in [-7, 7]; columns
  past K are ``q = 0``. Lows then highs of one block are 32 consecutive columns, so a SIMD kernel widens them
  without a shuffle.

The CPU kernel (few rows, fp32 accumulation) streams ``qweight`` once: per 16 weights one widening load, one
int-to-float conversion, then a multiply by ``x`` and an FMA by the group's scale per row, and one horizontal sum
per output. AVX-512, AVX2 and portable paths, chosen when the C++ is built (Inductor's toolchain, as
:mod:`.cpu_kernel`) from the ISA Inductor detects; tests build all three. More rows, or another device, take the
reference (dequantize once, one matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32
QMAX = {8: 127, 4: 7}
ISAS = ("avx512", "avx2", "portable")
KERNEL_MAX_ROWS = 4


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


def quantize_weight_only(weight: torch.Tensor, bits: int, group_size: int | None,
                         scale_dtype: torch.dtype = torch.float16) -> WeightOnlyQuantized:
    """Symmetric round-to-nearest of ``weight [N, K]`` (finite) to the format above; scales in ``scale_dtype``."""
    check_scheme(bits, group_size)
    if weight.dim() != 2 or weight.numel() == 0 or not torch.isfinite(weight).all():
        raise ValueError(f"expected a finite, non-empty 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    grouped = _group_view(weight.detach().float(), group_size)
    scale = (grouped.abs().amax(dim=-1) / QMAX[bits]).to(scale_dtype)
    divisor = scale.float().unsqueeze(-1)
    q = torch.where(divisor > 0, torch.round(grouped / divisor.clamp_min(torch.finfo(torch.float32).tiny)), 0.0)
    q = q.clamp(-QMAX[bits], QMAX[bits]).reshape(n, -1)[:, :k].to(torch.int8)
    qweight = q if bits == 8 else pack_int4(q)
    return WeightOnlyQuantized(qweight.contiguous(), scale.contiguous(), bits, group_size, k)


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


def weight_only_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                                 bias: torch.Tensor | None, bits: int, group_size: int | None,
                                 in_features: int) -> torch.Tensor:
    """Dequantize once and one matmul, accumulating in fp32 (fp64 for fp64 ``x``) -> ``[..., N]`` in x.dtype."""
    accumulate = torch.promote_types(x.dtype, torch.float32)
    weight = dequantize_weight_only(qweight, scale, bits, group_size, in_features, accumulate)
    out = torch.nn.functional.linear(x.to(accumulate), weight, None if bias is None else bias.to(accumulate))
    return out.to(x.dtype)


_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <immintrin.h>

namespace {
constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 4;

#if RABIT_ISA == 2
// 32 weights of one block as two 16-lane float vectors
inline void widen(const uint8_t* q, __m512& lo, __m512& hi) {
  #if RABIT_BITS == 8
    lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q)));
    hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + 16))));
  #else
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q);
    const __m128i nibble = _mm_set1_epi8(15);
    const __m512i eight = _mm512_set1_epi32(8);
    lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, nibble)), eight));
    hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(
        _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble)), eight));
  #endif
}
#endif

#if RABIT_ISA == 1
// 32 weights of one block as four 8-lane float vectors
inline void widen(const uint8_t* q, __m256* w) {
  #if RABIT_BITS == 8
    for (int p = 0; p < 4; ++p)
        w[p] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(q + 8 * p))));
  #else
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q);
    const __m128i nibble = _mm_set1_epi8(15);
    const __m256i eight = _mm256_set1_epi32(8);
    const __m128i low = _mm_and_si128(bytes, nibble);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    const __m128i parts[4] = {low, _mm_srli_si128(low, 8), high, _mm_srli_si128(high, 8)};
    for (int p = 0; p < 4; ++p)
        w[p] = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[p]), eight));
  #endif
}

inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// weight of column c of one row: int8 value, or the nibble of the block layout minus 8
inline float weight_at(const uint8_t* row, int64_t c) {
  #if RABIT_BITS == 8
    return static_cast<float>(reinterpret_cast<const int8_t*>(row)[c]);
  #else
    const uint8_t byte = row[(c / kBlock) * 16 + (c % kBlock) % 16];
    return static_cast<float>(((c % kBlock) < 16 ? (byte & 15) : (byte >> 4)) - 8);
  #endif
}

template <typename scale_t>
void weight_only_gemv(const float* x, const uint8_t* qweight, const scale_t* scale, const float* bias, float* out,
                      int64_t rows, int64_t out_features, int64_t in_features, int64_t group_size, int64_t groups,
                      int64_t has_bias, int64_t threads) {
    const int64_t row_bytes = RABIT_BITS == 8 ? in_features : 16 * ((in_features + kBlock - 1) / kBlock);
    const int64_t full_blocks = in_features / kBlock;
    const int64_t blocks_per_group = group_size / kBlock;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < out_features; ++n) {
        const uint8_t* row = qweight + n * row_bytes;
        const scale_t* row_scale = scale + n * groups;
        float total[kMaxRows] = {0.0f, 0.0f, 0.0f, 0.0f};
#if RABIT_ISA == 2
        __m512 acc[kMaxRows];
        for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
        for (int64_t b = 0; b < full_blocks; ++b) {
            const __m512 s = _mm512_set1_ps(static_cast<float>(row_scale[b / blocks_per_group]));
            __m512 lo, hi;
            widen(row + b * (RABIT_BITS == 8 ? kBlock : 16), lo, hi);
            for (int64_t m = 0; m < rows; ++m) {
                const float* xb = x + m * in_features + b * kBlock;
                const __m512 dot =
                    _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xb)));
                acc[m] = _mm512_fmadd_ps(dot, s, acc[m]);
            }
        }
        for (int64_t m = 0; m < rows; ++m) total[m] = _mm512_reduce_add_ps(acc[m]);
#elif RABIT_ISA == 1
        __m256 acc[kMaxRows];
        for (int64_t m = 0; m < rows; ++m) acc[m] = _mm256_setzero_ps();
        for (int64_t b = 0; b < full_blocks; ++b) {
            const __m256 s = _mm256_set1_ps(static_cast<float>(row_scale[b / blocks_per_group]));
            __m256 w[4];
            widen(row + b * (RABIT_BITS == 8 ? kBlock : 16), w);
            for (int64_t m = 0; m < rows; ++m) {
                const float* xb = x + m * in_features + b * kBlock;
                __m256 dot = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
                for (int p = 1; p < 4; ++p) dot = _mm256_fmadd_ps(w[p], _mm256_loadu_ps(xb + 8 * p), dot);
                acc[m] = _mm256_fmadd_ps(dot, s, acc[m]);
            }
        }
        for (int64_t m = 0; m < rows; ++m) total[m] = sum8(acc[m]);
#else
        for (int64_t b = 0; b < full_blocks; ++b) {
            const float s = static_cast<float>(row_scale[b / blocks_per_group]);
            for (int64_t m = 0; m < rows; ++m) {
                float dot = 0.0f;
                for (int64_t c = b * kBlock; c < (b + 1) * kBlock; ++c)
                    dot += weight_at(row, c) * x[m * in_features + c];
                total[m] += dot * s;
            }
        }
#endif
        // columns of the last, partial block
        for (int64_t c = full_blocks * kBlock; c < in_features; ++c) {
            const float w = weight_at(row, c) * static_cast<float>(row_scale[c / group_size]);
            for (int64_t m = 0; m < rows; ++m) total[m] += w * x[m * in_features + c];
        }
        for (int64_t m = 0; m < rows; ++m) out[m * out_features + n] = total[m] + (has_bias ? bias[n] : 0.0f);
    }
}
}  // namespace

extern "C" void kernel(const float* x, const uint8_t* qweight, const SCALE_T* scale, const float* bias, float* out,
                       int64_t rows, int64_t out_features, int64_t in_features, int64_t group_size, int64_t groups,
                       int64_t has_bias, int64_t threads) {
    weight_only_gemv<SCALE_T>(x, qweight, scale, bias, out, rows, out_features, in_features, group_size, groups,
                              has_bias, threads);
}
"""

_ARGUMENT_TYPES = ["const float*", "const uint8_t*", "const SCALE_T*", "const float*", "float*"] + ["int64_t"] * 7
_CPP_SCALE_TYPES = {torch.float32: "float", torch.float16: "at::Half", torch.bfloat16: "at::BFloat16"}
_BUILT: dict[tuple[int, str, torch.dtype], object] = {}


def native_isa() -> str:
    """The widest path this build can take: what Inductor's C++ toolchain compiles for on this CPU."""
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
                              threads: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The C++ kernel on CPU ``x [..., K]`` (at most :data:`KERNEL_MAX_ROWS` rows) -> ``[..., N]`` in x.dtype.

    ``isa`` forces a path (one of :data:`ISAS`, at most :func:`native_isa`); ``threads`` defaults to torch's;
    ``out``: a contiguous fp32 ``[rows, N]`` to write the kernel's result into (tests poison it first)."""
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
        torch.get_num_threads() if threads is None else threads)
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


@torch.library.custom_op("rabit::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                       bits: int, group_size: int, in_features: int) -> torch.Tensor:
    """``y = x @ (q * s)^T + b`` -> ``[..., N]`` (format in the module docstring; ``group_size`` 0 = per row).

    CPU: the C++ kernel for at most :data:`KERNEL_MAX_ROWS` rows of fp32/fp16/bf16, else the reference; other
    devices: the reference (dequantize + one matmul)."""
    _check_inputs(x, qweight, scale, bias, bits, group_size, in_features)
    few_rows = x.numel() <= KERNEL_MAX_ROWS * max(in_features, 1)
    if x.device.type == "cpu" and few_rows and x.dtype in _CPP_SCALE_TYPES and scale.dtype in _CPP_SCALE_TYPES:
        return weight_only_linear_kernel(x, qweight, scale, bias, bits, group_size or None, in_features)
    return weight_only_linear_reference(x, qweight, scale, bias, bits, group_size or None, in_features)


@weight_only_linear.register_fake
def _(x, qweight, scale, bias, bits, group_size, in_features):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _setup_context(ctx, inputs, output):
    x, qweight, scale, bias, bits, group_size, in_features = inputs
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
    return grad_x, None, None, grad_bias, None, None, None


weight_only_linear.register_autograd(_backward, setup_context=_setup_context)
