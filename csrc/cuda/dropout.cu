// CUDA products under dropout, each one pass over its N x d matrix with the
// mask regenerated in registers: the bodies of dropout_kernels.h over its
// grids (which the host test runs too). A fixed number of launches whatever N.
#include "../kernels.h"
#include "launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

namespace moslora {
namespace {

// A warp per row (grid-stride over rows), r outputs in passes of 16.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDownWarps * kWarpLanes)
    down_project_kernel(Rows<const scalar_t> x, Rows<const scalar_t> lora_A, DropoutMask<acc_t> mask,
                        scalar_t* __restrict__ u, int64_t n, int64_t r) {
  const int lane = threadIdx.x % kWarpLanes, warp = threadIdx.x / kWarpLanes;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kDownWarps + warp; row < n;
       row += static_cast<int64_t>(gridDim.x) * kDownWarps) {
    for (int64_t i0 = 0; i0 < r; i0 += kDownRChunk) {
      const int count = static_cast<int>(r - i0 < kDownRChunk ? r - i0 : kDownRChunk);
      acc_t share[kDownRChunk];
      down_project_lane(x, lora_A, mask, row, lane, i0, count, share);
      MOSLORA_UNROLL
      for (int i = 0; i < kDownRChunk; ++i) {
        if (i < count) {  // count is the same in the whole warp: every lane takes part in the sum
          const acc_t sum = lane_sum(share[i]);
          if (lane == 0) u[row * r + i0 + i] = static_cast<scalar_t>(sum);
        }
      }
    }
  }
}

// Thread (column group, 8 rows of dA, row split): fp32 partial sums.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGroupThreads)
    dA_partial_kernel(Rows<const scalar_t> x, const scalar_t* __restrict__ du, int64_t r, DropoutMask<acc_t> mask,
                      int64_t n, DASplits splits, acc_t* __restrict__ partials) {
  dA_partial_thread(x, du, r, mask, n, splits, static_cast<int64_t>(blockIdx.x) * kGroupThreads + threadIdx.x,
                    static_cast<int64_t>(blockIdx.y) * kDARChunk, static_cast<int64_t>(blockIdx.z), partials);
}

// One thread per element of dA: the splits' sum in order.
template <typename scalar_t, typename acc_t>
__global__ void dA_reduce_kernel(const acc_t* __restrict__ partials, int64_t splits, int64_t rd,
                                 scalar_t* __restrict__ dA) {
  for (int64_t e = grid_start(); e < rd; e += grid_stride()) dA_reduce_element(partials, splits, rd, e, dA);
}

// Thread (column group, row), grid-stride over rows in y: no division.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGroupThreads)
    dX_kernel(const scalar_t* __restrict__ du, Rows<const scalar_t> lora_A, int64_t r, DropoutMask<acc_t> mask,
              Rows<scalar_t> dx, int64_t n) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kGroupThreads + threadIdx.x;
  if (group >= column_groups(dx)) return;
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) dX_group(du, lora_A, r, mask, dx, row, group);
}

// As dX_kernel.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGroupThreads)
    dropout_kernel(Rows<const scalar_t> x, Rows<scalar_t> out, DropoutMask<acc_t> mask, int64_t first_row,
                   int64_t n) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kGroupThreads + threadIdx.x;
  if (group >= column_groups(x)) return;
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) dropout_group(x, out, mask, first_row, row, group);
}

}  // namespace

template <>
void dropout_rows<c10::kCUDA>(const at::Tensor& x, const at::Tensor& out, const DropoutSpec& spec,
                              int64_t first_row) {
  const int64_t n = x.size(0);
  if (n == 0 || x.size(1) == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moslora_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Launch launch = row_group_launch(n, x.size(1));
    dropout_kernel<<<grid_of(launch), block_of(launch), 0, stream>>>(
        rows_of<const scalar_t>(x), rows_of<scalar_t>(out), mask_of<acc_t>(spec), first_row, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <>
at::Tensor dropout_project_down<c10::kCUDA>(const at::Tensor& x, const at::Tensor& lora_A,
                                            const DropoutSpec& spec) {
  const int64_t n = x.size(0), r = lora_A.size(0);
  auto u = at::empty({n, r}, x.options());
  if (n == 0) return u;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moslora_dropout_project_down", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Launch launch = down_project_launch(n);
    down_project_kernel<<<grid_of(launch), block_of(launch), 0, stream>>>(
        rows_of<const scalar_t>(x), rows_of<const scalar_t>(lora_A), mask_of<acc_t>(spec),
        u.mutable_data_ptr<scalar_t>(), n, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return u;
}

template <>
at::Tensor dropout_grads<c10::kCUDA>(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_A,
                                     const at::Tensor& dx, bool need_dA, const DropoutSpec& spec) {
  const int64_t n = x.size(0), d = x.size(1), r = du.size(1);
  at::Tensor dA;
  if (need_dA) dA = at::empty({r, d}, x.options());
  if (d == 0) return dA;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moslora_dropout_grads", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto mask = mask_of<acc_t>(spec);
    if (need_dA) {
      const DASplits splits = dA_splits(n, r, d);
      auto partials = at::empty({splits.count, r, d}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      const Launch partial = dA_partial_launch(splits, r, d), reduce = grid_stride_launch(r * d);
      dA_partial_kernel<<<grid_of(partial), block_of(partial), 0, stream>>>(
          rows_of<const scalar_t>(x), du.const_data_ptr<scalar_t>(), r, mask, n, splits,
          partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dA_reduce_kernel<<<grid_of(reduce), block_of(reduce), 0, stream>>>(
          partials.const_data_ptr<acc_t>(), splits.count, r * d, dA.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (dx.defined() && n > 0) {
      const Launch launch = row_group_launch(n, d);
      dX_kernel<<<grid_of(launch), block_of(launch), 0, stream>>>(
          du.const_data_ptr<scalar_t>(), rows_of<const scalar_t>(lora_A), r, mask, rows_of<scalar_t>(dx), n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return dA;
}

}  // namespace moslora
