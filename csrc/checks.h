// Argument checks shared by the operators (linear_ops.cpp, expert_ops.cpp).
// Shapes and values raise ValueError, dtypes TypeError (see aten_calls.h);
// each message names both sides of the mismatch.
#pragma once

#include "aten_calls.h"
#include "dropout_math.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>

namespace moslora {

// `ref` (called ref_name in messages) sets the dtype and device that t must share.
inline void check_same_dtype_device(const Tensor& ref, const char* ref_name, const Tensor& t, const char* name) {
  MOSLORA_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "moslora_ext: ", name, " has dtype ", t.scalar_type(),
                     " but ", ref_name, " has dtype ", ref.scalar_type(), "; cast them so they match");
  MOSLORA_CHECK_VALUE(t.device() == ref.device(), "moslora_ext: ", name, " is on ", device_name(t), " but ",
                      ref_name, " is on ", device_name(ref));
}

// `t` must be a floating point tensor on ref's device, of any floating dtype.
inline void check_floating_same_device(const Tensor& ref, const char* ref_name, const Tensor& t, const char* name) {
  MOSLORA_CHECK_TYPE(is_floating(t.scalar_type()), "moslora_ext: ", name,
                     " must be a floating point tensor, got dtype ", t.scalar_type());
  MOSLORA_CHECK_VALUE(t.device() == ref.device(), "moslora_ext: ", name, " is on ", device_name(t), " but ",
                      ref_name, " is on ", device_name(ref));
}

// `compute` is the dtype the op multiplies by scale in: scale must be finite there
// too (1e40 overflows fp32 to inf, or makes ATen refuse alpha = 1e40 in addmm).
inline void check_scale(double scale, ScalarType compute) {
  MOSLORA_CHECK_VALUE(std::isfinite(scale), "moslora_ext: scale must be finite, got ", scale);
  const double max = compute == ScalarType::Double ? std::numeric_limits<double>::max()
                                                   : std::numeric_limits<float>::max();
  MOSLORA_CHECK_VALUE(std::abs(scale) <= max, "moslora_ext: scale = ", scale, " overflows ", compute,
                      ", the dtype this op computes in");
}

// The value of a dropout_seed tensor: a one-element int64 CPU tensor.
inline uint64_t dropout_seed_value(const Tensor& seed) {
  MOSLORA_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == ScalarType::Long && seed.is_cpu(),
                      "moslora_ext: dropout_seed must be a one-element int64 CPU tensor, got dtype ",
                      seed.scalar_type(), ", shape ", seed.sizes(), " on ", device_name(seed));
  return static_cast<uint64_t>(*seed.const_data_ptr<int64_t>());
}

// The mask of a dropout op on x.
inline DropoutSpec dropout_spec(double p, const std::optional<Tensor>& seed) {
  MOSLORA_CHECK_VALUE(p >= 0.0 && p < 1.0, "moslora_ext: dropout probability must be in [0, 1), got ", p);
  if (p == 0.0) return DropoutSpec{0, 0, 1.0};
  MOSLORA_CHECK_VALUE(seed.has_value() && seed->defined(),
                      "moslora_ext: dropout_p = ", p, " > 0 needs a dropout_seed tensor");
  return DropoutSpec{dropout_seed_value(*seed), dropout_threshold(p), 1.0 / (1.0 - p)};
}

}  // namespace moslora
