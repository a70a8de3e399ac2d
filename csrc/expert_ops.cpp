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

#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace moslora {
namespace {

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
  auto sizes = sizes_of(t);
  const int64_t last = sizes.back();
  sizes.back() = (last + unit - 1) / unit * unit;
  auto copy = narrowed(torch::stable::new_empty(t, sizes), t.dim() - 1, 0, last);
  copy_into(copy, t);
  return copy;
}

// Whether aten::_grouped_mm runs for this device and dtype: tried once per
// (device, dtype) on a small case, then remembered. Where it does not (a
// torch without it, float64, a GPU or dtype its kernels lack), the products
// loop over the experts instead. A failed ATen call arrives through the
// stable ABI as a std::runtime_error.
bool grouped_mm_runs(const Tensor& x) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, bool> known;
  const auto key = std::make_tuple(static_cast<int>(x.device().type()), static_cast<int>(x.get_device_index()),
                                   static_cast<int>(x.scalar_type()));
  const std::lock_guard<std::mutex> lock(mutex);
  if (const auto found = known.find(key); found != known.end()) return found->second;
  bool runs = true;
  try {
    auto offsets = torch::stable::empty({2}, ScalarType::Int);  // two experts of 8 rows
    offsets.mutable_data_ptr<int32_t>()[0] = 8;
    offsets.mutable_data_ptr<int32_t>()[1] = 16;
    offsets = torch::stable::to(offsets, x.device());
    const auto rows = torch::stable::new_zeros(x, {16, 16});
    grouped_mm(rows, torch::stable::transpose(torch::stable::new_zeros(x, {2, 16, 16}), 1, 2), offsets);
    grouped_mm(t(rows), rows, offsets);
  } catch (const std::runtime_error&) {
    runs = false;
  }
  known.emplace(key, runs);
  return runs;
}

// clamp(offsets - first, 0, count) on offsets' device: grouped_mm's offsets
// for the rows [first, first + count). In float64 (exact for any row count),
// as the stable dispatcher call takes no Scalar at 2.11 and ATen subtracts
// from an integer tensor only with an integer alpha.
Tensor clipped_offsets(const Tensor& offsets, int64_t first, int64_t count) {
  const auto number = [&offsets](int64_t v) {  // on offsets' device, as every operand of clamp
    return torch::stable::full({}, static_cast<double>(v), ScalarType::Double, std::nullopt, offsets.device());
  };
  const auto shifted = torch::stable::subtract(torch::stable::to(offsets, ScalarType::Double), number(first));
  const auto clipped =
      call_aten("aten::clamp", "Tensor", shifted, std::optional<Tensor>(number(0)), std::optional<Tensor>(number(count)));
  return torch::stable::to(clipped, ScalarType::Int);
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
    ExpertRows part{offsets, grouped, ends};
    if (grouped) part.offsets = clipped_offsets(offsets, first, count);
    for (auto& end : part.ends) end = std::clamp<int64_t>(end - first, 0, count);
    return part;
  }
  int64_t begin(size_t e) const { return e == 0 ? 0 : ends[e - 1]; }
};

// (S, n): each expert's rows of a (S, m) times its matrix b[e] (m, n).
Tensor rows_times(const Tensor& a, const Tensor& b, const ExpertRows& experts) {
  if (experts.grouped) return grouped_mm(aligned(a), aligned(b), experts.offsets);
  auto out = torch::stable::new_empty(a, {a.size(0), b.size(2)});
  for (size_t e = 0; e < experts.ends.size(); ++e) {
    const int64_t first = experts.begin(e), n = experts.ends[e] - first;
    if (n == 0) continue;
    mm_out(row_range(out, first, n), row_range(a, first, n), torch::stable::select(b, 0, e));
  }
  return out;
}

// (E, m, n): for each expert, a_t (m, S)'s columns of its rows times b (S, n)'s
// rows of its rows (zero for an expert without rows).
Tensor per_expert_sums(const Tensor& a_t, const Tensor& b, const ExpertRows& experts) {
  if (experts.grouped) return grouped_mm(aligned(a_t), aligned(b), experts.offsets);
  auto out = torch::stable::new_zeros(b, {static_cast<int64_t>(experts.ends.size()), a_t.size(0), b.size(1)});
  for (size_t e = 0; e < experts.ends.size(); ++e) {
    const int64_t first = experts.begin(e), n = experts.ends[e] - first;
    if (n == 0) continue;
    mm_out(torch::stable::select(out, 0, e), narrowed(a_t, 1, first, n), row_range(b, first, n));
  }
  return out;
}

