// The weight-only int8 / int4 linear for few rows (the LM head at decode); format and error bounds in weight_only.py.
// Built by Inductor's C++ toolchain with RABIT_BITS (8 or 4), RABIT_ISA (2 AVX-512, 1 AVX2, 0 portable) and
// SCALE_T (the scale's C++ type) defined in front of this file.
//
// Two arithmetics, chosen per call:
// - fp32 activations: per 32 weights one widening load and int-to-float conversion, an FMA per row of x.
// - int8 activations: x is rounded per block of 32 columns, d[b] = max |x_b| / 127, q = round(x / d), and each
//   block's dot product is an exact integer: vpdpbusd (AVX-512 VNNI, 64 weights an instruction) or
//   vpmaddubsw + vpmaddwd (AVX2, 32), then y[n] = sum_b s[n, g(b)] * d[b] * dot_b in fp32.
//   int8 weights: vpdpbusd multiplies unsigned by signed bytes, so |q| is the unsigned side and the weight takes q's
//   sign. int4 weights: the nibble u = w + 8 is the unsigned side, sum_c u_c q_c - 8 sum_c q_c = sum_c w_c q_c.

#include <torch/csrc/inductor/cpp_prefix.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "work_sharing.h"

#define RABIT_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

namespace {
constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 4;

// run(std::integral_constant<int, rows>{}): the count of x's rows (1 .. kMaxRows) as a template constant, so that
// the row loops unroll and their accumulators stay in registers
template <typename F>
void with_row_count(int64_t rows, F&& run) {
    static_assert(kMaxRows == 4, "one case per row count");
    switch (rows) {
        case 1: return run(std::integral_constant<int, 1>{});
        case 2: return run(std::integral_constant<int, 2>{});
        case 3: return run(std::integral_constant<int, 3>{});
        default: return run(std::integral_constant<int, 4>{});
    }
}
// The SIMD paths prefetch the weights this far ahead (a few rows of a small head): the hardware
// prefetcher alone left one core at ~60% of its DRAM bandwidth (benchmarks/RESULTS.md).
constexpr int64_t kPrefetchBytes = 4096;
// Tiles (of 1 or 2 weight rows) a unit of work hands to a thread: 32-64 rows, a few tens of KB of a head's weights.
constexpr int64_t kUnitTiles = 32;
thread_local UnitQueue t_unit_queue;

// ---------------------------------------------------------------------------------------------------------------
// fp32 activations

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
#endif

#if RABIT_ISA >= 1
inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// weight of column c of one row: the int8 value, or the nibble of the block layout minus 8
inline int32_t weight_at(const uint8_t* row, int64_t c) {
  #if RABIT_BITS == 8
    return reinterpret_cast<const int8_t*>(row)[c];
  #else
    const uint8_t byte = row[(c / kBlock) * 16 + (c % kBlock) % 16];
    return ((c % kBlock) < 16 ? (byte & 15) : (byte >> 4)) - 8;
  #endif
}

constexpr int64_t row_bytes(int64_t in_features) {
    return RABIT_BITS == 8 ? in_features : 16 * ((in_features + kBlock - 1) / kBlock);
}

template <typename scale_t>
void gemv_fp32(const float* x, const uint8_t* qweight, const scale_t* scale, float* total_out, int64_t rows,
               int64_t n, int64_t in_features, int64_t group_size, int64_t groups) {
    const uint8_t* row = qweight + n * row_bytes(in_features);
    const scale_t* row_scale = scale + n * groups;
    const int64_t full_blocks = in_features / kBlock;
    const int64_t blocks_per_group = group_size / kBlock;
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
                dot += static_cast<float>(weight_at(row, c)) * x[m * in_features + c];
            total[m] += dot * s;
        }
    }
