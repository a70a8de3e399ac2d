// What every operator sets up around its work, dense or expert: autocast
// off for the ATen calls inside, and the refusal of dropout under CUDA-graph
// capture.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <initializer_list>

#ifdef WITH_CUDA
#include <c10/cuda/CUDAGraphsC10Utils.h>
#endif

namespace moslora {

// The operators compute in their operands' dtypes: autocast is applied by the
// Python wrapper, before the call. Without this guard the ATen GEMMs inside
// would be autocast again (to mixed dtypes, e.g. merge under a bf16 autocast).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Dropout is refused under CUDA-graph capture, where the seed, read on the
// host, would be baked into the graph and every replay would apply one mask.
// Called under the op's DeviceGuard, so that the stream asked about is the
// current stream of x's device, not of whichever device was current.
inline void refuse_capture(const at::Tensor& x, double p) {
#ifdef WITH_CUDA
  TORCH_CHECK(p == 0.0 || !x.is_cuda() ||
                  c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "moslora_ext: dropout (p = ", p, ") cannot be captured in a CUDA graph: its mask seed is read "
              "on the host, so every replay would apply the same mask. Capture with lora_dropout = 0 (or "
              "the layer in eval mode), or run without CUDA graphs (torch.compile without "
              "mode=\"reduce-overhead\")");
#else
  (void)x, (void)p;
#endif
}

#ifndef WITH_CUDA
// A build without the CUDA kernels says so for CUDA tensors, instead of the
// dispatcher's generic "could not run with arguments from the CUDA backend".
inline void cuda_kernels_not_built(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false, "moslora_ext was built without its CUDA kernels, so ", op.schema().name(),
              " cannot run on CUDA tensors; rebuild with nvcc available: "
              "MOSLORA_BUILD_CUDA=1 pip install --no-build-isolation .");
}

inline void refuse_on_cuda(torch::Library& m, std::initializer_list<const char*> names) {
  for (const char* name : names) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&cuda_kernels_not_built>());
}
#endif

}  // namespace moslora
