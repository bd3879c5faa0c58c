// DIFFormer-a (sigmoid) attention, flash-style, fp32 on the CUDA cores. Nothing N x N is ever
// stored: a block owns a 128-row tile and streams the other side's 64-row tiles through shared
// memory; the row normaliser r_i = sum_j w_ij is accumulated on the fly and saved (N floats per
// head) for the backward, which recomputes every tile of w:
//   forward  (query tiles)  S = Q K^T, w = sigmoid(S), r += rowsum(w), O += w V;  A = O / r
//   dK, dV   (key tiles)    the tiles transposed: dV += (w / r)^T dA, dK += dS^T Q with
//                           dP = dA V^T, dS = w (1 - w) (dP - delta) / r
//   dQ       in the same kernel: each query tile's dS^T K is added into an fp32 [n][DP] workspace
//            by float4 atomics, then copied out (10 N^2 d FLOPs; dQ summed in no fixed order); or,
//            DIFFORMER_SIGMOID_SIMT=pass, by a second kernel over query tiles, dQ += dS K
//            (14 N^2 d FLOPs, no atomics, bitwise reproducible)
// with delta_i = dA_i . A_i from a small pre-pass. 256 threads as 16 x 16 (a warp is 4 ty x 8 tx),
// each owning an 8 x 4 piece of the 128 x 64 score tile (own rows ty + 16 j, streamed rows
// tx + 16 i) and 8 x DP/16 outputs. Every tile is row-major [rows][DP + 4] (the row stride is 4
// banks mod 32, so a warp's float4 reads of 4 own and 8 streamed rows hit distinct banks): per 4
// columns, 8 + 4 float4 loads feed 128 FMAs. The streamed tiles are double-buffered by cp.async
// (16-byte copies where d % 4 == 0 and the rows are aligned, else 4-byte; zero-fill masks the
// padding). Where the owned tiles would fill the SMs badly (N = 3e4: 235 tiles on 132 SMs, one
// block per SM), the streamed range is split over up to 8 blocks (blockIdx.y; 5 at N = 1e4 ..
// 6e4) writing partials to scratch, summed in a fixed order by a small combine kernel. The width
// is a template DP in {16, 32, 64}: a smaller d is zero-padded (exact: zeros add nothing to Q.K
// and the padded output columns are never written). Padded keys are masked to w = 0; padded
// queries get 1/r = 0, which zeroes their contributions to dK and dV.
// H200, d = 64, one head (dev/cuda/attn_sigmoid_v7.cu and .h200.log; ms, fwd / fused bwd):
//   N = 1e4: 0.86 / 1.90   N = 3e4: 7.52 / 16.4   N = 6e4: 30.0 / 66.1
// i.e. 30.7 TFLOP/s forward (46% of the 67 TFLOP/s fp32 peak) and 35 TFLOP/s backward on its
// 10 N^2 d FLOPs. (v6, the backward fully unrolled: 31.5 ms at N = 3e4, stalled on instruction
// fetch; see kUnrollBwd.) An 8 x 8 register-tile variant with a third fewer shared-memory loads
// per FMA ran the forward 2x slower (254 registers; dev/cuda/attn_sigmoid_v6.cu).
// These are the CUDA-core kernels: precision fp32 by default. tf32 and bf16 run the tensor-core
// kernels of attn_sigmoid_tc.cuh (mma.sync, the scores in registers), and so does fp32 as 3xTF32
// with DIFFORMER_SIGMOID_IMPL=mma; see cuda_ops.hpp and dev/cuda/attn_sigmoid_v5.cu.
// Heads wider than 64: the key-chunked cuBLAS path further down.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/attn_sigmoid_tc.cuh"
#include "ops/cuda/cuda_util.cuh"

namespace dfm::cuda {
namespace {

struct SigArgs {
  const float *q, *k, *v, *a, *da, *rowsum_in, *delta;
  Index ldq, ldk, ldv, lda, ldda, ldr;  // ldr: stride of rowsum/delta (= heads)
  float da_scale;
  int n, d;
  float *out_a, *rowsum, *dq, *dk, *dv;
  float dv_beta;
  int vec;     // q, k, v, da rows 16-byte aligned and d % 4 == 0: 16-byte cp.async
  int nsplit;  // blocks per owned tile (blockIdx.y), each over 1/nsplit of the streamed tiles
  float* ws;   // partials when nsplit > 1; the fused backward's dQ accumulator
};

constexpr int kT = 256;           // threads per block (16 x 16)
constexpr int kBO = 128;          // rows a block owns
constexpr int kBS = 64;           // rows per streamed tile
constexpr int kLP = kBS + 4;      // row stride of a score tile [kBO][kLP]
constexpr double kSplitCapBytes = 160.0 * (1 << 20);  // most workspace a split may take
// Unrolling of the outer (4-column / 4-key) loops of dot_tile and acc_px: 16 = fully at d = 64.
// The backward kernels unroll by 4 only: fully unrolled, their code outgrew the instruction
// cache and ncu found 59% of the dK/dV/dQ kernel's warp samples stalled on instruction fetch
// (H200, N = 3e4: 31.5 ms; unrolled by 4, 16.4 ms; dev/cuda/attn_sigmoid_v7.cu and .h200.log).
// The forward is fastest fully unrolled (7.5 ms against 7.7 by 4).
constexpr int kUnrollFwd = 16;
constexpr int kUnrollBwd = 4;

__device__ __forceinline__ float sigm(float s) { return 1.0f / (1.0f + __expf(-s)); }

// A warp's lanes as 4 row groups x 8 column groups, with lanes n and n^1 in one row group and
// lanes n and n^2 in one column group: lane bits 0, 2, 4 -> column bits 0, 1, 2; lane bits 1, 3
// -> row bits 0, 1. (A shared-memory load returns one register per lane and cycle; a warp's
// 128-bit load is said to take 2 cycles instead of 4 where lane pairs (n, n^1) or (n, n^2) read
// the same address.)
__device__ __forceinline__ void lane_rc(int lane, int& r_lo, int& c_lo) {
  c_lo = (lane & 1) | ((lane >> 1) & 2) | ((lane >> 2) & 4);
  r_lo = ((lane >> 1) & 1) | ((lane >> 2) & 2);
}
// (tx, ty) in 16 x 16; a warp is 4 ty x 8 tx
__device__ __forceinline__ void thread_xy(int& tx, int& ty) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  int r_lo, c_lo;
  lane_rc(lane, r_lo, c_lo);
  tx = ((warp & 1) << 3) | c_lo;
  ty = ((warp >> 1) << 2) | r_lo;
}
__device__ __forceinline__ void ld4a(float (&o)[4], const float* p) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w;
}
template <int CW>
__device__ __forceinline__ void ldw(float (&o)[CW], const float* p) {
  if constexpr (CW == 4) {
    ld4a(o, p);
  } else if constexpr (CW == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    o[0] = v.x, o[1] = v.y;
  } else {
    o[0] = p[0];
  }
}

