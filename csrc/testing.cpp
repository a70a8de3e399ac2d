// The test hooks, built as their own extension module moslora_ext._testing
// (setup.py), so that the production moslora_ext._C carries none of them:
// the CUDA kernels' bodies (dropout_kernels.h, mixer_kernels.h) run on the
// host, over the same launches (launch.h) as their launchers in cuda/, so a
// machine without a GPU checks their index arithmetic against the reference;
// and the launches themselves, for any shape. Exposed as
// moslora_ext._testing.cuda_bodies_on_host. Header-only: it compiles none of
// the kernels' sources and needs nothing from _C.
#include "device_kernels.h"
#include "mixer_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <torch/csrc/utils/pybind.h>

#include <limits>
#include <tuple>
#include <vector>

namespace moslora {
namespace {

DropoutSpec host_mask(double p, int64_t seed) {
  TORCH_CHECK_VALUE(p > 0.0 && p < 1.0, "cuda_bodies_on_host: p must be in (0, 1), got ", p);
  return DropoutSpec{static_cast<uint64_t>(seed), dropout_threshold(p), 1.0 / (1.0 - p)};
}

// A tensor filled with NaN, so that an element no thread writes shows up.
at::Tensor poisoned(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}

// Every thread of a grid-stride kernel's launch over `work` items: fn(item).
template <typename Fn>
void for_grid_stride(const Launch& launch, int64_t work, const Fn& fn) {
  const int64_t stride = launch.grid.x * launch.block;
  for (int64_t block = 0; block < launch.grid.x; ++block) {
    for (int64_t t = 0; t < launch.block; ++t) {
      for (int64_t i = block * launch.block + t; i < work; i += stride) fn(i);
    }
  }
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.stride(1) == 1 && t.device().is_cpu(), "cuda_bodies_on_host: ", name,
                    " must be a 2-D CPU tensor with unit column stride");
}

// Every thread of a row_group_launch (dropout_kernel, dropout_pair_kernel): fn(row, group)
// for the groups inside the row and the rows of its grid-stride loop.
template <typename Fn>
void for_row_groups(int64_t n, int64_t cols, const Fn& fn) {
  const Launch launch = row_group_launch(n, cols);
  for (int64_t bx = 0; bx < launch.grid.x; ++bx) {
    for (int64_t by = 0; by < launch.grid.y; ++by) {
      for (int64_t t = 0; t < launch.block; ++t) {
        const int64_t group = bx * launch.block + t;
        if (group >= column_groups(cols)) continue;
        for (int64_t row = by; row < n; row += launch.grid.y) fn(row, group);
      }
    }
  }
}

// Every thread of dropout_pair_kernel's grid over a tile whose first row is
// mask row first_row: (dropout(x), dropout(dx)), dx's copy dropped in place.
std::tuple<at::Tensor, at::Tensor> dropout_pair(const at::Tensor& x, const at::Tensor& dx, double p, int64_t seed,
                                                int64_t first_row) {
  check_rows(x, "x");
  TORCH_CHECK_VALUE(dx.sizes() == x.sizes() && dx.scalar_type() == x.scalar_type(), "cuda_bodies_on_host: dx");
  auto dropped = poisoned(x.sizes(), x.options());
  auto dx_dropped = dx.contiguous().clone();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_pair", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = rows_of<const scalar_t>(x);
    const auto out = rows_of<scalar_t>(dropped), grad = rows_of<scalar_t>(dx_dropped);
    const auto mask = mask_of<acc_t>(host_mask(p, seed));
    for_row_groups(x.size(0), in.cols, [&](int64_t row, int64_t group) {
      dropout_pair_group(in, out, grad, mask, first_row, row, group);
    });
  });
  return {dropped, dx_dropped};
}

// Every thread of dropout_kernel's grid (the dropout op), mask rows from 0.
at::Tensor dropout_op(const at::Tensor& x, double p, int64_t seed) {
  check_rows(x, "x");
  auto out = poisoned(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto in = rows_of<const scalar_t>(x);
    const auto res = rows_of<scalar_t>(out);
    const auto mask = mask_of<acc_t>(host_mask(p, seed));
    for_row_groups(x.size(0), in.cols, [&](int64_t row, int64_t group) {
      dropout_group(in, res, mask, int64_t(0), row, group);
    });
  });
  return out;
}

