// CUDA kernels of one VAW step (SPEC.md, varweight_kernels/reference.py).
//
// A step is at most two launches and never synchronises with the host:
//   1. vaw_pass_kernel: a grid whose size depends only on (B, K). Block g handles a fixed
//      contiguous range of samples in tiles of kThreads x kItems (each thread loads its kItems
//      samples of a tile before using any, so several loads are in flight); it bins, gathers the
//      weight (the table as it was before this batch), writes w and accumulates its partial sums:
//      sum(w*L), the non-finite count and (training) the per-bin n, s, q. No float atomics: inside
//      a warp the samples of one bin are summed in lane order by the group's leader
//      (__match_any_sync). For K <= kPerWarpMaxBins every warp owns a histogram in shared memory
//      (no barrier per tile; the block adds the warp histograms in warp order at the end); for
//      larger K the warps of a block add their group sums to one histogram one warp after the
//      other. Each block writes its partials to its own row of a global buffer.
//   2. vaw_finalize_kernel (one block): adds the rows in block order (one thread per entry when
//      there are few rows, else lane-strided sums and a fixed shuffle tree), writes out, the moment
//      buffer and/or applies the EMA, counters (step and nonfinite are updated on the device) and
//      the next weight table, all in double precision.
// Backward (scale_grad) is one elementwise launch.
// With the fused kernels switched on (cuda_fused_kernels(1); VARWEIGHT_FUSED_KERNELS=1; off by
// default until measured on a GPU) a training step with K <= 64 and float32 lam is ONE launch,
// vaw_fused_step_kernel (per-thread shared-memory columns, the last block finishes the step), and
// backward the float4 scale_grad_vec_kernel (same bits); see the fused section below.
// The result is deterministic: the same bits on every run for the same shapes.
#include "../common.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

extern "C" __attribute__((used)) const char varweight_cuda_build_marker[] = VAW_BUILD_MARKER_TEXT;

namespace varweight {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kThreads = 256;  // main pass block size
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;                     // samples per thread per tile (loads in flight)
constexpr int64_t kTile = kThreads * kItems;  // samples per tile
constexpr int kFinalThreads = 1024;  // finalise block size (32 warps)
constexpr int64_t kMaxBlocks = 1024;
constexpr int64_t kPartialBudget = int64_t(1) << 21;  // doubles of per-block partials (16 MiB)
constexpr int64_t kSmemHistMax = 5120;                // doubles of shared histogram (40 KiB)
constexpr int64_t kPerWarpMaxBins = 128;              // per-warp histograms: kWarps * 3K doubles (24 KiB at most)
constexpr int64_t kFewRows = 32;                      // finalise: one thread per entry up to this many rows

// Grid of the main pass: a function of (B, K) only.
struct Grid {
  int64_t blocks;
  int64_t per_block;
};

Grid plan_grid(int64_t B, int64_t K) {
  const int64_t stride = 3 * K + 2;
  const int64_t cap = std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, kPartialBudget / stride));
  const int64_t tiles = (B + kTile - 1) / kTile;
  int64_t blocks = std::min(tiles, cap);
  const int64_t per_block = ((tiles + blocks - 1) / blocks) * kTile;
  blocks = (B + per_block - 1) / per_block;
  return Grid{blocks, per_block};
}

// A loss value as the statistics take it: float64 losses as they are, the others through float32.
template <typename T>
__device__ __forceinline__ double loss_value(T x) {
  return static_cast<double>(static_cast<float>(x));
}
template <>
__device__ __forceinline__ double loss_value<double>(double x) {
  return x;
}

// Bin of a float32 lam that is not NaN. Precision contract: float32 subtract and multiply (no
// FMA), floor, clamp in float, then int.
__device__ __forceinline__ int bin_of(float l, float lminf, float scalef, float kmaxf) {
  float u = floorf(__fmul_rn(__fsub_rn(l, lminf), scalef));
  u = u < 0.0f ? 0.0f : u;
  u = u > kmaxf ? kmaxf : u;
  return static_cast<int>(u);
}

