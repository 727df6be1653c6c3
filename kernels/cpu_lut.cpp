// rabit::lut_gemv: the lookup-table CPU kernel of the packed residual-binary linear (few rows: decode).
// The math, the layouts and the error bounds are in cpu_lut.py's docstring; this file only implements them.
//
// Per row m of x, sibling s and path i, every group q of 4 columns gets a table of its 16 signed sums
//     E[m, s, i, q][e] = sum_{j<4} (bit j of e ? -1 : +1) * h[s, i, 4q + j] * x[m, 4q + j]
// and a 4-bit nibble of the sign planes (the signs of 4 columns of one output row) selects one entry:
//     y[m, n] = b[n] + sum_i g[i, n] * sum_q E[m, s(n), i, q][nibble_i(n, q)]
// Tables are fp32 (exact mode) or int8 with one scale per 32 columns (E ~= scale_w * T8), the scale itself an integer
// number of steps of one unit per table set (scale_w ~= q_w * unit), so that the lookups add q_w * T8 in int32 and
// convert once per output: y[m, n] ~= b[n] + sum_i g[i, n] * unit * sum_w q_w * sum_q T8. Output rows are processed
// in tiles of 16; the signs come tiled, 64 bytes per tile-word (word w of the tile's 16 rows), in one of two orders:
// row words (int32 [k, tiles, W, 16]: row r's word at r) or byte planes (uint8 [k, tiles, W, 64]: byte position p of
// the 16 rows at plane kPlaneOf[p], what the AVX2 lookups read). Every path reads both (converting in registers).
// One ISA path is chosen at run time (AVX-512 with VBMI and VNNI, AVX2 with FMA, or portable C++).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "outputs.h"
#include "work_sharing.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define RABIT_X86 1
#define RABIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vnni,avx2,fma")))
#define RABIT_AVX2 __attribute__((target("avx2,fma")))
#else
#define RABIT_X86 0
#endif

namespace {

constexpr int64_t kTileRows = 16;       // output rows per tile
constexpr int64_t kWordColumns = 32;    // columns per packed word
constexpr int64_t kGroupsPerWord = 8;   // 4-column groups per word
constexpr int64_t kEntries = 16;        // table entries per group
constexpr int64_t kInt8WordBytes = kGroupsPerWord * kEntries;
// Largest |sum| of one word's 8 int8 lookups for one row: the int32 sum over W words of q_w times it stays below
// 2^31 when every q_w <= (2^31 - 1) / (kWordLookupLimit W) (word_step_limit).
constexpr int64_t kWordLookupLimit = kGroupsPerWord * 127;
// Byte planes: plane of byte position p (0..3) of the rows' words. Planes 0, 1 = positions 0, 2 (the first 32 bytes)
// and planes 2, 3 = positions 1, 3, so that each 32-byte half holds the groups that one AVX2 table vector serves.
constexpr int64_t kPlaneOf[4] = {0, 2, 1, 3};
// Fewest tile-words (16 rows x 32 columns of one path, ~10 vector ops) worth a thread of their own: a parallel
// region costs a few microseconds, about what 256 tile-words take on one core.
constexpr int64_t kMinWorkPerThread = 256;
// Tiles of one segment whose lookups share each table load (int8 tables) when a call's tables (k paths x K / 32
// words x 128 bytes) exceed kL1TableBytes: they then do not stay in L1 from one tile to the next, and a unit reads
// them once for all its tiles (8 on AVX-512; 4 on AVX2, whose 16 registers hold fewer tiles' totals). Shorter rows
// keep one tile per unit, which streams their signs faster (benchmarks/RESULTS.md).
constexpr int64_t kUnitTiles = 8;
constexpr int64_t kUnitTilesAvx2 = 4;
constexpr int64_t kL1TableBytes = 24 * 1024;
// The AVX2 lookups prefetch the signs this far ahead (32 tile-words; past a tile's last word, the next tile of the
// same path): on a Zen 3 core the hardware prefetcher alone streamed Qwen2.5-Coder-1.5B's signs from DRAM 1.2-1.3x
// slower (benchmarks/RESULTS.md).
constexpr int64_t kPrefetchBytes = 2048;

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

int best_isa() {
#if RABIT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

std::atomic<int> g_isa{-1};

int active_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = best_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

// Offset of group j (0..7) of a word inside its 128-byte int8 table block, as each path's lookups want it.
// AVX-512 and portable: the even groups' tables fill the first 64 bytes and the odd groups' the last 64, so that one
// 64-byte vector holds the four tables that the low (or high) nibbles of a word's 4 bytes index. AVX2: groups j and
// j + 4 side by side (32 bytes at 32 (j & 3)), the two 128-bit lanes of one vpshufb table (word_int8_avx2).
inline int64_t int8_table_offset(int64_t j, int isa) {
  return isa == kAvx2 ? (j & 3) * 32 + (j >> 2) * kEntries : (j & 1) * 64 + (j >> 1) * kEntries;
}

struct Tile {
  int64_t segment;
  int64_t first_row;
  int64_t rows;
};

// Consecutive tiles of one segment computed together (at most kUnitTiles).
struct Unit {
  int64_t first_tile;
  int64_t tiles;
};

// One call's operands, all contiguous. Tables are per job = (m, s, i).
struct Problem {
  int64_t rows, in_features, words, segments, paths, tiles, out_features;
  bool int8_tables;
  bool byte_planes;         // the signs' order within a tile-word (row words or byte planes)
  int isa;                  // the ISA path (Isa) of the tables' layout and the lookups
  const int32_t* signs;     // [k, tiles, W, 16 words or 64 bytes]
  const float* row_scale;   // [k, tiles, 16]
  const float* bias;        // [tiles, 16] or nullptr
  const Tile* tile_map;     // [tiles]
  const float* col_scale;   // [S, k, K]
  const float* x;           // [M, 32 W], zero past K
  float* products;          // [jobs, 32 W]: h * x
  float* exact_tables;      // [jobs, 8 W, 16]
  int8_t* int8_tables_data; // [jobs, W, 128]
  float* word_scales;       // [jobs, W]: scale_w
  int32_t* word_steps;      // [jobs, W]: q_w, scale_w in units
  float* step_units;        // [jobs]: the unit
  int64_t job(int64_t m, int64_t s, int64_t i) const { return (m * segments + s) * paths + i; }
};

// The calling thread's scratch, kept between calls (no allocation once it is large enough).
struct Scratch {
  std::vector<float> x, products, exact_tables, word_scales, step_units;
  std::vector<int8_t> int8_tables;
  std::vector<int32_t> word_steps;
  std::vector<Tile> tiles;
  std::vector<Unit> units;
};
thread_local Scratch t_scratch;

thread_local UnitQueue t_unit_queue;

template <typename T>
void grow(std::vector<T>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
}

template <typename scalar_t>
void to_float(const scalar_t* in, int64_t count, float* out) {
  for (int64_t c = 0; c < count; ++c) out[c] = static_cast<float>(in[c]);
}

void to_float(const at::Tensor& tensor, int64_t offset, int64_t count, float* out) {
  switch (tensor.scalar_type()) {
    case at::kFloat: return to_float(tensor.const_data_ptr<float>() + offset, count, out);
    case at::kHalf: return to_float(tensor.const_data_ptr<at::Half>() + offset, count, out);
    case at::kBFloat16: return to_float(tensor.const_data_ptr<at::BFloat16>() + offset, count, out);
    default: TORCH_CHECK(false, "rabit::lut_gemv: unsupported dtype ", tensor.scalar_type());
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tables. The entries are summed in the same order on every path: ((+-v0 +- v1) +- v2) +- v3.

void group_entries(const float* v, float* entries) {
  for (int64_t e = 0; e < kEntries; ++e) {
    float sum = (e & 1) ? -v[0] : v[0];
    for (int64_t j = 1; j < 4; ++j) sum += ((e >> j) & 1) ? -v[j] : v[j];
    entries[e] = sum;
  }
}

using FixedCountFn = void (*)(const Problem& p, int64_t t, int64_t m, float* y);

// kernels[c - 1] = pick<c>(), the kernel for c tiles at a time (c = 1 .. kMax), to choose by count at run time.
template <int kMax, typename Pick>
constexpr std::array<FixedCountFn, kMax> by_tile_count(Pick pick) {
  return [&]<std::size_t... kCounts>(std::index_sequence<kCounts...>) {
    return std::array<FixedCountFn, kMax>{pick.template operator()<static_cast<int>(kCounts) + 1>()...};
  }(std::make_index_sequence<kMax>());
}

#if RABIT_X86
// AVX-512: the 32 products h * x of a word in two vectors, its 8 groups' entries in 8 vectors (the same sums as
// group_entries), their largest |entry| by one reduction, int8 by vcvtps2dq + vpmovdb.
RABIT_AVX512 void build_tables_avx512(const Problem& p, int64_t job, const float* h, const float* x) {
  constexpr __mmask16 kNegative[4] = {0xAAAA, 0xCCCC, 0xF0F0, 0xFF00};  // lanes e with bit j of e set
  for (int64_t w = 0; w < p.words; ++w) {
    alignas(64) float v[kWordColumns];
    for (int64_t half = 0; half < 2; ++half) {
      const int64_t column = w * kWordColumns + 16 * half, remaining = p.in_features - column;
      // a masked load only past K (h has no padding): masked loads are slow on Zen 5 (weight_only.cpp)
      const __m512 scale = remaining >= 16 ? _mm512_loadu_ps(h + column)
                                           : _mm512_maskz_loadu_ps(remaining > 0 ? (1u << remaining) - 1 : 0,
                                                                   h + column);
      _mm512_store_ps(v + 16 * half, _mm512_mul_ps(scale, _mm512_loadu_ps(x + column)));
    }
    __m512 entries[kGroupsPerWord];
    __m512 largest = _mm512_setzero_ps();
    for (int64_t j = 0; j < kGroupsPerWord; ++j) {
      const float* g = v + 4 * j;
      __m512 sum = _mm512_mask_sub_ps(_mm512_set1_ps(g[0]), kNegative[0], _mm512_setzero_ps(), _mm512_set1_ps(g[0]));
      for (int e = 1; e < 4; ++e)
        sum = _mm512_mask_sub_ps(_mm512_add_ps(sum, _mm512_set1_ps(g[e])), kNegative[e], sum, _mm512_set1_ps(g[e]));
      entries[j] = sum;
      largest = _mm512_max_ps(largest, _mm512_abs_ps(sum));
    }
    if (!p.int8_tables) {
      float* tables = p.exact_tables + (job * p.words + w) * kGroupsPerWord * kEntries;
      for (int64_t j = 0; j < kGroupsPerWord; ++j) _mm512_storeu_ps(tables + j * kEntries, entries[j]);
      continue;
    }
    const float top = _mm512_reduce_max_ps(largest);
    p.word_scales[job * p.words + w] = top / 127.0f;
    const __m512 inverse = _mm512_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    int8_t* out = p.int8_tables_data + (job * p.words + w) * kInt8WordBytes;
    for (int64_t j = 0; j < kGroupsPerWord; ++j)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + int8_table_offset(j, kAvx512)),
                       _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(entries[j], inverse))));
  }
}

