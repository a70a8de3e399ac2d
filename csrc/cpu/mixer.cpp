// CPU mixer step: V = U M^T forward; dU = dV M and dM = dV^T U backward,
// fused into one pass over row chunks. The loop bodies are those of the CUDA
// kernels (mixer_kernels.h): the CPU runs each row chunk as one block of one
// thread, chunks in parallel, so both devices sum in the same order.
#include "../device_kernels.h"
#include "../mixer_kernels.h"


#include <torch/csrc/stable/ops.h>

#include <vector>

namespace moslora {

template <>
Tensor mixer_forward<DeviceType::CPU>(const Tensor& u, const Tensor& mixer) {
  auto v = torch::stable::empty_like(u);
  const int64_t n = u.size(0), r = u.size(1);
  MOSLORA_DISPATCH_FLOATING(u.scalar_type(), "moslora_mixer_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* m_ptr = mixer.const_data_ptr<scalar_t>();
    scalar_t* v_ptr = v.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainSize / (r * r));
    torch::stable::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin * r; idx < end * r; ++idx) mixer_forward_element<acc_t>(u_ptr, m_ptr, v_ptr, r, idx);
    });
  });
  return v;
}

template <>
std::tuple<Tensor, Tensor> mixer_backward<DeviceType::CPU>(
    const Tensor& dv, const Tensor& u, const Tensor& mixer, bool need_dmixer) {
  auto du = torch::stable::empty_like(dv);
  const int64_t n = dv.size(0), r = dv.size(1);
  const RowChunks chunks = mixer_row_chunks(n);
  Tensor dmixer;
  MOSLORA_DISPATCH_FLOATING(dv.scalar_type(), "moslora_mixer_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* dv_ptr = dv.const_data_ptr<scalar_t>();
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* m_ptr = mixer.const_data_ptr<scalar_t>();
    scalar_t* du_ptr = du.mutable_data_ptr<scalar_t>();
    // partials[c] = dV[rows of c]^T U[rows of c], in acc_t.
    std::vector<acc_t> partials(need_dmixer ? chunks.count * r * r : 0);
    acc_t* partials_ptr = need_dmixer ? partials.data() : nullptr;
    torch::stable::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        mixer_backward_thread(dv_ptr, u_ptr, m_ptr, du_ptr, partials_ptr, n, r, chunks.rows, c, /*thread=*/0,
                              /*threads=*/1);
      }
    });
    if (!need_dmixer) return;
    dmixer = torch::stable::new_empty(dv, {r, r});
    scalar_t* dm_ptr = dmixer.mutable_data_ptr<scalar_t>();
    for (int64_t idx = 0; idx < r * r; ++idx) reduce_partials_element(partials_ptr, dm_ptr, chunks.count, r * r, idx);
  });
  return {du, dmixer};
}

}  // namespace moslora
