// DIFFormer-a (sigmoid) attention on the tensor cores, flash-style: the kernels of
// src/ops/cuda/attn_sigmoid.cu for precision tf32 and bf16 (and, as three TF32 products with the
// operands split hi + lo, for fp32: "3xTF32", about fp32's accuracy). Self-contained (CUDA
// headers only) so that the scratchpad dev/cuda/attn_sigmoid_v2.cu includes this very file.
//
// One head per launch. Semantics (ref::sigmoid_attn_fwd / _bwd in src/ops/ref/reference.cpp):
//   w_ij = sigmoid(q_i . k_j), r_i = sum_j w_ij, A_i = sum_j w_ij v_j / r_i
//   backward, delta_i = dA_i . A_i:  dS_ij = w_ij (1 - w_ij) (dA_i . v_j - delta_i) / r_i
//   dQ_i = sum_j dS_ij k_j,  dK_j = sum_i dS_ij q_i,  dV_j = sum_i (w_ij / r_i) dA_i
// A block of 4 warps owns 64 rows (queries forward and for dQ, keys for dK/dV) and streams the
// other side through shared memory in tiles of 64; each warp owns 16 of the rows. Every product
// is a warp-level WMMA (bf16 m16n16k16, tf32 m16n16k8) with fp32 accumulators; the score tile
// goes through a per-warp fp32 shared buffer for the element-wise part (sigmoid, the row sum r_i
// accumulated in fp32 registers, dS), whose result feeds the second product in the operand type.
// Operands are converted (rounded) once per tile load; the widths d < DP are zero-padded (exact).
// Padded keys get w = 0; padded queries get 1/r = 0 (no contribution to dK, dV).
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace dfm::cuda::sigtc {

enum Mode : int { kBF16 = 0, kTF32 = 1, kTF32x3 = 2 };

struct Args {  // one head; row strides in floats
  const float *q = nullptr, *k = nullptr, *v = nullptr, *a = nullptr, *da = nullptr;
  const float *rowsum_in = nullptr, *delta = nullptr;
  long long ldq = 0, ldk = 0, ldv = 0, lda = 0, ldda = 0, ldr = 0;  // ldr: stride of rowsum/delta
  float da_scale = 1.0f;
  int n = 0, d = 0;
  float *out_a = nullptr, *rowsum = nullptr;
  float *dq = nullptr, *dk = nullptr, *dv = nullptr;  // written with strides ldq, ldk, ldv
  float dv_beta = 0.0f;
  // mma kernels: where the tiles are copied from (cp.async, 16-byte chunks): q, k, v, da themselves
  // (fp32, d = DP, 16-byte aligned rows) or packed [n][DP] copies in the operand type (setup_sources)
  const void *sq = nullptr, *sk = nullptr, *sv = nullptr, *sda = nullptr;
  long long sldq = 0, sldk = 0, sldv = 0, sldda = 0;  // in elements
};

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBR = 16 * kWarps;  // rows owned by a block
constexpr int kBC = 64;           // rows of a streamed tile
constexpr int kLS = kBC + 8;      // leading dimension of the per-warp 16 x 64 score buffers

using namespace nvcuda;

template <int M>
struct Tr;
template <>
struct Tr<kBF16> {
  using T = __nv_bfloat16;
  static constexpr int K = 16, PAD = 8;
  using FA = wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major>;
  template <class L>
  using FB = wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, L>;
  using FC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
};
template <>
struct Tr<kTF32> {
  using T = float;
  static constexpr int K = 8, PAD = 4;
  using FA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  template <class L>
  using FB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, L>;
  using FC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
};
template <>
struct Tr<kTF32x3> : Tr<kTF32> {};

template <int M, int DP>
struct Geo {
  using T = typename Tr<M>::T;
  static constexpr int LDT = DP + Tr<M>::PAD;                         // tile leading dimension
  static constexpr int tile = kBR * LDT * static_cast<int>(sizeof(T));  // bytes, multiple of 128
  static constexpr int sbuf = 16 * kLS * 4;                           // per-warp fp32 buffer
  static constexpr int tbuf = M == kBF16 ? 16 * kLS * 2 : 0;          // per-warp operand buffer (bf16)
  static constexpr int fwd_bytes = 3 * tile + kWarps * (sbuf + tbuf);
  static constexpr int dq_bytes = 4 * tile + kWarps * (2 * sbuf + tbuf);
  static constexpr int dkv_bytes = 4 * tile + 2 * kBR * 4 + kWarps * 2 * (sbuf + tbuf);
  static_assert(kBR == kBC, "the kernels load both sides with the same tile loader");
};

__device__ __forceinline__ float sigm(float s) { return 1.0f / (1.0f + __expf(-s)); }
// fast: __expf and an approximate division (bf16, tf32); accurate: expf and IEEE division (fp32)
template <bool Accurate>
__device__ __forceinline__ float sigm2(float s) {
  if constexpr (Accurate)
    return 1.0f / (1.0f + expf(-s));
  else
    return __fdividef(1.0f, 1.0f + __expf(-s));
}

__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid) {  // zero-fills when !valid
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int sz = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(sz) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// rows row0 .. row0 + ROWS - 1 of src ([.][ld] of T, DP valid columns, 16-byte aligned rows) into
// dst [ROWS][L], asynchronously; rows >= n zero-filled
template <int DP, int ROWS, int NT, class T>
__device__ __forceinline__ void cp_rows(T* dst, int L, const T* src, long long ld, int row0, int n) {
  constexpr int E = 16 / static_cast<int>(sizeof(T)), CH = DP / E;
#pragma unroll 4
  for (int e = threadIdx.x; e < ROWS * CH; e += NT) {
    const int r = e / CH, c = e % CH, gr = row0 + r;
    const bool ok = gr < n;
    cp16(dst + r * L + c * E, src + (ok ? static_cast<long long>(gr) * ld : 0) + c * E, ok);
  }
}

__device__ __forceinline__ void store4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(__nv_bfloat16* p, float a, float b, float c, float d) {
  __nv_bfloat162 lo = __floats2bfloat162_rn(a, b), hi = __floats2bfloat162_rn(c, d);
  uint2 u;
  u.x = *reinterpret_cast<unsigned*>(&lo);
  u.y = *reinterpret_cast<unsigned*>(&hi);
  *reinterpret_cast<uint2*>(p) = u;
}

// rows row0 .. row0 + ROWS - 1 of src (d valid columns) into dst [ROWS][ldt] as T, times scale,
// by NT threads; zeros outside. float4 loads when every row is 16-byte aligned and full.
template <int DP, int ROWS, int NT, class T>
__device__ __forceinline__ void load_rows(T* dst, int ldt, const float* __restrict__ src, long long ld, int row0,
                                          int n, int d, float scale) {
  constexpr int C4 = DP / 4;
  const bool vec = d == DP && (ld & 3) == 0 && (reinterpret_cast<std::uintptr_t>(src) & 15) == 0;
#pragma unroll 4
  for (int e = threadIdx.x; e < ROWS * C4; e += NT) {
    const int r = e / C4, c = (e % C4) * 4, gr = row0 + r;
    float x0 = 0.0f, x1 = 0.0f, x2 = 0.0f, x3 = 0.0f;
    if (gr < n) {
      const float* p = src + static_cast<long long>(gr) * ld + c;
      if (vec) {
        const float4 x = __ldg(reinterpret_cast<const float4*>(p));
        x0 = x.x, x1 = x.y, x2 = x.z, x3 = x.w;
      } else {
        if (c < d) x0 = __ldg(p);
        if (c + 1 < d) x1 = __ldg(p + 1);
        if (c + 2 < d) x2 = __ldg(p + 2);
        if (c + 3 < d) x3 = __ldg(p + 3);
      }
    }
    store4(dst + r * ldt + c, scale * x0, scale * x1, scale * x2, scale * x3);
  }
}
template <int DP, class T>
__device__ __forceinline__ void load_tile(T* dst, int ldt, const float* __restrict__ src, long long ld, int row0,
                                          int n, int d, float scale) {
  load_rows<DP, kBR, kThreads>(dst, ldt, src, ld, row0, n, d, scale);
}

template <class F>
__device__ __forceinline__ void to_tf32(F& f) {
#pragma unroll
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}
template <class F>
__device__ __forceinline__ void split_tf32(F& hi, F& lo) {  // hi holds x on entry
#pragma unroll
  for (int i = 0; i < hi.num_elements; ++i) {
    const float x = hi.x[i], h = wmma::__float_to_tf32(x);
    hi.x[i] = h;
    lo.x[i] = wmma::__float_to_tf32(x - h);
  }
}

// c[f] += A[16 x KD] B[KD x 16 NF] for one warp: A row-major at a (ld lda); B[k][n] at
// b[k*ldb + n] (RowB) or b[n*ldb + k] (!RowB: B is a row-major tile used transposed).
template <int M, int NF, int KD, bool RowB>
__device__ __forceinline__ void warp_mma(typename Tr<M>::FC (&c)[NF], const typename Tr<M>::T* a, int lda,
                                         const typename Tr<M>::T* b, int ldb) {
  using R = Tr<M>;
  using L = std::conditional_t<RowB, wmma::row_major, wmma::col_major>;
  using FB = typename R::template FB<L>;
#pragma unroll
  for (int kk = 0; kk < KD; kk += R::K) {
    typename R::FA fa;
    wmma::load_matrix_sync(fa, a + kk, lda);
    if constexpr (M == kBF16) {
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        FB fb;
        wmma::load_matrix_sync(fb, RowB ? b + kk * ldb + f * 16 : b + f * 16 * ldb + kk, ldb);
        wmma::mma_sync(c[f], fa, fb, c[f]);
      }
    } else if constexpr (M == kTF32) {
      to_tf32(fa);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        FB fb;
        wmma::load_matrix_sync(fb, RowB ? b + kk * ldb + f * 16 : b + f * 16 * ldb + kk, ldb);
        to_tf32(fb);
        wmma::mma_sync(c[f], fa, fb, c[f]);
      }
    } else {
      typename R::FA fal;
      split_tf32(fa, fal);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        FB fb, fbl;
        wmma::load_matrix_sync(fb, RowB ? b + kk * ldb + f * 16 : b + f * 16 * ldb + kk, ldb);
        split_tf32(fb, fbl);
        wmma::mma_sync(c[f], fal, fb, c[f]);
        wmma::mma_sync(c[f], fa, fbl, c[f]);
        wmma::mma_sync(c[f], fa, fb, c[f]);
      }
    }
  }
}

