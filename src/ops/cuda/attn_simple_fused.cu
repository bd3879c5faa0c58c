// DIFFormer-s (simple, global norm) attention with its passes over N fused: the library's port
// of version 2 of dev/cuda/attn_simple.cu (which validates it against an fp64 reference and times
// it; on the H200 it ran at ~2.1 TB/s, twice the cuBLAS version). For d in {16, 32, 64}:
//   forward  [reduce] one pass over Q, K, V: per-block partials of sum Q^2, sum K^2, K^T V, sum K,
//            sum V (fixed grid, partials summed in a fixed order: deterministic)
//            [finalize] d x d statistics; [rows] one pass: read Q, write A
//   backward [reduce] one pass over Q, A, dA: partials of Q^T dnum, sum dden Q, sum dnum, and
//            aux = (1/den, dden) per row; [finalize]; [dq] read Q, dA, aux, write dQ;
//            [dkv] read K, V, write dK, dV
// Stats layout (simple_fused_stats_floats): [s_q, s_k, -, -] then per head KV_h/s_k (d x d),
// ks_h/s_k (d), vs_h (d). dQ may overwrite Q and dK may overwrite K (each element, or each row
// tile, is read before it is written). dA has Q's layout ([n, heads*d]).
#include <cmath>

#include "ops/cuda/cuda_util.cuh"
#include "ops/cuda/simple_folded.hpp"

namespace dfm::cuda {
namespace {

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }
inline int num_sms() {
  int dev = 0, n = 0;
  DFM_CUDA_CHECK(cudaGetDevice(&dev));
  DFM_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}
__device__ __forceinline__ int ceil_div_d(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// small vector helpers
__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 ldg4(const float* p) {
    return __ldg(reinterpret_cast<const float4*>(p));
}
__device__ __forceinline__ void st4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ float dot4(float4 a, float4 b) {
    return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
}
__device__ __forceinline__ float4 add4(float4 a, float4 b) {
    return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}
__device__ __forceinline__ float4 scale4(float4 a, float s) {
    return make_float4(a.x * s, a.y * s, a.z * s, a.w * s);
}
__device__ __forceinline__ float4 fma4(float s, float4 a, float4 c) {  // s*a + c
    return make_float4(fmaf(s, a.x, c.x), fmaf(s, a.y, c.y), fmaf(s, a.z, c.z), fmaf(s, a.w, c.w));
}
__device__ __forceinline__ float comp(float4 v, int i) {
    return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}
// acc[j][0..3] += a[j] * b[0..3]
__device__ __forceinline__ void outer4(float (&acc)[4][4], float4 a, float4 b) {
#pragma unroll
    for (int j = 0; j < 4; j++) {
        float aj = comp(a, j);
        acc[j][0] = fmaf(aj, b.x, acc[j][0]);
        acc[j][1] = fmaf(aj, b.y, acc[j][1]);
        acc[j][2] = fmaf(aj, b.z, acc[j][2]);
        acc[j][3] = fmaf(aj, b.w, acc[j][3]);
    }
}

// ---------------------------------------------------------------------------------------------
// compile-time configuration of the fused kernels
template <int D>
struct Cfg {
    static_assert(D == 16 || D == 32 || D == 64, "D must be 16, 32 or 64");
    static constexpr int NT = 256;            // threads per block
    static constexpr int NW = NT / 32;        // warps per block
    static constexpr int TX = D / 4;          // float4 chunks per row
    static constexpr int OPT = TX * TX;       // threads covering one D x D tile with 4x4 each
    static constexpr int G = NT / OPT;        // row groups in the reduction kernels
    static constexpr int TRS = 64;            // rows per tile, reduction kernels
    static constexpr int TY = NT / TX;        // thread rows, row kernels
    static constexpr int TRR = 4 * TY;        // rows per tile, row kernels (4 rows per thread)
    static constexpr int PR = D * D + 2 * D;  // per-head record in stats / bstats
    static constexpr int PREC = PR + 4;       // per-block partial record (+ 2 scalars, padded)
    static_assert(TRS >= D, "Ks scratch reuse needs TRS*D >= D*D");
};

// sum of v over all threads with the same (threadIdx.x % TX); valid in threads < TX.
template <int TX, int NT>
__device__ __forceinline__ float4 block_colsum4(float4 v, float4* scratch) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
#pragma unroll
    for (int off = TX; off < 32; off <<= 1) {
        v.x += __shfl_xor_sync(0xffffffffu, v.x, off);
        v.y += __shfl_xor_sync(0xffffffffu, v.y, off);
        v.z += __shfl_xor_sync(0xffffffffu, v.z, off);
        v.w += __shfl_xor_sync(0xffffffffu, v.w, off);
    }
    if (lane < TX) scratch[warp * TX + lane] = v;
    __syncthreads();
    float4 r = make_float4(0.f, 0.f, 0.f, 0.f);
    if (tid < TX)
        for (int w = 0; w < NT / 32; w++) r = add4(r, scratch[w * TX + tid]);
    __syncthreads();
    return r;
}

// block-wide sum, valid in thread 0
template <typename T, int NT>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T r = 0;
    if (tid == 0)
        for (int w = 0; w < NT / 32; w++) r += scratch[w];
    __syncthreads();
    return r;
}

// Write the block's D x D outer-product accumulators (spread over G row groups) into rec[0..D*D).
// Uses `scratch` (>= D*D floats of smem). Deterministic group order.
template <int D>
__device__ __forceinline__ void store_dxd(float (&acc)[4][4], float* scratch, float* rec) {
    using C = Cfg<D>;
    const int tid = threadIdx.x, g = tid / C::OPT, lt = tid % C::OPT;
    const int ty = lt / C::TX, tx = lt % C::TX;
    for (int gg = 0; gg < C::G; gg++) {
        if (g == gg) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                float* p = scratch + (ty * 4 + j) * D + tx * 4;
                float4 v = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
                st4(p, gg == 0 ? v : add4(ld4(p), v));
            }
        }
        __syncthreads();
    }
    for (int e = tid * 4; e < D * D; e += C::NT * 4) st4(rec + e, ld4(scratch + e));
    __syncthreads();
}

// =============================================================================================
// version 2: fused kernels
// =============================================================================================

// forward pass 1: partials of sum Q^2, sum K^2, K^T V, sum K, sum V for (block, head)
template <int D>
__global__ void __launch_bounds__(256)
    simple_fwd_reduce_kernel(const float* __restrict__ Q, const float* __restrict__ K,
                             const float* __restrict__ V, float* __restrict__ part, int N, int H,
                             int Hv) {
    using C = Cfg<D>;
    __shared__ __align__(16) float Ks[C::TRS * D];
    __shared__ __align__(16) float Vs[C::TRS * D];
    __shared__ float4 red4[C::NW * C::TX];
    __shared__ float red1[C::NW];
    const int tid = threadIdx.x, h = blockIdx.y, hv = (Hv == 1) ? 0 : h;
    const size_t ldq = (size_t)H * D, ldv = (size_t)Hv * D;
    const int g = tid / C::OPT, lt = tid % C::OPT, ty = lt / C::TX, tx = lt % C::TX;
    const int c4 = tid % C::TX;  // loader column chunk, fixed per thread since NT % TX == 0
    float acc[4][4] = {};
    float4 ksum = make_float4(0.f, 0.f, 0.f, 0.f), vsum = ksum;
    float sqq = 0.f, sqk = 0.f;
    const int ntiles = ceil_div_d(N, C::TRS);
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int row0 = tile * C::TRS;
#pragma unroll
        for (int it = 0; it < C::TRS * C::TX / C::NT; it++) {
            const int r = (tid + it * C::NT) / C::TX, gr = row0 + r;
            float4 kq = make_float4(0.f, 0.f, 0.f, 0.f), vq = kq, qq = kq;
            if (gr < N) {
                kq = ldg4(K + gr * ldq + h * D + c4 * 4);
                vq = ldg4(V + gr * ldv + hv * D + c4 * 4);
                qq = ldg4(Q + gr * ldq + h * D + c4 * 4);
            }
            st4(Ks + r * D + c4 * 4, kq);
            st4(Vs + r * D + c4 * 4, vq);
            ksum = add4(ksum, kq);
            vsum = add4(vsum, vq);
            sqk += dot4(kq, kq);
            sqq += dot4(qq, qq);
        }
        __syncthreads();
#pragma unroll 4
        for (int r = g; r < C::TRS; r += C::G) outer4(acc, ld4(Ks + r * D + ty * 4), ld4(Vs + r * D + tx * 4));
        __syncthreads();
    }
    float* rec = part + ((size_t)h * gridDim.x + blockIdx.x) * C::PREC;
    store_dxd<D>(acc, Ks, rec);
    ksum = block_colsum4<C::TX, C::NT>(ksum, red4);
    vsum = block_colsum4<C::TX, C::NT>(vsum, red4);
    if (tid < C::TX) {
        st4(rec + D * D + tid * 4, ksum);
        st4(rec + D * D + D + tid * 4, vsum);
    }
    sqq = block_sum<float, C::NT>(sqq, red1);
    sqk = block_sum<float, C::NT>(sqk, red1);
    if (tid == 0) {
        rec[C::PR] = sqq;
        rec[C::PR + 1] = sqk;
    }
}