// Every thread of mixer_forward_kernel's grid: v = u mixer^T.
at::Tensor mixer_v(const at::Tensor& u, const at::Tensor& mixer) {
  TORCH_CHECK_VALUE(u.is_contiguous() && mixer.is_contiguous(), "cuda_bodies_on_host: contiguous u and mixer");
  const int64_t n = u.size(0), r = u.size(1);
  auto v = poisoned(u.sizes(), u.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "mixer_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_grid_stride(grid_stride_launch(n * r), n * r, [&](int64_t idx) {
      mixer_forward_element<acc_t>(u.const_data_ptr<scalar_t>(), mixer.const_data_ptr<scalar_t>(),
                                   v.mutable_data_ptr<scalar_t>(), r, idx);
    });
  });
  return v;
}

// Every thread of mixer_backward_kernel's grid, then of reduce_partials_kernel's:
// (du, dmixer) = (dv mixer, dv^T u).
std::tuple<at::Tensor, at::Tensor> mixer_grads(const at::Tensor& dv, const at::Tensor& u,
                                                  const at::Tensor& mixer) {
  TORCH_CHECK_VALUE(dv.is_contiguous() && u.is_contiguous() && mixer.is_contiguous(),
                    "cuda_bodies_on_host: contiguous dv, u and mixer");
  const int64_t n = dv.size(0), r = dv.size(1);
  auto du = poisoned(dv.sizes(), dv.options());
  auto dmixer = poisoned({r, r}, dv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dv.scalar_type(), "mixer_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const RowChunks chunks = mixer_row_chunks(n);
    std::vector<acc_t> partials(chunks.count * r * r, std::numeric_limits<acc_t>::quiet_NaN());
    const Launch launch = mixer_backward_launch(chunks);
    for (int64_t block = 0; block < launch.grid.x; ++block) {
      for (int64_t t = 0; t < launch.block; ++t) {
        mixer_backward_thread(dv.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                              mixer.const_data_ptr<scalar_t>(), du.mutable_data_ptr<scalar_t>(), partials.data(),
                              n, r, chunks.rows, block, t, launch.block);
      }
    }
    for_grid_stride(grid_stride_launch(r * r), r * r, [&](int64_t idx) {
      reduce_partials_element(partials.data(), dmixer.mutable_data_ptr<scalar_t>(), chunks.count, r * r, idx);
    });
  });
  return {du, dmixer};
}

// The launch of every kernel for x (n, d) and rank r, as its launcher computes
// it: name -> ((grid x, y, z), block); the row chunks of the mixer backward
// as (count, rows); and the rows of a CUDA tile of the products under
// dropout for 2-byte and 8-byte elements.
pybind11::dict launches(int64_t n, int64_t d, int64_t r) {
  auto as_tuple = [](const Launch& l) {
    return pybind11::make_tuple(pybind11::make_tuple(l.grid.x, l.grid.y, l.grid.z), l.block);
  };
  const RowChunks chunks = mixer_row_chunks(n);
  const int64_t tile_16 = std::min(n, dropout_tile_rows(true, d, 2));
  const int64_t tile_64 = std::min(n, dropout_tile_rows(true, d, 8));
  pybind11::dict out;
  out["dropout_kernel"] = as_tuple(row_group_launch(n, d));
  out["dropout_pair_kernel, 16-bit tile"] = as_tuple(row_group_launch(tile_16, d));
  out["dropout_pair_kernel, 64-bit tile"] = as_tuple(row_group_launch(tile_64, d));
  out["mixer_forward_kernel"] = as_tuple(grid_stride_launch(n * r));
  out["mixer_backward_kernel"] = as_tuple(mixer_backward_launch(chunks));
  out["reduce_partials_kernel"] = as_tuple(grid_stride_launch(r * r));
  out["mixer_chunks"] = pybind11::make_tuple(chunks.count, chunks.rows);
  out["tile_rows"] = pybind11::make_tuple(dropout_tile_rows(true, d, 2), dropout_tile_rows(true, d, 8));
  return out;
}

}  // namespace

}  // namespace moslora

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace moslora;
  m.doc() = "moslora_ext's test hooks: not part of the package's API.";
  auto sub = m.def_submodule("cuda_bodies_on_host",
                             "For the tests: the CUDA kernels' bodies run on the host over their grids.");
  sub.def("dropout_pair", &dropout_pair, "(dropout(x), dropout(dx)) with mask rows from first_row");
  sub.def("dropout", &dropout_op, "out = dropout(x)");
  sub.def("mixer_forward", &mixer_v, "v = u mixer^T");
  sub.def("mixer_backward", &mixer_grads, "(dv mixer, dv^T u)");
  sub.def("launches", &launches, "every kernel's ((grid x, y, z), block) for x (n, d) and rank r");
}
