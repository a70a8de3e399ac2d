// CUDA mixer step: V = U M^T forward; dU = dV M and dM = dV^T U backward in
// one pass over row chunks, then an ordered (deterministic)
// reduction of the per-chunk dM partials. Accumulation in fp32 for fp16/bf16.
#include "../device_kernels.h"
#include "../mixer_kernels.h"
#include "launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>

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
at::Tensor mixer_forward<c10::kCUDA>(const at::Tensor& u, const at::Tensor& mixer) {
  auto v = at::empty_like(u);
  const int64_t n = u.size(0), r = u.size(1);
  if (n == 0) return v;
  const c10::cuda::CUDAGuard guard(u.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "moslora_mixer_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Launch launch = grid_stride_launch(n * r);
    mixer_forward_kernel<scalar_t, acc_t><<<grid_of(launch), block_of(launch), 0, stream>>>(
        u.const_data_ptr<scalar_t>(), mixer.const_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(), n, r);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return v;
}

template <>
std::tuple<at::Tensor, at::Tensor> mixer_backward<c10::kCUDA>(
    const at::Tensor& dv, const at::Tensor& u, const at::Tensor& mixer, bool need_dmixer) {
  auto du = at::empty_like(dv);
  const int64_t n = dv.size(0), r = dv.size(1);
  at::Tensor dmixer = need_dmixer ? at::empty({r, r}, dv.options()) : at::Tensor();
  if (n == 0) {
    if (need_dmixer) dmixer.zero_();
    return {du, dmixer};
  }
  const c10::cuda::CUDAGuard guard(dv.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const RowChunks chunks = mixer_row_chunks(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dv.scalar_type(), "moslora_mixer_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partials;
    if (need_dmixer) {
      partials = at::empty({chunks.count, r, r}, dv.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    }
    acc_t* partials_ptr = need_dmixer ? partials.mutable_data_ptr<acc_t>() : nullptr;
    const Launch launch = mixer_backward_launch(chunks);
    mixer_backward_kernel<scalar_t, acc_t><<<grid_of(launch), block_of(launch), 0, stream>>>(
        dv.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), mixer.const_data_ptr<scalar_t>(),
        du.mutable_data_ptr<scalar_t>(), partials_ptr, n, r, chunks.rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_dmixer) {
      const Launch reduce = grid_stride_launch(r * r);
      reduce_partials_kernel<scalar_t, acc_t><<<grid_of(reduce), block_of(reduce), 0, stream>>>(
          partials_ptr, dmixer.mutable_data_ptr<scalar_t>(), chunks.count, r * r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {du, dmixer};
}

}  // namespace moslora