template <class FC, int NF>
__device__ __forceinline__ void zero(FC (&c)[NF]) {
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::fill_fragment(c[f], 0.0f);
}
template <class FC, int NF>
__device__ __forceinline__ void store_frags(float* p, FC (&c)[NF]) {  // [16][kLS] fp32
#pragma unroll
  for (int f = 0; f < NF; ++f) wmma::store_matrix_sync(p + f * 16, c[f], kLS, wmma::mem_row_major);
}

// The element-wise passes: lane owns row er = lane / 2 of its warp's 16 x 64 buffer, columns
// ec + 8 t (t < 8) with ec = 4 (lane % 2), as float4s (conflict-free with kLS = 72).

// Forward, one block per 64 queries.
template <int M, int DP>
__global__ void __launch_bounds__(kThreads) fwd_kernel(Args g) {
  using R = Tr<M>;
  using T = typename R::T;
  using G = Geo<M, DP>;
  extern __shared__ __align__(128) unsigned char sm[];
  T* Qs = reinterpret_cast<T*>(sm);
  T* Ks = reinterpret_cast<T*>(sm + G::tile);
  T* Vs = reinterpret_cast<T*>(sm + 2 * G::tile);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* Sw = reinterpret_cast<float*>(sm + 3 * G::tile + warp * G::sbuf);
  T* Pw = M == kBF16 ? reinterpret_cast<T*>(sm + 3 * G::tile + kWarps * G::sbuf + warp * G::tbuf)
                     : reinterpret_cast<T*>(Sw);  // fp32 operands: in place
  const int q0 = blockIdx.x * kBR, n = g.n;
  const int er = lane >> 1, ec = (lane & 1) * 4;
  load_tile<DP>(Qs, G::LDT, g.q, g.ldq, q0, n, g.d, 1.0f);
  typename R::FC o[DP / 16];
  zero(o);
  float rs = 0.0f;
  for (int k0 = 0; k0 < n; k0 += kBC) {
    __syncthreads();
    load_tile<DP>(Ks, G::LDT, g.k, g.ldk, k0, n, g.d, 1.0f);
    load_tile<DP>(Vs, G::LDT, g.v, g.ldv, k0, n, g.d, 1.0f);
    __syncthreads();
    {
      typename R::FC s[kBC / 16];
      zero(s);
      warp_mma<M, kBC / 16, DP, false>(s, Qs + warp * 16 * G::LDT, G::LDT, Ks, G::LDT);
      store_frags(Sw, s);
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kBC / 8; ++t) {
      const int c = ec + 8 * t;
      const float4 x = *reinterpret_cast<const float4*>(Sw + er * kLS + c);
      const int left = n - k0 - c;  // valid keys from column c on
      const float w0 = left > 0 ? sigm(x.x) : 0.0f, w1 = left > 1 ? sigm(x.y) : 0.0f;
      const float w2 = left > 2 ? sigm(x.z) : 0.0f, w3 = left > 3 ? sigm(x.w) : 0.0f;
      rs += (w0 + w1) + (w2 + w3);
      store4(Pw + er * kLS + c, w0, w1, w2, w3);
    }
    __syncwarp();
    warp_mma<M, DP / 16, kBC, true>(o, Pw, kLS, Vs, G::LDT);
  }
  rs += __shfl_xor_sync(0xffffffffu, rs, 1);
  __syncwarp();
  store_frags(Sw, o);
  __syncwarp();
  const int r = q0 + warp * 16 + er;
  if (r < n) {
    const float inv = 1.0f / rs;
    float* out = g.out_a + static_cast<long long>(r) * g.lda;
#pragma unroll
    for (int t = 0; t < DP / 8; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = ec + 8 * t + i;
        if (c < g.d) out[c] = Sw[er * kLS + c] * inv;
      }
    if (ec == 0) g.rowsum[static_cast<long long>(r) * g.ldr] = rs;
  }
}

