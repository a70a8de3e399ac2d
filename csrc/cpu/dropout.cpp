// CPU products under dropout. The mask and the per-group arithmetic are those
// of dropout_kernels.h (shared with CUDA). The down-projection and dA use the
// BLAS GEMM on dropped row blocks, which a CPU runs faster than the one-pass
// bodies; dX = dropout(dU A) runs the one-pass body, which saves a pass over
// dX. dA sums its blocks in fp32 for half precision and rounds once.
#include "../kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>  // at::internal::GRAIN_SIZE
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

namespace moslora {
namespace {

// Rows per task of at::parallel_for for row loops over `cols` columns.
int64_t row_grain(int64_t cols) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(cols, 1));
}

}  // namespace

template <>
void dropout_rows<c10::kCPU>(const at::Tensor& x, const at::Tensor& out, const DropoutSpec& spec,
                             int64_t first_row) {
  const auto x_rows = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t rows = x.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moslora_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto run = [&](auto out_type) {
      using out_t = decltype(out_type);
      const auto in = rows_of<const scalar_t>(x_rows);
      const auto res = rows_of<out_t>(out);
      const auto mask = mask_of<acc_t>(spec);
      at::parallel_for(0, rows, row_grain(in.cols), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          for (int64_t g = 0; g < column_groups(in); ++g) dropout_group(in, res, mask, first_row, row, g);
        }
      });
    };
    if (out.scalar_type() == x.scalar_type()) {
      run(scalar_t{});
    } else {
      TORCH_INTERNAL_ASSERT(out.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
      run(acc_t{});
    }
  });
}

namespace {

// A new (rows, d) tensor of dtype `dtype` holding the dropout of x's rows
// first_row, first_row + 1, ...
at::Tensor dropped_block(const at::Tensor& x, int64_t first_row, int64_t rows, at::ScalarType dtype,
                         const DropoutSpec& spec) {
  auto out = at::empty({rows, x.size(1)}, x.options().dtype(dtype));
  dropout_rows<c10::kCPU>(x.narrow(0, first_row, rows), out, spec, first_row);
  return out;
}

}  // namespace

template <>
at::Tensor dropout_project_down<c10::kCPU>(const at::Tensor& x, const at::Tensor& lora_A,
                                           const DropoutSpec& spec) {
  const int64_t n = x.size(0), block = rows_per_block(x.size(1));
  auto u = at::empty({n, lora_A.size(0)}, x.options());
  for (int64_t first = 0; first < n; first += block) {
    const int64_t rows = std::min(block, n - first);
    auto u_block = u.narrow(0, first, rows);
    at::mm_out(u_block, dropped_block(x, first, rows, x.scalar_type(), spec), lora_A.t());
  }
  return u;
}

template <>
at::Tensor dropout_grad_A<c10::kCPU>(const at::Tensor& x, const at::Tensor& du, const DropoutSpec& spec) {
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const int64_t n = x.size(0), block = rows_per_block(x.size(1));
  auto dA = at::zeros({du.size(1), x.size(1)}, x.options().dtype(acc_type));
  const auto du_acc = du.to(acc_type);
  for (int64_t first = 0; first < n; first += block) {
    const int64_t rows = std::min(block, n - first);
    dA.addmm_(du_acc.narrow(0, first, rows).t(), dropped_block(x, first, rows, acc_type, spec));
  }
  return dA.to(x.scalar_type());
}

template <>
void dropout_grad_x<c10::kCPU>(const at::Tensor& du, const at::Tensor& lora_A, const at::Tensor& dx,
                               const DropoutSpec& spec) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dx.scalar_type(), "moslora_dropout_grad_x", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = rows_of<const scalar_t>(lora_A);
    const auto out = rows_of<scalar_t>(dx);
    const auto mask = mask_of<acc_t>(spec);
    const scalar_t* du_ptr = du.const_data_ptr<scalar_t>();
    const int64_t r = du.size(1);
    at::parallel_for(0, du.size(0), row_grain(out.cols * r), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t g = 0; g < column_groups(out); ++g) dX_group(du_ptr, a, r, mask, out, row, g);
      }
    });
  });
}

}  // namespace moslora