// Row layout of the partials: [hist (hist_len = 3K: n(K), s(K), q(K); 0 in eval), nonfinite, wsum].
// PER_WARP: each warp has its own 3K-double histogram in shared memory (K <= kPerWarpMaxBins).
// Otherwise one block histogram, in shared memory when use_smem, else the block's own row.
template <typename loss_t, typename lam_t, bool TRAIN, bool PER_WARP>
__global__ void __launch_bounds__(kThreads)
    vaw_pass_kernel(const loss_t* __restrict__ loss, const lam_t* __restrict__ lam, const float* __restrict__ table,
                    float* __restrict__ w_out, double* __restrict__ partials, int64_t B, int64_t per_block, int K,
                    int64_t stride, bool use_smem, float lminf, float scalef, float kmaxf) {
  extern __shared__ double smem_hist[];
  __shared__ double stage_v[kThreads];
  __shared__ double stage_q[kThreads];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t hist_len = TRAIN ? 3 * int64_t(K) : 0;
  double* row = partials + int64_t(blockIdx.x) * stride;
  double* hist = (TRAIN && (PER_WARP || use_smem)) ? smem_hist : row;
  if (TRAIN) {
    const int64_t zero_len = PER_WARP ? kWarps * hist_len : hist_len;
    for (int64_t j = tid; j < zero_len; j += kThreads) hist[j] = 0.0;
    __syncthreads();
  }
  double* warp_hist = PER_WARP ? hist + warp * hist_len : hist;
  const int64_t begin = int64_t(blockIdx.x) * per_block;
  const int64_t end = min(B, begin + per_block);
  double wsum = 0.0;
  double nonfinite = 0.0;
  for (int64_t base = begin; base < end; base += kTile) {  // same trip count for every thread
    // Load the thread's kItems samples of this tile first (coalesced, all in flight at once).
    float lam_v[kItems];
    double loss_v[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + j * kThreads + tid;
      lam_v[j] = 0.0f;
      loss_v[j] = 0.0;
      if (i < end) {
        lam_v[j] = static_cast<float>(lam[i]);
        loss_v[j] = loss_value(loss[i]);
      }
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + j * kThreads + tid;
      bool valid = false;
      int bin = 0;
      const double L = loss_v[j];
      if (i < end) {
        const float l = lam_v[j];
        const bool lam_nan = isnan(l);
        bin = lam_nan ? 0 : bin_of(l, lminf, scalef, kmaxf);
        const float wv = lam_nan ? 1.0f : table[bin];
        w_out[i] = wv;
        wsum = __dadd_rn(wsum, __dmul_rn(static_cast<double>(wv), L));
        if (TRAIN) {
          valid = !lam_nan && stat_loss_ok(L);
          if (!valid) nonfinite += 1.0;
        }
      }
      if (TRAIN) {
        stage_v[tid] = valid ? L : 0.0;
        stage_q[tid] = valid ? __dmul_rn(L, L) : 0.0;
        const unsigned group = __match_any_sync(kFullMask, valid ? bin : -1);
        __syncwarp();
        const bool leader = valid && lane == __ffs(group) - 1;
        double gs = 0.0, gq = 0.0;
        if (leader) {  // the group's values in lane order
          for (unsigned rest = group; rest != 0u; rest &= rest - 1u) {
            const int t = warp * 32 + __ffs(rest) - 1;
            gs = __dadd_rn(gs, stage_v[t]);
            gq = __dadd_rn(gq, stage_q[t]);
          }
        }
        if (PER_WARP) {  // the leaders of one warp hold distinct bins: no conflicts, no block barrier
          if (leader) {
            warp_hist[bin] += static_cast<double>(__popc(group));
            warp_hist[K + bin] = __dadd_rn(warp_hist[K + bin], gs);
            warp_hist[2 * K + bin] = __dadd_rn(warp_hist[2 * K + bin], gq);
          }
          __syncwarp();  // stage_* is rewritten in the next round
        } else {
          for (int wp = 0; wp < kWarps; ++wp) {  // warps one after the other: a fixed order per bin
            if (warp == wp && leader) {
              hist[bin] += static_cast<double>(__popc(group));
              hist[K + bin] = __dadd_rn(hist[K + bin], gs);
              hist[2 * K + bin] = __dadd_rn(hist[2 * K + bin], gq);
            }
            __syncthreads();
          }
        }
      }
    }
  }
  // Block sums of wsum and nonfinite: a fixed tree.
  __syncthreads();
  stage_v[tid] = wsum;
  stage_q[tid] = nonfinite;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (tid < s) {
      stage_v[tid] = __dadd_rn(stage_v[tid], stage_v[tid + s]);
      stage_q[tid] = __dadd_rn(stage_q[tid], stage_q[tid + s]);
    }
    __syncthreads();
  }
  if (TRAIN && PER_WARP) {  // the warp histograms in warp order
    for (int64_t j = tid; j < hist_len; j += kThreads) {
      double acc = hist[j];
      for (int wp = 1; wp < kWarps; ++wp) acc = __dadd_rn(acc, hist[wp * hist_len + j]);
      row[j] = acc;
    }
  } else if (TRAIN && use_smem) {
    for (int64_t j = tid; j < hist_len; j += kThreads) row[j] = hist[j];
  }
  if (tid == 0) {
    row[hist_len] = stage_q[0];
    row[hist_len + 1] = stage_v[0];
  }
}

// Backward: grad_loss = (float(grad) * w) / B in the loss dtype, as ATen's
// grad.to(float).mul(w).div_(B) computes it on CUDA (the division by a host scalar is a
// multiplication by its float reciprocal).
template <typename grad_t, typename out_t>
__global__ void scale_grad_kernel(const grad_t* __restrict__ grad, const float* __restrict__ w,
                                  out_t* __restrict__ out, int64_t B, float inv_b) {
  const float g = static_cast<float>(*grad);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = static_cast<out_t>(__fmul_rn(__fmul_rn(g, w[i]), inv_b));
  }
}