// AVX2: the same sums as group_entries, entries 0-7 and 8-15 of a group in two vectors that share the first three
// terms (bit 3 is the sign of the fourth); a sign is flipped by XOR with -0.0 (a + (-b) == a - b exactly). int8:
// vcvtps2dq, two packs and one vpermd put the tables of groups j and j + 4 side by side (int8_table_offset).
RABIT_AVX2 void build_tables_avx2(const Problem& p, int64_t job, const float* h, const float* x) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 negative[3] = {_mm256_setr_ps(0.0f, -0.0f, 0.0f, -0.0f, 0.0f, -0.0f, 0.0f, -0.0f),
                              _mm256_setr_ps(0.0f, 0.0f, -0.0f, -0.0f, 0.0f, 0.0f, -0.0f, -0.0f),
                              _mm256_setr_ps(0.0f, 0.0f, 0.0f, 0.0f, -0.0f, -0.0f, -0.0f, -0.0f)};
  const __m256i interleave = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t w = 0; w < p.words; ++w) {
    alignas(32) float v[kWordColumns];
    for (int64_t quarter = 0; quarter < 4; ++quarter) {
      const int64_t column = w * kWordColumns + 8 * quarter, remaining = p.in_features - column;
      const __m256i valid = _mm256_cmpgt_epi32(
          _mm256_set1_epi32(static_cast<int32_t>(std::clamp<int64_t>(remaining, 0, 8))), lane);
      const __m256 scale = remaining >= 8 ? _mm256_loadu_ps(h + column) : _mm256_maskload_ps(h + column, valid);
      _mm256_store_ps(v + 8 * quarter, _mm256_mul_ps(scale, _mm256_loadu_ps(x + column)));
    }
    __m256 low[kGroupsPerWord], high[kGroupsPerWord];
    __m256 largest = _mm256_setzero_ps();
    for (int64_t j = 0; j < kGroupsPerWord; ++j) {
      const float* g = v + 4 * j;
      __m256 partial = _mm256_xor_ps(_mm256_broadcast_ss(g), negative[0]);
      partial = _mm256_add_ps(partial, _mm256_xor_ps(_mm256_broadcast_ss(g + 1), negative[1]));
      partial = _mm256_add_ps(partial, _mm256_xor_ps(_mm256_broadcast_ss(g + 2), negative[2]));
      const __m256 last = _mm256_broadcast_ss(g + 3);
      low[j] = _mm256_add_ps(partial, last);
      high[j] = _mm256_sub_ps(partial, last);
      largest = _mm256_max_ps(largest, _mm256_max_ps(_mm256_andnot_ps(sign, low[j]), _mm256_andnot_ps(sign, high[j])));
    }
    if (!p.int8_tables) {
      float* tables = p.exact_tables + (job * p.words + w) * kGroupsPerWord * kEntries;
      for (int64_t j = 0; j < kGroupsPerWord; ++j) {
        _mm256_storeu_ps(tables + j * kEntries, low[j]);
        _mm256_storeu_ps(tables + j * kEntries + 8, high[j]);
      }
      continue;
    }
    __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
    top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
    const float top = _mm_cvtss_f32(_mm_max_ss(top4, _mm_movehdup_ps(top4)));
    p.word_scales[job * p.words + w] = top / 127.0f;
    const __m256 inverse = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f);
    const auto entries16 = [&](int64_t j) {  // int16 [low 0-3, high 0-3 | low 4-7, high 4-7]
      return _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(low[j], inverse)),
                                _mm256_cvtps_epi32(_mm256_mul_ps(high[j], inverse)));
    };
    int8_t* out = p.int8_tables_data + (job * p.words + w) * kInt8WordBytes;
    for (int64_t j = 0; j < 4; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + int8_table_offset(j, kAvx2)),
                          _mm256_permutevar8x32_epi32(_mm256_packs_epi16(entries16(j), entries16(j + 4)), interleave));
  }
}
#endif

