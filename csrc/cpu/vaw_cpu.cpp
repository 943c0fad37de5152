// CPU kernels of one VAW step (SPEC.md, varweight_kernels/reference.py).
//
// forward: one pass over the batch. The batch is cut into fixed chunks whose size depends only on
// (B, K), never on the thread count; every chunk builds its own float64 partial histogram
// (n, s, q per bin, the non-finite count and the w * L of the samples left out of the statistics),
// and the partials are added in chunk order. The result is therefore bitwise the same for any
// number of threads, and for every instruction set the pass can use (see "Instruction sets").
// update: EMA of the bins that saw samples and the next weight table, in double precision, exactly
// as reference.update / reference.weight_table (the per-bin math of ../bin_update.h).
// backward (scale_grad): one loop. All are registered for the CPU dispatch key at the end.
#include "vaw_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define VAW_X86 1
#include <immintrin.h>
#define VAW_TARGET_AVX __attribute__((target("avx")))
#define VAW_TARGET_AVX2 __attribute__((target("avx2")))
#define VAW_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl")))
#else
#define VAW_X86 0
#endif

namespace varweight {
namespace {

constexpr int64_t kMinChunk = 16384;
constexpr int64_t kMaxChunks = 256;

// Fixed chunking: a function of (B, K) only.
struct ChunkPlan {
  int64_t size;
  int64_t count;
};

ChunkPlan plan_chunks(int64_t B, int64_t K) {
  int64_t size = std::max<int64_t>(kMinChunk, 32 * K);
  size = std::max<int64_t>(size, (B + kMaxChunks - 1) / kMaxChunks);
  return ChunkPlan{size, (B + size - 1) / size};
}

// ---------------------------------------------------------------------------------------------
// The pass over one chunk.
//
// Every sample adds the four doubles (1, L, L*L, 0) to row b of a (K + 1) x 4 histogram: one
// 256-bit add per sample where the CPU has AVX. Row K collects the samples that must stay out of
// the statistics (lam NaN or loss non-finite): its count is the non-finite count, its sums are
// ignored, and their w * L goes to a separate `excluded` sum. For K <= 256 and B >= 1024, sample
// j of a chunk adds to copy j % kCopies of the histogram, so that runs of one bin do not wait on
// one memory location; the copies are summed per chunk as (h0 + h1) + (h2 + h3). Otherwise one
// copy. Either way the choice depends on (B, K) only.
//
// The weighted loss needs no per-sample accumulation: every sample in row k < K has w = table[k],
// so sum_i w_i L_i = sum_k table[k] * s_k + excluded, formed once from the chunk totals (over the
// bins that saw samples only: the table entry of an empty bin is never read, as in the reference).
// ---------------------------------------------------------------------------------------------
constexpr int64_t kCopies = 4;
constexpr int64_t kMaxBinsForCopies = 256;  // above: one copy (see forward_pass)
constexpr int64_t kRow = 4;     // doubles per histogram row: n, s, q, pad
constexpr int64_t kBlock = 256; // samples staged at a time by the vectorised paths (multiple of kCopies)

// Result layout of a chunk and of the pass: the op's moments [n(K), s(K), q(K), nonfinite], then
// the excluded samples' w * L.
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

struct BinParams {
  float lmin, bin_scale, kmax;  // float32 lmin, bin scale and K - 1
  int32_t dump;             // K: the row of the samples left out of the statistics
};

// Precision contract: float32 subtract and multiply, floor, clamp to [0, K-1] in float (inf safe),
// then int. Clamping first and truncating is the same: floor is monotone and the bounds are
// integers, and truncation is floor on [0, K-1]. NaN lam: bin 0 (the caller masks it).
inline int32_t bin_of(float l, const BinParams& bp) {
  float u = (l - bp.lmin) * bp.bin_scale;
  u = u < 0.0f ? 0.0f : u;
  u = u > bp.kmax ? bp.kmax : u;
  return std::isnan(l) ? 0 : static_cast<int32_t>(u);
}

// The largest float32 |L| with stat_loss_ok(L): the vectorised float32 stages compare |L| with it.
constexpr float kMaxStatLossF32 = 0x1.fffffep+63f;

// One sample: its weight `wv` and its histogram row (bp.dump for a sample kept out of the
// statistics, whose w * L then goes to `excluded`).
inline int32_t weigh_sample(float l, double L, const float* __restrict__ table, const BinParams& bp, float& wv,
                            double& excluded) {
  const bool lam_nan = std::isnan(l);
  const int32_t b = bin_of(l, bp);
  wv = lam_nan ? 1.0f : table[b];
  if (lam_nan || !stat_loss_ok(L)) {
    excluded += static_cast<double>(wv) * L;
    return bp.dump;
  }
  return b;
}

// The portable pass: any dtype, one sample at a time, straight into the histogram copies.
template <typename loss_t, typename lam_t>
void pass_scalar(const loss_t* __restrict__ loss, const lam_t* __restrict__ lam, const float* __restrict__ table,
                 float* __restrict__ w_out, int64_t begin, int64_t end, const BinParams& bp,
                 double* __restrict__ hist, int64_t stride, double& excluded) {
  auto one = [&](int64_t i, double* __restrict__ h) {
    const double L = load_loss(loss, i);
    float wv;
    double* row = h + kRow * weigh_sample(static_cast<float>(lam[i]), L, table, bp, wv, excluded);
    w_out[i] = wv;
    row[0] += 1.0;
    row[1] += L;
    row[2] += L * L;
  };
  int64_t i = begin;
  for (; i + kCopies <= end; i += kCopies) {
    for (int64_t c = 0; c < kCopies; ++c) one(i + c, hist + c * stride);
  }
  for (int64_t c = 0; i < end; ++i, ++c) one(i, hist + c * stride);
}

// Staging for the vectorised paths: per sample its row and its (1, L, L*L, 0), then one pass adds
// them in. Both produce exactly what pass_scalar adds, in the same order.
struct Stage {
  alignas(64) int32_t rows[kBlock];
  alignas(64) double vals[kRow * kBlock];
};

// Stages samples [j0, n) of a float32 block one at a time (the tails of the vectorised loops).
inline void stage_scalar(const float* __restrict__ loss, const float* __restrict__ lam,
                         const float* __restrict__ table, float* __restrict__ w_out, int64_t j0, int64_t n,
                         const BinParams& bp, Stage& st, double& excluded) {
  for (int64_t j = j0; j < n; ++j) {
    const double L = loss[j];
    float wv;
    st.rows[j] = weigh_sample(lam[j], L, table, bp, wv, excluded);
    w_out[j] = wv;
    double* v = st.vals + kRow * j;
    v[0] = 1.0;
    v[1] = L;
    v[2] = L * L;
    v[3] = 0.0;
  }
}

// ---------------------------------------------------------------------------------------------
// Instruction sets. "scalar" is pass_scalar; "avx2" and "avx512" stage float32 blocks with 8- or
// 16-wide binning and table lookups (in-register permutes for K <= 8 / K <= 64, a gather beyond)
// and add the staged rows with 256-bit adds. Every path adds the same values in the same order,
// so all give bitwise the same result; tests compare them (varweight_ext::cpu_isa selects one).
// ---------------------------------------------------------------------------------------------
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

Isa best_isa() {
  static const Isa best = [] {
#if VAW_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
    return Isa::kScalar;
  }();
  return best;
}

std::atomic<int> g_isa_request{-1};  // -1: auto

// The instruction set chosen with cpu_isa, or `automatic` when the choice is "auto".
Isa requested_isa(Isa automatic) {
  const int request = g_isa_request.load(std::memory_order_relaxed);
  return request < 0 ? automatic : static_cast<Isa>(request);
}

// Batches below this size are "small": "auto" runs the scalar pass (measured on a Xeon with
// AVX-512: a call that touches wide vectors costs a few microseconds more up front than it saves
// on a small batch) and the histogram has one copy.
constexpr int64_t kSmallBatch = 1024;

Isa pass_isa(int64_t B) { return requested_isa(B >= kSmallBatch ? best_isa() : Isa::kScalar); }

#if VAW_X86
// GCC 12 flags the deliberately undefined registers inside its own AVX-512 intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// Adds staged rows [0, n) of a block into the histogram copies (sample j into copy j % kCopies).
VAW_TARGET_AVX void add_staged_avx(const Stage& st, int64_t n, double* __restrict__ hist, int64_t stride) {
  int64_t j = 0;
  for (; j + kCopies <= n; j += kCopies) {
    for (int64_t c = 0; c < kCopies; ++c) {
      double* row = hist + c * stride + kRow * static_cast<int64_t>(st.rows[j + c]);
      _mm256_storeu_pd(row, _mm256_add_pd(_mm256_loadu_pd(row), _mm256_load_pd(st.vals + kRow * (j + c))));
    }
  }
  for (int64_t c = 0; j < n; ++j, ++c) {
    double* row = hist + c * stride + kRow * static_cast<int64_t>(st.rows[j]);
    _mm256_storeu_pd(row, _mm256_add_pd(_mm256_loadu_pd(row), _mm256_load_pd(st.vals + kRow * j)));
  }
}

// Lanes with `bad` set: their w * L into `excluded`, in lane order (the rare path).
inline void add_excluded(unsigned bad, const float* w, const float* L, double& excluded) {
  for (int k = 0; bad != 0; ++k, bad >>= 1) {
    if (bad & 1u) excluded += static_cast<double>(w[k]) * static_cast<double>(L[k]);
  }
}

// (1, L, L*L, 0) of 4 samples from their float32 losses, as 4 x 4 doubles at v.
VAW_TARGET_AVX2 inline void stage_vals4(__m128 L4, double* v) {
  const __m256d L = _mm256_cvtps_pd(L4);
  const __m256d Q = _mm256_mul_pd(L, L);
  const __m256d lo = _mm256_unpacklo_pd(L, Q);  // L0 Q0 L2 Q2
  const __m256d hi = _mm256_unpackhi_pd(L, Q);  // L1 Q1 L3 Q3
  const __m256d one_zero = _mm256_set_pd(0.0, 0.0, 0.0, 1.0);
  // (x, La, Qa, x) from (La, Qa, Lb, Qb) by permute4x64 [0, 0, 1, 0], then lanes 0 and 3 from one_zero.
  const __m256d s0 = _mm256_permute4x64_pd(lo, 0x10);  // L0 L0 Q0 L0
  const __m256d s1 = _mm256_permute4x64_pd(hi, 0x10);
  const __m256d s2 = _mm256_permute4x64_pd(lo, 0x38);  // L2 L2 Q2 L2
  const __m256d s3 = _mm256_permute4x64_pd(hi, 0x38);
  _mm256_store_pd(v, _mm256_blend_pd(s0, one_zero, 0x9));
  _mm256_store_pd(v + 4, _mm256_blend_pd(s1, one_zero, 0x9));
  _mm256_store_pd(v + 8, _mm256_blend_pd(s2, one_zero, 0x9));
  _mm256_store_pd(v + 12, _mm256_blend_pd(s3, one_zero, 0x9));
}

// Stages a float32 block with 8 lanes. table8: the table padded to 8 entries when K <= 8, else null.
VAW_TARGET_AVX2 void stage_avx2(const float* __restrict__ loss, const float* __restrict__ lam,
                                const float* __restrict__ table, const float* __restrict__ table8,
                                float* __restrict__ w_out, int64_t n, const BinParams& bp, Stage& st,
                                double& excluded) {
  const __m256 vl = _mm256_set1_ps(bp.lmin), vs = _mm256_set1_ps(bp.bin_scale), vk = _mm256_set1_ps(bp.kmax);
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 lmax = _mm256_set1_ps(kMaxStatLossF32);
  const __m256i dump = _mm256_set1_epi32(bp.dump);
  const __m256 t8 = table8 != nullptr ? _mm256_loadu_ps(table8) : zero;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 l = _mm256_loadu_ps(lam + j);
    const __m256 nan = _mm256_cmp_ps(l, l, _CMP_UNORD_Q);
    __m256 u = _mm256_mul_ps(_mm256_sub_ps(l, vl), vs);
    u = _mm256_max_ps(u, zero);  // u < 0 -> 0, NaN -> 0 (second operand)
    u = _mm256_min_ps(u, vk);
    const __m256i b = _mm256_cvttps_epi32(u);
    const __m256 looked = table8 != nullptr ? _mm256_permutevar8x32_ps(t8, b) : _mm256_i32gather_ps(table, b, 4);
    const __m256 wv = _mm256_blendv_ps(looked, one, nan);
    _mm256_storeu_ps(w_out + j, wv);
    const __m256 L = _mm256_loadu_ps(loss + j);
    const __m256 ok = _mm256_cmp_ps(_mm256_and_ps(L, absmask), lmax, _CMP_LE_OQ);
    const __m256 bad = _mm256_or_ps(nan, _mm256_xor_ps(ok, _mm256_castsi256_ps(_mm256_set1_epi32(-1))));
    const int bad_bits = _mm256_movemask_ps(bad);
    _mm256_store_si256(reinterpret_cast<__m256i*>(st.rows + j),
                       _mm256_blendv_epi8(b, dump, _mm256_castps_si256(bad)));
    if (__builtin_expect(bad_bits != 0, 0)) {
      alignas(32) float wt[8], Lt[8];
      _mm256_store_ps(wt, wv);
      _mm256_store_ps(Lt, L);
      add_excluded(static_cast<unsigned>(bad_bits), wt, Lt, excluded);
    }
    stage_vals4(_mm256_castps256_ps128(L), st.vals + kRow * j);
    stage_vals4(_mm256_extractf128_ps(L, 1), st.vals + kRow * (j + 4));
  }
  stage_scalar(loss, lam, table, w_out, j, n, bp, st, excluded);
}

// Stages a float32 block with 16 lanes. table64: the table padded to 64 entries when K <= 64.
VAW_TARGET_AVX512 void stage_avx512(const float* __restrict__ loss, const float* __restrict__ lam,
                                    const float* __restrict__ table, const float* __restrict__ table64,
                                    float* __restrict__ w_out, int64_t n, const BinParams& bp, Stage& st,
                                    double& excluded) {
  const __m512 vl = _mm512_set1_ps(bp.lmin), vs = _mm512_set1_ps(bp.bin_scale), vk = _mm512_set1_ps(bp.kmax);
  const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
  const __m512 lmax = _mm512_set1_ps(kMaxStatLossF32);
  const __m512i dump = _mm512_set1_epi32(bp.dump);
  const __m512i bit5 = _mm512_set1_epi32(32);
  const bool permute = table64 != nullptr;
  const __m512 t0 = permute ? _mm512_loadu_ps(table64) : zero, t1 = permute ? _mm512_loadu_ps(table64 + 16) : zero;
  const __m512 t2 = permute ? _mm512_loadu_ps(table64 + 32) : zero, t3 = permute ? _mm512_loadu_ps(table64 + 48) : zero;
  const __m512d ones = _mm512_set1_pd(1.0);
  // Two samples per 512-bit row pair: (1, L_a, Q_a, 0, 1, L_b, Q_b, 0), lanes taken from (L, Q).
  const __m512i pick[4] = {
      _mm512_set_epi64(0, 9, 1, 0, 0, 8, 0, 0), _mm512_set_epi64(0, 11, 3, 0, 0, 10, 2, 0),
      _mm512_set_epi64(0, 13, 5, 0, 0, 12, 4, 0), _mm512_set_epi64(0, 15, 7, 0, 0, 14, 6, 0)};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 l = _mm512_loadu_ps(lam + j);
    const __mmask16 nan = _mm512_cmp_ps_mask(l, l, _CMP_UNORD_Q);
    __m512 u = _mm512_mul_ps(_mm512_sub_ps(l, vl), vs);
    u = _mm512_max_ps(u, zero);  // u < 0 -> 0, NaN -> 0 (second operand)
    u = _mm512_min_ps(u, vk);
    const __m512i b = _mm512_cvttps_epi32(u);
    __m512 looked;
    if (permute) {
      const __m512 lo = _mm512_permutex2var_ps(t0, b, t1);
      const __m512 hi = _mm512_permutex2var_ps(t2, b, t3);
      looked = _mm512_mask_mov_ps(lo, _mm512_test_epi32_mask(b, bit5), hi);
    } else {
      looked = _mm512_i32gather_ps(b, table, 4);
    }
    const __m512 wv = _mm512_mask_mov_ps(looked, nan, one);
    _mm512_storeu_ps(w_out + j, wv);
    const __m512 L = _mm512_loadu_ps(loss + j);
    const __mmask16 ok = _mm512_cmp_ps_mask(_mm512_abs_ps(L), lmax, _CMP_LE_OQ);
    const __mmask16 bad = static_cast<__mmask16>(nan | static_cast<__mmask16>(~ok));
    _mm512_store_si512(st.rows + j, _mm512_mask_mov_epi32(b, bad, dump));
    if (__builtin_expect(bad != 0, 0)) {
      alignas(64) float wt[16], Lt[16];
      _mm512_store_ps(wt, wv);
      _mm512_store_ps(Lt, L);
      add_excluded(static_cast<unsigned>(bad), wt, Lt, excluded);
    }
    for (int half = 0; half < 2; ++half) {
      const __m512d Ld = _mm512_cvtps_pd(half ? _mm512_extractf32x8_ps(L, 1) : _mm512_castps512_ps256(L));
      const __m512d Qd = _mm512_mul_pd(Ld, Ld);
      double* v = st.vals + kRow * (j + 8 * half);
      for (int p = 0; p < 4; ++p) {
        const __m512d r = _mm512_permutex2var_pd(Ld, pick[p], Qd);
        _mm512_store_pd(v + 8 * p, _mm512_maskz_mov_pd(0x77, _mm512_mask_mov_pd(r, 0x11, ones)));
      }
    }
  }
  stage_scalar(loss, lam, table, w_out, j, n, bp, st, excluded);
}
#pragma GCC diagnostic pop
#endif  // VAW_X86

