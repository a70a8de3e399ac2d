// The expert-adapter operators: MoSLoRA adapters on a fused expert parameter
// (E experts, stacked), on the rows that the router sent to each expert.
// Device-generic: each expert's rows are one call of the dense operator's
// kernel (linear_ops.h: forward / backward in adapter-only mode, so its fused
// mixer step, dropout kernels and GEMMs), so CPU and CUDA share this algorithm.
#include "checks.h"
#include "linear_ops.h"

#include <torch/csrc/stable/library.h>

#include <vector>

namespace moslora {
namespace {

using OptTensor = std::optional<Tensor>;

// The rows of expert e are [begin(e), end(e)) of x, as grouped_mm's offsets.
struct ExpertRows {
  std::vector<int64_t> ends;
  int64_t begin(size_t e) const { return e == 0 ? 0 : ends[e - 1]; }
  int64_t count(size_t e) const { return ends[e] - begin(e); }
};

ExpertRows expert_rows(const Tensor& offsets, int64_t rows, int64_t experts) {
  MOSLORA_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == experts && !is_floating(offsets.scalar_type()),
                      "moslora_ext: offsets must be a 1-D integer tensor with one entry per expert (", experts,
                      "), got dtype ", offsets.scalar_type(), " and shape ", offsets.sizes());
  // One host read of the offsets (a device sync on CUDA, as transformers' grouped fallback).
  const auto host = torch::stable::contiguous(torch::stable::to(
      offsets, ScalarType::Long, std::nullopt, torch::stable::Device(DeviceType::CPU)));
  const int64_t* data = host.const_data_ptr<int64_t>();
  ExpertRows result{std::vector<int64_t>(data, data + experts)};
  int64_t previous = 0;
  for (int64_t end : result.ends) {
    MOSLORA_CHECK_VALUE(end >= previous, "moslora_ext: offsets must be non-decreasing cumulative row counts, got ",
                        torch::headeronly::IntHeaderOnlyArrayRef(result.ends));
    previous = end;
  }
  MOSLORA_CHECK_VALUE(previous == rows, "moslora_ext: offsets must end at the number of rows of x (", rows,
                      "), got ", previous);
  return result;
}

// lora_A (E, r, d), mixer (E, r, r), lora_B (E, k, r) against x (S, d); the
// dense kernel checks each expert's dtypes and devices again.
void check_expert_adapter(const Tensor& x, const Tensor& lora_A, const Tensor& mixer, const Tensor& lora_B) {
  MOSLORA_CHECK_VALUE(x.dim() == 2, "moslora_ext: x must be 2-D (rows, in_features), got shape ", x.sizes());
  MOSLORA_CHECK_VALUE(lora_A.dim() == 3 && mixer.dim() == 3 && lora_B.dim() == 3,
                      "moslora_ext: lora_A, mixer and lora_B must be 3-D (experts, ...), got ", lora_A.sizes(), ", ",
                      mixer.sizes(), " and ", lora_B.sizes());
  const int64_t e = lora_A.size(0), r = lora_A.size(1);
  MOSLORA_CHECK_VALUE(lora_A.size(2) == x.size(1), "moslora_ext: lora_A must have shape (experts, r, in_features) "
                      "with in_features = ", x.size(1), " (x has shape ", x.sizes(), "), got ", lora_A.sizes());
  MOSLORA_CHECK_VALUE(mixer.size(0) == e && mixer.size(1) == r && mixer.size(2) == r,
                      "moslora_ext: mixer must have shape (experts, r, r) = (", e, ", ", r, ", ", r, "), got ",
                      mixer.sizes());
  MOSLORA_CHECK_VALUE(lora_B.size(0) == e && lora_B.size(2) == r, "moslora_ext: lora_B must have shape (experts, "
                      "out_features, r) with experts = ", e, " and r = ", r, ", got ", lora_B.sizes());
}

// Expert e's own dropout seed, so that experts draw independent masks
// (the dense kernel numbers each call's rows from 0).
OptTensor expert_seed(const OptTensor& seed, size_t e) {
  if (!seed.has_value() || !seed->defined()) return seed;
  const uint64_t mixed = dropout_seed_value(*seed) + 0x9E3779B97F4A7C15ull * (e + 1);
  auto result = torch::stable::new_empty(*seed, {});
  *result.mutable_data_ptr<int64_t>() = static_cast<int64_t>(mixed >> 2);
  return result;
}

Tensor rows_of_expert(const Tensor& t, const ExpertRows& experts, size_t e) {
  return row_range(t, experts.begin(e), experts.count(e));
}

std::tuple<Tensor, Tensor> experts_forward(const Tensor& base_out, const Tensor& x, const Tensor& offsets,
                                           const Tensor& lora_A, const Tensor& mixer, const Tensor& lora_B,
                                           double scale, double dropout_p, const OptTensor& dropout_seed) {
  check_expert_adapter(x, lora_A, mixer, lora_B);
  const int64_t rows = x.size(0), k = lora_B.size(1), r = lora_A.size(1);
  MOSLORA_CHECK_VALUE(base_out.dim() == 2 && base_out.size(0) == rows && base_out.size(1) == k,
                      "moslora_ext: base_out must have shape (rows, out_features) = (", rows, ", ", k, "), got ",
                      base_out.sizes());
  const auto experts = expert_rows(offsets, rows, lora_A.size(0));
  const DeviceGuard guard(x);
  auto y = torch::stable::contiguous(torch::stable::clone(base_out));
  auto u = torch::stable::new_zeros(x, {rows, r});
  for (size_t e = 0; e < experts.ends.size(); ++e) {
    if (experts.count(e) == 0) continue;  // an expert no token was routed to costs nothing
    auto y_rows = rows_of_expert(y, experts, e);
    auto [y_e, u_e] = forward(rows_of_expert(x, experts, e), std::nullopt, std::nullopt,
                              torch::stable::select(lora_A, 0, e), torch::stable::select(mixer, 0, e),
                              torch::stable::select(lora_B, 0, e), scale, dropout_p, expert_seed(dropout_seed, e),
                              y_rows);
    copy_into(y_rows, y_e);
    copy_into(rows_of_expert(u, experts, e), u_e);
  }
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> experts_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& offsets, const Tensor& lora_A, const Tensor& mixer,
    const Tensor& lora_B, const Tensor& u, double scale, double dropout_p, const OptTensor& dropout_seed,
    std::vector<bool> output_mask) {
  check_expert_adapter(x, lora_A, mixer, lora_B);
  const int64_t rows = x.size(0), k = lora_B.size(1), r = lora_A.size(1);
  MOSLORA_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == k,
                      "moslora_ext: grad_out must have shape (", rows, ", ", k, "), got ", grad_out.sizes());
  MOSLORA_CHECK_VALUE(u.dim() == 2 && u.size(0) == rows && u.size(1) == r, "moslora_ext: u must have shape (", rows,
                      ", ", r, ") as returned by experts_forward, got ", u.sizes());
  const auto experts = expert_rows(offsets, rows, lora_A.size(0));
  const DeviceGuard guard(x);
  // Experts without rows get zero gradients.
  auto zeros_if = [](bool needed, const Tensor& like) { return needed ? torch::stable::new_zeros(like, like.sizes()) : Tensor(); };
  Tensor dx = zeros_if(output_mask[0], x), dA = zeros_if(output_mask[1], lora_A),
         dmixer = zeros_if(output_mask[2], mixer), dB = zeros_if(output_mask[3], lora_B);
  for (size_t e = 0; e < experts.ends.size(); ++e) {
    if (experts.count(e) == 0) continue;
    auto [dx_e, dA_e, dmixer_e, dB_e] =
        backward(rows_of_expert(grad_out, experts, e), rows_of_expert(x, experts, e), std::nullopt,
                 torch::stable::select(lora_A, 0, e), torch::stable::select(mixer, 0, e),
                 torch::stable::select(lora_B, 0, e), rows_of_expert(u, experts, e), scale, dropout_p,
                 expert_seed(dropout_seed, e), output_mask);
    if (dx.defined()) copy_into(rows_of_expert(dx, experts, e), dx_e);
    if (dA.defined()) copy_into(torch::stable::select(dA, 0, e), dA_e);
    if (dmixer.defined()) copy_into(torch::stable::select(dmixer, 0, e), dmixer_e);
    if (dB.defined()) copy_into(torch::stable::select(dB, 0, e), dB_e);
  }
  return {dx, dA, dmixer, dB};
}

}  // namespace
}  // namespace moslora

STABLE_TORCH_LIBRARY_IMPL(moslora_ext, CPU, m) {
  m.impl("experts_forward", TORCH_BOX(&moslora::experts_forward));
  m.impl("experts_backward", TORCH_BOX(&moslora::experts_backward));
}

#ifdef WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(moslora_ext, CUDA, m) {
  m.impl("experts_forward", TORCH_BOX(&moslora::experts_forward));
  m.impl("experts_backward", TORCH_BOX(&moslora::experts_backward));
}
#endif