// The largest q_w: as large as int16 holds (vpmaddwd, vpdpwssd take it as int16) and small enough that a row's int32
// sum over W words of q_w * (a word's lookups, |.| <= kWordLookupLimit) cannot overflow.
int64_t word_step_limit(int64_t words) {
  return std::min<int64_t>(32767, 2147483647LL / (kWordLookupLimit * std::max<int64_t>(words, 1)));
}

// The word scales of job as integer steps: unit = max_w scale_w / limit, q_w = round(scale_w / unit) <= limit. A
// scale is then off by at most unit / 2, so a row's sum by at most unit / 2 * sum_w |its word's lookups|.
void quantize_word_scales(const Problem& p, int64_t job) {
  const float* scales = p.word_scales + job * p.words;
  float top = 0.0f;
  for (int64_t w = 0; w < p.words; ++w) top = std::max(top, scales[w]);
  const float limit = static_cast<float>(word_step_limit(p.words));
  p.step_units[job] = top / limit;
  const float inverse = top > 0.0f ? limit / top : 0.0f;
  for (int64_t w = 0; w < p.words; ++w)
    p.word_steps[job * p.words + w] = static_cast<int32_t>(std::nearbyint(scales[w] * inverse));
}

// Tables of job (m, s, i): v = h[s, i] * x[m], then 16 entries per group (fp32), or per word: scale = the largest
// |entry| / 127 (= max over its groups of sum |v|) and entries rounded to int8 multiples of it.
void build_word_tables(const Problem& p, int64_t job) {
  const int64_t i = job % p.paths, s = (job / p.paths) % p.segments, m = job / (p.paths * p.segments);
  const int64_t padded = p.words * kWordColumns;
  const float* h = p.col_scale + (s * p.paths + i) * p.in_features;
  const float* x = p.x + m * padded;
#if RABIT_X86
  if (p.isa == kAvx512) return build_tables_avx512(p, job, h, x);
  if (p.isa == kAvx2) return build_tables_avx2(p, job, h, x);
#endif
  float* v = p.products + job * padded;
  for (int64_t c = 0; c < p.in_features; ++c) v[c] = h[c] * x[c];
  std::fill(v + p.in_features, v + padded, 0.0f);
  if (!p.int8_tables) {
    float* tables = p.exact_tables + job * p.words * kGroupsPerWord * kEntries;
    for (int64_t q = 0; q < p.words * kGroupsPerWord; ++q) group_entries(v + 4 * q, tables + q * kEntries);
    return;
  }
  float entries[kGroupsPerWord * kEntries];
  for (int64_t w = 0; w < p.words; ++w) {
    const float* word_values = v + w * kWordColumns;
    float largest = 0.0f;
    for (int64_t j = 0; j < kGroupsPerWord; ++j) {
      const float* g = word_values + 4 * j;
      largest = std::max(largest, ((std::fabs(g[0]) + std::fabs(g[1])) + std::fabs(g[2])) + std::fabs(g[3]));
      group_entries(g, entries + j * kEntries);
    }
    p.word_scales[job * p.words + w] = largest / 127.0f;
    const float inverse = largest > 0.0f ? 127.0f / largest : 0.0f;
    int8_t* out = p.int8_tables_data + (job * p.words + w) * kInt8WordBytes;
    for (int64_t j = 0; j < kGroupsPerWord; ++j)
      for (int64_t e = 0; e < kEntries; ++e)
        out[int8_table_offset(j, p.isa) + e] =
            static_cast<int8_t>(std::nearbyint(entries[j * kEntries + e] * inverse));
  }
}

// The tables of job, and with int8 tables the word scales as steps.
void build_tables(const Problem& p, int64_t job) {
  build_word_tables(p, job);
  if (p.int8_tables) quantize_word_scales(p, job);
}

// ---------------------------------------------------------------------------------------------------------------
// Lookups: dot[r] = sum over the row's groups of the selected entries, for the 16 rows of one tile and one path.
// int8 tables: dot[r] = unit * float(sum_w q_w * sum_{q in w} T8), the integer sum exact (so the same on every path).

// Row r's word of a tile-word in either order.
inline uint32_t row_word(const int32_t* tile_word, int64_t r, bool byte_planes) {
  if (!byte_planes) return static_cast<uint32_t>(tile_word[r]);
  const auto* bytes = reinterpret_cast<const uint8_t*>(tile_word);
  uint32_t word = 0;
  for (int64_t position = 0; position < 4; ++position)
    word |= static_cast<uint32_t>(bytes[kPlaneOf[position] * kTileRows + r]) << (8 * position);
  return word;
}

void dot_portable(const Problem& p, const int32_t* words, int64_t job, float* dot) {
  if (p.int8_tables) {
    int32_t totals[kTileRows] = {};
    for (int64_t w = 0; w < p.words; ++w) {
      const int8_t* tables = p.int8_tables_data + (job * p.words + w) * kInt8WordBytes;
      const int32_t step = p.word_steps[job * p.words + w];
      for (int64_t r = 0; r < kTileRows; ++r) {
        const uint32_t word = row_word(words + w * kTileRows, r, p.byte_planes);
        int32_t sum = 0;
        for (int64_t j = 0; j < kGroupsPerWord; ++j)
          sum += tables[int8_table_offset(j, p.isa) + ((word >> (4 * j)) & 15)];
        totals[r] += step * sum;
      }
    }
    for (int64_t r = 0; r < kTileRows; ++r) dot[r] = static_cast<float>(totals[r]) * p.step_units[job];
    return;
  }
  for (int64_t r = 0; r < kTileRows; ++r) dot[r] = 0.0f;
  for (int64_t w = 0; w < p.words; ++w) {
    const float* tables = p.exact_tables + (job * p.words + w) * kGroupsPerWord * kEntries;
    for (int64_t r = 0; r < kTileRows; ++r) {
      const uint32_t word = row_word(words + w * kTileRows, r, p.byte_planes);
      for (int64_t j = 0; j < kGroupsPerWord; ++j) dot[r] += tables[j * kEntries + ((word >> (4 * j)) & 15)];
    }
  }
}