// The whole pass over one chunk into its histogram copies, on the active instruction set.
template <typename loss_t, typename lam_t>
void pass_chunk(const loss_t* loss, const lam_t* lam, const float* table, const float* table_padded,
                float* w_out, int64_t begin, int64_t end, const BinParams& bp, Isa isa, double* hist,
                int64_t stride, double& excluded) {
#if VAW_X86
  if constexpr (std::is_same_v<loss_t, float> && std::is_same_v<lam_t, float>) {
    if (isa != Isa::kScalar) {
      Stage st;
      for (int64_t block = begin; block < end; block += kBlock) {
        const int64_t n = std::min(kBlock, end - block);
        if (isa == Isa::kAvx512) {
          stage_avx512(loss + block, lam + block, table, table_padded, w_out + block, n, bp, st, excluded);
        } else {
          stage_avx2(loss + block, lam + block, table, table_padded, w_out + block, n, bp, st, excluded);
        }
        // Ask for the next block's inputs now, so that their loads overlap the histogram adds
        // (3-6% in the standalone harness of the 2^20 pass).
        for (int64_t line = block + kBlock; line < std::min(end, block + 2 * kBlock); line += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(lam + line), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(loss + line), _MM_HINT_T0);
        }
        add_staged_avx(st, n, hist, stride);
      }
      return;
    }
  }