// Sum over a block of THREADS threads in a fixed order (shuffle-down trees); every thread gets the result.
template <int THREADS>
__device__ double block_sum(double v, double* sh) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) v = __dadd_rn(v, __shfl_down_sync(kFullMask, v, off));
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < THREADS / 32 ? sh[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) v = __dadd_rn(v, __shfl_down_sync(kFullMask, v, off));
    if (lane == 0) sh[32] = v;
  }
  __syncthreads();
  const double r = sh[32];
  __syncthreads();
  return r;
}

// block_sum of three values at once (one set of barriers).
template <int THREADS>
__device__ double3 block_sum3(double3 v, double3* sh) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    v.x = __dadd_rn(v.x, __shfl_down_sync(kFullMask, v.x, off));
    v.y = __dadd_rn(v.y, __shfl_down_sync(kFullMask, v.y, off));
    v.z = __dadd_rn(v.z, __shfl_down_sync(kFullMask, v.z, off));
  }
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < THREADS / 32 ? sh[lane] : make_double3(0.0, 0.0, 0.0);
    for (int off = 16; off > 0; off >>= 1) {
      v.x = __dadd_rn(v.x, __shfl_down_sync(kFullMask, v.x, off));
      v.y = __dadd_rn(v.y, __shfl_down_sync(kFullMask, v.y, off));
      v.z = __dadd_rn(v.z, __shfl_down_sync(kFullMask, v.z, off));
    }
    if (lane == 0) sh[32] = v;
  }
  __syncthreads();
  const double3 r = sh[32];
  __syncthreads();
  return r;
}

template <typename T>
__device__ __forceinline__ void store_out(T* out, double mean) {
  *out = static_cast<T>(static_cast<float>(mean));  // the reference accumulates these in float32
}
template <>
__device__ __forceinline__ void store_out<double>(double* out, double mean) {
  *out = mean;
}

// Partial rows are read through L2 (__ldcg) when other blocks of the same launch wrote them.
template <bool COHERENT>
__device__ __forceinline__ double load_partial(const double* p) {
  return COHERENT ? __ldcg(p) : *p;
}

// Run by one block of THREADS threads. partials: G rows of `stride` doubles laid out as
// [hist(hist_len), nonfinite, (wsum)]. out / moments_out / the state pointers may be null;
// scratch holds 4K doubles when updating. COHERENT: the rows were written by the other blocks
// of this launch (the fused step); they are then always summed one thread per entry.
template <int THREADS, bool COHERENT, typename out_t, typename c_t>
__device__ void finalize_block(const double* partials, int64_t G, int64_t stride, int K, int64_t hist_len,
                               bool has_wsum, int64_t B, out_t* out, double* moments_out, double* scratch, float* M,
                               float* Q, float* Z, c_t* C, float* weight, int64_t* step, int64_t* nonfinite,
                               const Params& p) {
  __shared__ double sh[33];
  __shared__ double3 sh3[33];
  __shared__ double s_nonfinite;
  __shared__ double s_step;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t entries = hist_len + (has_wsum ? 2 : 1);
  auto publish = [&](int64_t j, double acc) {  // entry j of the summed rows
    if (j < hist_len) {
      if (scratch != nullptr) scratch[j] = acc;
      if (moments_out != nullptr) moments_out[j] = acc;
    } else if (j == hist_len) {
      s_nonfinite = acc;
      if (moments_out != nullptr) moments_out[j] = acc;
    } else if (out != nullptr) {
      store_out(out, acc / static_cast<double>(B));
    }
  };
  if (COHERENT || G <= kFewRows) {  // few rows (small B): one thread per entry, rows in order, all loads at once
    for (int64_t j = tid; j < entries; j += THREADS) {
      double acc = 0.0;
#pragma unroll 8
      for (int64_t g = 0; g < G; ++g) acc = __dadd_rn(acc, load_partial<COHERENT>(partials + g * stride + j));
      publish(j, acc);
    }
  } else {
    for (int64_t j = warp; j < entries; j += THREADS / 32) {
      double acc = 0.0;
      for (int64_t g = lane; g < G; g += 32) acc = __dadd_rn(acc, partials[g * stride + j]);
      for (int off = 16; off > 0; off >>= 1) acc = __dadd_rn(acc, __shfl_down_sync(kFullMask, acc, off));
      if (lane == 0) publish(j, acc);
    }
  }
  if (M == nullptr) return;  // uniform across the block
  __syncthreads();
  if (tid == 0) {
    *step += 1;
    s_step = static_cast<double>(*step);
    *nonfinite += static_cast<int64_t>(s_nonfinite);
  }
  // 6. EMA of the bins that saw samples; then the weight table inputs from the float32 state.
  double tr = 0.0, trr = 0.0, tc = 0.0;
  for (int k = tid; k < K; k += THREADS) {
    const double nk = scratch[k];
    if (nk > 0) ema_bin(nk, scratch[K + k], scratch[2 * K + k], p.decay, M[k], Q[k], Z[k]);
    C[k] += static_cast<c_t>(nk);
    const double r = raw_weight(M[k], Q[k], Z[k], p);
    scratch[3 * K + k] = r;
    const double ck = static_cast<double>(C[k]);
    const double rc = ready_count(ck, p);
    tr += rc;
    trr += rc * r;
    tc += ck;
  }
  double3 sums = block_sum3<THREADS>(make_double3(tr, trr, tc), sh3);
  const double total_ready = sums.x;
  const double ready_raw = sums.y;
  const double total = sums.z;
  // 7. Weight table.
  const double fill = total_ready > 0 ? ready_raw / fmax(total_ready, 1.0) : 1.0;
  double tn = 0.0;
  for (int k = tid; k < K; k += THREADS) {
    const double ck = static_cast<double>(C[k]);
    const double r = ck >= p.min_count ? scratch[3 * K + k] : fill;
    scratch[3 * K + k] = r;
    const double pi = total > 0 ? ck / fmax(total, 1.0) : 1.0 / static_cast<double>(K);
    tn += pi * r;
  }
  const double norm = block_sum<THREADS>(tn, sh);  // its barriers also publish s_step
  for (int k = tid; k < K; k += THREADS) weight[k] = table_weight(scratch[3 * K + k], norm, s_step, p);
}

