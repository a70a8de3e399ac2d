// Argument checks shared by the operators (linear_ops.cpp, expert_ops.cpp).
// Shapes and values raise ValueError, dtypes TypeError; each message names
// both sides of the mismatch.
#pragma once

#include "dropout_math.h"

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

namespace moslora {

// `ref` (called ref_name in messages) sets the dtype and device that t must share.
inline void check_same_dtype_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                                    const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "moslora_ext: ", name, " has dtype ", t.scalar_type(),
                   " but ", ref_name, " has dtype ", ref.scalar_type(), "; cast them so they match");
  TORCH_CHECK_VALUE(t.device() == ref.device(), "moslora_ext: ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

// `t` must be a floating point tensor on ref's device, of any floating dtype.
inline void check_floating_same_device(const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                                       const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "moslora_ext: ", name,
                   " must be a floating point tensor, got dtype ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "moslora_ext: ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device());
}

// `compute` is the dtype the op multiplies by scale in: scale must be finite there
// too (1e40 overflows fp32 to inf, or makes ATen refuse alpha = 1e40 in addmm_).
inline void check_scale(double scale, at::ScalarType compute) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "moslora_ext: scale must be finite, got ", scale);
  const double max = compute == at::kDouble ? std::numeric_limits<double>::max()
                                            : std::numeric_limits<float>::max();
  TORCH_CHECK_VALUE(std::abs(scale) <= max, "moslora_ext: scale = ", scale, " overflows ", compute,
                    ", the dtype this op computes in");
}

// The value of a dropout_seed tensor: a one-element int64 CPU tensor.
inline uint64_t dropout_seed_value(const at::Tensor& seed) {
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
                    "moslora_ext: dropout_seed must be a one-element int64 CPU tensor, got dtype ",
                    seed.scalar_type(), ", shape ", seed.sizes(), " on ", seed.device());
  return static_cast<uint64_t>(seed.item<int64_t>());
}

// The mask of a dropout op on x.
inline DropoutSpec dropout_spec(double p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "moslora_ext: dropout probability must be in [0, 1), got ", p);
  if (p == 0.0) return DropoutSpec{0, 0, 1.0};
  TORCH_CHECK_VALUE(seed.has_value() && seed->defined(),
                    "moslora_ext: dropout_p = ", p, " > 0 needs a dropout_seed tensor");
  return DropoutSpec{dropout_seed_value(*seed), dropout_threshold(p), 1.0 / (1.0 - p)};
}

}  // namespace moslora