#if RABIT_X86
// vpermb indices that gather a byte-plane tile-word into row words: byte 4 r + p <- plane kPlaneOf[p], row r.
struct RowOrder {
  alignas(64) uint8_t index[64];
};
constexpr RowOrder row_order() {
  RowOrder order{};
  for (int64_t r = 0; r < kTileRows; ++r)
    for (int64_t position = 0; position < 4; ++position)
      order.index[4 * r + position] = static_cast<uint8_t>(kPlaneOf[position] * kTileRows + r);
  return order;
}
constexpr RowOrder kRowOrder = row_order();

// One tile-word as row words (one row per 32-bit lane); byte planes are reordered by one vpermb.
RABIT_AVX512 inline __attribute__((always_inline)) __m512i row_words_avx512(const int32_t* words, bool byte_planes) {
  const __m512i loaded = _mm512_loadu_si512(words);
  if (!byte_planes) return loaded;
  return _mm512_permutexvar_epi8(_mm512_load_si512(kRowOrder.index), loaded);
}

// AVX-512: a vector holds one word of each of the tile's 16 rows (one row per 32-bit lane). int8: the low nibbles of
// its 4 bytes are groups 0, 2, 4, 6 of the word; adding 16 * byte position makes them indices into one 64-byte
// vector of those 4 tables (vpermb: 64 lookups), and vpdpbusd adds each lane's 4 bytes into its int32 sum. The
// high nibbles do the same with the odd groups' tables, and vpdpwssd adds q_w times the sum (|sum| <= 1016: its low
// 16 bits are the sum, the high ones meet a zero) to the row's total. fp32: vpermps looks up 16 rows of one group at
// a time.
RABIT_AVX512 inline __attribute__((always_inline)) __m512i word_int8_avx512(const int32_t* words, bool byte_planes,
                                                                           const int8_t* tables, int32_t step,
                                                                           __m512i totals) {
  const __m512i nibble = _mm512_set1_epi8(0x0F), position = _mm512_set1_epi32(0x30201000);
  const __m512i ones = _mm512_set1_epi8(1);
  const __m512i word = row_words_avx512(words, byte_planes);
  const __m512i low = _mm512_ternarylogic_epi32(word, nibble, position, 0xEA);  // (word & nibble) | position
  const __m512i high = _mm512_ternarylogic_epi32(_mm512_srli_epi32(word, 4), nibble, position, 0xEA);
  __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones,
                                    _mm512_permutexvar_epi8(low, _mm512_loadu_si512(tables)));
  sum = _mm512_dpbusd_epi32(sum, ones, _mm512_permutexvar_epi8(high, _mm512_loadu_si512(tables + 64)));
  return _mm512_dpwssd_epi32(totals, sum, _mm512_set1_epi32(step));
}

RABIT_AVX512 inline __attribute__((always_inline)) __m512 dot_avx512(const Problem& p, const int32_t* words,
                                                                    int64_t job) {
  if (p.int8_tables) {
    const int8_t* tables = p.int8_tables_data + job * p.words * kInt8WordBytes;
    const int32_t* steps = p.word_steps + job * p.words;
    __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();  // two chains: words alternate
    int64_t w = 0;
    for (; w + 2 <= p.words; w += 2) {
      even = word_int8_avx512(words + w * kTileRows, p.byte_planes, tables + w * kInt8WordBytes, steps[w], even);
      odd = word_int8_avx512(words + (w + 1) * kTileRows, p.byte_planes, tables + (w + 1) * kInt8WordBytes,
                             steps[w + 1], odd);
    }
    if (w < p.words)
      even = word_int8_avx512(words + w * kTileRows, p.byte_planes, tables + w * kInt8WordBytes, steps[w], even);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even, odd)), _mm512_set1_ps(p.step_units[job]));
  }
  const float* tables = p.exact_tables + job * p.words * kGroupsPerWord * kEntries;
  __m512 even = _mm512_setzero_ps(), odd = _mm512_setzero_ps();  // two chains: groups alternate
  for (int64_t w = 0; w < p.words; ++w) {
    const __m512i word = row_words_avx512(words + w * kTileRows, p.byte_planes);
    const float* word_tables = tables + w * kGroupsPerWord * kEntries;
    for (int j = 0; j < kGroupsPerWord; j += 2) {
      const __m512i first = _mm512_srli_epi32(word, 4 * j), second = _mm512_srli_epi32(word, 4 * j + 4);
      even = _mm512_add_ps(even, _mm512_permutexvar_ps(first, _mm512_loadu_ps(word_tables + j * kEntries)));
      odd = _mm512_add_ps(odd, _mm512_permutexvar_ps(second, _mm512_loadu_ps(word_tables + (j + 1) * kEntries)));
    }
  }
  return _mm512_add_ps(even, odd);
}

// y[16] = b + sum_i g_i * dot_i for tile t and row m of x.
RABIT_AVX512 void tile_avx512(const Problem& p, int64_t t, int64_t m, float* y) {
  __m512 sum = p.bias ? _mm512_loadu_ps(p.bias + t * kTileRows) : _mm512_setzero_ps();
  for (int64_t i = 0; i < p.paths; ++i) {
    const __m512 dot = dot_avx512(p, p.signs + (i * p.tiles + t) * p.words * kTileRows,
                                  p.job(m, p.tile_map[t].segment, i));
    sum = _mm512_fmadd_ps(_mm512_loadu_ps(p.row_scale + (i * p.tiles + t) * kTileRows), dot, sum);
  }
  _mm512_storeu_ps(y, sum);
}

