// The one-pass products under dropout, written as host-device functions of a
// kernel's block and thread indices. cuda/dropout.cu launches them; the CPU
// kernels (cpu/dropout.cpp) call the bodies that suit a CPU, and testing.cpp
// runs every body on the host over the grids the CUDA launchers use, so the
// CPU tests exercise the CUDA kernels' index arithmetic.
//
//   U  = dropout(X) A^T      down_project_lane + lane_sum, one warp per row
//   dA = dU^T dropout(X)     dA_partial_thread (fp32, fixed row splits), then
//                            dA_reduce_element sums the splits in order
//   dX = dropout(dU A)       dX_group (before the base GEMM adds G W)
//   out = dropout(x)         dropout_group
//
// The mask of element (row, col) is that of kernel_math.h's apply_dropout: every
// kernel regenerates it in registers from (seed, row, col / 8).
#pragma once

#include "kernel_math.h"
#include "launch.h"

#include <algorithm>

namespace moslora {

constexpr int kWarpLanes = 32;
constexpr int kDownWarps = 4;     // warps (rows in flight) per block of the down-projection
constexpr int kDownRChunk = 16;   // outputs of U a warp accumulates per pass over its row
constexpr int kDARChunk = 8;      // rows of dA a thread accumulates (8 x 8 fp32 sums)
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

// dropout_kernel and dX_kernel: blocks of kGroupThreads column groups in x,
// rows grid-strided in y.
inline Launch row_group_launch(int64_t rows, int64_t cols) {
  return Launch{Grid3{group_blocks(cols), std::min<int64_t>(rows, 65535), 1}, kGroupThreads};
}

// down_project_kernel: blocks of kDownWarps warps, one row each, rows
// grid-strided beyond 2^16 blocks.
inline Launch down_project_launch(int64_t rows) {
  return Launch{Grid3{std::min<int64_t>((rows + kDownWarps - 1) / kDownWarps, int64_t(1) << 16), 1, 1},
                kDownWarps * kWarpLanes};
}

template <typename scalar_t>
MOSLORA_HOST_DEVICE int64_t column_groups(const Rows<scalar_t>& m) {
  return column_groups(m.cols);
}

// Group `group` of row `row` of x, dropped (row counts from the mask's row 0).
template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void dropped_group(const Rows<const scalar_t>& x, const DropoutMask<acc_t>& mask, int64_t row,
                                       int64_t group, acc_t (&v)[kDropoutColsPerCall]) {
  load_group(x.data + row * x.stride, group, x.cols, x.vec, v);
  apply_dropout(mask, static_cast<uint64_t>(row), group, v);
}

// ---------------------------------------------------------------------------
// U = dropout(X) A^T. A warp owns a row; lane l takes the column groups
// l, l + 32, ... and sums, for outputs i0 .. i0 + count - 1 (count <= 16),
// its share of <dropout(x_row), A[i]>. lane_sum() then adds the 32 shares.
// ---------------------------------------------------------------------------
template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void down_project_lane(const Rows<const scalar_t>& x, const Rows<const scalar_t>& lora_A,
                                           const DropoutMask<acc_t>& mask, int64_t row, int lane, int64_t i0,
                                           int count, acc_t (&share)[kDownRChunk]) {
  MOSLORA_UNROLL
  for (int i = 0; i < kDownRChunk; ++i) share[i] = acc_t(0);
  for (int64_t g = lane; g < column_groups(x); g += kWarpLanes) {
    acc_t xd[kDropoutColsPerCall];
    dropped_group(x, mask, row, g, xd);
    MOSLORA_UNROLL
    for (int i = 0; i < kDownRChunk; ++i) {
      if (i < count) {
        acc_t a[kDropoutColsPerCall];
        load_group(lora_A.data + (i0 + i) * lora_A.stride, g, lora_A.cols, lora_A.vec, a);
        MOSLORA_UNROLL
        for (int j = 0; j < kDropoutColsPerCall; ++j) share[i] += xd[j] * a[j];
      }
    }
  }
}

// The sum of the 32 lanes' values in the butterfly order of __shfl_xor_sync
// (every lane ends with the same sum). The host version takes all 32 values.
#if defined(__CUDA_ARCH__)
template <typename acc_t>
__device__ __forceinline__ acc_t lane_sum(acc_t v) {
  MOSLORA_UNROLL
  for (int offset = kWarpLanes / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  return v;
}
#else
template <typename acc_t>
inline acc_t lane_sum(const acc_t (&lanes)[kWarpLanes]) {
  acc_t v[kWarpLanes];
  for (int l = 0; l < kWarpLanes; ++l) v[l] = lanes[l];
  for (int offset = kWarpLanes / 2; offset > 0; offset /= 2) {
    acc_t next[kWarpLanes];
    for (int l = 0; l < kWarpLanes; ++l) next[l] = v[l] + v[l ^ offset];
    for (int l = 0; l < kWarpLanes; ++l) v[l] = next[l];
  }
  return v[0];
}
#endif

// ---------------------------------------------------------------------------
// dA = dU^T dropout(X), r x d. The rows are cut into `splits` fixed ranges;
// grid (column-group blocks, r / 8, splits). A thread owns one column group
// and 8 rows of dA, and sums over its range of rows in fp32 into
// partials[split] (r x d). dA_reduce_element adds the splits in order, so the
// result does not depend on scheduling.
// ---------------------------------------------------------------------------
struct DASplits {
  int64_t count;  // number of row ranges (<= 64, the grid's z limit)
  int64_t rows;   // rows per range (the last may have fewer)
};

// Enough ranges to fill a GPU at small d, few enough that the fp32 partials
// stay under 64 MiB; a function of the shapes alone (determinism).
MOSLORA_HOST_DEVICE DASplits dA_splits(int64_t n, int64_t r, int64_t d) {
  const int64_t min_rows = 256, max_count = 64, max_partial_elems = int64_t(1) << 24;
  const int64_t cap = max_partial_elems / (r * d > 0 ? r * d : 1);
  int64_t count = (n + min_rows - 1) / min_rows;
  count = count < max_count ? count : max_count;
  count = count < cap ? count : cap;
  const int64_t rows = count > 1 ? (n + count - 1) / count : (n > 1 ? n : 1);
  return DASplits{(n + rows - 1) / rows > 1 ? (n + rows - 1) / rows : 1, rows};
}

// dA_partial_kernel: blocks of kGroupThreads column groups in x, 8 rows of
// dA in y, splits in z.
inline Launch dA_partial_launch(const DASplits& splits, int64_t r, int64_t d) {
  return Launch{Grid3{group_blocks(d), (r + kDARChunk - 1) / kDARChunk, splits.count}, kGroupThreads};
}

template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void dA_partial_thread(const Rows<const scalar_t>& x, const scalar_t* du, int64_t r,
                                           const DropoutMask<acc_t>& mask, int64_t n, DASplits splits,
                                           int64_t group, int64_t i0, int64_t split, acc_t* partials) {
  if (group >= column_groups(x)) return;
  acc_t acc[kDARChunk][kDropoutColsPerCall];
  MOSLORA_UNROLL
  for (int i = 0; i < kDARChunk; ++i) {
    MOSLORA_UNROLL
    for (int j = 0; j < kDropoutColsPerCall; ++j) acc[i][j] = acc_t(0);
  }
  const int64_t begin = split * splits.rows, end = begin + splits.rows < n ? begin + splits.rows : n;
  for (int64_t row = begin; row < end; ++row) {
    acc_t xd[kDropoutColsPerCall];
    dropped_group(x, mask, row, group, xd);
    MOSLORA_UNROLL
    for (int i = 0; i < kDARChunk; ++i) {
      const acc_t g = i0 + i < r ? static_cast<acc_t>(du[row * r + i0 + i]) : acc_t(0);
      MOSLORA_UNROLL
      for (int j = 0; j < kDropoutColsPerCall; ++j) acc[i][j] += g * xd[j];
    }
  }
  acc_t* out = partials + split * r * x.cols;
  const int64_t first = group * kDropoutColsPerCall;
  MOSLORA_UNROLL
  for (int i = 0; i < kDARChunk; ++i) {
    MOSLORA_UNROLL
    for (int j = 0; j < kDropoutColsPerCall; ++j) {
      if (i0 + i < r && first + j < x.cols) out[(i0 + i) * x.cols + first + j] = acc[i][j];
    }
  }
}

// Element e of dA (row-major r x d = rd elements): the splits' sum, in order.
template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void dA_reduce_element(const acc_t* partials, int64_t splits, int64_t rd, int64_t e,
                                           scalar_t* dA) {
  acc_t sum = acc_t(0);
  for (int64_t s = 0; s < splits; ++s) sum += partials[s * rd + e];
  dA[e] = static_cast<scalar_t>(sum);
}

// ---------------------------------------------------------------------------
// dX = dropout(dU A): one thread, one column group of one row: r FMAs per
// column in fp32, the mask, one store.
// ---------------------------------------------------------------------------
template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void dX_group(const scalar_t* du, const Rows<const scalar_t>& lora_A, int64_t r,
                                  const DropoutMask<acc_t>& mask, const Rows<scalar_t>& dx, int64_t row,
                                  int64_t group) {
  acc_t acc[kDropoutColsPerCall];
  MOSLORA_UNROLL
  for (int j = 0; j < kDropoutColsPerCall; ++j) acc[j] = acc_t(0);
  for (int64_t i = 0; i < r; ++i) {
    acc_t a[kDropoutColsPerCall];
    load_group(lora_A.data + i * lora_A.stride, group, lora_A.cols, lora_A.vec, a);
    const acc_t g = static_cast<acc_t>(du[row * r + i]);
    MOSLORA_UNROLL
    for (int j = 0; j < kDropoutColsPerCall; ++j) acc[j] += g * a[j];
  }
  apply_dropout(mask, static_cast<uint64_t>(row), group, acc);
  store_group(dx.data + row * dx.stride, group, dx.cols, dx.vec, acc);
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

}  // namespace moslora
