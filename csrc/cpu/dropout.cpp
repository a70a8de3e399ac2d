// CPU products under dropout. The mask and the per-group arithmetic are those
// of dropout_kernels.h (shared with CUDA). All three products use the BLAS
// GEMM on row blocks, which a CPU runs faster than the one-pass bodies: the
// down-projection on a dropped block of x; in backward, one pass per block
// draws each mask group once to drop dX = dU A in place and to write the
// dropped block of x for dA. dA sums its blocks in fp32 for half precision and
// rounds once.
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

// Calls fn(group, words) for each column group of one row of `cols` columns.
template <typename Fn>
void for_each_group(uint64_t seed, uint64_t row, int64_t cols, const Fn& fn) {
  const int64_t groups = column_groups(cols);
  for (int64_t g = 0; g < groups; ++g) fn(g, philox4x32_10(seed, row, static_cast<uint32_t>(g)));
}

}  // namespace

template <>
void dropout_rows<c10::kCPU>(const at::Tensor& x, const at::Tensor& out, const DropoutSpec& spec,
                             int64_t first_row) {
  const int64_t rows = x.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moslora_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = rows_of<const scalar_t>(x);
    const auto res = rows_of<scalar_t>(out);
    const auto mask = mask_of<acc_t>(spec);
    at::parallel_for(0, rows, row_grain(in.cols), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for_each_group(mask.seed, first_row + row, in.cols, [&](int64_t g, const Philox4& words) {
          dropout_group(in, res, mask, words, row, g, row);
        });
      }
    });
  });
}

template <>
at::Tensor dropout_project_down<c10::kCPU>(const at::Tensor& x, const at::Tensor& lora_A,
                                           const DropoutSpec& spec) {
  const int64_t n = x.size(0), block = rows_per_block(x.size(1));
  auto u = at::empty({n, lora_A.size(0)}, x.options());
  auto dropped = at::empty({std::min(block, n), x.size(1)}, x.options());  // one block, reused
  for (int64_t first = 0; first < n; first += block) {
    const int64_t rows = std::min(block, n - first);
    auto dropped_block = dropped.narrow(0, 0, rows);
    dropout_rows<c10::kCPU>(x.narrow(0, first, rows), dropped_block, spec, first);
    auto u_block = u.narrow(0, first, rows);
    at::mm_out(u_block, dropped_block, lora_A.t());
  }
  return u;
}

// A block of rows at a time: dX's block is du A (a GEMM), then one pass draws
// each group's mask once for both products, dropping dX in place and writing
// the block of dropout(x) (fp32 for half precision) that dA's GEMM adds up.
template <>
at::Tensor dropout_grads<c10::kCPU>(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_A,
                                    const at::Tensor& dx, bool need_dA, const DropoutSpec& spec) {
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const int64_t n = x.size(0), d = x.size(1), block = rows_per_block(d);
  at::Tensor dA, du_acc, dropped;
  if (need_dA) {
    dA = at::zeros({du.size(1), d}, x.options().dtype(acc_type));
    du_acc = du.to(acc_type);
    dropped = at::empty({std::min(block, n), d}, x.options().dtype(acc_type));
  }
  const bool need_dx = dx.defined();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "moslora_dropout_grads", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto mask = mask_of<acc_t>(spec);
    const auto in = rows_of<const scalar_t>(x);
    const auto dx_rows = need_dx ? rows_of<scalar_t>(dx) : Rows<scalar_t>{};
    const auto dropped_rows = need_dA ? rows_of<acc_t>(dropped) : Rows<acc_t>{};
    for (int64_t first = 0; first < n; first += block) {
      const int64_t rows = std::min(block, n - first);
      if (need_dx) {
        auto dx_block = dx.narrow(0, first, rows);
        at::mm_out(dx_block, du.narrow(0, first, rows), lora_A);
      }
      at::parallel_for(first, first + rows, row_grain(d), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          for_each_group(mask.seed, row, d, [&](int64_t g, const Philox4& words) {
            if (need_dA) dropout_group(in, dropped_rows, mask, words, row, g, row - first);
            if (need_dx) dropout_group(as_const(dx_rows), dx_rows, mask, words, row, g, row);
          });
        }
      });
      if (need_dA) dA.addmm_(du_acc.narrow(0, first, rows).t(), dropped.narrow(0, 0, rows));
    }
  });
  return need_dA ? dA.to(x.scalar_type()) : dA;
}

}  // namespace moslora
