// CPU kernels of one VAW step (SPEC.md, varweight_kernels/reference.py).
//
// forward: one pass over the batch. The batch is cut into fixed chunks whose size depends only on
// (B, K), never on the thread count; every chunk builds its own float64 partial histogram
// (n, s, q per bin) plus its non-finite count and weighted loss sum, and the partials are added in
// chunk order. The result is therefore bitwise the same for any number of threads.
// update: EMA of the bins that saw samples and the next weight table, in double precision, exactly
// as reference.update / reference.weight_table.
#include "vaw_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace varweight {
namespace {

constexpr double kRawWeightCap = 1e300;  // reference.RAW_WEIGHT_CAP
constexpr int64_t kMinChunk = 16384;
constexpr int64_t kMaxChunks = 256;

// Fixed chunking: a function of (B, K) only.
struct ChunkPlan {
  int64_t size;
  int64_t count;
};

ChunkPlan plan_chunks(int64_t B, int64_t K) {
  int64_t size = std::max<int64_t>(kMinChunk, 16 * K);
  size = std::max<int64_t>(size, (B + kMaxChunks - 1) / kMaxChunks);
  return ChunkPlan{size, (B + size - 1) / size};
}

// Per-chunk accumulator layout: 3 doubles per bin (n, s, q interleaved), then nonfinite, then wsum.
inline int64_t acc_len(int64_t K) { return 3 * K + 2; }

// Loss values as double: half types and float32 exactly; float64 keeps full precision.
template <typename loss_t>
inline double load_loss(const loss_t* p, int64_t i) {
  return static_cast<double>(static_cast<float>(p[i]));
}
template <>
inline double load_loss<double>(const double* p, int64_t i) {
  return p[i];
}

// One chunk [begin, end): bin, gather the weight (table as before this batch), write w, accumulate
// sum(w * L) and (TRAIN) the per-bin moments of the valid samples into acc. The weighted sum uses
// kLanes accumulators (sample i adds to lane i % kLanes, lanes summed in order at the end) so the
// loop is not one long chain of dependent float64 adds; the order is still fixed.
constexpr int64_t kLanes = 4;

template <typename loss_t, typename lam_t, bool TRAIN>
inline void pass_sample(const loss_t* __restrict__ loss, const lam_t* __restrict__ lam, const float* __restrict__ table,
                        float* __restrict__ w_out, int64_t i, float lminf, float scalef, float kmaxf,
                        double* __restrict__ acc, double& wsum, double& nonfinite) {
  const float l = static_cast<float>(lam[i]);
  const bool lam_nan = std::isnan(l);
  // Precision contract: float32 subtract and multiply, floor, clamp to [0, K-1] in float (inf
  // safe), then int. Clamping first and truncating is the same: floor is monotone and the
  // bounds are integers, and truncation is floor on [0, K-1] (saves a libm call per sample).
  float u = (l - lminf) * scalef;
  u = u < 0.0f ? 0.0f : u;
  u = u > kmaxf ? kmaxf : u;
  const int64_t b = lam_nan ? 0 : static_cast<int64_t>(u);
  const float wv = lam_nan ? 1.0f : table[b];
  w_out[i] = wv;
  const double L = load_loss(loss, i);
  wsum += static_cast<double>(wv) * L;
  if (TRAIN) {
    if (!lam_nan && std::isfinite(L)) {
      double* h = acc + 3 * b;
      h[0] += 1.0;
      h[1] += L;
      h[2] += L * L;
    } else {
      nonfinite += 1.0;
    }
  }
}

template <typename loss_t, typename lam_t, bool TRAIN>
void pass_chunk(const loss_t* __restrict__ loss, const lam_t* __restrict__ lam, const float* __restrict__ table,
                float* __restrict__ w_out, int64_t begin, int64_t end, float lminf, float scalef, float kmaxf,
                double* __restrict__ acc, int64_t K) {
  double wsum[kLanes] = {0.0, 0.0, 0.0, 0.0};
  double nonfinite = 0.0;
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      pass_sample<loss_t, lam_t, TRAIN>(loss, lam, table, w_out, i + j, lminf, scalef, kmaxf, acc, wsum[j],
                                        nonfinite);
    }
  }
  for (int64_t j = 0; i < end; ++i, ++j) {
    pass_sample<loss_t, lam_t, TRAIN>(loss, lam, table, w_out, i, lminf, scalef, kmaxf, acc, wsum[j], nonfinite);
  }
  acc[3 * K] += nonfinite;
  acc[3 * K + 1] += (wsum[0] + wsum[1]) + (wsum[2] + wsum[3]);
}