#endif
    // columns of the last, partial block
    for (int64_t c = full_blocks * kBlock; c < in_features; ++c) {
        const float w = static_cast<float>(weight_at(row, c)) * static_cast<float>(row_scale[c / group_size]);
        for (int64_t m = 0; m < rows; ++m) total[m] += w * x[m * in_features + c];
    }
    for (int64_t m = 0; m < rows; ++m) total_out[m] = total[m];
}

// ---------------------------------------------------------------------------------------------------------------
// int8 activations

// x rounded per block of 32 columns, zero-padded to whole 64-column chunks (two blocks).
struct Activations {
    int64_t chunks = 0;
    std::vector<int8_t> q;        // [rows, 64 chunks], natural column order
    std::vector<float> d;         // [rows, 2 chunks]: the block's step, max |x_b| / 127
    // the VNNI and AVX2 int4 paths' operands, per row and step of 64 weight bytes (prepare_steps)
    int64_t steps = 0;
    std::vector<int8_t> operand;     // int8 weights: |q|; int4: q under the low nibbles [rows, steps, 64]
    std::vector<int8_t> high;        // int4 weights: q under the high nibbles [rows, steps, 64]
    std::vector<uint64_t> negative;  // int8 weights: bit j set where byte j's q < 0 [rows, steps]
    std::vector<int32_t> offset;     // int4 weights: -8 * the sum of each lane's 8 q [rows, steps, 16]
    std::vector<float> step;         // d of each int32 lane's block [rows, steps, 16]
};

void quantize_activations(const float* x, int64_t rows, int64_t in_features, Activations& a) {
    a.chunks = (in_features + 2 * kBlock - 1) / (2 * kBlock);
    const int64_t blocks = 2 * a.chunks, padded = blocks * kBlock;
    a.q.assign(rows * padded, 0);
    a.d.assign(rows * blocks, 0.0f);
    for (int64_t m = 0; m < rows; ++m) {
        for (int64_t b = 0; b < blocks; ++b) {
            const float* xb = x + m * in_features + b * kBlock;
            const int64_t count = std::max<int64_t>(0, std::min(kBlock, in_features - b * kBlock));
            float top = 0.0f;
            for (int64_t c = 0; c < count; ++c) top = std::max(top, std::fabs(xb[c]));
            a.d[m * blocks + b] = top / 127.0f;
            const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
            for (int64_t c = 0; c < count; ++c)
                a.q[m * padded + b * kBlock + c] = static_cast<int8_t>(
                    std::clamp(static_cast<int32_t>(std::nearbyint(xb[c] * inverse)), -127, 127));
        }
    }
}

#if RABIT_ISA >= 1
// The VNNI paths take 64 weight bytes a step: int8, 64 columns (blocks 2t, 2t + 1); int4, 128 columns (blocks
// 4t..4t + 3: 16 bytes each, low nibbles = columns 0-15 and high nibbles = 16-31 of a block). vpdpbusd adds 4 bytes
// into each int32 lane l (bytes 4l..4l+3), so lane l belongs to block lane / 8 (int8) or lane / 4 (int4) of the
// step; the low and the high nibbles of int4 weights are two vpdpbusd into the same lanes. The AVX2 int4 path reads
// the same int4 operands 32 bytes (two blocks, 8 lanes) at a time.
constexpr int64_t kStepColumns = RABIT_BITS == 8 ? 64 : 128;
constexpr int64_t kStepBlocks = kStepColumns / kBlock;
constexpr int64_t kLanesPerBlock = 16 / kStepBlocks;

