// The dropout mask, shared by the CPU and CUDA kernels: one definition of the
// Philox draw, of the keep/drop decision and of the column groups that read
// and write a row, so both devices compute the same thing.
#pragma once

#include "host_device.h"

#include <cstdint>

namespace moslora {

// ---------------------------------------------------------------------------
// Dropout mask: Philox-4x32-10 (Salmon et al., 2011), a counter-based RNG.
// The keep/drop decision for element (row, col) is a pure function of
// (seed, row, col), so backward regenerates the mask instead of storing it,
// and CPU and CUDA draw the same mask for the same seed.
// One Philox call yields 128 bits, 16 per element: columns 8c..8c+7 share
// counter c. (16 bits put p on a grid of 2^-16 and let one call serve 8
// elements instead of 4.)
// ---------------------------------------------------------------------------
constexpr int kDropoutColsPerCall = 8;

struct Philox4 {
  uint32_t w[4];
};

MOSLORA_HOST_DEVICE Philox4 philox4x32_10(uint64_t seed, uint64_t row, uint32_t col_group) {
  uint32_t c0 = col_group, c1 = static_cast<uint32_t>(row),
           c2 = static_cast<uint32_t>(row >> 32), c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Dropout with probability p keeps column 8c + lane when its 16 bits of the
// Philox output for counter c are >= drop_threshold = round(p * 2^16).
MOSLORA_HOST_DEVICE bool dropout_keep(const Philox4& words, int lane, uint32_t drop_threshold) {
  return ((words.w[lane >> 1] >> ((lane & 1) * 16)) & 0xFFFFu) >= drop_threshold;
}

// The factor an element is multiplied by: 1/(1-p) if kept, else 0 (a
// multiplication, as torch's dropout, so inf/NaN inputs stay visible).
template <typename acc_t>
MOSLORA_HOST_DEVICE acc_t dropout_factor(const Philox4& words, int lane, uint32_t drop_threshold,
                                         acc_t keep_scale) {
  return dropout_keep(words, lane, drop_threshold) ? keep_scale : acc_t(0);
}

// Dropout keeps an element with probability 1 - p rounded to the 2^-16 grid.
MOSLORA_HOST_DEVICE uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 65536.0 + 0.5);
}

// What regenerates a dropout mask, in the precision the kernels compute in:
// Philox seed, the threshold of dropout_keep() and the 1/(1-p) of kept elements.
template <typename acc_t>
struct DropoutMask {
  uint64_t seed;
  uint32_t drop_threshold;
  acc_t keep_scale;
};

// What regenerates a dropout mask, as the ops receive it (scale in double);
// mask_of gives the kernels' copy in their accumulation type.
using DropoutSpec = DropoutMask<double>;

template <typename acc_t>
DropoutMask<acc_t> mask_of(const DropoutSpec& spec) {
  return DropoutMask<acc_t>{spec.seed, spec.drop_threshold, static_cast<acc_t>(spec.keep_scale)};
}

// ---------------------------------------------------------------------------
// Column groups: the kernels that touch a row of x (or of dX) work on it 8
// columns at a time, the columns of one Philox call. A group is loaded into
// acc_t registers (columns past the row's end read as 0) and stored back
// with 16-byte accesses on the device when `vec` says the rows allow it.
// ---------------------------------------------------------------------------
template <typename scalar_t>
struct alignas(16) ColumnGroup {
  scalar_t v[kDropoutColsPerCall];
};

// Whether every group of a matrix with this base pointer and row stride (in
// elements) starts on a 16-byte boundary, so ColumnGroup accesses are legal.
template <typename scalar_t>
MOSLORA_HOST_DEVICE bool groups_aligned(const scalar_t* base, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && row_stride % kDropoutColsPerCall == 0;
}

template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void load_group(const scalar_t* row, int64_t group, int64_t cols, bool vec,
                                    acc_t (&v)[kDropoutColsPerCall]) {
  const int64_t first = group * kDropoutColsPerCall;
  if (first + kDropoutColsPerCall <= cols) {
#if defined(__CUDA_ARCH__)
    if (vec) {
      const ColumnGroup<scalar_t> g = *reinterpret_cast<const ColumnGroup<scalar_t>*>(row + first);
      MOSLORA_UNROLL
      for (int j = 0; j < kDropoutColsPerCall; ++j) v[j] = static_cast<acc_t>(g.v[j]);
      return;
    }
#endif
    MOSLORA_UNROLL
    for (int j = 0; j < kDropoutColsPerCall; ++j) v[j] = static_cast<acc_t>(row[first + j]);
    return;
  }
  MOSLORA_UNROLL
  for (int j = 0; j < kDropoutColsPerCall; ++j) {
    v[j] = first + j < cols ? static_cast<acc_t>(row[first + j]) : acc_t(0);
  }
}

template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void store_group(scalar_t* row, int64_t group, int64_t cols, bool vec,
                                     const acc_t (&v)[kDropoutColsPerCall]) {
  const int64_t first = group * kDropoutColsPerCall;
  if (first + kDropoutColsPerCall <= cols) {
#if defined(__CUDA_ARCH__)
    if (vec) {
      ColumnGroup<scalar_t> g;
      MOSLORA_UNROLL
      for (int j = 0; j < kDropoutColsPerCall; ++j) g.v[j] = static_cast<scalar_t>(v[j]);
      // Stored as uint4 words: a store of the group itself is merged with the
      // scalar branch below into 2- and 4-byte stores (sm_90 SASS); tools/check_sass.py
      // checks that the 16-byte stores stay.
      const uint4* words = reinterpret_cast<const uint4*>(&g);
      uint4* dst = reinterpret_cast<uint4*>(row + first);
      MOSLORA_UNROLL
      for (int w = 0; w < static_cast<int>(sizeof(g) / sizeof(uint4)); ++w) __stwb(dst + w, words[w]);
      return;
    }
#endif
    MOSLORA_UNROLL
    for (int j = 0; j < kDropoutColsPerCall; ++j) row[first + j] = static_cast<scalar_t>(v[j]);
    return;
  }
  MOSLORA_UNROLL
  for (int j = 0; j < kDropoutColsPerCall; ++j) {
    if (first + j < cols) row[first + j] = static_cast<scalar_t>(v[j]);
  }
}

// Multiplies a group by its dropout factors (1/(1-p) or 0), given the
// group's Philox words: the one place where a column group meets its mask.
template <typename acc_t>
MOSLORA_HOST_DEVICE void apply_dropout(const DropoutMask<acc_t>& mask, const Philox4& words,
                                       acc_t (&v)[kDropoutColsPerCall]) {
  MOSLORA_UNROLL
  for (int j = 0; j < kDropoutColsPerCall; ++j) {
    v[j] *= dropout_factor(words, j, mask.drop_threshold, mask.keep_scale);
  }
}

template <typename acc_t>
MOSLORA_HOST_DEVICE void apply_dropout(const DropoutMask<acc_t>& mask, uint64_t row, int64_t group,
                                       acc_t (&v)[kDropoutColsPerCall]) {
  apply_dropout(mask, philox4x32_10(mask.seed, row, static_cast<uint32_t>(group)), v);
}

}  // namespace moslora
