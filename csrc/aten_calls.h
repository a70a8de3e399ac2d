// The LibTorch stable ABI as the operators use it: tensors, ATen operators
// called through the stable dispatcher (the GEMMs the host algorithm and the
// expert operators run: mm, addmm, bmm, _grouped_mm, ... into outputs), the
// device guard and the current CUDA stream, and the argument checks' errors.
// One place for these, which the expert operators use as the dense ones.
// Nothing here links against libtorch's C++ symbols: only its C shim.
#pragma once

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#ifdef WITH_CUDA
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#endif

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace moslora {

using torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using DeviceType = torch::headeronly::DeviceType;

// ---------------------------------------------------------------------------
// Errors. The operators' argument errors reach Python as ValueError
// (std::invalid_argument) and TypeError (dtype mismatches: raised as
// RuntimeError here, which the ops' Python side turns into the TypeError of
// the same check, moslora_ext/ops/checks.py; the stable ABI carries no
// exception type that Python maps to TypeError).
// ---------------------------------------------------------------------------

// "[3, 40]", as c10 prints sizes.
inline std::ostream& operator<<(std::ostream& os, torch::headeronly::IntHeaderOnlyArrayRef sizes) {
  os << '[';
  for (size_t i = 0; i < sizes.size(); ++i) os << (i ? ", " : "") << sizes[i];
  return os << ']';
}

// "cpu", "cuda:0", "meta", as c10 prints devices.
inline std::string device_name(const Tensor& t) {
  const auto device = t.device();
  std::ostringstream os;
  switch (device.type()) {
    case DeviceType::CPU: os << "cpu"; break;
    case DeviceType::CUDA: os << "cuda"; break;
    case DeviceType::Meta: os << "meta"; break;
    default: os << "device type " << static_cast<int>(device.type());
  }
  if (device.has_index()) os << ':' << static_cast<int>(device.index());
  return os.str();
}

template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

#define MOSLORA_CHECK_VALUE(cond, ...) \
  if (!(cond)) throw std::invalid_argument(::moslora::message(__VA_ARGS__))
#define MOSLORA_CHECK_TYPE(cond, ...) \
  if (!(cond)) throw std::runtime_error(::moslora::message(__VA_ARGS__))
#define MOSLORA_CHECK(cond, ...) \
  if (!(cond)) throw std::runtime_error(::moslora::message(__VA_ARGS__))

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Double || t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// The dtype an op on t computes in (at::toOpMathType): fp32 for half precision.
inline ScalarType opmath_type(ScalarType t) {
  return t == ScalarType::Half || t == ScalarType::BFloat16 ? ScalarType::Float : t;
}

// ---------------------------------------------------------------------------
// ATen operators through the stable dispatcher.
// ---------------------------------------------------------------------------

// Calls aten::name.overload on args (as its schema orders them) and returns
// its (first and only) result, which owns the reference the call returned:
// an out= variant's result, dropped, must be released too, or the out tensor leaks.
template <typename... Args>
Tensor call_aten(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args)> stack{torch::stable::detail::from(args)...};
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

inline Tensor t(const Tensor& m) {
  return torch::stable::transpose(m, 0, 1);
}

// out = a @ b.
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  call_aten("aten::mm", "out", a, b, out);
}

// a @ b into a new tensor; beside fp16/bf16 operands out_dtype may be fp32
// (CUDA: the accumulator, unrounded).
inline Tensor mm(const Tensor& a, const Tensor& b, std::optional<ScalarType> out_dtype = std::nullopt) {
  if (out_dtype && *out_dtype != a.scalar_type()) {
    return call_aten("aten::mm", "dtype", a, b, *out_dtype);
  }
  auto out = torch::stable::new_empty(a, {a.size(0), b.size(1)});
  mm_out(out, a, b);
  return out;
}

// out = beta * self + alpha * a @ b (out may be self: in place). Through
// the C shim's addmm_out: the stable dispatcher call takes no Scalar at 2.11.
inline void addmm_out(const Tensor& out, const Tensor& self, const Tensor& a, const Tensor& b, double beta,
                      double alpha) {
#ifdef WITH_CUDA
  if (out.is_cuda()) {
    TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_addmm_out(out.get(), self.get(), a.get(), b.get(), beta, alpha));
    return;
  }
#endif
  TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(out.get(), self.get(), a.get(), b.get(), beta, alpha));
}

// a @ b batched over the first dimension, into a new tensor (the out=
// variant, which autocast leaves alone, as mm_out).
inline Tensor bmm(const Tensor& a, const Tensor& b) {
  auto out = torch::stable::new_empty(a, {a.size(0), a.size(1), b.size(2)});
  call_aten("aten::bmm", "out", a, b, out);
  return out;
}

// aten::_grouped_mm(a, b, offs): a's rows (or, for a 2-D b, a's columns and
// b's rows) split into groups at the cumulative counts offs, each group
// times its own matrix; throws std::runtime_error where ATen refuses.
inline Tensor grouped_mm(const Tensor& a, const Tensor& b, const Tensor& offs) {
  return call_aten("aten::_grouped_mm", "", a, b, std::optional<Tensor>(offs), std::optional<Tensor>(),
                   std::optional<ScalarType>());
}

// s * t, a new tensor (the C shim's mul: the stable dispatcher call takes no Scalar at 2.11).
inline Tensor scaled(const Tensor& t, double s) {
  AtenTensorHandle result = nullptr;
#ifdef WITH_CUDA
  if (t.is_cuda()) {
    TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_mul_Scalar(t.get(), s, &result));
    return Tensor(result);
  }
#endif
  TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mul_Scalar(t.get(), s, &result));
  return Tensor(result);
}

// t.narrow(dim, first, count), a view (of a const t, which the stable narrow does not take).
inline Tensor narrowed(Tensor t, int64_t dim, int64_t first, int64_t count) {
  return torch::stable::narrow(t, dim, first, count);
}

// Rows [first, first + count) of t, a view.
inline Tensor row_range(const Tensor& t, int64_t first, int64_t count) {
  return narrowed(t, 0, first, count);
}

// dst.copy_(src), for a dst that is a temporary view (a narrow or select).
inline void copy_into(Tensor dst, const Tensor& src) {
  torch::stable::copy_(dst, src);
}

inline std::vector<int64_t> sizes_of(const Tensor& t) {
  const auto s = t.sizes();
  return std::vector<int64_t>(s.begin(), s.end());
}

// The product of all sizes but the last: the rows of t flattened to 2-D.
inline int64_t leading_rows(const Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) n *= t.size(i);
  return n;
}

// Makes t's CUDA device current for the guard's lifetime (nothing for CPU).
class DeviceGuard {
 public:
  explicit DeviceGuard(const Tensor& t) {
    if (t.is_cuda()) guard_.emplace(t.get_device_index());
  }

 private:
  std::optional<torch::stable::accelerator::DeviceGuard> guard_;
};

}  // namespace moslora

#ifdef WITH_CUDA
#include <cuda_runtime_api.h>

namespace moslora {
// The current CUDA stream of device `index`.
inline cudaStream_t current_cuda_stream(int32_t index) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(index, &stream));
  return static_cast<cudaStream_t>(stream);
}
}  // namespace moslora
#endif
