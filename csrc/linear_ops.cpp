// The dense moslora_ext operators (forward, backward, merge_, dropout): their
// argument checks and the device-generic algorithm (ATen GEMMs through the
// stable dispatcher, which are cuBLAS on CUDA), calling the device kernels of
// device_kernels.h for the mixer step and the dropout mask.
#include "checks.h"
#include "device_kernels.h"
#include "op_guards.h"

#include <torch/csrc/stable/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

namespace moslora {
namespace {

// ---------------------------------------------------------------------------
// Argument checks (the ones the expert operators share are in checks.h).
// ---------------------------------------------------------------------------

// Checks weight (k, d), lora_A (r, d), mixer (r, r), lora_B (k, r) against
// each other; ref (x, or the weight for merge) sets their device, and their
// dtype too unless adapter_dtype_free (merge computes in its own precision).
// An undefined weight (adapter-only mode) leaves d to lora_A and k to lora_B.
void check_adapter(const Tensor& ref, const char* ref_name, const Tensor& weight, const Tensor& lora_A,
                   const Tensor& mixer, const Tensor& lora_B, bool adapter_dtype_free = false) {
  MOSLORA_CHECK_TYPE(is_floating(ref.scalar_type()), "moslora_ext: ", ref_name,
                   " must be a floating point tensor, got dtype ", ref.scalar_type());
  const auto check = adapter_dtype_free ? check_floating_same_device : check_same_dtype_device;
  check(ref, ref_name, lora_A, "lora_A");
  check(ref, ref_name, mixer, "mixer");
  check(ref, ref_name, lora_B, "lora_B");
  MOSLORA_CHECK_VALUE(lora_A.dim() == 2 && lora_B.dim() == 2, "moslora_ext: lora_A and lora_B must be 2-D, got ",
                    lora_A.sizes(), " and ", lora_B.sizes());
  if (weight.defined()) {
    check_same_dtype_device(ref, ref_name, weight, "weight");
    MOSLORA_CHECK_VALUE(weight.dim() == 2, "moslora_ext: weight must be 2-D (out_features, in_features), got shape ",
                      weight.sizes());
    MOSLORA_CHECK_VALUE(lora_A.size(1) == weight.size(1), "moslora_ext: lora_A must have shape (r, in_features) "
                      "with in_features = ", weight.size(1), " (weight has shape ", weight.sizes(), "), got ",
                      lora_A.sizes());
  }
  const int64_t k = weight.defined() ? weight.size(0) : lora_B.size(0);
  const int64_t r = lora_A.size(0);
  MOSLORA_CHECK_VALUE(r >= 1, "moslora_ext: the rank r must be >= 1, lora_A has shape ", lora_A.sizes());
  MOSLORA_CHECK_VALUE(mixer.dim() == 2 && mixer.size(0) == r && mixer.size(1) == r,
                    "moslora_ext: mixer must have shape (r, r) = (", r, ", ", r, ") to match lora_A ",
                    lora_A.sizes(), ", got ", mixer.sizes());
  MOSLORA_CHECK_VALUE(lora_B.size(0) == k && lora_B.size(1) == r,
                    "moslora_ext: lora_B must have shape (out_features, r) = (", k, ", ", r, ") to match ",
                    weight.defined() ? message("weight ", weight.sizes(), " and ") : "", "lora_A ",
                    lora_A.sizes(), ", got ", lora_B.sizes());
}

void check_input(const Tensor& x, const Tensor& lora_A) {
  MOSLORA_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == lora_A.size(1), "moslora_ext: x must have in_features = ",
                      lora_A.size(1), " in its last dimension (lora_A has shape ", lora_A.sizes(),
                      "), got x of shape ", x.sizes());
}

// The checks forward and backward share; returns their dropout mask spec.
DropoutSpec check_layer_args(const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& mixer,
                             const Tensor& lora_B, double scale, double dropout_p,
                             const std::optional<Tensor>& dropout_seed) {
  check_adapter(x, "x", weight, lora_A, mixer, lora_B);
  check_input(x, lora_A);
  check_scale(scale, opmath_type(x.scalar_type()));
  return dropout_spec(dropout_p, dropout_seed);
}

// The operators compute in their operands' dtypes: autocast is applied by the
// Python wrapper, before the call. The GEMMs inside are the out= variants,
// which autocast leaves alone (it would cast the functional mm and addmm to
// mixed dtypes, e.g. merge under a bf16 autocast).

// scale * a @ b, the scale applied to the GEMM's accumulator (fp32 for half
// precision) as its alpha: no half-precision intermediate holds a scaled
// value, so nothing overflows that the result does not (s = 64 times an fp16
// U of 2000 would). beta = 0: the uninitialised output is not read.
Tensor scaled_mm(const Tensor& a, const Tensor& b, double scale) {
  auto out = torch::stable::new_empty(a, {a.size(0), b.size(1)});
  addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/scale);
  return out;
}

