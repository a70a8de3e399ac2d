// CPU dropout: applies the counter-based mask of kernel_math.h to a row block.
#include "../kernel_math.h"
#include "../kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE

namespace moslora {
namespace {

// One row; everything by value, so the compiler keeps it in registers (out
// may alias in, which would otherwise force reloads of captured values).
// Full groups of kDropoutColsPerCall columns take a branch-free, unrolled
// path; the last partial group the general one.
template <typename scalar_t, typename acc_t>
void dropout_row(const scalar_t* in, scalar_t* out, int64_t cols, uint64_t seed, uint64_t row,
                 uint32_t drop_threshold, acc_t keep_scale) {
  constexpr int kLanes = kDropoutColsPerCall;
  int64_t first_col = 0;
  for (; first_col + kLanes <= cols; first_col += kLanes) {
    const Philox4 words = philox4x32_10(seed, row, static_cast<uint32_t>(first_col / kLanes));
    acc_t factor[kLanes];
    for (int lane = 0; lane < kLanes; ++lane) {
      factor[lane] = dropout_factor(words, lane, drop_threshold, keep_scale);
    }
    for (int lane = 0; lane < kLanes; ++lane) {
      out[first_col + lane] = static_cast<scalar_t>(static_cast<acc_t>(in[first_col + lane]) * factor[lane]);
    }
  }
  if (first_col < cols) {
    const Philox4 words = philox4x32_10(seed, row, static_cast<uint32_t>(first_col / kLanes));
    for (int lane = 0; first_col + lane < cols; ++lane) {
      out[first_col + lane] = static_cast<scalar_t>(static_cast<acc_t>(in[first_col + lane]) *
                                                    dropout_factor(words, lane, drop_threshold, keep_scale));
    }
  }
}

}  // namespace

template <>
void dropout_rows<c10::kCPU>(const at::Tensor& x, const at::Tensor& out, const DropoutSpec& spec,
                             int64_t first_row) {
  const auto x_contig = x.contiguous();
  const int64_t rows = x_contig.size(0), cols = x_contig.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moslora_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = x_contig.const_data_ptr<scalar_t>();
    scalar_t* res = out.mutable_data_ptr<scalar_t>();
    const acc_t keep_scale = static_cast<acc_t>(spec.keep_scale);
    const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        dropout_row(in + row * cols, res + row * cols, cols, spec.seed, static_cast<uint64_t>(first_row + row),
                    spec.drop_threshold, keep_scale);
      }
    });
  });
}

}  // namespace moslora