#endif
  (void)table_padded;
  (void)isa;
  pass_scalar<loss_t, lam_t>(loss, lam, table, w_out, begin, end, bp, hist, stride, excluded);
}

// Sums the histogram copies of a chunk into its result (acc_len(K) doubles, added to `result`).
void fold_chunk(const double* hist, int64_t stride, int64_t K, double excluded, double* result) {
  for (int64_t k = 0; k <= K; ++k) {
    const double* r = hist + kRow * k;
    for (int64_t c = 0; c < 3; ++c) {
      const double v = stride == 0 ? r[c] : (r[c] + r[stride + c]) + (r[2 * stride + c] + r[3 * stride + c]);
      if (k < K) {
        result[c * K + k] += v;
      } else if (c == 0) {
        result[3 * K] += v;  // the non-finite count
      }
    }
  }
  result[3 * K + 1] += excluded;
}

// Runs the pass over the whole batch; `result` (acc_len(K) zeros) receives the moments and the
// excluded samples' w * L. Returns sum_i w_i L_i.
template <typename loss_t, typename lam_t>
double forward_pass(const loss_t* loss, const lam_t* lam, const float* table, float* w_out, int64_t B, int64_t K,
                    double lmin, double bin_scale, double* result) {
  const BinParams bp{static_cast<float>(lmin), static_cast<float>(bin_scale), static_cast<float>(K - 1),
                     static_cast<int32_t>(K)};
  const Isa isa = pass_isa(B);
  // The table padded for the in-register lookups (K <= 8 with AVX2, K <= 64 with AVX-512).
  alignas(64) float padded[64] = {};
  const float* table_padded = nullptr;
  if ((isa == Isa::kAvx2 && K <= 8) || (isa == Isa::kAvx512 && K <= 64)) {
    std::memcpy(padded, table, sizeof(float) * K);
    table_padded = padded;
  }
  const int64_t len = acc_len(K);
  // Distance between the histogram copies; 0 (one shared copy) when K is large (the copies would
  // no longer fit in L1, and with many bins runs of one bin are rare anyway) or B small (zeroing
  // and folding the copies would cost more than they save).
  const int64_t rows_len = kRow * (K + 1);
  const int64_t stride = (K <= kMaxBinsForCopies && B >= kSmallBatch) ? rows_len : 0;
  const int64_t hist_len = stride == 0 ? rows_len : kCopies * rows_len;
  const ChunkPlan plan = plan_chunks(B, K);
  std::vector<double> partial(static_cast<size_t>((plan.count > 1 ? plan.count : 0) * len), 0.0);
  at::parallel_for(0, plan.count, 1, [&](int64_t c0, int64_t c1) {
    // One scratch per thread, kept between calls: small batches should not pay for an allocation.
    thread_local std::vector<double> hist;
    if (static_cast<int64_t>(hist.size()) < hist_len) hist.resize(static_cast<size_t>(hist_len));
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(hist.begin(), hist.begin() + hist_len, 0.0);
      double excluded = 0.0;
      pass_chunk<loss_t, lam_t>(loss, lam, table, table_padded, w_out, c * plan.size,
                                std::min(B, (c + 1) * plan.size), bp, isa, hist.data(), stride, excluded);
      fold_chunk(hist.data(), stride, K, excluded, plan.count > 1 ? partial.data() + c * len : result);
    }
  });
  for (int64_t c = 0; c < plan.count && plan.count > 1; ++c) {  // fixed chunk order
    const double* p = partial.data() + c * len;
    for (int64_t j = 0; j < len; ++j) result[j] += p[j];
  }
  double wsum = 0.0;
  for (int64_t k = 0; k < K; ++k) {  // bins no sample fell in are skipped: their weight may be anything
    if (result[k] > 0) wsum += static_cast<double>(table[k]) * result[K + k];
  }
  return wsum + result[3 * K + 1];
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