// int8 tables, a unit of kCount >= 2 tiles t, t + 1, .. of one segment (kUnitTiles): tile_avx512's sums, the
// tiles' lookups of one word after one another so that its tables are read from memory once for all of them.
template <int kCount>
RABIT_AVX512 void units_int8_avx512(const Problem& p, int64_t t, int64_t m, float* y) {
  const int64_t stride = p.words * kTileRows;  // int32 from one tile's signs to the next tile's
  __m512 sums[kCount];
  for (int u = 0; u < kCount; ++u)
    sums[u] = p.bias ? _mm512_loadu_ps(p.bias + (t + u) * kTileRows) : _mm512_setzero_ps();
  for (int64_t i = 0; i < p.paths; ++i) {
    const int32_t* words = p.signs + (i * p.tiles + t) * stride;
    const int64_t job = p.job(m, p.tile_map[t].segment, i);
    const int8_t* tables = p.int8_tables_data + job * p.words * kInt8WordBytes;
    const int32_t* steps = p.word_steps + job * p.words;
    __m512i even[kCount], odd[kCount];  // two chains per tile: words alternate
    for (int u = 0; u < kCount; ++u) even[u] = odd[u] = _mm512_setzero_si512();
    int64_t w = 0;
    for (; w + 2 <= p.words; w += 2)
      for (int u = 0; u < kCount; ++u) {
        even[u] = word_int8_avx512(words + u * stride + w * kTileRows, p.byte_planes, tables + w * kInt8WordBytes,
                                   steps[w], even[u]);
        odd[u] = word_int8_avx512(words + u * stride + (w + 1) * kTileRows, p.byte_planes,
                                  tables + (w + 1) * kInt8WordBytes, steps[w + 1], odd[u]);
      }
    if (w < p.words)
      for (int u = 0; u < kCount; ++u)
        even[u] = word_int8_avx512(words + u * stride + w * kTileRows, p.byte_planes, tables + w * kInt8WordBytes,
                                   steps[w], even[u]);
    const __m512 unit = _mm512_set1_ps(p.step_units[job]);
    for (int u = 0; u < kCount; ++u) {
      const __m512 dot = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even[u], odd[u])), unit);
      sums[u] = _mm512_fmadd_ps(_mm512_loadu_ps(p.row_scale + (i * p.tiles + t + u) * kTileRows), dot, sums[u]);
    }
  }
  for (int u = 0; u < kCount; ++u) _mm512_storeu_ps(y + u * kTileRows, sums[u]);
}

// tile_avx512 for one tile, units_int8_avx512 for more.
void tiles_avx512(const Problem& p, int64_t t, int64_t count, int64_t m, float* y) {
  static constexpr auto kByCount = by_tile_count<kUnitTiles>([]<int kCount>() {
    if constexpr (kCount == 1) return &tile_avx512;
    else return &units_int8_avx512<kCount>;
  });
  kByCount[count - 1](p, t, m, y);
}

// The byte planes A = [position 0 | position 2], B = [position 1 | position 3] of a tile-word: loaded as stored, or
// row words transposed in registers (vpshufb within lanes, vpermd across, vpunpck*qdq).
RABIT_AVX2 inline __attribute__((always_inline)) void byte_planes_avx2(const int32_t* words, bool byte_planes,
                                                                       __m256i& a, __m256i& b) {
  const __m256i low_half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  const __m256i high_half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + 8));
  if (byte_planes) {
    a = low_half;
    b = high_half;
    return;
  }
  const __m256i transpose = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                             0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i interleave = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // rows 0-7 as [a0 a1 a2 a3 | b0 b1 b2 b3] (a_p: byte p of rows 0-3) -> [a0 b0 a1 b1 | a2 b2 a3 b3]
  const __m256i first = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(low_half, transpose), interleave);
  const __m256i second = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(high_half, transpose), interleave);
  a = _mm256_unpacklo_epi64(first, second);
  b = _mm256_unpackhi_epi64(first, second);
}

// AVX2 int8: vpshufb looks up one 16-entry table per 128-bit lane, so a lane must hold one byte position of all 16
// rows: the byte planes A = [position 0 | position 2], B = [position 1 | position 3] (byte_planes_avx2). Their low
// and high nibbles are groups [0 | 4], [1 | 5] (A) and [2 | 6], [3 | 7] (B): 4 vpshufb do the word's 512 lookups,
// with the tables of groups j, j + 4 side by side (int8_table_offset). vpunpck + vpmaddubsw add two groups per row
// in int16 (lanes: groups 0-3 | groups 4-7, |.| <= 508), and vpmaddwd by (q_w, 0) and (0, q_w) adds q_w times the
// even rows' and the odd rows' sums to int32 totals [rows 0, 2, 4, 6 | the same rows], [1, 3, 5, 7 | ..], [8, 10,
// 12, 14 | ..], [9, 11, 13, 15 | ..] (the lanes are added once per tile, in totals_avx2).
RABIT_AVX2 inline __attribute__((always_inline)) void word_int8_avx2(const int32_t* words, bool byte_planes,
                                                                     const int8_t* tables, int32_t step,
                                                                     __m256i* totals) {
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi8(1);
  __m256i a, b;
  byte_planes_avx2(words, byte_planes, a, b);
  const auto lookup = [&](int64_t pair, __m256i index) {
    return _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tables + 32 * pair)),
                               _mm256_and_si256(index, nibble));
  };
  const __m256i g04 = lookup(0, a), g15 = lookup(1, _mm256_srli_epi16(a, 4));
  const __m256i g26 = lookup(2, b), g37 = lookup(3, _mm256_srli_epi16(b, 4));
  // int16 per row: [groups 0-3 | groups 4-7] of rows 0-7 (low) and of rows 8-15 (high)
  const __m256i low = _mm256_add_epi16(_mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(g04, g15)),
                                       _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(g26, g37)));
  const __m256i high = _mm256_add_epi16(_mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(g04, g15)),
                                        _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(g26, g37)));
  const __m256i even = _mm256_set1_epi32(step), odd = _mm256_slli_epi32(even, 16);
  totals[0] = _mm256_add_epi32(totals[0], _mm256_madd_epi16(low, even));
  totals[1] = _mm256_add_epi32(totals[1], _mm256_madd_epi16(low, odd));
  totals[2] = _mm256_add_epi32(totals[2], _mm256_madd_epi16(high, even));
  totals[3] = _mm256_add_epi32(totals[3], _mm256_madd_epi16(high, odd));
}

// The 16 rows' int32 totals in order, rows 0-7 and 8-15, from word_int8_avx2's four: the lanes added, even and odd
// rows interleaved.
RABIT_AVX2 inline __attribute__((always_inline)) void totals_avx2(const __m256i* totals, __m256i& rows_0_7,
                                                                  __m256i& rows_8_15) {
  // [rows 0, 2, 4, 6 | 8, 10, 12, 14] and [1, 3, 5, 7 | 9, 11, 13, 15]
  const __m256i even = _mm256_add_epi32(_mm256_permute2x128_si256(totals[0], totals[2], 0x20),
                                        _mm256_permute2x128_si256(totals[0], totals[2], 0x31));
  const __m256i odd = _mm256_add_epi32(_mm256_permute2x128_si256(totals[1], totals[3], 0x20),
                                       _mm256_permute2x128_si256(totals[1], totals[3], 0x31));
  const __m256i first = _mm256_unpacklo_epi32(even, odd), second = _mm256_unpackhi_epi32(even, odd);
  rows_0_7 = _mm256_permute2x128_si256(first, second, 0x20);
  rows_8_15 = _mm256_permute2x128_si256(first, second, 0x31);
}