// Runs the pass over the whole batch; `result` (length 3K+2, interleaved layout) receives the sums.
template <typename loss_t, typename lam_t>
void forward_pass(const loss_t* loss, const lam_t* lam, const float* table, float* w_out, int64_t B, int64_t K,
                  double lmin, double scale, bool training, double* result) {
  const float lminf = static_cast<float>(lmin);
  const float scalef = static_cast<float>(scale);
  const float kmaxf = static_cast<float>(K - 1);
  const int64_t len = acc_len(K);
  std::fill(result, result + len, 0.0);
  const ChunkPlan plan = plan_chunks(B, K);
  auto run = [&](int64_t begin, int64_t end, double* acc) {
    if (training) {
      pass_chunk<loss_t, lam_t, true>(loss, lam, table, w_out, begin, end, lminf, scalef, kmaxf, acc, K);
    } else {
      pass_chunk<loss_t, lam_t, false>(loss, lam, table, w_out, begin, end, lminf, scalef, kmaxf, acc, K);
    }
  };
  if (plan.count == 1) {
    run(0, B, result);
    return;
  }
  std::vector<double> partial(static_cast<size_t>(plan.count * len), 0.0);
  at::parallel_for(0, plan.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      run(c * plan.size, std::min(B, (c + 1) * plan.size), partial.data() + c * len);
    }
  });
  for (int64_t c = 0; c < plan.count; ++c) {  // fixed chunk order
    const double* p = partial.data() + c * len;
    for (int64_t j = 0; j < len; ++j) result[j] += p[j];
  }
}

template <typename loss_t>
void write_out(const at::Tensor& out, double wsum, int64_t B) {
  // The reference accumulates non-float64 losses in float32: round through float before the cast.
  const double mean = wsum / static_cast<double>(B);
  loss_t* o = out.data_ptr<loss_t>();
  if constexpr (std::is_same_v<loss_t, double>) {
    *o = mean;
  } else {
    *o = static_cast<loss_t>(static_cast<float>(mean));
  }
}

// Forward over (loss, lam) with the given table: fills w, out and the interleaved sums.
void forward_impl(const at::Tensor& loss_in, const at::Tensor& lam_in, const at::Tensor& weight_in, double lmin,
                  double scale, bool training, at::Tensor& out, at::Tensor& w, std::vector<double>& sums) {
  const at::Tensor loss = loss_in.contiguous();
  const at::Tensor lam = lam_in.contiguous();
  const at::Tensor table = weight_in.contiguous();
  const int64_t B = loss.numel();
  const int64_t K = table.numel();
  w = at::empty({B}, loss.options().dtype(at::kFloat));
  out = at::empty({}, loss.options());
  sums.assign(static_cast<size_t>(acc_len(K)), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "varweight_cpu_loss", [&] {
    using loss_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lam.scalar_type(), "varweight_cpu_lam", [&] {
      using lam_t = scalar_t;
      forward_pass<loss_t, lam_t>(loss.const_data_ptr<loss_t>(), lam.const_data_ptr<lam_t>(),
                                  table.const_data_ptr<float>(), w.mutable_data_ptr<float>(), B, K, lmin, scale,
                                  training, sums.data());
    });
    write_out<loss_t>(out, sums[3 * K + 1], B);
  });
}

