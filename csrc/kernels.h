// Device kernels behind the ops: the mixer step and the dropout mask.
// csrc/moslora.cpp picks the device's specialisation.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace moslora {

// What regenerates a dropout mask: Philox seed, the integer threshold of
// dropout_keep() and the 1/(1-p) scale of kept elements.
struct DropoutSpec {
  uint64_t seed;
  uint32_t drop_threshold;
  double keep_scale;
};

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
// matrix x; out is contiguous with x's shape and may be x itself (in place).
template <c10::DeviceType device>
void dropout_rows(const at::Tensor& x, const at::Tensor& out, const DropoutSpec& spec, int64_t first_row);

}  // namespace moslora