// dQ, one block per 64 queries.
template <int M, int DP>
__global__ void __launch_bounds__(kThreads) dq_kernel(Args g) {
  using R = Tr<M>;
  using T = typename R::T;
  using G = Geo<M, DP>;
  extern __shared__ __align__(128) unsigned char sm[];
  T* Qs = reinterpret_cast<T*>(sm);
  T* dAs = reinterpret_cast<T*>(sm + G::tile);
  T* Ks = reinterpret_cast<T*>(sm + 2 * G::tile);
  T* Vs = reinterpret_cast<T*>(sm + 3 * G::tile);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* Sw = reinterpret_cast<float*>(sm + 4 * G::tile + warp * 2 * G::sbuf);
  float* dPw = Sw + 16 * kLS;
  T* dSw = M == kBF16 ? reinterpret_cast<T*>(sm + 4 * G::tile + kWarps * 2 * G::sbuf + warp * G::tbuf)
                      : reinterpret_cast<T*>(dPw);
  const int q0 = blockIdx.x * kBR, n = g.n;
  const int er = lane >> 1, ec = (lane & 1) * 4;
  load_tile<DP>(Qs, G::LDT, g.q, g.ldq, q0, n, g.d, 1.0f);
  load_tile<DP>(dAs, G::LDT, g.da, g.ldda, q0, n, g.d, g.da_scale);
  const int r = q0 + warp * 16 + er;
  const float rinv = r < n ? 1.0f / g.rowsum_in[static_cast<long long>(r) * g.ldr] : 0.0f;
  const float dl = r < n ? g.delta[static_cast<long long>(r) * g.ldr] : 0.0f;
  typename R::FC acc[DP / 16];
  zero(acc);
  for (int k0 = 0; k0 < n; k0 += kBC) {
    __syncthreads();
    load_tile<DP>(Ks, G::LDT, g.k, g.ldk, k0, n, g.d, 1.0f);
    load_tile<DP>(Vs, G::LDT, g.v, g.ldv, k0, n, g.d, 1.0f);
    __syncthreads();
    {
      typename R::FC s[kBC / 16];
      zero(s);
      warp_mma<M, kBC / 16, DP, false>(s, Qs + warp * 16 * G::LDT, G::LDT, Ks, G::LDT);
      store_frags(Sw, s);
    }
    {
      typename R::FC p[kBC / 16];
      zero(p);
      warp_mma<M, kBC / 16, DP, false>(p, dAs + warp * 16 * G::LDT, G::LDT, Vs, G::LDT);
      store_frags(dPw, p);
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kBC / 8; ++t) {
      const int c = ec + 8 * t;
      const float4 x = *reinterpret_cast<const float4*>(Sw + er * kLS + c);
      const float4 y = *reinterpret_cast<const float4*>(dPw + er * kLS + c);
      const int left = n - k0 - c;
      float w;
      w = left > 0 ? sigm(x.x) : 0.0f;
      const float d0 = w * (1.0f - w) * (y.x - dl) * rinv;
      w = left > 1 ? sigm(x.y) : 0.0f;
      const float d1 = w * (1.0f - w) * (y.y - dl) * rinv;
      w = left > 2 ? sigm(x.z) : 0.0f;
      const float d2 = w * (1.0f - w) * (y.z - dl) * rinv;
      w = left > 3 ? sigm(x.w) : 0.0f;
      const float d3 = w * (1.0f - w) * (y.w - dl) * rinv;
      store4(dSw + er * kLS + c, d0, d1, d2, d3);
    }
    __syncwarp();
    warp_mma<M, DP / 16, kBC, true>(acc, dSw, kLS, Ks, G::LDT);
  }
  __syncwarp();
  store_frags(Sw, acc);
  __syncwarp();
  if (r < n) {
    float* out = g.dq + static_cast<long long>(r) * g.ldq;
#pragma unroll
    for (int t = 0; t < DP / 8; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = ec + 8 * t + i;
        if (c < g.d) out[c] = Sw[er * kLS + c];
      }
  }
}

// dK, dV, one block per 64 keys (the same tiles transposed: rows are keys, columns queries).
template <int M, int DP>
__global__ void __launch_bounds__(kThreads) dkv_kernel(Args g) {
  using R = Tr<M>;
  using T = typename R::T;
  using G = Geo<M, DP>;
  extern __shared__ __align__(128) unsigned char sm[];
  T* Ks = reinterpret_cast<T*>(sm);
  T* Vs = reinterpret_cast<T*>(sm + G::tile);
  T* Qs = reinterpret_cast<T*>(sm + 2 * G::tile);
  T* dAs = reinterpret_cast<T*>(sm + 3 * G::tile);
  float* rinv_s = reinterpret_cast<float*>(sm + 4 * G::tile);
  float* dl_s = rinv_s + kBR;
  unsigned char* wbase = sm + 4 * G::tile + 2 * kBR * 4;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* Sw = reinterpret_cast<float*>(wbase + warp * 2 * G::sbuf);
  float* dPw = Sw + 16 * kLS;
  T* Pw = M == kBF16 ? reinterpret_cast<T*>(wbase + kWarps * 2 * G::sbuf + warp * 2 * G::tbuf)
                     : reinterpret_cast<T*>(Sw);
  T* dSw = M == kBF16 ? Pw + 16 * kLS : reinterpret_cast<T*>(dPw);
  const int k0 = blockIdx.x * kBR, n = g.n;
  const int er = lane >> 1, ec = (lane & 1) * 4;
  load_tile<DP>(Ks, G::LDT, g.k, g.ldk, k0, n, g.d, 1.0f);
  load_tile<DP>(Vs, G::LDT, g.v, g.ldv, k0, n, g.d, 1.0f);
  typename R::FC dk[DP / 16], dv[DP / 16];
  zero(dk);
  zero(dv);
  for (int q0 = 0; q0 < n; q0 += kBC) {
    __syncthreads();
    load_tile<DP>(Qs, G::LDT, g.q, g.ldq, q0, n, g.d, 1.0f);
    load_tile<DP>(dAs, G::LDT, g.da, g.ldda, q0, n, g.d, g.da_scale);
    if (threadIdx.x < kBC) {
      const int r = q0 + threadIdx.x;
      rinv_s[threadIdx.x] = r < n ? 1.0f / g.rowsum_in[static_cast<long long>(r) * g.ldr] : 0.0f;
      dl_s[threadIdx.x] = r < n ? g.delta[static_cast<long long>(r) * g.ldr] : 0.0f;
    }
    __syncthreads();
    {
      typename R::FC s[kBC / 16];
      zero(s);
      warp_mma<M, kBC / 16, DP, false>(s, Ks + warp * 16 * G::LDT, G::LDT, Qs, G::LDT);
      store_frags(Sw, s);
    }
    {
      typename R::FC p[kBC / 16];
      zero(p);
      warp_mma<M, kBC / 16, DP, false>(p, Vs + warp * 16 * G::LDT, G::LDT, dAs, G::LDT);
      store_frags(dPw, p);
    }
    __syncwarp();
#pragma unroll
    for (int t = 0; t < kBC / 8; ++t) {
      const int c = ec + 8 * t;
      const float4 x = *reinterpret_cast<const float4*>(Sw + er * kLS + c);
      const float4 y = *reinterpret_cast<const float4*>(dPw + er * kLS + c);
      const float4 ri = *reinterpret_cast<const float4*>(rinv_s + c);
      const float4 dl = *reinterpret_cast<const float4*>(dl_s + c);
      const float w0 = sigm(x.x), w1 = sigm(x.y), w2 = sigm(x.z), w3 = sigm(x.w);
      store4(Pw + er * kLS + c, w0 * ri.x, w1 * ri.y, w2 * ri.z, w3 * ri.w);
      store4(dSw + er * kLS + c, w0 * (1.0f - w0) * (y.x - dl.x) * ri.x, w1 * (1.0f - w1) * (y.y - dl.y) * ri.y,
             w2 * (1.0f - w2) * (y.z - dl.z) * ri.z, w3 * (1.0f - w3) * (y.w - dl.w) * ri.w);
    }
    __syncwarp();
    warp_mma<M, DP / 16, kBC, true>(dv, Pw, kLS, dAs, G::LDT);
    warp_mma<M, DP / 16, kBC, true>(dk, dSw, kLS, Qs, G::LDT);
  }
  __syncwarp();
  store_frags(Sw, dk);
  store_frags(dPw, dv);
  __syncwarp();
  const int r = k0 + warp * 16 + er;
  if (r < n) {
    float* okk = g.dk + static_cast<long long>(r) * g.ldk;
    float* ov = g.dv + static_cast<long long>(r) * g.ldv;
#pragma unroll
    for (int t = 0; t < DP / 8; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = ec + 8 * t + i;
        if (c < g.d) {
          okk[c] = Sw[er * kLS + c];
          const float x = dPw[er * kLS + c];
          ov[c] = g.dv_beta == 0.0f ? x : x + g.dv_beta * ov[c];
        }
      }
  }
}