// One block of kFinalThreads: finalize_block on the rows of the main pass (or on the moments).
template <typename out_t, typename c_t>
__global__ void __launch_bounds__(kFinalThreads)
    vaw_finalize_kernel(const double* __restrict__ partials, int64_t G, int64_t stride, int K, int64_t hist_len,
                        bool has_wsum, int64_t B, out_t* out, double* moments_out, double* scratch, float* M,
                        float* Q, float* Z, c_t* C, float* weight, int64_t* step, int64_t* nonfinite, Params p) {
  finalize_block<kFinalThreads, false>(partials, G, stride, K, hist_len, has_wsum, B, out, moments_out, scratch, M, Q,
                                       Z, C, weight, step, nonfinite, p);
}

// ---- Fused path (cuda_fused_kernels(1), VARWEIGHT_FUSED_KERNELS=1): a training step in one launch.
// Not the default until benchmarks/gpu_check.sh has passed it on a GPU.
//
// vaw_fused_step_kernel: a grid of at most kFusedMaxBlocks blocks (a constant, so the sums depend
// on B and K only), each a fixed contiguous chunk of whole tiles. Every thread owns a column of
// per-bin (n, s, q) in shared memory (column-major by thread: no atomics, no bank conflicts, the
// same work whatever the lam distribution) and keeps kFusedLoads vector loads per array in flight.
// The block sums its columns in thread order into its partial row; the last block to take a
// ticket (fence + atomic counter, reset to 0 by that block) runs finalize_block on all rows.
constexpr int kFusedThreads = 128;
constexpr int kFusedVec = 4;    // samples per vector load
constexpr int kFusedLoads = 8;  // vector loads per thread, tile and array
constexpr int64_t kFusedTile = int64_t(kFusedThreads) * kFusedVec * kFusedLoads;  // 4096 samples
constexpr int64_t kFusedMaxBins = 64;                                             // 160 KiB of columns
constexpr int64_t kFusedMaxBlocks = 132;  // one wave on an H100 / H200 SXM (one block per SM)

template <typename T>
struct alignas(sizeof(T) * kFusedVec) Vec {
  T v[kFusedVec];
};

// Vector i of p when it lies before end, else its elements before end (0 after).
template <typename T>
__device__ __forceinline__ Vec<T> load_vec(const T* p, int64_t i, int64_t end) {
  if (i + kFusedVec <= end) return *reinterpret_cast<const Vec<T>*>(p + i);
  Vec<T> r;
#pragma unroll
  for (int e = 0; e < kFusedVec; ++e) r.v[e] = i + e < end ? p[i + e] : T(0);
  return r;
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, int64_t i, int64_t end, const Vec<T>& r) {
  if (i + kFusedVec <= end) {
    *reinterpret_cast<Vec<T>*>(p + i) = r;
    return;
  }
#pragma unroll
  for (int e = 0; e < kFusedVec; ++e) {
    if (i + e < end) p[i + e] = r.v[e];
  }
}

Grid plan_fused_grid(int64_t B) {
  const int64_t tiles = (B + kFusedTile - 1) / kFusedTile;
  int64_t blocks = std::min(tiles, kFusedMaxBlocks);
  const int64_t per_block = ((tiles + blocks - 1) / blocks) * kFusedTile;
  blocks = (B + per_block - 1) / per_block;
  return Grid{blocks, per_block};
}

size_t fused_smem_bytes(int64_t K) { return static_cast<size_t>(K * kFusedThreads) * (2 * sizeof(double) + sizeof(unsigned)); }

