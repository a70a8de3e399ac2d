// The products under dropout, for CPU and CUDA alike: a tile of rows at a
// time, one dropout pass (the device kernels of device_kernels.h) writes the dropped
// tile, and the GEMM (cuBLAS on CUDA, tensor cores for half precision) reads
// it back while it is still in cache. x is read once, the mask drawn once per
// product, A is read by the GEMM only, and nothing N x d is kept: the tile
// buffer holds dropout_tile_rows rows and is reused.
#include "device_kernels.h"

#include <torch/csrc/stable/ops.h>

namespace moslora {

Tensor dropout_project_down(const Tensor& x, int64_t r, const DropoutSpec& spec, const RowProducts& products) {
  const bool cuda = x.is_cuda();
  const int64_t n = x.size(0), tile = dropout_tile_rows(cuda, x.size(1), x.element_size());
  auto u = torch::stable::new_empty(x, {n, r});
  auto dropped = torch::stable::new_empty(x, {std::min(tile, n), x.size(1)});
  for (int64_t first = 0; first < n; first += tile) {
    const int64_t rows = std::min(tile, n - first);
    auto dropped_tile = row_range(dropped, 0, rows);
    ON_DEVICE(cuda, dropout_rows, row_range(x, first, rows), dropped_tile, spec, first);
    products.down(dropped_tile, first, row_range(u, first, rows));
  }
  return u;
}

// Per tile: dX's tile is du A (a GEMM), then one pass draws each mask group
// once to drop it in place and to write the dropped tile of x that dA's GEMM
// adds up. For half precision dA sums the tiles in fp32 and rounds once: on
// CUDA the tile stays in x's dtype and the GEMM returns fp32 (mm's
// out_dtype, tensor cores); the CPU's GEMM has no such mode, so there the
// tile is written in fp32.
Tensor dropout_grads(const Tensor& x, const Tensor& du, const Tensor& dx, bool need_dA,
                     torch::headeronly::IntHeaderOnlyArrayRef dA_sizes, const DropoutSpec& spec, const RowProducts& products) {
  const bool cuda = x.is_cuda(), need_dx = dx.defined();
  const auto acc_type = opmath_type(x.scalar_type());
  const bool fp32_result_gemm = cuda && acc_type != x.scalar_type();
  const int64_t n = x.size(0), d = x.size(1), tile = dropout_tile_rows(cuda, d, x.element_size());
  Tensor dA, du_for_dA, dropped;
  if (need_dA) {
    dA = torch::stable::new_zeros(x, dA_sizes, acc_type);
    du_for_dA = fp32_result_gemm ? du : torch::stable::to(du, acc_type);
    dropped = torch::stable::new_empty(x, {std::min(tile, n), d}, fp32_result_gemm ? x.scalar_type() : acc_type);
  }
  for (int64_t first = 0; first < n; first += tile) {
    const int64_t rows = std::min(tile, n - first);
    Tensor dx_tile, dropped_tile;
    if (need_dx) {
      dx_tile = row_range(dx, first, rows);
      products.up(row_range(du, first, rows), first, dx_tile);
    }
    if (need_dA) dropped_tile = row_range(dropped, 0, rows);
    ON_DEVICE(cuda, dropout_pair_rows, row_range(x, first, rows), dropped_tile, dx_tile, spec, first);
    if (need_dA) products.add_grad_A(dA, t(row_range(du_for_dA, first, rows)), dropped_tile, first, fp32_result_gemm);
  }
  return need_dA ? torch::stable::to(dA, x.scalar_type()) : dA;
}

}  // namespace moslora
