// CUDA mixer step: V = U M^T forward; dU = dV M and dM = dV^T U backward in
// one pass over row chunks, then an ordered (deterministic)
// reduction of the per-chunk dM partials. Accumulation in fp32 for fp16/bf16.
#include "../device_kernels.h"
#include "../mixer_kernels.h"
#include "launch.cuh"

#include <torch/csrc/stable/ops.h>


namespace moslora {
namespace {

// One thread per element of V, grid-stride.
template <typename scalar_t, typename acc_t>
__global__ void mixer_forward_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ mixer,
                                     scalar_t* __restrict__ v, int64_t n, int64_t r) {
  for (int64_t idx = grid_start(); idx < n * r; idx += grid_stride()) mixer_forward_element<acc_t>(u, mixer, v, r, idx);
}

// One block per chunk of rows: dU of its rows and the chunk's dM partial.
template <typename scalar_t, typename acc_t>
__global__ void mixer_backward_kernel(const scalar_t* __restrict__ dv, const scalar_t* __restrict__ u,
                                      const scalar_t* __restrict__ mixer, scalar_t* __restrict__ du,
                                      acc_t* __restrict__ partials, int64_t n, int64_t r, int64_t chunk) {
  mixer_backward_thread(dv, u, mixer, du, partials, n, r, chunk, static_cast<int64_t>(blockIdx.x),
                        static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(blockDim.x));
}

// One thread per element of dM, grid-stride.
template <typename scalar_t, typename acc_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ partials, scalar_t* __restrict__ dmixer,
                                       int64_t n_chunks, int64_t rr) {
  for (int64_t idx = grid_start(); idx < rr; idx += grid_stride()) {
    reduce_partials_element(partials, dmixer, n_chunks, rr, idx);
  }
}

}  // namespace

template <>
Tensor mixer_forward<DeviceType::CUDA>(const Tensor& u, const Tensor& mixer) {
  auto v = torch::stable::empty_like(u);
  const int64_t n = u.size(0), r = u.size(1);
  if (n == 0) return v;
  const DeviceGuard guard(u);
  const cudaStream_t stream = current_cuda_stream(u.get_device_index());
  MOSLORA_DISPATCH_FLOATING(u.scalar_type(), "moslora_mixer_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const Launch launch = grid_stride_launch(n * r);
    mixer_forward_kernel<scalar_t, acc_t><<<grid_of(launch), block_of(launch), 0, stream>>>(
        u.const_data_ptr<scalar_t>(), mixer.const_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(), n, r);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return v;
}

template <>
std::tuple<Tensor, Tensor> mixer_backward<DeviceType::CUDA>(
    const Tensor& dv, const Tensor& u, const Tensor& mixer, bool need_dmixer) {
  auto du = torch::stable::empty_like(dv);
  const int64_t n = dv.size(0), r = dv.size(1);
  Tensor dmixer = need_dmixer ? torch::stable::new_empty(dv, {r, r}) : Tensor();
  if (n == 0) {
    if (need_dmixer) torch::stable::zero_(dmixer);
    return {du, dmixer};
  }
  const DeviceGuard guard(dv);
  const cudaStream_t stream = current_cuda_stream(dv.get_device_index());
  const RowChunks chunks = mixer_row_chunks(n);
  MOSLORA_DISPATCH_FLOATING(dv.scalar_type(), "moslora_mixer_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    Tensor partials;
    if (need_dmixer) {
      partials = torch::stable::new_empty(dv, {chunks.count, r, r}, opmath_type(dv.scalar_type()));  // of acc_t
    }
    acc_t* partials_ptr = need_dmixer ? partials.mutable_data_ptr<acc_t>() : nullptr;
    const Launch launch = mixer_backward_launch(chunks);
    mixer_backward_kernel<scalar_t, acc_t><<<grid_of(launch), block_of(launch), 0, stream>>>(
        dv.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), mixer.const_data_ptr<scalar_t>(),
        du.mutable_data_ptr<scalar_t>(), partials_ptr, n, r, chunks.rows);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_dmixer) {
      const Launch reduce = grid_stride_launch(r * r);
      reduce_partials_kernel<scalar_t, acc_t><<<grid_of(reduce), block_of(reduce), 0, stream>>>(
          partials_ptr, dmixer.mutable_data_ptr<scalar_t>(), chunks.count, r * r);
      STD_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {du, dmixer};
}

}  // namespace moslora
