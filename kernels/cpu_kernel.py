"""The CPU kernel of the packed residual-binary linear for decode (few rows): generated C++, matmul-free.

For ``x [M, K]``, ``packed_signs`` int32 ``[k, N, W = ceil(K/32)]`` (format v1: bit ``j`` of word ``w`` is column
``32 w + j``, set = -1), ``row_scale g [k, N]``, ``col_scale h [S, k, K]`` (S siblings sharing ``x``; sibling s
owns the rows ``segment_starts[s] <= n < segment_starts[s + 1]``), ``bias b [N]`` or None::

    v[m, s, i, c] = h[s, i, c] * x[m, c]            (c < K; 0 for K <= c < 32 W)
    y[m, n]       = sum_i g[i, n] * sum_c (-1)^bit_i[n, c] * v[m, s(n), i, c]  +  b[n]      -> [M, N]

The inner product only flips signs and adds: each packed word is broadcast to a SIMD vector of L lanes
(``at::vec::Vectorized<float>``: 8 on AVX2, 16 on AVX-512, 4 on NEON), shifted left by ``31 - j`` per lane so that
bit ``j`` lands in bit 31, masked to that bit and XORed into the float sign bit of ``v``, then added to one of
``32 / L`` accumulators (four ALU ops per L signs, no int-to-float conversion, no multiply). Only the ``k N W``
packed words and ``k (N + S K)`` scales are read; nothing of ``N x K`` elements exists anywhere. Accumulation is
fp32; ``x``, the scales and ``y`` are fp32, fp16 or bf16 (template parameters of the one C++ source), the bias
fp32. Output rows are split over ``threads`` OpenMP threads.

The source is compiled on first use for each (x dtype, scale dtype) pair by Inductor's own C++ toolchain
(``CppPythonBindingsCodeCache``: the compiler, flags, OpenMP and SIMD ISA that Inductor's generated CPU kernels
use, and its on-disk cache), so it needs nothing that ``torch.compile`` on the CPU does not already need.

Why a hand-written loop rather than an Inductor-generated one (:mod:`.cpu_lowering`'s ``"bitwise"`` form): Inductor
re-broadcasts the word and rebuilds the bit positions in every 8-lane step and converts each bit to float before
an FMA (about 2 signs per cycle); this loop runs about 5 (576 x 576, k = 2, one thread, warm: 44 us a layer). As an
extern call it costs about 15 us more per layer than a kernel inside Inductor's graph (dispatch, allocation), so
on the smallest layers the two are close; from 576 x 576 up it is faster (``benchmarks/cpu_layers.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .packing import segment_starts, words_per_row

# Largest number of rows (prod of x.shape[:-1]) for which the op's CPU kernel and the backend use this kernel;
# more rows unpack the weight once and use the matmul library (``"dense"`` in :mod:`.cpu_lowering`). Measured
# (1 thread, k = 2, us per layer, kernel / dense at 4 and 8 rows): 576x576 220/245 and 449/277; fused q+k+v
# 329/619 and 985/493; fused gate+up 1334/1505 and 2667/1725; 576x1536 485/625 and 927/830.
KERNEL_MAX_ROWS = 4

# x / scale dtypes the kernel is generated for, and their C++ types
CPP_TYPES = {torch.float32: "float", torch.float16: "at::Half", torch.bfloat16: "at::BFloat16"}

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <vector>

namespace {
using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;
constexpr int64_t kBits = 32;
constexpr int64_t kLanes = Vec::size();
static_assert(kBits % kLanes == 0, "a packed word must split into whole SIMD vectors");
constexpr int64_t kGroups = kBits / kLanes;

template <typename x_t, typename scale_t>
void residual_binary_gemv(const x_t* x, const int32_t* packed_signs, const scale_t* row_scale,
                          const scale_t* col_scale, const float* bias, const int64_t* segment_starts, x_t* out,
                          int64_t rows, int64_t out_features, int64_t in_features, int64_t segments,
                          int64_t paths, int64_t has_bias, int64_t threads) {
    const int64_t words = (in_features + kBits - 1) / kBits;
    const int64_t padded = words * kBits;
    // scaled[m][s][i][c] = h[s][i][c] * x[m][c], zero past in_features
    std::vector<float> scaled(rows * segments * paths * padded, 0.0f);
    for (int64_t m = 0; m < rows; ++m)
        for (int64_t s = 0; s < segments; ++s)
            for (int64_t i = 0; i < paths; ++i) {
                float* v = scaled.data() + ((m * segments + s) * paths + i) * padded;
                const scale_t* h = col_scale + (s * paths + i) * in_features;
                for (int64_t c = 0; c < in_features; ++c)
                    v[c] = static_cast<float>(h[c]) * static_cast<float>(x[m * in_features + c]);
            }
    // lane l of group q tests bit q * kLanes + l of the word: shift it into bit 31
    int32_t shift_table[kBits];
    for (int64_t j = 0; j < kBits; ++j) shift_table[j] = static_cast<int32_t>(kBits - 1 - j);
    IVec shifts[kGroups];
    for (int64_t q = 0; q < kGroups; ++q) shifts[q] = IVec::loadu(shift_table + q * kLanes);
    const IVec sign_bit(static_cast<int32_t>(0x80000000u));

    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < out_features; ++n) {
        int64_t segment = 0;
        while (n >= segment_starts[segment + 1]) ++segment;
        for (int64_t m = 0; m < rows; ++m) {
            float y = has_bias ? bias[n] : 0.0f;
            for (int64_t i = 0; i < paths; ++i) {
                const int32_t* row_words = packed_signs + (i * out_features + n) * words;
                const float* v = scaled.data() + ((m * segments + segment) * paths + i) * padded;
                Vec acc[kGroups];
                for (int64_t q = 0; q < kGroups; ++q) acc[q] = Vec(0.0f);
                for (int64_t w = 0; w < words; ++w) {
                    const IVec word(row_words[w]);
                    for (int64_t q = 0; q < kGroups; ++q) {
                        const IVec flip = (word << shifts[q]) & sign_bit;
                        acc[q] = acc[q] + (Vec::loadu(v + w * kBits + q * kLanes) ^ at::vec::cast<float>(flip));
                    }
                }
                for (int64_t q = 1; q < kGroups; ++q) acc[0] = acc[0] + acc[q];
                const float dot = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc[0]);
                y += static_cast<float>(row_scale[i * out_features + n]) * dot;
            }
            out[m * out_features + n] = static_cast<x_t>(y);
        }
    }
}
}  // namespace

extern "C" void kernel(const X_T* x, const int32_t* packed_signs, const SCALE_T* row_scale,
                       const SCALE_T* col_scale, const float* bias, const int64_t* segment_starts, X_T* out,
                       int64_t rows, int64_t out_features, int64_t in_features, int64_t segments, int64_t paths,
                       int64_t has_bias, int64_t threads) {
    residual_binary_gemv<X_T, SCALE_T>(x, packed_signs, row_scale, col_scale, bias, segment_starts, out, rows,
                                       out_features, in_features, segments, paths, has_bias, threads);
}
"""

