// The bottom of csrc/: how a function that both the CPU and the CUDA kernels
// run is declared, and how its fixed-length loops are unrolled.
#pragma once

#if defined(__CUDACC__)
#define MOSLORA_HOST_DEVICE __host__ __device__ __forceinline__
#define MOSLORA_UNROLL _Pragma("unroll")
#else
#define MOSLORA_HOST_DEVICE inline
#define MOSLORA_UNROLL _Pragma("GCC unroll 8")
#endif
