/*
DIFFormer-a (sigmoid) attention, exact fp32 on the CUDA cores ("simt"), forward + backward,
flash-style (nothing N x N), version 6: register-blocked tiles.

  w_ij = sigmoid(q_i . k_j), r_i = sum_j w_ij, A_i = sum_j w_ij v_j / r_i
  delta_i = dA_i . A_i, dP = dA V^T, dS = w (1 - w) (dP - delta) / r
  dQ = dS K, dK = dS^T Q, dV = (w / r)^T dA

old (src/ops/cuda/attn_sigmoid.cu before v6, copied below): 64 x 64 tiles, 256 threads as 16 x 16,
  each a 4 x 4 piece of the score tile; tiles loaded through registers between two barriers;
  backward = delta pre-pass, dK/dV kernel (key tiles), dQ kernel (query tiles).
v6: a block owns 128 rows and streams 64-row tiles of the other side; 256 threads, each an 8 x 4
  piece of the 128 x 64 score tile (8 own rows ty + 16 j, 4 streamed rows tx + 16 i) and 8 x DP/16
  of the output; all tiles row-major [rows][DP + 4] (row stride = 4 banks mod 32: a warp is 4 ty x
  8 tx, so its float4 reads of 4 own rows and of 8 streamed rows hit distinct banks); streamed
  tiles double-buffered by cp.async (16-byte copies where the rows allow, else 4-byte; zero-fill
  masks the padding); per 4 columns 8 + 4 float4 loads feed 128 FMAs. Too few owned tiles for
  the SMs (N = 3e4: 235 tiles on 132 SMs, 1.8 waves) -> the streamed range is split over up to 8
  blocks (blockIdx.y), partial O / r (or dK, dV, dQ) to a workspace, summed in a fixed order by a
  small combine kernel (deterministic).
  backward "pass": dK/dV kernel (128 keys own, query tiles streamed) + dQ kernel (128 queries own,
  key tiles streamed): 14 N^2 d FLOPs.
  backward "fused": one kernel over key tiles computes dK, dV and each query tile's dQ part
  dS^T K, added into an fp32 [n][DP] workspace by float4 atomics (then copied out): 10 N^2 d FLOPs,
  dQ summed in an arbitrary order (not bitwise reproducible).
FLOPs counted for TFLOP/s: forward 4 N^2 d, backward 14 N^2 d (as v4/v5, whatever the variant).

v6x8 (in this file only; not in the library): fwd8_kernel streams 128-key tiles, each thread 8 x 8
  scores, and for O += w V the block's halves take 64 keys each (8 queries x DP/8 columns per
  thread); dkvq8_kernel: half 0 of the block computes S^T then dV, half 1 dP^T then dK, 8 x 8 per
  thread, the two met in shared memory. Fewer shared loads per FMA, but 254 registers.
All v6 kernels place lanes so that pairs (n, n^1) share row reads and (n, n^2) column reads
(lane_rc); the first H200 run used lane & 7 / lane >> 3 instead and measured the same (log).

Measured on an NVIDIA H200 (2026-11-29, attn_sigmoid_v6.h200.log), d = 64, one head, ms
(TFLOP/s counting 4 N^2 d forward, 14 N^2 d backward):
                   N = 1e4                 3e4                     6e4
  old      fwd     1.814 (14.1)          10.655 (21.6)           38.846 (23.7)
           bwd     6.942 (12.9)          41.944 (19.2)          176.646 (18.3)
  v6fused  fwd     0.858 (29.8)           7.512 (30.7)           29.871 (30.9)
           bwd     3.594 (24.9)          31.587 (25.5)          126.203 (25.6)
  v6pass   bwd     4.387 (20.4)          38.362 (21.0)          152.139 (21.2)
  v6x8     fwd     1.698 (15.1)          15.015 (15.3)           59.441 (15.5)
           bwd     3.678 (24.4)          32.456 (24.8)          128.530 (25.1)
  fwd + bwd: old 8.76 / 52.6 / 215.5; v6fused 4.45 / 39.1 / 156.1 (1.97x / 1.35x / 1.38x).
  Without the split of the streamed range (s = 1): v6fused 7.22 / 43.3 / 172.2 (first run).
  Errors vs fp64 at n = 4099, d = 64 (A, dQ, dK, dV): old 1.2e-6 each; v6fused 6.5e-7, 3.2e-7,
  6.2e-7, 6.0e-7; every case within 1e-5, nothing written outside its columns.
  Library (difformer bench --kernel sigmoid --features 128 --hidden 64 --layers 2 --precision
  fp32, ms/step): v6fused 9.45 / 79.2 / 314.6 (first run, earlier lane mapping; 79.0 at 3e4 in
  the second), v6pass 93.0 at 3e4, v6x8 11.3 / 95.7 / 378.4; the 64 x 64 kernels 18.1 / 106.3 /
  433 (v5's notes).
  Not reached: the 28 ms fwd + bwd at 3e4 aimed at (39.1). v6x8 has a third fewer shared loads
  per FMA and yet runs the forward 2x slower, so shared-memory bandwidth alone does not explain
  these times; what bounds the kernels needs a profiler (ncu) run.

Build: nvcc -O3 -arch=sm_90 -std=c++17 dev/cuda/attn_sigmoid_v6.cu -o /tmp/attn_sigmoid_v6
Run:   /tmp/attn_sigmoid_v6 [sizes=10000,30000,60000]
CPU check of the v6 kernels (no GPU; cuda_emu.hpp):
       g++ -std=c++20 -O1 -pthread -DSIG_EMU -x c++ dev/cuda/attn_sigmoid_v6.cu -o /tmp/v6emu && /tmp/v6emu
*/
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#ifdef SIG_EMU
#include "cuda_emu.hpp"
typedef void* cudaStream_t;
#define CUDA_CHECK(x) (x)
#define KERNEL_CHECK()
#define LAUNCH(kern, grid, block, smem, st, ...) emu::launch(grid, block, smem, [=] { kern(__VA_ARGS__); })
#define DECLARE_SMEM(name) float* name = reinterpret_cast<float*>(emu::smem.data())
#else
#include "common.cuh"
#define LAUNCH(kern, grid, block, smem, st, ...) kern<<<grid, block, smem, st>>>(__VA_ARGS__)
#define DECLARE_SMEM(name)           \
  extern __shared__ float4 smem4[]; \
  float* name = reinterpret_cast<float*>(smem4)
#endif

typedef long long Index;

struct Args {
  const float *q, *k, *v, *a, *da, *rowsum_in, *delta;
  Index ldq, ldk, ldv, lda, ldda, ldr;  // ldr: stride of rowsum/delta (= heads)
  float da_scale;
  int n, d;
  float *out_a, *rowsum, *dq, *dk, *dv;
  float dv_beta;
  int vec;     // v6: q, k, v, da rows 16-byte aligned and d % 4 == 0 (16-byte cp.async)
  int nsplit;  // v6: blocks per owned tile (blockIdx.y), each over 1/nsplit of the streamed tiles
  float* ws;   // v6: partials when nsplit > 1; the fused backward's dQ accumulator
};