void prepare_steps(int64_t rows, int64_t in_features, Activations& a) {
    const int64_t steps = (in_features + kStepColumns - 1) / kStepColumns, blocks = 2 * a.chunks;
    const int64_t padded = blocks * kBlock;
    a.steps = steps;
    a.step.assign(rows * steps * 16, 0.0f);
    a.operand.assign(rows * steps * 64, 0);
    if (RABIT_BITS == 8) {
        a.negative.assign(rows * steps, 0);
    } else {
        a.high.assign(rows * steps * 64, 0);
        a.offset.assign(rows * steps * 16, 0);
    }
    for (int64_t m = 0; m < rows; ++m) {
        const int8_t* q = a.q.data() + m * padded;
        for (int64_t t = 0; t < steps; ++t) {
            const int64_t at = m * steps + t;
            for (int64_t lane = 0; lane < 16; ++lane) {
                const int64_t block = kStepBlocks * t + lane / kLanesPerBlock;
                a.step[at * 16 + lane] = block < blocks ? a.d[m * blocks + block] : 0.0f;
            }
            for (int64_t j = 0; j < 64; ++j) {
                if (RABIT_BITS == 8) {
                    const int64_t column = kStepColumns * t + j;
                    const int8_t value = column < padded ? q[column] : 0;
                    a.operand[at * 64 + j] = static_cast<int8_t>(std::abs(value));  // |q| <= 127: the unsigned side
                    if (value < 0) a.negative[at] |= uint64_t{1} << j;
                } else {
                    // byte j of the step's 64: block 4t + j / 16, column j % 16 (low nibble) or 16 + j % 16 (high)
                    const int64_t column = (kStepBlocks * t + j / 16) * kBlock + j % 16;
                    const int8_t low = column < padded ? q[column] : 0, high = column < padded ? q[column + 16] : 0;
                    a.operand[at * 64 + j] = low;
                    a.high[at * 64 + j] = high;
                    a.offset[at * 16 + j / 4] -= 8 * (low + high);
                }
            }
        }
    }
}

#endif

#if RABIT_ISA == 2
// 16 scales from p as floats, lanes past count zeroed. Masked loads stall the stream on Zen 5
// (benchmarks/RESULTS.md), so a full load is ANDed with the mask wherever 16 scales are readable (readable: how many
// the tensor holds from p on; a k-masked move would be folded back into a masked load); only the tensor's last few
// scales take a masked load.
RABIT_VNNI inline __m512 load_scales(const float* p, int64_t count, int64_t readable) {
    const __mmask16 keep = static_cast<__mmask16>((1u << std::min<int64_t>(count, 16)) - 1);
    if (readable < 16) return _mm512_maskz_loadu_ps(keep, p);
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(p)), _mm512_movm_epi32(keep)));
}
RABIT_VNNI inline __m256i load_scale_bits(const void* p, int64_t count, int64_t readable) {
    const __mmask16 keep = static_cast<__mmask16>((1u << std::min<int64_t>(count, 16)) - 1);
    if (readable < 16) return _mm256_maskz_loadu_epi16(keep, p);
    return _mm256_and_si256(_mm256_loadu_si256(static_cast<const __m256i*>(p)), _mm256_movm_epi16(keep));
}
RABIT_VNNI inline __m512 load_scales(const at::Half* p, int64_t count, int64_t readable) {
    return _mm512_cvtph_ps(load_scale_bits(p, count, readable));
}
RABIT_VNNI inline __m512 load_scales(const at::BFloat16* p, int64_t count, int64_t readable) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_scale_bits(p, count, readable)), 16));
}