// Rows 0-7 and 8-15 of a tile-word as row words (8 rows per vector). Byte planes A = [p0 | p2], B = [p1 | p3] of
// 16 rows: unpacking their bytes pairs positions (0, 1) in the low lane and (2, 3) in the high one, vpermq puts
// rows 0-3 (4-7) of both pairs in one lane, and vpshufb makes each row's 4 bytes one 32-bit word.
RABIT_AVX2 inline __attribute__((always_inline)) void row_words_avx2(const int32_t* words, bool byte_planes,
                                                                     __m256i* row_words) {
  if (!byte_planes) {
    row_words[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
    row_words[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + 8));
    return;
  }
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + 8));
  const __m256i gather = _mm256_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
                                          0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
  row_words[0] = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(_mm256_unpacklo_epi8(a, b), 0xD8), gather);
  row_words[1] = _mm256_shuffle_epi8(_mm256_permute4x64_epi64(_mm256_unpackhi_epi8(a, b), 0xD8), gather);
}

// AVX2 fp32 (8 rows per vector): two vpermps (entries 0-7 and 8-15) and a blend on the nibble's bit 3.
RABIT_AVX2 inline __attribute__((always_inline)) void dot_avx2(const Problem& p, const int32_t* words, int64_t job,
                                                               __m256& rows_0_7, __m256& rows_8_15) {
  if (p.int8_tables) {
    const int8_t* tables = p.int8_tables_data + job * p.words * kInt8WordBytes;
    const int32_t* steps = p.word_steps + job * p.words;
    __m256i totals[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                         _mm256_setzero_si256()};
    for (int64_t w = 0; w < p.words; ++w) {
      _mm_prefetch(reinterpret_cast<const char*>(words + w * kTileRows) + kPrefetchBytes, _MM_HINT_T0);
      word_int8_avx2(words + w * kTileRows, p.byte_planes, tables + w * kInt8WordBytes, steps[w], totals);
    }
    __m256i rows_low, rows_high;
    totals_avx2(totals, rows_low, rows_high);
    const __m256 unit = _mm256_set1_ps(p.step_units[job]);
    rows_0_7 = _mm256_mul_ps(_mm256_cvtepi32_ps(rows_low), unit);
    rows_8_15 = _mm256_mul_ps(_mm256_cvtepi32_ps(rows_high), unit);
    return;
  }
  const float* tables = p.exact_tables + job * p.words * kGroupsPerWord * kEntries;
  __m256 accumulators[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t w = 0; w < p.words; ++w) {
    _mm_prefetch(reinterpret_cast<const char*>(words + w * kTileRows) + kPrefetchBytes, _MM_HINT_T0);
    __m256i row_words[2];
    row_words_avx2(words + w * kTileRows, p.byte_planes, row_words);
    const float* word_tables = tables + w * kGroupsPerWord * kEntries;
    for (int64_t half = 0; half < 2; ++half) {
      const __m256i word = row_words[half];
      for (int j = 0; j < kGroupsPerWord; ++j) {
        const __m256i index = _mm256_srli_epi32(word, 4 * j);
        const __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(word_tables + j * kEntries), index);
        const __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(word_tables + j * kEntries + 8), index);
        const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(word, 28 - 4 * j));
        accumulators[half] = _mm256_add_ps(accumulators[half], _mm256_blendv_ps(low, high, bit3));
      }
    }
  }
  rows_0_7 = accumulators[0];
  rows_8_15 = accumulators[1];
}

// y[16] = b + sum_i g_i * dot_i for tile t and row m of x.
RABIT_AVX2 void tile_avx2(const Problem& p, int64_t t, int64_t m, float* y) {
  __m256 low = p.bias ? _mm256_loadu_ps(p.bias + t * kTileRows) : _mm256_setzero_ps();
  __m256 high = p.bias ? _mm256_loadu_ps(p.bias + t * kTileRows + 8) : _mm256_setzero_ps();
  for (int64_t i = 0; i < p.paths; ++i) {
    __m256 dot_low, dot_high;
    dot_avx2(p, p.signs + (i * p.tiles + t) * p.words * kTileRows, p.job(m, p.tile_map[t].segment, i), dot_low,
             dot_high);
    const float* g = p.row_scale + (i * p.tiles + t) * kTileRows;
    low = _mm256_fmadd_ps(_mm256_loadu_ps(g), dot_low, low);
    high = _mm256_fmadd_ps(_mm256_loadu_ps(g + 8), dot_high, high);
  }
  _mm256_storeu_ps(y, low);
  _mm256_storeu_ps(y + 8, high);
}

// int8 tables, a unit of kCount >= 2 tiles t, t + 1, .. of one segment (kUnitTiles): tile_avx2's sums, the tiles'
// lookups of one word after one another so that its tables are read from memory once for all of them.
template <int kCount>
RABIT_AVX2 void units_int8_avx2(const Problem& p, int64_t t, int64_t m, float* y) {
  const int64_t stride = p.words * kTileRows;  // int32 from one tile's signs to the next tile's
  __m256 sums[2 * kCount];  // rows 0-7 and 8-15 of each tile
  for (int half = 0; half < 2 * kCount; ++half)
    sums[half] = p.bias ? _mm256_loadu_ps(p.bias + t * kTileRows + 8 * half) : _mm256_setzero_ps();
  for (int64_t i = 0; i < p.paths; ++i) {
    const int32_t* words = p.signs + (i * p.tiles + t) * stride;
    const int64_t job = p.job(m, p.tile_map[t].segment, i);
    const int8_t* tables = p.int8_tables_data + job * p.words * kInt8WordBytes;
    const int32_t* steps = p.word_steps + job * p.words;
    __m256i totals[kCount][4];
    for (int u = 0; u < kCount; ++u)
      for (int j = 0; j < 4; ++j) totals[u][j] = _mm256_setzero_si256();
    for (int64_t w = 0; w < p.words; ++w)
      for (int u = 0; u < kCount; ++u) {
        const int32_t* tile_word = words + u * stride + w * kTileRows;
        _mm_prefetch(reinterpret_cast<const char*>(tile_word) + kPrefetchBytes, _MM_HINT_T0);
        word_int8_avx2(tile_word, p.byte_planes, tables + w * kInt8WordBytes, steps[w], totals[u]);
      }
    const __m256 unit = _mm256_set1_ps(p.step_units[job]);
    const float* g = p.row_scale + (i * p.tiles + t) * kTileRows;
    for (int u = 0; u < kCount; ++u) {
      __m256i rows_low, rows_high;
      totals_avx2(totals[u], rows_low, rows_high);
      sums[2 * u] = _mm256_fmadd_ps(_mm256_loadu_ps(g + 16 * u),
                                    _mm256_mul_ps(_mm256_cvtepi32_ps(rows_low), unit), sums[2 * u]);
      sums[2 * u + 1] = _mm256_fmadd_ps(_mm256_loadu_ps(g + 16 * u + 8),
                                        _mm256_mul_ps(_mm256_cvtepi32_ps(rows_high), unit), sums[2 * u + 1]);
    }
  }
  for (int half = 0; half < 2 * kCount; ++half) _mm256_storeu_ps(y + 8 * half, sums[half]);
}

// tile_avx2 for one tile, units_int8_avx2 for more.
void tiles_avx2(const Problem& p, int64_t t, int64_t count, int64_t m, float* y) {
  static constexpr auto kByCount = by_tile_count<kUnitTilesAvx2>([]<int kCount>() {
    if constexpr (kCount == 1) return &tile_avx2;
    else return &units_int8_avx2<kCount>;
  });
  kByCount[count - 1](p, t, m, y);
}
#endif

