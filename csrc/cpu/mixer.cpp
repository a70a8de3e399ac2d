// CPU mixer step: V = U M^T forward; dU = dV M and dM = dV^T U backward,
// fused into one pass over row chunks.
#include "../mixer_kernels.h"
#include "../device_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace moslora {

template <>
at::Tensor mixer_forward<c10::kCPU>(const at::Tensor& u, const at::Tensor& mixer) {
  auto v = at::empty_like(u);
  const int64_t n = u.size(0), r = u.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "moslora_mixer_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* m_ptr = mixer.const_data_ptr<scalar_t>();
    scalar_t* v_ptr = v.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / (r * r));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t i = 0; i < r; ++i) {
          v_ptr[row * r + i] = static_cast<scalar_t>(strided_dot<acc_t>(u_ptr + row * r, 1, m_ptr + i * r, 1, r));
        }
      }
    });
  });
  return v;
}

template <>
std::tuple<at::Tensor, at::Tensor> mixer_backward<c10::kCPU>(
    const at::Tensor& dv, const at::Tensor& u, const at::Tensor& mixer, bool need_dmixer) {
  auto du = at::empty_like(dv);
  const int64_t n = dv.size(0), r = dv.size(1);
  const RowChunks chunks = mixer_row_chunks(n);
  at::Tensor dmixer;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dv.scalar_type(), "moslora_mixer_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dv_ptr = dv.const_data_ptr<scalar_t>();
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* m_ptr = mixer.const_data_ptr<scalar_t>();
    scalar_t* du_ptr = du.mutable_data_ptr<scalar_t>();
    // partials[c] = dV[rows of c]^T U[rows of c], in acc_t.
    std::vector<acc_t> partials(need_dmixer ? chunks.count * r * r : 0);
    at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t first = c * chunks.rows, rows = std::min(chunks.rows, n - first);
        for (int64_t row = first; row < first + rows; ++row) {
          for (int64_t j = 0; j < r; ++j) {
            du_ptr[row * r + j] = static_cast<scalar_t>(strided_dot<acc_t>(dv_ptr + row * r, 1, m_ptr + j, r, r));
          }
        }
        if (!need_dmixer) continue;
        for (int64_t i = 0; i < r; ++i) {
          for (int64_t j = 0; j < r; ++j) {
            partials[(c * r + i) * r + j] = strided_dot<acc_t>(
                dv_ptr + first * r + i, r, u_ptr + first * r + j, r, rows);
          }
        }
      }
    });
    if (!need_dmixer) return;
    dmixer = at::empty({r, r}, dv.options());
    scalar_t* dm_ptr = dmixer.mutable_data_ptr<scalar_t>();
    for (int64_t ij = 0; ij < r * r; ++ij) {
      acc_t sum = acc_t(0);
      for (int64_t c = 0; c < chunks.count; ++c) sum += partials[c * r * r + ij];
      dm_ptr[ij] = static_cast<scalar_t>(sum);
    }
  });
  return {du, dmixer};
}

}  // namespace moslora
