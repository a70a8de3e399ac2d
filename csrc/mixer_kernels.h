// The mixer step's bodies, written as host-device functions of a kernel's
// block and thread indices, and their launches. cuda/mixer.cu launches them,
// the CPU kernels (cpu/mixer.cpp) run them with one thread per row chunk, and
// testing.cpp runs every body on the host over the CUDA launchers' grids.
//
//   V  = U M^T          mixer_forward_element, one thread per element of V
//   dU = dV M           } mixer_backward_thread, one block per row chunk
//   dM partials         }   (mixer_row_chunks), dV^T U per chunk
//   dM = sum partials   reduce_partials_element, chunks added in order
#pragma once

#include "host_device.h"
#include "launch.h"

#include <cstdint>

namespace moslora {

// ---------------------------------------------------------------------------
// Mixer step. All three products of the mixer are dot products of length r
// with strides: V[n,i] = <U[n,:], M[i,:]>, dU[n,j] = <dV[n,:], M[:,j]>,
// dM[i,j] = sum_n dV[n,i] U[n,j]. Accumulation is in acc_t (fp32 for
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


// Element idx of the N x r output V = U M^T.
template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void mixer_forward_element(const scalar_t* u, const scalar_t* mixer, scalar_t* v, int64_t r,
                                               int64_t idx) {
  const int64_t row = idx / r, i = idx % r;
  v[idx] = static_cast<scalar_t>(strided_dot<acc_t>(u + row * r, 1, mixer + i * r, 1, r));
}

// Thread `thread` of the `threads` of block `chunk_index`, which owns rows
// chunk_index * chunk ...: dU for those rows, then (partials not null) the
// chunk's dV^T U (r x r) into partials[chunk_index]. The two loops
// read only dV, U and M, so the threads need no synchronisation.
template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void mixer_backward_thread(const scalar_t* dv, const scalar_t* u, const scalar_t* mixer,
                                               scalar_t* du, acc_t* partials, int64_t n, int64_t r, int64_t chunk,
                                               int64_t chunk_index, int64_t thread, int64_t threads) {
  const int64_t first = chunk_index * chunk;
  const int64_t rows = chunk < n - first ? chunk : n - first;
  for (int64_t idx = thread; idx < rows * r; idx += threads) {
    const int64_t row = first + idx / r, j = idx % r;
    du[row * r + j] = static_cast<scalar_t>(strided_dot<acc_t>(dv + row * r, 1, mixer + j, r, r));
  }
  if (partials == nullptr) return;
  for (int64_t idx = thread; idx < r * r; idx += threads) {
    const int64_t i = idx / r, j = idx % r;
    partials[chunk_index * r * r + idx] = strided_dot<acc_t>(dv + first * r + i, r, u + first * r + j, r, rows);
  }
}

// Element idx of dM (r x r = rr elements): the chunks' sum, in chunk order.
template <typename acc_t, typename scalar_t>
MOSLORA_HOST_DEVICE void reduce_partials_element(const acc_t* partials, scalar_t* dmixer, int64_t n_chunks,
                                                 int64_t rr, int64_t idx) {
  acc_t sum = acc_t(0);
  for (int64_t c = 0; c < n_chunks; ++c) sum += partials[c * rr + idx];
  dmixer[idx] = static_cast<scalar_t>(sum);
}

// mixer_backward_kernel: one block of kThreads per row chunk.
inline Launch mixer_backward_launch(const RowChunks& chunks) {
  return Launch{Grid3{chunks.count, 1, 1}, kThreads};
}

}  // namespace moslora