// y[16 u + r] for tiles t + u, u < count (one segment), and row m of x.
using TilesFn = void (*)(const Problem&, int64_t t, int64_t count, int64_t m, float* y);

// y[16 u + r] = b + sum_i g_i * dot_i for tiles t + u (u < count) and row m of x, fused multiply-adds as on the SIMD
// paths, one tile at a time.
void tiles_portable(const Problem& p, int64_t t, int64_t count, int64_t m, float* y) {
  float dot[kTileRows];
  for (int64_t u = 0; u < count; ++u, ++t, y += kTileRows) {
    for (int64_t r = 0; r < kTileRows; ++r) y[r] = p.bias ? p.bias[t * kTileRows + r] : 0.0f;
    for (int64_t i = 0; i < p.paths; ++i) {
      dot_portable(p, p.signs + (i * p.tiles + t) * p.words * kTileRows, p.job(m, p.tile_map[t].segment, i), dot);
      const float* g = p.row_scale + (i * p.tiles + t) * kTileRows;
      for (int64_t r = 0; r < kTileRows; ++r) y[r] = std::fma(g[r], dot[r], y[r]);
    }
  }
}

TilesFn tiles_for(int isa) {
#if RABIT_X86
  if (isa == kAvx512) return tiles_avx512;
  if (isa == kAvx2) return tiles_avx2;
#endif
  return tiles_portable;
}

// Tiles per unit of work (kUnitTiles).
int64_t unit_tiles_for(const Problem& p) {
  const bool long_rows = p.paths * p.words * kInt8WordBytes > kL1TableBytes;
  if (!p.int8_tables || !long_rows) return 1;
  return p.isa == kAvx512 ? kUnitTiles : p.isa == kAvx2 ? kUnitTilesAvx2 : 1;
}

template <typename out_t>
void write_rows(const float* values, int64_t count, out_t* out) {
  for (int64_t r = 0; r < count; ++r) out[r] = static_cast<out_t>(values[r]);
}

// Output rows of unit's tiles for every row m of x, into out (scalar type out_type, [rows, out_features]).
void compute_unit(const Problem& p, const Unit& unit, TilesFn tiles_fn, at::ScalarType out_type, void* out) {
  alignas(64) float y[kUnitTiles * kTileRows];
  for (int64_t m = 0; m < p.rows; ++m) {
    tiles_fn(p, unit.first_tile, unit.tiles, m, y);
    for (int64_t u = 0; u < unit.tiles; ++u) {
      const Tile& tile = p.tile_map[unit.first_tile + u];
      const int64_t offset = m * p.out_features + tile.first_row;
      const float* values = y + u * kTileRows;
      switch (out_type) {
        case at::kFloat: write_rows(values, tile.rows, static_cast<float*>(out) + offset); break;
        case at::kHalf: write_rows(values, tile.rows, static_cast<at::Half*>(out) + offset); break;
        default: write_rows(values, tile.rows, static_cast<at::BFloat16*>(out) + offset); break;
      }
    }
  }
}

