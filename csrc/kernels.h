// Device kernels behind the ops: the mixer step and the products under dropout.
// csrc/moslora.cpp picks the device's specialisation.
#pragma once

#include "dropout_kernels.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace moslora {

// What regenerates a dropout mask, as the ops receive it (scale in double);
// mask_of gives the kernels' copy in their accumulation type.
using DropoutSpec = DropoutMask<double>;

template <typename acc_t>
DropoutMask<acc_t> mask_of(const DropoutSpec& spec) {
  return DropoutMask<acc_t>{spec.seed, spec.drop_threshold, static_cast<acc_t>(spec.keep_scale)};
}

// The kernels' view of a 2-D tensor with unit column stride; T is const for
// a tensor that is only read.
template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  using scalar_t = std::remove_const_t<T>;
  T* data;
  if constexpr (std::is_const_v<T>) {
    data = t.const_data_ptr<scalar_t>();
  } else {
    data = t.mutable_data_ptr<scalar_t>();
  }
  return Rows<T>{data, t.size(1), t.stride(0), groups_aligned(data, t.stride(0))};
}

// Rows per block of a row-blocked loop, so that a block's temporaries hold
// about 2^20 elements (the CPU's dropped copy of x, merge's fp32 rows).
inline int64_t rows_per_block(int64_t cols) {
  return std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(cols, 1));
}

// Declared once for every device; cpu/ and cuda/ define the specialisations.

// v = scale * u @ mixer^T, u (N, r) and mixer (r, r) contiguous.
template <c10::DeviceType device>
at::Tensor mixer_forward(const at::Tensor& u, const at::Tensor& mixer, double scale);

// (du, dmixer) = (scale * dv @ mixer, scale * dv^T @ u) in one pass over the
// rows; dmixer is undefined unless need_dmixer.
template <c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> mixer_backward(const at::Tensor& dv, const at::Tensor& u,
                                                  const at::Tensor& mixer, double scale, bool need_dmixer);

// out = dropout of the rows first_row, first_row + 1, ... of the (rows, cols)
// matrix x (unit column stride); out has x's shape and dtype and contiguous rows.
template <c10::DeviceType device>
void dropout_rows(const at::Tensor& x, const at::Tensor& out, const DropoutSpec& spec, int64_t first_row);

// The three products that need the mask, for x (N, d) and lora_A (r, d) with
// unit column strides and du (N, r) contiguous; accumulation in fp32 for
// half precision, rounded once.
// u = dropout(x) lora_A^T (N, r).
template <c10::DeviceType device>
at::Tensor dropout_project_down(const at::Tensor& x, const at::Tensor& lora_A, const DropoutSpec& spec);

// dA = du^T dropout(x) (r, d), returned when need_dA (else undefined), and
// dx = dropout(du lora_A) written into dx (N, d, contiguous) when dx is defined.
template <c10::DeviceType device>
at::Tensor dropout_grads(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_A, const at::Tensor& dx,
                         bool need_dA, const DropoutSpec& spec);

}  // namespace moslora
