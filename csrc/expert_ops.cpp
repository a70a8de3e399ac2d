// The expert-adapter operators: MoSLoRA adapters on a fused expert parameter
// (E experts, stacked), on the rows that the router sent to each expert.
// Device-generic: each expert's rows are one call of the dense operator
// (moslora_ext::forward / ::backward in adapter-only mode, so its fused mixer
// step, dropout kernels and GEMMs), so CPU and CUDA share this algorithm.
#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

namespace moslora {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The rows of expert e are [begin(e), end(e)) of x, as grouped_mm's offsets.
struct ExpertRows {
  std::vector<int64_t> ends;
  int64_t begin(size_t e) const { return e == 0 ? 0 : ends[e - 1]; }
  int64_t count(size_t e) const { return ends[e] - begin(e); }
};

ExpertRows expert_rows(const Tensor& offsets, int64_t rows, int64_t experts) {
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == experts && !at::isFloatingType(offsets.scalar_type()),
                    "moslora_ext: offsets must be a 1-D integer tensor with one entry per expert (", experts,
                    "), got dtype ", offsets.scalar_type(), " and shape ", offsets.sizes());
  // One host read of the offsets (a device sync on CUDA, as transformers' grouped fallback).
  const auto host = offsets.to(at::kCPU, at::kLong).contiguous();
  ExpertRows result{std::vector<int64_t>(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + experts)};
  int64_t previous = 0;
  for (int64_t end : result.ends) {
    TORCH_CHECK_VALUE(end >= previous, "moslora_ext: offsets must be non-decreasing cumulative row counts, got ",
                      host);
    previous = end;
  }
  TORCH_CHECK_VALUE(previous == rows, "moslora_ext: offsets must end at the number of rows of x (", rows,
                    "), got ", previous);
  return result;
}

// lora_A (E, r, d), mixer (E, r, r), lora_B (E, k, r) against x (S, d); the
// dense operator checks each expert's dtypes and devices again.
void check_expert_adapter(const Tensor& x, const Tensor& lora_A, const Tensor& mixer, const Tensor& lora_B) {
  TORCH_CHECK_VALUE(x.dim() == 2, "moslora_ext: x must be 2-D (rows, in_features), got shape ", x.sizes());
  TORCH_CHECK_VALUE(lora_A.dim() == 3 && mixer.dim() == 3 && lora_B.dim() == 3,
                    "moslora_ext: lora_A, mixer and lora_B must be 3-D (experts, ...), got ", lora_A.sizes(), ", ",
                    mixer.sizes(), " and ", lora_B.sizes());
  const int64_t e = lora_A.size(0), r = lora_A.size(1);
  TORCH_CHECK_VALUE(lora_A.size(2) == x.size(1), "moslora_ext: lora_A must have shape (experts, r, in_features) "
                    "with in_features = ", x.size(1), " (x has shape ", x.sizes(), "), got ", lora_A.sizes());
  TORCH_CHECK_VALUE(mixer.size(0) == e && mixer.size(1) == r && mixer.size(2) == r,
                    "moslora_ext: mixer must have shape (experts, r, r) = (", e, ", ", r, ", ", r, "), got ",
                    mixer.sizes());
  TORCH_CHECK_VALUE(lora_B.size(0) == e && lora_B.size(2) == r, "moslora_ext: lora_B must have shape (experts, "
                    "out_features, r) with experts = ", e, " and r = ", r, ", got ", lora_B.sizes());
}

// Expert e's own dropout seed, so that experts draw independent masks
// (the dense operator numbers each call's rows from 0).
OptTensor expert_seed(const OptTensor& seed, size_t e) {
  if (!seed.has_value() || !seed->defined()) return seed;
  const uint64_t mixed = dropout_seed_value(*seed) + 0x9E3779B97F4A7C15ull * (e + 1);
  return at::scalar_tensor(static_cast<int64_t>(mixed >> 2), at::TensorOptions().dtype(at::kLong));
}

