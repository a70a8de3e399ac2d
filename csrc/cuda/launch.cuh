// Launch helpers shared by the CUDA kernels.
#pragma once

#include "../launch.h"

#include <torch/csrc/stable/macros.h>

#include <cstdint>

namespace moslora {

// A Launch of launch.h as the <<<grid, block>>> arguments.
inline dim3 grid_of(const Launch& l) {
  return dim3(static_cast<unsigned int>(l.grid.x), static_cast<unsigned int>(l.grid.y),
              static_cast<unsigned int>(l.grid.z));
}
inline unsigned int block_of(const Launch& l) {
  return static_cast<unsigned int>(l.block);
}

// Index of the first item of this thread and the grid stride, in 64 bits.
__device__ __forceinline__ int64_t grid_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

}  // namespace moslora