// forward finalize: grid (ceil(PR/256), H). Sums partials in fixed order (double), normalises.
template <int D>
__global__ void simple_fwd_finalize_kernel(const float* __restrict__ part, int nblk, int H,
                                           float* __restrict__ stats) {
    using C = Cfg<D>;
    __shared__ double sh[2];
    const int h = blockIdx.y, e = blockIdx.x * blockDim.x + threadIdx.x;
    if (threadIdx.x < 32) {
        double a = 0, b = 0;
        for (int i = threadIdx.x; i < H * nblk; i += 32) {
            a += part[(size_t)i * C::PREC + C::PR];
            b += part[(size_t)i * C::PREC + C::PR + 1];
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            a += __shfl_xor_sync(0xffffffffu, a, off);
            b += __shfl_xor_sync(0xffffffffu, b, off);
        }
        if (threadIdx.x == 0) {
            sh[0] = a;
            sh[1] = b;
        }
    }
    __syncthreads();
    const double sq = sqrt(sh[0]), sk = sqrt(sh[1]);
    if (e < C::PR) {
        double s = 0;
        for (int b = 0; b < nblk; b++) s += part[((size_t)h * nblk + b) * C::PREC + e];
        stats[4 + (size_t)h * C::PR + e] = (float)(e < D * D + D ? s / sk : s);
    }
    if (blockIdx.x == 0 && h == 0 && threadIdx.x == 0) {
        stats[0] = (float)sq;
        stats[1] = (float)sk;
    }
}

// Register-blocked tile GEMM: acc[j][c] = sum_k Xs[(ty*4+j)*D + k] * Ws[k*D + tx*4 + c]
template <int D>
__device__ __forceinline__ void tile_rowmm(float (&acc)[4][4], const float* Xs, const float* Ws,
                                           int ty, int tx) {
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
        for (int c = 0; c < 4; c++) acc[j][c] = 0.f;
#pragma unroll 4
    for (int k = 0; k < D; k += 4) {
        float4 x[4], w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) x[j] = ld4(Xs + (ty * 4 + j) * D + k);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) w[kk] = ld4(Ws + (k + kk) * D + tx * 4);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            float4 xk = make_float4(comp(x[0], kk), comp(x[1], kk), comp(x[2], kk), comp(x[3], kk));
            outer4(acc, xk, w[kk]);
        }
    }
}

// load a [TRR x D] tile of rows row0.. of X (head offset already applied, row stride ld) into Xs
template <int D>
__device__ __forceinline__ void load_rows_tile(float* Xs, const float* __restrict__ X, size_t ld,
                                               int row0, int N) {
    using C = Cfg<D>;
    const int tid = threadIdx.x, c = tid % C::TX;
#pragma unroll
    for (int it = 0; it < C::TRR * C::TX / C::NT; it++) {
        const int r = (tid + it * C::NT) / C::TX, gr = row0 + r;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (gr < N) v = ldg4(X + gr * ld + c * 4);
        st4(Xs + r * D + c * 4, v);
    }
}

// forward pass 2: A = (Q KV_h / s_q + vs_h) / (Q . ks_h / s_q + N)
template <int D>
__global__ void __launch_bounds__(256)
    simple_fwd_rows_kernel(const float* __restrict__ Q, const float* __restrict__ stats,
                           float* __restrict__ A, int N, int H) {
    using C = Cfg<D>;
    __shared__ __align__(16) float Ws[D * D];
    __shared__ __align__(16) float Xs[C::TRR * D];
    const int tid = threadIdx.x, h = blockIdx.y, ty = tid / C::TX, tx = tid % C::TX;
    const size_t ldq = (size_t)H * D;
    const float* st = stats + 4 + (size_t)h * C::PR;
    for (int e = tid * 4; e < D * D; e += C::NT * 4) st4(Ws + e, ld4(st + e));
    const float4 ks4 = ld4(st + D * D + tx * 4), vs4 = ld4(st + D * D + D + tx * 4);
    const float inv_sq = 1.f / stats[0], Nf = (float)N;
    const int ntiles = ceil_div_d(N, C::TRR);
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int row0 = tile * C::TRR;
        load_rows_tile<D>(Xs, Q + h * D, ldq, row0, N);
        __syncthreads();
        float den[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            den[j] = dot4(ld4(Xs + (ty * 4 + j) * D + tx * 4), ks4);
#pragma unroll
            for (int off = 1; off < C::TX; off <<= 1) den[j] += __shfl_xor_sync(0xffffffffu, den[j], off);
        }
        float acc[4][4];
        tile_rowmm<D>(acc, Xs, Ws, ty, tx);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int gr = row0 + ty * 4 + j;
            if (gr < N) {
                const float rd = 1.f / fmaf(den[j], inv_sq, Nf);
                float4 o = make_float4(fmaf(acc[j][0], inv_sq, vs4.x) * rd, fmaf(acc[j][1], inv_sq, vs4.y) * rd,
                                       fmaf(acc[j][2], inv_sq, vs4.z) * rd, fmaf(acc[j][3], inv_sq, vs4.w) * rd);
                st4(A + gr * ldq + h * D + tx * 4, o);
            }
        }
        __syncthreads();
    }
}

// backward pass 1: partials of Q^T dnum, sum dden Q, sum dnum; aux[i*H+h] = (1/den_i, dden_i)
template <int D>
__global__ void __launch_bounds__(256)
    simple_bwd_reduce_kernel(const float* __restrict__ Q, const float* __restrict__ A,
                             const float* __restrict__ dA, const float* __restrict__ stats,
                             float* __restrict__ part, float2* __restrict__ aux, int N, int H) {
    using C = Cfg<D>;
    __shared__ __align__(16) float Qs[C::TRS * D];
    __shared__ __align__(16) float Ns[C::TRS * D];
    __shared__ float4 red4[C::NW * C::TX];
    const int tid = threadIdx.x, h = blockIdx.y;
    const size_t ldq = (size_t)H * D;
    const int g = tid / C::OPT, lt = tid % C::OPT, ty = lt / C::TX, tx = lt % C::TX;
    const int c4 = tid % C::TX;
    const float* st = stats + 4 + (size_t)h * C::PR;
    const float4 ks4 = ld4(st + D * D + c4 * 4);
    const float inv_sq = 1.f / stats[0], Nf = (float)N;
    float acc[4][4] = {};
    float4 dks = make_float4(0.f, 0.f, 0.f, 0.f), dvs = dks;
    const int ntiles = ceil_div_d(N, C::TRS);
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int row0 = tile * C::TRS;
#pragma unroll
        for (int it = 0; it < C::TRS * C::TX / C::NT; it++) {
            const int r = (tid + it * C::NT) / C::TX, gr = row0 + r;
            float4 q = make_float4(0.f, 0.f, 0.f, 0.f), a = q, d = q;
            if (gr < N) {
                const size_t off = gr * ldq + h * D + c4 * 4;
                q = ldg4(Q + off);
                a = ldg4(A + off);
                d = ldg4(dA + off);
            }
            float pq = dot4(q, ks4), pg = dot4(d, a);
#pragma unroll
            for (int o = 1; o < C::TX; o <<= 1) {
                pq += __shfl_xor_sync(0xffffffffu, pq, o);
                pg += __shfl_xor_sync(0xffffffffu, pg, o);
            }
            const float rden = 1.f / fmaf(pq, inv_sq, Nf);
            const float dden = -pg * rden;
            const float4 dn = scale4(d, rden);
            st4(Qs + r * D + c4 * 4, q);
            st4(Ns + r * D + c4 * 4, dn);
            dvs = add4(dvs, dn);
            dks = fma4(dden, q, dks);
            if (c4 == 0 && gr < N) aux[(size_t)gr * H + h] = make_float2(rden, dden);
        }
        __syncthreads();
#pragma unroll 4
        for (int r = g; r < C::TRS; r += C::G) outer4(acc, ld4(Qs + r * D + ty * 4), ld4(Ns + r * D + tx * 4));
        __syncthreads();
    }
    float* rec = part + ((size_t)h * gridDim.x + blockIdx.x) * C::PREC;
    store_dxd<D>(acc, Qs, rec);
    dks = block_colsum4<C::TX, C::NT>(dks, red4);
    dvs = block_colsum4<C::TX, C::NT>(dvs, red4);
    if (tid < C::TX) {
        st4(rec + D * D + tid * 4, dks);
        st4(rec + D * D + D + tid * 4, dvs);
    }
}