// Forward over (loss, lam) with the given table: fills w, out and `sums` (acc_len(K): the moments,
// then the excluded w * L; gathered in eval mode too, since the weighted mean is formed from them).
void forward_impl(const at::Tensor& loss_in, const at::Tensor& lam_in, const at::Tensor& weight_in, double lmin,
                  double bin_scale, at::Tensor& out, at::Tensor& w, std::vector<double>& sums) {
  const at::Tensor loss = loss_in.contiguous();
  const at::Tensor lam = lam_in.contiguous();
  const at::Tensor table = weight_in.contiguous();
  const int64_t B = loss.numel();
  const int64_t K = table.numel();
  w = at::empty({B}, loss.options().dtype(at::kFloat));
  out = at::empty({}, loss.options());
  sums.assign(static_cast<size_t>(acc_len(K)), 0.0);
  double wsum = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "varweight_cpu_loss", [&] {
    using loss_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lam.scalar_type(), "varweight_cpu_lam", [&] {
      using lam_t = scalar_t;
      wsum = forward_pass<loss_t, lam_t>(loss.const_data_ptr<loss_t>(), lam.const_data_ptr<lam_t>(),
                                         table.const_data_ptr<float>(), w.mutable_data_ptr<float>(), B, K, lmin,
                                         bin_scale, sums.data());
    });
    write_out<loss_t>(out, wsum, B);
  });
}