// kCols consecutive weight rows (n, n + 1) against kRows rows of x; total_out[c * kMaxRows + m]. kPerRow: one scale
// per row, applied once at the end; else each lane takes its block's scale: from a vector of 16 block scales
// (group_size 32, loaded every 16 blocks) or from the step's block scalars (other group sizes). Two weight rows at a
// time share the x operands' loads and interleave their reductions.
template <typename scale_t, bool kPerRow, int kRows, int kCols>
RABIT_VNNI void gemv_int8x_vnni_rows(const Activations& a, const uint8_t* qweight, const scale_t* scale,
                                     float* total_out, int64_t n, int64_t out_features, int64_t in_features,
                                     int64_t group_size, int64_t groups) {
    const int64_t steps = a.steps, bytes_per_row = row_bytes(in_features), last_group = groups - 1;
    const uint8_t* row = qweight + n * bytes_per_row;
    const scale_t* row_scale = scale + n * groups;
    // from row n on, the weight bytes and scales the tensors hold (a full-width load past a row stays inside them)
    const int64_t readable_bytes = (out_features - n) * bytes_per_row, readable_scales = (out_features - n) * groups;
    const __m512i lane_block = kStepBlocks == 2 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                                : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[kCols][kRows];
    __m512 block_scales[kCols];
    for (int c = 0; c < kCols; ++c) {
        block_scales[c] = _mm512_setzero_ps();
        for (int m = 0; m < kRows; ++m) acc[c][m] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < steps; ++t) {
        __m512 s[kCols];
        __m512i w[kCols];
        const int64_t remaining = bytes_per_row - 64 * t;
        const __mmask64 keep = remaining >= 64 ? ~__mmask64{0} : (__mmask64{1} << remaining) - 1;
        for (int c = 0; c < kCols; ++c) {
            const scale_t* column_scale = row_scale + c * groups;
            s[c] = _mm512_set1_ps(1.0f);
            if (!kPerRow && group_size == kBlock) {
                const int64_t reload = 16 / kStepBlocks;
                if (t % reload == 0)
                    block_scales[c] = load_scales(column_scale + kStepBlocks * t, groups - kStepBlocks * t,
                                                  readable_scales - c * groups - kStepBlocks * t);
                s[c] = _mm512_permutexvar_ps(
                    _mm512_add_epi32(lane_block, _mm512_set1_epi32(kStepBlocks * (t % reload))), block_scales[c]);
            } else if (!kPerRow) {
                alignas(16) float step_scales[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (int64_t b = 0; b < kStepBlocks; ++b)
                    step_scales[b] = static_cast<float>(
                        column_scale[std::min((kStepBlocks * t + b) * kBlock / group_size, last_group)]);
                s[c] = _mm512_permutexvar_ps(lane_block, _mm512_castps128_ps512(_mm_load_ps(step_scales)));
            }
            // the row's tail masked by an AND where the tensor holds 64 bytes from here (load_scales: why)
            const uint8_t* at = row + c * bytes_per_row + 64 * t;
            _mm_prefetch(reinterpret_cast<const char*>(at + kPrefetchBytes), _MM_HINT_T0);
            w[c] = readable_bytes - c * bytes_per_row - 64 * t >= 64
                ? _mm512_and_si512(_mm512_loadu_si512(at), _mm512_movm_epi8(keep))
                : _mm512_maskz_loadu_epi8(keep, at);
        }
        for (int m = 0; m < kRows; ++m) {
            const int64_t at = m * steps + t;
            const __m512 step = _mm512_loadu_ps(a.step.data() + at * 16);
            const __m512i operand = _mm512_loadu_si512(a.operand.data() + at * 64);
#if RABIT_BITS == 8
            const __mmask64 negative = a.negative[at];
#else
            const __m512i offset = _mm512_loadu_si512(a.offset.data() + at * 16);
            const __m512i high_operand = _mm512_loadu_si512(a.high.data() + at * 64);
#endif
            for (int c = 0; c < kCols; ++c) {
#if RABIT_BITS == 8
                const __m512i signed_w = _mm512_mask_sub_epi8(w[c], negative, _mm512_setzero_si512(), w[c]);
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), operand, signed_w);
#else
                const __m512i nibble = _mm512_set1_epi8(15);
                const __m512i low = _mm512_and_si512(w[c], nibble);
                const __m512i high = _mm512_and_si512(_mm512_srli_epi16(w[c], 4), nibble);
                const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(offset, low, operand), high, high_operand);
#endif
                acc[c][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), kPerRow ? step : _mm512_mul_ps(step, s[c]),
                                            acc[c][m]);
            }
        }
    }
    for (int c = 0; c < kCols; ++c) {
        const float row_factor = kPerRow ? static_cast<float>(row_scale[c * groups]) : 1.0f;
        for (int m = 0; m < kRows; ++m) total_out[c * kMaxRows + m] = _mm512_reduce_add_ps(acc[c][m]) * row_factor;
    }
}

