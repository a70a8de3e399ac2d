// The CPU dropout passes: the bodies of dropout_kernels.h (shared with
// CUDA) row by row, rows in parallel.
#include "../device_kernels.h"

#include <torch/csrc/stable/ops.h>


namespace moslora {
namespace {

// fn(row, group) for every column group of rows 0 .. rows - 1 of `cols`
// columns, rows in parallel (tasks of about kGrainSize elements).
template <typename Fn>
void for_each_row_group(int64_t rows, int64_t cols, const Fn& fn) {
  const int64_t grain = std::max<int64_t>(1, kGrainSize / std::max<int64_t>(cols, 1));
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t g = 0; g < column_groups(cols); ++g) fn(row, g);
    }
  });
}

}  // namespace

template <>
void dropout_rows<DeviceType::CPU>(const Tensor& x, const Tensor& out, const DropoutSpec& spec,
                             int64_t first_row) {
  MOSLORA_DISPATCH_FLOATING(x.scalar_type(), "moslora_dropout", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto in = rows_of<const scalar_t>(x);
    const auto res = rows_of<scalar_t>(out);
    const auto mask = mask_of<acc_t>(spec);
    for_each_row_group(x.size(0), in.cols,
                       [&](int64_t row, int64_t g) { dropout_group(in, res, mask, first_row, row, g); });
  });
}

template <>
void dropout_pair_rows<DeviceType::CPU>(const Tensor& x, const Tensor& dropped, const Tensor& dx,
                                  const DropoutSpec& spec, int64_t first_row) {
  MOSLORA_DISPATCH_FLOATING(x.scalar_type(), "moslora_dropout_pair", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto in = rows_of<const scalar_t>(x);
    const auto dropped_rows = dropped.defined() ? rows_of<acc_t>(dropped) : Rows<acc_t>{};
    const auto dx_rows = dx.defined() ? rows_of<scalar_t>(dx) : Rows<scalar_t>{};
    const auto mask = mask_of<acc_t>(spec);
    for_each_row_group(x.size(0), in.cols, [&](int64_t row, int64_t g) {
      dropout_pair_group(in, dropped_rows, dx_rows, mask, first_row, row, g);
    });
  });
}

}  // namespace moslora
