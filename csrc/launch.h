// Launch arithmetic of the CUDA kernels: grids and block sizes as plain
// functions of the shapes, which the launchers in cuda/ call and testing.cpp
// checks on the host (limits, coverage) for shapes up to 2^31 elements.
#pragma once

#include <algorithm>
#include <cstdint>

namespace moslora {

struct Grid3 {
  int64_t x, y, z;
};

// A kernel's launch: its grid and threads per block.
struct Launch {
  Grid3 grid;
  int64_t block;
};

constexpr int kThreads = 256;  // threads per block of the grid-stride kernels

// A grid-stride loop over `work` items (work > 0): blocks of kThreads, at
// most 65535 of them.
inline Launch grid_stride_launch(int64_t work) {
  return Launch{Grid3{std::min<int64_t>((work + kThreads - 1) / kThreads, 65535), 1, 1}, kThreads};
}

}  // namespace moslora