// cp.async, zero-filling when !ok (then src is not read)
__device__ __forceinline__ void cp_async4(float* dst, const float* src, bool ok) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool ok) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void cp_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// rows row0 .. row0 + ROWS - 1 of src (row stride ld, d valid columns, n valid rows) into
// dst [ROWS][DP + 4]; out-of-range entries 0
template <int DP, int ROWS>
__device__ __forceinline__ void load_rows(float* dst, const float* __restrict__ src, Index ld, int row0, int n, int d,
                                          bool vec) {
  constexpr int LD = DP + 4;
  const unsigned tid = threadIdx.x;
  if (vec) {
    constexpr unsigned C4 = DP / 4;
    static_assert(ROWS * C4 % kT == 0, "whole rounds of 16-byte copies");
#pragma unroll
    for (unsigned it = 0; it < ROWS * C4 / kT; ++it) {
      const unsigned e = tid + it * kT, r = e / C4, c = (e % C4) * 4;
      const int gr = row0 + static_cast<int>(r);
      const bool ok = gr < n && static_cast<int>(c) < d;
      cp_async16(dst + r * LD + c, ok ? src + static_cast<Index>(gr) * ld + c : src, ok);
    }
  } else {
    static_assert(ROWS * DP % kT == 0, "whole rounds of 4-byte copies");
#pragma unroll 4
    for (unsigned it = 0; it < ROWS * DP / kT; ++it) {
      const unsigned e = tid + it * kT, r = e / DP, c = e % DP;
      const int gr = row0 + static_cast<int>(r);
      const bool ok = gr < n && static_cast<int>(c) < d;
      cp_async4(dst + r * LD + c, ok ? src + static_cast<Index>(gr) * ld + c : src, ok);
    }
  }
}
// 64 per-row scalars (stride ld) from row0 into dst[64] by threads [t0, t0 + 64)
__device__ __forceinline__ void load_scalars(float* dst, const float* __restrict__ src, Index ld, int row0, int n,
                                             int t0) {
  const int i = static_cast<int>(threadIdx.x) - t0;
  if (i >= 0 && i < kBS) {
    const int gr = row0 + i;
    const bool ok = gr < n;
    cp_async4(dst + i, ok ? src + static_cast<Index>(gr) * ld : src, ok);
  }
}

// acc[j][i] += A[j] . B[i] over DP columns; A: own rows ty + 16 j (pointer at row ty),
// B: streamed rows tx + 16 i (pointer at row tx), both [rows][DP + 4]
template <int DP, int UR>
__device__ __forceinline__ void dot_tile(float (&acc)[8][4], const float* __restrict__ A, const float* __restrict__ B) {
  constexpr int LD = DP + 4;
#pragma unroll UR
  for (int c = 0; c < DP; c += 4) {
    float a[8][4], b[4][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) ld4a(a[j], A + j * 16 * LD + c);
#pragma unroll
    for (int i = 0; i < 4; ++i) ld4a(b[i], B + i * 16 * LD + c);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[j][i] = fmaf(a[j][u], b[i][u], acc[j][i]);
  }
}
// o[j][cc] += sum_k P[j][k] X[k][cc] over kBS k; P: own rows ty + 16 j of a [kBO][kLP] tile
// (pointer at row ty), X: [kBS][DP + 4] (pointer at column tx * CW)
template <int DP, int UR>
__device__ __forceinline__ void acc_px(float (&o)[8][DP / 16], const float* __restrict__ P,
                                       const float* __restrict__ X) {
  constexpr int LD = DP + 4, CW = DP / 16;
#pragma unroll UR
  for (int k = 0; k < kBS; k += 4) {
    float p[8][4], x[4][CW];
#pragma unroll
    for (int j = 0; j < 8; ++j) ld4a(p[j], P + j * 16 * kLP + k);
#pragma unroll
    for (int u = 0; u < 4; ++u) ldw<CW>(x[u], X + (k + u) * LD);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int cc = 0; cc < CW; ++cc) o[j][cc] = fmaf(p[j][u], x[u][cc], o[j][cc]);
  }
}

__device__ __forceinline__ int split_begin(int tiles, int s, int nsplit) {
  return static_cast<int>(static_cast<long long>(tiles) * s / nsplit);
}

template <int DP>
struct Smem {
  static constexpr int LD = DP + 4;
  // forward: Q [kBO][LD], K, V [2][kBS][LD], P [kBO][kLP]
  static constexpr int fwd = kBO * LD + 4 * kBS * LD + kBO * kLP;
  // dK/dV (and fused): K, V [kBO][LD], Q, dA [2][kBS][LD], P, dS [kBO][kLP], rowsum, delta [2][kBS]
  static constexpr int dkv = 2 * kBO * LD + 4 * kBS * LD + 2 * kBO * kLP + 4 * kBS;
  // dQ: Q, dA [kBO][LD], K, V [2][kBS][LD], dS [kBO][kLP]
  static constexpr int dq = 2 * kBO * LD + 4 * kBS * LD + kBO * kLP;
};

// ---- forward: block (query tile, split) --------------------------------------------------------
template <int DP>
__global__ void __launch_bounds__(kT, DP == 64 ? 1 : 2) fwd_kernel(const SigArgs g) {
  constexpr int LD = DP + 4, CW = DP / 16;
  extern __shared__ float4 smem4[];
  float* sm = reinterpret_cast<float*>(smem4);
  float* Qs = sm;
  float* Kb = Qs + kBO * LD;
  float* Vb = Kb + 2 * kBS * LD;
  float* Ps = Vb + 2 * kBS * LD;
  int tx, ty;
  thread_xy(tx, ty);
  const int n = g.n, q0 = blockIdx.x * kBO, split = blockIdx.y;
  const int nt = (n + kBS - 1) / kBS;
  const int tb = split_begin(nt, split, g.nsplit), te = split_begin(nt, split + 1, g.nsplit);
  const bool vec = g.vec != 0;
  load_rows<DP, kBO>(Qs, g.q, g.ldq, q0, n, g.d, vec);
  if (tb < te) {
    load_rows<DP, kBS>(Kb, g.k, g.ldk, tb * kBS, n, g.d, vec);
    load_rows<DP, kBS>(Vb, g.v, g.ldv, tb * kBS, n, g.d, vec);
  }
  cp_commit();
  float o[8][CW] = {}, rs[8] = {};
  for (int t = tb; t < te; ++t) {
    const int b = (t - tb) & 1;
    const float* Ks = Kb + b * kBS * LD;
    const float* Vs = Vb + b * kBS * LD;
    cp_wait_all();
    __syncthreads();  // tile t in; every thread done with tile t - 1 (its buffers and P)
    if (t + 1 < te) {
      load_rows<DP, kBS>(Kb + (b ^ 1) * kBS * LD, g.k, g.ldk, (t + 1) * kBS, n, g.d, vec);
      load_rows<DP, kBS>(Vb + (b ^ 1) * kBS * LD, g.v, g.ldv, (t + 1) * kBS, n, g.d, vec);
    }
    cp_commit();
    float s[8][4] = {};
    dot_tile<DP, kUnrollFwd>(s, Qs + ty * LD, Ks + tx * LD);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool valid = t * kBS + tx + 16 * i < n;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float w = valid ? sigm(s[j][i]) : 0.0f;
        rs[j] += w;
        Ps[(ty + 16 * j) * kLP + tx + 16 * i] = w;
      }
    }
    __syncthreads();
    acc_px<DP, kUnrollFwd>(o, Ps + ty * kLP, Vs + tx * CW);
  }
  cp_wait_all();
  __syncthreads();  // done with P: reuse it for the row sums
  float* red = Ps;  // [16 tx][kBO]