// =============================================================================================
// old: the simt kernels of src/ops/cuda/attn_sigmoid.cu before v6 (verbatim but for names)
#ifndef SIG_EMU
namespace old {
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kB = 64;
constexpr int kL = kB + 4;
constexpr int kThreads = 256;
__device__ __forceinline__ float sigmoidf_fast(float s) { return 1.0f / (1.0f + __expf(-s)); }
__device__ __forceinline__ void outer4(float (&acc)[4][4], const float4 a, const float4 b) {
  const float av[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    acc[j][0] = fmaf(av[j], b.x, acc[j][0]);
    acc[j][1] = fmaf(av[j], b.y, acc[j][1]);
    acc[j][2] = fmaf(av[j], b.z, acc[j][2]);
    acc[j][3] = fmaf(av[j], b.w, acc[j][3]);
  }
}
__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void st4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
template <int CW>
__device__ __forceinline__ void ldw(const float* p, float (&out)[CW]) {
  if constexpr (CW == 4) {
    const float4 v = ld4(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else if constexpr (CW == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x, out[1] = v.y;
  } else {
    out[0] = p[0];
  }
}
template <int DP>
__device__ __forceinline__ void load_tile_t(float* dst, const float* __restrict__ src, Index ld, int row0, int n, int d,
                                            float scale) {
  for (int e = threadIdx.x; e < kB * DP; e += kThreads) {
    const int r = e / DP, c = e % DP, gr = row0 + r;
    dst[c * kL + r] = (gr < n && c < d) ? scale * src[static_cast<Index>(gr) * ld + c] : 0.0f;
  }
}
template <int DP>
__device__ __forceinline__ void load_tile_r(float* dst, const float* __restrict__ src, Index ld, int row0, int n, int d,
                                            float scale) {
  for (int e = threadIdx.x; e < kB * DP; e += kThreads) {
    const int r = e / DP, c = e % DP, gr = row0 + r;
    dst[r * DP + c] = (gr < n && c < d) ? scale * src[static_cast<Index>(gr) * ld + c] : 0.0f;
  }
}
using SigArgs = Args;
template <int DP>
constexpr int fwd_smem_floats() { return 2 * DP * kL + kB * DP + kB * kL; }
template <int DP>
constexpr int dq_smem_floats() { return 4 * DP * kL + kB * DP + kB * kL; }
template <int DP>
constexpr int dkv_smem_floats() { return 4 * DP * kL + 2 * kB * DP + 2 * kB * kL + 2 * kB; }

template <int DP>
__global__ void __launch_bounds__(kThreads) sigmoid_fwd_kernel(SigArgs g) {
  constexpr int CW = DP / 16;
  extern __shared__ float4 smem4[];
  float* Qt = reinterpret_cast<float*>(smem4);
  float* Kt = Qt + DP * kL;
  float* Vs = Kt + DP * kL;
  float* Pt = Vs + kB * DP;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int q0 = blockIdx.x * kB, n = g.n;
  load_tile_t<DP>(Qt, g.q, g.ldq, q0, n, g.d, 1.0f);
  float o[4][CW] = {};
  float rs[4] = {};
  for (int k0 = 0; k0 < n; k0 += kB) {
    __syncthreads();
    load_tile_t<DP>(Kt, g.k, g.ldk, k0, n, g.d, 1.0f);
    load_tile_r<DP>(Vs, g.v, g.ldv, k0, n, g.d, 1.0f);
    __syncthreads();
    float s[4][4] = {};
#pragma unroll 8
    for (int c = 0; c < DP; ++c) outer4(s, ld4(Qt + c * kL + ty * 4), ld4(Kt + c * kL + tx * 4));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool valid = k0 + tx * 4 + i < n;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j][i] = valid ? sigmoidf_fast(s[j][i]) : 0.0f;
        rs[j] += s[j][i];
      }
      st4(Pt + (tx * 4 + i) * kL + ty * 4, s[0][i], s[1][i], s[2][i], s[3][i]);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kB; ++kk) {
      const float4 p = ld4(Pt + kk * kL + ty * 4);
      float vv[CW];
      ldw<CW>(Vs + kk * DP + tx * CW, vv);
      const float pv[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int cc = 0; cc < CW; ++cc) o[j][cc] = fmaf(pv[j], vv[cc], o[j][cc]);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int off = 8; off > 0; off >>= 1) rs[j] += __shfl_xor_sync(kFullMask, rs[j], off);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = q0 + ty * 4 + j;
    if (r >= n) continue;
    const float inv = 1.0f / rs[j];
#pragma unroll
    for (int cc = 0; cc < CW; ++cc) {
      const int c = tx * CW + cc;
      if (c < g.d) g.out_a[static_cast<Index>(r) * g.lda + c] = o[j][cc] * inv;
    }
    if (tx == 0) g.rowsum[static_cast<Index>(r) * g.ldr] = rs[j];
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
// delta_i = dA_i . A_i (dA scaled), one warp per row of one head (used by old and v6 here)
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

template <int DP>
__global__ void __launch_bounds__(kThreads) sigmoid_dq_kernel(SigArgs g) {
  constexpr int CW = DP / 16;
  extern __shared__ float4 smem4[];
  float* Qt = reinterpret_cast<float*>(smem4);
  float* dAt = Qt + DP * kL;
  float* Kt = dAt + DP * kL;
  float* Vt = Kt + DP * kL;
  float* Ks = Vt + DP * kL;
  float* dSt = Ks + kB * DP;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int q0 = blockIdx.x * kB, n = g.n;
  load_tile_t<DP>(Qt, g.q, g.ldq, q0, n, g.d, 1.0f);
  load_tile_t<DP>(dAt, g.da, g.ldda, q0, n, g.d, g.da_scale);
  float rinv[4], dl[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = q0 + ty * 4 + j;
    rinv[j] = r < n ? 1.0f / g.rowsum_in[static_cast<Index>(r) * g.ldr] : 0.0f;
    dl[j] = r < n ? g.delta[static_cast<Index>(r) * g.ldr] : 0.0f;
  }
  float acc[4][CW] = {};
  for (int k0 = 0; k0 < n; k0 += kB) {
    __syncthreads();
    load_tile_t<DP>(Kt, g.k, g.ldk, k0, n, g.d, 1.0f);
    load_tile_t<DP>(Vt, g.v, g.ldv, k0, n, g.d, 1.0f);
    load_tile_r<DP>(Ks, g.k, g.ldk, k0, n, g.d, 1.0f);
    __syncthreads();
    float s[4][4] = {}, dp[4][4] = {};
#pragma unroll 8
    for (int c = 0; c < DP; ++c) {
      outer4(s, ld4(Qt + c * kL + ty * 4), ld4(Kt + c * kL + tx * 4));
      outer4(dp, ld4(dAt + c * kL + ty * 4), ld4(Vt + c * kL + tx * 4));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool valid = k0 + tx * 4 + i < n;
      float ds[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float w = valid ? sigmoidf_fast(s[j][i]) : 0.0f;
        ds[j] = w * (1.0f - w) * (dp[j][i] - dl[j]) * rinv[j];
      }
      st4(dSt + (tx * 4 + i) * kL + ty * 4, ds[0], ds[1], ds[2], ds[3]);
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kB; ++kk) {
      const float4 p = ld4(dSt + kk * kL + ty * 4);
      float kv[CW];
      ldw<CW>(Ks + kk * DP + tx * CW, kv);
      const float pv[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int cc = 0; cc < CW; ++cc) acc[j][cc] = fmaf(pv[j], kv[cc], acc[j][cc]);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = q0 + ty * 4 + j;
    if (r >= n) continue;
#pragma unroll
    for (int cc = 0; cc < CW; ++cc) {
      const int c = tx * CW + cc;
      if (c < g.d) g.dq[static_cast<Index>(r) * g.ldq + c] = acc[j][cc];
    }
  }
}

template <int DP>
__global__ void __launch_bounds__(kThreads) sigmoid_dkv_kernel(SigArgs g) {
  constexpr int CW = DP / 16;
  extern __shared__ float4 smem4[];
  float* Kt = reinterpret_cast<float*>(smem4);
  float* Vt = Kt + DP * kL;
  float* Qt = Vt + DP * kL;
  float* dAt = Qt + DP * kL;
  float* Qs = dAt + DP * kL;
  float* dAs = Qs + kB * DP;
  float* Ps = dAs + kB * DP;
  float* dSs = Ps + kB * kL;
  float* rinv_s = dSs + kB * kL;
  float* dl_s = rinv_s + kB;
  const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
  const int k0 = blockIdx.x * kB, n = g.n;
  load_tile_t<DP>(Kt, g.k, g.ldk, k0, n, g.d, 1.0f);
  load_tile_t<DP>(Vt, g.v, g.ldv, k0, n, g.d, 1.0f);
  float dk[4][CW] = {}, dv[4][CW] = {};
  for (int q0 = 0; q0 < n; q0 += kB) {
    __syncthreads();
    load_tile_t<DP>(Qt, g.q, g.ldq, q0, n, g.d, 1.0f);
    load_tile_t<DP>(dAt, g.da, g.ldda, q0, n, g.d, g.da_scale);
    load_tile_r<DP>(Qs, g.q, g.ldq, q0, n, g.d, 1.0f);
    load_tile_r<DP>(dAs, g.da, g.ldda, q0, n, g.d, g.da_scale);
    if (tid < kB) {
      const int r = q0 + tid;
      rinv_s[tid] = r < n ? 1.0f / g.rowsum_in[static_cast<Index>(r) * g.ldr] : 0.0f;
      dl_s[tid] = r < n ? g.delta[static_cast<Index>(r) * g.ldr] : 0.0f;
    }
    __syncthreads();
    float s[4][4] = {}, dp[4][4] = {};
#pragma unroll 8
    for (int c = 0; c < DP; ++c) {
      outer4(s, ld4(Kt + c * kL + ty * 4), ld4(Qt + c * kL + tx * 4));
      outer4(dp, ld4(Vt + c * kL + ty * 4), ld4(dAt + c * kL + tx * 4));
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int qi = tx * 4 + i;
      const float ri = rinv_s[qi], di = dl_s[qi];
      float pn[4], ds[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float w = sigmoidf_fast(s[j][i]);
        pn[j] = w * ri;
        ds[j] = w * (1.0f - w) * (dp[j][i] - di) * ri;
      }
      st4(Ps + qi * kL + ty * 4, pn[0], pn[1], pn[2], pn[3]);
      st4(dSs + qi * kL + ty * 4, ds[0], ds[1], ds[2], ds[3]);
    }
    __syncthreads();
#pragma unroll 8
    for (int qq = 0; qq < kB; ++qq) {
      const float4 p = ld4(Ps + qq * kL + ty * 4);
      const float4 t = ld4(dSs + qq * kL + ty * 4);
      float av[CW], qv[CW];
      ldw<CW>(dAs + qq * DP + tx * CW, av);
      ldw<CW>(Qs + qq * DP + tx * CW, qv);
      const float pv[4] = {p.x, p.y, p.z, p.w}, tv[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int cc = 0; cc < CW; ++cc) {
          dv[j][cc] = fmaf(pv[j], av[cc], dv[j][cc]);
          dk[j][cc] = fmaf(tv[j], qv[cc], dk[j][cc]);
        }
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int r = k0 + ty * 4 + j;
    if (r >= n) continue;
#pragma unroll
    for (int cc = 0; cc < CW; ++cc) {
      const int c = tx * CW + cc;
      if (c >= g.d) continue;
      g.dk[static_cast<Index>(r) * g.ldk + c] = dk[j][cc];
      float* out = g.dv + static_cast<Index>(r) * g.ldv + c;
      *out = g.dv_beta == 0.0f ? dv[j][cc] : dv[j][cc] + g.dv_beta * *out;
    }
  }
}

template <typename Kernel>
void set_smem(Kernel kernel, int floats) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, floats * (int)sizeof(float)));
}
template <int DP>
void fwd(const Args& g, cudaStream_t st) {
  static bool once = (set_smem(sigmoid_fwd_kernel<DP>, fwd_smem_floats<DP>()), true);
  (void)once;
  const int nb = (g.n + kB - 1) / kB;
  sigmoid_fwd_kernel<DP><<<nb, kThreads, fwd_smem_floats<DP>() * sizeof(float), st>>>(g);
  KERNEL_CHECK();
}
template <int DP>
void bwd(const Args& g, float* delta, cudaStream_t st) {
  static bool once = (set_smem(sigmoid_dq_kernel<DP>, dq_smem_floats<DP>()),
                      set_smem(sigmoid_dkv_kernel<DP>, dkv_smem_floats<DP>()), true);
  (void)once;
  sigmoid_delta_kernel<<<std::min(ceil_div(g.n, 8), 16 * num_sms()), 256, 0, st>>>(g, delta);
  KERNEL_CHECK();
  const int nb = (g.n + kB - 1) / kB;
  sigmoid_dkv_kernel<DP><<<nb, kThreads, dkv_smem_floats<DP>() * sizeof(float), st>>>(g);
  KERNEL_CHECK();
  sigmoid_dq_kernel<DP><<<nb, kThreads, dq_smem_floats<DP>() * sizeof(float), st>>>(g);
  KERNEL_CHECK();
}
}  // namespace old
#endif  // !SIG_EMU

