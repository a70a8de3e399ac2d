// For the tests only: the CUDA kernels' bodies (dropout_kernels.h) run on the
// host, over the same grids, blocks, warps and lanes as their launchers in
// cuda/dropout.cu, so a machine without a GPU checks their index arithmetic
// against the reference. Exposed as moslora_ext._C.cuda_bodies_on_host.
#include "kernels.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/csrc/utils/pybind.h>

namespace moslora {
namespace {

DropoutSpec host_mask(double p, int64_t seed) {
  TORCH_CHECK_VALUE(p > 0.0 && p < 1.0, "cuda_bodies_on_host: p must be in (0, 1), got ", p);
  return DropoutSpec{static_cast<uint64_t>(seed), dropout_threshold(p), 1.0 / (1.0 - p)};
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.stride(1) == 1 && t.device().is_cpu(), "cuda_bodies_on_host: ", name,
                    " must be a 2-D CPU tensor with unit column stride");
}

// Every (block, warp, lane) of down_project_kernel's grid; lane_sum over the
// 32 lanes' shares as the warp's shuffles add them.
at::Tensor down_project(const at::Tensor& x, const at::Tensor& lora_A, double p, int64_t seed) {
  check_rows(x, "x");
  check_rows(lora_A, "lora_A");
  const int64_t n = x.size(0), r = lora_A.size(0);
  auto u = at::empty({n, r}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "down_project", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto xr = rows_of<const scalar_t>(x), ar = rows_of<const scalar_t>(lora_A);
    const auto mask = mask_of<acc_t>(host_mask(p, seed));
    scalar_t* out = u.mutable_data_ptr<scalar_t>();
    const Grid3 grid = down_project_grid(n);
    for (int64_t block = 0; block < grid.x; ++block) {
      for (int warp = 0; warp < kDownWarps; ++warp) {
        for (int64_t row = block * kDownWarps + warp; row < n; row += grid.x * kDownWarps) {
          for (int64_t i0 = 0; i0 < r; i0 += kDownRChunk) {
            const int count = static_cast<int>(std::min<int64_t>(kDownRChunk, r - i0));
            acc_t shares[kWarpLanes][kDownRChunk];
            for (int lane = 0; lane < kWarpLanes; ++lane) {
              down_project_lane(xr, ar, mask, row, lane, i0, count, shares[lane]);
            }
            for (int i = 0; i < count; ++i) {
              acc_t lanes[kWarpLanes];
              for (int lane = 0; lane < kWarpLanes; ++lane) lanes[lane] = shares[lane][i];
              out[row * r + i0 + i] = static_cast<scalar_t>(lane_sum(lanes));
            }
          }
        }
      }
    }
  });
  return u;
}

// Every thread of dA_partial_kernel's grid, then every element of dA_reduce_kernel.
at::Tensor grad_A(const at::Tensor& x, const at::Tensor& du, double p, int64_t seed) {
  check_rows(x, "x");
  TORCH_CHECK_VALUE(du.is_contiguous() && du.dim() == 2 && du.size(0) == x.size(0), "cuda_bodies_on_host: du");
  const int64_t n = x.size(0), d = x.size(1), r = du.size(1);
  auto dA = at::empty({r, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "grad_A", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const DASplits splits = dA_splits(n, r, d);
    // Poisoned, so that an element no thread writes shows up as NaN.
    std::vector<acc_t> partials(splits.count * r * d, std::numeric_limits<acc_t>::quiet_NaN());
    const auto mask = mask_of<acc_t>(host_mask(p, seed));
    const Grid3 grid = dA_partial_grid(splits, r, d);
    for (int64_t bx = 0; bx < grid.x; ++bx) {
      for (int64_t by = 0; by < grid.y; ++by) {
        for (int64_t bz = 0; bz < grid.z; ++bz) {
          for (int t = 0; t < kGroupThreads; ++t) {
            dA_partial_thread(rows_of<const scalar_t>(x), du.const_data_ptr<scalar_t>(), r, mask, n, splits,
                              bx * kGroupThreads + t, by * kDARChunk, bz, partials.data());
          }
        }
      }
    }
    for (int64_t e = 0; e < r * d; ++e) {
      dA_reduce_element(partials.data(), splits.count, r * d, e, dA.mutable_data_ptr<scalar_t>());
    }
  });
  return dA;
}

// Every thread of dX_kernel's grid.
at::Tensor grad_x(const at::Tensor& du, const at::Tensor& lora_A, double p, int64_t seed) {
  check_rows(lora_A, "lora_A");
  TORCH_CHECK_VALUE(du.is_contiguous() && du.dim() == 2 && du.size(1) == lora_A.size(0),
                    "cuda_bodies_on_host: du");
  const int64_t n = du.size(0), r = du.size(1);
  auto dx = at::full({n, lora_A.size(1)}, std::numeric_limits<double>::quiet_NaN(), du.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, du.scalar_type(), "grad_x", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto out = rows_of<scalar_t>(dx);
    const auto mask = mask_of<acc_t>(host_mask(p, seed));
    const Grid3 grid = row_group_grid(n, out.cols);
    for (int64_t bx = 0; bx < grid.x; ++bx) {
      for (int64_t by = 0; by < grid.y; ++by) {
        for (int t = 0; t < kGroupThreads; ++t) {
          const int64_t group = bx * kGroupThreads + t;
          if (group >= column_groups(out)) continue;
          for (int64_t row = by; row < n; row += grid.y) {
            dX_group(du.const_data_ptr<scalar_t>(), rows_of<const scalar_t>(lora_A), r, mask, out, row, group);
          }
        }
      }
    }
  });
  return dx;
}

}  // namespace

void add_testing_functions(PyObject* module) {
  auto m = pybind11::reinterpret_borrow<pybind11::module_>(module);
  auto sub = m.def_submodule("cuda_bodies_on_host",
                             "For the tests: the CUDA dropout kernels' bodies run on the host over their grids.");
  sub.def("down_project", &down_project, "U = dropout(x) lora_A^T");
  sub.def("grad_A", &grad_A, "dA = du^T dropout(x)");
  sub.def("grad_x", &grad_x, "dX = dropout(du lora_A)");
}

}  // namespace moslora
