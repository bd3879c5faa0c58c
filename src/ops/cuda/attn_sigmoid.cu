// DIFFormer-a (sigmoid) attention, flash-style, fp32 on the CUDA cores. Nothing N x N is ever
// stored: a block owns a 64-row tile and streams the other side's 64-row tiles through shared
// memory; the row normaliser r_i = sum_j w_ij is accumulated on the fly and saved (N floats per
// head) for the backward, which recomputes every tile of w:
//   forward  (query tiles)  S = Q K^T, w = sigmoid(S), r += rowsum(w), O += w V;  A = O / r
//   dQ       (query tiles)  dP = dA V^T, dS = w (1 - w) (dP - delta) / r, dQ += dS K
//   dK, dV   (key tiles)    the same tiles transposed: dV += (w / r)^T dA, dK += dS^T Q
// with delta_i = dA_i . A_i from a small pre-pass. 256 threads as 16 x 16, each owning a 4 x 4
// piece of the 64 x 64 score tile and 4 x (D/16) outputs; tiles that feed a product's inner loop
// are stored transposed so that every thread reads float4s (broadcast within a warp). The width
// is a template DP in {16, 32, 64}: a smaller d is zero-padded (exact: zeros add nothing to Q.K
// and the padded output columns are never written). Padded keys are masked to w = 0; padded
// queries get 1/r = 0, which zeroes their contributions to dK and dV.
// These are the CUDA-core kernels: precision fp32 by default. tf32 and bf16 run the tensor-core
// kernels of attn_sigmoid_tc.cuh (mma.sync, the scores in registers), and so does fp32 as 3xTF32
// with DIFFORMER_SIGMOID_IMPL=mma; see cuda_ops.hpp and dev/cuda/attn_sigmoid_v5.cu.
// Not yet: d > 64.
#include <cstdlib>
#include <cstring>

#include "ops/cuda/attn_sigmoid_tc.cuh"
#include "ops/cuda/cuda_util.cuh"

namespace dfm::cuda {
namespace {

constexpr int kB = 64;            // rows per tile, both sides
constexpr int kL = kB + 4;        // leading dimension of a transposed tile (keeps float4 alignment)
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

// CW consecutive floats of shared memory (CW = DP / 16 in {1, 2, 4})
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

// tile rows row0 .. row0+63 of src (row stride ld, d valid columns) into dst, transposed
// ([DP][kL], dst[c*kL + r]) or row-major ([64][DP]); out-of-range entries are 0.
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

struct SigArgs {
  const float *q, *k, *v, *a, *da, *rowsum_in, *delta;
  Index ldq, ldk, ldv, lda, ldda, ldr;  // ldr: stride of rowsum/delta (= heads)
  float da_scale;
  int n, d;
  float *out_a, *rowsum, *dq, *dk, *dv;
  float dv_beta;
};

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
  float* Qt = reinterpret_cast<float*>(smem4);  // [DP][kL]
  float* Kt = Qt + DP * kL;                     // [DP][kL]
  float* Vs = Kt + DP * kL;                     // [64][DP]
  float* Pt = Vs + kB * DP;                     // [64 keys][kL]
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

template <int DP>
__global__ void __launch_bounds__(kThreads) sigmoid_dq_kernel(SigArgs g) {
  constexpr int CW = DP / 16;
  extern __shared__ float4 smem4[];
  float* Qt = reinterpret_cast<float*>(smem4);  // [DP][kL]
  float* dAt = Qt + DP * kL;                    // [DP][kL]
  float* Kt = dAt + DP * kL;                    // [DP][kL]
  float* Vt = Kt + DP * kL;                     // [DP][kL]
  float* Ks = Vt + DP * kL;                     // [64][DP]
  float* dSt = Ks + kB * DP;                    // [64 keys][kL]
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
  float* Kt = reinterpret_cast<float*>(smem4);  // [DP][kL] own keys
  float* Vt = Kt + DP * kL;                     // [DP][kL] own values
  float* Qt = Vt + DP * kL;                     // [DP][kL] streamed queries
  float* dAt = Qt + DP * kL;                    // [DP][kL]
  float* Qs = dAt + DP * kL;                    // [64][DP]
  float* dAs = Qs + kB * DP;                    // [64][DP]
  float* Ps = dAs + kB * DP;                    // [64 queries][kL]: w / r
  float* dSs = Ps + kB * kL;                    // [64 queries][kL]
  float* rinv_s = dSs + kB * kL;                // [64]
  float* dl_s = rinv_s + kB;                    // [64]
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
    float s[4][4] = {}, dp[4][4] = {};  // [key j][query i]
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
  DFM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      floats * static_cast<int>(sizeof(float))));
}