// =============================================================================================
// v6
namespace v6 {

constexpr int kT = 256;           // threads per block (16 x 16)
constexpr int kBO = 128;          // rows a block owns
constexpr int kBS = 64;           // rows per streamed tile
// Knobs (defaults = version 6 as measured in its log; attn_sigmoid_v7.cu sets other values):
// unrolling of the outer column / key loops of dot_tile and acc_px in the forward (SIG_FWD_UR)
// and the backward kernels (SIG_BWD_UR), of the fused dQ loop (SIG_DQ_UR), and the score tiles'
// row padding (SIG_KLP_PAD).
#ifndef SIG_FWD_UR
#define SIG_FWD_UR 16
#endif
#ifndef SIG_BWD_UR
#define SIG_BWD_UR 16
#endif
#ifndef SIG_DQ_UR
#define SIG_DQ_UR 8
#endif
#ifndef SIG_KLP_PAD
#define SIG_KLP_PAD 4
#endif
constexpr int kLP = kBS + SIG_KLP_PAD;  // row stride of a score tile [kBO][kLP]
constexpr int kDqUnroll = SIG_DQ_UR;    // (a pragma does not expand macros)
constexpr double kSplitCapBytes = 160.0 * (1 << 20);  // most workspace a split may take

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
// two halves of 128 threads (h = warp / 4), each 16 row groups r x 8 column groups c
__device__ __forceinline__ void thread_half(int& h, int& r, int& c) {
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  int r_lo, c_lo;
  lane_rc(lane, r_lo, c_lo);
  h = warp >> 2;
  r = ((warp & 3) << 2) | r_lo;
  c = c_lo;
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
#ifdef SIG_EMU
  *dst = ok ? *src : 0.0f;
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 4 : 0) : "memory");
#endif
}
__device__ __forceinline__ void cp_async16(float* dst, const float* src, bool ok) {
#ifdef SIG_EMU
  for (int i = 0; i < 4; ++i) dst[i] = ok ? src[i] : 0.0f;
#else
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0) : "memory");
#endif
}
__device__ __forceinline__ void cp_commit() {
#ifndef SIG_EMU
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cp_wait_all() {
#ifndef SIG_EMU
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
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

// acc[j][i] += A[16 j] . B[BS i] over DP columns (A, B at the thread's first rows, [rows][DP + 4])
template <int DP, int NJ, int NI, int BS>
__device__ __forceinline__ void dot_rows(float (&acc)[NJ][NI], const float* __restrict__ A,
                                         const float* __restrict__ B) {
  constexpr int LD = DP + 4;
#pragma unroll
  for (int c = 0; c < DP; c += 4) {
    float a[NJ][4], b[NI][4];
#pragma unroll
    for (int j = 0; j < NJ; ++j) ld4a(a[j], A + j * 16 * LD + c);
#pragma unroll
    for (int i = 0; i < NI; ++i) ld4a(b[i], B + i * BS * LD + c);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int j = 0; j < NJ; ++j)
#pragma unroll
        for (int i = 0; i < NI; ++i) acc[j][i] = fmaf(a[j][u], b[i][u], acc[j][i]);
  }
}
// the DP / 8 columns of column group c (of 8): DP = 64: 4c .. 4c+3 and 32+4c .. 32+4c+3
template <int DP>
__device__ __forceinline__ int col8(int c, int m) {
  if constexpr (DP == 64) return m < 4 ? 4 * c + m : 28 + 4 * c + m;
  else return c * (DP / 8) + m;
}
template <int DP>
__device__ __forceinline__ void ldx8(float (&o)[DP / 8], const float* row, int c) {
  if constexpr (DP == 64) {
    float a[4], b[4];
    ld4a(a, row + 4 * c);
    ld4a(b, row + 32 + 4 * c);
#pragma unroll
    for (int m = 0; m < 4; ++m) o[m] = a[m], o[4 + m] = b[m];
  } else {
    ldw<DP / 8>(o, row + c * (DP / 8));
  }
}
// o[j][m] += sum_k P[16 j][k] X[k][col8(c, m)] over NK k; P at the thread's first row (stride
// LPX), X: [NK][DP + 4]
template <int DP, int LPX, int NK>
__device__ __forceinline__ void acc_px8(float (&o)[8][DP / 8], const float* __restrict__ P,
                                        const float* __restrict__ X, int c) {
  constexpr int LD = DP + 4, CW8 = DP / 8;
#pragma unroll
  for (int k = 0; k < NK; k += 4) {
    float p[8][4], x[4][CW8];
#pragma unroll
    for (int j = 0; j < 8; ++j) ld4a(p[j], P + j * 16 * LPX + k);
#pragma unroll
    for (int u = 0; u < 4; ++u) ldx8<DP>(x[u], X + (k + u) * LD, c);
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int m = 0; m < CW8; ++m) o[j][m] = fmaf(p[j][u], x[u][m], o[j][m]);
  }
}
__device__ __forceinline__ void cp_wait_one() {  // all but the latest committed group
#ifndef SIG_EMU
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
#endif
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
  // 8 x 8 forward: Q [kBO][LD], K [2][kBO][LD], V [kBO][LD], P [kBO][kBO + 4]
  static constexpr int fwd8 = 4 * kBO * LD + kBO * (kBO + 4);
};