// delta_i = dA_i . A_i (dA scaled), one warp per row
__global__ void delta_kernel(Args g, float* delta) {
  const int lane = threadIdx.x & 31;
  const long long nwarps = (static_cast<long long>(gridDim.x) * blockDim.x) >> 5;
  for (long long i = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) >> 5; i < g.n; i += nwarps) {
    float s = 0.0f;
    for (int c = lane; c < g.d; c += 32) s += g.da_scale * g.da[i * g.ldda + c] * g.a[i * g.lda + c];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) delta[i * g.ldr] = s;
  }
}

// ---- sources of the cp.async tiles (mma kernels) ----------------------------------------------------
template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <class T>
__global__ void pack_kernel(T* dst, int dp, const float* __restrict__ src, long long ld, int n, int d) {
  const long long total = static_cast<long long>(n) * dp;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = e / dp;
    const int c = static_cast<int>(e % dp);
    dst[e] = from_float<T>(c < d ? src[r * ld + c] : 0.0f);
  }
}
// elements of T that setup_sources may use (q, k, v and dA packed)
inline long long work_elems(long long n, int dp) { return 4 * n * dp; }
// Points g.sq, g.sk, g.sv (and g.sda) at the tiles' sources: the fp32 inputs themselves where they
// are full aligned [n][DP] rows, else packed [n][DP] copies in work (zero-padded, converted to T).
template <class T, int DP>
inline void setup_sources(Args& g, T* work, bool with_da, int sms, cudaStream_t st) {
  int slot = 0;
  auto one = [&](const float* p, long long ld, const void*& s, long long& sld) {
    if (std::is_same_v<T, float> && g.d == DP && ld % 4 == 0 && reinterpret_cast<std::uintptr_t>(p) % 16 == 0) {
      s = p, sld = ld;
      return;
    }
    T* dst = work + static_cast<long long>(slot++) * g.n * DP;
    const long long want = (static_cast<long long>(g.n) * DP + 255) / 256;
    const int blocks = static_cast<int>(want < 8LL * sms ? (want < 1 ? 1 : want) : 8LL * sms);
    pack_kernel<T><<<blocks, 256, 0, st>>>(dst, DP, p, ld, g.n, g.d);
    s = dst, sld = DP;
  };
  one(g.q, g.ldq, g.sq, g.sldq);
  one(g.k, g.ldk, g.sk, g.sldk);
  one(g.v, g.ldv, g.sv, g.sldv);
  if (with_da) one(g.da, g.ldda, g.sda, g.sldda);
}
// delta = dA . A with dA unscaled (the mma kernels scale their outputs by da_scale); sets g.delta
inline void launch_delta(Args& g, float* delta, int sms, cudaStream_t st) {
  Args u = g;
  u.da_scale = 1.0f;
  const long long want = (static_cast<long long>(g.n) + 7) / 8;
  const int db = static_cast<int>(want < 16LL * sms ? (want < 1 ? 1 : want) : 16LL * sms);
  delta_kernel<<<db, 256, 0, st>>>(u, delta);
  g.delta = delta;
}

// ---- host-side launchers (one head) ---------------------------------------------------------------
template <int M, int DP>
inline cudaError_t prepare() {
  cudaError_t e = cudaFuncSetAttribute(fwd_kernel<M, DP>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Geo<M, DP>::fwd_bytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(dq_kernel<M, DP>, cudaFuncAttributeMaxDynamicSharedMemorySize, Geo<M, DP>::dq_bytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(dkv_kernel<M, DP>, cudaFuncAttributeMaxDynamicSharedMemorySize, Geo<M, DP>::dkv_bytes);
  return e;
}

template <int M, int DP>
inline void launch_fwd(const Args& g, cudaStream_t st) {
  static const cudaError_t once = prepare<M, DP>();
  (void)once;
  const int nb = (g.n + kBR - 1) / kBR;
  fwd_kernel<M, DP><<<nb, kThreads, Geo<M, DP>::fwd_bytes, st>>>(g);
}
// delta must hold n floats at stride g.ldr (it is g.delta once filled)
template <int M, int DP>
inline void launch_bwd(Args g, float* delta, int sms, cudaStream_t st) {
  static const cudaError_t once = prepare<M, DP>();
  (void)once;
  const long long want = (static_cast<long long>(g.n) + 7) / 8;
  const int db = static_cast<int>(want < 16LL * sms ? (want < 1 ? 1 : want) : 16LL * sms);
  delta_kernel<<<db, 256, 0, st>>>(g, delta);
  g.delta = delta;
  const int nb = (g.n + kBR - 1) / kBR;
  // dK, dV first: dq may alias q (the dQ kernel reads only its own tile of Q, before writing it)
  dkv_kernel<M, DP><<<nb, kThreads, Geo<M, DP>::dkv_bytes, st>>>(g);
  dq_kernel<M, DP><<<nb, kThreads, Geo<M, DP>::dq_bytes, st>>>(g);
}

}  // namespace dfm::cuda::sigtc

// ---- bf16 with mma.sync, the score tile kept in registers (FlashAttention-2 layout) -------------
// Same semantics, tiles and block shapes as above; each warp's 16 x 64 score tile lives in the
// m16n8k16 accumulator fragments, the sigmoid / row sum / dS are applied there, and the result is
// repacked in registers as the A operand of the second product (no shared-memory round trip).
// Operands that feed a product's n side come from shared memory: 32-bit loads where the tile's
// rows are the n index, ldmatrix.trans where they are the k index.
namespace dfm::cuda::sigmma {

using sigtc::Args;
constexpr int kBC = 64;  // rows of a streamed tile; a block of W warps owns 16 W rows
constexpr int kDefaultWarps = 8;

// Shared memory: the block's own rows (one or two [16 W][L] tiles), then two stages of the
// streamed tiles (cp.async double buffering: tile i + 1 is in flight while tile i is used).
template <int DP, int W = 4>
struct Geo {
  static constexpr int L = DP + 8;          // bf16 leading dimension (conflict-free)
  static constexpr int tile = kBC * L * 2;  // bytes of a streamed tile
  static constexpr int own = 16 * W * L * 2;
  static constexpr int fwd_bytes = own + 4 * tile;
  static constexpr int dq_bytes = 2 * own + 4 * tile;
  static constexpr int dkv_bytes = 2 * own + 4 * tile + 4 * kBC * 4;
};

__device__ __forceinline__ std::uint32_t pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<std::uint32_t*>(&v);
}
__device__ __forceinline__ std::uint32_t lds32(const __nv_bfloat16* p) {
  return *reinterpret_cast<const std::uint32_t*>(p);
}
__device__ __forceinline__ void mma(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void ldsm_x4_t(std::uint32_t& r0, std::uint32_t& r1, std::uint32_t& r2, std::uint32_t& r3,
                                          const __nv_bfloat16* p) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(a)
               : "memory");
}

