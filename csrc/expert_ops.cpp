// The expert-adapter operators: MoSLoRA adapters on a fused expert parameter
// (E experts, stacked), on the rows that the router sent to each expert.
// Device-generic, and one pass over all experts: every product with the
// routed rows is one grouped GEMM (aten::_grouped_mm with the routing
// offsets) and the mixer steps are batched GEMMs over the experts (B_e M_e
// once per call), so a training step issues the same number of GEMM calls
// for 8 experts as for 256, and nothing reads the offsets on the host. The
// dropout mask is regenerated in backward, as the dense operator does.
#include "checks.h"
#include "device_kernels.h"
#include "op_guards.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

namespace moslora {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------
// Grouped products over the experts' rows
// ---------------------------------------------------------------------------

// A copy of t whose strides are multiples of 16 bytes and whose data starts
// on a 16-byte boundary, as aten::_grouped_mm needs (t itself when they
// are): the last dimension's rows are padded, the values and shape kept.
Tensor aligned(const Tensor& t) {
  const int64_t unit = 16 / t.element_size();
  bool ok = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int64_t dim = 0; dim < t.dim(); ++dim) {
    ok = ok && (t.size(dim) == 1 || t.stride(dim) == 1 || t.stride(dim) % unit == 0);
  }
  if (ok) return t;
  auto sizes = t.sizes().vec();
  const int64_t last = sizes.back();
  sizes.back() = (last + unit - 1) / unit * unit;
  auto copy = at::empty(sizes, t.options()).narrow(-1, 0, last);
  copy.copy_(t);
  return copy;
}

// Whether aten::_grouped_mm runs for this device and dtype: tried once per
// (device, dtype) on a small case, then remembered. Where it does not (a
// torch without it, float64, a GPU or dtype its kernels lack), the products
// loop over the experts instead.
bool grouped_mm_runs(const Tensor& x) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, bool> known;
  const auto key = std::make_tuple(static_cast<int>(x.device().type()), static_cast<int>(x.device().index()),
                                   static_cast<int>(x.scalar_type()));
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto found = known.find(key); found != known.end()) return found->second;
  bool runs = true;
  try {
    const auto options = x.options();
    const auto offsets = at::arange(8, 17, 8, options.dtype(at::kInt));  // two experts of 8 rows
    const auto rows = at::zeros({16, 16}, options);
    at::_grouped_mm(rows, at::zeros({2, 16, 16}, options).transpose(1, 2), offsets);
    at::_grouped_mm(rows.t(), rows, offsets);
  } catch (const c10::Error&) {
    runs = false;
  }
  known.emplace(key, runs);
  return runs;
}

// The rows of the experts: rows [ends[e-1], ends[e]) of x are expert e's
// (grouped_mm's offsets). `offsets` stays on x's device; `ends` is read to
// the host only for the loop over experts.
struct ExpertRows {
  Tensor offsets;  // int32, on x's device
  bool grouped;
  std::vector<int64_t> ends;

  // The rows [first, first + count) of the same rows, each expert's clipped to them.
  ExpertRows tile(int64_t first, int64_t count) const {
    ExpertRows part{(offsets - first).clamp(0, count), grouped, ends};
    for (auto& end : part.ends) end = std::clamp<int64_t>(end - first, 0, count);
    return part;
  }
  int64_t begin(size_t e) const { return e == 0 ? 0 : ends[e - 1]; }
};

// (S, n): each expert's rows of a (S, m) times its matrix b[e] (m, n).
Tensor rows_times(const Tensor& a, const Tensor& b, const ExpertRows& experts) {
  if (experts.grouped) return at::_grouped_mm(aligned(a), aligned(b), experts.offsets);
  auto out = at::empty({a.size(0), b.size(2)}, a.options());
  for (size_t e = 0; e < experts.ends.size(); ++e) {
    const int64_t first = experts.begin(e), n = experts.ends[e] - first;
    if (n == 0) continue;
    auto out_e = out.narrow(0, first, n);
    at::mm_out(out_e, a.narrow(0, first, n), b[e]);
  }
  return out;
}

// (E, m, n): for each expert, a_t (m, S)'s columns of its rows times b (S, n)'s
// rows of its rows (zero for an expert without rows).
Tensor per_expert_sums(const Tensor& a_t, const Tensor& b, const ExpertRows& experts) {
  if (experts.grouped) return at::_grouped_mm(aligned(a_t), aligned(b), experts.offsets);
  auto out = at::zeros({static_cast<int64_t>(experts.ends.size()), a_t.size(0), b.size(1)}, b.options());
  for (size_t e = 0; e < experts.ends.size(); ++e) {
    const int64_t first = experts.begin(e), n = experts.ends[e] - first;
    if (n == 0) continue;
    auto out_e = out[e];
    at::mm_out(out_e, a_t.narrow(1, first, n), b.narrow(0, first, n));
  }
  return out;
}