// ---- forward: block (query tile, split) --------------------------------------------------------
template <int DP>
__global__ void __launch_bounds__(kT, DP == 64 ? 1 : 2) fwd_kernel(const Args g) {
  constexpr int LD = DP + 4, CW = DP / 16;
  DECLARE_SMEM(sm);
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
    dot_tile<DP, SIG_FWD_UR>(s, Qs + ty * LD, Ks + tx * LD);
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
    acc_px<DP, SIG_FWD_UR>(o, Ps + ty * kLP, Vs + tx * CW);
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
__global__ void fwd_combine_kernel(const Args g) {
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

// delta_i = dA_i . A_i (dA scaled)
#ifdef SIG_EMU
__global__ void delta_kernel(const Args g, float* delta) {
  const Index i = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x;
  if (i >= g.n) return;
  float s = 0.0f;
  for (int c = 0; c < g.d; ++c) s += g.da_scale * g.da[i * g.ldda + c] * g.a[i * g.lda + c];
  delta[i * g.ldr] = s;
}
#endif

// ---- dK, dV (FUSED: and dQ by atomics): block (key tile, split of the query tiles) ----------------
template <int DP, bool FUSED>
__device__ __forceinline__ void dkv_body(const Args& g) {
  constexpr int LD = DP + 4, CW = DP / 16;
  DECLARE_SMEM(sm);
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
      dot_tile<DP, SIG_BWD_UR>(s, Ks + ty * LD, Qs + tx * LD);
      dot_tile<DP, SIG_BWD_UR>(dp, Vs + ty * LD, As + tx * LD);
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
    acc_px<DP, SIG_BWD_UR>(dv, Ps + ty * kLP, As + tx * CW);
    acc_px<DP, SIG_BWD_UR>(dk, Ts + ty * kLP, Qs + tx * CW);
    if constexpr (FUSED) {
      // dQ[q][c] += sum_j dS[j][q] K[j][c] for this tile's 64 queries: 4 queries x CW columns each
      const int qa = threadIdx.x & 15, ca = threadIdx.x >> 4;
      float acc[4][CW] = {};
#pragma unroll kDqUnroll
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
__global__ void __launch_bounds__(kT, 1) dkv_kernel(const Args g) {
  dkv_body<DP, false>(g);
}
template <int DP>
__global__ void __launch_bounds__(kT, 1) dkvq_kernel(const Args g) {
  dkv_body<DP, true>(g);
}

template <int DP>
__global__ void dkv_combine_kernel(const Args g, int fused) {
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
__global__ void dq_combine_kernel(const Args g, int nsplit) {
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
__global__ void __launch_bounds__(kT, 1) dq_kernel(const Args g) {
  constexpr int LD = DP + 4, CW = DP / 16;
  DECLARE_SMEM(sm);
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
      dot_tile<DP, SIG_BWD_UR>(s, Qs + ty * LD, Ks + tx * LD);
      dot_tile<DP, SIG_BWD_UR>(dp, As + ty * LD, Vs + tx * LD);
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
    acc_px<DP, SIG_BWD_UR>(acc, Ts + ty * kLP, Ks + tx * CW);
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

// ---- 8 x 8 forward: block (query tile of 128, split), streams 128-key tiles ------------------
// S phase: thread (tx, ty) owns queries ty + 16 j and keys tx + 16 i (8 x 8). PV phase: the two
// halves h of the block take keys 64 h .. 64 h + 63 of the tile; thread (h, r, c) owns queries
// r + 16 j and the columns col8(c, .) (8 x DP/8); the halves' O are added at the end. K double-
// buffered; V single-buffered, loaded during the S phase of its tile.
template <int DP>
__global__ void __launch_bounds__(kT, 1) fwd8_kernel(const Args g) {
  constexpr int LD = DP + 4, CW8 = DP / 8, BK = kBO, LPF = kBO + 4;
  DECLARE_SMEM(sm);
  float* Qs = sm;
  float* Kb = Qs + kBO * LD;
  float* Vs = Kb + 2 * BK * LD;
  float* Ps = Vs + BK * LD;
  int tx, ty, h, r, c;
  thread_xy(tx, ty);
  thread_half(h, r, c);
  const int n = g.n, q0 = blockIdx.x * kBO, split = blockIdx.y;
  const int nt = (n + BK - 1) / BK;
  const int tb = split_begin(nt, split, g.nsplit), te = split_begin(nt, split + 1, g.nsplit);
  const bool vec = g.vec != 0;
  load_rows<DP, kBO>(Qs, g.q, g.ldq, q0, n, g.d, vec);
  if (tb < te) load_rows<DP, BK>(Kb, g.k, g.ldk, tb * BK, n, g.d, vec);
  cp_commit();
  float o[8][CW8] = {}, rs[8] = {};
  for (int t = tb; t < te; ++t) {
    const int b = (t - tb) & 1;
    const float* Ks = Kb + b * BK * LD;
    cp_wait_all();
    __syncthreads();  // K of tile t in; every thread done with tile t - 1 (K buffer b ^ 1, V, P)
    load_rows<DP, BK>(Vs, g.v, g.ldv, t * BK, n, g.d, vec);
    cp_commit();
    if (t + 1 < te) load_rows<DP, BK>(Kb + (b ^ 1) * BK * LD, g.k, g.ldk, (t + 1) * BK, n, g.d, vec);
    cp_commit();
    {
      float s[8][8] = {};
      dot_rows<DP, 8, 8, 16>(s, Qs + ty * LD, Ks + tx * LD);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const bool valid = t * BK + tx + 16 * i < n;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float w = valid ? sigm(s[j][i]) : 0.0f;
          rs[j] += w;
          Ps[(ty + 16 * j) * LPF + tx + 16 * i] = w;
        }
      }
    }
    cp_wait_one();    // V of tile t in (K of t + 1 may still fly)
    __syncthreads();  // P and V visible
    acc_px8<DP, LPF, 64>(o, Ps + r * LPF + h * 64, Vs + h * 64 * LD, c);
  }
  cp_wait_all();
  __syncthreads();  // done with P: the halves' sums and the row sums go there
  float* ored = Ps;             // [kBO][DP]: half 1's O
  float* red = Ps + kBO * DP;   // [16 tx][kBO]
  if (h == 1) {
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int m = 0; m < CW8; ++m) ored[(r + 16 * j) * DP + col8<DP>(c, m)] = o[j][m];
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) red[tx * kBO + ty + 16 * j] = rs[j];
  __syncthreads();
  if (h == 1) return;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int row = r + 16 * j, gr = q0 + row;
    float sum = 0.0f;
#pragma unroll
    for (int x = 0; x < 16; ++x) sum += red[x * kBO + row];
    if (gr >= n) continue;
    if (g.nsplit == 1) {
      const float inv = 1.0f / sum;
#pragma unroll
      for (int m = 0; m < CW8; ++m) {
        const int col = col8<DP>(c, m);
        if (col < g.d) g.out_a[static_cast<Index>(gr) * g.lda + col] = (o[j][m] + ored[row * DP + col]) * inv;
      }
      if (c == 0) g.rowsum[static_cast<Index>(gr) * g.ldr] = sum;
    } else {
      float* wo = g.ws + static_cast<Index>(split) * n * DP;
      float* wr = g.ws + static_cast<Index>(g.nsplit) * n * DP + static_cast<Index>(split) * n;
#pragma unroll
      for (int m = 0; m < CW8; ++m) {
        const int col = col8<DP>(c, m);
        wo[static_cast<Index>(gr) * DP + col] = o[j][m] + ored[row * DP + col];
      }
      if (c == 0) wr[gr] = sum;
    }
  }
}

// ---- 8 x 8 backward, dQ by atomics: block (key tile of 128, split of the 64-query tiles) --------
// Half 0 of the block computes S^T and later dV, half 1 dP^T and later dK, each thread 8 keys
// (r + 16 j) x 8 queries (c + 8 i) then 8 keys x DP/8 columns; between, every thread turns its 32
// elements of the tile into P = w / r and dS in place. dQ part dS^T K: half h over keys 64 h ..,
// thread (r, c) owns queries 4c .. 4c+3, 32+4c .. 32+4c+3 and columns r * DP/16 ..; added into
// the [n][DP] accumulator g.ws by atomics.
template <int DP>
__global__ void __launch_bounds__(kT, 1) dkvq8_kernel(const Args g) {
  constexpr int LD = DP + 4, CW8 = DP / 8, CW = DP / 16;
  DECLARE_SMEM(sm);
  float* Ks = sm;
  float* Vs = Ks + kBO * LD;
  float* Qb = Vs + kBO * LD;
  float* Ab = Qb + 2 * kBS * LD;
  float* Ws = Ab + 2 * kBS * LD;  // [kBO keys][kLP]: w, then w / r
  float* Ds = Ws + kBO * kLP;     // [kBO keys][kLP]: dP, then dS
  float* Rb = Ds + kBO * kLP;
  float* Db = Rb + 2 * kBS;
  int h, r, c;
  thread_half(h, r, c);
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
  float acc[8][CW8] = {};  // h = 0: dV, h = 1: dK
  for (int t = tb; t < te; ++t) {
    const int b = (t - tb) & 1;
    const float* Qs = Qb + b * kBS * LD;
    const float* As = Ab + b * kBS * LD;
    const float* Rs = Rb + b * kBS;
    const float* Dls = Db + b * kBS;
    cp_wait_all();
    __syncthreads();
    if (t + 1 < te) load_q(t + 1, b ^ 1);
    cp_commit();
    {
      float s[8][8] = {};
      dot_rows<DP, 8, 8, 8>(s, (h ? Vs : Ks) + r * LD, (h ? As : Qs) + c * LD);
      if (h == 0) {
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int i = 0; i < 8; ++i) Ws[(r + 16 * j) * kLP + c + 8 * i] = sigm(s[j][i]);
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
          for (int i = 0; i < 8; ++i) Ds[(r + 16 * j) * kLP + c + 8 * i] = s[j][i];
      }
    }
    __syncthreads();
    {  // query q = tid % 64, keys tid / 64 + 4 m
      const int q = threadIdx.x & (kBS - 1), kq = threadIdx.x >> 6;
      const float ri = t * kBS + q < n ? 1.0f / Rs[q] : 0.0f, di = Dls[q];
#pragma unroll 8
      for (int m = 0; m < kBO / 4; ++m) {
        const int e = (kq + 4 * m) * kLP + q;
        const float w = Ws[e], dp = Ds[e];
        Ws[e] = w * ri;
        Ds[e] = w * (1.0f - w) * (g.da_scale * dp - di) * ri;
      }
    }
    __syncthreads();
    acc_px8<DP, kLP, kBS>(acc, (h ? Ds : Ws) + r * kLP, h ? Qs : As, c);
    {  // dQ[q][col] += sum over keys 64 h + kk of dS[key][q] K[key][col]
      float dq[8][CW] = {};
      const float* Dh = Ds + h * 64 * kLP;
      const float* Kh = Ks + h * 64 * LD + r * CW;
#pragma unroll 4
      for (int kk = 0; kk < 64; ++kk) {
        float a[4], a2[4], kc[CW];
        ld4a(a, Dh + kk * kLP + 4 * c);
        ld4a(a2, Dh + kk * kLP + 32 + 4 * c);
        ldw<CW>(kc, Kh + kk * LD);
#pragma unroll
        for (int u = 0; u < 4; ++u)
#pragma unroll
          for (int m = 0; m < CW; ++m) {
            dq[u][m] = fmaf(a[u], kc[m], dq[u][m]);
            dq[4 + u][m] = fmaf(a2[u], kc[m], dq[4 + u][m]);
          }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int q = t * kBS + (u < 4 ? 4 * c + u : 28 + 4 * c + u);
        if (q >= n) continue;
        float* dst = g.ws + static_cast<Index>(q) * DP + r * CW;
        if constexpr (CW == 4)
          atomicAdd(reinterpret_cast<float4*>(dst), make_float4(dq[u][0], dq[u][1], dq[u][2], dq[u][3]));
        else if constexpr (CW == 2)
          atomicAdd(reinterpret_cast<float2*>(dst), make_float2(dq[u][0], dq[u][1]));
        else
          atomicAdd(dst, dq[u][0]);
      }
    }
  }
  cp_wait_all();
  if (g.nsplit == 1) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int row = k0 + r + 16 * j;
      if (row >= n) continue;
#pragma unroll
      for (int m = 0; m < CW8; ++m) {
        const int col = col8<DP>(c, m);
        if (col >= g.d) continue;
        if (h == 1) {
          g.dk[static_cast<Index>(row) * g.ldk + col] = acc[j][m];
        } else {
          float* out = g.dv + static_cast<Index>(row) * g.ldv + col;
          const float x = g.da_scale * acc[j][m];
          *out = g.dv_beta == 0.0f ? x : x + g.dv_beta * *out;
        }
      }
    }
  } else {  // partials as dkv_body (FUSED): dK [nsplit][n][DP], then dV, after dQ [n][DP]
    float* wk = g.ws + static_cast<Index>(n) * DP + static_cast<Index>(split) * n * DP;
    float* w = h == 1 ? wk : wk + static_cast<Index>(g.nsplit) * n * DP;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int row = k0 + r + 16 * j;
      if (row >= n) continue;
#pragma unroll
      for (int m = 0; m < CW8; ++m) w[static_cast<Index>(row) * DP + col8<DP>(c, m)] = acc[j][m];
    }
  }
}