_ARGUMENT_TYPES = ["const X_T*", "const int32_t*", "const SCALE_T*", "const SCALE_T*", "const float*",
                   "const int64_t*", "X_T*"] + ["int64_t"] * 7

_BUILT: dict[tuple[torch.dtype, torch.dtype], object] = {}


def kernel_source(x_dtype: torch.dtype, scale_dtype: torch.dtype) -> tuple[list[str], str]:
    """The argument types and C++ source of the kernel for one (x dtype, scale dtype) pair."""
    for name, dtype in (("x", x_dtype), ("scale", scale_dtype)):
        if dtype not in CPP_TYPES:
            raise TypeError(f"the CPU kernel takes {name} in {sorted(map(str, CPP_TYPES))}, got {dtype}")
    types = {"X_T": CPP_TYPES[x_dtype], "SCALE_T": CPP_TYPES[scale_dtype]}

    def substitute(text: str) -> str:
        for placeholder, cpp_type in types.items():
            text = text.replace(placeholder, cpp_type)
        return text

    return [substitute(argument) for argument in _ARGUMENT_TYPES], substitute(_SOURCE)


def _built_kernel(x_dtype: torch.dtype, scale_dtype: torch.dtype):
    """The compiled kernel for the pair, built (or read from Inductor's disk cache) on first use."""
    key = (x_dtype, scale_dtype)
    if key not in _BUILT:
        from torch._inductor.codecache import CppPythonBindingsCodeCache

        argument_types, source = kernel_source(x_dtype, scale_dtype)
        try:
            _BUILT[key] = CppPythonBindingsCodeCache.load_pybinding(argument_types, source)
        except Exception as error:
            raise RuntimeError(
                "rabit: building the CPU kernel with Inductor's C++ toolchain failed (it needs the C++ compiler "
                f"that torch.compile uses on the CPU): {error}") from error
    return _BUILT[key]


