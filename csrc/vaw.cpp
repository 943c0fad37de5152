// varweight extension: operator schemas (namespace varweight_ext) and the autograd of weighted_step.
//
// The ops are single dispatcher calls, so torch.compile / torch.export see each as one op (their
// fake implementations are registered from Python, varweight_kernels/backends/extension.py). Each
// device's kernels register their own dispatch key: cpu/vaw_cpu.cpp (built into this library) and
// cuda/vaw_cuda.cu (a separate library, built when CUDA is).
//
//   forward_moments(loss, lam, weight, lmin, bin_scale, training) -> (out, w, moments)
//       moments: float64 [n(K), s(K), q(K), nonfinite] in training mode, an empty tensor otherwise.
//   update(moments, M, Q, Z, C, weight, step, nonfinite, params) -> ()       (state in place)
//   step(loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training) -> (out, w)
//       the fused forward_moments + update (training) or forward only (eval).
//   weighted_step(same arguments as step) -> (out, w)
//       step with its autograd formula (d out / d loss = w / B) registered in C++, so an eager
//       training step pays no Python autograd overhead. Its Autograd kernel calls `step`, which
//       dispatches to the CPU or CUDA kernels.
//   scale_grad(grad, w, dtype) -> grad_loss
//       the backward of a step, grad * w / B in float32 cast to the loss dtype, in one pass
//       (weighted_step's autograd formula calls it; on CUDA it is one kernel).
//   build_info() -> str   the torch version this library was compiled against.
//   cpu_isa(request) -> str   the instruction set of the CPU pass ("" asks; "auto", "scalar",
//       "avx2", "avx512" choose, for tests and benchmarks); returns the one in use.
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "cpu/vaw_cpu.h"

extern "C" __attribute__((used)) const char varweight_build_marker[] = VAW_BUILD_MARKER_TEXT;

namespace varweight {
namespace {

std::string build_info() { return std::string(varweight_build_marker); }

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class WeightedStep : public torch::autograd::Function<WeightedStep> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& loss, const at::Tensor& lam,
                               const at::Tensor& M, const at::Tensor& Q, const at::Tensor& Z, const at::Tensor& C,
                               const at::Tensor& weight, const at::Tensor& step, const at::Tensor& nonfinite,
                               const std::vector<double>& params, bool training) {
    static auto step_op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("varweight_ext::step", "")
                              .typed<std::tuple<at::Tensor, at::Tensor>(
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, at::ArrayRef<double>, bool)>();
    auto result = step_op.call(loss, lam, M, Q, Z, C, weight, step, nonfinite, params, training);
    const at::Tensor& w = std::get<1>(result);
    ctx->save_for_backward({w});
    ctx->saved_data["loss_dtype"] = static_cast<int64_t>(loss.scalar_type());
    ctx->mark_non_differentiable({w});
    return {std::get<0>(result), w};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto scale_grad_op = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("varweight_ext::scale_grad", "")
                                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>();
    const at::Tensor w = ctx->get_saved_variables()[0];
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["loss_dtype"].toInt());
    at::Tensor grad_loss = scale_grad_op.call(grads[0], w, dtype);
    variable_list out(11);
    out[0] = grad_loss;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> weighted_step_autograd(const at::Tensor& loss, const at::Tensor& lam,
                                                          const at::Tensor& M, const at::Tensor& Q,
                                                          const at::Tensor& Z, const at::Tensor& C,
                                                          const at::Tensor& weight, const at::Tensor& step,
                                                          const at::Tensor& nonfinite, c10::ArrayRef<double> params,
                                                          bool training) {
  auto outs = WeightedStep::apply(loss, lam, M, Q, Z, C, weight, step, nonfinite, params.vec(), training);
  return {outs[0], outs[1]};
}

}  // namespace
}  // namespace varweight

TORCH_LIBRARY(varweight_ext, m) {
  m.def(
      "forward_moments(Tensor loss, Tensor lam, Tensor weight, float lmin, float bin_scale, bool training) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "update(Tensor moments, Tensor(a!) M, Tensor(b!) Q, Tensor(c!) Z, Tensor(d!) C, Tensor(e!) weight, "
      "Tensor(f!) step, Tensor(g!) nonfinite, float[] params) -> ()");
  m.def(
      "step(Tensor loss, Tensor lam, Tensor(a!) M, Tensor(b!) Q, Tensor(c!) Z, Tensor(d!) C, Tensor(e!) weight, "
      "Tensor(f!) step, Tensor(g!) nonfinite, float[] params, bool training) -> (Tensor, Tensor)");
  m.def(
      "weighted_step(Tensor loss, Tensor lam, Tensor(a!) M, Tensor(b!) Q, Tensor(c!) Z, Tensor(d!) C, "
      "Tensor(e!) weight, Tensor(f!) step, Tensor(g!) nonfinite, float[] params, bool training) -> (Tensor, Tensor)");
  m.def("scale_grad(Tensor grad, Tensor w, ScalarType dtype) -> Tensor");
  m.def("build_info() -> str", &varweight::build_info);
  m.def("cpu_isa(str request) -> str", &varweight::cpu_isa);
}

TORCH_LIBRARY_IMPL(varweight_ext, Autograd, m) {
  m.impl("weighted_step", &varweight::weighted_step_autograd);
}