// The products under dropout (dropout_matmul.cpp) with expert e's lora_A on its rows.
RowProducts expert_products(const Tensor& lora_A, const ExpertRows& experts) {
  return RowProducts{
      [lora_A, experts](const Tensor& tile, int64_t first, Tensor out) {
        out.copy_(rows_times(tile, lora_A.transpose(1, 2), experts.tile(first, tile.size(0))));
      },
      [lora_A, experts](const Tensor& du_tile, int64_t first, Tensor out) {
        out.copy_(rows_times(du_tile, lora_A, experts.tile(first, du_tile.size(0))));
      },
      // A half-precision tile's product is rounded once before dA (fp32) adds it up.
      [experts](Tensor& dA, const Tensor& du_tile_t, const Tensor& tile, int64_t first, bool) {
        dA.add_(per_expert_sums(du_tile_t, tile, experts.tile(first, tile.size(0))));
      }};
}

// ---------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------

// lora_A (E, r, d), mixer (E, r, r), lora_B (E, k, r) against x (S, d), with
// the dtype, device, scale and dropout checks of the dense operator; returns
// the dropout mask spec.
DropoutSpec check_expert_adapter(const Tensor& x, const Tensor& lora_A, const Tensor& mixer, const Tensor& lora_B,
                                 double scale, double dropout_p, const OptTensor& dropout_seed) {
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
  if (dropout_seed.has_value() && dropout_seed->defined()) dropout_seed_value(*dropout_seed);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "moslora_ext: x must be a floating point tensor, got dtype ",
                   x.scalar_type());
  check_same_dtype_device(x, "x", lora_A, "lora_A");
  check_same_dtype_device(x, "x", mixer, "mixer");
  check_same_dtype_device(x, "x", lora_B, "lora_B");
  check_scale(scale, at::toOpMathType(x.scalar_type()));
  return dropout_spec(dropout_p, dropout_seed);
}

// The experts' rows from offsets (E,), grouped_mm's cumulative row counts.
// Offsets on the CPU have their values checked (non-decreasing, ending at
// x's rows); on a GPU that would be a host read, so there they are the
// caller's contract, as for aten::_grouped_mm (the loop over experts, which
// reads them anyway, checks them too).
ExpertRows expert_rows(const Tensor& offsets, const Tensor& x, int64_t experts) {
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == experts && !at::isFloatingType(offsets.scalar_type()),
                    "moslora_ext: offsets must be a 1-D integer tensor with one entry per expert (", experts,
                    "), got dtype ", offsets.scalar_type(), " and shape ", offsets.sizes());
  const bool grouped = grouped_mm_runs(x);
  ExpertRows rows{offsets.to(x.device(), at::kInt), grouped, {}};
  if (grouped && !offsets.is_cpu()) return rows;
  const auto host = offsets.to(at::kCPU, at::kLong).contiguous();
  rows.ends.assign(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + experts);
  int64_t previous = 0;
  for (int64_t end : rows.ends) {
    TORCH_CHECK_VALUE(end >= previous, "moslora_ext: offsets must be non-decreasing cumulative row counts, got ",
                      host);
    previous = end;
  }
  TORCH_CHECK_VALUE(previous == x.size(0), "moslora_ext: offsets must end at the number of rows of x (", x.size(0),
                    "), got ", previous);
  return rows;
}

// x with unit column stride, as the dropout kernels read it.
Tensor unit_columns(const Tensor& x) {
  return x.stride(1) == 1 ? x : x.contiguous();
}

// ---------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------