// Output rows n .. n + columns - 1 (columns 1 or 2) against the rows of x.
template <typename scale_t>
RABIT_VNNI void gemv_int8x_vnni(const Activations& a, const uint8_t* qweight, const scale_t* scale,
                                float* total_out, int64_t rows, int64_t n, int64_t columns, int64_t out_features,
                                int64_t in_features, int64_t group_size, int64_t groups) {
    const auto run = [&](auto rows_constant, auto columns_constant) {
        constexpr int kRows = decltype(rows_constant)::value, kCols = decltype(columns_constant)::value;
        if (groups == 1)
            gemv_int8x_vnni_rows<scale_t, true, kRows, kCols>(a, qweight, scale, total_out, n, out_features,
                                                              in_features, group_size, groups);
        else
            gemv_int8x_vnni_rows<scale_t, false, kRows, kCols>(a, qweight, scale, total_out, n, out_features,
                                                               in_features, group_size, groups);
    };
    if (columns == 2)
        with_row_count(rows, [&](auto rows_constant) { run(rows_constant, std::integral_constant<int, 2>{}); });
    else
        with_row_count(rows, [&](auto rows_constant) { run(rows_constant, std::integral_constant<int, 1>{}); });
}
#endif

// AVX2 (also the AVX-512 build's path on a CPU without VNNI). int8 weights: one 32-column block per vector, q's
// sign moved onto the weight (vpsignb), |q| (prepare_steps' operand) the unsigned side of vpmaddubsw; the rows of x
// unrolled (kRows) and two accumulators per row (even and odd blocks), so that consecutive FMAs do not wait on each
// other; a scale per row (kPerRow) applies once at the end; the weights are prefetched kPrefetchBytes ahead. int4
// weights: two blocks per vector (32 packed bytes, the operands of prepare_steps), low and high nibbles' vpmaddubsw
// added in int16 (at most 2 * 2 * 15 * 127 = 7620) before one vpmaddwd; with a group of one block, the scales of
// 4 vectors come in one load (8 fp16 -> fp32 by F16C) and move onto their lanes by vpermps, where a scalar load and
// conversion per block left the path compute-bound; short rows go two at a time (kCols), sharing the x operands.
#if RABIT_ISA >= 1
#if RABIT_BITS == 8
template <typename scale_t, int kRows, bool kPerRow>
void gemv_int8x_avx2_rows(const Activations& a, const uint8_t* row, const scale_t* row_scale, float* total_out,
                          int64_t in_features, int64_t group_size) {
    const int64_t full_blocks = in_features / kBlock, blocks = 2 * a.chunks, padded = blocks * kBlock;
    const int8_t* q = a.q.data();
    const int8_t* magnitude = a.operand.data();  // int8 weights: a step is one 64-column chunk, so |q| is laid out as q
    const float* d = a.d.data();
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 even[kRows], odd[kRows];
    for (int m = 0; m < kRows; ++m) even[m] = odd[m] = _mm256_setzero_ps();
    const auto accumulate = [&](int64_t b, __m256* sums) __attribute__((always_inline)) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
        const float s = kPerRow ? 1.0f : static_cast<float>(row_scale[b * kBlock / group_size]);
        for (int m = 0; m < kRows; ++m) {
            const int64_t at = m * padded + b * kBlock;
            const __m256i dot = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(magnitude + at)),
                                     _mm256_sign_epi8(w, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + at)))),
                ones);
            const __m256 step = kPerRow ? _mm256_broadcast_ss(d + m * blocks + b)
                                        : _mm256_set1_ps(d[m * blocks + b] * s);
            sums[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), step, sums[m]);
        }
    };
    int64_t b = 0;
    for (; b + 2 <= full_blocks; b += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(row + b * kBlock + kPrefetchBytes), _MM_HINT_T0);
        accumulate(b, even);
        accumulate(b + 1, odd);
    }
    if (b < full_blocks) accumulate(b, even);
    const float row_factor = kPerRow ? static_cast<float>(row_scale[0]) : 1.0f;
    for (int m = 0; m < kRows; ++m) {
        float total = sum8(_mm256_add_ps(even[m], odd[m])) * row_factor;
        // the last, partial block
        if (full_blocks * kBlock < in_features) {
            int32_t dot = 0;
            for (int64_t c = full_blocks * kBlock; c < in_features; ++c) dot += weight_at(row, c) * q[m * padded + c];
            total += static_cast<float>(dot) *
                     (d[m * blocks + full_blocks] * static_cast<float>(row_scale[full_blocks * kBlock / group_size]));
        }
        total_out[m] = total;
    }
}