template <int DP>
void launch_fwd(GpuContext& ctx, const SigArgs& g) {
  static bool once = (set_smem(sigmoid_fwd_kernel<DP>, fwd_smem_floats<DP>()), true);
  (void)once;
  const int nb = (g.n + kB - 1) / kB;
  sigmoid_fwd_kernel<DP><<<nb, kThreads, fwd_smem_floats<DP>() * sizeof(float), ctx.stream()>>>(g);
  DFM_CUDA_LAUNCH_CHECK();
}

template <int DP>
void launch_bwd(GpuContext& ctx, const SigArgs& g) {
  static bool once = (set_smem(sigmoid_dq_kernel<DP>, dq_smem_floats<DP>()),
                      set_smem(sigmoid_dkv_kernel<DP>, dkv_smem_floats<DP>()), true);
  (void)once;
  const int nb = (g.n + kB - 1) / kB;
  // dK, dV first: the dQ kernel may then write dQ while every tile of Q is no longer needed
  sigmoid_dkv_kernel<DP><<<nb, kThreads, dkv_smem_floats<DP>() * sizeof(float), ctx.stream()>>>(g);
  DFM_CUDA_LAUNCH_CHECK();
  sigmoid_dq_kernel<DP><<<nb, kThreads, dq_smem_floats<DP>() * sizeof(float), ctx.stream()>>>(g);
  DFM_CUDA_LAUNCH_CHECK();
}

int padded_width(Index d) {
  DFM_CHECK(d >= 1 && d <= 64, "sigmoid attention on the GPU supports hidden widths 1 .. 64 (got ", d,
            "): use --device cpu or a smaller --hidden");
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
enum class Impl { mma, wmma, simt };
Impl impl_for(AttnPrecision prec) {
  const char* e = std::getenv("DIFFORMER_SIGMOID_IMPL");
  const bool fp32 = prec == AttnPrecision::fp32;
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

int sigmoid_attn_max_d() { return 64; }

void sigmoid_attn_fwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v, float* a,
                      float* rowsum, AttnPrecision prec) {
  if (dm.n == 0) return;
  DFM_CHECK(dm.n < (Index{1} << 31) - kB, "sigmoid attention: too many rows (", dm.n, ")");
  const int dp = padded_width(dm.d);
  const Impl impl = impl_for(prec);
  bool aligned = dm.d % 4 == 0 && aligned16(q, dm.heads * dm.d) && aligned16(k, dm.heads * dm.d) &&
                 aligned16(v, dm.vheads * dm.d);
  const std::size_t wbytes = tc_work_bytes(impl, prec, dm, dp, aligned);
  if (wbytes) ctx.ensure_scratch(wbytes + 256);
  ScratchScope scope(ctx);
  void* work = wbytes ? scope.take<unsigned char>(wbytes) : nullptr;
  for (int h = 0; h < dm.heads; ++h) {
    SigArgs g = head_args(dm, h, q, k, v);
    g.out_a = a + h * dm.d;
    g.rowsum = rowsum + h;
    if (impl != Impl::simt) {
      tc_any(impl, prec, dp, tc_args(g), nullptr, work, ctx.sms(), ctx.stream());
      continue;
    }
    if (dp == 16)
      launch_fwd<16>(ctx, g);
    else if (dp == 32)
      launch_fwd<32>(ctx, g);
    else
      launch_fwd<64>(ctx, g);
  }
}

void sigmoid_attn_bwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v,
                      const float* a, const float* rowsum, const float* da, Index da_ld, Index da_head_stride,
                      float da_scale, float* dq, float* dk, float* dv, float dv_beta, float* delta,
                      AttnPrecision prec) {
  if (dm.n == 0) return;
  const int dp = padded_width(dm.d);
  const Impl impl = impl_for(prec);
  bool aligned = dm.d % 4 == 0 && aligned16(q, dm.heads * dm.d) && aligned16(k, dm.heads * dm.d) &&
                 aligned16(v, dm.vheads * dm.d) && aligned16(da, da_ld) && da_head_stride % 4 == 0;
  const std::size_t wbytes = tc_work_bytes(impl, prec, dm, dp, aligned);
  if (wbytes) ctx.ensure_scratch(wbytes + 256);
  ScratchScope scope(ctx);
  void* work = wbytes ? scope.take<unsigned char>(wbytes) : nullptr;
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
    if (dp == 16)
      launch_bwd<16>(ctx, g);
    else if (dp == 32)
      launch_bwd<32>(ctx, g);
    else
      launch_bwd<64>(ctx, g);
  }
}

}  // namespace dfm::cuda
