// What every operator sets up around its work, dense or expert, beyond its
// DeviceGuard (aten_calls.h): the refusal of dropout under CUDA-graph capture.
#pragma once

#include "aten_calls.h"

namespace moslora {

// Dropout is refused under CUDA-graph capture, where the seed, read on the
// host, would be baked into the graph and every replay would apply one mask.
// Asks about the current stream of x's device, not of whichever device was current.
inline void refuse_capture(const Tensor& x, double p) {
#ifdef WITH_CUDA
  if (p == 0.0 || !x.is_cuda()) return;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  STD_CUDA_CHECK(cudaStreamIsCapturing(current_cuda_stream(x.get_device_index()), &status));
  MOSLORA_CHECK(status == cudaStreamCaptureStatusNone,
                "moslora_ext: dropout (p = ", p, ") cannot be captured in a CUDA graph: its mask seed is read "
                "on the host, so every replay would apply the same mask. Capture with lora_dropout = 0 (or "
                "the layer in eval mode), or run without CUDA graphs (torch.compile without "
                "mode=\"reduce-overhead\")");
#else
  (void)x, (void)p;
#endif
}

}  // namespace moslora
