// CUDA dropout: applies the counter-based mask of kernel_math.h to a row
// block; the same mask as the CPU kernel for the same seed.
#include "../kernel_math.h"
#include "../kernels.h"
#include "launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>

namespace moslora {
namespace {

// One thread handles kDropoutColsPerCall consecutive columns of one row: one
// Philox call. in and out may be the same buffer (in-place dropout), hence no
// __restrict__.
template <typename scalar_t, typename acc_t>
__global__ void dropout_kernel(const scalar_t* in, scalar_t* out,
                               int64_t rows, int64_t cols, int64_t first_row, uint64_t seed,
                               uint32_t drop_threshold, acc_t keep_scale) {
  const int64_t col_groups = (cols + kDropoutColsPerCall - 1) / kDropoutColsPerCall;
  for (int64_t idx = grid_start(); idx < rows * col_groups; idx += grid_stride()) {
    const int64_t row = idx / col_groups, g = idx % col_groups;
    const Philox4 words = philox4x32_10(seed, first_row + row, static_cast<uint32_t>(g));
    const int64_t first_col = kDropoutColsPerCall * g;
    for (int lane = 0; lane < kDropoutColsPerCall && first_col + lane < cols; ++lane) {
      const int64_t offset = row * cols + first_col + lane;
      out[offset] = static_cast<scalar_t>(static_cast<acc_t>(in[offset]) *
                                          dropout_factor(words, lane, drop_threshold, keep_scale));
    }
  }
}

}  // namespace

template <>
void dropout_rows<c10::kCUDA>(const at::Tensor& x, const at::Tensor& out, const DropoutSpec& spec,
                              int64_t first_row) {
  const auto x_contig = x.contiguous();
  const int64_t rows = x_contig.size(0), cols = x_contig.size(1);
  const int64_t work = rows * ((cols + kDropoutColsPerCall - 1) / kDropoutColsPerCall);
  if (work == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moslora_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dropout_kernel<scalar_t, acc_t><<<grid_for(work), kThreads, 0, stream>>>(
        x_contig.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, cols, first_row,
        spec.seed, spec.drop_threshold, static_cast<acc_t>(spec.keep_scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace moslora