template <typename scale_t, bool kPerRow>
void gemv_int8x_avx2_rows(const Activations& a, const uint8_t* row, const scale_t* row_scale, float* total_out,
                          int64_t rows, int64_t in_features, int64_t group_size) {
    with_row_count(rows, [&](auto rows_constant) {
        gemv_int8x_avx2_rows<scale_t, decltype(rows_constant)::value, kPerRow>(a, row, row_scale, total_out,
                                                                               in_features, group_size);
    });
}
#endif

#if RABIT_BITS == 4
// 8 consecutive scales as floats (F16C for fp16; bf16 is the high half of an fp32)
inline __m256 load_scales8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load_scales8(const at::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load_scales8(const at::BFloat16* p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// kCols consecutive weight rows (n, n + 1) against kRows rows of x; total_out[c * kMaxRows + m]
template <typename scale_t, int kRows, int kCols>
void gemv_int4x_avx2_rows(const Activations& a, const uint8_t* row, const scale_t* row_scale, float* total_out,
                          int64_t in_features, int64_t group_size, int64_t groups) {
    const int64_t bytes_per_row = row_bytes(in_features), pairs = (bytes_per_row + 31) / 32, last_group = groups - 1;
    const __m256i nibble = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const int8_t* low_operand = a.operand.data();
    const int8_t* high_operand = a.high.data();
    const int32_t* offset = a.offset.data();
    const float* step = a.step.data();
    const int64_t operand_stride = a.steps * 64;
    __m256 sums[kCols][kRows];
    for (int c = 0; c < kCols; ++c)
        for (int m = 0; m < kRows; ++m) sums[c][m] = _mm256_setzero_ps();
    // pair p: 32 packed bytes, blocks 2p (lanes 0-3) and 2p + 1 (lanes 4-7), each lane's scale in s[c]
    const auto accumulate = [&](int64_t p, const __m256* s) __attribute__((always_inline)) {
        __m256i low[kCols], high[kCols];
        for (int c = 0; c < kCols; ++c) {
            const uint8_t* bytes = row + c * bytes_per_row + 32 * p;
            const __m256i w = bytes_per_row - 32 * p >= 32
                ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes))
                : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
            low[c] = _mm256_and_si256(w, nibble);
            high[c] = _mm256_and_si256(_mm256_srli_epi16(w, 4), nibble);
        }
        for (int m = 0; m < kRows; ++m) {
            const int64_t at = m * operand_stride + 32 * p;  // bytes of the operands; lanes at / 4
            const __m256i low_q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low_operand + at));
            const __m256i high_q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high_operand + at));
            const __m256i lane_offset = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(offset + at / 4));
            const __m256 lane_step = _mm256_loadu_ps(step + at / 4);
            for (int c = 0; c < kCols; ++c) {
                const __m256i pair_sums = _mm256_add_epi16(_mm256_maddubs_epi16(low[c], low_q),
                                                           _mm256_maddubs_epi16(high[c], high_q));
                const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(pair_sums, ones), lane_offset);
                sums[c][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(lane_step, s[c]), sums[c][m]);
            }
        }
    };
    int64_t p = 0;
    if (group_size == kBlock) {  // 4 pairs a step: their 8 scales in one load, each pair's 2 moved onto its lanes
        const __m256i lanes[4] = {_mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0), _mm256_set_epi32(3, 3, 3, 3, 2, 2, 2, 2),
                                  _mm256_set_epi32(5, 5, 5, 5, 4, 4, 4, 4), _mm256_set_epi32(7, 7, 7, 7, 6, 6, 6, 6)};
        for (; 2 * p + 8 <= groups; p += 4) {
            __m256 scales[kCols];
            for (int c = 0; c < kCols; ++c) {
                const char* ahead = reinterpret_cast<const char*>(row + c * bytes_per_row + 32 * p + kPrefetchBytes);
                _mm_prefetch(ahead, _MM_HINT_T0);
                _mm_prefetch(ahead + 64, _MM_HINT_T0);
                scales[c] = load_scales8(row_scale + c * groups + 2 * p);
            }
            for (int j = 0; j < 4; ++j) {
                __m256 s[kCols];
                for (int c = 0; c < kCols; ++c) s[c] = _mm256_permutevar8x32_ps(scales[c], lanes[j]);
                accumulate(p + j, s);
            }
        }
    }
    for (; p < pairs; ++p) {
        __m256 s[kCols];
        for (int c = 0; c < kCols; ++c) {
            const scale_t* column_scale = row_scale + c * groups;
            s[c] = _mm256_set1_ps(1.0f);
            if (groups > 1) {  // the two blocks' groups
                const int64_t first = 2 * p * kBlock / group_size, second = (2 * p + 1) * kBlock / group_size;
                s[c] = _mm256_set_m128(_mm_set1_ps(static_cast<float>(column_scale[std::min(second, last_group)])),
                                       _mm_set1_ps(static_cast<float>(column_scale[std::min(first, last_group)])));
            }
        }
        accumulate(p, s);
    }
    for (int c = 0; c < kCols; ++c) {
        const float row_factor = groups == 1 ? static_cast<float>(row_scale[c * groups]) : 1.0f;
        for (int m = 0; m < kRows; ++m) total_out[c * kMaxRows + m] = sum8(sums[c][m]) * row_factor;
    }
}
#endif

