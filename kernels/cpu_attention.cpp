// rabit::decode_attention: scaled dot-product attention for a few query rows over a KV cache (decode), reading only
// the cache positions the mask lets through. The math and the error bound are in cpu_attention.py's docstring.
//
// For every batch b and head h, with P = the positions l where mask[b, 0, 0, l] is true (all L without a mask):
//     s[m, l]      = scale * sum_c query[b, h, m, c] * key[b, h, l, c]          (l in P)
//     out[b, h, m] = sum_{l in P} exp(s[m, l] - max_P s[m, .]) * value[b, h, l] / sum_{l in P} exp(s[m, l] - max)
// in fp32 whatever the tensors' dtype. Vectorised with ATen's at::vec (the ISA Inductor's C++ toolchain builds
// for: AVX-512, AVX2 or scalar), parallel over the (b, h, m) query rows when there is enough work: each row's sums
// are its own, so the bits do not depend on how the rows are shared out.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "outputs.h"

namespace {

using Vec = at::vec::Vectorized<float>;
// Fewest multiply-adds (rows x positions x head dim, both products) worth a thread of their own: a parallel region
// costs a microsecond or two while the workers spin (2^14 against 2^16: benchmarks/RESULTS.md).
constexpr int64_t kMinWorkPerThread = 1 << 14;

// One head's row of n numbers as fp32: the row itself (fp32) or a copy converted into `buffer`.
template <typename T>
const float* as_float(const T* row, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t c = 0; c < n; ++c) buffer[c] = static_cast<float>(row[c]);
    return buffer;
  }
}

float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.0f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) acc = at::vec::fmadd(Vec::loadu(a + c), Vec::loadu(b + c), acc);
  float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; c < n; ++c) total += a[c] * b[c];
  return total;
}

// acc[0..n) += weight * row[0..n)
void axpy(float weight, const float* row, float* acc, int64_t n) {
  const Vec w(weight);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size())
    at::vec::fmadd(w, Vec::loadu(row + c), Vec::loadu(acc + c)).store(acc + c);
  for (; c < n; ++c) acc[c] += weight * row[c];
}

// How many positions ahead the K and V rows are prefetched. Past the newest token the cache is cold in a decode
// step (the weights streamed since evicted it) and each row is a few cache lines, so without this the loops wait on
// memory latency, not bandwidth (benchmarks/RESULTS.md).
constexpr int64_t kPrefetchAhead = 16;

// Prefetch the n elements at row into the cache level of `Locality` (__builtin_prefetch: 3 = L1, 2 = L2).
template <int Locality, typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < n * static_cast<int64_t>(sizeof(T)); offset += 64)
    __builtin_prefetch(bytes + offset, 0, Locality);
}

struct Shapes {
  int64_t batch, heads, rows, length, dim, value_dim;
};

