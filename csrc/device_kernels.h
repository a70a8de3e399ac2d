// Device kernels behind the ops: the mixer step and the dropout passes
// (linear_ops.cpp and dropout_matmul.cpp pick the device's
// specialisation), and the products under dropout built on them.
#pragma once

#include "aten_calls.h"
#include "dropout_kernels.h"

#include <torch/headeronly/core/Dispatch.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>

namespace moslora {

// The type a kernel on scalar_t accumulates in (at::opmath_type): fp32 for half precision.
template <typename T>
struct OpMath {
  using type = T;
};
template <>
struct OpMath<c10::Half> {
  using type = float;
};
template <>
struct OpMath<c10::BFloat16> {
  using type = float;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

// AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16, ...): the body with scalar_t set.
#define MOSLORA_DISPATCH_FLOATING(TYPE, NAME, ...)                           \
  THO_DISPATCH_SWITCH(TYPE, NAME,                                            \
                      THO_DISPATCH_CASE(::moslora::ScalarType::Double, __VA_ARGS__) \
                      THO_DISPATCH_CASE(::moslora::ScalarType::Float, __VA_ARGS__)  \
                      THO_DISPATCH_CASE(::moslora::ScalarType::Half, __VA_ARGS__)   \
                      THO_DISPATCH_CASE(::moslora::ScalarType::BFloat16, __VA_ARGS__))

// The kernels' view of a 2-D tensor with unit column stride; T is const for
// a tensor that is only read.
template <typename T>
Rows<T> rows_of(const Tensor& t) {
  using scalar_t = std::remove_const_t<T>;
  T* data;
  if constexpr (std::is_const_v<T>) {
    data = t.const_data_ptr<scalar_t>();
  } else {
    data = t.mutable_data_ptr<scalar_t>();
  }
  return Rows<T>{data, t.size(1), t.stride(0), groups_aligned(data, t.stride(0))};
}

// Elements per task of the CPU kernels' parallel loops (ATen's GRAIN_SIZE).
constexpr int64_t kGrainSize = 32768;

// Rows per block of a row-blocked loop, so that a block's temporaries hold
// about 2^20 elements (merge's fp32 rows, the CPU's tiles under dropout).
inline int64_t rows_per_block(int64_t cols) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(cols, 1));
}

// Declared once for every device; cpu/ and cuda/ define the specialisations.

// The mixer step carries no scale: the ops apply it as the alpha of a GEMM
// (linear_ops.cpp), so no half-precision intermediate holds a scaled value.

// v = u @ mixer^T, u (N, r) and mixer (r, r) contiguous.
template <DeviceType device>
Tensor mixer_forward(const Tensor& u, const Tensor& mixer);

// (du, dmixer) = (dv @ mixer, dv^T @ u) in one pass over the rows; dmixer is
// undefined unless need_dmixer.
template <DeviceType device>
std::tuple<Tensor, Tensor> mixer_backward(const Tensor& dv, const Tensor& u,
                                                  const Tensor& mixer, bool need_dmixer);

// out = dropout of the rows first_row, first_row + 1, ... of the (rows, cols)
// matrix x (unit column stride); out has x's shape and dtype and contiguous rows.
template <DeviceType device>
void dropout_rows(const Tensor& x, const Tensor& out, const DropoutSpec& spec, int64_t first_row);

// Backward's pass over the rows first_row, ... of x (rows, cols): each mask
// group drawn once for dropped = dropout(x) (out of place, contiguous rows;
// the dtype the device's dA GEMM reads: fp32 for half precision on a CPU,
// x's dtype on CUDA) and dx = dropout(dx) (in place, (rows, cols) of x's
// dtype with unit column stride); either may be undefined.
template <DeviceType device>
void dropout_pair_rows(const Tensor& x, const Tensor& dropped, const Tensor& dx, const DropoutSpec& spec,
                       int64_t first_row);

// kernel<kCUDA>(args...) for CUDA operands, kernel<kCPU>(args...) otherwise.
#ifdef WITH_CUDA
#define ON_DEVICE(is_cuda, kernel, ...) \
  ((is_cuda) ? moslora::kernel<DeviceType::CUDA>(__VA_ARGS__) : moslora::kernel<DeviceType::CPU>(__VA_ARGS__))
#else
#define ON_DEVICE(is_cuda, kernel, ...) ((void)(is_cuda), moslora::kernel<DeviceType::CPU>(__VA_ARGS__))
#endif

// How the rows of x meet lora_A in the products under dropout: one A for
// every row (the dense op) or one A per expert's rows (the expert op). Each
// function is handed a tile of rows [first, first + rows) of x's N rows.
struct RowProducts {
  // out (rows, r) = tile lora_A^T
  std::function<void(const Tensor& tile, int64_t first, const Tensor& out)> down;
  // out (rows, d) = du_tile lora_A
  std::function<void(const Tensor& du_tile, int64_t first, const Tensor& out)> up;
  // dA += du_tile^T tile, the product in fp32 when fp32_result (dA is fp32 then)
  std::function<void(Tensor& dA, const Tensor& du_tile_t, const Tensor& tile, int64_t first, bool fp32_result)>
      add_grad_A;
};

// The products under dropout (dropout_matmul.cpp, for either device), for
// x (N, d) with unit column stride and du (N, r) contiguous; accumulation in
// fp32 for half precision, rounded once.
// u = dropout(x) lora_A^T (N, r).
Tensor dropout_project_down(const Tensor& x, int64_t r, const DropoutSpec& spec, const RowProducts& products);

// dA = du^T dropout(x) (of dA_sizes), returned when need_dA (else undefined),
// and dx = dropout(du lora_A) written into dx (N, d, contiguous) when dx is defined.
Tensor dropout_grads(const Tensor& x, const Tensor& du, const Tensor& dx, bool need_dA,
                     torch::headeronly::IntHeaderOnlyArrayRef dA_sizes, const DropoutSpec& spec, const RowProducts& products);

// Rows of x (cols columns of element_size bytes) per tile of the products
// under dropout: on a CPU about 2^20 elements (a core's cache); on CUDA
// 16 MiB, which a GPU's L2 (40-50 MiB on A100/H100/H200) keeps while the GEMM
// reads the tile back right after the dropout pass wrote it.
inline int64_t dropout_tile_rows(bool cuda, int64_t cols, int64_t element_size) {
  if (!cuda) return rows_per_block(cols);
  const int64_t tile_bytes = int64_t(1) << 24;
  return std::max<int64_t>(1, tile_bytes / std::max<int64_t>(cols * element_size, 1));
}

}  // namespace moslora