// partials: one row of 3K + 2 doubles per block ([n, s, q, nonfinite, wsum]); ticket: zero on entry.
template <typename loss_t, typename lam_t, typename c_t>
__global__ void __launch_bounds__(kFusedThreads, 1)
    vaw_fused_step_kernel(const loss_t* __restrict__ loss, const lam_t* __restrict__ lam, float* w_out,
                          double* partials, unsigned* ticket, double* scratch, loss_t* out, float* M, float* Q,
                          float* Z, c_t* C, float* weight, int64_t* step, int64_t* nonfinite, int64_t B,
                          int64_t per_block, int K, Params p) {
  extern __shared__ double fused_smem[];
  __shared__ float s_table[kFusedMaxBins];
  __shared__ double sh[33];
  __shared__ bool s_last;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  double* s_col = fused_smem;                                                     // [K][kFusedThreads]
  double* q_col = fused_smem + K * kFusedThreads;                                 // [K][kFusedThreads]
  unsigned* n_col = reinterpret_cast<unsigned*>(fused_smem + 2 * K * kFusedThreads);  // [K][kFusedThreads]
  // Zero the columns, copy the table (as it was before this batch).
  for (int j = tid; j < K * kFusedThreads; j += kFusedThreads) {
    s_col[j] = 0.0;
    q_col[j] = 0.0;
    n_col[j] = 0u;
  }
  for (int k = tid; k < K; k += kFusedThreads) s_table[k] = weight[k];
  __syncthreads();
  const float lminf = static_cast<float>(p.lmin);
  const float scalef = static_cast<float>(p.bin_scale);
  const float kmaxf = static_cast<float>(K - 1);
  const int64_t stride = 3 * int64_t(K) + 2;
  double* row = partials + int64_t(blockIdx.x) * stride;
  const int64_t begin = int64_t(blockIdx.x) * per_block;
  const int64_t end = min(B, begin + per_block);
  double wsum = 0.0;
  double bad = 0.0;
  for (int64_t base = begin; base < end; base += kFusedTile) {
    // All of the thread's loads of this tile first (coalesced vectors, in flight together).
    Vec<lam_t> lam_v[kFusedLoads];
    Vec<loss_t> loss_v[kFusedLoads];
#pragma unroll
    for (int j = 0; j < kFusedLoads; ++j) {
      const int64_t i = base + (int64_t(j) * kFusedThreads + tid) * kFusedVec;
      lam_v[j] = load_vec(lam, i, end);
      loss_v[j] = load_vec(loss, i, end);
    }
#pragma unroll
    for (int j = 0; j < kFusedLoads; ++j) {
      const int64_t i = base + (int64_t(j) * kFusedThreads + tid) * kFusedVec;
      Vec<float> w_v;
#pragma unroll
      for (int e = 0; e < kFusedVec; ++e) {
        // Bin, weight (the table as it was before this batch), weighted sum, own column.
        const float l = static_cast<float>(lam_v[j].v[e]);
        const double L = loss_value(loss_v[j].v[e]);
        const bool lam_nan = isnan(l);
        const int bin = lam_nan ? 0 : bin_of(l, lminf, scalef, kmaxf);
        w_v.v[e] = lam_nan ? 1.0f : s_table[bin];
        if (i + e < end) {
          wsum = __dadd_rn(wsum, __dmul_rn(static_cast<double>(w_v.v[e]), L));
          if (!lam_nan && stat_loss_ok(L)) {
            const int c = bin * kFusedThreads + tid;
            n_col[c] += 1u;
            s_col[c] = __dadd_rn(s_col[c], L);
            q_col[c] = __dadd_rn(q_col[c], __dmul_rn(L, L));
          } else {
            bad += 1.0;
          }
        }
      }
      store_vec(w_out, i, end, w_v);
    }
  }
  __syncthreads();
  // The block's row: each bin's column in thread order (lane-strided, then a fixed shuffle tree).
  for (int k = warp; k < K; k += kFusedThreads / 32) {
    unsigned n = 0u;
    double s = 0.0, q = 0.0;
    for (int t = lane; t < kFusedThreads; t += 32) {
      n += n_col[k * kFusedThreads + t];
      s = __dadd_rn(s, s_col[k * kFusedThreads + t]);
      q = __dadd_rn(q, q_col[k * kFusedThreads + t]);
    }
    for (int off = 16; off > 0; off >>= 1) {
      n += __shfl_down_sync(kFullMask, n, off);
      s = __dadd_rn(s, __shfl_down_sync(kFullMask, s, off));
      q = __dadd_rn(q, __shfl_down_sync(kFullMask, q, off));
    }
    if (lane == 0) {
      row[k] = static_cast<double>(n);
      row[K + k] = s;
      row[2 * K + k] = q;
    }
  }
  const double block_bad = block_sum<kFusedThreads>(bad, sh);
  const double block_wsum = block_sum<kFusedThreads>(wsum, sh);
  if (tid == 0) {
    row[3 * K] = block_bad;
    row[3 * K + 1] = block_wsum;
  }
  // Ticket: every writer fences its row stores before the block takes a number; the last block
  // (all other rows visible) resets the counter and finishes the step.
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (tid == 0) *ticket = 0u;
  finalize_block<kFusedThreads, true>(partials, gridDim.x, stride, K, 3 * int64_t(K), true, B, out, nullptr, scratch,
                                      M, Q, Z, C, weight, step, nonfinite, p);
}