// Query rows [first_row, first_row + rows) of batch b, head h (one K and V pass for all of them).
template <typename T>
void attend_rows(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const int64_t* positions,
                 int64_t count, double scale, const Shapes& s, int64_t b, int64_t h, int64_t first_row, int64_t rows,
                 T* out) {
  thread_local std::vector<float> scratch;
  const int64_t need = rows * s.dim + rows * count + rows * s.value_dim + s.dim + s.value_dim;
  if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
  float* q = scratch.data();                  // [rows, dim], scaled
  float* scores = q + rows * s.dim;           // [rows, count]
  float* acc = scores + rows * count;         // [rows, value_dim]
  float* row_buffer = acc + rows * s.value_dim;
  float* value_buffer = row_buffer + s.dim;

  const T* q_base =
      query.const_data_ptr<T>() + b * query.stride(0) + h * query.stride(1) + first_row * query.stride(2);
  for (int64_t m = 0; m < rows; ++m)
    for (int64_t c = 0; c < s.dim; ++c)
      q[m * s.dim + c] = static_cast<float>(q_base[m * query.stride(2) + c]) * static_cast<float>(scale);
  const T* k_base = key.const_data_ptr<T>() + b * key.stride(0) + h * key.stride(1);
  const T* v_base = value.const_data_ptr<T>() + b * value.stride(0) + h * value.stride(1);

  const auto key_row = [&](int64_t j) { return k_base + positions[j] * key.stride(2); };
  const auto value_row = [&](int64_t j) { return v_base + positions[j] * value.stride(2); };
  // the K pass fetches K rows into L1 ahead of use and this head's V rows into L2 for the V pass
  for (int64_t j = 0; j < std::min(count, kPrefetchAhead); ++j) prefetch_row<3>(key_row(j), s.dim);
  for (int64_t j = 0; j < count; ++j) {
    if (j + kPrefetchAhead < count) prefetch_row<3>(key_row(j + kPrefetchAhead), s.dim);
    prefetch_row<2>(value_row(j), s.value_dim);
    const float* k = as_float(key_row(j), s.dim, row_buffer);
    for (int64_t m = 0; m < rows; ++m) scores[m * count + j] = dot(q + m * s.dim, k, s.dim);
  }
  for (int64_t m = 0; m < rows; ++m) {
    float* row = scores + m * count;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < count; ++j) top = std::max(top, row[j]);
    const Vec shift(top);
    int64_t j = 0;
    for (; j + Vec::size() <= count; j += Vec::size()) (Vec::loadu(row + j) - shift).exp().store(row + j);
    for (; j < count; ++j) row[j] = std::exp(row[j] - top);
  }
  std::fill(acc, acc + rows * s.value_dim, 0.0f);
  for (int64_t j = 0; j < count; ++j) {
    if (j + kPrefetchAhead < count) prefetch_row<3>(value_row(j + kPrefetchAhead), s.value_dim);
    const float* v = as_float(value_row(j), s.value_dim, value_buffer);
    for (int64_t m = 0; m < rows; ++m) axpy(scores[m * count + j], v, acc + m * s.value_dim, s.value_dim);
  }
  for (int64_t m = 0; m < rows; ++m) {
    float total = 0.0f;
    for (int64_t j = 0; j < count; ++j) total += scores[m * count + j];
    // no position let through: zeros, as scaled_dot_product_attention gives
    const float inverse = count == 0 ? 0.0f : 1.0f / total;
    T* out_row = out + ((b * s.heads + h) * s.rows + first_row + m) * s.value_dim;
    for (int64_t c = 0; c < s.value_dim; ++c) out_row[c] = static_cast<T>(acc[m * s.value_dim + c] * inverse);
  }
}

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

