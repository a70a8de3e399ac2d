// The dense operators' kernels (linear_ops.cpp), which the expert operators
// (expert_ops.cpp) run on each expert's rows.
#pragma once

#include "aten_calls.h"

#include <optional>
#include <tuple>
#include <vector>

namespace moslora {

// moslora_ext::forward (schema and meaning in ops.cpp).
std::tuple<Tensor, Tensor> forward(const Tensor& x, const std::optional<Tensor>& weight,
                                   const std::optional<Tensor>& bias, const Tensor& lora_A, const Tensor& mixer,
                                   const Tensor& lora_B, double scale, double dropout_p,
                                   const std::optional<Tensor>& dropout_seed, const std::optional<Tensor>& base_out);

// moslora_ext::backward; output_mask has 4 entries (dx, dA, dmixer, dB).
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_out, const Tensor& x,
                                                    const std::optional<Tensor>& weight, const Tensor& lora_A,
                                                    const Tensor& mixer, const Tensor& lora_B, const Tensor& u,
                                                    double scale, double dropout_p,
                                                    const std::optional<Tensor>& dropout_seed,
                                                    std::vector<bool> output_mask);

}  // namespace moslora
