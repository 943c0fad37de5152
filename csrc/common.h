// Host-side pieces shared by the CPU and the CUDA library: the build marker, parameter unpacking and
// argument checks. The per-bin update math both use is in bin_update.h.
#pragma once

#include "bin_update.h"

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>

// Build marker: setup.py bakes torch.__version__ in as "1" + hex(version) (a pp-number, so the
// preprocessor never expands any part of it). Each library defines its own marker array from this
// text; varweight_kernels/backends/extension.py reads it from the file before loading the library.
#define VAW_STR2(x) #x
#define VAW_STR(x) VAW_STR2(x)
#ifdef VAW_TORCH_VERSION_HEX
#define VAW_BUILD_MARKER_TEXT "VARWEIGHT_TORCH_VERSION_HEX=" VAW_STR(VAW_TORCH_VERSION_HEX)
#else
#define VAW_BUILD_MARKER_TEXT "VARWEIGHT_TORCH_VERSION_HEX=unknown"
#endif

namespace varweight {

inline Params parse_params(c10::ArrayRef<double> p) {
  TORCH_CHECK(p.size() == 10, "varweight: params must hold 10 floats [lmin, bin_scale, decay, power, eps, ",
              "min_count, wmin, wmax, warmup, ramp], got ", p.size());
  return Params{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9]};
}

inline bool is_float_type(c10::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// loss, lam: 1-D, same length B >= 1, float dtypes; weight: 1-D float32 table of K >= 1 bins.
inline void check_inputs(const at::Tensor& loss, const at::Tensor& lam, const at::Tensor& weight) {
  TORCH_CHECK(loss.dim() == 1 && lam.dim() == 1 && loss.numel() == lam.numel() && loss.numel() >= 1,
              "varweight: loss and lam must be 1-D of the same length B >= 1, got shapes ", loss.sizes(),
              " and ", lam.sizes());
  TORCH_CHECK(is_float_type(loss.scalar_type()), "varweight: loss must be float32/float64/float16/bfloat16, got ",
              loss.scalar_type());
  TORCH_CHECK(is_float_type(lam.scalar_type()), "varweight: lam must be float32/float64/float16/bfloat16, got ",
              lam.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.numel() >= 1 && weight.scalar_type() == at::kFloat,
              "varweight: weight must be a 1-D float32 table, got ", weight.scalar_type(), " of shape ",
              weight.sizes());
  TORCH_CHECK(loss.device() == lam.device() && loss.device() == weight.device(),
              "varweight: loss, lam and weight must be on one device, got ", loss.device(), ", ", lam.device(),
              " and ", weight.device());
}

// Backward of a step: grad is the 0-dim gradient of out, w the (B,) float32 weights, dtype the loss's.
inline void check_scale_grad(const at::Tensor& grad, const at::Tensor& w, c10::ScalarType dtype) {
  TORCH_CHECK(grad.numel() == 1 && is_float_type(grad.scalar_type()),
              "varweight: scale_grad needs the one-element float gradient of out, got ", grad.scalar_type(),
              " of shape ", grad.sizes());
  TORCH_CHECK(w.dim() == 1 && w.scalar_type() == at::kFloat, "varweight: scale_grad needs 1-D float32 weights, got ",
              w.scalar_type(), " of shape ", w.sizes());
  TORCH_CHECK(is_float_type(dtype), "varweight: scale_grad needs a float loss dtype, got ", dtype);
  TORCH_CHECK(grad.device() == w.device(), "varweight: scale_grad got grad on ", grad.device(), " and w on ",
              w.device());
}

// The state buffers of the module: M, Q, Z, weight float32 (K,), C float64 or int64 (K,),
// step and nonfinite int64 with one element; all contiguous (they are written in place).
inline void check_state(const at::Tensor& M, const at::Tensor& Q, const at::Tensor& Z, const at::Tensor& C,
                        const at::Tensor& weight, const at::Tensor& step, const at::Tensor& nonfinite) {
  const int64_t K = M.numel();
  TORCH_CHECK(K >= 1, "varweight: the state must have at least one bin");
  const at::Tensor* f32[] = {&M, &Q, &Z, &weight};
  const char* names[] = {"M", "Q", "Z", "weight"};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *f32[i];
    TORCH_CHECK(t.dim() == 1 && t.numel() == K && t.scalar_type() == at::kFloat && t.is_contiguous(),
                "varweight: state ", names[i], " must be a contiguous 1-D float32 tensor of ", K,
                " bins, got ", t.scalar_type(), " of shape ", t.sizes());
  }
  TORCH_CHECK(C.dim() == 1 && C.numel() == K && (C.scalar_type() == at::kDouble || C.scalar_type() == at::kLong) &&
                  C.is_contiguous(),
              "varweight: state C must be a contiguous 1-D float64 or int64 tensor of ", K, " bins, got ",
              C.scalar_type(), " of shape ", C.sizes());
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong,
              "varweight: state step must be a one-element int64 tensor, got ", step.scalar_type(), " of shape ",
              step.sizes());
  TORCH_CHECK(nonfinite.numel() == 1 && nonfinite.scalar_type() == at::kLong,
              "varweight: state nonfinite must be a one-element int64 tensor, got ", nonfinite.scalar_type(),
              " of shape ", nonfinite.sizes());
  const at::Tensor* all[] = {&Q, &Z, &C, &weight, &step, &nonfinite};
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->device() == M.device(), "varweight: all state tensors must be on one device, got ", M.device(),
                " and ", t->device());
  }
}