#pragma unroll
  for (int j = 0; j < 8; ++j) red[tx * kBO + ty + 16 * j] = rs[j];
  __syncthreads();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float sum = 0.0f;
#pragma unroll
    for (int x = 0; x < 16; ++x) sum += red[x * kBO + ty + 16 * j];
    rs[j] = sum;
  }
  if (g.nsplit == 1) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = q0 + ty + 16 * j;
      if (r >= n) continue;
      const float inv = 1.0f / rs[j];
#pragma unroll
      for (int cc = 0; cc < CW; ++cc) {
        const int c = tx * CW + cc;
        if (c < g.d) g.out_a[static_cast<Index>(r) * g.lda + c] = o[j][cc] * inv;
      }
      if (tx == 0) g.rowsum[static_cast<Index>(r) * g.ldr] = rs[j];
    }
  } else {  // partials: O [nsplit][n][DP], then r [nsplit][n]
    float* wo = g.ws + static_cast<Index>(split) * n * DP;
    float* wr = g.ws + static_cast<Index>(g.nsplit) * n * DP + static_cast<Index>(split) * n;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = q0 + ty + 16 * j;
      if (r >= n) continue;
#pragma unroll
      for (int cc = 0; cc < CW; ++cc) wo[static_cast<Index>(r) * DP + tx * CW + cc] = o[j][cc];
      if (tx == 0) wr[r] = rs[j];
    }
  }
}

template <int DP>
__global__ void fwd_combine_kernel(const SigArgs g) {
  const Index total = static_cast<Index>(g.n) * DP;
  const float* wr = g.ws + static_cast<Index>(g.nsplit) * g.n * DP;
  for (Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index r = e / DP;
    const int c = static_cast<int>(e % DP);
    if (c >= g.d) continue;
    float rs = 0.0f, o = 0.0f;
    for (int s = 0; s < g.nsplit; ++s) {
      rs += wr[static_cast<Index>(s) * g.n + r];
      o += g.ws[(static_cast<Index>(s) * g.n + r) * DP + c];
    }
    g.out_a[r * g.lda + c] = o * (1.0f / rs);
    if (c == 0) g.rowsum[r * g.ldr] = rs;
  }
}

// delta_i = dA_i . A_i (dA scaled), one warp per row of one head
__global__ void sigmoid_delta_kernel(SigArgs g, float* delta) {
  const int lane = threadIdx.x & 31;
  const Index nwarps = (static_cast<Index>(gridDim.x) * blockDim.x) >> 5;
  for (Index i = (blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x) >> 5; i < g.n; i += nwarps) {
    float s = 0.0f;
    for (int c = lane; c < g.d; c += 32) s += g.da_scale * g.da[i * g.ldda + c] * g.a[i * g.lda + c];
    s = warp_sum(s);
    if (lane == 0) delta[i * g.ldr] = s;
  }
}

// ---- dK, dV (FUSED: and dQ by atomics): block (key tile, split of the query tiles) ----------------
template <int DP, bool FUSED>
__device__ __forceinline__ void dkv_body(const SigArgs& g) {
  constexpr int LD = DP + 4, CW = DP / 16;
  extern __shared__ float4 smem4[];
  float* sm = reinterpret_cast<float*>(smem4);
  float* Ks = sm;
  float* Vs = Ks + kBO * LD;
  float* Qb = Vs + kBO * LD;
  float* Ab = Qb + 2 * kBS * LD;
  float* Ps = Ab + 2 * kBS * LD;
  float* Ts = Ps + kBO * kLP;
  float* Rb = Ts + kBO * kLP;
  float* Db = Rb + 2 * kBS;
  int tx, ty;
  thread_xy(tx, ty);
  const int n = g.n, k0 = blockIdx.x * kBO, split = blockIdx.y;
  const int nt = (n + kBS - 1) / kBS;
  const int tb = split_begin(nt, split, g.nsplit), te = split_begin(nt, split + 1, g.nsplit);
  const bool vec = g.vec != 0;
  auto load_q = [&](int t, int b) {
    load_rows<DP, kBS>(Qb + b * kBS * LD, g.q, g.ldq, t * kBS, n, g.d, vec);
    load_rows<DP, kBS>(Ab + b * kBS * LD, g.da, g.ldda, t * kBS, n, g.d, vec);
    load_scalars(Rb + b * kBS, g.rowsum_in, g.ldr, t * kBS, n, 0);
    load_scalars(Db + b * kBS, g.delta, g.ldr, t * kBS, n, kBS);
  };
  load_rows<DP, kBO>(Ks, g.k, g.ldk, k0, n, g.d, vec);
  load_rows<DP, kBO>(Vs, g.v, g.ldv, k0, n, g.d, vec);
  if (tb < te) load_q(tb, 0);
  cp_commit();
  float dk[8][CW] = {}, dv[8][CW] = {};
  for (int t = tb; t < te; ++t) {
    const int b = (t - tb) & 1;
    const float* Qs = Qb + b * kBS * LD;
    const float* As = Ab + b * kBS * LD;
    const float* Rs = Rb + b * kBS;
    const float* Ds = Db + b * kBS;
    cp_wait_all();
    __syncthreads();
    if (t + 1 < te) load_q(t + 1, b ^ 1);
    cp_commit();
    {
      float s[8][4] = {}, dp[8][4] = {};  // [key ty + 16 j][query tx + 16 i]
      dot_tile<DP, kUnrollBwd>(s, Ks + ty * LD, Qs + tx * LD);
      dot_tile<DP, kUnrollBwd>(dp, Vs + ty * LD, As + tx * LD);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int qi = tx + 16 * i;
        const float ri = t * kBS + qi < n ? 1.0f / Rs[qi] : 0.0f, di = Ds[qi];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float w = sigm(s[j][i]);
          Ps[(ty + 16 * j) * kLP + qi] = w * ri;
          Ts[(ty + 16 * j) * kLP + qi] = w * (1.0f - w) * (g.da_scale * dp[j][i] - di) * ri;
        }
      }
    }
    __syncthreads();
    acc_px<DP, kUnrollBwd>(dv, Ps + ty * kLP, As + tx * CW);
    acc_px<DP, kUnrollBwd>(dk, Ts + ty * kLP, Qs + tx * CW);
    if constexpr (FUSED) {
      // dQ[q][c] += sum_j dS[j][q] K[j][c] for this tile's 64 queries: 4 queries x CW columns each
      const int qa = threadIdx.x & 15, ca = threadIdx.x >> 4;
      float acc[4][CW] = {};
#pragma unroll 8
      for (int j = 0; j < kBO; ++j) {
        float tq[4], kc[CW];
        ld4a(tq, Ts + j * kLP + qa * 4);
        ldw<CW>(kc, Ks + j * LD + ca * CW);
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int cc = 0; cc < CW; ++cc) acc[u][cc] = fmaf(tq[u], kc[cc], acc[u][cc]);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int q = t * kBS + qa * 4 + u;
        if (q >= n) continue;
        float* dst = g.ws + static_cast<Index>(q) * DP + ca * CW;
        if constexpr (CW == 4)
          atomicAdd(reinterpret_cast<float4*>(dst), make_float4(acc[u][0], acc[u][1], acc[u][2], acc[u][3]));
        else if constexpr (CW == 2)
          atomicAdd(reinterpret_cast<float2*>(dst), make_float2(acc[u][0], acc[u][1]));
        else
          atomicAdd(dst, acc[u][0]);
      }
    }
  }
  cp_wait_all();
  if (g.nsplit == 1) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = k0 + ty + 16 * j;
      if (r >= n) continue;