// x as (N, d) rows with unit column stride, as the dropout kernels read it
// (a copy only for an x whose last dimension is strided).
Tensor unit_column_rows(const Tensor& x2) {
  return x2.stride(1) == 1 ? x2 : torch::stable::contiguous(x2);
}

Tensor option_or_undefined(const std::optional<Tensor>& t) {
  return t.has_value() ? *t : Tensor();
}

// y's shape: x's with out_features k in place of in_features.
std::vector<int64_t> output_sizes(const Tensor& x, int64_t k) {
  auto sizes = sizes_of(x);
  sizes.back() = k;
  return sizes;
}

bool same_sizes(const Tensor& t, const std::vector<int64_t>& sizes) {
  const auto s = t.sizes();
  return s.size() == sizes.size() && std::equal(s.begin(), s.end(), sizes.begin());
}

// The products under dropout with one lora_A (r, d) for every row.
RowProducts dense_products(const Tensor& lora_A) {
  return RowProducts{
      [lora_A](const Tensor& tile, int64_t, const Tensor& out) { mm_out(out, tile, t(lora_A)); },
      [lora_A](const Tensor& du_tile, int64_t, const Tensor& out) { mm_out(out, du_tile, lora_A); },
      [](Tensor& dA, const Tensor& du_tile_t, const Tensor& tile, int64_t, bool fp32_result) {
        if (fp32_result) {
          dA = torch::stable::subtract(dA, mm(du_tile_t, tile, ScalarType::Float), -1.0);  // dA + the tile's
        } else {
          addmm_out(dA, dA, du_tile_t, tile, 1, 1);
        }
      }};
}

// ---------------------------------------------------------------------------
// Operators
// ---------------------------------------------------------------------------