// backward finalize: grid (ceil(PR/256), H). bstats[h] = (dKV_h, dks_h, dvs_h);
// cpart[h*gridDim.x + bx] = partial of c = sum_h <KV_h,dKV_h> + ks_h.dks_h
template <int D>
__global__ void simple_bwd_finalize_kernel(const float* __restrict__ part, int nblk, int H,
                                           const float* __restrict__ stats,
                                           float* __restrict__ bstats, float* __restrict__ cpart) {
    using C = Cfg<D>;
    __shared__ double red[8];
    const int h = blockIdx.y, e = blockIdx.x * blockDim.x + threadIdx.x;
    const double inv_sq = 1.0 / (double)stats[0];
    double contrib = 0;
    if (e < C::PR) {
        double s = 0;
        for (int b = 0; b < nblk; b++) s += part[((size_t)h * nblk + b) * C::PREC + e];
        const double val = e < D * D + D ? s * inv_sq : s;
        bstats[(size_t)h * C::PR + e] = (float)val;
        if (e < D * D + D) contrib = val * (double)stats[4 + (size_t)h * C::PR + e];
    }
    contrib = block_sum<double, 256>(contrib, red);
    if (threadIdx.x == 0) cpart[h * gridDim.x + blockIdx.x] = (float)contrib;
}

// backward pass 2a: dQ = (KV_h dA_i * rden_i + dden_i ks_h - Q_i c / s_q) / s_q
template <int D>
__global__ void __launch_bounds__(256)
    simple_bwd_dq_kernel(const float* __restrict__ Q, const float* __restrict__ dA,
                         const float* __restrict__ stats, const float* __restrict__ cpart, int ncp,
                         const float2* __restrict__ aux, float* __restrict__ dQ, int N, int H) {
    using C = Cfg<D>;
    __shared__ __align__(16) float Ws[D * D];
    __shared__ __align__(16) float Xs[C::TRR * D];
    __shared__ float csh;
    const int tid = threadIdx.x, h = blockIdx.y, ty = tid / C::TX, tx = tid % C::TX;
    const size_t ldq = (size_t)H * D;
    const float* st = stats + 4 + (size_t)h * C::PR;
    for (int e = tid; e < D * D; e += C::NT) Ws[e] = st[(e % D) * D + e / D];  // W = KV_h^T
    if (tid == 0) {
        double c = 0;
        for (int i = 0; i < ncp; i++) c += cpart[i];
        csh = (float)c;
    }
    const float4 ks4 = ld4(st + D * D + tx * 4);
    const float inv_sq = 1.f / stats[0];
    __syncthreads();
    const float cq = csh * inv_sq;
    const int ntiles = ceil_div_d(N, C::TRR);
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int row0 = tile * C::TRR;
        load_rows_tile<D>(Xs, dA + h * D, ldq, row0, N);
        __syncthreads();
        float acc[4][4];
        tile_rowmm<D>(acc, Xs, Ws, ty, tx);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int gr = row0 + ty * 4 + j;
            if (gr < N) {
                const float2 ad = aux[(size_t)gr * H + h];
                const float4 q = ldg4(Q + gr * ldq + h * D + tx * 4);
                float4 o;
                o.x = (fmaf(acc[j][0], ad.x, ad.y * ks4.x) - q.x * cq) * inv_sq;
                o.y = (fmaf(acc[j][1], ad.x, ad.y * ks4.y) - q.y * cq) * inv_sq;
                o.z = (fmaf(acc[j][2], ad.x, ad.y * ks4.z) - q.z * cq) * inv_sq;
                o.w = (fmaf(acc[j][3], ad.x, ad.y * ks4.w) - q.w * cq) * inv_sq;
                st4(dQ + gr * ldq + h * D + tx * 4, o);
            }
        }
        __syncthreads();
    }
}

// backward pass 2b: dK = (dKV_h V_l + dks_h - K_l c/s_k)/s_k ; dV = dKV_h^T K_l / s_k + dvs_h
// (summed over heads for Hv = 1). Loops over heads inside the block.
template <int D>
__global__ void __launch_bounds__(256)
    simple_bwd_dkv_kernel(const float* __restrict__ K, const float* __restrict__ V,
                          const float* __restrict__ stats, const float* __restrict__ bstats,
                          const float* __restrict__ cpart, int ncp, float* __restrict__ dK,
                          float* __restrict__ dV, int N, int H, int Hv) {
    using C = Cfg<D>;
    extern __shared__ float4 smem4[];
    float* W1 = reinterpret_cast<float*>(smem4);  // dKV_h^T
    float* W2 = W1 + D * D;                       // dKV_h / s_k
    float* Ks = W2 + D * D;
    float* Vs = Ks + C::TRR * D;
    __shared__ float csh;
    const int tid = threadIdx.x, ty = tid / C::TX, tx = tid % C::TX;
    const size_t ldk = (size_t)H * D, ldv = (size_t)Hv * D;
    if (tid == 0) {
        double c = 0;
        for (int i = 0; i < ncp; i++) c += cpart[i];
        csh = (float)c;
    }
    const float inv_sk = 1.f / stats[1];
    __syncthreads();
    const float ck = csh * inv_sk;
    const int ntiles = ceil_div_d(N, C::TRR);
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int row0 = tile * C::TRR;
        float accV[4][4] = {};
        for (int h = 0; h < H; h++) {
            const int hv = (Hv == 1) ? 0 : h;
            const float* bs = bstats + (size_t)h * C::PR;
            if (H > 1 || tile == (int)blockIdx.x) {
                for (int e = tid; e < D * D; e += C::NT) {
                    W1[e] = bs[(e % D) * D + e / D];
                    W2[e] = bs[e] * inv_sk;
                }
            }
            load_rows_tile<D>(Ks, K + h * D, ldk, row0, N);
            if (Hv != 1 || h == 0) load_rows_tile<D>(Vs, V + hv * D, ldv, row0, N);
            __syncthreads();
            float a1[4][4], a2[4][4];
            tile_rowmm<D>(a1, Vs, W1, ty, tx);
            tile_rowmm<D>(a2, Ks, W2, ty, tx);
            const float4 dks4 = ld4(bs + D * D + tx * 4), dvs4 = ld4(bs + D * D + D + tx * 4);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int gr = row0 + ty * 4 + j;
                const float4 k = ld4(Ks + (ty * 4 + j) * D + tx * 4);
                float4 o;
                o.x = (a1[j][0] + dks4.x - k.x * ck) * inv_sk;
                o.y = (a1[j][1] + dks4.y - k.y * ck) * inv_sk;
                o.z = (a1[j][2] + dks4.z - k.z * ck) * inv_sk;
                o.w = (a1[j][3] + dks4.w - k.w * ck) * inv_sk;
                if (gr < N) st4(dK + gr * ldk + h * D + tx * 4, o);
                const float4 v = make_float4(a2[j][0] + dvs4.x, a2[j][1] + dvs4.y, a2[j][2] + dvs4.z,
                                             a2[j][3] + dvs4.w);
                if (Hv == 1) {
                    accV[j][0] += v.x;
                    accV[j][1] += v.y;
                    accV[j][2] += v.z;
                    accV[j][3] += v.w;
                } else if (gr < N) {
                    st4(dV + gr * ldv + h * D + tx * 4, v);
                }
            }
            __syncthreads();
        }
        if (Hv == 1) {
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const int gr = row0 + ty * 4 + j;
                if (gr < N)
                    st4(dV + gr * ldv + tx * 4, make_float4(accV[j][0], accV[j][1], accV[j][2], accV[j][3]));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// v2 host side
template <typename Kern>
static int blocks_per_sm(Kern k, int threads, size_t smem) {
    int n = 0;
    DFM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k, threads, smem));
    return std::max(n, 1);
}

// number of reduction blocks per head: one full wave, at most one per tile
template <int D>
static int simple_reduce_nblk(int N, int H) {
    static int occ = 0;
    if (occ == 0)
        occ = std::min(blocks_per_sm(simple_fwd_reduce_kernel<D>, 256, 0),
                       blocks_per_sm(simple_bwd_reduce_kernel<D>, 256, 0));
    const int wave = std::max(1, num_sms() * occ / H);
    return std::max(1, std::min(ceil_div(N, Cfg<D>::TRS), wave));
}
template <int D>
static int simple_rows_nblk(int N, int H, int occ) {
    const int wave = std::max(1, num_sms() * occ / H);
    return std::max(1, std::min(ceil_div(N, Cfg<D>::TRR), wave));
}

static constexpr int kMaxFinalizeBlocksX = 64;  // ceil((64*64+128)/256) = 17 for D=64