bool is_float_type(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

// Checks the operands; returns (paths, words, tiles, total out_features).
std::array<int64_t, 4> check_operands(const at::Tensor& x, const at::Tensor& tiled_signs,
                                      const at::Tensor& tiled_row_scale, const at::Tensor& col_scale,
                                      const std::optional<at::Tensor>& tiled_bias, at::IntArrayRef out_features,
                                      int64_t in_features) {
  TORCH_CHECK(x.device().is_cpu() && is_float_type(x.scalar_type()) && x.dim() >= 1 && x.size(-1) == in_features,
              "rabit::lut_gemv: x must be a CPU float32/float16/bfloat16 tensor [..., ", in_features, "]");
  TORCH_CHECK(col_scale.dim() == 3 && col_scale.scalar_type() == at::kFloat && col_scale.is_contiguous() &&
                  col_scale.size(0) == static_cast<int64_t>(out_features.size()) && col_scale.size(2) == in_features,
              "rabit::lut_gemv: col_scale must be a contiguous float32 [S, k, K] tensor, S = len(out_features)");
  const int64_t paths = col_scale.size(1), words = (in_features + kWordColumns - 1) / kWordColumns;
  int64_t tiles = 0, total = 0;
  for (const int64_t size : out_features) {
    TORCH_CHECK(size >= 0, "rabit::lut_gemv: out_features must be >= 0");
    tiles += (size + kTileRows - 1) / kTileRows;
    total += size;
  }
  const bool row_words = tiled_signs.scalar_type() == at::kInt &&
                         tiled_signs.sizes() == at::IntArrayRef({paths, tiles, words, kTileRows});
  const bool byte_planes = tiled_signs.scalar_type() == at::kByte &&
                           tiled_signs.sizes() == at::IntArrayRef({paths, tiles, words, 4 * kTileRows});
  TORCH_CHECK((row_words || byte_planes) && tiled_signs.is_contiguous(),
              "rabit::lut_gemv: tiled_signs must be contiguous int32 [k=", paths, ", tiles=", tiles, ", W=", words,
              ", 16] (row words) or uint8 [", paths, ", ", tiles, ", ", words, ", 64] (byte planes), got ",
              tiled_signs.scalar_type(), " ", tiled_signs.sizes());
  TORCH_CHECK(tiled_row_scale.scalar_type() == at::kFloat && tiled_row_scale.is_contiguous() &&
                  tiled_row_scale.sizes() == at::IntArrayRef({paths, tiles, kTileRows}),
              "rabit::lut_gemv: tiled_row_scale must be contiguous float32 [k, tiles, 16]");
  if (tiled_bias.has_value() && tiled_bias->defined())
    TORCH_CHECK(tiled_bias->scalar_type() == at::kFloat && tiled_bias->is_contiguous() &&
                    tiled_bias->sizes() == at::IntArrayRef({tiles, kTileRows}),
                "rabit::lut_gemv: tiled_bias must be contiguous float32 [tiles, 16]");
  return {paths, words, tiles, total};
}

std::vector<int64_t> out_sizes(const at::Tensor& x, int64_t total) {
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = total;
  return sizes;
}

at::Tensor& lut_gemv_out(const at::Tensor& x, const at::Tensor& tiled_signs, const at::Tensor& tiled_row_scale,
                         const at::Tensor& col_scale, const std::optional<at::Tensor>& tiled_bias,
                         at::IntArrayRef out_features, int64_t in_features, bool int8_tables, at::Tensor& out) {
  const auto [paths, words, tiles, total] =
      check_operands(x, tiled_signs, tiled_row_scale, col_scale, tiled_bias, out_features, in_features);
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_contiguous() && out.sizes() == out_sizes(x, total),
              "rabit::lut_gemv: out must be a contiguous ", x.scalar_type(), " tensor of shape x.shape[:-1] + [",
              total, "]");
  const int64_t rows = in_features == 0 ? 0 : x.numel() / in_features;
  if (rows == 0 || total == 0) return out;
  const at::Tensor input = x.contiguous();
  const bool has_bias = tiled_bias.has_value() && tiled_bias->defined();

  Scratch& scratch = t_scratch;
  const int64_t padded = words * kWordColumns, segments = col_scale.size(0), jobs = rows * segments * paths;
  grow(scratch.products, jobs * padded);
  grow(scratch.tiles, tiles);
  if (int8_tables) {
    grow(scratch.int8_tables, jobs * words * kInt8WordBytes);
    grow(scratch.word_scales, jobs * words);
    grow(scratch.word_steps, jobs * words);
    grow(scratch.step_units, jobs);
  } else {
    grow(scratch.exact_tables, jobs * words * kGroupsPerWord * kEntries);
  }
  // The tables read x as fp32 rows of 32 W columns: float32 input with K = 32 W is read in place, any other is
  // converted and zero-padded into scratch.
  const float* x_rows = nullptr;
  if (input.scalar_type() == at::kFloat && padded == in_features) {
    x_rows = input.const_data_ptr<float>();
  } else {
    grow(scratch.x, rows * padded);
    for (int64_t m = 0; m < rows; ++m) {
      to_float(input, m * in_features, in_features, scratch.x.data() + m * padded);
      std::fill(scratch.x.data() + m * padded + in_features, scratch.x.data() + (m + 1) * padded, 0.0f);
    }
    x_rows = scratch.x.data();
  }
  const int isa = active_isa();
  const bool byte_planes = tiled_signs.scalar_type() == at::kByte;
  const Problem problem{rows, in_features, words, segments, paths, tiles, total, int8_tables, byte_planes, isa,
                        static_cast<const int32_t*>(tiled_signs.const_data_ptr()),
                        tiled_row_scale.const_data_ptr<float>(),
                        has_bias ? tiled_bias->const_data_ptr<float>() : nullptr, scratch.tiles.data(),
                        col_scale.const_data_ptr<float>(), x_rows, scratch.products.data(),
                        scratch.exact_tables.data(),
                        scratch.int8_tables.data(), scratch.word_scales.data(), scratch.word_steps.data(),
                        scratch.step_units.data()};
  const int64_t unit_tiles = unit_tiles_for(problem);
  grow(scratch.units, tiles);
  int64_t t = 0, first_row = 0, units = 0;
  for (int64_t s = 0; s < segments; ++s) {
    for (int64_t start = 0; start < out_features[s]; start += kTileRows) {
      if (start % (unit_tiles * kTileRows) == 0) scratch.units[units++] = Unit{t, 0};
      scratch.units[units - 1].tiles += 1;
      scratch.tiles[t++] = Tile{s, first_row + start, std::min(kTileRows, out_features[s] - start)};
    }
    first_row += out_features[s];
  }
  const TilesFn tiles_fn = tiles_for(isa);
  const Unit* unit_map = scratch.units.data();
  const at::ScalarType out_type = out.scalar_type();
  void* out_data = out.data_ptr();
  const int64_t work = rows * paths * tiles * words;  // tile-words to look up
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(),
                                                                              work / kMinWorkPerThread)));
  if (threads == 1) {
    for (int64_t job = 0; job < jobs; ++job) build_tables(problem, job);
    for (int64_t unit = 0; unit < units; ++unit) compute_unit(problem, unit_map[unit], tiles_fn, out_type, out_data);
    return out;
  }
  UnitQueue& queue = t_unit_queue;
  queue.reset(units, threads);
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t job = 0; job < jobs; ++job) build_tables(problem, job);
    const int me = omp_get_thread_num();
    for (int64_t unit = queue.next(me); unit >= 0; unit = queue.next(me))
      compute_unit(problem, unit_map[unit], tiles_fn, out_type, out_data);
  }
  return out;
}

at::Tensor lut_gemv(const at::Tensor& x, const at::Tensor& tiled_signs, const at::Tensor& tiled_row_scale,
                    const at::Tensor& col_scale, const std::optional<at::Tensor>& tiled_bias,
                    at::IntArrayRef out_features, int64_t in_features, bool int8_tables) {
  int64_t total = 0;
  for (const int64_t size : out_features) total += size;
  thread_local OutputCache outputs;
  at::Tensor out = outputs.get(out_sizes(x, total), x.scalar_type());
  return lut_gemv_out(x, tiled_signs, tiled_row_scale, col_scale, tiled_bias, out_features, in_features,
                      int8_tables, out);
}

}  // namespace

// The ISA path (0 portable, 1 AVX2, 2 AVX-512 with VBMI and VNNI): the best this CPU runs, and the one in use.
extern "C" int rabit_lut_best_isa() { return best_isa(); }
extern "C" int rabit_lut_isa() { return active_isa(); }
// Use path `isa` (<= the best this CPU runs) for every later call; returns the path in use afterwards.
extern "C" int rabit_lut_set_isa(int isa) {
  if (isa >= kPortable && isa <= best_isa()) g_isa.store(isa, std::memory_order_relaxed);
  return active_isa();
}

// rabit::lut_gemv as an AOTInductor C shim (aot_inductor.custom_ops_to_c_shims): a compiled decode step calls it
// directly, not through the proxy executor's boxed dispatcher call. Arguments in the C-shim convention: tensors as
// handles, Tensor? as a pointer to a handle (null: None), int[] as pointer and length, bool as int32.
extern "C" AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_lut_gemv(
    AtenTensorHandle x, AtenTensorHandle tiled_signs, AtenTensorHandle tiled_row_scale, AtenTensorHandle col_scale,
    AtenTensorHandle* tiled_bias, const int64_t* out_features, int64_t segments, int64_t in_features,
    int32_t int8_tables, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    const std::optional<at::Tensor> bias =
        tiled_bias == nullptr ? std::nullopt : std::optional<at::Tensor>(*tensor_handle_to_tensor_pointer(*tiled_bias));
    *ret0 = torch::aot_inductor::new_tensor_handle(lut_gemv(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(tiled_signs),
        *tensor_handle_to_tensor_pointer(tiled_row_scale), *tensor_handle_to_tensor_pointer(col_scale), bias,
        at::IntArrayRef(out_features, segments), in_features, int8_tables != 0));
  });
}

TORCH_LIBRARY_FRAGMENT(rabit, m) {
  m.def("lut_gemv(Tensor x, Tensor tiled_signs, Tensor tiled_row_scale, Tensor col_scale, Tensor? tiled_bias, "
        "int[] out_features, int in_features, bool int8_tables) -> Tensor");
  m.def("lut_gemv.out(Tensor x, Tensor tiled_signs, Tensor tiled_row_scale, Tensor col_scale, Tensor? tiled_bias, "
        "int[] out_features, int in_features, bool int8_tables, *, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(rabit, CPU, m) {
  m.impl("lut_gemv", &lut_gemv);
  m.impl("lut_gemv.out", &lut_gemv_out);
}