// SPEC steps 6-7 from n, s, q (each K long) and the non-finite count.
template <typename c_t>
void update_impl(const double* n, const double* s, const double* q, double nonfinite_count, float* M, float* Q,
                 float* Z, c_t* C, float* weight, int64_t* step, int64_t* nonfinite, int64_t K, const Params& p) {
  // 6. EMA of the bins that saw samples.
  for (int64_t k = 0; k < K; ++k) {
    if (n[k] > 0) ema_bin(n[k], s[k], q[k], p.decay, M[k], Q[k], Z[k]);
    C[k] += static_cast<c_t>(n[k]);
  }
  *step += 1;
  *nonfinite += static_cast<int64_t>(nonfinite_count);

  // 7. Weight table (reference.weight_table).
  std::vector<double> raw(static_cast<size_t>(K));
  double total_ready = 0.0, ready_raw = 0.0, total = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    raw[k] = raw_weight(M[k], Q[k], Z[k], p);
    const double ck = static_cast<double>(C[k]);
    const double rc = ready_count(ck, p);
    total_ready += rc;
    ready_raw += rc * raw[k];
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
  for (int64_t k = 0; k < K; ++k) weight[k] = table_weight(raw[k], norm, steps, p);
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

// Backward of a step on CPU: grad * w / B in float32, cast to the loss dtype, with the roundings
// of reference.scale_grad (float32 product, IEEE float32 division, one cast), in one loop.
at::Tensor scale_grad_cpu(const at::Tensor& grad, const at::Tensor& w_in, at::ScalarType dtype) {
  check_scale_grad_args(grad, w_in, dtype, at::kCPU);
  const at::Tensor w = w_in.contiguous();
  const int64_t B = w.numel();
  const float g = grad.to(at::kFloat).item<float>();
  const float b = static_cast<float>(B);
  at::Tensor out = at::empty({B}, w.options().dtype(dtype));
  const float* wp = w.const_data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "varweight_scale_grad_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = static_cast<scalar_t>((g * wp[i]) / b);
    });
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_moments_cpu(const at::Tensor& loss, const at::Tensor& lam,
                                                                   const at::Tensor& weight, double lmin,
                                                                   double bin_scale, bool training) {
  check_forward_args(loss, lam, weight, at::kCPU);
  at::Tensor out, w;
  std::vector<double> sums;
  forward_impl(loss, lam, weight, lmin, bin_scale, out, w, sums);
  if (!training) return {out, w, at::empty({0}, loss.options().dtype(at::kDouble))};
  const int64_t K = weight.numel();
  at::Tensor moments = at::empty({3 * K + 1}, loss.options().dtype(at::kDouble));
  std::copy(sums.begin(), sums.begin() + 3 * K + 1, moments.data_ptr<double>());
  return {out, w, moments};
}