// A fragments (16 rows from x, row-major, ld L) for every k chunk of 16 columns
template <int DP>
__device__ __forceinline__ void load_a(std::uint32_t (&a)[DP / 16][4], const __nv_bfloat16* x, int lane) {
  constexpr int L = Geo<DP>::L;
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int kc = 0; kc < DP / 16; ++kc) {
    a[kc][0] = lds32(x + gq * L + kc * 16 + 2 * tq);
    a[kc][1] = lds32(x + (gq + 8) * L + kc * 16 + 2 * tq);
    a[kc][2] = lds32(x + gq * L + kc * 16 + 8 + 2 * tq);
    a[kc][3] = lds32(x + (gq + 8) * L + kc * 16 + 8 + 2 * tq);
  }
}
// c[j] += A (16 x DP) B for the 8 n-tiles of a 64-row tile y whose rows are the n index
template <int DP>
__device__ __forceinline__ void mma_rows(float (&c)[8][4], const std::uint32_t (&a)[DP / 16][4],
                                         const __nv_bfloat16* y, int lane) {
  constexpr int L = Geo<DP>::L;
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int kc = 0; kc < DP / 16; ++kc)
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const __nv_bfloat16* p = y + (j * 8 + gq) * L + kc * 16 + 2 * tq;
      mma(c[j], a[kc], lds32(p), lds32(p + 8));
    }
}
// c[.] (16 x DP) += P (16 x 64, the fragments s, packed to bf16) Y (64 x DP, tile rows = k index)
template <int DP>
__device__ __forceinline__ void mma_cols(float (&c)[DP / 8][4], const float (&s)[8][4], const __nv_bfloat16* y,
                                         int lane) {
  constexpr int L = Geo<DP>::L;
#pragma unroll
  for (int kc = 0; kc < 4; ++kc) {
    const std::uint32_t a[4] = {pack(s[2 * kc][0], s[2 * kc][1]), pack(s[2 * kc][2], s[2 * kc][3]),
                                pack(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
    for (int np = 0; np < DP / 16; ++np) {
      std::uint32_t b0, b1, b2, b3;
      ldsm_x4_t(b0, b1, b2, b3, y + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * L + np * 16 + (lane >> 4) * 8);
      mma(c[2 * np], a, b0, b1);
      mma(c[2 * np + 1], a, b2, b3);
    }
  }
}
// rows r0 = row0 + gq and r0 + 8 of out (ld) from the fragments c, times s0 / s1; beta: out += beta * old
template <int DP>
__device__ __forceinline__ void store_rows(float* out, long long ld, int row0, int n, int d, const float (&c)[DP / 8][4],
                                           float s0, float s1, float beta, int lane) {
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = row0 + gq + 8 * h;
    if (r >= n) continue;
    float* o = out + static_cast<long long>(r) * ld;
    const float sc = h ? s1 : s0;
#pragma unroll
    for (int j = 0; j < DP / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = j * 8 + 2 * tq + e;
        if (col < d) {
          const float x = c[j][2 * h + e] * sc;
          o[col] = beta == 0.0f ? x : x + beta * o[col];
        }
      }
  }
}

template <int DP, int W>
__global__ void __launch_bounds__(32 * W) fwd_kernel(Args g) {
  using bf = __nv_bfloat16;
  constexpr int L = Geo<DP>::L, NT = 32 * W;
  extern __shared__ __align__(128) unsigned char sm[];
  bf* Qs = reinterpret_cast<bf*>(sm);
  bf* St = Qs + 16 * W * L;  // stage s: K at St + 2 s kBC L, V after it
  const bf* sk = static_cast<const bf*>(g.sk);
  const bf* sv = static_cast<const bf*>(g.sv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int q0 = blockIdx.x * 16 * W, n = g.n, nt = (n + kBC - 1) / kBC;
  sigtc::cp_rows<DP, 16 * W, NT>(Qs, L, static_cast<const bf*>(g.sq), g.sldq, q0, n);
  sigtc::cp_rows<DP, kBC, NT>(St, L, sk, g.sldk, 0, n);
  sigtc::cp_rows<DP, kBC, NT>(St + kBC * L, L, sv, g.sldv, 0, n);
  sigtc::cp_commit();
  std::uint32_t qa[DP / 16][4];
  float o[DP / 8][4] = {};
  float rs0 = 0.0f, rs1 = 0.0f;
  for (int it = 0; it < nt; ++it) {
    if (it + 1 < nt) {
      bf* nx = St + ((it + 1) & 1) * 2 * kBC * L;
      sigtc::cp_rows<DP, kBC, NT>(nx, L, sk, g.sldk, (it + 1) * kBC, n);
      sigtc::cp_rows<DP, kBC, NT>(nx + kBC * L, L, sv, g.sldv, (it + 1) * kBC, n);
    }
    sigtc::cp_commit();
    sigtc::cp_wait<1>();
    __syncthreads();
    if (it == 0) load_a<DP>(qa, Qs + warp * 16 * L, lane);
    const bf* Ks = St + (it & 1) * 2 * kBC * L;
    const bf* Vs = Ks + kBC * L;
    const int k0 = it * kBC;
    float s[8][4] = {};
    mma_rows<DP>(s, qa, Ks, lane);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[j][e] = k0 + j * 8 + 2 * tq + (e & 1) < n ? sigtc::sigm2<false>(s[j][e]) : 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) rs0 += s[j][0] + s[j][1], rs1 += s[j][2] + s[j][3];
    mma_cols<DP>(o, s, Vs, lane);
    __syncthreads();
  }
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    rs0 += __shfl_xor_sync(0xffffffffu, rs0, m);
    rs1 += __shfl_xor_sync(0xffffffffu, rs1, m);
  }
  const int row0 = q0 + warp * 16;
  store_rows<DP>(g.out_a, g.lda, row0, n, g.d, o, 1.0f / rs0, 1.0f / rs1, 0.0f, lane);
  if (tq == 0) {
    const int r = row0 + (lane >> 2);
    if (r < n) g.rowsum[static_cast<long long>(r) * g.ldr] = rs0;
    if (r + 8 < n) g.rowsum[static_cast<long long>(r + 8) * g.ldr] = rs1;
  }
}

// dQ from unscaled dA (sda), times g.da_scale at the end
template <int DP, int W>
__global__ void __launch_bounds__(32 * W) dq_kernel(Args g) {
  using bf = __nv_bfloat16;
  constexpr int L = Geo<DP>::L, NT = 32 * W;
  extern __shared__ __align__(128) unsigned char sm[];
  bf* Qs = reinterpret_cast<bf*>(sm);
  bf* dAs = Qs + 16 * W * L;
  bf* St = dAs + 16 * W * L;
  const bf* sk = static_cast<const bf*>(g.sk);
  const bf* sv = static_cast<const bf*>(g.sv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int q0 = blockIdx.x * 16 * W, n = g.n, nt = (n + kBC - 1) / kBC;
  sigtc::cp_rows<DP, 16 * W, NT>(Qs, L, static_cast<const bf*>(g.sq), g.sldq, q0, n);
  sigtc::cp_rows<DP, 16 * W, NT>(dAs, L, static_cast<const bf*>(g.sda), g.sldda, q0, n);
  sigtc::cp_rows<DP, kBC, NT>(St, L, sk, g.sldk, 0, n);
  sigtc::cp_rows<DP, kBC, NT>(St + kBC * L, L, sv, g.sldv, 0, n);
  sigtc::cp_commit();
  const int row0 = q0 + warp * 16, r0 = row0 + gq, r1 = r0 + 8;
  const float ri0 = r0 < n ? 1.0f / g.rowsum_in[static_cast<long long>(r0) * g.ldr] : 0.0f;
  const float ri1 = r1 < n ? 1.0f / g.rowsum_in[static_cast<long long>(r1) * g.ldr] : 0.0f;
  const float dl0 = r0 < n ? g.delta[static_cast<long long>(r0) * g.ldr] : 0.0f;
  const float dl1 = r1 < n ? g.delta[static_cast<long long>(r1) * g.ldr] : 0.0f;
  std::uint32_t qa[DP / 16][4], aa[DP / 16][4];
  float acc[DP / 8][4] = {};
  for (int it = 0; it < nt; ++it) {
    if (it + 1 < nt) {
      bf* nx = St + ((it + 1) & 1) * 2 * kBC * L;
      sigtc::cp_rows<DP, kBC, NT>(nx, L, sk, g.sldk, (it + 1) * kBC, n);
      sigtc::cp_rows<DP, kBC, NT>(nx + kBC * L, L, sv, g.sldv, (it + 1) * kBC, n);
    }
    sigtc::cp_commit();
    sigtc::cp_wait<1>();
    __syncthreads();
    if (it == 0) {
      load_a<DP>(qa, Qs + warp * 16 * L, lane);
      load_a<DP>(aa, dAs + warp * 16 * L, lane);
    }
    const bf* Ks = St + (it & 1) * 2 * kBC * L;
    const bf* Vs = Ks + kBC * L;
    const int k0 = it * kBC;
    float s[8][4] = {}, p[8][4] = {};
    mma_rows<DP>(s, qa, Ks, lane);
    mma_rows<DP>(p, aa, Vs, lane);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float w = k0 + j * 8 + 2 * tq + (e & 1) < n ? sigtc::sigm2<false>(s[j][e]) : 0.0f;
        s[j][e] = e < 2 ? w * (1.0f - w) * (p[j][e] - dl0) * ri0 : w * (1.0f - w) * (p[j][e] - dl1) * ri1;
      }
    mma_cols<DP>(acc, s, Ks, lane);
    __syncthreads();
  }
  store_rows<DP>(g.dq, g.ldq, row0, n, g.d, acc, g.da_scale, g.da_scale, 0.0f, lane);
}