#pragma unroll
      for (int cc = 0; cc < CW; ++cc) {
        const int c = tx * CW + cc;
        if (c >= g.d) continue;
        g.dk[static_cast<Index>(r) * g.ldk + c] = dk[j][cc];
        float* out = g.dv + static_cast<Index>(r) * g.ldv + c;
        const float x = g.da_scale * dv[j][cc];
        *out = g.dv_beta == 0.0f ? x : x + g.dv_beta * *out;
      }
    }
  } else {  // partials dK [nsplit][n][DP], then dV [nsplit][n][DP] (after the fused dQ [n][DP])
    float* wk = g.ws + (FUSED ? static_cast<Index>(n) * DP : 0) + static_cast<Index>(split) * n * DP;
    float* wv = wk + static_cast<Index>(g.nsplit) * n * DP;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = k0 + ty + 16 * j;
      if (r >= n) continue;
#pragma unroll
      for (int cc = 0; cc < CW; ++cc) {
        wk[static_cast<Index>(r) * DP + tx * CW + cc] = dk[j][cc];
        wv[static_cast<Index>(r) * DP + tx * CW + cc] = dv[j][cc];
      }
    }
  }
}
template <int DP>
__global__ void __launch_bounds__(kT, 1) dkv_kernel(const SigArgs g) {
  dkv_body<DP, false>(g);
}
template <int DP>
__global__ void __launch_bounds__(kT, 1) dkvq_kernel(const SigArgs g) {
  dkv_body<DP, true>(g);
}

template <int DP>
__global__ void dkv_combine_kernel(const SigArgs g, int fused) {
  const Index total = static_cast<Index>(g.n) * DP, nd = total;
  const float* wk = g.ws + (fused ? nd : 0);
  const float* wv = wk + g.nsplit * nd;
  for (Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index r = e / DP;
    const int c = static_cast<int>(e % DP);
    if (c >= g.d) continue;
    float sk = 0.0f, sv = 0.0f;
    for (int s = 0; s < g.nsplit; ++s) sk += wk[s * nd + e], sv += wv[s * nd + e];
    g.dk[r * g.ldk + c] = sk;
    float* out = g.dv + r * g.ldv + c;
    const float x = g.da_scale * sv;
    *out = g.dv_beta == 0.0f ? x : x + g.dv_beta * *out;
  }
}
// dQ from [nsplit][n][DP] partials (the fused backward: nsplit = 1, its accumulator)
template <int DP>
__global__ void dq_combine_kernel(const SigArgs g, int nsplit) {
  const Index total = static_cast<Index>(g.n) * DP;
  for (Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index r = e / DP;
    const int c = static_cast<int>(e % DP);
    if (c >= g.d) continue;
    float s = 0.0f;
    for (int i = 0; i < nsplit; ++i) s += g.ws[i * total + e];
    g.dq[r * g.ldq + c] = s;
  }
}

// ---- dQ: block (query tile, split of the key tiles) ---------------------------------------------
template <int DP>
__global__ void __launch_bounds__(kT, 1) dq_kernel(const SigArgs g) {
  constexpr int LD = DP + 4, CW = DP / 16;
  extern __shared__ float4 smem4[];
  float* sm = reinterpret_cast<float*>(smem4);
  float* Qs = sm;
  float* As = Qs + kBO * LD;
  float* Kb = As + kBO * LD;
  float* Vb = Kb + 2 * kBS * LD;
  float* Ts = Vb + 2 * kBS * LD;
  int tx, ty;
  thread_xy(tx, ty);
  const int n = g.n, q0 = blockIdx.x * kBO, split = blockIdx.y;
  const int nt = (n + kBS - 1) / kBS;
  const int tb = split_begin(nt, split, g.nsplit), te = split_begin(nt, split + 1, g.nsplit);
  const bool vec = g.vec != 0;
  load_rows<DP, kBO>(Qs, g.q, g.ldq, q0, n, g.d, vec);
  load_rows<DP, kBO>(As, g.da, g.ldda, q0, n, g.d, vec);
  if (tb < te) {
    load_rows<DP, kBS>(Kb, g.k, g.ldk, tb * kBS, n, g.d, vec);
    load_rows<DP, kBS>(Vb, g.v, g.ldv, tb * kBS, n, g.d, vec);
  }
  cp_commit();
  float rinv[8], dl[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int r = q0 + ty + 16 * j;
    rinv[j] = r < n ? 1.0f / g.rowsum_in[static_cast<Index>(r) * g.ldr] : 0.0f;
    dl[j] = r < n ? g.delta[static_cast<Index>(r) * g.ldr] : 0.0f;
  }
  float acc[8][CW] = {};
  for (int t = tb; t < te; ++t) {
    const int b = (t - tb) & 1;
    const float* Ks = Kb + b * kBS * LD;
    const float* Vs = Vb + b * kBS * LD;
    cp_wait_all();
    __syncthreads();
    if (t + 1 < te) {
      load_rows<DP, kBS>(Kb + (b ^ 1) * kBS * LD, g.k, g.ldk, (t + 1) * kBS, n, g.d, vec);
      load_rows<DP, kBS>(Vb + (b ^ 1) * kBS * LD, g.v, g.ldv, (t + 1) * kBS, n, g.d, vec);
    }
    cp_commit();
    {
      float s[8][4] = {}, dp[8][4] = {};  // [query ty + 16 j][key tx + 16 i]
      dot_tile<DP, kUnrollBwd>(s, Qs + ty * LD, Ks + tx * LD);
      dot_tile<DP, kUnrollBwd>(dp, As + ty * LD, Vs + tx * LD);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool valid = t * kBS + tx + 16 * i < n;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float w = valid ? sigm(s[j][i]) : 0.0f;
          Ts[(ty + 16 * j) * kLP + tx + 16 * i] = w * (1.0f - w) * (g.da_scale * dp[j][i] - dl[j]) * rinv[j];
        }
      }
    }
    __syncthreads();
    acc_px<DP, kUnrollBwd>(acc, Ts + ty * kLP, Ks + tx * CW);
  }
  cp_wait_all();
  __syncthreads();  // every thread's copies of Q are in before dQ (which may alias Q) is written
  if (g.nsplit == 1) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = q0 + ty + 16 * j;
      if (r >= n) continue;