// Fused-path backward: the same arithmetic as scale_grad_kernel on float4 vectors of w, with
// kGradLoads vectors in flight per thread (the remainder, under one vector, elementwise).
constexpr int kGradLoads = 4;

template <typename grad_t, typename out_t>
__global__ void scale_grad_vec_kernel(const grad_t* __restrict__ grad, const float* __restrict__ w,
                                      out_t* __restrict__ out, int64_t B, float inv_b) {
  const float g = static_cast<float>(*grad);
  const int64_t vectors = B / kFusedVec;
  const int64_t threads = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t v0 = first; v0 < vectors; v0 += kGradLoads * threads) {
    Vec<float> w_v[kGradLoads];
#pragma unroll
    for (int j = 0; j < kGradLoads; ++j) {
      const int64_t v = v0 + j * threads;
      if (v < vectors) w_v[j] = reinterpret_cast<const Vec<float>*>(w)[v];
    }
#pragma unroll
    for (int j = 0; j < kGradLoads; ++j) {
      const int64_t v = v0 + j * threads;
      if (v < vectors) {
        Vec<out_t> r;
#pragma unroll
        for (int e = 0; e < kFusedVec; ++e) r.v[e] = static_cast<out_t>(__fmul_rn(__fmul_rn(g, w_v[j].v[e]), inv_b));
        reinterpret_cast<Vec<out_t>*>(out)[v] = r;
      }
    }
  }
  for (int64_t i = vectors * kFusedVec + first; i < B; i += threads) {
    out[i] = static_cast<out_t>(__fmul_rn(__fmul_rn(g, w[i]), inv_b));
  }
}

struct PassOut {
  at::Tensor partials;
  int64_t blocks;
  int64_t stride;
  int64_t hist_len;
};