// The products under dropout (dropout_matmul.cpp) with expert e's lora_A on its rows.
RowProducts expert_products(const Tensor& lora_A, const ExpertRows& experts) {
  return RowProducts{
      [lora_A, experts](const Tensor& tile, int64_t first, const Tensor& out) {
        copy_into(out, rows_times(tile, torch::stable::transpose(lora_A, 1, 2), experts.tile(first, tile.size(0))));
      },
      [lora_A, experts](const Tensor& du_tile, int64_t first, const Tensor& out) {
        copy_into(out, rows_times(du_tile, lora_A, experts.tile(first, du_tile.size(0))));
      },
      // A half-precision tile's product is rounded once before dA (fp32) adds it up.
      [experts](Tensor& dA, const Tensor& du_tile_t, const Tensor& tile, int64_t first, bool) {
        dA = torch::stable::subtract(dA, per_expert_sums(du_tile_t, tile, experts.tile(first, tile.size(0))), -1.0);
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
  if (dropout_seed.has_value() && dropout_seed->defined()) dropout_seed_value(*dropout_seed);
  MOSLORA_CHECK_TYPE(is_floating(x.scalar_type()), "moslora_ext: x must be a floating point tensor, got dtype ",
                     x.scalar_type());
  check_same_dtype_device(x, "x", lora_A, "lora_A");
  check_same_dtype_device(x, "x", mixer, "mixer");
  check_same_dtype_device(x, "x", lora_B, "lora_B");
  check_scale(scale, opmath_type(x.scalar_type()));
  return dropout_spec(dropout_p, dropout_seed);
}

// The experts' rows from offsets (E,), grouped_mm's cumulative row counts.
// Offsets on the CPU have their values checked (non-decreasing, ending at
// x's rows); on a GPU that would be a host read, so there they are the
// caller's contract, as for aten::_grouped_mm (the loop over experts, which
// reads them anyway, checks them too).
ExpertRows expert_rows(const Tensor& offsets, const Tensor& x, int64_t experts) {
  MOSLORA_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) == experts && !is_floating(offsets.scalar_type()),
                      "moslora_ext: offsets must be a 1-D integer tensor with one entry per expert (", experts,
                      "), got dtype ", offsets.scalar_type(), " and shape ", offsets.sizes());
  const bool grouped = grouped_mm_runs(x);
  ExpertRows rows{torch::stable::to(offsets, ScalarType::Int, std::nullopt, x.device()), grouped, {}};
  if (grouped && !offsets.is_cpu()) return rows;
  const auto host = torch::stable::contiguous(torch::stable::to(
      offsets, ScalarType::Long, std::nullopt, torch::stable::Device(DeviceType::CPU)));
  const int64_t* data = host.const_data_ptr<int64_t>();
  rows.ends.assign(data, data + experts);
  int64_t previous = 0;
  for (int64_t end : rows.ends) {
    MOSLORA_CHECK_VALUE(end >= previous, "moslora_ext: offsets must be non-decreasing cumulative row counts, got ",
                        torch::headeronly::IntHeaderOnlyArrayRef(rows.ends));
    previous = end;
  }
  MOSLORA_CHECK_VALUE(previous == x.size(0), "moslora_ext: offsets must end at the number of rows of x (", x.size(0),
                      "), got ", previous);
  return rows;
}