template <int D>
static size_t simple_v2_workspace_floats_t(int N, int H) {
    using C = Cfg<D>;
    const size_t nblk = simple_reduce_nblk<D>(N, H);
    const size_t fwd = (size_t)H * nblk * C::PREC;
    const size_t bwd = (size_t)H * nblk * C::PREC + (size_t)H * C::PR + (size_t)H * kMaxFinalizeBlocksX +
                       2 * (size_t)N * H;
    return std::max(fwd, bwd) + 16;
}

size_t simple_v2_workspace_floats(int N, int H, int D) {
    switch (D) {
        case 16: return simple_v2_workspace_floats_t<16>(N, H);
        case 32: return simple_v2_workspace_floats_t<32>(N, H);
        case 64: return simple_v2_workspace_floats_t<64>(N, H);
    }
    fail("fused simple attention: unsupported d = ", D);
}

template <int D>
static void simple_forward_v2_t(const float* Q, const float* K, const float* V, float* A, float* stats,
                                float* work, int N, int H, int Hv, cudaStream_t s) {
    using C = Cfg<D>;
    const int nblk = simple_reduce_nblk<D>(N, H);
    simple_fwd_reduce_kernel<D><<<dim3(nblk, H), C::NT, 0, s>>>(Q, K, V, work, N, H, Hv);
    DFM_CUDA_LAUNCH_CHECK();
    simple_fwd_finalize_kernel<D><<<dim3(ceil_div(C::PR, 256), H), 256, 0, s>>>(work, nblk, H, stats);
    DFM_CUDA_LAUNCH_CHECK();
    static int occ = blocks_per_sm(simple_fwd_rows_kernel<D>, C::NT, 0);
    simple_fwd_rows_kernel<D><<<dim3(simple_rows_nblk<D>(N, H, occ), H), C::NT, 0, s>>>(Q, stats, A, N, H);
    DFM_CUDA_LAUNCH_CHECK();
}

template <int D>
static void simple_backward_v2_t(const float* Q, const float* K, const float* V, const float* A,
                                 const float* dA, const float* stats, float* dQ, float* dK, float* dV,
                                 float* work, int N, int H, int Hv, cudaStream_t s) {
    using C = Cfg<D>;
    const int nblk = simple_reduce_nblk<D>(N, H);
    float* part = work;
    float* bstats = part + (size_t)H * nblk * C::PREC;
    float* cpart = bstats + (size_t)H * C::PR;
    float2* aux = reinterpret_cast<float2*>(cpart + (size_t)H * kMaxFinalizeBlocksX);
    simple_bwd_reduce_kernel<D><<<dim3(nblk, H), C::NT, 0, s>>>(Q, A, dA, stats, part, aux, N, H);
    DFM_CUDA_LAUNCH_CHECK();
    const int fx = ceil_div(C::PR, 256);
    simple_bwd_finalize_kernel<D><<<dim3(fx, H), 256, 0, s>>>(part, nblk, H, stats, bstats, cpart);
    DFM_CUDA_LAUNCH_CHECK();
    static int occ_q = blocks_per_sm(simple_bwd_dq_kernel<D>, C::NT, 0);
    simple_bwd_dq_kernel<D><<<dim3(simple_rows_nblk<D>(N, H, occ_q), H), C::NT, 0, s>>>(
        Q, dA, stats, cpart, fx * H, aux, dQ, N, H);
    DFM_CUDA_LAUNCH_CHECK();
    const size_t smem = (2 * D * D + 2 * C::TRR * D) * sizeof(float);
    static bool attr = [&] {
        DFM_CUDA_CHECK(cudaFuncSetAttribute(simple_bwd_dkv_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        (int)smem));
        return true;
    }();
    (void)attr;
    static int occ_kv = blocks_per_sm(simple_bwd_dkv_kernel<D>, C::NT, smem);
    simple_bwd_dkv_kernel<D><<<simple_rows_nblk<D>(N, 1, occ_kv), C::NT, smem, s>>>(
        K, V, stats, bstats, cpart, fx * H, dK, dV, N, H, Hv);
    DFM_CUDA_LAUNCH_CHECK();
}

// ---- public launchers (version 2) ----
// stats: simple_stats_floats(H, D) floats (output); work: simple_v2_workspace_floats(N, H, D) floats
void simple_forward_v2(const float* Q, const float* K, const float* V, float* A, float* stats, float* work,
                       int N, int H, int Hv, int D, cudaStream_t stream) {
    switch (D) {
        case 16: simple_forward_v2_t<16>(Q, K, V, A, stats, work, N, H, Hv, stream); break;
        case 32: simple_forward_v2_t<32>(Q, K, V, A, stats, work, N, H, Hv, stream); break;
        case 64: simple_forward_v2_t<64>(Q, K, V, A, stats, work, N, H, Hv, stream); break;
        default: fail("fused simple attention: unsupported d = ", D);
    }
}
// stats: as written by the forward; A: forward output
void simple_backward_v2(const float* Q, const float* K, const float* V, const float* A, const float* dA,
                        const float* stats, float* dQ, float* dK, float* dV, float* work, int N, int H, int Hv,
                        int D, cudaStream_t stream) {
    switch (D) {
        case 16: simple_backward_v2_t<16>(Q, K, V, A, dA, stats, dQ, dK, dV, work, N, H, Hv, stream); break;
        case 32: simple_backward_v2_t<32>(Q, K, V, A, dA, stats, dQ, dK, dV, work, N, H, Hv, stream); break;
        case 64: simple_backward_v2_t<64>(Q, K, V, A, dA, stats, dQ, dK, dV, work, N, H, Hv, stream); break;
        default: fail("fused simple attention: unsupported d = ", D);
    }
}

}  // namespace

bool simple_fused_supported(const AttnDims& dm) { return dm.d == 16 || dm.d == 32 || dm.d == 64; }

std::size_t simple_fused_stats_floats(const AttnDims& dm) {
  return 4 + static_cast<std::size_t>(dm.heads) * static_cast<std::size_t>(dm.d * dm.d + 2 * dm.d);
}

std::size_t simple_fused_work_floats(const AttnDims& dm) {
  return simple_v2_workspace_floats(static_cast<int>(dm.n), dm.heads, static_cast<int>(dm.d));
}

void simple_fused_fwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v, float* a,
                      float* stats, float* work) {
  if (dm.n == 0) return;
  simple_forward_v2(q, k, v, a, stats, work, static_cast<int>(dm.n), dm.heads, dm.vheads, static_cast<int>(dm.d),
                    ctx.stream());
}

template <int D>
static void rows_t(GpuContext& ctx, const AttnDims& dm, const float* q, const float* stats, float* a) {
  using C = Cfg<D>;
  static int occ = blocks_per_sm(simple_fwd_rows_kernel<D>, C::NT, 0);
  simple_fwd_rows_kernel<D><<<dim3(simple_rows_nblk<D>(static_cast<int>(dm.n), dm.heads, occ), dm.heads), C::NT, 0,
                              ctx.stream()>>>(q, stats, a, static_cast<int>(dm.n), dm.heads);
  DFM_CUDA_LAUNCH_CHECK();
}

void simple_fused_rows(GpuContext& ctx, const AttnDims& dm, const float* q, const float* stats, float* a) {
  if (dm.n == 0) return;
  switch (dm.d) {
    case 16: rows_t<16>(ctx, dm, q, stats, a); break;
    case 32: rows_t<32>(ctx, dm, q, stats, a); break;
    case 64: rows_t<64>(ctx, dm, q, stats, a); break;
    default: fail("fused simple attention: unsupported d = ", dm.d);
  }
}

void simple_fused_bwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v,
                      const float* a, const float* da, const float* stats, float* dq, float* dk, float* dv,
                      float* work) {
  if (dm.n == 0) return;
  simple_backward_v2(q, k, v, a, da, stats, dq, dk, dv, work, static_cast<int>(dm.n), dm.heads, dm.vheads,
                     static_cast<int>(dm.d), ctx.stream());
}

}  // namespace dfm::cuda