// Launch 1: w and the per-block partial rows.
PassOut run_pass(const at::Tensor& loss, const at::Tensor& lam, const at::Tensor& table, const at::Tensor& w,
                 double lmin, double bin_scale, bool training, cudaStream_t stream) {
  const int64_t B = loss.numel();
  const int64_t K = table.numel();
  const Grid grid = plan_grid(B, K);
  const int64_t hist_len = training ? 3 * K : 0;
  const int64_t stride = hist_len + 2;
  at::Tensor partials = at::empty({grid.blocks * stride}, loss.options().dtype(at::kDouble));
  const bool per_warp = training && K <= kPerWarpMaxBins;
  const bool use_smem = training && hist_len <= kSmemHistMax;
  const size_t smem = per_warp   ? static_cast<size_t>(kWarps * hist_len) * sizeof(double)
                      : use_smem ? static_cast<size_t>(hist_len) * sizeof(double)
                                 : 0;
  const float lminf = static_cast<float>(lmin);
  const float scalef = static_cast<float>(bin_scale);
  const float kmaxf = static_cast<float>(K - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "varweight_cuda_loss", [&] {
    using loss_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lam.scalar_type(), "varweight_cuda_lam", [&] {
      using lam_t = scalar_t;
      auto kernel = !training ? vaw_pass_kernel<loss_t, lam_t, false, false>
                    : per_warp  ? vaw_pass_kernel<loss_t, lam_t, true, true>
                                : vaw_pass_kernel<loss_t, lam_t, true, false>;
      kernel<<<static_cast<unsigned>(grid.blocks), kThreads, smem, stream>>>(
          loss.const_data_ptr<loss_t>(), lam.const_data_ptr<lam_t>(), table.const_data_ptr<float>(),
          w.mutable_data_ptr<float>(), partials.mutable_data_ptr<double>(), B, grid.per_block, static_cast<int>(K),
          stride, use_smem, lminf, scalef, kmaxf);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return PassOut{partials, grid.blocks, stride, hist_len};
}

// Launch 2 (or the only launch of update): see vaw_finalize_kernel.
void run_finalize(const double* partials, int64_t G, int64_t stride, int64_t K, int64_t hist_len, bool has_wsum,
                  int64_t B, const at::Tensor* out, double* moments_out, const at::Tensor* state, const Params* p,
                  const at::Tensor& like, cudaStream_t stream) {
  at::Tensor scratch;
  if (state != nullptr) scratch = at::empty({4 * K}, like.options().dtype(at::kDouble));
  const Params dp = p != nullptr ? *p : Params{};
  const c10::ScalarType out_type = out != nullptr ? out->scalar_type() : at::kDouble;
  const c10::ScalarType c_type = state != nullptr ? state[3].scalar_type() : at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "varweight_cuda_finalize", [&] {
    using out_t = scalar_t;
    out_t* out_ptr = out != nullptr ? out->mutable_data_ptr<out_t>() : nullptr;
    auto launch = [&](auto* c_ptr) {
      using c_t = std::remove_pointer_t<decltype(c_ptr)>;
      float* M = state != nullptr ? state[0].mutable_data_ptr<float>() : nullptr;
      float* Q = state != nullptr ? state[1].mutable_data_ptr<float>() : nullptr;
      float* Z = state != nullptr ? state[2].mutable_data_ptr<float>() : nullptr;
      float* weight = state != nullptr ? state[4].mutable_data_ptr<float>() : nullptr;
      int64_t* step = state != nullptr ? state[5].mutable_data_ptr<int64_t>() : nullptr;
      int64_t* nonfinite = state != nullptr ? state[6].mutable_data_ptr<int64_t>() : nullptr;
      double* scratch_ptr = state != nullptr ? scratch.mutable_data_ptr<double>() : nullptr;
      vaw_finalize_kernel<out_t, c_t><<<1, kFinalThreads, 0, stream>>>(
          partials, G, stride, static_cast<int>(K), hist_len, has_wsum, B, out_ptr, moments_out, scratch_ptr, M, Q,
          Z, c_ptr, weight, step, nonfinite, dp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (c_type == at::kLong) {
      launch(state[3].mutable_data_ptr<int64_t>());
    } else {
      launch(state != nullptr ? state[3].mutable_data_ptr<double>() : static_cast<double*>(nullptr));
    }
  });
}

std::atomic<bool> g_fused_kernels{false};

// The fused step's ticket counter of (device, stream): steps on one stream never overlap. Never
// freed (the map outlives the allocator at exit otherwise).
int* fused_ticket(const at::Tensor& like, cudaStream_t stream) {
  static std::mutex mutex;
  static auto* tickets = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(static_cast<int>(like.get_device()), stream);
  auto it = tickets->find(key);
  if (it == tickets->end()) it = tickets->emplace(key, at::zeros({1}, like.options().dtype(at::kInt))).first;
  return it->second.mutable_data_ptr<int>();
}

bool vector_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (t.element_size() * kFusedVec) == 0;
}

// The training step in one launch of vaw_fused_step_kernel; false (nothing launched) where it does
// not apply: K > kFusedMaxBins, lam not float32, inputs not vector-aligned, too little shared memory.
bool run_fused_step(const at::Tensor& loss, const at::Tensor& lam, const at::Tensor* state, const Params& p,
                    const at::Tensor& w, const at::Tensor& out, cudaStream_t stream) {
  const int64_t B = loss.numel();
  const int64_t K = state[0].numel();
  if (K > kFusedMaxBins || lam.scalar_type() != at::kFloat || !vector_aligned(loss) || !vector_aligned(lam)) {
    return false;
  }
  const Grid grid = plan_fused_grid(B);
  const size_t smem = fused_smem_bytes(K);
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const at::Tensor partials = at::empty({grid.blocks * (3 * K + 2)}, loss.options().dtype(at::kDouble));
  const at::Tensor scratch = at::empty({4 * K}, loss.options().dtype(at::kDouble));
  unsigned* ticket = reinterpret_cast<unsigned*>(fused_ticket(loss, stream));
  bool ran = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "varweight_cuda_fused", [&] {
    using loss_t = scalar_t;
    auto launch = [&](auto* c_ptr) {
      using c_t = std::remove_pointer_t<decltype(c_ptr)>;
      auto kernel = vaw_fused_step_kernel<loss_t, float, c_t>;
      cudaFuncAttributes attr;
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
      if (attr.sharedSizeBytes + smem > optin) return;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      kernel<<<static_cast<unsigned>(grid.blocks), kFusedThreads, smem, stream>>>(
          loss.const_data_ptr<loss_t>(), lam.const_data_ptr<float>(), w.mutable_data_ptr<float>(),
          partials.mutable_data_ptr<double>(), ticket, scratch.mutable_data_ptr<double>(),
          out.mutable_data_ptr<loss_t>(), state[0].mutable_data_ptr<float>(), state[1].mutable_data_ptr<float>(),
          state[2].mutable_data_ptr<float>(), c_ptr, state[4].mutable_data_ptr<float>(),
          state[5].mutable_data_ptr<int64_t>(), state[6].mutable_data_ptr<int64_t>(), B, grid.per_block,
          static_cast<int>(K), p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      ran = true;
    };
    if (state[3].scalar_type() == at::kLong) {
      launch(state[3].mutable_data_ptr<int64_t>());
    } else {
      launch(state[3].mutable_data_ptr<double>());
    }
  });
  return ran;
}

}  // namespace

// The switch of the fused kernels (request < 0 asks); off by default.
bool cuda_fused_kernels(int64_t request) {
  if (request >= 0) g_fused_kernels.store(request != 0);
  return g_fused_kernels.load();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_moments_cuda(const at::Tensor& loss_in, const at::Tensor& lam_in,
                                                                    const at::Tensor& weight_in, double lmin,
                                                                    double bin_scale, bool training) {
  check_forward_args(loss_in, lam_in, weight_in, at::kCUDA);
  const c10::cuda::CUDAGuard guard(loss_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor loss = loss_in.contiguous();
  const at::Tensor lam = lam_in.contiguous();
  const at::Tensor table = weight_in.contiguous();
  const int64_t B = loss.numel();
  const int64_t K = table.numel();
  at::Tensor w = at::empty({B}, loss.options().dtype(at::kFloat));
  at::Tensor out = at::empty({}, loss.options());
  at::Tensor moments = at::empty({training ? 3 * K + 1 : 0}, loss.options().dtype(at::kDouble));
  const PassOut pass = run_pass(loss, lam, table, w, lmin, bin_scale, training, stream);
  run_finalize(pass.partials.const_data_ptr<double>(), pass.blocks, pass.stride, K, pass.hist_len, true, B, &out,
               training ? moments.mutable_data_ptr<double>() : nullptr, nullptr, nullptr, loss, stream);
  return {out, w, moments};
}

void update_cuda(const at::Tensor& moments_in, const at::Tensor& M, const at::Tensor& Q, const at::Tensor& Z,
                 const at::Tensor& C, const at::Tensor& weight, const at::Tensor& step, const at::Tensor& nonfinite,
                 c10::ArrayRef<double> params) {
  const Params p = check_update_args(moments_in, M, Q, Z, C, weight, step, nonfinite, params, at::kCUDA);
  const int64_t K = M.numel();
  const c10::cuda::CUDAGuard guard(M.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor moments = moments_in.contiguous();
  const at::Tensor state[] = {M, Q, Z, C, weight, step, nonfinite};
  run_finalize(moments.const_data_ptr<double>(), 1, 3 * K + 1, K, 3 * K, false, 1, nullptr, nullptr, state, &p, M,
               stream);
}

std::tuple<at::Tensor, at::Tensor> step_cuda(const at::Tensor& loss_in, const at::Tensor& lam_in, const at::Tensor& M,
                                             const at::Tensor& Q, const at::Tensor& Z, const at::Tensor& C,
                                             const at::Tensor& weight, const at::Tensor& step,
                                             const at::Tensor& nonfinite, c10::ArrayRef<double> params,
                                             bool training) {
  const Params p = check_step_args(loss_in, lam_in, M, Q, Z, C, weight, step, nonfinite, params, at::kCUDA);
  const c10::cuda::CUDAGuard guard(loss_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor loss = loss_in.contiguous();
  const at::Tensor lam = lam_in.contiguous();
  const int64_t B = loss.numel();
  const int64_t K = M.numel();
  at::Tensor w = at::empty({B}, loss.options().dtype(at::kFloat));
  at::Tensor out = at::empty({}, loss.options());
  const at::Tensor state[] = {M, Q, Z, C, weight, step, nonfinite};
  if (training && g_fused_kernels.load() && run_fused_step(loss, lam, state, p, w, out, stream)) return {out, w};
  const PassOut pass = run_pass(loss, lam, weight, w, p.lmin, p.bin_scale, training, stream);
  run_finalize(pass.partials.const_data_ptr<double>(), pass.blocks, pass.stride, K, pass.hist_len, true, B, &out,
               nullptr, training ? state : nullptr, training ? &p : nullptr, loss, stream);
  return {out, w};
}

at::Tensor scale_grad_cuda(const at::Tensor& grad_in, const at::Tensor& w_in, at::ScalarType dtype) {
  check_scale_grad_args(grad_in, w_in, dtype, at::kCUDA);
  const c10::cuda::CUDAGuard guard(w_in.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  const int64_t B = w.numel();
  at::Tensor out = at::empty({B}, w.options().dtype(dtype));
  const float inv_b = 1.0f / static_cast<float>(static_cast<double>(B));
  const bool vectorised = g_fused_kernels.load() && vector_aligned(w);  // out is a fresh (aligned) tensor
  const int64_t per_block = vectorised ? kThreads * kFusedVec * kGradLoads : kThreads;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>((B + per_block - 1) / per_block, 4096));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "varweight_scale_grad_in", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "varweight_scale_grad_out", [&] {
      auto kernel = vectorised ? scale_grad_vec_kernel<grad_t, scalar_t> : scale_grad_kernel<grad_t, scalar_t>;
      kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          grad.const_data_ptr<grad_t>(), w.const_data_ptr<float>(), out.mutable_data_ptr<scalar_t>(), B, inv_b);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace varweight

TORCH_LIBRARY_FRAGMENT(varweight_ext, m) {
  m.def("cuda_fused_kernels(int request) -> bool", &varweight::cuda_fused_kernels);
}

TORCH_LIBRARY_IMPL(varweight_ext, CUDA, m) {
  m.impl("forward_moments", &varweight::forward_moments_cuda);
  m.impl("update", &varweight::update_cuda);
  m.impl("step", &varweight::step_cuda);
  m.impl("scale_grad", &varweight::scale_grad_cuda);
}