// y = base_out + s * U (B_e M_e)^T on expert e's rows, U = dropout(x) A_e^T.
std::tuple<Tensor, Tensor> experts_forward(const Tensor& base_out, const Tensor& x, const Tensor& offsets,
                                           const Tensor& lora_A, const Tensor& mixer, const Tensor& lora_B,
                                           double scale, double dropout_p, const OptTensor& dropout_seed) {
  const auto dropout = check_expert_adapter(x, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed);
  const int64_t rows = x.size(0), k = lora_B.size(1), r = lora_A.size(1);
  TORCH_CHECK_VALUE(base_out.dim() == 2 && base_out.size(0) == rows && base_out.size(1) == k,
                    "moslora_ext: base_out must have shape (rows, out_features) = (", rows, ", ", k, "), got ",
                    base_out.sizes());
  check_same_dtype_device(x, "x", base_out, "base_out");
  const auto experts = expert_rows(offsets, x, lora_A.size(0));
  const NoAutocast no_autocast;
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs inside are this op's own work
  const c10::DeviceGuard guard(x.device());
  refuse_capture(x, dropout_p);
  const auto u = dropout_p == 0.0 ? rows_times(x, lora_A.transpose(1, 2), experts)
                                  : dropout_project_down(unit_columns(x), r, dropout,
                                                         expert_products(lora_A, experts));
  const auto b_mixer = at::bmm(lora_B, mixer);  // (E, k, r): every expert's mixer step in one batched GEMM
  auto y = at::empty_like(base_out, at::MemoryFormat::Contiguous);
  at::add_out(y, base_out, rows_times(u, b_mixer.transpose(1, 2), experts), scale);
  return {y, u.contiguous()};
}

// With P_e = s G_e^T U_e (k, r): dB_e = P_e M_e^T, dM_e = B_e^T P_e, and
// dU = s G (B_e M_e) on expert e's rows, from which dA_e and dX follow.
std::tuple<Tensor, Tensor, Tensor, Tensor> experts_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& offsets, const Tensor& lora_A, const Tensor& mixer,
    const Tensor& lora_B, const Tensor& u, double scale, double dropout_p, const OptTensor& dropout_seed,
    std::array<bool, 4> output_mask) {
  const auto dropout = check_expert_adapter(x, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed);
  const int64_t rows = x.size(0), k = lora_B.size(1), r = lora_A.size(1);
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == k,
                    "moslora_ext: grad_out must have shape (", rows, ", ", k, "), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(u.dim() == 2 && u.size(0) == rows && u.size(1) == r, "moslora_ext: u must have shape (", rows,
                    ", ", r, ") as returned by experts_forward, got ", u.sizes());
  check_same_dtype_device(x, "x", grad_out, "grad_out");
  check_same_dtype_device(x, "x", u, "u");
  const auto experts = expert_rows(offsets, x, lora_A.size(0));
  const NoAutocast no_autocast;
  const at::AutoDispatchBelowADInplaceOrView below_autograd;  // the GEMMs inside are this op's own work
  const c10::DeviceGuard guard(x.device());
  refuse_capture(x, dropout_p);
  const auto [need_dx, need_dA, need_dmixer, need_dB] = output_mask;
  const auto g = grad_out.contiguous();
  Tensor dx, dA, dmixer, dB;
  if (need_dB || need_dmixer) {
    const auto p = per_expert_sums(g.t(), u, experts).mul_(scale);
    if (need_dB) dB = at::bmm(p, mixer.transpose(1, 2));
    if (need_dmixer) dmixer = at::bmm(lora_B.transpose(1, 2), p);
  }
  if (need_dx || need_dA) {
    const auto du = rows_times(g, at::bmm(lora_B, mixer), experts).mul_(scale);
    if (dropout_p == 0.0) {
      if (need_dA) dA = per_expert_sums(du.t(), x, experts);
      if (need_dx) dx = rows_times(du, lora_A, experts);
    } else {
      // The mask of forward, regenerated: dA_e = dU_e^T dropout(X_e), dX = dropout(dU A_e).
      if (need_dx) dx = at::empty_like(x, at::MemoryFormat::Contiguous);
      dA = dropout_grads(unit_columns(x), du.contiguous(), dx, need_dA, lora_A.sizes(), dropout,
                         expert_products(lora_A, experts));
    }
  }
  // Grouped GEMMs may return padded row strides; the op's outputs are contiguous.
  const auto contiguous = [](const Tensor& t) { return t.defined() ? t.contiguous() : t; };
  return {contiguous(dx), contiguous(dA), dmixer, dB};
}

void register_expert_kernels(torch::Library& m) {
  m.impl("experts_forward", &experts_forward);
  m.impl("experts_backward", &experts_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(moslora_ext, CPU, m) {
  register_expert_kernels(m);
}

// On CUDA the same algorithm: cuBLAS GEMMs and torch's grouped GEMM kernels
// (or the loop over experts where those lack the GPU or dtype), with the
// dense operator's dropout kernels; a build without its CUDA kernels has no
// dropout kernels to call, and says so.
TORCH_LIBRARY_IMPL(moslora_ext, CUDA, m) {
#ifdef WITH_CUDA
  register_expert_kernels(m);
#else
  refuse_on_cuda(m, {"experts_forward", "experts_backward"});
#endif
}

}  // namespace moslora
