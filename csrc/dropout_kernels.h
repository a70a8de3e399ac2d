// The dropout passes, written as host-device functions of a kernel's block
// and thread indices. cuda/dropout.cu launches them, the CPU kernels
// (cpu/dropout.cpp) call them row by row, and testing.cpp runs every body on
// the host over the grids the CUDA launchers use, so the CPU tests exercise
// the CUDA kernels' index arithmetic.
//
//   out = dropout(x)                          dropout_group (the dropout op, and
//                                             the dropped tile of x in forward)
//   dropped = dropout(x), dx = dropout(dx)    dropout_pair_group (backward: one
//                                             mask draw for both)
//
// The products under dropout (dropout_matmul.cpp) run these passes on a tile
// of rows and hand the tile to the GEMMs. The mask of element (row, col) is
// that of dropout_math.h's apply_dropout: every kernel regenerates it in
// registers from (seed, row, col / 8).
#pragma once

#include "dropout_math.h"
#include "launch.h"

#include <algorithm>

namespace moslora {

constexpr int kGroupThreads = 128;  // threads per block of the column-group kernels

// A row-major matrix the kernels read or write: rows of `cols` elements,
// `stride` apart; `vec`: groups_aligned() holds, so 16-byte accesses are legal.
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t cols;
  int64_t stride;
  bool vec;
};

template <typename T>
MOSLORA_HOST_DEVICE Rows<const T> as_const(const Rows<T>& m) {
  return Rows<const T>{m.data, m.cols, m.stride, m.vec};
}

// Column groups (one Philox call each) of a row of `cols` columns.
MOSLORA_HOST_DEVICE int64_t column_groups(int64_t cols) {
  return (cols + kDropoutColsPerCall - 1) / kDropoutColsPerCall;
}

// Blocks of kGroupThreads column groups over `cols` columns.
inline int64_t group_blocks(int64_t cols) {
  return (column_groups(cols) + kGroupThreads - 1) / kGroupThreads;
}

// dropout_kernel and dropout_pair_kernel: blocks of kGroupThreads column
// groups in x, rows grid-strided in y.
inline Launch row_group_launch(int64_t rows, int64_t cols) {
  return Launch{Grid3{group_blocks(cols), std::min<int64_t>(rows, 65535), 1}, kGroupThreads};
}

template <typename scalar_t>
MOSLORA_HOST_DEVICE int64_t column_groups(const Rows<scalar_t>& m) {
  return column_groups(m.cols);
}

// out = dropout(x): one column group, given its Philox words; x's row `row`
// goes to out's row out_row. out may be x itself, or wider (fp32 of bf16).
template <typename acc_t, typename in_t, typename out_t>
MOSLORA_HOST_DEVICE void dropout_group(const Rows<const in_t>& x, const Rows<out_t>& out,
                                       const DropoutMask<acc_t>& mask, const Philox4& words, int64_t row,
                                       int64_t group, int64_t out_row) {
  acc_t v[kDropoutColsPerCall];
  load_group(x.data + row * x.stride, group, x.cols, x.vec, v);
  apply_dropout(mask, words, v);
  store_group(out.data + out_row * out.stride, group, out.cols, out.vec, v);
}

// The same with x's and out's rows alike; the mask row is first_row + row.
template <typename acc_t, typename in_t, typename out_t>
MOSLORA_HOST_DEVICE void dropout_group(const Rows<const in_t>& x, const Rows<out_t>& out,
                                       const DropoutMask<acc_t>& mask, int64_t first_row, int64_t row,
                                       int64_t group) {
  dropout_group(x, out, mask, philox4x32_10(mask.seed, static_cast<uint64_t>(first_row + row),
                                            static_cast<uint32_t>(group)), row, group, row);
}

// Backward's pass over one column group of row `row` of a tile: the group's
// Philox words drawn once for dropped = dropout(x) (when dropped.data is set)
// and dx = dropout(dx) in place (when dx.data is set); the mask row is
// first_row + row.
template <typename acc_t, typename in_t, typename out_t>
MOSLORA_HOST_DEVICE void dropout_pair_group(const Rows<const in_t>& x, const Rows<out_t>& dropped,
                                            const Rows<in_t>& dx, const DropoutMask<acc_t>& mask, int64_t first_row,
                                            int64_t row, int64_t group) {
  const Philox4 words = philox4x32_10(mask.seed, static_cast<uint64_t>(first_row + row), static_cast<uint32_t>(group));
  if (dropped.data != nullptr) dropout_group(x, dropped, mask, words, row, group, row);
  if (dx.data != nullptr) dropout_group(as_const(dx), dx, mask, words, row, group, row);
}

}  // namespace moslora