// ---- host side --------------------------------------------------------------------------------
// Splits of the streamed range so that owned tiles x splits fill the SMs' block slots best
// (waves / splits smallest, a split only for a 1% gain), each split >= 8 streamed tiles and the
// workspace <= kSplitCapBytes.
inline int pick_split(int owned, int streamed, int slots, double bytes_per_split) {
  int best = 1;
  double best_t = std::ceil(static_cast<double>(owned) / slots);
  for (int s = 2; s <= 8; ++s) {
    if (streamed < 8 * s || s * bytes_per_split > kSplitCapBytes) break;
    const double t = std::ceil(static_cast<double>(owned) * s / slots) / s;
    if (t < 0.99 * best_t) best = s, best_t = t;
  }
  return best;
}

// kernel families: 0 "pass" (8 x 4 tiles, dQ by its own kernel), 1 "fused" (8 x 4, dQ by
// atomics), 2 "8x8" (fwd8_kernel, dkvq8_kernel: dQ by atomics)
struct Plan {
  int s_fwd = 1, s_kv = 1, s_q = 1;
  int kind = 0;
  bool fused = false;
  Index ws_fwd = 0, ws_bwd = 0;  // floats
};

#ifdef SIG_EMU
template <typename K>
int occupancy(K, int) { return 1; }
inline int emu_sms = 2;
inline int sm_count() { return emu_sms; }
#else
template <typename K>
int occupancy(K kernel, int smem_floats) {
  CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  smem_floats * static_cast<int>(sizeof(float))));
  int nb = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kernel, kT, smem_floats * sizeof(float)));
  return std::max(nb, 1);
}
inline int sm_count() { return num_sms(); }
#endif