template <int DP, int W>
__global__ void __launch_bounds__(32 * W) dkv_kernel(Args g) {
  using bf = __nv_bfloat16;
  constexpr int L = Geo<DP>::L, NT = 32 * W;
  extern __shared__ __align__(128) unsigned char sm[];
  bf* Ks = reinterpret_cast<bf*>(sm);
  bf* Vs = Ks + 16 * W * L;
  bf* St = Vs + 16 * W * L;                                    // stage s: Q, then dA
  float* sc = reinterpret_cast<float*>(St + 4 * kBC * L);      // stage s: 1/r at sc + 2 s kBC, delta after
  const bf* sq = static_cast<const bf*>(g.sq);
  const bf* sda = static_cast<const bf*>(g.sda);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int k0 = blockIdx.x * 16 * W, n = g.n, nt = (n + kBC - 1) / kBC;
  auto issue = [&](int t) {
    bf* nx = St + (t & 1) * 2 * kBC * L;
    sigtc::cp_rows<DP, kBC, NT>(nx, L, sq, g.sldq, t * kBC, n);
    sigtc::cp_rows<DP, kBC, NT>(nx + kBC * L, L, sda, g.sldda, t * kBC, n);
    if (threadIdx.x < kBC) {
      float* c = sc + (t & 1) * 2 * kBC;
      const int r = t * kBC + threadIdx.x;
      c[threadIdx.x] = r < n ? 1.0f / g.rowsum_in[static_cast<long long>(r) * g.ldr] : 0.0f;
      c[kBC + threadIdx.x] = r < n ? g.delta[static_cast<long long>(r) * g.ldr] : 0.0f;
    }
  };
  sigtc::cp_rows<DP, 16 * W, NT>(Ks, L, static_cast<const bf*>(g.sk), g.sldk, k0, n);
  sigtc::cp_rows<DP, 16 * W, NT>(Vs, L, static_cast<const bf*>(g.sv), g.sldv, k0, n);
  issue(0);
  sigtc::cp_commit();
  std::uint32_t ka[DP / 16][4], va[DP / 16][4];
  float dk[DP / 8][4] = {}, dv[DP / 8][4] = {};
  for (int it = 0; it < nt; ++it) {
    if (it + 1 < nt) issue(it + 1);
    sigtc::cp_commit();
    sigtc::cp_wait<1>();
    __syncthreads();
    if (it == 0) {
      load_a<DP>(ka, Ks + warp * 16 * L, lane);
      load_a<DP>(va, Vs + warp * 16 * L, lane);
    }
    const bf* Qs = St + (it & 1) * 2 * kBC * L;
    const bf* dAs = Qs + kBC * L;
    const float* rinv_s = sc + (it & 1) * 2 * kBC;
    const float* dl_s = rinv_s + kBC;
    float s[8][4] = {}, p[8][4] = {};
    mma_rows<DP>(s, ka, Qs, lane);
    mma_rows<DP>(p, va, dAs, lane);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 ri = *reinterpret_cast<const float2*>(rinv_s + j * 8 + 2 * tq);
      const float2 dl = *reinterpret_cast<const float2*>(dl_s + j * 8 + 2 * tq);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float r = (e & 1) ? ri.y : ri.x, l = (e & 1) ? dl.y : dl.x;
        const float w = sigtc::sigm2<false>(s[j][e]);
        s[j][e] = w * r;
        p[j][e] = w * (1.0f - w) * (p[j][e] - l) * r;
      }
    }
    mma_cols<DP>(dv, s, dAs, lane);
    mma_cols<DP>(dk, p, Qs, lane);
    __syncthreads();
  }
  const int row0 = k0 + warp * 16;
  store_rows<DP>(g.dk, g.ldk, row0, n, g.d, dk, g.da_scale, g.da_scale, 0.0f, lane);
  store_rows<DP>(g.dv, g.ldv, row0, n, g.d, dv, g.da_scale, g.da_scale, g.dv_beta, lane);
}

