// SPEC steps 6-7 for one bin, shared by the CPU (cpu/) and CUDA (cuda/) kernels so that both
// round exactly like varweight_kernels/reference.py. No fused multiply-adds: the CPU library is
// built with -ffp-contract=off and the CUDA library with --fmad=false.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define VAW_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VAW_HOST_DEVICE inline
#endif

namespace varweight {

// The scalars of a step, in the order and with the names of varweight_kernels.config.KernelParams.
struct Params {
  double lmin, bin_scale, decay, power, eps, min_count, wmin, wmax, warmup, ramp;
};

constexpr double kRawWeightCap = 1e300;  // reference.RAW_WEIGHT_CAP
// reference.MAX_STAT_SQUARE: a loss enters the statistics only if L * L (float64) is at most the
// float32 maximum, so the float32 state (Q is an average of L^2) can never overflow.
constexpr double kMaxStatSquare = 3.4028234663852886e38;

// Whether a loss value may enter the statistics (false for NaN, inf and |L| above about 1.8e19).
VAW_HOST_DEVICE bool stat_loss_ok(double L) { return L * L <= kMaxStatSquare; }

// x ** e as torch.pow(tensor, python float) computes it (its special exponents included).
VAW_HOST_DEVICE double pow_scalar(double x, double e) {
  if (e == 0.0) return 1.0;
  if (e == 1.0) return x;
  if (e == 0.5) return ::sqrt(x);
  if (e == -0.5) return 1.0 / ::sqrt(x);
  if (e == 2.0) return x * x;
  if (e == -1.0) return 1.0 / x;
  if (e == -2.0) return 1.0 / (x * x);
  if (e == 3.0) return x * x * x;
  return ::pow(x, e);
}

// torch.clamp: NaN propagates.
VAW_HOST_DEVICE double clamp_nan(double x, double lo, double hi) { return x != x ? x : ::fmin(::fmax(x, lo), hi); }

// Step 6 for a bin that saw n > 0 samples with sums s (of L) and q (of L^2).
VAW_HOST_DEVICE void ema_bin(double n, double s, double q, double decay, float& M, float& Q, float& Z) {
  const double a = ::pow(decay, n);
  const double oma = 1.0 - a;
  M = static_cast<float>(a * static_cast<double>(M) + oma * (s / n));
  Q = static_cast<float>(a * static_cast<double>(Q) + oma * (q / n));
  Z = static_cast<float>(a * static_cast<double>(Z) + oma);
}

// Step 7's raw weight (var + eps) ** (-power / 2), capped, from the bin's float32 state.
VAW_HOST_DEVICE double raw_weight(float M, float Q, float Z, const Params& p) {
  const double z = Z;
  double var = 0.0;
  if (z > 0) {
    const double mu = static_cast<double>(M) / z;
    var = static_cast<double>(Q) / z - mu * mu;
    var = var < 0.0 ? 0.0 : var;  // clamp_min(0); NaN stays NaN
  }
  const double r = pow_scalar(var + p.eps, -p.power / 2.0);
  return r > kRawWeightCap ? kRawWeightCap : r;  // clamp_max; NaN stays NaN
}

// A bin's count where it has min_count samples, else 0 (its raw weight is then the fill).
VAW_HOST_DEVICE double ready_count(double count, const Params& p) { return count >= p.min_count ? count : 0.0; }

// The bin's table weight from its (filled) raw weight, the normaliser and the incremented step.
VAW_HOST_DEVICE float table_weight(double raw, double norm, double steps, const Params& p) {
  double w = norm > 0 ? clamp_nan(raw / norm, p.wmin, p.wmax) : 1.0;
  if (p.ramp > 0) w = 1.0 + ::fmin((steps - p.warmup) / p.ramp, 1.0) * (w - 1.0);
  if (steps <= p.warmup) w = 1.0;
  return static_cast<float>(w);
}

}  // namespace varweight