void update_cpu(const at::Tensor& moments, const at::Tensor& M, const at::Tensor& Q, const at::Tensor& Z,
                const at::Tensor& C, const at::Tensor& weight, const at::Tensor& step, const at::Tensor& nonfinite,
                c10::ArrayRef<double> params) {
  const Params p = check_update_args(moments, M, Q, Z, C, weight, step, nonfinite, params, at::kCPU);
  const int64_t K = M.numel();
  const at::Tensor mom = moments.contiguous();
  const double* m = mom.const_data_ptr<double>();
  update_from(m, m + K, m + 2 * K, m[3 * K], M, Q, Z, C, weight, step, nonfinite, p);
}

std::tuple<at::Tensor, at::Tensor> step_cpu(const at::Tensor& loss, const at::Tensor& lam, const at::Tensor& M,
                                            const at::Tensor& Q, const at::Tensor& Z, const at::Tensor& C,
                                            const at::Tensor& weight, const at::Tensor& step,
                                            const at::Tensor& nonfinite, c10::ArrayRef<double> params,
                                            bool training) {
  const Params p = check_step_args(loss, lam, M, Q, Z, C, weight, step, nonfinite, params, at::kCPU);
  at::Tensor out, w;
  std::vector<double> sums;
  forward_impl(loss, lam, weight, p.lmin, p.bin_scale, out, w, sums);
  if (training) {
    const int64_t K = M.numel();
    const double* m = sums.data();
    update_from(m, m + K, m + 2 * K, m[3 * K], M, Q, Z, C, weight, step, nonfinite, p);
  }
  return {out, w};
}

std::string cpu_isa(std::string request) {
  if (!request.empty()) {
    int want = -1;
    if (request != "auto") {
      for (int i = 0; i < 3; ++i) {
        if (request == kIsaNames[i]) want = i;
      }
      TORCH_CHECK(want >= 0, "varweight: unknown CPU instruction set '", request,
                  "'; expected one of auto, scalar, avx2, avx512");
      TORCH_CHECK(want <= static_cast<int>(best_isa()), "varweight: this CPU cannot run the '", request,
                  "' pass (the best it has is '", kIsaNames[static_cast<int>(best_isa())], "')");
    }
    g_isa_request.store(want, std::memory_order_relaxed);
  }
  return kIsaNames[static_cast<int>(requested_isa(best_isa()))];
}

}  // namespace varweight

TORCH_LIBRARY_IMPL(varweight_ext, CPU, m) {
  m.impl("forward_moments", &varweight::forward_moments_cpu);
  m.impl("update", &varweight::update_cpu);
  m.impl("step", &varweight::step_cpu);
  m.impl("scale_grad", &varweight::scale_grad_cpu);
}