def supports(x: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor) -> bool:
    """The kernel handles these dtypes (fp32/fp16/bf16 ``x`` and scales, scales of one dtype) on the CPU."""
    return (x.device.type == "cpu" and x.dtype in CPP_TYPES and row_scale.dtype in CPP_TYPES
            and col_scale.dtype == row_scale.dtype)


def _few_rows(x: torch.Tensor) -> bool:
    """At most :data:`KERNEL_MAX_ROWS` rows (prod of ``x.shape[:-1]``): the kernel beats unpack + matmul."""
    return x.numel() <= KERNEL_MAX_ROWS * max(x.shape[-1], 1)


def uses_kernel(x: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor) -> bool:
    """The op's CPU kernel runs this kernel: supported dtypes and few rows (:func:`_few_rows`)."""
    return supports(x, row_scale, col_scale) and _few_rows(x)


def _launch(rows: torch.Tensor, packed_signs: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
            bias: torch.Tensor | None, segment_starts: torch.Tensor, out: torch.Tensor) -> None:
    """Run the kernel on contiguous ``rows [M, K]`` into contiguous ``out [..., N_total]`` (M rows in memory); no
    checks (callers check)."""
    _built_kernel(rows.dtype, row_scale.dtype)(
        rows, packed_signs, row_scale, col_scale, row_scale if bias is None else bias.to(torch.float32).contiguous(),
        segment_starts, out, rows.shape[0], packed_signs.shape[1], rows.shape[1], col_scale.shape[0],
        packed_signs.shape[0], int(bias is not None), torch.get_num_threads())


def residual_binary_linear_siblings_kernel(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    out_features: Sequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """S sibling linears sharing ``x [..., K]`` by the C++ kernel (shapes in the module docstring; one linear is
    ``S = 1`` with ``col_scale [1, k, K]``) -> ``[..., N_total]`` in ``x.dtype``, written into ``out`` (contiguous
    ``[rows, N_total]`` of ``x.dtype``) if given."""
    if not supports(x, row_scale, col_scale):
        raise TypeError(f"the CPU kernel takes CPU x and scales in {sorted(map(str, CPP_TYPES))} (one scale dtype), "
                        f"got x {x.dtype} on {x.device}, row_scale {row_scale.dtype}, col_scale {col_scale.dtype}")
    if packed_signs.shape[-1] != words_per_row(in_features) or packed_signs.dtype != torch.int32:
        raise ValueError(f"packed_signs must be int32 [k, N, {words_per_row(in_features)} words] for K={in_features}")
    total = packed_signs.shape[1]
    rows = x.reshape(-1, in_features).contiguous()
    if out is None:
        out = torch.empty(rows.shape[0], total, dtype=x.dtype)
    elif out.shape != (rows.shape[0], total) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(rows.shape[0], total)}, "
                         f"got {out.dtype} {tuple(out.shape)}")
    starts = torch.tensor(segment_starts(list(out_features)), dtype=torch.int64)
    _launch(rows, packed_signs.contiguous(), row_scale.contiguous(), col_scale.contiguous(), bias, starts, out)
    return out.reshape(*x.shape[:-1], total)