std::tuple<Tensor, Tensor> forward(const Tensor& x, const std::optional<Tensor>& weight_or_none,
                                   const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& mixer,
                                   const Tensor& lora_B, double scale, double dropout_p,
                                   const std::optional<Tensor>& dropout_seed,
                                   const std::optional<Tensor>& base_out_or_none) {
  const Tensor weight = option_or_undefined(weight_or_none);
  const Tensor base_out = option_or_undefined(base_out_or_none);
  const bool has_bias = bias.has_value() && bias->defined();
  MOSLORA_CHECK_VALUE(weight.defined() != base_out.defined(), "moslora_ext: forward needs either weight (the base "
                      "output computed here) or base_out (computed by the caller), not both nor neither");
  MOSLORA_CHECK_VALUE(!(has_bias && base_out.defined()),
                      "moslora_ext: with base_out the bias belongs in base_out; pass bias=None");
  const DropoutSpec dropout = check_layer_args(x, weight, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed);
  const int64_t n = leading_rows(x), d = lora_A.size(1), k = lora_B.size(0);
  const auto y_sizes = output_sizes(x, k);
  if (has_bias) {
    check_same_dtype_device(x, "x", *bias, "bias");
    MOSLORA_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == k,
                        "moslora_ext: bias must have shape (out_features,) = (", k, ",), got ", bias->sizes());
  }
  if (base_out.defined()) {
    check_same_dtype_device(x, "x", base_out, "base_out");
    MOSLORA_CHECK_VALUE(same_sizes(base_out, y_sizes), "moslora_ext: base_out must have the output's shape ",
                        torch::headeronly::IntHeaderOnlyArrayRef(y_sizes), ", got ", base_out.sizes());
  }
  const DeviceGuard guard(x);
  refuse_capture(x, dropout_p);
  const auto x2 = torch::stable::reshape(x, {n, d});
  const bool cuda = x.is_cuda();
  const auto u = dropout_p == 0.0
                     ? mm(x2, t(lora_A))
                     : dropout_project_down(unit_column_rows(x2), lora_A.size(0), dropout,
                                            dense_products(torch::stable::contiguous(lora_A)));
  const auto v = ON_DEVICE(cuda, mixer_forward, u, torch::stable::contiguous(mixer));
  // y is allocated in its final shape and filled through a 2-D view, so the op
  // returns a tensor of its own rather than a view: callers may change it in
  // place (y += residual), as they may nn.Linear's output.
  auto y = torch::stable::new_empty(x, y_sizes);
  auto y2 = torch::stable::view(y, {n, k});
  // The small adapter GEMM writes y (with the bias, or on top of the caller's
  // base output) and the base GEMM accumulates into it (beta = 1): y is
  // written once and read once, with no separate add, scale or bias pass.
  // The scale is that GEMM's alpha (see scaled_mm).
  if (base_out.defined()) {
    addmm_out(y2, torch::stable::reshape(base_out, {n, k}), v, t(lora_B), /*beta=*/1, /*alpha=*/scale);
  } else if (has_bias) {
    addmm_out(y2, *bias, v, t(lora_B), /*beta=*/1, /*alpha=*/scale);
  } else {
    addmm_out(y2, y2, v, t(lora_B), /*beta=*/0, /*alpha=*/scale);
  }
  if (weight.defined()) addmm_out(y2, y2, x2, t(weight), 1, 1);
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& x,
                                                    const std::optional<Tensor>& weight_or_none, const Tensor& lora_A,
                                                    const Tensor& mixer, const Tensor& lora_B, const Tensor& u,
                                                    double scale, double dropout_p,
                                                    const std::optional<Tensor>& dropout_seed,
                                                    std::vector<bool> output_mask) {
  const Tensor weight = option_or_undefined(weight_or_none);
  const DropoutSpec dropout = check_layer_args(x, weight, lora_A, mixer, lora_B, scale, dropout_p, dropout_seed);
  check_same_dtype_device(x, "x", grad_out, "grad_out");
  check_same_dtype_device(x, "x", u, "u");
  const int64_t n = leading_rows(x), d = lora_A.size(1), k = lora_B.size(0), r = lora_A.size(0);
  const auto y_sizes = output_sizes(x, k);
  MOSLORA_CHECK_VALUE(same_sizes(grad_out, y_sizes), "moslora_ext: grad_out must have the output's shape ",
                      torch::headeronly::IntHeaderOnlyArrayRef(y_sizes), ", got ", grad_out.sizes());
  MOSLORA_CHECK_VALUE(u.dim() == 2 && u.size(0) == n && u.size(1) == r, "moslora_ext: u must have shape (", n,
                      ", ", r, ") as returned by forward, got ", u.sizes());
  MOSLORA_CHECK_VALUE(output_mask.size() == 4, "moslora_ext: output_mask must have 4 entries");
  const bool need_dx = output_mask[0], need_dA = output_mask[1], need_dmixer = output_mask[2],
             need_dB = output_mask[3];
  const DeviceGuard guard(x);
  refuse_capture(x, dropout_p);
  // Contiguous once here rather than once per GEMM (an expanded grad, e.g. of
  // y.sum(), would otherwise be copied by each of them).
  const auto g = torch::stable::contiguous(torch::stable::reshape(grad_out, {n, k}));
  const auto x2 = torch::stable::reshape(x, {n, d});
  const auto u_c = torch::stable::contiguous(u);
  const auto mixer_c = torch::stable::contiguous(mixer);
  Tensor dx, dx2, dA, dmixer, dB;
  if (need_dx) {  // as y in forward: allocated in x's shape, filled through a 2-D view
    dx = torch::stable::new_empty(x, x.sizes());
    dx2 = torch::stable::view(dx, {n, d});
  }
  const bool cuda = x.is_cuda();
  // The scale enters as the alpha of the two GEMMs that read G, dB = s G^T V
  // and dV = s G B, so that G's products carry it from their accumulator on
  // and the mixer step, dA and dX need no scale of their own.
  if (need_dB) dB = scaled_mm(t(g), ON_DEVICE(cuda, mixer_forward, u_c, mixer_c), scale);
  if (need_dx || need_dA || need_dmixer) {
    const auto dv = scaled_mm(g, lora_B, scale);
    Tensor du;
    std::tie(du, dmixer) = ON_DEVICE(cuda, mixer_backward, dv, u_c, mixer_c, need_dmixer);
    if (dropout_p == 0.0) {
      if (need_dA) dA = mm(t(du), x2);
      if (need_dx) mm_out(dx2, du, lora_A);
    } else {
      // The mask of forward, regenerated: dA = dU^T dropout(X), dX = dropout(dU A).
      dA = dropout_grads(unit_column_rows(x2), du, dx2, need_dA, lora_A.sizes(), dropout,
                         dense_products(torch::stable::contiguous(lora_A)));
    }
  }
  // As in forward, the base GEMM accumulates into the adapter's part; without
  // a weight the caller's base module adds its own.
  if (need_dx && weight.defined()) addmm_out(dx2, dx2, g, weight, 1, 1);
  return {dx, dA, dmixer, dB};
}