// force_split > 0: that many splits everywhere (clamped to the tiles)
template <int DP>
Plan plan(int n, int kind, int force_split = 0) {
  static const int occ_f = occupancy(fwd_kernel<DP>, Smem<DP>::fwd);
  static const int occ_kv = occupancy(dkv_kernel<DP>, Smem<DP>::dkv);
  static const int occ_kvq = occupancy(dkvq_kernel<DP>, Smem<DP>::dkv);
  static const int occ_q = occupancy(dq_kernel<DP>, Smem<DP>::dq);
  static const int occ_f8 = occupancy(fwd8_kernel<DP>, Smem<DP>::fwd8);
  static const int occ_kvq8 = occupancy(dkvq8_kernel<DP>, Smem<DP>::dkv);
  const int sms = sm_count();
  const bool fused = kind != 0;
  const int owned = (n + kBO - 1) / kBO, streamed = (n + kBS - 1) / kBS;
  const int streamed_f = kind == 2 ? (n + kBO - 1) / kBO : streamed;
  const double nd = static_cast<double>(n) * DP * sizeof(float);
  Plan p;
  p.kind = kind;
  p.fused = fused;
  if (force_split > 0) {
    p.s_fwd = std::min(force_split, streamed_f);
    p.s_kv = std::min(force_split, streamed);
    p.s_q = fused ? 1 : p.s_kv;
  } else {
    p.s_fwd = pick_split(owned, streamed_f, sms * (kind == 2 ? occ_f8 : occ_f), nd + n * sizeof(float));
    p.s_kv = pick_split(owned, streamed, sms * (kind == 2 ? occ_kvq8 : (fused ? occ_kvq : occ_kv)), 2 * nd);
    p.s_q = fused ? 1 : pick_split(owned, streamed, sms * occ_q, nd);
  }
  const Index nDP = static_cast<Index>(n) * DP;
  p.ws_fwd = p.s_fwd > 1 ? p.s_fwd * (nDP + n) : 0;
  const Index kv = p.s_kv > 1 ? 2 * p.s_kv * nDP : 0;
  p.ws_bwd = fused ? nDP + kv : std::max(kv, p.s_q > 1 ? p.s_q * nDP : Index{0});
  return p;
}

inline int grid_for(Index work) { return static_cast<int>(std::min<Index>((work + 255) / 256, 4096)); }

template <int DP>
void fwd(Args g, const Plan& p, float* ws, cudaStream_t st) {
  const int owned = (g.n + kBO - 1) / kBO;
  g.nsplit = p.s_fwd, g.ws = ws;
  if (p.kind == 2)
    LAUNCH(fwd8_kernel<DP>, dim3(owned, p.s_fwd), dim3(kT), Smem<DP>::fwd8 * sizeof(float), st, g);
  else
    LAUNCH(fwd_kernel<DP>, dim3(owned, p.s_fwd), dim3(kT), Smem<DP>::fwd * sizeof(float), st, g);
  KERNEL_CHECK();
  if (p.s_fwd > 1) {
    LAUNCH(fwd_combine_kernel<DP>, dim3(grid_for(static_cast<Index>(g.n) * DP)), dim3(256), 0, st, g);
    KERNEL_CHECK();
  }
}

template <int DP>
void bwd(Args g, float* delta, const Plan& p, float* ws, cudaStream_t st) {
  const int owned = (g.n + kBO - 1) / kBO;
  const Index nDP = static_cast<Index>(g.n) * DP;
  g.ws = ws;
#ifdef SIG_EMU
  LAUNCH(delta_kernel, dim3((g.n + 255) / 256), dim3(256), 0, st, g, delta);
#else
  old::sigmoid_delta_kernel<<<std::min(ceil_div(g.n, 8), 16 * num_sms()), 256, 0, st>>>(g, delta);
#endif
  KERNEL_CHECK();
  g.delta = delta;
  g.nsplit = p.s_kv;
  if (p.fused) {
#ifdef SIG_EMU
    std::memset(ws, 0, nDP * sizeof(float));
#else
    CUDA_CHECK(cudaMemsetAsync(ws, 0, nDP * sizeof(float), st));
#endif
    if (p.kind == 2)
      LAUNCH(dkvq8_kernel<DP>, dim3(owned, p.s_kv), dim3(kT), Smem<DP>::dkv * sizeof(float), st, g);
    else
      LAUNCH(dkvq_kernel<DP>, dim3(owned, p.s_kv), dim3(kT), Smem<DP>::dkv * sizeof(float), st, g);
  } else {
    LAUNCH(dkv_kernel<DP>, dim3(owned, p.s_kv), dim3(kT), Smem<DP>::dkv * sizeof(float), st, g);
  }
  KERNEL_CHECK();
  if (p.s_kv > 1) {
    LAUNCH(dkv_combine_kernel<DP>, dim3(grid_for(nDP)), dim3(256), 0, st, g, p.fused ? 1 : 0);
    KERNEL_CHECK();
  }
  if (p.fused) {
    LAUNCH(dq_combine_kernel<DP>, dim3(grid_for(nDP)), dim3(256), 0, st, g, 1);
    KERNEL_CHECK();
    return;
  }
  g.nsplit = p.s_q;
  LAUNCH(dq_kernel<DP>, dim3(owned, p.s_q), dim3(kT), Smem<DP>::dq * sizeof(float), st, g);
  KERNEL_CHECK();
  if (p.s_q > 1) {
    LAUNCH(dq_combine_kernel<DP>, dim3(grid_for(nDP)), dim3(256), 0, st, g, p.s_q);
    KERNEL_CHECK();
  }
}

}  // namespace v6

// =============================================================================================
// harness
struct Ref {
  std::vector<double> a, rs, dq, dk, dv;
};
// compact [n][d] inputs; da already scaled
static Ref cpu_ref(const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                   const std::vector<float>& da, int n, int d) {
  Ref r;
  r.a.assign((size_t)n * d, 0), r.rs.assign(n, 0), r.dq.assign((size_t)n * d, 0), r.dk.assign((size_t)n * d, 0),
      r.dv.assign((size_t)n * d, 0);
  std::vector<double> w(n);
  for (int i = 0; i < n; i++) {
    for (int j = 0; j < n; j++) {
      double z = 0;
      for (int c = 0; c < d; c++) z += (double)q[(size_t)i * d + c] * k[(size_t)j * d + c];
      w[j] = 1.0 / (1.0 + std::exp(-z));
      r.rs[i] += w[j];
    }
    for (int j = 0; j < n; j++)
      for (int c = 0; c < d; c++) r.a[(size_t)i * d + c] += w[j] * v[(size_t)j * d + c];
    for (int c = 0; c < d; c++) r.a[(size_t)i * d + c] /= r.rs[i];
    double delta = 0;
    for (int c = 0; c < d; c++) delta += (double)da[(size_t)i * d + c] * r.a[(size_t)i * d + c];
    for (int j = 0; j < n; j++) {
      double dp = 0;
      for (int c = 0; c < d; c++) {
        dp += (double)da[(size_t)i * d + c] * v[(size_t)j * d + c];
        r.dv[(size_t)j * d + c] += w[j] / r.rs[i] * da[(size_t)i * d + c];
      }
      const double dz = w[j] * (1 - w[j]) * (dp - delta) / r.rs[i];
      for (int c = 0; c < d; c++) {
        r.dq[(size_t)i * d + c] += dz * k[(size_t)j * d + c];
        r.dk[(size_t)j * d + c] += dz * q[(size_t)i * d + c];
      }
    }
  }
  return r;
}
static double rel(const std::vector<float>& x, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); i++) {
    if (!std::isfinite(x[i])) return INFINITY;
    num += (x[i] - ref[i]) * (x[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

// device memory (host memory under SIG_EMU)
static float* dalloc(size_t n) {
  if (n == 0) n = 1;
#ifdef SIG_EMU
  return static_cast<float*>(std::aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64));
#else
  float* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, n * sizeof(float)));
  return p;
#endif
}
static void dfree(float* p) {
#ifdef SIG_EMU
  std::free(p);
#else
  cudaFree(p);
#endif
}
static void h2d(float* d, const std::vector<float>& h) {
#ifdef SIG_EMU
  std::memcpy(d, h.data(), h.size() * sizeof(float));
#else
  CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
#endif
}
static std::vector<float> d2h(const float* d, size_t n) {
  std::vector<float> h(n);
#ifdef SIG_EMU
  std::memcpy(h.data(), d, n * sizeof(float));
#else
  CUDA_CHECK(cudaDeviceSynchronize());
  CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
#endif
  return h;
}
static void sync_all() {
#ifndef SIG_EMU
  CUDA_CHECK(cudaDeviceSynchronize());
#endif
}