template <int DP, int W>
inline cudaError_t prepare() {
  cudaError_t e =
      cudaFuncSetAttribute(sigmma::fwd_kernel<DP, W>, cudaFuncAttributeMaxDynamicSharedMemorySize, Geo<DP, W>::fwd_bytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(sigmma::dq_kernel<DP, W>, cudaFuncAttributeMaxDynamicSharedMemorySize, Geo<DP, W>::dq_bytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(sigmma::dkv_kernel<DP, W>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Geo<DP, W>::dkv_bytes);
  return e;
}
// work: setup_sources' workspace, work_elems<__nv_bfloat16>(n, DP) elements
template <int DP, int W = kDefaultWarps>
inline void launch_fwd(Args g, __nv_bfloat16* work, int sms, cudaStream_t st) {
  static const cudaError_t once = prepare<DP, W>();
  (void)once;
  sigtc::setup_sources<__nv_bfloat16, DP>(g, work, false, sms, st);
  sigmma::fwd_kernel<DP, W><<<(g.n + 16 * W - 1) / (16 * W), 32 * W, Geo<DP, W>::fwd_bytes, st>>>(g);
}
template <int DP, int W = kDefaultWarps>
inline void launch_bwd(Args g, float* delta, __nv_bfloat16* work, int sms, cudaStream_t st) {
  static const cudaError_t once = prepare<DP, W>();
  (void)once;
  sigtc::launch_delta(g, delta, sms, st);
  sigtc::setup_sources<__nv_bfloat16, DP>(g, work, true, sms, st);
  const int nb = (g.n + 16 * W - 1) / (16 * W);
  sigmma::dkv_kernel<DP, W><<<nb, 32 * W, Geo<DP, W>::dkv_bytes, st>>>(g);
  sigmma::dq_kernel<DP, W><<<nb, 32 * W, Geo<DP, W>::dq_bytes, st>>>(g);
}

}  // namespace dfm::cuda::sigmma

// ---- tf32 and 3xTF32 with mma.sync.m16n8k8, the score tile kept in registers ---------------------
// As sigmma, with fp32 tiles in shared memory (rounded to tf32, or split hi + lo for 3xTF32, as the
// fragments are loaded). The accumulator of m16n8k8 holds keys 2t, 2t+1 of each 8-key tile where
// the A operand wants columns t, t+4: the second product simply sums over the keys in that order
// (A column t <-> key 2t, t+4 <-> 2t+1) and reads V's rows in the same order, so no shuffle.
namespace dfm::cuda::sigmma32 {

using sigtc::Args;
constexpr int kBC = 64;  // rows of a streamed tile; a block of W warps owns 16 W rows
constexpr int kDefaultWarps = 8;

template <int DP, int W = 4>
struct Geo {
  static constexpr int L = DP + 4;          // fp32 leading dimension (conflict-free fragment loads)
  static constexpr int tile = kBC * L * 4;  // bytes of a streamed tile
  static constexpr int own = 16 * W * L * 4;
  static constexpr int fwd_bytes = own + 4 * tile;
  static constexpr int dq_bytes = 2 * own + 4 * tile;
  static constexpr int dkv_bytes = 2 * own + 4 * tile + 4 * kBC * 4;
};

__device__ __forceinline__ std::uint32_t to_tf32(float x) {
  std::uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}
template <bool X3>
__device__ __forceinline__ void split(float x, std::uint32_t& h, std::uint32_t& l) {
  h = to_tf32(x);
  if constexpr (X3) l = to_tf32(x - __uint_as_float(h));
}
__device__ __forceinline__ void mma8(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// c += a b with a = ah (+ al), b = bh (+ bl): the small products first
template <bool X3>
__device__ __forceinline__ void mma3(float (&c)[4], const std::uint32_t (&ah)[4], const std::uint32_t (&al)[4],
                                     std::uint32_t bh0, std::uint32_t bh1, std::uint32_t bl0, std::uint32_t bl1) {
  if constexpr (X3) {
    mma8(c, al, bh0, bh1);
    mma8(c, ah, bl0, bl1);
  }
  mma8(c, ah, bh0, bh1);
}

// c[j] += A (16 rows at a, ld L) B for the 8 n-tiles of the 64-row tile y whose rows are the n index
template <bool X3, int DP>
__device__ __forceinline__ void mma_rows(float (&c)[8][4], const float* a, const float* y, int lane) {
  constexpr int L = Geo<DP>::L;
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int kc = 0; kc < DP / 8; ++kc) {
    std::uint32_t ah[4], al[4] = {};
    split<X3>(a[gq * L + kc * 8 + tq], ah[0], al[0]);
    split<X3>(a[(gq + 8) * L + kc * 8 + tq], ah[1], al[1]);
    split<X3>(a[gq * L + kc * 8 + tq + 4], ah[2], al[2]);
    split<X3>(a[(gq + 8) * L + kc * 8 + tq + 4], ah[3], al[3]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float* p = y + (j * 8 + gq) * L + kc * 8 + tq;
      std::uint32_t bh0, bh1, bl0 = 0, bl1 = 0;
      split<X3>(p[0], bh0, bl0);
      split<X3>(p[4], bh1, bl1);
      mma3<X3>(c[j], ah, al, bh0, bh1, bl0, bl1);
    }
  }
}
// c[.] (16 x DP) += P (16 x 64, the fragments s) Y (64 x DP, tile rows = k index, read in the
// permuted key order)
template <bool X3, int DP>
__device__ __forceinline__ void mma_cols(float (&c)[DP / 8][4], const float (&s)[8][4], const float* y, int lane) {
  constexpr int L = Geo<DP>::L;
  const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    std::uint32_t ah[4], al[4] = {};
    split<X3>(s[j][0], ah[0], al[0]);
    split<X3>(s[j][2], ah[1], al[1]);
    split<X3>(s[j][1], ah[2], al[2]);
    split<X3>(s[j][3], ah[3], al[3]);
#pragma unroll
    for (int nt = 0; nt < DP / 8; ++nt) {
      const float* p = y + (j * 8 + 2 * tq) * L + nt * 8 + gq;
      std::uint32_t bh0, bh1, bl0 = 0, bl1 = 0;
      split<X3>(p[0], bh0, bl0);
      split<X3>(p[L], bh1, bl1);
      mma3<X3>(c[nt], ah, al, bh0, bh1, bl0, bl1);
    }
  }
}

template <bool X3, int DP, int W>
__global__ void __launch_bounds__(32 * W) fwd_kernel(Args g) {
  constexpr int L = Geo<DP>::L, NT = 32 * W;
  extern __shared__ __align__(128) unsigned char sm[];
  float* Qs = reinterpret_cast<float*>(sm);
  float* St = Qs + 16 * W * L;
  const float* sk = static_cast<const float*>(g.sk);
  const float* sv = static_cast<const float*>(g.sv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int q0 = blockIdx.x * 16 * W, n = g.n, nt = (n + kBC - 1) / kBC;
  sigtc::cp_rows<DP, 16 * W, NT>(Qs, L, static_cast<const float*>(g.sq), g.sldq, q0, n);
  sigtc::cp_rows<DP, kBC, NT>(St, L, sk, g.sldk, 0, n);
  sigtc::cp_rows<DP, kBC, NT>(St + kBC * L, L, sv, g.sldv, 0, n);
  sigtc::cp_commit();
  float o[DP / 8][4] = {};
  float rs0 = 0.0f, rs1 = 0.0f;
  for (int it = 0; it < nt; ++it) {
    if (it + 1 < nt) {
      float* nx = St + ((it + 1) & 1) * 2 * kBC * L;
      sigtc::cp_rows<DP, kBC, NT>(nx, L, sk, g.sldk, (it + 1) * kBC, n);
      sigtc::cp_rows<DP, kBC, NT>(nx + kBC * L, L, sv, g.sldv, (it + 1) * kBC, n);
    }
    sigtc::cp_commit();
    sigtc::cp_wait<1>();
    __syncthreads();
    const float* Ks = St + (it & 1) * 2 * kBC * L;
    const float* Vs = Ks + kBC * L;
    const int k0 = it * kBC;
    float s[8][4] = {};
    mma_rows<X3, DP>(s, Qs + warp * 16 * L, Ks, lane);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = k0 + j * 8 + 2 * tq + (e & 1) < n ? sigtc::sigm2<X3>(s[j][e]) : 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) rs0 += s[j][0] + s[j][1], rs1 += s[j][2] + s[j][3];
    mma_cols<X3, DP>(o, s, Vs, lane);
    __syncthreads();
  }
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    rs0 += __shfl_xor_sync(0xffffffffu, rs0, m);
    rs1 += __shfl_xor_sync(0xffffffffu, rs1, m);
  }
  const int row0 = q0 + warp * 16;
  sigmma::store_rows<DP>(g.out_a, g.lda, row0, n, g.d, o, 1.0f / rs0, 1.0f / rs1, 0.0f, lane);
  if (tq == 0) {
    const int r = row0 + (lane >> 2);
    if (r < n) g.rowsum[static_cast<long long>(r) * g.ldr] = rs0;
    if (r + 8 < n) g.rowsum[static_cast<long long>(r + 8) * g.ldr] = rs1;
  }
}