inline void check_moments(const at::Tensor& moments, int64_t K) {
  TORCH_CHECK(moments.dim() == 1 && moments.numel() == 3 * K + 1 && moments.scalar_type() == at::kDouble,
              "varweight: moments must be a 1-D float64 tensor of length 3K+1 = ", 3 * K + 1, ", got ",
              moments.scalar_type(), " of shape ", moments.sizes());
}

// The library of one device type was handed a tensor of another. The prologues below have already
// checked that all of an op's tensors share one device, so checking one tensor checks them all.
inline void check_device_type(const at::Tensor& t, c10::DeviceType type, const char* what) {
  TORCH_CHECK(t.device().type() == type, "varweight: the ", c10::DeviceTypeName(type), " kernel got ", what, " on ",
              t.device(), "; use the backend of the tensors' device");
}

// The op prologues, the same on every device: each returns only after every argument is checked.
inline void check_forward_args(const at::Tensor& loss, const at::Tensor& lam, const at::Tensor& weight,
                               c10::DeviceType type) {
  check_inputs(loss, lam, weight);
  check_device_type(loss, type, "loss");
}

inline Params check_update_args(const at::Tensor& moments, const at::Tensor& M, const at::Tensor& Q,
                                const at::Tensor& Z, const at::Tensor& C, const at::Tensor& weight,
                                const at::Tensor& step, const at::Tensor& nonfinite, c10::ArrayRef<double> params,
                                c10::DeviceType type) {
  const Params p = parse_params(params);
  check_state(M, Q, Z, C, weight, step, nonfinite);
  check_moments(moments, M.numel());
  TORCH_CHECK(moments.device() == M.device(), "varweight: moments must be on the state's device ", M.device(),
              ", got ", moments.device());
  check_device_type(M, type, "the state");
  return p;
}

// check_inputs puts loss and weight on one device and check_state puts weight and the state on one.
inline Params check_step_args(const at::Tensor& loss, const at::Tensor& lam, const at::Tensor& M, const at::Tensor& Q,
                              const at::Tensor& Z, const at::Tensor& C, const at::Tensor& weight,
                              const at::Tensor& step, const at::Tensor& nonfinite, c10::ArrayRef<double> params,
                              c10::DeviceType type) {
  const Params p = parse_params(params);
  check_inputs(loss, lam, weight);
  check_state(M, Q, Z, C, weight, step, nonfinite);
  check_device_type(loss, type, "loss");
  return p;
}

inline void check_scale_grad_args(const at::Tensor& grad, const at::Tensor& w, c10::ScalarType dtype,
                                  c10::DeviceType type) {
  check_scale_grad(grad, w, dtype);
  check_device_type(w, type, "w");
}

}  // namespace varweight
