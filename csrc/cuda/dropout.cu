// CUDA dropout passes, one pass over their rows with the mask regenerated in
// registers: the bodies of dropout_kernels.h over their grids (which the host
// test runs too). dropout_matmul.cpp runs them on tiles for the GEMMs.
#include "../device_kernels.h"
#include "launch.cuh"

#include <torch/csrc/stable/ops.h>


namespace moslora {
namespace {

// Thread (column group, row), grid-stride over rows in y: no division.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGroupThreads)
    dropout_kernel(Rows<const scalar_t> x, Rows<scalar_t> out, DropoutMask<acc_t> mask, int64_t first_row,
                   int64_t n) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kGroupThreads + threadIdx.x;
  if (group >= column_groups(x)) return;
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) dropout_group(x, out, mask, first_row, row, group);
}

// As dropout_kernel; both outputs from one draw of the group's mask.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kGroupThreads)
    dropout_pair_kernel(Rows<const scalar_t> x, Rows<scalar_t> dropped, Rows<scalar_t> dx, DropoutMask<acc_t> mask,
                        int64_t first_row, int64_t n) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kGroupThreads + threadIdx.x;
  if (group >= column_groups(x)) return;
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    dropout_pair_group(x, dropped, dx, mask, first_row, row, group);
  }
}

}  // namespace

template <>
void dropout_rows<DeviceType::CUDA>(const Tensor& x, const Tensor& out, const DropoutSpec& spec,
                              int64_t first_row) {
  const int64_t n = x.size(0);
  if (n == 0 || x.size(1) == 0) return;
  const DeviceGuard guard(x);
  const cudaStream_t stream = current_cuda_stream(x.get_device_index());
  MOSLORA_DISPATCH_FLOATING(x.scalar_type(), "moslora_dropout", [&] {
    using acc_t = opmath_t<scalar_t>;
    const Launch launch = row_group_launch(n, x.size(1));
    dropout_kernel<<<grid_of(launch), block_of(launch), 0, stream>>>(
        rows_of<const scalar_t>(x), rows_of<scalar_t>(out), mask_of<acc_t>(spec), first_row, n);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <>
void dropout_pair_rows<DeviceType::CUDA>(const Tensor& x, const Tensor& dropped, const Tensor& dx,
                                   const DropoutSpec& spec, int64_t first_row) {
  const int64_t n = x.size(0);
  if (n == 0 || x.size(1) == 0 || (!dropped.defined() && !dx.defined())) return;
  const DeviceGuard guard(x);
  const cudaStream_t stream = current_cuda_stream(x.get_device_index());
  MOSLORA_DISPATCH_FLOATING(x.scalar_type(), "moslora_dropout_pair", [&] {
    using acc_t = opmath_t<scalar_t>;
    const Launch launch = row_group_launch(n, x.size(1));
    dropout_pair_kernel<<<grid_of(launch), block_of(launch), 0, stream>>>(
        rows_of<const scalar_t>(x), dropped.defined() ? rows_of<scalar_t>(dropped) : Rows<scalar_t>{},
        dx.defined() ? rows_of<scalar_t>(dx) : Rows<scalar_t>{}, mask_of<acc_t>(spec), first_row, n);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace moslora
