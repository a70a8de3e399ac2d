// The test hooks, built as their own extension module moslora_ext._testing
// (setup.py), so that the production moslora_ext._C carries none of them:
// the CUDA kernels' bodies (dropout_kernels.h, mixer_kernels.h) run on the
// host, over the same launches (launch.h) as their launchers in cuda/, so a
// machine without a GPU checks their index arithmetic against the reference;
// and the launches themselves, for any shape. Exposed as
// moslora_ext._testing.cuda_bodies_on_host. Header-only: it compiles none of
// the kernels' sources and needs nothing from _C. On the stable ABI as _C, so
// that one build loads under every torch _C does: the tensor functions are
// operators (moslora_ext_testing::*), launches a plain Python function.
#include "device_kernels.h"
#include "mixer_kernels.h"

#include <Python.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <limits>
#include <tuple>
#include <vector>

namespace moslora {
namespace {

DropoutSpec host_mask(double p, int64_t seed) {
  MOSLORA_CHECK_VALUE(p > 0.0 && p < 1.0, "cuda_bodies_on_host: p must be in (0, 1), got ", p);
  return DropoutSpec{static_cast<uint64_t>(seed), dropout_threshold(p), 1.0 / (1.0 - p)};
}

// A tensor filled with NaN, so that an element no thread writes shows up.
Tensor poisoned(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes) {
  auto t = torch::stable::new_empty(like, sizes);
  torch::stable::fill_(t, std::numeric_limits<double>::quiet_NaN());
  return t;
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

void check_rows(const Tensor& t, const char* name) {
  MOSLORA_CHECK_VALUE(t.dim() == 2 && t.stride(1) == 1 && t.is_cpu(), "cuda_bodies_on_host: ", name,
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
std::tuple<Tensor, Tensor> dropout_pair(const Tensor& x, const Tensor& dx, double p, int64_t seed,
                                                int64_t first_row) {
  check_rows(x, "x");
  MOSLORA_CHECK_VALUE(sizes_of(dx) == sizes_of(x) && dx.scalar_type() == x.scalar_type(), "cuda_bodies_on_host: dx");
  auto dropped = poisoned(x, x.sizes());
  auto dx_dropped = torch::stable::clone(torch::stable::contiguous(dx));
  MOSLORA_DISPATCH_FLOATING(x.scalar_type(), "dropout_pair", [&] {
    using acc_t = opmath_t<scalar_t>;
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
Tensor dropout_op(const Tensor& x, double p, int64_t seed) {
  check_rows(x, "x");
  auto out = poisoned(x, x.sizes());
  MOSLORA_DISPATCH_FLOATING(x.scalar_type(), "dropout", [&] {
    using acc_t = opmath_t<scalar_t>;
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
Tensor mixer_v(const Tensor& u, const Tensor& mixer) {
  MOSLORA_CHECK_VALUE(u.is_contiguous() && mixer.is_contiguous(), "cuda_bodies_on_host: contiguous u and mixer");
  const int64_t n = u.size(0), r = u.size(1);
  auto v = poisoned(u, u.sizes());
  MOSLORA_DISPATCH_FLOATING(u.scalar_type(), "mixer_forward", [&] {
    using acc_t = opmath_t<scalar_t>;
    for_grid_stride(grid_stride_launch(n * r), n * r, [&](int64_t idx) {
      mixer_forward_element<acc_t>(u.const_data_ptr<scalar_t>(), mixer.const_data_ptr<scalar_t>(),
                                   v.mutable_data_ptr<scalar_t>(), r, idx);
    });
  });
  return v;
}

// Every thread of mixer_backward_kernel's grid, then of reduce_partials_kernel's:
// (du, dmixer) = (dv mixer, dv^T u).
std::tuple<Tensor, Tensor> mixer_grads(const Tensor& dv, const Tensor& u,
                                                  const Tensor& mixer) {
  MOSLORA_CHECK_VALUE(dv.is_contiguous() && u.is_contiguous() && mixer.is_contiguous(),
                    "cuda_bodies_on_host: contiguous dv, u and mixer");
  const int64_t n = dv.size(0), r = dv.size(1);
  auto du = poisoned(dv, dv.sizes());
  auto dmixer = poisoned(dv, {r, r});
  MOSLORA_DISPATCH_FLOATING(dv.scalar_type(), "mixer_backward", [&] {
    using acc_t = opmath_t<scalar_t>;
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
// dropout for 2-byte and 8-byte elements. launches(n, d, r) in Python.
PyObject* launches(PyObject*, PyObject* args) {
  long long n, d, r;
  if (!PyArg_ParseTuple(args, "LLL", &n, &d, &r)) return nullptr;
  auto as_tuple = [](const Launch& l) {
    return Py_BuildValue("((LLL)L)", static_cast<long long>(l.grid.x), static_cast<long long>(l.grid.y),
                         static_cast<long long>(l.grid.z), static_cast<long long>(l.block));
  };
  const RowChunks chunks = mixer_row_chunks(n);
  const int64_t tile_16 = std::min<int64_t>(n, dropout_tile_rows(true, d, 2));
  const int64_t tile_64 = std::min<int64_t>(n, dropout_tile_rows(true, d, 8));
  const std::pair<const char*, PyObject*> items[] = {
      {"dropout_kernel", as_tuple(row_group_launch(n, d))},
      {"dropout_pair_kernel, 16-bit tile", as_tuple(row_group_launch(tile_16, d))},
      {"dropout_pair_kernel, 64-bit tile", as_tuple(row_group_launch(tile_64, d))},
      {"mixer_forward_kernel", as_tuple(grid_stride_launch(n * r))},
      {"mixer_backward_kernel", as_tuple(mixer_backward_launch(chunks))},
      {"reduce_partials_kernel", as_tuple(grid_stride_launch(r * r))},
      {"mixer_chunks", Py_BuildValue("(LL)", static_cast<long long>(chunks.count), static_cast<long long>(chunks.rows))},
      {"tile_rows", Py_BuildValue("(LL)", static_cast<long long>(dropout_tile_rows(true, d, 2)),
                                  static_cast<long long>(dropout_tile_rows(true, d, 8)))},
  };
  PyObject* out = PyDict_New();
  bool ok = out != nullptr;
  for (const auto& [name, value] : items) {
    ok = ok && value != nullptr && PyDict_SetItemString(out, name, value) == 0;
    Py_XDECREF(value);
  }
  if (!ok) Py_CLEAR(out);
  return out;
}

}  // namespace

}  // namespace moslora

STABLE_TORCH_LIBRARY(moslora_ext_testing, m) {
  m.def("dropout_pair(Tensor x, Tensor dx, float p, int seed, int first_row) -> (Tensor, Tensor)");
  m.def("dropout(Tensor x, float p, int seed) -> Tensor");
  m.def("mixer_forward(Tensor u, Tensor mixer) -> Tensor");
  m.def("mixer_backward(Tensor dv, Tensor u, Tensor mixer) -> (Tensor, Tensor)");
}

STABLE_TORCH_LIBRARY_IMPL(moslora_ext_testing, CPU, m) {
  m.impl("dropout_pair", TORCH_BOX(&moslora::dropout_pair));
  m.impl("dropout", TORCH_BOX(&moslora::dropout_op));
  m.impl("mixer_forward", TORCH_BOX(&moslora::mixer_v));
  m.impl("mixer_backward", TORCH_BOX(&moslora::mixer_grads));
}

// moslora_ext._testing, whose submodule cuda_bodies_on_host holds launches and
// the operators above (torch.ops.moslora_ext_testing.*).
extern "C" PyObject* PyInit__testing(void) {
  static PyMethodDef methods[] = {
      {"launches", moslora::launches, METH_VARARGS, "every kernel's ((grid x, y, z), block) for x (n, d) and rank r"},
      {nullptr, nullptr, 0, nullptr}};
  static PyModuleDef bodies_def = {PyModuleDef_HEAD_INIT, "moslora_ext._testing.cuda_bodies_on_host",
                                   "For the tests: the CUDA kernels' bodies run on the host over their grids.", -1,
                                   methods};
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_testing",
                                   "moslora_ext's test hooks: not part of the package's API.", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  PyObject* bodies = module ? PyModule_Create(&bodies_def) : nullptr;
  PyObject* torch = bodies ? PyImport_ImportModule("torch") : nullptr;
  PyObject* torch_ops = torch ? PyObject_GetAttrString(torch, "ops") : nullptr;
  PyObject* ops = torch_ops ? PyObject_GetAttrString(torch_ops, "moslora_ext_testing") : nullptr;
  bool ok = ops != nullptr;
  for (const char* name : {"dropout_pair", "dropout", "mixer_forward", "mixer_backward"}) {
    PyObject* op = ok ? PyObject_GetAttrString(ops, name) : nullptr;
    ok = op != nullptr && PyObject_SetAttrString(bodies, name, op) == 0;
    Py_XDECREF(op);
  }
  ok = ok && PyObject_SetAttrString(module, "cuda_bodies_on_host", bodies) == 0;
  Py_XDECREF(ops);
  Py_XDECREF(torch_ops);
  Py_XDECREF(torch);
  Py_XDECREF(bodies);
  if (!ok) Py_CLEAR(module);
  return module;
}