// =============================================================================================
// The folded DIFFormer-s layer (simple_folded.hpp): Q, K, V and A are never stored.
// =============================================================================================
namespace dfm::cuda {
namespace {

// Saved per-layer stats (floats): [s_q, s_k, e, -] | G | u | KV | ks | M | c | m | Wv^T | bv
template <int D>
struct FL {
    static constexpr int SQ = 0, SK = 1, E = 2;
    static constexpr int G = 4, U = G + D * D, KV = U + D, KS = KV + D * D, M = KS + D, C = M + D * D,
                         MV = C + D, WVT = MV + D, BV = WVT + D * D, TOTAL = BV + D;
};
// Work buffer (floats): backward maps | fold scratch (8 D x D, 16 D) | per-block partials
template <int D>
struct WL {
    static constexpr int P1 = 0, Z = D * D, WG = 2 * D * D, ZB = 3 * D * D;
    static constexpr int T = ZB + D;
    static constexpr int V = T + 8 * D * D;
    static constexpr int PART = V + 16 * D + 4;
    static constexpr int PRECB = 2 * D * D + 3 * D + 4;  // h^T dnum | h^T t | h^T dden | sum dnum | sum t | tau
};

__device__ __forceinline__ double block_sum_all(double v, double* sh) {  // every thread gets the sum
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    double r = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) r += sh[w];
    __syncthreads();
    return r;
}

template <int TX>
__device__ __forceinline__ float row_reduce(float v) {  // over the TX consecutive lanes of one row
#pragma unroll
    for (int o = 1; o < TX; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// acc[j][c] += sum_k Xs[(ty*4+j)*D + k] * Ws[k*D + tx*4 + c]
template <int D>
__device__ __forceinline__ void tile_rowmm_add(float (&acc)[4][4], const float* Xs, const float* Ws, int ty, int tx) {
#pragma unroll 4
    for (int k = 0; k < D; k += 4) {
        float4 x[4], w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) x[j] = ld4(Xs + (ty * 4 + j) * D + k);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) w[kk] = ld4(Ws + (k + kk) * D + tx * 4);
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            float4 xk = make_float4(comp(x[0], kk), comp(x[1], kk), comp(x[2], kk), comp(x[3], kk));
            outer4(acc, xk, w[kk]);
        }
    }
}

// ---- forward fold: six short launches (phase 2 is one block: the two norms) ---------------------
// Multi-block phases spread their d x d elements over the grid; the kernel boundaries order them.
#define DFM_FOLD_LOOP(e, count) for (int e = gid; e < (count); e += gnt)
template <int D>
__global__ void __launch_bounds__(1024)
    folded_fwd_fold_kernel(int phase, const float* __restrict__ part, int nblk, FoldedWeights w,
                           float* __restrict__ st, float* __restrict__ work, int N) {
    using L = FL<D>;
    using W = WL<D>;
    __shared__ double sh[32];
    const int gid = blockIdx.x * blockDim.x + threadIdx.x, gnt = gridDim.x * blockDim.x;
    const double Nd = (double)N;
    float* G = st + L::G;
    float* u = st + L::U;
    float* WqG = work + W::T;
    float* WkG = WqG + D * D;
    float* KV0 = WkG + D * D;
    float* Wqu = work + W::V;
    float* Wku = Wqu + D;
    float* vs = Wku + D;
    double* dsc = reinterpret_cast<double*>(work + W::V + 14 * D);  // [gq, gk, sq, sk]
    float* ks = st + L::KS;
    float* KV = st + L::KV;
    if (phase == 0) {
        DFM_FOLD_LOOP(e, D * D + D) {  // the reduce records start with K^T V = G, then sum K = u
            double s = 0;
            for (int b = 0; b < nblk; b++) s += part[(size_t)b * Cfg<D>::PREC + e];
            G[e] = (float)s;
        }
    } else if (phase == 1) {
        DFM_FOLD_LOOP(e, D * D) {
            const int i = e / D, j = e % D;
            double a = 0, b = 0;
            for (int k = 0; k < D; k++) {
                const double g = G[k * D + j];
                a += (double)w.wq[i * D + k] * g;
                b += (double)w.wk[i * D + k] * g;
            }
            WqG[e] = (float)a;
            WkG[e] = (float)b;
        }
        DFM_FOLD_LOOP(i, D) {
            double a = 0, b = 0, c = 0;
            for (int k = 0; k < D; k++) {
                a += (double)w.wq[i * D + k] * u[k];
                b += (double)w.wk[i * D + k] * u[k];
                if (w.wv) c += (double)w.wv[i * D + k] * u[k];
            }
            Wqu[i] = (float)a;
            Wku[i] = (float)b;
            vs[i] = w.wv ? (float)(c + Nd * (double)w.bv[i]) : u[i];
        }
    } else if (phase == 2) {  // one block
        double pq = 0, pk = 0;
        DFM_FOLD_LOOP(e, D * D) {
            pq += (double)WqG[e] * (double)w.wq[e];
            pk += (double)WkG[e] * (double)w.wk[e];
        }
        DFM_FOLD_LOOP(i, D) {
            const double bq = w.bq[i], bk = w.bk[i];
            pq += 2.0 * bq * (double)Wqu[i] + Nd * bq * bq;
            pk += 2.0 * bk * (double)Wku[i] + Nd * bk * bk;
        }
        pq = block_sum_all(pq, sh);
        pk = block_sum_all(pk, sh);
        if (gid == 0) {
            const double sq = sqrt(fmax(pq, 0.0)), sk = sqrt(fmax(pk, 0.0));
            dsc[2] = sq;
            dsc[3] = sk;
            st[L::SQ] = (float)sq;
            st[L::SK] = (float)sk;
        }
    } else if (phase == 3) {
        const double isk = 1.0 / dsc[3];
        DFM_FOLD_LOOP(i, D) ks[i] = (float)(((double)Wku[i] + Nd * (double)w.bk[i]) * isk);
        DFM_FOLD_LOOP(e, D * D) {
            const int i = e / D, j = e % D;
            KV0[e] = (float)(((double)WkG[e] + (double)w.bk[i] * (double)u[j]) * isk);
        }
    } else if (phase == 4) {
        DFM_FOLD_LOOP(e, D * D) {
            const int i = e / D, j = e % D;
            if (w.wv) {
                double a = 0;
                for (int k = 0; k < D; k++) a += (double)KV0[i * D + k] * (double)w.wv[j * D + k];
                KV[e] = (float)(a + (double)ks[i] * (double)w.bv[j]);
            } else {
                KV[e] = KV0[e];
            }
        }
    } else {
        const double isq = 1.0 / dsc[2];
        float* M = st + L::M;
        float* c = st + L::C;
        float* mv = st + L::MV;
        float* wvt = st + L::WVT;
        float* bvv = st + L::BV;
        DFM_FOLD_LOOP(e, D * D) {
            const int i = e / D, j = e % D;
            double a = 0;
            for (int k = 0; k < D; k++) a += (double)w.wq[k * D + i] * (double)KV[k * D + j];
            M[e] = (float)(a * isq);
            wvt[e] = w.wv ? w.wv[j * D + i] : (i == j ? 1.0f : 0.0f);  // Wv^T[k][c] = Wv[c][k]
        }
        DFM_FOLD_LOOP(j, D) {
            double a = 0, b = 0;
            for (int k = 0; k < D; k++) {
                a += (double)KV[k * D + j] * (double)w.bq[k];
                b += (double)w.wq[k * D + j] * (double)ks[k];
            }
            c[j] = (float)(a * isq + (double)vs[j]);
            mv[j] = (float)(b * isq);
            bvv[j] = w.bv ? w.bv[j] : 0.0f;
        }
        if (gid == 0) {
            double a = 0;
            for (int k = 0; k < D; k++) a += (double)w.bq[k] * (double)ks[k];
            st[L::E] = (float)(a * isq + Nd);
            st[3] = 0.0f;
        }
    }
}

// ---- forward rows: z = wa A + wg (g Wv^T + r bv^T) + wr h; y = dropout(LN(z)) ---------------------
struct RowsFwdK {
    int n;
    const float* h;
    const float* g;
    const float* rowsum;
    const float* st;
    float wa, wg, wr;
    float* z;
    bool ln;
    const float* gamma;
    const float* beta;
    float eps;
    bool drop;
    std::uint32_t thr;
    float dscale;
    const std::uint64_t* seed;
    std::uint64_t salt;
    float* y;
};