// Output rows n .. n + columns - 1 (columns is 1, or 2 for the int4 path's short rows: see kernel()).
template <typename scale_t>
void gemv_int8x_avx2(const Activations& a, const uint8_t* qweight, const scale_t* scale, float* total_out,
                     int64_t rows, int64_t n, int64_t columns, int64_t in_features, int64_t group_size,
                     int64_t groups) {
    const uint8_t* row = qweight + n * row_bytes(in_features);
    const scale_t* row_scale = scale + n * groups;
#if RABIT_BITS == 8
    if (groups == 1)
        gemv_int8x_avx2_rows<scale_t, true>(a, row, row_scale, total_out, rows, in_features, group_size);
    else
        gemv_int8x_avx2_rows<scale_t, false>(a, row, row_scale, total_out, rows, in_features, group_size);
#else
    with_row_count(rows, [&](auto rows_constant) {
        if (columns == 2)
            gemv_int4x_avx2_rows<scale_t, decltype(rows_constant)::value, 2>(a, row, row_scale, total_out,
                                                                             in_features, group_size, groups);
        else
            gemv_int4x_avx2_rows<scale_t, decltype(rows_constant)::value, 1>(a, row, row_scale, total_out,
                                                                             in_features, group_size, groups);
    });
#endif
}
#endif