#pragma unroll
      for (int cc = 0; cc < CW; ++cc) {
        const int c = tx * CW + cc;
        if (c < g.d) g.dq[static_cast<Index>(r) * g.ldq + c] = acc[j][cc];
      }
    }
  } else {
    float* wq = g.ws + static_cast<Index>(split) * n * DP;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int r = q0 + ty + 16 * j;
      if (r >= n) continue;
#pragma unroll
      for (int cc = 0; cc < CW; ++cc) wq[static_cast<Index>(r) * DP + tx * CW + cc] = acc[j][cc];
    }
  }
}

// ---- host side --------------------------------------------------------------------------------
// Splits of the streamed range so that owned tiles x splits fill the SMs' block slots best
// (waves / splits smallest, a split only for a 1% gain), each split >= 8 streamed tiles and the
// workspace <= kSplitCapBytes. N = 1e4 / 3e4 / 6e4 on 132 SMs: 5 splits.
int pick_split(int owned, int streamed, int slots, double bytes_per_split) {
  int best = 1;
  double best_t = std::ceil(static_cast<double>(owned) / slots);
  for (int s = 2; s <= 8; ++s) {
    if (streamed < 8 * s || s * bytes_per_split > kSplitCapBytes) break;
    const double t = std::ceil(static_cast<double>(owned) * s / slots) / s;
    if (t < 0.99 * best_t) best = s, best_t = t;
  }
  return best;
}

// DIFFORMER_SIGMOID_SIMT=pass: dQ by its own kernel (no atomics, bitwise reproducible); else by
// atomics in the dK/dV kernel. Read at every call.
bool simt_dq_fused() {
  const char* e = std::getenv("DIFFORMER_SIGMOID_SIMT");
  return !(e != nullptr && std::strcmp(e, "pass") == 0);
}

struct Plan {
  int s_fwd = 1, s_kv = 1, s_q = 1;
  bool fused = true;
  Index ws_fwd = 0, ws_bwd = 0;  // scratch floats
};

template <typename Kernel>
int occupancy(Kernel kernel, int smem_floats) {
  DFM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      smem_floats * static_cast<int>(sizeof(float))));
  int nb = 0;
  DFM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, kT, smem_floats * sizeof(float)));
  return std::max(nb, 1);
}

template <int DP>
Plan plan(int n, bool fused, int sms) {
  // also sets every kernel's shared-memory limit (once, at the first, eager, call)
  static const int occ_f = occupancy(fwd_kernel<DP>, Smem<DP>::fwd);
  static const int occ_kv = occupancy(dkv_kernel<DP>, Smem<DP>::dkv);
  static const int occ_kvq = occupancy(dkvq_kernel<DP>, Smem<DP>::dkv);
  static const int occ_q = occupancy(dq_kernel<DP>, Smem<DP>::dq);
  const int owned = (n + kBO - 1) / kBO, streamed = (n + kBS - 1) / kBS;
  const double nd = static_cast<double>(n) * DP * sizeof(float);
  Plan p;
  p.fused = fused;
  p.s_fwd = pick_split(owned, streamed, sms * occ_f, nd + n * sizeof(float));
  p.s_kv = pick_split(owned, streamed, sms * (fused ? occ_kvq : occ_kv), 2 * nd);
  p.s_q = fused ? 1 : pick_split(owned, streamed, sms * occ_q, nd);
  const Index nDP = static_cast<Index>(n) * DP;
  p.ws_fwd = p.s_fwd > 1 ? p.s_fwd * (nDP + n) : 0;
  const Index kv = p.s_kv > 1 ? 2 * p.s_kv * nDP : 0;
  p.ws_bwd = fused ? nDP + kv : std::max(kv, p.s_q > 1 ? p.s_q * nDP : Index{0});
  return p;
}
Plan plan_any(int dp, int n, bool fused, int sms) {
  return dp == 16 ? plan<16>(n, fused, sms) : (dp == 32 ? plan<32>(n, fused, sms) : plan<64>(n, fused, sms));
}

int grid_for(Index work) { return static_cast<int>(std::min<Index>((work + 255) / 256, 4096)); }

template <int DP>
void launch_fwd(SigArgs g, const Plan& p, float* ws, cudaStream_t st) {
  const int owned = (g.n + kBO - 1) / kBO;
  g.nsplit = p.s_fwd, g.ws = ws;
  fwd_kernel<DP><<<dim3(owned, p.s_fwd), kT, Smem<DP>::fwd * sizeof(float), st>>>(g);
  DFM_CUDA_LAUNCH_CHECK();
  if (p.s_fwd > 1) {
    fwd_combine_kernel<DP><<<grid_for(static_cast<Index>(g.n) * DP), 256, 0, st>>>(g);
    DFM_CUDA_LAUNCH_CHECK();
  }
}

// g.delta: delta, already written by sigmoid_delta_kernel
template <int DP>
void launch_bwd(SigArgs g, const Plan& p, float* ws, cudaStream_t st) {
  const int owned = (g.n + kBO - 1) / kBO;
  const Index nDP = static_cast<Index>(g.n) * DP;
  const bool fused = p.fused;
  g.ws = ws;
  g.nsplit = p.s_kv;
  if (fused) {
    DFM_CUDA_CHECK(cudaMemsetAsync(ws, 0, nDP * sizeof(float), st));
    dkvq_kernel<DP><<<dim3(owned, p.s_kv), kT, Smem<DP>::dkv * sizeof(float), st>>>(g);
  } else {
    dkv_kernel<DP><<<dim3(owned, p.s_kv), kT, Smem<DP>::dkv * sizeof(float), st>>>(g);
  }
  DFM_CUDA_LAUNCH_CHECK();
  if (p.s_kv > 1) {
    dkv_combine_kernel<DP><<<grid_for(nDP), 256, 0, st>>>(g, fused ? 1 : 0);
    DFM_CUDA_LAUNCH_CHECK();
  }
  if (fused) {
    dq_combine_kernel<DP><<<grid_for(nDP), 256, 0, st>>>(g, 1);
    DFM_CUDA_LAUNCH_CHECK();
    return;
  }
  g.nsplit = p.s_q;
  dq_kernel<DP><<<dim3(owned, p.s_q), kT, Smem<DP>::dq * sizeof(float), st>>>(g);
  DFM_CUDA_LAUNCH_CHECK();
  if (p.s_q > 1) {
    dq_combine_kernel<DP><<<grid_for(nDP), 256, 0, st>>>(g, p.s_q);
    DFM_CUDA_LAUNCH_CHECK();
  }
}


