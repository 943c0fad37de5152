// CUDA kernels of one VAW step (registered for the CUDA dispatch key of varweight_ext in vaw_cuda.cu).
#pragma once

#include "../cpu/vaw_cpu.h"

namespace varweight {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_moments_cuda(const at::Tensor& loss, const at::Tensor& lam,
                                                                    const at::Tensor& weight, double lmin,
                                                                    double scale, bool training);

void update_cuda(const at::Tensor& moments, const at::Tensor& M, const at::Tensor& Q, const at::Tensor& Z,
                 const at::Tensor& C, const at::Tensor& weight, const at::Tensor& step, const at::Tensor& nonfinite,
                 c10::ArrayRef<double> params);

std::tuple<at::Tensor, at::Tensor> step_cuda(const at::Tensor& loss, const at::Tensor& lam, const at::Tensor& M,
                                             const at::Tensor& Q, const at::Tensor& Z, const at::Tensor& C,
                                             const at::Tensor& weight, const at::Tensor& step,
                                             const at::Tensor& nonfinite, c10::ArrayRef<double> params,
                                             bool training);

at::Tensor scale_grad_cuda(const at::Tensor& grad, const at::Tensor& w, at::ScalarType dtype);

}  // namespace varweight