enum Impl { kOld = 0, kPass = 1, kFused = 2, kV8 = 3 };
static const char* impl_name(int m) {
  static const char* names[] = {"old", "v6pass", "v6fused", "v6x8"};
  return names[m];
}

// One problem: q, k, v, da (and out a, dq, dk, dv) are [n][ld] with the d attention columns at
// offset off (the other columns belong to "other heads": random, must stay untouched); rowsum and
// delta stride ldr.
struct Problem {
  int n, d, ld, off, ldr;
  float da_scale, dv_beta;
  std::vector<float> q, k, v, da, dv0, junk;  // [n][ld]
  float *dq_, *dk_, *dv_, *dda, *dA, *dqo, *dko, *dvo, *drs, *ddelta, *ws = nullptr;
  size_t ws_floats = 0;
  bool inplace_dq = false;  // dQ written over Q (as the model does)
  Problem(int n_, int d_, int ld_, int off_, int ldr_, float scale, float beta, uint64_t seed)
      : n(n_), d(d_), ld(ld_), off(off_), ldr(ldr_), da_scale(scale), dv_beta(beta) {
    uint64_t s = seed;
    auto uni = [&]() {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      return (float)((s >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
    };
    const size_t nl = (size_t)n * ld;
    for (auto* vv : {&q, &k, &v, &da, &dv0, &junk}) {
      vv->resize(nl);
      for (auto& x : *vv) x = uni();
    }
    dq_ = dalloc(nl), dk_ = dalloc(nl), dv_ = dalloc(nl), dda = dalloc(nl), dA = dalloc(nl);
    dqo = dalloc(nl), dko = dalloc(nl), dvo = dalloc(nl), drs = dalloc((size_t)n * ldr), ddelta = dalloc((size_t)n * ldr);
    h2d(dq_, q), h2d(dk_, k), h2d(dv_, v), h2d(dda, da);
  }
  ~Problem() {
    for (float* p : {dq_, dk_, dv_, dda, dA, dqo, dko, dvo, drs, ddelta}) dfree(p);
    if (ws) dfree(ws);
  }
  void ensure_ws(size_t floats) {
    if (floats <= ws_floats) return;
    if (ws) dfree(ws);
    ws = dalloc(floats), ws_floats = floats;
  }
  Args args() const {
    Args g{};
    g.q = dq_ + off, g.k = dk_ + off, g.v = dv_ + off, g.a = dA + off, g.da = dda + off, g.rowsum_in = drs;
    g.ldq = g.ldk = g.ldv = g.lda = g.ldda = ld;
    g.ldr = ldr;
    g.da_scale = da_scale;
    g.n = n, g.d = d;
    g.out_a = dA + off, g.rowsum = drs, g.dq = dqo + off, g.dk = dko + off, g.dv = dvo + off;
    g.dv_beta = dv_beta;
    if (inplace_dq) g.dq = dq_ + off;
    g.vec = (d % 4 == 0 && ld % 4 == 0 && off % 4 == 0) ? 1 : 0;
    g.nsplit = 1;
    return g;
  }
  std::vector<float> compact(const std::vector<float>& x, float scale = 1.0f) const {
    std::vector<float> c((size_t)n * d);
    for (int i = 0; i < n; i++)
      for (int j = 0; j < d; j++) c[(size_t)i * d + j] = scale * x[(size_t)i * ld + off + j];
    return c;
  }
};

template <int DP>
static void run_impl(int m, Problem& P, bool fwd, bool bwd, int force_split = 0) {
  Args g = P.args();
#ifndef SIG_EMU
  if (m == kOld) {
    if (fwd) old::fwd<DP>(g, 0);
    if (bwd) {
      g.da_scale = P.da_scale;  // old: dA scaled on load
      g.delta = P.ddelta;
      old::bwd<DP>(g, P.ddelta, 0);
    }
    return;
  }
#endif
  const v6::Plan p = v6::plan<DP>(P.n, m - 1, force_split);
  P.ensure_ws((size_t)std::max(p.ws_fwd, p.ws_bwd));
  if (fwd) v6::fwd<DP>(g, p, P.ws, 0);
  if (bwd) v6::bwd<DP>(g, P.ddelta, p, P.ws, 0);
}
static void run_any(int m, Problem& P, bool fwd, bool bwd, int force_split = 0) {
  const int dp = P.d <= 16 ? 16 : (P.d <= 32 ? 32 : 64);
  if (dp == 16)
    run_impl<16>(m, P, fwd, bwd, force_split);
  else if (dp == 32)
    run_impl<32>(m, P, fwd, bwd, force_split);
  else
    run_impl<64>(m, P, fwd, bwd, force_split);
}

// forward + backward once from poisoned outputs; errors of A, r, dQ, dK, dV; untouched columns
static bool validate(int m, Problem& P, const Ref& r, int force_split, const char* tag) {
  const size_t nl = (size_t)P.n * P.ld;
  // poison: A, dQ, dK with NaN in the head's columns and junk elsewhere; dV = dv0 (beta) or NaN
  auto poisoned = [&](bool nan_cols) {
    std::vector<float> x = P.junk;
    if (nan_cols)
      for (int i = 0; i < P.n; i++)
        for (int j = 0; j < P.d; j++) x[(size_t)i * P.ld + P.off + j] = NAN;
    return x;
  };
  h2d(P.dA, poisoned(true)), h2d(P.dqo, poisoned(true)), h2d(P.dko, poisoned(true));
  if (P.dv_beta != 0.0f) {
    std::vector<float> x = P.junk;
    for (int i = 0; i < P.n; i++)
      for (int j = 0; j < P.d; j++) x[(size_t)i * P.ld + P.off + j] = P.dv0[(size_t)i * P.ld + P.off + j];
    h2d(P.dvo, x);
  } else {
    h2d(P.dvo, poisoned(true));
  }
  h2d(P.drs, std::vector<float>((size_t)P.n * P.ldr, NAN));
  run_any(m, P, true, true, force_split);
  sync_all();
  const auto a = d2h(P.dA, nl), dq = d2h(P.dqo, nl), dk = d2h(P.dko, nl), dv = d2h(P.dvo, nl);
  const auto rs_all = d2h(P.drs, (size_t)P.n * P.ldr);
  std::vector<float> rs(P.n);
  for (int i = 0; i < P.n; i++) rs[i] = rs_all[(size_t)i * P.ldr];
  std::vector<double> dvref = r.dv;
  if (P.dv_beta != 0.0f) {
    const auto c = P.compact(P.dv0);
    for (size_t i = 0; i < dvref.size(); i++) dvref[i] += (double)P.dv_beta * c[i];
  }
  bool untouched = true;
  for (const auto* x : {&a, &dq, &dk, &dv})
    for (int i = 0; i < P.n; i++)
      for (int j = 0; j < P.ld; j++)
        if ((j < P.off || j >= P.off + P.d) && (*x)[(size_t)i * P.ld + j] != P.junk[(size_t)i * P.ld + j])
          untouched = false;
  double e[5] = {rel(P.compact(a), r.a), rel(rs, r.rs), rel(P.compact(dq), r.dq), rel(P.compact(dk), r.dk),
                 rel(P.compact(dv), dvref)};
  if (P.n == 1) {  // dQ = dK = 0 exactly: absolute
    double m2 = 0;
    for (float x : P.compact(dq)) m2 = std::max(m2, (double)std::fabs(x));
    for (float x : P.compact(dk)) m2 = std::max(m2, (double)std::fabs(x));
    e[2] = e[3] = m2;
  }
  bool pass = untouched;
  for (double x : e) pass = pass && x <= 1e-5;
  // dQ written over Q: the backward again (forward state as it is), then Q restored
  double e_in = 0;
  if (P.n > 1) {
    if (P.dv_beta != 0.0f) h2d(P.dvo, P.junk);  // dV accumulates: any finite start
    P.inplace_dq = true;
    run_any(m, P, false, true, force_split);
    sync_all();
    P.inplace_dq = false;
    e_in = rel(P.compact(d2h(P.dq_, nl)), r.dq);
    h2d(P.dq_, P.q);
    pass = pass && e_in <= 1e-5;
  }
  printf("%8s %-26s | %9.2e %9.2e %9.2e %9.2e %9.2e %9.2e %s%s\n", impl_name(m), tag, e[0], e[1], e[2], e[3], e[4],
         e_in, pass ? "ok" : "FAIL", untouched ? "" : " (wrote outside its columns)");
  fflush(stdout);
  return pass;
}

struct VCase {
  int n, d, ld, off, ldr;
  float scale, beta;
};

static bool validation(const std::vector<VCase>& cases, const std::vector<int>& impls) {
  bool ok = true;
  printf("validation vs fp64 CPU reference, rel = ||x - ref||_F / ||ref||_F (tolerance 1e-5)\n");
  printf("%8s %-26s | %9s %9s %9s %9s %9s %9s\n", "impl", "case", "A", "rowsum", "dQ", "dK", "dV", "dQ over Q");
  for (const VCase& c : cases) {
    Problem P(c.n, c.d, c.ld, c.off, c.ldr, c.scale, c.beta, 12345 + c.n * 7 + c.d);
    const Ref r = cpu_ref(P.compact(P.q), P.compact(P.k), P.compact(P.v), P.compact(P.da, c.scale), c.n, c.d);
    for (int m : impls) {
      const int splits[] = {0, 1, 3};  // auto, none, 3
      for (int fs : splits) {
        if (m == kOld && fs != 0) continue;
        char tag[96];
        snprintf(tag, sizeof tag, "n=%d d=%d ld=%d s=%s%s", c.n, c.d, c.ld, fs == 0 ? "auto" : (fs == 1 ? "1" : "3"),
                 c.beta != 0 ? " b" : "");
        ok &= validate(m, P, r, fs, tag);
      }
    }
  }
  printf("validation %s\n", ok ? "PASSED" : "FAILED");
  return ok;
}

#ifdef SIG_EMU
int main() {
  // small cases: odd n, padded widths, strided rows (other heads' columns), dA scale, dv beta
  const std::vector<VCase> cases = {
      {1, 20, 20, 0, 1, 1.0f, 0.0f},     {77, 64, 64, 0, 1, 1.0f, 0.0f},   {300, 29, 87, 29, 3, 1.0f, 1.0f},
      {130, 16, 32, 16, 2, 0.25f, 0.0f}, {200, 40, 80, 40, 2, 0.25f, 1.0f}, {520, 64, 128, 64, 2, 0.5f, 0.0f},
      {257, 32, 32, 0, 1, 1.0f, 0.0f}};
  v6::emu_sms = 2;
  const bool ok = validation(cases, {kPass, kFused, kV8});
  // the split chooser on the H200's 132 SMs
  for (int n : {10000, 30000, 60000}) {
    v6::emu_sms = 132;
    const v6::Plan p = v6::plan<64>(n, 0), pf = v6::plan<64>(n, 1), p8 = v6::plan<64>(n, 2);
    printf("n=%d splits (1 block/SM assumed): fwd %d, dkv %d, dq %d; fused %d; 8x8 fwd %d bwd %d; ws %.1f / %.1f MB\n",
           n, p.s_fwd, p.s_kv, p.s_q, pf.s_kv, p8.s_fwd, p8.s_kv, p.ws_fwd * 4e-6,
           std::max({p.ws_bwd, pf.ws_bwd, p8.ws_bwd}) * 4e-6);
  }
  return ok ? 0 : 1;
}
#else
int main(int argc, char** argv) {
  print_device();
  std::vector<long long> sizes = {10000, 30000, 60000};
  if (argc > 1) {
    sizes.clear();
    std::string s = argv[1];
    for (size_t p = 0; p < s.size();) {
      size_t e = s.find(',', p);
      if (e == std::string::npos) e = s.size();
      sizes.push_back((long long)std::stod(s.substr(p, e - p)));
      p = e + 1;
    }
  }
  {
    for (int n : {10000, 30000, 60000}) {
      const v6::Plan p = v6::plan<64>(n, 0), pf = v6::plan<64>(n, 1), p8 = v6::plan<64>(n, 2);
      printf("v6 plan at n = %d, d = 64: splits fwd %d, dkv %d, dq %d, fused %d; 8x8 fwd %d, bwd %d\n", n, p.s_fwd,
             p.s_kv, p.s_q, pf.s_kv, p8.s_fwd, p8.s_kv);
    }
  }
  if (const char* e = getenv("SIG_PROFILE"); e != nullptr) {
    // one forward + backward of the fused variant at each size, nothing else (for ncu)
    for (long long N : sizes) {
      Problem P((int)N, 64, 64, 0, 1, 1.0f, 0.0f, 99);
      run_any(kFused, P, true, true, 0);
      CUDA_CHECK(cudaDeviceSynchronize());
    }
    return 0;
  }
  const std::vector<VCase> cases = {
      {1, 20, 20, 0, 1, 1.0f, 0.0f},       {77, 64, 64, 0, 1, 1.0f, 0.0f},     {301, 29, 87, 29, 3, 1.0f, 1.0f},
      {130, 16, 32, 16, 2, 0.25f, 0.0f},   {200, 40, 80, 40, 2, 0.25f, 1.0f},  {1000, 64, 64, 0, 1, 1.0f, 0.0f},
      {4099, 64, 64, 0, 1, 1.0f, 0.0f},    {4099, 32, 32, 0, 1, 1.0f, 0.0f},   {4099, 16, 16, 0, 1, 1.0f, 0.0f}};
  const bool ok = validation(cases, {kOld, kPass, kFused, kV8});

  // ---- timing, d = 64, one head
  printf("\n%8s %6s %8s | %10s %8s | %10s %8s | %10s\n", "impl", "split", "N", "fwd ms", "TFLOP/s", "bwd ms", "TFLOP/s",
         "fwd+bwd ms");
  for (long long N : sizes) {
    const int n = (int)N, d = 64;
    Problem P(n, d, d, 0, 1, 1.0f, 0.0f, 99);
    const double f2 = (double)N * N * d;
    struct V {
      int m, split;
    };
    const V vs[] = {{kOld, 0}, {kPass, 0}, {kFused, 0}, {kV8, 0}, {kV8, 1}};
    for (const V& v : vs) {
      const int it = N <= 30000 ? 5 : 3;
      run_any(v.m, P, true, true, v.split);  // warm-up (and plan / workspace)
      const float tf = time_ms([&] { run_any(v.m, P, true, false, v.split); }, 1, it, 0);
      const float tb = time_ms([&] { run_any(v.m, P, false, true, v.split); }, 1, it, 0);
      CUDA_CHECK(cudaDeviceSynchronize());
      printf("%8s %6s %8lld | %9.3f %8.1f | %9.3f %8.1f | %9.3f\n", impl_name(v.m),
             v.m == kOld ? "-" : (v.split == 0 ? "auto" : "1"), N, tf, 4 * f2 / tf * 1e-9, tb, 14 * f2 / tb * 1e-9,
             tf + tb);
      fflush(stdout);
    }
  }
  return ok ? 0 : 1;
}
#endif
