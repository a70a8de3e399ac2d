// Device kernels behind the ops: the mixer step and the dropout mask.
// Each exists once per device (cpu/, cuda/); csrc/moslora.cpp picks by device.
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

namespace cpu {
// v = scale * u @ mixer^T, u (N, r) and mixer (r, r) contiguous.
at::Tensor mixer_forward(const at::Tensor& u, const at::Tensor& mixer, double scale);
// (du, dmixer) = (scale * dv @ mixer, scale * dv^T @ u) in one pass over the
// rows; dmixer is undefined unless need_dmixer.
std::tuple<at::Tensor, at::Tensor> mixer_backward(const at::Tensor& dv, const at::Tensor& u,
                                                  const at::Tensor& mixer, double scale,
                                                  bool need_dmixer);
// Dropout of the rows first_row, first_row + 1, ... of a (rows, cols) matrix.
at::Tensor dropout_rows(const at::Tensor& x, const DropoutSpec& spec, int64_t first_row);
}  // namespace cpu

#ifdef WITH_CUDA
namespace cuda {
at::Tensor mixer_forward(const at::Tensor& u, const at::Tensor& mixer, double scale);
std::tuple<at::Tensor, at::Tensor> mixer_backward(const at::Tensor& dv, const at::Tensor& u,
                                                  const at::Tensor& mixer, double scale,
                                                  bool need_dmixer);
at::Tensor dropout_rows(const at::Tensor& x, const DropoutSpec& spec, int64_t first_row);
}  // namespace cuda
#endif

}  // namespace moslora