template <int D>
__global__ void __launch_bounds__(256) folded_fwd_rows_kernel(RowsFwdK a) {
    using C = Cfg<D>;
    using L = FL<D>;
    extern __shared__ float4 smem4[];
    float* Ms = reinterpret_cast<float*>(smem4);
    float* Vs = Ms + D * D;
    float* Xs = Vs + D * D;
    float* Gs = Xs + C::TRR * D;
    const int tid = threadIdx.x, ty = tid / C::TX, tx = tid % C::TX;
    for (int e = tid * 4; e < D * D; e += C::NT * 4) {
        st4(Ms + e, ld4(a.st + L::M + e));
        if (a.g) st4(Vs + e, ld4(a.st + L::WVT + e));
    }
    const float4 m4 = ld4(a.st + L::MV + tx * 4), c4 = ld4(a.st + L::C + tx * 4), bv4 = ld4(a.st + L::BV + tx * 4);
    const float ee = a.st[L::E];
    float gm[4] = {1.f, 1.f, 1.f, 1.f}, bt[4] = {0.f, 0.f, 0.f, 0.f};
    if (a.ln)
#pragma unroll
        for (int cc = 0; cc < 4; cc++) gm[cc] = a.gamma[tx * 4 + cc], bt[cc] = a.beta[tx * 4 + cc];
    const std::uint64_t seed = a.drop ? mix_seed_dev(*a.seed, a.salt) : 0;
    const float invd = 1.0f / (float)D;
    const int ntiles = ceil_div_d(a.n, C::TRR);
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int row0 = tile * C::TRR;
        load_rows_tile<D>(Xs, a.h, D, row0, a.n);
        if (a.g) load_rows_tile<D>(Gs, a.g, D, row0, a.n);
        __syncthreads();
        float den[4];
#pragma unroll
        for (int j = 0; j < 4; j++) den[j] = row_reduce<C::TX>(dot4(ld4(Xs + (ty * 4 + j) * D + tx * 4), m4));
        float acc[4][4], acc2[4][4];
        tile_rowmm<D>(acc, Xs, Ms, ty, tx);
        if (a.g) {
            tile_rowmm<D>(acc2, Gs, Vs, ty, tx);
        } else {
#pragma unroll
            for (int j = 0; j < 4; j++)
#pragma unroll
                for (int cc = 0; cc < 4; cc++) acc2[j][cc] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int r = ty * 4 + j, gr = row0 + r;
            const float rd = 1.f / (den[j] + ee);
            const float4 hv = ld4(Xs + r * D + tx * 4);
            const float rs = (a.g && gr < a.n) ? a.rowsum[gr] : 0.f;
            float zz[4];
#pragma unroll
            for (int cc = 0; cc < 4; cc++) {
                zz[cc] = a.wa * ((acc[j][cc] + comp(c4, cc)) * rd) + a.wr * comp(hv, cc);
                if (a.g) zz[cc] += a.wg * (acc2[j][cc] + rs * comp(bv4, cc));
            }
            if (gr < a.n) st4(a.z + (size_t)gr * D + tx * 4, make_float4(zz[0], zz[1], zz[2], zz[3]));
            float mean = 0.f, rstd = 1.f;
            if (a.ln) {
                mean = row_reduce<C::TX>(zz[0] + zz[1] + zz[2] + zz[3]) * invd;
                float var = 0.f;
#pragma unroll
                for (int cc = 0; cc < 4; cc++) var += (zz[cc] - mean) * (zz[cc] - mean);
                var = row_reduce<C::TX>(var) * invd;
                rstd = 1.0f / sqrtf(var + a.eps);
            }
            float o[4];
#pragma unroll
            for (int cc = 0; cc < 4; cc++) {
                float v = zz[cc];
                if (a.ln) v = (v - mean) * rstd * gm[cc] + bt[cc];
                if (a.drop)
                    v = dropout_keep(seed, (std::uint64_t)gr * D + tx * 4 + cc, a.thr) ? v * a.dscale : 0.0f;
                o[cc] = v;
            }
            if (gr < a.n) st4(a.y + (size_t)gr * D + tx * 4, make_float4(o[0], o[1], o[2], o[3]));
        }
        __syncthreads();
    }
}

// ---- backward: reduce pass ----------------------------------------------------------------------
struct BwdK {
    int n;
    const float* h;
    const float* d_o;
    const float* t;
    const float* st;
    const float* maps;
    float wa, wr;
    float* part;
    float* dh;
};

// A, dnum, dden of the tile's rows from Xs (h) and Ns (d_o; overwritten by dnum). den: h . m
template <int D>
__device__ __forceinline__ void tile_dnum(const BwdK& a, const float* Xs, float* Ns, const float* Ms, float4 m4,
                                          float4 c4, float ee, int ty, int tx, float (&dden)[4], float4 (&dov)[4]) {
    using C = Cfg<D>;
    float den[4];
#pragma unroll
    for (int j = 0; j < 4; j++) den[j] = row_reduce<C::TX>(dot4(ld4(Xs + (ty * 4 + j) * D + tx * 4), m4));
    float acc[4][4];
    tile_rowmm<D>(acc, Xs, Ms, ty, tx);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int r = ty * 4 + j;
        const float rd = 1.f / (den[j] + ee);
        const float4 dv = ld4(Ns + r * D + tx * 4);
        dov[j] = dv;
        const float4 dA = scale4(dv, a.wa);
        const float4 A = make_float4((acc[j][0] + c4.x) * rd, (acc[j][1] + c4.y) * rd, (acc[j][2] + c4.z) * rd,
                                     (acc[j][3] + c4.w) * rd);
        const float p = row_reduce<C::TX>(dot4(dA, A));
        dden[j] = -p * rd;
        st4(Ns + r * D + tx * 4, scale4(dA, rd));
    }
}

template <int D>
__global__ void __launch_bounds__(256) folded_bwd_reduce_kernel(BwdK a) {
    using C = Cfg<D>;
    using L = FL<D>;
    using W = WL<D>;
    extern __shared__ float4 smem4[];
    float* Ms = reinterpret_cast<float*>(smem4);
    float* Xs = Ms + D * D;
    float* Ns = Xs + C::TRR * D;
    float* Ts = Ns + C::TRR * D;
    float* dd = Ts + C::TRR * D;
    __shared__ float4 red4[C::NW * C::TX];
    __shared__ float red1[C::NW];
    const int tid = threadIdx.x, ty = tid / C::TX, tx = tid % C::TX;
    const int g = tid / C::OPT, lt = tid % C::OPT, oy = lt / C::TX, ox = lt % C::TX;
    const int c4i = tid % C::TX, r4 = tid / C::TX;
    for (int e = tid * 4; e < D * D; e += C::NT * 4) st4(Ms + e, ld4(a.st + L::M + e));
    const float4 m4 = ld4(a.st + L::MV + tx * 4), c4 = ld4(a.st + L::C + tx * 4);
    const float ee = a.st[L::E];
    float accS[4][4] = {}, accT[4][4] = {};
    float4 vr = make_float4(0.f, 0.f, 0.f, 0.f), vn = vr, vt = vr;
    float tau = 0.f;
    const int ntiles = ceil_div_d(a.n, C::TRR);
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int row0 = tile * C::TRR;
        load_rows_tile<D>(Xs, a.h, D, row0, a.n);
        load_rows_tile<D>(Ns, a.d_o, D, row0, a.n);
        if (a.t) load_rows_tile<D>(Ts, a.t, D, row0, a.n);
        __syncthreads();
        float dden[4];
        float4 dov[4];
        tile_dnum<D>(a, Xs, Ns, Ms, m4, c4, ee, ty, tx, dden, dov);
        if (tx == 0)
#pragma unroll
            for (int j = 0; j < 4; j++) dd[ty * 4 + j] = dden[j];
        __syncthreads();
#pragma unroll 4
        for (int r = g; r < C::TRR; r += C::G) {
            const float4 x = ld4(Xs + r * D + oy * 4);
            outer4(accS, x, ld4(Ns + r * D + ox * 4));
            if (a.t) outer4(accT, x, ld4(Ts + r * D + ox * 4));
        }
        for (int r = r4; r < C::TRR; r += C::TY) {
            const float dr = dd[r];
            vr = fma4(dr, ld4(Xs + r * D + c4i * 4), vr);
            vn = add4(vn, ld4(Ns + r * D + c4i * 4));
            if (a.t) vt = add4(vt, ld4(Ts + r * D + c4i * 4));
            if (c4i == 0) tau += dr;
        }
        __syncthreads();
    }
    float* rec = a.part + (size_t)blockIdx.x * W::PRECB;
    store_dxd<D>(accS, Xs, rec);
    store_dxd<D>(accT, Xs, rec + D * D);
    vr = block_colsum4<C::TX, C::NT>(vr, red4);
    vn = block_colsum4<C::TX, C::NT>(vn, red4);
    vt = block_colsum4<C::TX, C::NT>(vt, red4);
    if (tid < C::TX) {
        st4(rec + 2 * D * D + tid * 4, vr);
        st4(rec + 2 * D * D + D + tid * 4, vn);
        st4(rec + 2 * D * D + 2 * D + tid * 4, vt);
    }
    tau = block_sum<float, C::NT>(tau, red1);
    if (tid == 0) rec[2 * D * D + 3 * D] = tau;
}

