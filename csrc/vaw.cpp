// varweight extension: operator schemas (namespace varweight_ext) and the CPU registrations.
//
// The ops are single dispatcher calls, so torch.compile / torch.export see each as one op (their
// fake implementations are registered from Python, varweight_kernels/_ext.py). The CUDA kernels
// live in a separate library (csrc/cuda/vaw_cuda.cu) that registers the CUDA dispatch key with
// TORCH_LIBRARY_IMPL when it is built.
//
//   forward_moments(loss, lam, weight, lmin, scale, training) -> (out, w, moments)
//       moments: float64 [n(K), s(K), q(K), nonfinite] in training mode, an empty tensor otherwise.
//   update(moments, M, Q, Z, C, weight, step, nonfinite, params) -> ()       (state in place)
//   step(loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training) -> (out, w)
//       the fused forward_moments + update (training) or forward only (eval).
//   build_info() -> str   the torch version this library was compiled against.
#include <torch/library.h>

#include <string>

#include "cpu/vaw_cpu.h"

#define VAW_STR2(x) #x
#define VAW_STR(x) VAW_STR2(x)

// The build bakes torch.__version__ in as "1" + hex(version) (a pp-number, so the preprocessor
// never expands any part of it). _ext.py reads this marker from the file before loading it.
#ifdef VAW_TORCH_VERSION_HEX
extern "C" __attribute__((used)) const char varweight_build_marker[] =
    "VARWEIGHT_TORCH_VERSION_HEX=" VAW_STR(VAW_TORCH_VERSION_HEX);
#else
extern "C" __attribute__((used)) const char varweight_build_marker[] = "VARWEIGHT_TORCH_VERSION_HEX=unknown";
#endif

namespace varweight {
namespace {

std::string build_info() { return std::string(varweight_build_marker); }

}  // namespace
}  // namespace varweight

TORCH_LIBRARY(varweight_ext, m) {
  m.def(
      "forward_moments(Tensor loss, Tensor lam, Tensor weight, float lmin, float scale, bool training) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "update(Tensor moments, Tensor(a!) M, Tensor(b!) Q, Tensor(c!) Z, Tensor(d!) C, Tensor(e!) weight, "
      "Tensor(f!) step, Tensor(g!) nonfinite, float[] params) -> ()");
  m.def(
      "step(Tensor loss, Tensor lam, Tensor(a!) M, Tensor(b!) Q, Tensor(c!) Z, Tensor(d!) C, Tensor(e!) weight, "
      "Tensor(f!) step, Tensor(g!) nonfinite, float[] params, bool training) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &varweight::build_info);
}

TORCH_LIBRARY_IMPL(varweight_ext, CPU, m) {
  m.impl("forward_moments", &varweight::forward_moments_cpu);
  m.impl("update", &varweight::update_cpu);
  m.impl("step", &varweight::step_cpu);
}
