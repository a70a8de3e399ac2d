// CUDA mixer step: V = s * U M^T forward; dU = s * dV M and dM = s * dV^T U
// backward in one pass over row chunks, then an ordered (deterministic)
// reduction of the per-chunk dM partials. Accumulation in fp32 for fp16/bf16.
#include "../kernel_math.h"
#include "../kernels.h"
#include "launch.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>

namespace moslora {
namespace {

// One thread computes one element V[row, i] of the N x r output.
template <typename scalar_t, typename acc_t>
__global__ void mixer_forward_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ mixer,
                                     scalar_t* __restrict__ v, int64_t n, int64_t r, acc_t scale) {
  for (int64_t idx = grid_start(); idx < n * r; idx += grid_stride()) {
    const int64_t row = idx / r, i = idx % r;
    v[idx] = static_cast<scalar_t>(scale * strided_dot<acc_t>(u + row * r, 1, mixer + i * r, 1, r));
  }
}

// One block owns one chunk of rows: its threads compute dU for those rows,
// then the chunk's unscaled partial dV^T U (r x r) into partials[chunk].
template <typename scalar_t, typename acc_t>
__global__ void mixer_backward_kernel(const scalar_t* __restrict__ dv, const scalar_t* __restrict__ u,
                                      const scalar_t* __restrict__ mixer, scalar_t* __restrict__ du,
                                      acc_t* __restrict__ partials, int64_t n, int64_t r,
                                      int64_t chunk, acc_t scale) {
  const int64_t first = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t rows = min(chunk, n - first);
  for (int64_t idx = threadIdx.x; idx < rows * r; idx += blockDim.x) {
    const int64_t row = first + idx / r, j = idx % r;
    du[row * r + j] = static_cast<scalar_t>(scale * strided_dot<acc_t>(dv + row * r, 1, mixer + j, r, r));
  }
  if (partials == nullptr) return;
  for (int64_t idx = threadIdx.x; idx < r * r; idx += blockDim.x) {
    const int64_t i = idx / r, j = idx % r;
    partials[blockIdx.x * r * r + idx] =
        strided_dot<acc_t>(dv + first * r + i, r, u + first * r + j, r, rows);
  }
}

// One thread sums one element of dM over the chunk partials, in chunk order.
template <typename scalar_t, typename acc_t>
__global__ void reduce_partials_kernel(const acc_t* __restrict__ partials, scalar_t* __restrict__ dmixer,
                                       int64_t n_chunks, int64_t rr, acc_t scale) {
  for (int64_t idx = grid_start(); idx < rr; idx += grid_stride()) {
    acc_t sum = acc_t(0);
    for (int64_t c = 0; c < n_chunks; ++c) sum += partials[c * rr + idx];
    dmixer[idx] = static_cast<scalar_t>(scale * sum);
  }
}

}  // namespace

template <>
at::Tensor mixer_forward<c10::kCUDA>(const at::Tensor& u, const at::Tensor& mixer, double scale) {
  auto v = at::empty_like(u);
  const int64_t n = u.size(0), r = u.size(1);
  if (n == 0) return v;
  const c10::cuda::CUDAGuard guard(u.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "moslora_mixer_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    mixer_forward_kernel<scalar_t, acc_t><<<grid_for(n * r), kThreads, 0, stream>>>(
        u.const_data_ptr<scalar_t>(), mixer.const_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(),
        n, r, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return v;
}

template <>
std::tuple<at::Tensor, at::Tensor> mixer_backward<c10::kCUDA>(
    const at::Tensor& dv, const at::Tensor& u, const at::Tensor& mixer, double scale, bool need_dmixer) {
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
    mixer_backward_kernel<scalar_t, acc_t><<<static_cast<unsigned int>(chunks.count), kThreads, 0, stream>>>(
        dv.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), mixer.const_data_ptr<scalar_t>(),
        du.mutable_data_ptr<scalar_t>(), partials_ptr, n, r, chunks.rows, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_dmixer) {
      reduce_partials_kernel<scalar_t, acc_t><<<grid_for(r * r), kThreads, 0, stream>>>(
          partials_ptr, dmixer.mutable_data_ptr<scalar_t>(), chunks.count, r * r, static_cast<acc_t>(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {du, dmixer};
}

}  // namespace moslora
