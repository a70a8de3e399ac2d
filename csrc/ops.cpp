// Schemas of the moslora_ext operators, and the Python module moslora_ext._C
// that loading registers them with. Kernels: linear_ops.cpp and expert_ops.cpp
// (CPU and CUDA). The tests' hooks are a module of their own (testing.cpp).
// Registered through LibTorch's stable ABI (torch/csrc/stable), which has no
// operator tags: the Python side (moslora_ext/ops) adds pt2_compliant_tag.
#include "aten_calls.h"

#include <Python.h>
#include <torch/csrc/stable/library.h>

extern "C" {
// Importing moslora_ext._C loads this library and so runs the registrations;
// the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

STABLE_TORCH_LIBRARY(moslora_ext, m) {
  // y = x W^T + b + scale * dropout(x) A^T M^T B^T, and u = dropout(x) A^T
  // (rows of x flattened), which backward needs. Adapter-only mode, for a
  // base that computes its own output (a quantized layer): weight and bias
  // None and base_out given, y = base_out + scale * dropout(x) A^T M^T B^T.
  m.def(
      "forward(Tensor x, Tensor? weight, Tensor? bias, Tensor lora_A, Tensor mixer, Tensor lora_B, "
      "float scale, float dropout_p, Tensor? dropout_seed, Tensor? base_out=None) -> (Tensor, Tensor)");
  // Gradients of forward for x, lora_A, mixer, lora_B; an output whose
  // output_mask entry is false is not computed (None). Without a weight the
  // gradient of x is the adapter's part alone.
  m.def(
      "backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor lora_A, Tensor mixer, Tensor lora_B, "
      "Tensor u, float scale, float dropout_p, Tensor? dropout_seed, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // weight += scale * (lora_B mixer) lora_A, in place (scale < 0 unmerges).
  m.def("merge_(Tensor(a!) weight, Tensor lora_A, Tensor mixer, Tensor lora_B, float scale) -> ()");
  // The dropout applied to the adapter input: rows of x (flattened to 2-D)
  // masked by the counter-based mask of (seed, row, col), kept ones scaled.
  m.def("dropout(Tensor x, float p, Tensor seed) -> Tensor");
  // MoSLoRA adapters on a fused expert parameter (csrc/expert_ops.cpp): x (S, d)
  // holds the routed rows sorted by expert, offsets (E,) the cumulative row
  // counts; expert e adds scale * dropout(x_e) A_e^T M_e^T B_e^T to its rows of
  // base_out. u = dropout(x_e) A_e^T per row, which backward needs.
  m.def(
      "experts_forward(Tensor base_out, Tensor x, Tensor offsets, Tensor lora_A, Tensor mixer, Tensor lora_B, "
      "float scale, float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor)");
  // Gradients of experts_forward for x (the adapter's part), lora_A, mixer, lora_B.
  m.def(
      "experts_backward(Tensor grad_out, Tensor x, Tensor offsets, Tensor lora_A, Tensor mixer, Tensor lora_B, "
      "Tensor u, float scale, float dropout_p, Tensor? dropout_seed, bool[4] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

#ifndef WITH_CUDA
namespace moslora {
namespace {
// A build without the CUDA kernels says so for CUDA tensors, instead of the
// dispatcher's generic "could not run with arguments from the CUDA backend".
template <const char* name>
void cuda_kernels_not_built(StableIValue*, uint64_t, uint64_t) {
  MOSLORA_CHECK(false, "moslora_ext was built without its CUDA kernels, so moslora_ext::", name,
                " cannot run on CUDA tensors; rebuild with nvcc available: "
                "MOSLORA_BUILD_CUDA=1 pip install --no-build-isolation .");
}
constexpr char kForward[] = "forward", kBackward[] = "backward", kMerge[] = "merge_", kDropout[] = "dropout",
               kExpertsForward[] = "experts_forward", kExpertsBackward[] = "experts_backward";
}  // namespace
}  // namespace moslora

STABLE_TORCH_LIBRARY_IMPL(moslora_ext, CUDA, m) {
  using namespace moslora;
  m.impl(kForward, &cuda_kernels_not_built<kForward>);
  m.impl(kBackward, &cuda_kernels_not_built<kBackward>);
  m.impl(kMerge, &cuda_kernels_not_built<kMerge>);
  m.impl(kDropout, &cuda_kernels_not_built<kDropout>);
  m.impl(kExpertsForward, &cuda_kernels_not_built<kExpertsForward>);
  m.impl(kExpertsBackward, &cuda_kernels_not_built<kExpertsBackward>);
}
#endif