// x with unit column stride, as the dropout kernels read it.
Tensor unit_columns(const Tensor& x) {
  return x.stride(1) == 1 ? x : torch::stable::contiguous(x);
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
  MOSLORA_CHECK_VALUE(base_out.dim() == 2 && base_out.size(0) == rows && base_out.size(1) == k,
                      "moslora_ext: base_out must have shape (rows, out_features) = (", rows, ", ", k, "), got ",
                      base_out.sizes());
  check_same_dtype_device(x, "x", base_out, "base_out");
  const auto experts = expert_rows(offsets, x, lora_A.size(0));
  const DeviceGuard guard(x);
  refuse_capture(x, dropout_p);
  const auto u = dropout_p == 0.0 ? rows_times(x, torch::stable::transpose(lora_A, 1, 2), experts)
                                  : dropout_project_down(unit_columns(x), r, dropout,
                                                         expert_products(lora_A, experts));
  const auto b_mixer = bmm(lora_B, mixer);  // (E, k, r): every expert's mixer step in one batched GEMM
  // base_out + s * (the adapter's part), in one pass with s as the add's alpha.
  const auto y = torch::stable::subtract(base_out, rows_times(u, torch::stable::transpose(b_mixer, 1, 2), experts),
                                         -scale);
  return {torch::stable::contiguous(y), torch::stable::contiguous(u)};
}

// With P_e = s G_e^T U_e (k, r): dB_e = P_e M_e^T, dM_e = B_e^T P_e, and
// dU = s G (B_e M_e) on expert e's rows, from which dA_e and dX follow.
std::tuple<Tensor, Tensor, Tensor, Tensor> experts_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& offsets, const Tensor& lora_A, const Tensor& mixer,
    const Tensor& lora_B, const Tensor& u, double scale, double dropout_p, const OptTensor& dropout_seed,
    std::vector<bool> output_mask) {
  const auto dropout = check_expert_adapter(x, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed);
  const int64_t rows = x.size(0), k = lora_B.size(1), r = lora_A.size(1);
  MOSLORA_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == k,
                      "moslora_ext: grad_out must have shape (", rows, ", ", k, "), got ", grad_out.sizes());
  MOSLORA_CHECK_VALUE(u.dim() == 2 && u.size(0) == rows && u.size(1) == r, "moslora_ext: u must have shape (", rows,
                      ", ", r, ") as returned by experts_forward, got ", u.sizes());
  MOSLORA_CHECK_VALUE(output_mask.size() == 4, "moslora_ext: output_mask must have 4 entries");
  check_same_dtype_device(x, "x", grad_out, "grad_out");
  check_same_dtype_device(x, "x", u, "u");
  const auto experts = expert_rows(offsets, x, lora_A.size(0));
  const DeviceGuard guard(x);
  refuse_capture(x, dropout_p);
  const bool need_dx = output_mask[0], need_dA = output_mask[1], need_dmixer = output_mask[2],
             need_dB = output_mask[3];
  const auto g = torch::stable::contiguous(grad_out);
  Tensor dx, dA, dmixer, dB;
  if (need_dB || need_dmixer) {
    const auto p = scaled(per_expert_sums(t(g), u, experts), scale);
    if (need_dB) dB = bmm(p, torch::stable::transpose(mixer, 1, 2));
    if (need_dmixer) dmixer = bmm(torch::stable::transpose(lora_B, 1, 2), p);
  }
  if (need_dx || need_dA) {
    const auto du = scaled(rows_times(g, bmm(lora_B, mixer), experts), scale);
    if (dropout_p == 0.0) {
      if (need_dA) dA = per_expert_sums(t(du), x, experts);
      if (need_dx) dx = rows_times(du, lora_A, experts);
    } else {
      // The mask of forward, regenerated: dA_e = dU_e^T dropout(X_e), dX = dropout(dU A_e).
      if (need_dx) dx = torch::stable::new_empty(x, x.sizes());
      dA = dropout_grads(unit_columns(x), torch::stable::contiguous(du), dx, need_dA, lora_A.sizes(), dropout,
                         expert_products(lora_A, experts));
    }
  }
  // Grouped GEMMs may return padded row strides; the op's outputs are contiguous.
  const auto contiguous = [](const Tensor& t) { return t.defined() ? torch::stable::contiguous(t) : t; };
  return {contiguous(dx), contiguous(dA), dmixer, dB};
}

}  // namespace
}  // namespace moslora

// On CUDA the same algorithm: cuBLAS GEMMs and torch's grouped GEMM kernels
// (or the loop over experts where those lack the GPU or dtype), with the
// dense operator's dropout kernels; a build without its CUDA kernels has no
// dropout kernels to call, and says so (ops.cpp).
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