// ---- widths above 64: key chunks through cuBLAS ------------------------------------------------
// The register-tiled kernels hold a row's d outputs in registers, so they stop at d = 64. Wider
// heads (the paper's 20News / image settings: hidden 300, 400) stream chunks of B keys instead:
//   forward   S = Q K_c^T (cuBLAS), w = sigmoid(S) and r += rowsum(w) in one pass, O += w V_c (cuBLAS)
//   backward  S again, dP = dA V_c^T (cuBLAS), one pass: dS = w (1 - w) (dP - delta) / r, P = w / r;
//             dV_c = P^T dA, dK_c = dS^T Q, dQ += dS K_c (cuBLAS)
// Memory: one (forward) or two (backward) [n, B] buffers, B chosen so that each stays under
// kChunkFloats floats (n B <= 32M: 128 MB), plus an [n, d] dQ buffer (dq may alias q). GEMMs in
// the context's precision (its cuBLAS math mode), not the call's: fp32 for --precision fp32, TF32
// for --precision tf32 and bf16 (the CLI's context is TF32 for both). A direct call asking tf32 of
// an fp32 context gets fp32 GEMMs here.
constexpr Index kChunkFloats = Index{32} << 20;
// DIFFORMER_SIGMOID_CHUNK_KEYS=B forces the chunk (tests use it to cross chunk boundaries).
// B is a multiple of 32 (unless it is all n keys) and every chunk, the ragged last one too, is
// stored with row stride B: cuBLAS drops to much slower kernels on rows that are not 16-byte
// aligned (n = 3e4, d = 64: 1118 keys, unaligned, 163 ms per training step; 2048, 72 ms).
Index chunk_keys(Index n) {
  Index b = std::max<Index>(512, kChunkFloats / std::max<Index>(n, 1));
  if (const char* e = std::getenv("DIFFORMER_SIGMOID_CHUNK_KEYS"); e != nullptr && std::atoll(e) > 0) b = std::atoll(e);
  if (b >= n) return n;
  return std::max<Index>(32, b / 32 * 32);
}

// w = sigmoid(s) in place over an [n, b] chunk; r[i * ldr] = (first ? 0 : r) + sum_j w_ij unless r is
// null. A warp per row.
__global__ void chunk_sigmoid_rowsum(float* s, Index lds, Index n, Index b, float* r, Index ldr, bool first) {
  const int lane = threadIdx.x & 31;
  const Index nwarps = (static_cast<Index>(gridDim.x) * blockDim.x) >> 5;
  for (Index i = (blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x) >> 5; i < n; i += nwarps) {
    float* row = s + i * lds;
    float acc = 0.0f;
    for (Index j = lane; j < b; j += 32) {
      const float w = sigm(row[j]);
      row[j] = w;
      acc += w;
    }
    if (r == nullptr) continue;
    acc = warp_sum(acc);
    if (lane == 0) r[i * ldr] = (first ? 0.0f : r[i * ldr]) + acc;
  }
}

// o[i, c] /= r[i * ldr] for c < d
__global__ void chunk_normalise(float* o, Index ldo, Index n, Index d, const float* r, Index ldr) {
  const Index total = n * d;
  for (Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index i = e / d, c = e % d;
    o[i * ldo + c] /= r[i * ldr];
  }
}

// in: w (sigmoid scores) and dP of an [n, b] chunk; out: w / r_i and dS = w (1 - w) (dP - delta_i) / r_i
__global__ void chunk_sigmoid_grad(float* w_to_p, float* dp_to_ds, Index lds, Index n, Index b, const float* r,
                                   const float* delta, Index ldr) {
  const int lane = threadIdx.x & 31;
  const Index nwarps = (static_cast<Index>(gridDim.x) * blockDim.x) >> 5;
  for (Index i = (blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x) >> 5; i < n; i += nwarps) {
    const float ri = 1.0f / r[i * ldr], dl = delta[i * ldr];
    float* wr = w_to_p + i * lds;
    float* dr = dp_to_ds + i * lds;
    for (Index j = lane; j < b; j += 32) {
      const float w = wr[j];
      dr[j] = w * (1.0f - w) * (dr[j] - dl) * ri;
      wr[j] = w * ri;
    }
  }
}

void chunked_fwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v, float* a,
                 float* rowsum) {
  const Index n = dm.n, d = dm.d, ldq = dm.heads * d, ldv = dm.vheads * d, lda = dm.heads * d;
  const Index bk = chunk_keys(n);
  ctx.ensure_scratch(static_cast<std::size_t>(n * bk) * sizeof(float) + 512);
  ScratchScope scope(ctx);
  float* sbuf = scope.take<float>(static_cast<std::size_t>(n * bk));
  const int rows_grid = blocks_for(n, 8, 16 * ctx.sms());
  for (int h = 0; h < dm.heads; ++h) {
    const float *qh = q + h * d, *kh = k + h * d, *vh = v + (dm.vheads == 1 ? 0 : h) * d;
    float* ah = a + h * d;
    for (Index j0 = 0; j0 < n; j0 += bk) {
      const Index b = std::min(bk, n - j0);
      gemm(ctx, false, true, n, b, d, 1.0f, qh, ldq, kh + j0 * ldq, ldq, 0.0f, sbuf, bk);
      chunk_sigmoid_rowsum<<<rows_grid, 256, 0, ctx.stream()>>>(sbuf, bk, n, b, rowsum + h, dm.heads, j0 == 0);
      DFM_CUDA_LAUNCH_CHECK();
      gemm(ctx, false, false, n, d, b, 1.0f, sbuf, bk, vh + j0 * ldv, ldv, j0 == 0 ? 0.0f : 1.0f, ah, lda);
    }
    chunk_normalise<<<blocks_for(n * d, 256, 16 * ctx.sms()), 256, 0, ctx.stream()>>>(ah, lda, n, d, rowsum + h,
                                                                                        dm.heads);
    DFM_CUDA_LAUNCH_CHECK();
  }
}

void chunked_bwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v, const float* a,
                 const float* rowsum, const float* da, Index da_ld, Index da_head_stride, float da_scale, float* dq,
                 float* dk, float* dv, float dv_beta, float* delta) {
  const Index n = dm.n, d = dm.d, ldq = dm.heads * d, ldv = dm.vheads * d;
  const Index bk = chunk_keys(n);
  ctx.ensure_scratch(static_cast<std::size_t>(2 * n * bk + n * d) * sizeof(float) + 1024);
  ScratchScope scope(ctx);
  float* wbuf = scope.take<float>(static_cast<std::size_t>(n * bk));
  float* dbuf = scope.take<float>(static_cast<std::size_t>(n * bk));
  float* dq_tmp = scope.take<float>(static_cast<std::size_t>(n * d));  // dq may alias q: written at the end
  const int rows_grid = blocks_for(n, 8, 16 * ctx.sms());
  for (int h = 0; h < dm.heads; ++h) {
    const int hv = dm.vheads == 1 ? 0 : h;
    const float *qh = q + h * d, *kh = k + h * d, *vh = v + hv * d, *dah = da + h * da_head_stride;
    float* dvh = dv + hv * d;
    const float beta_v = (dm.vheads == 1 && h > 0) ? 1.0f : dv_beta;
    SigArgs g{};
    g.a = a + h * d, g.lda = dm.heads * d, g.da = dah, g.ldda = da_ld, g.da_scale = da_scale;
    g.n = static_cast<int>(n), g.d = static_cast<int>(d), g.ldr = dm.heads;
    sigmoid_delta_kernel<<<rows_grid, 256, 0, ctx.stream()>>>(g, delta + h);
    DFM_CUDA_LAUNCH_CHECK();
    for (Index j0 = 0; j0 < n; j0 += bk) {
      const Index b = std::min(bk, n - j0);
      gemm(ctx, false, true, n, b, d, 1.0f, qh, ldq, kh + j0 * ldq, ldq, 0.0f, wbuf, bk);
      chunk_sigmoid_rowsum<<<rows_grid, 256, 0, ctx.stream()>>>(wbuf, bk, n, b, nullptr, 0, true);
      DFM_CUDA_LAUNCH_CHECK();
      gemm(ctx, false, true, n, b, d, da_scale, dah, da_ld, vh + j0 * ldv, ldv, 0.0f, dbuf, bk);
      chunk_sigmoid_grad<<<rows_grid, 256, 0, ctx.stream()>>>(wbuf, dbuf, bk, n, b, rowsum + h, delta + h, dm.heads);
      DFM_CUDA_LAUNCH_CHECK();
      gemm(ctx, true, false, b, d, n, da_scale, wbuf, bk, dah, da_ld, beta_v, dvh + j0 * ldv, ldv);
      gemm(ctx, true, false, b, d, n, 1.0f, dbuf, bk, qh, ldq, 0.0f, dk + h * d + j0 * ldq, ldq);
      gemm(ctx, false, false, n, d, b, 1.0f, dbuf, bk, kh + j0 * ldq, ldq, j0 == 0 ? 0.0f : 1.0f, dq_tmp, d);
    }
    DFM_CUDA_CHECK(cudaMemcpy2DAsync(dq + h * d, ldq * sizeof(float), dq_tmp, d * sizeof(float), d * sizeof(float),
                                     n, cudaMemcpyDeviceToDevice, ctx.stream()));
  }
}

