// The products under dropout, for CPU and CUDA alike: a tile of rows at a
// time, one dropout pass (the device kernels of device_kernels.h) writes the dropped
// tile, and the GEMM (cuBLAS on CUDA, tensor cores for half precision) reads
// it back while it is still in cache. x is read once, the mask drawn once per
// product, A is read by the GEMM only, and nothing N x d is kept: the tile
// buffer holds dropout_tile_rows rows and is reused.
#include "device_kernels.h"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

namespace moslora {

at::Tensor dropout_project_down(const at::Tensor& x, const at::Tensor& lora_A, const DropoutSpec& spec) {
  const bool cuda = x.is_cuda();
  const int64_t n = x.size(0), tile = dropout_tile_rows(cuda, x.size(1), x.element_size());
  auto u = at::empty({n, lora_A.size(0)}, x.options());
  auto dropped = at::empty({std::min(tile, n), x.size(1)}, x.options());
  for (int64_t first = 0; first < n; first += tile) {
    const int64_t rows = std::min(tile, n - first);
    auto dropped_tile = dropped.narrow(0, 0, rows);
    ON_DEVICE(cuda, dropout_rows, x.narrow(0, first, rows), dropped_tile, spec, first);
    auto u_tile = u.narrow(0, first, rows);
    at::mm_out(u_tile, dropped_tile, lora_A.t());
  }
  return u;
}

// Per tile: dX's tile is du A (a GEMM), then one pass draws each mask group
// once to drop it in place and to write the dropped tile of x that dA's GEMM
// adds up. For half precision dA sums the tiles in fp32 and rounds once: on
// CUDA the tile stays in x's dtype and the GEMM returns fp32 (mm's
// out_dtype, tensor cores); the CPU's GEMM has no such mode, so there the
// tile is written in fp32.
at::Tensor dropout_grads(const at::Tensor& x, const at::Tensor& du, const at::Tensor& lora_A, const at::Tensor& dx,
                         bool need_dA, const DropoutSpec& spec) {
  const bool cuda = x.is_cuda(), need_dx = dx.defined();
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const bool fp32_result_gemm = cuda && acc_type != x.scalar_type();
  const int64_t n = x.size(0), d = x.size(1), tile = dropout_tile_rows(cuda, d, x.element_size());
  at::Tensor dA, du_for_dA, dropped;
  if (need_dA) {
    dA = at::zeros({du.size(1), d}, x.options().dtype(acc_type));
    du_for_dA = fp32_result_gemm ? du : du.to(acc_type);
    dropped = at::empty({std::min(tile, n), d}, x.options().dtype(fp32_result_gemm ? x.scalar_type() : acc_type));
  }
  for (int64_t first = 0; first < n; first += tile) {
    const int64_t rows = std::min(tile, n - first);
    at::Tensor dx_tile, dropped_tile;
    if (need_dx) {
      dx_tile = dx.narrow(0, first, rows);
      at::mm_out(dx_tile, du.narrow(0, first, rows), lora_A);
    }
    if (need_dA) dropped_tile = dropped.narrow(0, 0, rows);
    ON_DEVICE(cuda, dropout_pair_rows, x.narrow(0, first, rows), dropped_tile, dx_tile, spec, first);
    if (!need_dA) continue;
    const auto du_tile = du_for_dA.narrow(0, first, rows).t();
    if (fp32_result_gemm) {
      dA.add_(at::mm(du_tile, dropped_tile, at::kFloat));
    } else {
      dA.addmm_(du_tile, dropped_tile);
    }
  }
  return need_dA ? dA.to(x.scalar_type()) : dA;
}

}  // namespace moslora