// x ** e as torch.pow(tensor, python float) computes it on CPU (its special exponents included).
inline double pow_scalar(double x, double e) {
  if (e == 0.0) return 1.0;
  if (e == 1.0) return x;
  if (e == 0.5) return std::sqrt(x);
  if (e == -0.5) return 1.0 / std::sqrt(x);
  if (e == 2.0) return x * x;
  if (e == -1.0) return 1.0 / x;
  if (e == -2.0) return 1.0 / (x * x);
  if (e == 3.0) return x * x * x;
  return std::pow(x, e);
}

inline double clamp_nan(double x, double lo, double hi) {  // torch.clamp: NaN propagates
  if (std::isnan(x)) return x;
  return std::min(std::max(x, lo), hi);
}

// SPEC steps 6-7 from n, s, q (each K long) and the non-finite count.
template <typename c_t>
void update_impl(const double* n, const double* s, const double* q, double nonfinite_count, float* M, float* Q,
                 float* Z, c_t* C, float* weight, int64_t* step, int64_t* nonfinite, int64_t K, const Params& p) {
  // 6. EMA of the bins that saw samples.
  for (int64_t k = 0; k < K; ++k) {
    const double nk = n[k];
    if (nk > 0) {
      const double a = std::pow(p.decay, nk);
      const double oma = 1.0 - a;
      M[k] = static_cast<float>(a * static_cast<double>(M[k]) + oma * (s[k] / nk));
      Q[k] = static_cast<float>(a * static_cast<double>(Q[k]) + oma * (q[k] / nk));
      Z[k] = static_cast<float>(a * static_cast<double>(Z[k]) + oma);
    }
    C[k] += static_cast<c_t>(nk);
  }
  *step += 1;
  *nonfinite += static_cast<int64_t>(nonfinite_count);

  // 7. Weight table (reference.weight_table).
  std::vector<double> raw(static_cast<size_t>(K));
  const double expo = -p.power / 2.0;
  double total_ready = 0.0, ready_raw = 0.0, total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double z = Z[k];
    double var = 0.0;
    if (z > 0) {
      const double mu = static_cast<double>(M[k]) / z;
      var = static_cast<double>(Q[k]) / z - mu * mu;
      var = var < 0.0 ? 0.0 : var;  // clamp_min(0); NaN stays NaN
    }
    double r = pow_scalar(var + p.eps, expo);
    r = r > kRawWeightCap ? kRawWeightCap : r;  // clamp_max; NaN stays NaN
    raw[k] = r;
    const double ck = static_cast<double>(C[k]);
    const double rc = ck >= p.min_count ? ck : 0.0;
    total_ready += rc;
    ready_raw += rc * r;
    total += ck;
  }
  const double fill = total_ready > 0 ? ready_raw / std::max(total_ready, 1.0) : 1.0;
  double norm = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    const double ck = static_cast<double>(C[k]);
    if (!(ck >= p.min_count)) raw[k] = fill;
    const double pi = total > 0 ? ck / std::max(total, 1.0) : 1.0 / static_cast<double>(K);
    norm += pi * raw[k];
  }
  const double steps = static_cast<double>(*step);
  const bool in_warmup = steps <= p.warmup;
  double r = 1.0;
  if (p.ramp > 0) r = std::min((steps - p.warmup) / p.ramp, 1.0);
  for (int64_t k = 0; k < K; ++k) {
    double w = norm > 0 ? clamp_nan(raw[k] / norm, p.wmin, p.wmax) : 1.0;
    if (p.ramp > 0) w = 1.0 + r * (w - 1.0);
    if (in_warmup) w = 1.0;
    weight[k] = static_cast<float>(w);
  }
}

