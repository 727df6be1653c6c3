// rabit::weight_only_gemv: the weight-only linear's decode kernel (weight_only.cpp) as a dispatcher operator with an
// AOTInductor C shim, so that a compiled decode step calls the LM head with no Python in the call. Format, arithmetic
// and error bounds are in weight_only.py. The kernel is built per (bits, scale type) for this CPU by weight_only.py
// (Inductor's C++ toolchain) and registers its entry point here (rabit_weight_only_register) before a graph calling
// this operator is compiled; a call whose kernel is not registered raises.

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <vector>

namespace {

// weight_only.cpp's entry point: x, qweight, scale (SCALE_T), bias, out, then rows, out_features, in_features,
// group_size, groups, has_bias, threads, int8_activations.
using Kernel = void (*)(const float*, const uint8_t*, const void*, const float*, float*, int64_t, int64_t, int64_t,
                        int64_t, int64_t, int64_t, int64_t, int64_t);

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxRows = 4;
constexpr at::ScalarType kScaleTypes[3] = {at::kFloat, at::kHalf, at::kBFloat16};

std::array<std::atomic<Kernel>, 6> g_kernels{};  // index: 3 * (bits == 4) + scale type (kScaleTypes)

int64_t scale_type_index(at::ScalarType type) {
  for (int64_t i = 0; i < 3; ++i)
    if (kScaleTypes[i] == type) return i;
  return -1;
}

bool is_float_type(at::ScalarType type) { return scale_type_index(type) >= 0; }

at::Tensor weight_only_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                            const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size,
                            int64_t in_features, bool int8_activations) {
  TORCH_CHECK(bits == 8 || bits == 4, "rabit::weight_only_gemv: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(group_size >= 0 && group_size % kBlock == 0,
              "rabit::weight_only_gemv: group_size must be 0 (per row) or a positive multiple of 32, got ", group_size);
  TORCH_CHECK(x.device().is_cpu() && is_float_type(x.scalar_type()) && x.dim() >= 1 && x.size(-1) == in_features,
              "rabit::weight_only_gemv: x must be a CPU float32/float16/bfloat16 tensor [..., ", in_features, "]");
  const int64_t rows = in_features == 0 ? 0 : x.numel() / in_features;
  TORCH_CHECK(rows <= kMaxRows, "rabit::weight_only_gemv: the decode kernel takes at most ", kMaxRows,
              " rows, got ", rows, " (rabit::weight_only_linear takes any)");
  const int64_t row_bytes = bits == 8 ? in_features : 16 * ((in_features + kBlock - 1) / kBlock);
  TORCH_CHECK(qweight.device().is_cpu() && qweight.dim() == 2 && qweight.size(1) == row_bytes &&
                  qweight.element_size() == 1 && qweight.is_contiguous(),
              "rabit::weight_only_gemv: qweight must be a contiguous CPU int8/uint8 [N, ", row_bytes, "] for bits=",
              bits, ", K=", in_features);
  const int64_t out_features = qweight.size(0);
  const int64_t group = group_size == 0 ? in_features : group_size;
  const int64_t groups = group_size == 0 ? 1 : (in_features + group_size - 1) / group_size;
  const int64_t scale_type = scale_type_index(scale.scalar_type());
  TORCH_CHECK(scale_type >= 0 && scale.is_contiguous() && scale.sizes() == at::IntArrayRef({out_features, groups}),
              "rabit::weight_only_gemv: scale must be a contiguous float32/float16/bfloat16 [N, ", groups, "]");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "rabit::weight_only_gemv: bias must be [N]");
  const Kernel kernel = g_kernels[3 * (bits == 4) + scale_type].load(std::memory_order_acquire);
  TORCH_CHECK(kernel != nullptr, "rabit::weight_only_gemv: the kernel for bits=", bits, " and ", scale.scalar_type(),
              " scales is not built in this process; rabit_compiler.kernels.weight_only.load_operator builds it");

  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end());
  sizes.back() = out_features;
  const at::Tensor input = x.reshape({rows, in_features}).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, out_features}, x.options().dtype(at::kFloat));
  if (rows == 0 || out_features == 0) return out.to(x.scalar_type()).reshape(sizes);
  const at::Tensor bias_values = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  kernel(input.const_data_ptr<float>(), static_cast<const uint8_t*>(qweight.const_data_ptr()),
         scale.const_data_ptr(), has_bias ? bias_values.const_data_ptr<float>() : input.const_data_ptr<float>(),
         out.data_ptr<float>(), rows, out_features, in_features, group, groups, has_bias, at::get_num_threads(),
         int8_activations);
  return out.to(x.scalar_type()).reshape(sizes);
}

}  // namespace

// Register `kernel` (weight_only.cpp's entry point, built for this CPU) for `bits` and scale type `scale_type`
// (0 float32, 1 float16, 2 bfloat16); returns 0, or -1 for arguments out of range.
extern "C" int rabit_weight_only_register(int64_t bits, int64_t scale_type, void* kernel) {
  if ((bits != 8 && bits != 4) || scale_type < 0 || scale_type > 2) return -1;
  g_kernels[3 * (bits == 4) + scale_type].store(reinterpret_cast<Kernel>(kernel), std::memory_order_release);
  return 0;
}

// rabit::weight_only_gemv as an AOTInductor C shim (aot_inductor.custom_ops_to_c_shims), in the C-shim convention:
// tensors as handles, Tensor? as a pointer to a handle (null: None), bool as int32.
extern "C" AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_weight_only_gemv(
    AtenTensorHandle x, AtenTensorHandle qweight, AtenTensorHandle scale, AtenTensorHandle* bias, int64_t bits,
    int64_t group_size, int64_t in_features, int32_t int8_activations, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    using torch::aot_inductor::tensor_handle_to_tensor_pointer;
    const std::optional<at::Tensor> bias_tensor =
        bias == nullptr ? std::nullopt : std::optional<at::Tensor>(*tensor_handle_to_tensor_pointer(*bias));
    *ret0 = torch::aot_inductor::new_tensor_handle(weight_only_gemv(
        *tensor_handle_to_tensor_pointer(x), *tensor_handle_to_tensor_pointer(qweight),
        *tensor_handle_to_tensor_pointer(scale), bias_tensor, bits, group_size, in_features, int8_activations != 0));
  });
}

TORCH_LIBRARY_FRAGMENT(rabit, m) {
  m.def("weight_only_gemv(Tensor x, Tensor qweight, Tensor scale, Tensor? bias, int bits, int group_size, "
        "int in_features, bool int8_activations) -> Tensor");
}

TORCH_LIBRARY_IMPL(rabit, CPU, m) { m.impl("weight_only_gemv", &weight_only_gemv); }