// The adapter may have another floating dtype than the weight (fp32 adapters
// on a bf16 base): it is read in the accumulation precision, the weight's own
// or fp32 for a half-precision weight.
void merge_(Tensor weight, const Tensor& lora_A, const Tensor& mixer, const Tensor& lora_B, double scale) {
  check_adapter(weight, "weight", weight, lora_A, mixer, lora_B, /*adapter_dtype_free=*/true);
  const auto acc_type = opmath_type(weight.scalar_type());
  const bool reduced = acc_type != weight.scalar_type();
  check_scale(scale, acc_type);
  const DeviceGuard guard(weight);
  const auto b_mixer = mm(torch::stable::to(lora_B, acc_type), torch::stable::to(mixer, acc_type));
  const auto a = torch::stable::to(lora_A, acc_type);
  if (!reduced) {
    addmm_out(weight, weight, b_mixer, a, 1.0, scale);
    return;
  }
  // Half precision: add in fp32 and round once, a block of rows at a time,
  // so no k x d fp32 temporary is ever allocated.
  const int64_t k = weight.size(0), block = rows_per_block(weight.size(1));
  for (int64_t first = 0; first < k; first += block) {
    const int64_t rows = std::min(block, k - first);
    auto w_block = row_range(weight, first, rows);
    auto acc_block = torch::stable::to(w_block, ScalarType::Float);
    addmm_out(acc_block, acc_block, row_range(b_mixer, first, rows), a, 1.0, scale);
    copy_into(w_block, acc_block);
  }
}

Tensor dropout(const Tensor& x, double p, const Tensor& seed) {
  MOSLORA_CHECK_TYPE(is_floating(x.scalar_type()), "moslora_ext: dropout needs a floating point x, got ",
                     x.scalar_type());
  MOSLORA_CHECK_VALUE(x.dim() >= 1, "moslora_ext: dropout needs x with at least one dimension");
  const DropoutSpec spec = dropout_spec(p, seed);
  if (p == 0.0) return torch::stable::clone(x);
  const DeviceGuard guard(x);
  refuse_capture(x, p);
  const int64_t rows = leading_rows(x), cols = x.size(-1);
  auto out = torch::stable::new_empty(x, x.sizes());  // not a view, as forward's y
  ON_DEVICE(x.is_cuda(), dropout_rows, unit_column_rows(torch::stable::reshape(x, {rows, cols})),
            torch::stable::view(out, {rows, cols}), spec, 0);
  return out;
}

}  // namespace

}  // namespace moslora

STABLE_TORCH_LIBRARY_IMPL(moslora_ext, CPU, m) {
  m.impl("forward", TORCH_BOX(&moslora::forward));
  m.impl("backward", TORCH_BOX(&moslora::backward));
  m.impl("merge_", TORCH_BOX(&moslora::merge_));
  m.impl("dropout", TORCH_BOX(&moslora::dropout));
}

#ifdef WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(moslora_ext, CUDA, m) {
  m.impl("forward", TORCH_BOX(&moslora::forward));
  m.impl("backward", TORCH_BOX(&moslora::backward));
  m.impl("merge_", TORCH_BOX(&moslora::merge_));
  m.impl("dropout", TORCH_BOX(&moslora::dropout));
}
#endif