void update_from(const double* n, const double* s, const double* q, double nonfinite_count, const at::Tensor& M,
                 const at::Tensor& Q, const at::Tensor& Z, const at::Tensor& C, const at::Tensor& weight,
                 const at::Tensor& step, const at::Tensor& nonfinite, const Params& p) {
  const int64_t K = M.numel();
  if (C.scalar_type() == at::kDouble) {
    update_impl<double>(n, s, q, nonfinite_count, M.data_ptr<float>(), Q.data_ptr<float>(), Z.data_ptr<float>(),
                        C.data_ptr<double>(), weight.data_ptr<float>(), step.data_ptr<int64_t>(),
                        nonfinite.data_ptr<int64_t>(), K, p);
  } else {
    update_impl<int64_t>(n, s, q, nonfinite_count, M.data_ptr<float>(), Q.data_ptr<float>(), Z.data_ptr<float>(),
                         C.data_ptr<int64_t>(), weight.data_ptr<float>(), step.data_ptr<int64_t>(),
                         nonfinite.data_ptr<int64_t>(), K, p);
  }
}

void check_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "varweight: the C++ CPU kernel got ", what, " on ", t.device(),
              "; use the 'cuda' backend for CUDA tensors");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_moments_cpu(const at::Tensor& loss, const at::Tensor& lam,
                                                                   const at::Tensor& weight, double lmin,
                                                                   double scale, bool training) {
  check_inputs(loss, lam, weight);
  check_cpu(loss, "loss");
  at::Tensor out, w;
  std::vector<double> sums;
  forward_impl(loss, lam, weight, lmin, scale, training, out, w, sums);
  if (!training) return {out, w, at::empty({0}, loss.options().dtype(at::kDouble))};
  const int64_t K = weight.numel();
  at::Tensor moments = at::empty({3 * K + 1}, loss.options().dtype(at::kDouble));
  double* m = moments.data_ptr<double>();
  for (int64_t k = 0; k < K; ++k) {
    m[k] = sums[3 * k];
    m[K + k] = sums[3 * k + 1];
    m[2 * K + k] = sums[3 * k + 2];
  }
  m[3 * K] = sums[3 * K];
  return {out, w, moments};
}

void update_cpu(const at::Tensor& moments, const at::Tensor& M, const at::Tensor& Q, const at::Tensor& Z,
                const at::Tensor& C, const at::Tensor& weight, const at::Tensor& step, const at::Tensor& nonfinite,
                c10::ArrayRef<double> params) {
  const Params p = parse_params(params);
  check_state(M, Q, Z, C, weight, step, nonfinite);
  check_cpu(M, "the state");
  const int64_t K = M.numel();
  check_moments(moments, K);
  check_cpu(moments, "moments");
  const at::Tensor mom = moments.contiguous();
  const double* m = mom.const_data_ptr<double>();
  update_from(m, m + K, m + 2 * K, m[3 * K], M, Q, Z, C, weight, step, nonfinite, p);
}

std::tuple<at::Tensor, at::Tensor> step_cpu(const at::Tensor& loss, const at::Tensor& lam, const at::Tensor& M,
                                            const at::Tensor& Q, const at::Tensor& Z, const at::Tensor& C,
                                            const at::Tensor& weight, const at::Tensor& step,
                                            const at::Tensor& nonfinite, c10::ArrayRef<double> params,
                                            bool training) {
  const Params p = parse_params(params);
  check_inputs(loss, lam, weight);
  check_state(M, Q, Z, C, weight, step, nonfinite);
  check_cpu(loss, "loss");
  check_cpu(M, "the state");
  at::Tensor out, w;
  std::vector<double> sums;
  forward_impl(loss, lam, weight, p.lmin, p.scale, training, out, w, sums);
  if (training) {
    const int64_t K = M.numel();
    std::vector<double> m(static_cast<size_t>(3 * K));
    for (int64_t k = 0; k < K; ++k) {
      m[k] = sums[3 * k];
      m[K + k] = sums[3 * k + 1];
      m[2 * K + k] = sums[3 * k + 2];
    }
    update_from(m.data(), m.data() + K, m.data() + 2 * K, sums[3 * K], M, Q, Z, C, weight, step, nonfinite, p);
  }
  return {out, w};
}

}  // namespace varweight
