// Math shared by the CPU and CUDA kernels: one definition of the dropout mask
// and of the mixer step, so both devices compute the same thing.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOSLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOSLORA_HOST_DEVICE inline
#endif

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

// ---------------------------------------------------------------------------
// Mixer step. All three products of the mixer are dot products of length r
// with strides: V[n,i] = s*<U[n,:], M[i,:]>, dU[n,j] = s*<dV[n,:], M[:,j]>,
// dM[i,j] = s*sum_n dV[n,i] U[n,j]. Accumulation is in acc_t (fp32 for
// half precision).
// ---------------------------------------------------------------------------
template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE acc_t strided_dot(const scalar_t* a, int64_t a_stride,
                                      const scalar_t* b, int64_t b_stride, int64_t len) {
  acc_t sum = acc_t(0);
  for (int64_t t = 0; t < len; ++t) {
    sum += static_cast<acc_t>(a[t * a_stride]) * static_cast<acc_t>(b[t * b_stride]);
  }
  return sum;
}

// The mixer backward reduces dM over rows in fixed chunks: each chunk writes
// a partial r x r sum, and the partials are added in chunk order. The chunks
// depend only on N, so the result is deterministic on both devices; there are
// at most 1024 of them.
struct RowChunks {
  int64_t rows;   // rows per chunk (the last one may have fewer)
  int64_t count;  // number of chunks
};

MOSLORA_HOST_DEVICE RowChunks mixer_row_chunks(int64_t n_rows) {
  const int64_t max_chunks = 1024, min_rows = 64;
  const int64_t needed = (n_rows + max_chunks - 1) / max_chunks;
  const int64_t rows = needed > min_rows ? needed : min_rows;
  return RowChunks{rows, (n_rows + rows - 1) / rows};
}

}  // namespace moslora