// ---- backward fold: five short launches (phase 3 is one block: gamma_q, gamma_k) ------------------
template <int D>
__global__ void __launch_bounds__(1024)
    folded_bwd_fold_kernel(int phase, const float* __restrict__ part, int nblk, FoldedWeights w,
                           const float* __restrict__ st, float* __restrict__ work, int N, float wg, int graph) {
    using L = FL<D>;
    using W = WL<D>;
    __shared__ double sh[32];
    const int gid = blockIdx.x * blockDim.x + threadIdx.x, gnt = gridDim.x * blockDim.x;
    const double Nd = (double)N;
    float* S = work + W::T;  // S | Gt | r | tn | tt | tau, as the records
    const float* Gt = S + D * D;
    const float* r = S + 2 * D * D;
    const float* tn = r + D;
    const float* tt = tn + D;
    float* dkv = work + W::T + 3 * D * D;
    float* hk = dkv + D * D;
    float* WqG = hk + D * D;
    float* WkG = WqG + D * D;
    float* E = WkG + D * D;
    float* dks = work + W::V;
    float* f = dks + D;
    float* Wqu = f + D;
    float* Wku = Wqu + D;
    double* dsc = reinterpret_cast<double*>(work + W::V + 14 * D);  // [gq, gk, sq, sk]
    const float* G = st + L::G;
    const float* u = st + L::U;
    const float* KV = st + L::KV;
    const float* ks = st + L::KS;
    const double isq = 1.0 / (double)st[L::SQ], isk = 1.0 / (double)st[L::SK];
    if (phase == 0) {
        DFM_FOLD_LOOP(e, 2 * D * D + 3 * D + 1) {
            double s = 0;
            for (int b = 0; b < nblk; b++) s += part[(size_t)b * W::PRECB + e];
            S[e] = (float)s;
        }
    } else if (phase == 1) {
        const float tau = tt[D];
        DFM_FOLD_LOOP(e, D * D) {
            const int i = e / D, j = e % D;
            double a = 0, b = 0, c = 0, d = 0;
            for (int k = 0; k < D; k++) {
                a += (double)w.wq[i * D + k] * (double)S[k * D + j];
                b += (double)G[i * D + k] * (double)w.wk[j * D + k];
                c += (double)w.wq[i * D + k] * (double)G[k * D + j];
                d += (double)w.wk[i * D + k] * (double)G[k * D + j];
            }
            dkv[e] = (float)((a + (double)w.bq[i] * (double)tn[j]) * isq);
            hk[e] = (float)((b + (double)u[i] * (double)w.bk[j]) * isk);
            WqG[e] = (float)c;
            WkG[e] = (float)d;
        }
        DFM_FOLD_LOOP(i, D) {
            double a = 0, b = 0, c = 0;
            for (int k = 0; k < D; k++) {
                a += (double)w.wq[i * D + k] * (double)r[k];
                b += (double)w.wq[i * D + k] * (double)u[k];
                c += (double)w.wk[i * D + k] * (double)u[k];
            }
            dks[i] = (float)((a + (double)w.bq[i] * (double)tau) * isq);
            Wqu[i] = (float)b;
            Wku[i] = (float)c;
        }
    } else if (phase == 2) {
        DFM_FOLD_LOOP(e, D * D) {
            const int i = e / D, j = e % D;
            if (w.wv) {
                double a = 0;
                for (int k = 0; k < D; k++) a += (double)dkv[i * D + k] * (double)w.wv[k * D + j];
                E[e] = (float)a;
            } else {
                E[e] = dkv[e];
            }
        }
        DFM_FOLD_LOOP(i, D) {
            double a = dks[i];
            if (w.wv)
                for (int k = 0; k < D; k++) a += (double)dkv[i * D + k] * (double)w.bv[k];
            f[i] = (float)a;
        }
    } else if (phase == 3) {  // one block
        double gq = 0, gk = 0;
        DFM_FOLD_LOOP(e, D * D) {
            const int i = e / D, j = e % D;
            gq += (double)KV[e] * (double)dkv[e];
            gk += (double)E[j * D + i] * (double)hk[e];
        }
        DFM_FOLD_LOOP(i, D) {
            gq += (double)ks[i] * (double)dks[i];
            gk += (double)f[i] * (double)ks[i];
        }
        gq = block_sum_all(gq, sh);
        gk = block_sum_all(gk, sh);
        if (gid == 0) dsc[0] = gq, dsc[1] = gk;
    } else {
        const float tau = tt[D];
        const double gq = dsc[0], gk = dsc[1];
        const double aq = gq * isq, ak = gk * isk, q2 = gq * isq * isq, k2 = gk * isk * isk;
        float* P1 = work + W::P1;
        float* Z = work + W::Z;
        float* WG = work + W::WG;
        float* zb = work + W::ZB;
        DFM_FOLD_LOOP(e, D * D) {
            const int i = e / D, j = e % D;
            double a = 0, b = 0, p = 0, z = 0, v = 0;
            for (int k = 0; k < D; k++) {
                a += (double)KV[i * D + k] * (double)S[j * D + k];
                b += (double)E[i * D + k] * (double)G[k * D + j];
                p += (double)KV[k * D + i] * (double)w.wq[k * D + j];
                const double wqi = w.wq[k * D + i], wki = w.wk[k * D + i];
                z += -q2 * wqi * (double)w.wq[k * D + j] + isk * (double)E[k * D + i] * (double)w.wk[k * D + j] -
                     k2 * wki * (double)w.wk[k * D + j] + isk * wki * (double)E[k * D + j];
                v += (double)dkv[k * D + i] * (double)hk[j * D + k];
            }
            w.dwq[e] +=
                (float)((a + (double)ks[i] * (double)r[j] - aq * ((double)WqG[e] + (double)w.bq[i] * u[j])) * isq);
            w.dwk[e] +=
                (float)((b + (double)f[i] * (double)u[j] - ak * ((double)WkG[e] + (double)w.bk[i] * u[j])) * isk);
            P1[e] = (float)(p * isq);
            Z[e] = (float)z;
            if (w.wv) {
                double dv = v + (double)tn[i] * (double)u[j];
                if (graph) dv += (double)wg * (double)Gt[j * D + i];
                w.dwv[e] += (float)dv;
            }
            WG[e] = wg * (w.wv ? w.wv[e] : (i == j ? 1.0f : 0.0f));
        }
        DFM_FOLD_LOOP(i, D) {
            double a = 0, b = 0, z = 0, vt = 0, bv = 0;
            for (int k = 0; k < D; k++) {
                a += (double)KV[i * D + k] * (double)tn[k];
                b += (double)E[i * D + k] * (double)u[k];
                const double wqi = w.wq[k * D + i], wki = w.wk[k * D + i];
                z += -q2 * wqi * (double)w.bq[k] + isk * wki * (double)f[k] - k2 * wki * (double)w.bk[k] +
                     isk * (double)E[k * D + i] * (double)w.bk[k];
                if (w.wv) {
                    vt += (double)w.wv[k * D + i] * (double)tn[k];
                    bv += (double)dkv[k * D + i] * (double)ks[k];
                }
            }
            w.dbq[i] +=
                (float)((a + (double)ks[i] * (double)tau - aq * ((double)Wqu[i] + Nd * (double)w.bq[i])) * isq);
            w.dbk[i] += (float)((b + Nd * (double)f[i] - ak * ((double)Wku[i] + Nd * (double)w.bk[i])) * isk);
            zb[i] = (float)(z + (w.wv ? vt : (double)tn[i]));
            if (w.wv) {
                double dbv = bv + Nd * (double)tn[i];
                if (graph) dbv += (double)wg * (double)tt[i];
                w.dbv[i] += (float)dbv;
            }
        }
    }
}
#undef DFM_FOLD_LOOP

// ---- backward rows: dh = dnum P1 + dden m + h Z + zb + t WG + wr d_o --------------------------------
template <int D>
__global__ void __launch_bounds__(256) folded_bwd_rows_kernel(BwdK a) {
    using C = Cfg<D>;
    using L = FL<D>;
    using W = WL<D>;
    extern __shared__ float4 smem4[];
    float* Ms = reinterpret_cast<float*>(smem4);
    float* Ps = Ms + D * D;
    float* Zs = Ps + D * D;
    float* Ws = Zs + D * D;
    float* Xs = Ws + D * D;
    float* Ns = Xs + C::TRR * D;
    float* Ts = Ns + C::TRR * D;
    const int tid = threadIdx.x, ty = tid / C::TX, tx = tid % C::TX;
    for (int e = tid * 4; e < D * D; e += C::NT * 4) {
        st4(Ms + e, ld4(a.st + L::M + e));
        st4(Ps + e, ld4(a.maps + W::P1 + e));
        st4(Zs + e, ld4(a.maps + W::Z + e));
        if (a.t) st4(Ws + e, ld4(a.maps + W::WG + e));
    }
    const float4 m4 = ld4(a.st + L::MV + tx * 4), c4 = ld4(a.st + L::C + tx * 4), zb4 = ld4(a.maps + W::ZB + tx * 4);
    const float ee = a.st[L::E];
    const int ntiles = ceil_div_d(a.n, C::TRR);
    for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
        const int row0 = tile * C::TRR;
        load_rows_tile<D>(Xs, a.h, D, row0, a.n);
        load_rows_tile<D>(Ns, a.d_o, D, row0, a.n);
        if (a.t) load_rows_tile<D>(Ts, a.t, D, row0, a.n);
        __syncthreads();
        float dden[4];
        float4 dov[4];
        tile_dnum<D>(a, Xs, Ns, Ms, m4, c4, ee, ty, tx, dden, dov);
        __syncthreads();
        float acc[4][4];
        tile_rowmm<D>(acc, Ns, Ps, ty, tx);
        tile_rowmm_add<D>(acc, Xs, Zs, ty, tx);
        if (a.t) tile_rowmm_add<D>(acc, Ts, Ws, ty, tx);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int gr = row0 + ty * 4 + j;
            if (gr < a.n) {
                float4 o;
                o.x = acc[j][0] + dden[j] * m4.x + zb4.x + a.wr * dov[j].x;
                o.y = acc[j][1] + dden[j] * m4.y + zb4.y + a.wr * dov[j].y;
                o.z = acc[j][2] + dden[j] * m4.z + zb4.z + a.wr * dov[j].z;
                o.w = acc[j][3] + dden[j] * m4.w + zb4.w + a.wr * dov[j].w;
                st4(a.dh + (size_t)gr * D + tx * 4, o);
            }
        }
        __syncthreads();
    }
}