// The widest head the GPU takes: the chunked path has no limit of its own; this one keeps the
// model's other row kernels (LayerNorm rows up to 512) in range.
constexpr int kMaxChunkedWidth = 512;
void check_width(Index d) {
  DFM_CHECK(d >= 1 && d <= kMaxChunkedWidth, "sigmoid attention on the GPU supports hidden widths 1 .. ",
            kMaxChunkedWidth, " (got ", d, "): use --device cpu or a smaller --hidden");
}
int padded_width(Index d) {
  DFM_CHECK(d >= 1 && d <= 64, "sigmoid attention: the register-tiled kernels take widths 1 .. 64 (got ", d, ")");
  return d <= 16 ? 16 : (d <= 32 ? 32 : 64);
}

SigArgs head_args(const AttnDims& dm, int h, const float* q, const float* k, const float* v) {
  const int hv = dm.vheads == 1 ? 0 : h;
  SigArgs g{};
  g.q = q + h * dm.d;
  g.k = k + h * dm.d;
  g.v = v + hv * dm.d;
  g.ldq = g.ldk = dm.heads * dm.d;
  g.ldv = dm.vheads * dm.d;
  g.lda = dm.heads * dm.d;
  g.ldr = dm.heads;
  g.n = static_cast<int>(dm.n);
  g.d = static_cast<int>(dm.d);
  return g;
}

// DIFFORMER_SIGMOID_IMPL: "mma" (mma.sync, the scores in registers; fp32 as 3xTF32), "wmma"
// (WMMA, the scores through shared memory; fp32 as 3xTF32), "simt" (the fp32 CUDA-core kernels
// above). Unset: simt for fp32 (exact: the 3xTF32 kernels lose accuracy with N, their tensor-core
// accumulation being slightly biased, 2.9e-5 at N = 4099 against 1.2e-6), mma for tf32 and bf16.
// Read at every call (a handful per training step).
// "chunked": the key-chunked cuBLAS path of the wide heads at any width (fp32 and tf32 GEMMs;
// bf16 runs it in fp32).
enum class Impl { mma, wmma, simt, chunked };
Impl impl_for(AttnPrecision prec) {
  const char* e = std::getenv("DIFFORMER_SIGMOID_IMPL");
  const bool fp32 = prec == AttnPrecision::fp32;
  if (e != nullptr && std::strcmp(e, "chunked") == 0) return Impl::chunked;
  if (e != nullptr && std::strcmp(e, "mma") == 0) return Impl::mma;
  if (e != nullptr && std::strcmp(e, "wmma") == 0) return Impl::wmma;
  if (e != nullptr && std::strcmp(e, "simt") == 0) return fp32 ? Impl::simt : Impl::mma;
  return fp32 ? Impl::simt : Impl::mma;
}

sigtc::Args tc_args(const SigArgs& g) {
  sigtc::Args t;
  t.q = g.q, t.k = g.k, t.v = g.v, t.a = g.a, t.da = g.da, t.rowsum_in = g.rowsum_in, t.delta = g.delta;
  t.ldq = g.ldq, t.ldk = g.ldk, t.ldv = g.ldv, t.lda = g.lda, t.ldda = g.ldda, t.ldr = g.ldr;
  t.da_scale = g.da_scale;
  t.n = g.n, t.d = g.d;
  t.out_a = g.out_a, t.rowsum = g.rowsum, t.dq = g.dq, t.dk = g.dk, t.dv = g.dv;
  t.dv_beta = g.dv_beta;
  return t;
}

bool warps4() {
  const char* e = std::getenv("DIFFORMER_SIGMOID_WARPS");
  return e != nullptr && std::strcmp(e, "4") == 0;
}

// One launcher for every (implementation, precision, padded width): fwd when delta is null,
// else the backward (delta pre-pass, dK/dV, dQ). work: tc_work_bytes of scratch (mma only).
template <int DP>
void tc_launch(Impl impl, AttnPrecision prec, const sigtc::Args& t, float* delta, void* work, int sms,
               cudaStream_t st) {
  auto* wb = static_cast<__nv_bfloat16*>(work);
  auto* wf = static_cast<float*>(work);
  if constexpr (DP == 64) {
    if (impl == Impl::mma && warps4()) {  // DIFFORMER_SIGMOID_WARPS=4: blocks of 4 warps (64 rows)
      if (prec == AttnPrecision::bf16)
        delta ? sigmma::launch_bwd<DP, 4>(t, delta, wb, sms, st) : sigmma::launch_fwd<DP, 4>(t, wb, sms, st);
      else if (prec == AttnPrecision::tf32)
        delta ? sigmma32::launch_bwd<false, DP, 4>(t, delta, wf, sms, st)
              : sigmma32::launch_fwd<false, DP, 4>(t, wf, sms, st);
      else
        delta ? sigmma32::launch_bwd<true, DP, 4>(t, delta, wf, sms, st)
              : sigmma32::launch_fwd<true, DP, 4>(t, wf, sms, st);
      DFM_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  if (impl == Impl::wmma) {
    if (prec == AttnPrecision::bf16)
      delta ? sigtc::launch_bwd<sigtc::kBF16, DP>(t, delta, sms, st) : sigtc::launch_fwd<sigtc::kBF16, DP>(t, st);
    else if (prec == AttnPrecision::tf32)
      delta ? sigtc::launch_bwd<sigtc::kTF32, DP>(t, delta, sms, st) : sigtc::launch_fwd<sigtc::kTF32, DP>(t, st);
    else
      delta ? sigtc::launch_bwd<sigtc::kTF32x3, DP>(t, delta, sms, st) : sigtc::launch_fwd<sigtc::kTF32x3, DP>(t, st);
  } else if (prec == AttnPrecision::bf16) {
    delta ? sigmma::launch_bwd<DP>(t, delta, wb, sms, st) : sigmma::launch_fwd<DP>(t, wb, sms, st);
  } else if (prec == AttnPrecision::tf32) {
    delta ? sigmma32::launch_bwd<false, DP>(t, delta, wf, sms, st) : sigmma32::launch_fwd<false, DP>(t, wf, sms, st);
  } else {
    delta ? sigmma32::launch_bwd<true, DP>(t, delta, wf, sms, st) : sigmma32::launch_fwd<true, DP>(t, wf, sms, st);
  }
  DFM_CUDA_LAUNCH_CHECK();
}
void tc_any(Impl impl, AttnPrecision prec, int dp, const sigtc::Args& t, float* delta, void* work, int sms,
            cudaStream_t st) {
  if (dp == 16)
    tc_launch<16>(impl, prec, t, delta, work, sms, st);
  else if (dp == 32)
    tc_launch<32>(impl, prec, t, delta, work, sms, st);
  else
    tc_launch<64>(impl, prec, t, delta, work, sms, st);
}
// Scratch the mma kernels need for packed copies of their inputs (sigtc::setup_sources): always
// for bf16; for fp32 / tf32 only where an input is not a full, 16-byte aligned [n][d] fp32 array.
std::size_t tc_work_bytes(Impl impl, AttnPrecision prec, const AttnDims& dm, int dp, bool aligned) {
  if (impl != Impl::mma) return 0;
  const auto elems = static_cast<std::size_t>(sigtc::work_elems(dm.n, dp));
  if (prec == AttnPrecision::bf16) return elems * sizeof(__nv_bfloat16);
  return aligned && dm.d == dp ? 0 : elems * sizeof(float);
}
bool aligned16(const float* p, Index ld) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && ld % 4 == 0;
}

}  // namespace