at::Tensor& decode_attention_out(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                 const std::optional<at::Tensor>& attn_mask, double scale, at::Tensor& out) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.dim() == 4,
              "rabit::decode_attention: query, key and value must be 4-D [batch, heads, positions, dim]");
  TORCH_CHECK(query.device().is_cpu() && key.device().is_cpu() && value.device().is_cpu(),
              "rabit::decode_attention: CPU tensors only");
  TORCH_CHECK(is_float_type(query.scalar_type()) && key.scalar_type() == query.scalar_type() &&
                  value.scalar_type() == query.scalar_type(),
              "rabit::decode_attention: query, key and value must share one dtype of float32/float16/bfloat16");
  const Shapes s{query.size(0), query.size(1), query.size(2), key.size(2), query.size(3), value.size(3)};
  TORCH_CHECK(key.size(0) == s.batch && key.size(1) == s.heads && key.size(3) == s.dim && value.size(0) == s.batch &&
                  value.size(1) == s.heads && value.size(2) == s.length,
              "rabit::decode_attention: key [", s.batch, ", ", s.heads, ", L, ", s.dim, "] and value [", s.batch,
              ", ", s.heads, ", L, Dv] expected for query ", query.sizes(), "; got ", key.sizes(), " and ",
              value.sizes());
  const bool has_mask = attn_mask.has_value() && attn_mask->defined();
  if (has_mask)
    TORCH_CHECK(attn_mask->scalar_type() == at::kBool && attn_mask->dim() == 4 &&
                    (attn_mask->size(0) == 1 || attn_mask->size(0) == s.batch) && attn_mask->size(1) == 1 &&
                    attn_mask->size(2) == 1 && attn_mask->size(3) == s.length,
                "rabit::decode_attention: attn_mask must be bool [", s.batch, " or 1, 1, 1, ", s.length,
                "] (the same for every head and row), got ", attn_mask->scalar_type(), " ", attn_mask->sizes());
  const at::Tensor q = query.stride(3) == 1 ? query : query.contiguous();
  const at::Tensor k = key.stride(3) == 1 ? key : key.contiguous();
  const at::Tensor v = value.stride(3) == 1 ? value : value.contiguous();
  TORCH_CHECK(out.scalar_type() == query.scalar_type() && out.is_contiguous() &&
                  out.sizes() == at::IntArrayRef({s.batch, s.heads, s.rows, s.value_dim}),
              "rabit::decode_attention: out must be a contiguous ", query.scalar_type(), " tensor [", s.batch, ", ",
              s.heads, ", ", s.rows, ", ", s.value_dim, "]");
  if (out.numel() == 0) return out;

  // the positions each batch row attends to, in order
  std::vector<int64_t> positions(s.batch * s.length), counts(s.batch);
  const at::Tensor mask = has_mask ? attn_mask->contiguous() : at::Tensor();
  for (int64_t b = 0; b < s.batch; ++b) {
    const bool* allowed = has_mask ? mask.const_data_ptr<bool>() + (mask.size(0) == 1 ? 0 : b) * s.length : nullptr;
    int64_t count = 0;
    for (int64_t l = 0; l < s.length; ++l)
      if (allowed == nullptr || allowed[l]) positions[b * s.length + count++] = l;
    counts[b] = count;
  }
  int64_t most = 0;
  for (const int64_t c : counts) most = std::max(most, c);
  const int64_t work = s.batch * s.heads * s.rows * most * (s.dim + s.value_dim);
  const int64_t jobs = s.batch * s.heads * s.rows;  // one query row each
  const int64_t grain = std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work / jobs));
  const auto run = [&](auto* out_data) {
    using T = std::remove_pointer_t<decltype(out_data)>;
    at::parallel_for(0, jobs, grain, [&](int64_t begin, int64_t end) {
      // the range's rows of each (b, h) pair together: one pass over that head's positions
      for (int64_t job = begin; job < end;) {
        const int64_t pair = job / s.rows, first_row = job % s.rows;
        const int64_t rows = std::min(s.rows - first_row, end - job), b = pair / s.heads;
        attend_rows<T>(q, k, v, positions.data() + b * s.length, counts[b], scale, s, b, pair % s.heads, first_row,
                       rows, out_data);
        job += rows;
      }
    });
  };
  if (query.scalar_type() == at::kFloat) run(out.data_ptr<float>());
  else if (query.scalar_type() == at::kHalf) run(out.data_ptr<at::Half>());
  else run(out.data_ptr<at::BFloat16>());
  return out;
}

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& attn_mask, double scale) {
  TORCH_CHECK(query.dim() == 4 && value.dim() == 4,
              "rabit::decode_attention: query, key and value must be 4-D [batch, heads, positions, dim]");
  thread_local OutputCache outputs;
  at::Tensor out = outputs.get({query.size(0), query.size(1), query.size(2), value.size(3)}, query.scalar_type());
  return decode_attention_out(query, key, value, attn_mask, scale, out);
}

}  // namespace

// rabit::decode_attention as an AOTInductor C shim (aot_inductor.custom_ops_to_c_shims), called directly by a
// compiled decode step; C-shim convention: tensors as handles, Tensor? as a pointer to a handle (null: None).
extern "C" AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_decode_attention(
    AtenTensorHandle query, AtenTensorHandle key, AtenTensorHandle value, AtenTensorHandle* attn_mask, double scale,
    AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    const std::optional<at::Tensor> mask =
        attn_mask == nullptr ? std::nullopt : std::optional<at::Tensor>(*tensor_handle_to_tensor_pointer(*attn_mask));
    *ret0 = torch::aot_inductor::new_tensor_handle(
        decode_attention(*tensor_handle_to_tensor_pointer(query), *tensor_handle_to_tensor_pointer(key),
                         *tensor_handle_to_tensor_pointer(value), mask, scale));
  });
}

TORCH_LIBRARY_FRAGMENT(rabit, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale) -> Tensor");
  m.def("decode_attention.out(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float scale, *, "
        "Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(rabit, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_attention.out", &decode_attention_out);
}