def residual_binary_linear_kernel(
    x: torch.Tensor,
    packed_signs: torch.Tensor,
    row_scale: torch.Tensor,
    col_scale: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
) -> torch.Tensor:
    """One packed linear (``col_scale [k, K]``) by the C++ kernel -> ``[..., N]`` in ``x.dtype``."""
    return residual_binary_linear_siblings_kernel(x, packed_signs, row_scale, col_scale.unsqueeze(0), bias,
                                                  in_features, [packed_signs.shape[1]])


# The op the backend's CPU lowering puts in compiled graphs: the kernel behind the dispatcher's cheapest path (a
# plain CPU kernel, no autograd or triton_op layers: about 15 us per call on top of the kernel itself, against
# about 85 through ``rabit::residual_binary_linear``). Its inputs were validated when the pass built the call.
GEMV_OP = "rabit::residual_binary_gemv_cpu"
_SCHEMA = ("residual_binary_gemv_cpu(Tensor x, Tensor packed_signs, Tensor row_scale, Tensor col_scale, "
           "Tensor? bias, Tensor segment_starts, int in_features) -> Tensor")


def _gemv_cpu(x: torch.Tensor, packed_signs: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor,
              bias: torch.Tensor | None, starts: torch.Tensor, in_features: int) -> torch.Tensor:
    """``rabit::residual_binary_gemv_cpu``: the siblings linear (``col_scale [S, k, K]``, rows of sibling s from
    ``starts[s]`` to ``starts[s + 1]``); more than :data:`KERNEL_MAX_ROWS` rows (a graph compiled for decode run
    on a prompt) take the reference, which unpacks the weight once."""
    if not _few_rows(x):
        from .reference import residual_binary_linear_siblings_reference

        return residual_binary_linear_siblings_reference(x, packed_signs, row_scale, col_scale, bias, in_features,
                                                         starts.diff().tolist())
    rows = (x if x.dim() == 2 else x.reshape(-1, in_features)).contiguous()  # reshape costs ~1 us: skip it if 2-D
    out = torch.empty((*x.shape[:-1], packed_signs.shape[1]), dtype=x.dtype)  # contiguous: [rows, N] in memory
    _launch(rows, packed_signs.contiguous(), row_scale.contiguous(), col_scale.contiguous(), bias, starts, out)
    return out


def _gemv_fake(x, packed_signs, row_scale, col_scale, bias, starts, in_features):
    return x.new_empty(*x.shape[:-1], packed_signs.shape[1])


def _define_gemv_op() -> torch.library.Library:
    """Define ``rabit::residual_binary_gemv_cpu`` with its CPU kernel and fake implementation."""
    library = torch.library.Library("rabit", "FRAGMENT")
    library.define(_SCHEMA)
    library.impl("residual_binary_gemv_cpu", _gemv_cpu, "CPU")
    torch.library.register_fake(GEMV_OP, _gemv_fake, lib=library)
    return library


_LIBRARY = _define_gemv_op()


def gemv_call(x, packed_signs, row_scale, col_scale, bias, in_features: int, out_features: Sequence[int]):
    """``rabit::residual_binary_gemv_cpu`` for S siblings (``col_scale [S, k, K]``; one linear is ``S = 1``);
    works on FX proxies (the lowering pass traces it)."""
    starts = torch.tensor(segment_starts(list(out_features)), dtype=torch.int64)
    return torch.ops.rabit.residual_binary_gemv_cpu(x, packed_signs, row_scale, col_scale, bias, starts,
                                                    in_features)