int sigmoid_attn_max_d() { return kMaxChunkedWidth; }

void sigmoid_attn_fwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v, float* a,
                      float* rowsum, AttnPrecision prec) {
  if (dm.n == 0) return;
  DFM_CHECK(dm.n < (Index{1} << 31) - kBO, "sigmoid attention: too many rows (", dm.n, ")");
  const Impl impl = impl_for(prec);
  if (dm.d > 64 || impl == Impl::chunked) {
    check_width(dm.d);
    chunked_fwd(ctx, dm, q, k, v, a, rowsum);
    return;
  }
  const int dp = padded_width(dm.d);
  bool aligned = dm.d % 4 == 0 && aligned16(q, dm.heads * dm.d) && aligned16(k, dm.heads * dm.d) &&
                 aligned16(v, dm.vheads * dm.d);
  const std::size_t wbytes = tc_work_bytes(impl, prec, dm, dp, aligned);
  const Plan plan = impl == Impl::simt ? plan_any(dp, static_cast<int>(dm.n), true, ctx.sms()) : Plan{};
  const std::size_t sbytes = static_cast<std::size_t>(plan.ws_fwd) * sizeof(float);
  if (wbytes + sbytes) ctx.ensure_scratch(wbytes + sbytes + 512);
  ScratchScope scope(ctx);
  void* work = wbytes ? scope.take<unsigned char>(wbytes) : nullptr;
  float* ws = sbytes ? scope.take<float>(static_cast<std::size_t>(plan.ws_fwd)) : nullptr;
  for (int h = 0; h < dm.heads; ++h) {
    SigArgs g = head_args(dm, h, q, k, v);
    g.out_a = a + h * dm.d;
    g.rowsum = rowsum + h;
    if (impl != Impl::simt) {
      tc_any(impl, prec, dp, tc_args(g), nullptr, work, ctx.sms(), ctx.stream());
      continue;
    }
    g.vec = aligned ? 1 : 0;
    if (dp == 16)
      launch_fwd<16>(g, plan, ws, ctx.stream());
    else if (dp == 32)
      launch_fwd<32>(g, plan, ws, ctx.stream());
    else
      launch_fwd<64>(g, plan, ws, ctx.stream());
  }
}

void sigmoid_attn_bwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v,
                      const float* a, const float* rowsum, const float* da, Index da_ld, Index da_head_stride,
                      float da_scale, float* dq, float* dk, float* dv, float dv_beta, float* delta,
                      AttnPrecision prec) {
  if (dm.n == 0) return;
  const Impl impl = impl_for(prec);
  if (dm.d > 64 || impl == Impl::chunked) {
    check_width(dm.d);
    chunked_bwd(ctx, dm, q, k, v, a, rowsum, da, da_ld, da_head_stride, da_scale, dq, dk, dv, dv_beta, delta);
    return;
  }
  const int dp = padded_width(dm.d);
  bool aligned = dm.d % 4 == 0 && aligned16(q, dm.heads * dm.d) && aligned16(k, dm.heads * dm.d) &&
                 aligned16(v, dm.vheads * dm.d) && aligned16(da, da_ld) && da_head_stride % 4 == 0;
  const std::size_t wbytes = tc_work_bytes(impl, prec, dm, dp, aligned);
  const Plan plan = impl == Impl::simt ? plan_any(dp, static_cast<int>(dm.n), simt_dq_fused(), ctx.sms()) : Plan{};
  const std::size_t sbytes = static_cast<std::size_t>(plan.ws_bwd) * sizeof(float);
  if (wbytes + sbytes) ctx.ensure_scratch(wbytes + sbytes + 512);
  ScratchScope scope(ctx);
  void* work = wbytes ? scope.take<unsigned char>(wbytes) : nullptr;
  float* ws = sbytes ? scope.take<float>(static_cast<std::size_t>(plan.ws_bwd)) : nullptr;
  for (int h = 0; h < dm.heads; ++h) {
    const int hv = dm.vheads == 1 ? 0 : h;
    SigArgs g = head_args(dm, h, q, k, v);
    g.a = a + h * dm.d;
    g.da = da + h * da_head_stride;
    g.ldda = da_ld;
    g.da_scale = da_scale;
    g.rowsum_in = rowsum + h;
    g.delta = delta + h;
    g.dq = dq + h * dm.d;
    g.dk = dk + h * dm.d;
    g.dv = dv + hv * dm.d;
    g.dv_beta = (dm.vheads == 1 && h > 0) ? 1.0f : dv_beta;
    if (impl != Impl::simt) {
      tc_any(impl, prec, dp, tc_args(g), delta + h, work, ctx.sms(), ctx.stream());
      continue;
    }
    sigmoid_delta_kernel<<<blocks_for(dm.n, 8, 16 * ctx.sms()), 256, 0, ctx.stream()>>>(g, delta + h);
    DFM_CUDA_LAUNCH_CHECK();
    g.vec = aligned ? 1 : 0;
    if (dp == 16)
      launch_bwd<16>(g, plan, ws, ctx.stream());
    else if (dp == 32)
      launch_bwd<32>(g, plan, ws, ctx.stream());
    else
      launch_bwd<64>(g, plan, ws, ctx.stream());
  }
}

}  // namespace dfm::cuda