template <typename scale_t>
void gemv_int8x_portable(const Activations& a, const uint8_t* qweight, const scale_t* scale, float* total_out,
                         int64_t rows, int64_t n, int64_t in_features, int64_t group_size, int64_t groups) {
    const uint8_t* row = qweight + n * row_bytes(in_features);
    const scale_t* row_scale = scale + n * groups;
    const int64_t blocks = 2 * a.chunks, padded = blocks * kBlock;
    for (int64_t m = 0; m < rows; ++m) {
        float total = 0.0f;
        for (int64_t b = 0; b * kBlock < in_features; ++b) {
            int32_t dot = 0;
            for (int64_t c = b * kBlock; c < std::min((b + 1) * kBlock, in_features); ++c)
                dot += weight_at(row, c) * a.q[m * padded + c];
            total += static_cast<float>(dot) *
                     (a.d[m * blocks + b] * static_cast<float>(row_scale[b * kBlock / group_size]));
        }
        total_out[m] = total;
    }
}

#if RABIT_ISA == 2
bool cpu_has_vnni() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#endif
}  // namespace

extern "C" void kernel(const float* x, const uint8_t* qweight, const SCALE_T* scale, const float* bias, float* out,
                       int64_t rows, int64_t out_features, int64_t in_features, int64_t group_size, int64_t groups,
                       int64_t has_bias, int64_t threads, int64_t int8_activations) {
    Activations activations;
    bool vnni = false;
    if (int8_activations) {
        quantize_activations(x, rows, in_features, activations);
#if RABIT_ISA == 2
        vnni = cpu_has_vnni();
#endif
#if RABIT_ISA >= 1
        prepare_steps(rows, in_features, activations);
#endif
    }
    // The VNNI paths and the AVX2 int4 path's short rows (fewer than 512 packed bytes) take two weight rows at a
    // time: their reductions and scale tails interleave, where one at a time they dominate a short row
    // (benchmarks/RESULTS.md); every other path, one.
    const int64_t tile =
        int8_activations && (vnni || (RABIT_ISA >= 1 && RABIT_BITS == 4 && row_bytes(in_features) < 512)) ? 2 : 1;
    const int64_t tiles = (out_features + tile - 1) / tile;
    // tiles go to the threads in units of kUnitTiles, shared out by stealing at the tail (work_sharing.h)
    const int64_t units = (tiles + kUnitTiles - 1) / kUnitTiles;
    const auto compute_tile = [&](int64_t t) {
        const int64_t n = tile * t, columns = std::min(tile, out_features - n);
        float total[2 * kMaxRows];
        if (!int8_activations) {
            gemv_fp32<SCALE_T>(x, qweight, scale, total, rows, n, in_features, group_size, groups);
        } else {
#if RABIT_ISA == 2
            if (vnni)
                gemv_int8x_vnni<SCALE_T>(activations, qweight, scale, total, rows, n, columns, out_features,
                                         in_features, group_size, groups);
            else
                gemv_int8x_avx2<SCALE_T>(activations, qweight, scale, total, rows, n, columns, in_features, group_size,
                                         groups);
#elif RABIT_ISA == 1
            gemv_int8x_avx2<SCALE_T>(activations, qweight, scale, total, rows, n, columns, in_features, group_size,
                                     groups);
#else
            gemv_int8x_portable<SCALE_T>(activations, qweight, scale, total, rows, n, in_features, group_size,
                                         groups);
#endif
        }
        for (int64_t c = 0; c < columns; ++c)
            for (int64_t m = 0; m < rows; ++m)
                out[m * out_features + n + c] = total[c * kMaxRows + m] + (has_bias ? bias[n + c] : 0.0f);
    };
    UnitQueue& queue = t_unit_queue;
    queue.reset(units, static_cast<int>(threads));
    #pragma omp parallel num_threads(threads)
    {
        const int me = omp_get_thread_num();
        for (int64_t unit = queue.next(me); unit >= 0; unit = queue.next(me))
            for (int64_t t = unit * kUnitTiles; t < std::min(tiles, (unit + 1) * kUnitTiles); ++t) compute_tile(t);
    }
}