std::tuple<Tensor, Tensor> experts_forward(const Tensor& base_out, const Tensor& x, const Tensor& offsets,
                                           const Tensor& lora_A, const Tensor& mixer, const Tensor& lora_B,
                                           double scale, double dropout_p, const OptTensor& dropout_seed) {
  check_expert_adapter(x, lora_A, mixer, lora_B);
  const int64_t rows = x.size(0), k = lora_B.size(1), r = lora_A.size(1);
  TORCH_CHECK_VALUE(base_out.dim() == 2 && base_out.size(0) == rows && base_out.size(1) == k,
                    "moslora_ext: base_out must have shape (rows, out_features) = (", rows, ", ", k, "), got ",
                    base_out.sizes());
  const auto experts = expert_rows(offsets, rows, lora_A.size(0));
  static const auto dense = c10::Dispatcher::singleton().findSchemaOrThrow("moslora_ext::forward", "").typed<
      std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                                 const Tensor&, double, double, const OptTensor&, const OptTensor&)>();
  const c10::DeviceGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the per-expert calls are this op's own work
  auto y = base_out.clone(at::MemoryFormat::Contiguous);
  auto u = at::zeros({rows, r}, x.options());
  for (size_t e = 0; e < experts.ends.size(); ++e) {
    const int64_t first = experts.begin(e), n = experts.count(e);
    if (n == 0) continue;  // an expert no token was routed to costs nothing
    auto [y_e, u_e] = dense.call(x.narrow(0, first, n), std::nullopt, std::nullopt, lora_A[e], mixer[e], lora_B[e],
                                 scale, dropout_p, expert_seed(dropout_seed, e), y.narrow(0, first, n));
    y.narrow(0, first, n).copy_(y_e);
    u.narrow(0, first, n).copy_(u_e);
  }
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> experts_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& offsets, const Tensor& lora_A, const Tensor& mixer,
    const Tensor& lora_B, const Tensor& u, double scale, double dropout_p, const OptTensor& dropout_seed,
    std::array<bool, 4> output_mask) {
  check_expert_adapter(x, lora_A, mixer, lora_B);
  const int64_t rows = x.size(0), k = lora_B.size(1), r = lora_A.size(1);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == k,
                    "moslora_ext: grad_out must have shape (", rows, ", ", k, "), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(u.dim() == 2 && u.size(0) == rows && u.size(1) == r, "moslora_ext: u must have shape (", rows,
                    ", ", r, ") as returned by experts_forward, got ", u.sizes());
  const auto experts = expert_rows(offsets, rows, lora_A.size(0));
  static const auto dense = c10::Dispatcher::singleton().findSchemaOrThrow("moslora_ext::backward", "").typed<
      std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                                                 const Tensor&, const Tensor&, const Tensor&, double, double,
                                                 const OptTensor&, std::array<bool, 4>)>();
  const c10::DeviceGuard guard(x.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto [need_dx, need_dA, need_dmixer, need_dB] = output_mask;
  // Experts without rows get zero gradients.
  Tensor dx = need_dx ? at::zeros_like(x, at::MemoryFormat::Contiguous) : Tensor();
  Tensor dA = need_dA ? at::zeros_like(lora_A, at::MemoryFormat::Contiguous) : Tensor();
  Tensor dmixer = need_dmixer ? at::zeros_like(mixer, at::MemoryFormat::Contiguous) : Tensor();
  Tensor dB = need_dB ? at::zeros_like(lora_B, at::MemoryFormat::Contiguous) : Tensor();
  for (size_t e = 0; e < experts.ends.size(); ++e) {
    const int64_t first = experts.begin(e), n = experts.count(e);
    if (n == 0) continue;
    auto [dx_e, dA_e, dmixer_e, dB_e] =
        dense.call(grad_out.narrow(0, first, n), x.narrow(0, first, n), std::nullopt, lora_A[e], mixer[e],
                   lora_B[e], u.narrow(0, first, n), scale, dropout_p, expert_seed(dropout_seed, e), output_mask);
    if (need_dx) dx.narrow(0, first, n).copy_(dx_e);
    if (need_dA) dA[e].copy_(dA_e);
    if (need_dmixer) dmixer[e].copy_(dmixer_e);
    if (need_dB) dB[e].copy_(dB_e);
  }
  return {dx, dA, dmixer, dB};
}

void register_expert_kernels(torch::Library& m) {
  m.impl("experts_forward", &experts_forward);
  m.impl("experts_backward", &experts_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(moslora_ext, CPU, m) {
  register_expert_kernels(m);
}

// On CUDA the per-expert calls run the dense operator's CUDA kernels (or its
// "built without CUDA kernels" refusal).
TORCH_LIBRARY_IMPL(moslora_ext, CUDA, m) {
  register_expert_kernels(m);
}

}  // namespace moslora