__global__ void csr_row_sums_kernel(Index rows, const std::int64_t* __restrict__ indptr,
                                    const float* __restrict__ values, float* __restrict__ r) {
    for (Index i = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; i < rows;
         i += static_cast<Index>(gridDim.x) * blockDim.x) {
        float acc = 0.f;  // in row order, as the CPU's graph_row_sums
        for (Index e = indptr[i]; e < indptr[i + 1]; ++e) acc += values[e];
        r[i] = acc;
    }
}

// ---- host side ------------------------------------------------------------------------------------
template <int D>
constexpr size_t smem_fwd_rows() { return (2 * D * D + 2 * Cfg<D>::TRR * D) * sizeof(float); }
template <int D>
constexpr size_t smem_bwd_reduce() { return (D * D + 3 * Cfg<D>::TRR * D + Cfg<D>::TRR) * sizeof(float); }
template <int D>
constexpr size_t smem_bwd_rows() { return (4 * D * D + 3 * Cfg<D>::TRR * D) * sizeof(float); }

template <typename Kern>
int prepare_dyn(Kern k, size_t smem) {  // raises the dynamic shared-memory limit; blocks per SM
    DFM_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    return blocks_per_sm(k, 256, smem);
}

template <int D>
int folded_bwd_nblk(int N) {
    static const int occ = prepare_dyn(folded_bwd_reduce_kernel<D>, smem_bwd_reduce<D>());
    return simple_rows_nblk<D>(N, 1, occ);
}

template <int D>
size_t folded_work_t(int N) {
    const size_t f = (size_t)simple_reduce_nblk<D>(N, 1) * Cfg<D>::PREC;
    const size_t b = (size_t)folded_bwd_nblk<D>(N) * WL<D>::PRECB;
    return WL<D>::PART + std::max(f, b) + 16;
}

template <int D>
void fwd_stats_t(GpuContext& ctx, int N, const float* h, const FoldedWeights& w, float* st, float* work) {
    const int nblk = simple_reduce_nblk<D>(N, 1);
    float* part = work + WL<D>::PART;
    simple_fwd_reduce_kernel<D><<<dim3(nblk, 1), Cfg<D>::NT, 0, ctx.stream()>>>(h, h, h, part, N, 1, 1);
    DFM_CUDA_LAUNCH_CHECK();
    for (int phase = 0; phase < 6; phase++) {
        const int nb = phase == 2 ? 1 : ceil_div(phase == 0 ? D * D + D : D * D, 128);
        folded_fwd_fold_kernel<D><<<nb, phase == 2 ? 1024 : 128, 0, ctx.stream()>>>(phase, part, nblk, w, st, work, N);
        DFM_CUDA_LAUNCH_CHECK();
    }
}

template <int D>
void fwd_rows_t(GpuContext& ctx, const RowsFwdK& k) {
    static const int occ = prepare_dyn(folded_fwd_rows_kernel<D>, smem_fwd_rows<D>());
    folded_fwd_rows_kernel<D><<<simple_rows_nblk<D>(k.n, 1, occ), Cfg<D>::NT, smem_fwd_rows<D>(), ctx.stream()>>>(k);
    DFM_CUDA_LAUNCH_CHECK();
}

template <int D>
void bwd_t(GpuContext& ctx, BwdK k, const FoldedWeights& w, float wg, float* work) {
    const int nblk = folded_bwd_nblk<D>(k.n);
    k.part = work + WL<D>::PART;
    k.maps = work;
    folded_bwd_reduce_kernel<D><<<nblk, Cfg<D>::NT, smem_bwd_reduce<D>(), ctx.stream()>>>(k);
    DFM_CUDA_LAUNCH_CHECK();
    for (int phase = 0; phase < 5; phase++) {
        const int nb = phase == 3 ? 1 : ceil_div(phase == 0 ? 2 * D * D + 3 * D + 1 : D * D, 128);
        folded_bwd_fold_kernel<D><<<nb, phase == 3 ? 1024 : 128, 0, ctx.stream()>>>(phase, k.part, nblk, w, k.st, work,
                                                                                   k.n, wg, k.t ? 1 : 0);
        DFM_CUDA_LAUNCH_CHECK();
    }
    static const int occ = prepare_dyn(folded_bwd_rows_kernel<D>, smem_bwd_rows<D>());
    folded_bwd_rows_kernel<D><<<simple_rows_nblk<D>(k.n, 1, occ), Cfg<D>::NT, smem_bwd_rows<D>(), ctx.stream()>>>(k);
    DFM_CUDA_LAUNCH_CHECK();
}

int as_rows(Index n) {
    DFM_CHECK(n < (Index{1} << 31), "folded simple attention: at most 2^31 - 1 rows");
    return static_cast<int>(n);
}

}  // namespace

bool folded_supported(Index d) { return d == 16 || d == 32 || d == 64; }

std::size_t folded_stats_floats(Index d) {
    switch (d) {
        case 16: return FL<16>::TOTAL;
        case 32: return FL<32>::TOTAL;
        case 64: return FL<64>::TOTAL;
    }
    fail("folded simple attention: unsupported d = ", d);
}

std::size_t folded_work_floats(const GpuContext&, Index n, Index d) {
    const int N = as_rows(std::max<Index>(n, 1));
    switch (d) {
        case 16: return folded_work_t<16>(N);
        case 32: return folded_work_t<32>(N);
        case 64: return folded_work_t<64>(N);
    }
    fail("folded simple attention: unsupported d = ", d);
}

void folded_fwd_stats(GpuContext& ctx, Index n, Index d, const float* h, const FoldedWeights& w, float* stats,
                      float* work) {
    if (n == 0) return;
    const int N = as_rows(n);
    switch (d) {
        case 16: fwd_stats_t<16>(ctx, N, h, w, stats, work); break;
        case 32: fwd_stats_t<32>(ctx, N, h, w, stats, work); break;
        case 64: fwd_stats_t<64>(ctx, N, h, w, stats, work); break;
        default: fail("folded simple attention: unsupported d = ", d);
    }
}

void folded_fwd_rows(GpuContext& ctx, const FoldedRowsFwd& a) {
    if (a.n == 0) return;
    RowsFwdK k{as_rows(a.n), a.h, a.g, a.rowsum, a.stats, a.wa, a.wg, a.wr, a.z, a.ln, a.gamma, a.beta, a.eps,
               a.drop_p > 0.0f,
               static_cast<std::uint32_t>(std::ceil(static_cast<double>(a.drop_p) * (1u << 24))),  // cpu::dropout_fwd
               a.drop_p < 1.0f ? 1.0f / (1.0f - a.drop_p) : 0.0f, a.seed, a.salt, a.y};
    DFM_ASSERT(!k.drop || a.seed);
    DFM_ASSERT(!a.g || a.rowsum);
    switch (a.d) {
        case 16: fwd_rows_t<16>(ctx, k); break;
        case 32: fwd_rows_t<32>(ctx, k); break;
        case 64: fwd_rows_t<64>(ctx, k); break;
        default: fail("folded simple attention: unsupported d = ", a.d);
    }
}

void folded_bwd(GpuContext& ctx, Index n, Index d, const float* h, const float* d_o, const float* t,
                const float* stats, const FoldedWeights& w, float wa, float wg, float wr, float* work, float* dh) {
    if (n == 0) return;
    BwdK k{as_rows(n), h, d_o, t, stats, work, wa, wr, nullptr, dh};
    switch (d) {
        case 16: bwd_t<16>(ctx, k, w, wg, work); break;
        case 32: bwd_t<32>(ctx, k, w, wg, work); break;
        case 64: bwd_t<64>(ctx, k, w, wg, work); break;
        default: fail("folded simple attention: unsupported d = ", d);
    }
}

void csr_row_sums(GpuContext& ctx, const CsrView& m, float* r) {
    if (m.rows == 0) return;
    csr_row_sums_kernel<<<blocks_for(m.rows, 256, 8 * ctx.sms()), 256, 0, ctx.stream()>>>(m.rows, m.indptr, m.values,
                                                                                         r);
    DFM_CUDA_LAUNCH_CHECK();
}

}  // namespace dfm::cuda