template <bool X3, int DP, int W>
__global__ void __launch_bounds__(32 * W) dq_kernel(Args g) {
  constexpr int L = Geo<DP>::L, NT = 32 * W;
  extern __shared__ __align__(128) unsigned char sm[];
  float* Qs = reinterpret_cast<float*>(sm);
  float* dAs = Qs + 16 * W * L;
  float* St = dAs + 16 * W * L;
  const float* sk = static_cast<const float*>(g.sk);
  const float* sv = static_cast<const float*>(g.sv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gq = lane >> 2, tq = lane & 3;
  const int q0 = blockIdx.x * 16 * W, n = g.n, nt = (n + kBC - 1) / kBC;
  sigtc::cp_rows<DP, 16 * W, NT>(Qs, L, static_cast<const float*>(g.sq), g.sldq, q0, n);
  sigtc::cp_rows<DP, 16 * W, NT>(dAs, L, static_cast<const float*>(g.sda), g.sldda, q0, n);
  sigtc::cp_rows<DP, kBC, NT>(St, L, sk, g.sldk, 0, n);
  sigtc::cp_rows<DP, kBC, NT>(St + kBC * L, L, sv, g.sldv, 0, n);
  sigtc::cp_commit();
  const int row0 = q0 + warp * 16, r0 = row0 + gq, r1 = r0 + 8;
  const float ri0 = r0 < n ? 1.0f / g.rowsum_in[static_cast<long long>(r0) * g.ldr] : 0.0f;
  const float ri1 = r1 < n ? 1.0f / g.rowsum_in[static_cast<long long>(r1) * g.ldr] : 0.0f;
  const float dl0 = r0 < n ? g.delta[static_cast<long long>(r0) * g.ldr] : 0.0f;
  const float dl1 = r1 < n ? g.delta[static_cast<long long>(r1) * g.ldr] : 0.0f;
  float acc[DP / 8][4] = {};
  for (int it = 0; it < nt; ++it) {
    if (it + 1 < nt) {
      float* nx = St + ((it + 1) & 1) * 2 * kBC * L;
      sigtc::cp_rows<DP, kBC, NT>(nx, L, sk, g.sldk, (it + 1) * kBC, n);
      sigtc::cp_rows<DP, kBC, NT>(nx + kBC * L, L, sv, g.sldv, (it + 1) * kBC, n);
    }
    sigtc::cp_commit();
    sigtc::cp_wait<1>();
    __syncthreads();
    const float* Ks = St + (it & 1) * 2 * kBC * L;
    const float* Vs = Ks + kBC * L;
    const int k0 = it * kBC;
    float s[8][4] = {}, p[8][4] = {};
    mma_rows<X3, DP>(s, Qs + warp * 16 * L, Ks, lane);
    mma_rows<X3, DP>(p, dAs + warp * 16 * L, Vs, lane);
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float w = k0 + j * 8 + 2 * tq + (e & 1) < n ? sigtc::sigm2<X3>(s[j][e]) : 0.0f;
        s[j][e] = e < 2 ? w * (1.0f - w) * (p[j][e] - dl0) * ri0 : w * (1.0f - w) * (p[j][e] - dl1) * ri1;
      }
    mma_cols<X3, DP>(acc, s, Ks, lane);
    __syncthreads();
  }
  sigmma::store_rows<DP>(g.dq, g.ldq, row0, n, g.d, acc, g.da_scale, g.da_scale, 0.0f, lane);
}

template <bool X3, int DP, int W>
__global__ void __launch_bounds__(32 * W) dkv_kernel(Args g) {
  constexpr int L = Geo<DP>::L, NT = 32 * W;
  extern __shared__ __align__(128) unsigned char sm[];
  float* Ks = reinterpret_cast<float*>(sm);
  float* Vs = Ks + 16 * W * L;
  float* St = Vs + 16 * W * L;
  float* sc = St + 4 * kBC * L;
  const float* sq = static_cast<const float*>(g.sq);
  const float* sda = static_cast<const float*>(g.sda);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, tq = lane & 3;
  const int k0 = blockIdx.x * 16 * W, n = g.n, nt = (n + kBC - 1) / kBC;
  auto issue = [&](int t) {
    float* nx = St + (t & 1) * 2 * kBC * L;
    sigtc::cp_rows<DP, kBC, NT>(nx, L, sq, g.sldq, t * kBC, n);
    sigtc::cp_rows<DP, kBC, NT>(nx + kBC * L, L, sda, g.sldda, t * kBC, n);
    if (threadIdx.x < kBC) {
      float* c = sc + (t & 1) * 2 * kBC;
      const int r = t * kBC + threadIdx.x;
      c[threadIdx.x] = r < n ? 1.0f / g.rowsum_in[static_cast<long long>(r) * g.ldr] : 0.0f;
      c[kBC + threadIdx.x] = r < n ? g.delta[static_cast<long long>(r) * g.ldr] : 0.0f;
    }
  };
  sigtc::cp_rows<DP, 16 * W, NT>(Ks, L, static_cast<const float*>(g.sk), g.sldk, k0, n);
  sigtc::cp_rows<DP, 16 * W, NT>(Vs, L, static_cast<const float*>(g.sv), g.sldv, k0, n);
  issue(0);
  sigtc::cp_commit();
  float dk[DP / 8][4] = {}, dv[DP / 8][4] = {};
  for (int it = 0; it < nt; ++it) {
    if (it + 1 < nt) issue(it + 1);
    sigtc::cp_commit();
    sigtc::cp_wait<1>();
    __syncthreads();
    const float* Qs = St + (it & 1) * 2 * kBC * L;
    const float* dAs = Qs + kBC * L;
    const float* rinv_s = sc + (it & 1) * 2 * kBC;
    const float* dl_s = rinv_s + kBC;
    float s[8][4] = {}, p[8][4] = {};
    mma_rows<X3, DP>(s, Ks + warp * 16 * L, Qs, lane);
    mma_rows<X3, DP>(p, Vs + warp * 16 * L, dAs, lane);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float2 ri = *reinterpret_cast<const float2*>(rinv_s + j * 8 + 2 * tq);
      const float2 dl = *reinterpret_cast<const float2*>(dl_s + j * 8 + 2 * tq);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float r = (e & 1) ? ri.y : ri.x, l = (e & 1) ? dl.y : dl.x;
        const float w = sigtc::sigm2<X3>(s[j][e]);
        s[j][e] = w * r;
        p[j][e] = w * (1.0f - w) * (p[j][e] - l) * r;
      }
    }
    mma_cols<X3, DP>(dv, s, dAs, lane);
    mma_cols<X3, DP>(dk, p, Qs, lane);
    __syncthreads();
  }
  const int row0 = k0 + warp * 16;
  sigmma::store_rows<DP>(g.dk, g.ldk, row0, n, g.d, dk, g.da_scale, g.da_scale, 0.0f, lane);
  sigmma::store_rows<DP>(g.dv, g.ldv, row0, n, g.d, dv, g.da_scale, g.da_scale, g.dv_beta, lane);
}

template <bool X3, int DP, int W>
inline cudaError_t prepare() {
  cudaError_t e = cudaFuncSetAttribute(sigmma32::fwd_kernel<X3, DP, W>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       Geo<DP, W>::fwd_bytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(sigmma32::dq_kernel<X3, DP, W>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Geo<DP, W>::dq_bytes);
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(sigmma32::dkv_kernel<X3, DP, W>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             Geo<DP, W>::dkv_bytes);
  return e;
}
// work: setup_sources' workspace (used only where an input is not a full, aligned [n][DP] fp32 array)
template <bool X3, int DP, int W = kDefaultWarps>
inline void launch_fwd(Args g, float* work, int sms, cudaStream_t st) {
  static const cudaError_t once = prepare<X3, DP, W>();
  (void)once;
  sigtc::setup_sources<float, DP>(g, work, false, sms, st);
  sigmma32::fwd_kernel<X3, DP, W><<<(g.n + 16 * W - 1) / (16 * W), 32 * W, Geo<DP, W>::fwd_bytes, st>>>(g);
}
template <bool X3, int DP, int W = kDefaultWarps>
inline void launch_bwd(Args g, float* delta, float* work, int sms, cudaStream_t st) {
  static const cudaError_t once = prepare<X3, DP, W>();
  (void)once;
  sigtc::launch_delta(g, delta, sms, st);
  sigtc::setup_sources<float, DP>(g, work, true, sms, st);
  const int nb = (g.n + 16 * W - 1) / (16 * W);
  sigmma32::dkv_kernel<X3, DP, W><<<nb, 32 * W, Geo<DP, W>::dkv_bytes, st>>>(g);
  sigmma32::dq_kernel<X3, DP, W><<<nb, 32 * W, Geo<DP, W>::dq_bytes, st>>>(g);
}

}  // namespace dfm::cuda::sigmma32
