// DIFFormer-s (simple) attention on the GPU, linear in N. The O(N d^2) products go through
// cuBLAS (K^T V, Q^T dnum over all N via gemm_tn_tall; the per-row maps Q KV and dnum KV^T as
// plain GEMMs); the rest is small fused kernels: one warp per (row, head) for the row epilogues,
// one block for the d x d finalisations. Everything scalar (the norms, the correction c) stays on
// the device: no host round trip, so a training step can be captured in a CUDA graph.
//
//   forward   inv_q = 1/||Q||_F, inv_k = 1/||K||_F (node norm: rows normalised first, inv = 1)
//             KVn_h = inv_k K_h^T V_h, ksn_h = inv_k sum K_h, vs_h = sum V_h
//             A_h = (inv_q Q_h KVn_h + vs_h) / den,  den = inv_q Q_h . ksn_h + N
//   backward  dnum = dA/den, dden = -(dA . A)/den
//             dKVn = inv_q Q^T dnum, dksn = inv_q Q^T dden, dvs = sum dnum
//             c = sum_h <KVn_h, dKVn_h> + ksn_h . dksn_h   (= sum dQn (.) Qn = sum dKn (.) Kn)
//             dV += inv_k K dKVn + dvs
//             dQ  = inv_q (dnum KVn^T + dden ksn) - c inv_q^2 Q
//             dK  = inv_k (V dKVn^T + dksn)       - c inv_k^2 K
// dQ and dK are built in place of Q and K (first the elementwise part, then += GEMM), so the
// backward needs no buffer of its own beyond dden [N, H]. The dev/cuda scratchpad holds a fused
// variant (fewer passes over N) that is not in the library yet.
#include "ops/cuda/cuda_util.cuh"

namespace dfm::cuda {
namespace {

struct StatsLayout {
  Index kv, ks, vs, total;
  explicit StatsLayout(const AttnDims& dm) {
    kv = 4;
    ks = kv + dm.heads * dm.d * dm.d;
    vs = ks + dm.heads * dm.d;
    total = vs + dm.vheads * dm.d;
  }
};

#define DFM_WARP_LOOP(count)                                                               \
  const int lane = threadIdx.x & 31;                                                       \
  const Index nwarps = (static_cast<Index>(gridDim.x) * blockDim.x) >> 5;                  \
  for (Index w = (blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x) >> 5; w < (count); w += nwarps)

__global__ void row_normalize_kernel(const float* __restrict__ x, float* __restrict__ xn, float* __restrict__ norms,
                                     Index n, int heads, Index d) {
  DFM_WARP_LOOP(n * heads) {
    const float* xr = x + w * d;  // row i, head h is the w-th d-block of the [n, heads*d] tensor
    float ss = 0.0f;
    for (Index c = lane; c < d; c += 32) ss += xr[c] * xr[c];
    ss = warp_sum(ss);
    const float nr = fmaxf(sqrtf(ss), 1e-12f);
    for (Index c = lane; c < d; c += 32) xn[w * d + c] = xr[c] / nr;
    if (lane == 0) norms[w] = nr;
  }
}

// x (in: the raw tensor; out: its gradient) from dxn, the gradient of the normalised rows.
__global__ void row_normalize_bwd_kernel(const float* __restrict__ dxn, float* x, const float* __restrict__ norms,
                                         Index n, int heads, Index d) {
  DFM_WARP_LOOP(n * heads) {
    const float sc = norms[w];
    float dot = 0.0f;
    for (Index c = lane; c < d; c += 32) dot += dxn[w * d + c] * (x[w * d + c] / sc);
    dot = warp_sum(dot);
    if (sc <= 1e-12f) dot = 0.0f;
    for (Index c = lane; c < d; c += 32) x[w * d + c] = (dxn[w * d + c] - (x[w * d + c] / sc) * dot) / sc;
  }
}

__global__ void simple_fwd_finalize_kernel(float* stats, const double* sq, bool global, Index scaled) {
  float inv_q = 1.0f, inv_k = 1.0f;
  if (global) {
    inv_q = 1.0f / static_cast<float>(sqrt(sq[0]));
    inv_k = 1.0f / static_cast<float>(sqrt(sq[1]));
  }
  if (threadIdx.x == 0) {
    stats[0] = inv_q;
    stats[1] = inv_k;
    stats[2] = 0.0f;
    stats[3] = 0.0f;
  }
  for (Index e = threadIdx.x; e < scaled; e += blockDim.x) stats[4 + e] *= inv_k;  // KV then ks
}

__global__ void simple_rows_epilogue_kernel(const float* __restrict__ qx, float* a, const float* __restrict__ stats,
                                            float* __restrict__ den, Index n, int heads, int vheads, Index d,
                                            Index ks_off, Index vs_off) {
  const float inv_q = stats[0];
  const Index hd = heads * d;
  DFM_WARP_LOOP(n * heads) {
    const Index i = w / heads;
    const int h = static_cast<int>(w - i * heads), hv = vheads == 1 ? 0 : h;
    const float* qr = qx + i * hd + h * d;
    const float* ks = stats + ks_off + h * d;
    const float* vs = stats + vs_off + hv * d;
    float dot = 0.0f;
    for (Index c = lane; c < d; c += 32) dot += qr[c] * ks[c];
    dot = warp_sum(dot);
    const float dn = dot * inv_q + static_cast<float>(n);
    float* ar = a + i * hd + h * d;
    for (Index c = lane; c < d; c += 32) ar[c] = (ar[c] * inv_q + vs[c]) / dn;
    if (lane == 0) den[w] = dn;
  }
}

// a (in: A; out: dnum = dA/den); dden = -(dA . A)/den
__global__ void simple_bwd_prep_kernel(const float* __restrict__ da, Index da_ld, Index da_hs, float scale, float* a,
                                       const float* __restrict__ den, float* __restrict__ dden, Index n, int heads,
                                       Index d) {
  const Index hd = heads * d;
  DFM_WARP_LOOP(n * heads) {
    const Index i = w / heads;
    const int h = static_cast<int>(w - i * heads);
    const float* g = da + i * da_ld + h * da_hs;
    float* ar = a + i * hd + h * d;
    const float dn = den[w];
    float dot = 0.0f;
    for (Index c = lane; c < d; c += 32) dot += scale * g[c] * ar[c];
    dot = warp_sum(dot);  // every lane has read its part of A before any lane overwrites it
    for (Index c = lane; c < d; c += 32) ar[c] = scale * g[c] / dn;
    if (lane == 0) dden[w] = -dot / dn;
  }
}

__global__ void simple_bwd_finalize_kernel(float* stats, float* dkv, float* dks, const float* __restrict__ dvs,
                                           float* __restrict__ kvq, float* __restrict__ dkvk, float* __restrict__ dvs_out,
                                           bool global, int heads, int vheads, Index d, Index kv_off, Index ks_off) {
  __shared__ double sh[32];
  const float inv_q = stats[0], inv_k = stats[1];
  const float* kvn = stats + kv_off;
  const float* ksn = stats + ks_off;
  double c = 0.0;
  for (Index e = threadIdx.x; e < heads * d * d; e += blockDim.x) {
    const float g = dkv[e] * inv_q;
    dkv[e] = g;
    c += static_cast<double>(kvn[e]) * g;
    kvq[e] = kvn[e] * inv_q;
    dkvk[e] = g * inv_k;
  }
  for (Index e = threadIdx.x; e < heads * d; e += blockDim.x) {
    const float g = dks[e] * inv_q;
    dks[e] = g;
    c += static_cast<double>(ksn[e]) * g;
  }
  for (Index e = threadIdx.x; e < vheads * d; e += blockDim.x) {
    if (vheads == heads) {
      dvs_out[e] = dvs[e];
    } else {
      float s = 0.0f;
      for (int h = 0; h < heads; ++h) s += dvs[h * d + e];
      dvs_out[e] = s;
    }
  }
  c = warp_sum(c);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < (blockDim.x >> 5); ++w) t += sh[w];
    stats[2] = global ? static_cast<float>(t) : 0.0f;
  }
}

// The elementwise part of dQ and dK, in place of Q and K (see the header comment).
__global__ void simple_bwd_pre_kernel(float* qx, float* kx, const float* __restrict__ stats,
                                      const float* __restrict__ dden, const float* __restrict__ dksn, Index n,
                                      int heads, Index d, Index ks_off) {
  const float inv_q = stats[0], inv_k = stats[1], c = stats[2];
  const float cq = c * inv_q * inv_q, ck = c * inv_k * inv_k;
  const float* ksn = stats + ks_off;
  const Index hd = heads * d, total = n * hd;
  for (Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index i = e / hd, r = e - i * hd;
    const Index h = r / d;
    qx[e] = -cq * qx[e] + inv_q * dden[i * heads + h] * ksn[r];
    kx[e] = -ck * kx[e] + inv_k * dksn[r];
  }
}

int warp_blocks(const GpuContext& ctx, Index warps) { return blocks_for(warps, 8, 16 * ctx.sms()); }

}  // namespace

std::size_t simple_stats_floats(const AttnDims& dm) { return static_cast<std::size_t>(StatsLayout(dm).total); }

std::size_t simple_attn_scratch(const GpuContext& ctx, const AttnDims& dm) {
  const Index hd = dm.heads * dm.d, hvd = dm.vheads * dm.d;
  const std::size_t own = (3 * dm.heads * dm.d * dm.d + 2 * hd + hvd) * sizeof(float) + 16 * 256;
  const std::size_t nested = std::max({gemm_tn_tall_scratch(ctx, dm.n, dm.d, dm.d), colsum_scratch(std::max(hd, hvd)),
                                       sum_squares_scratch()});
  return own + nested;
}

void simple_attn_rows(GpuContext& ctx, const AttnDims& dm, Norm norm, const float* q, const SimpleSaved& s, float* a) {
  const StatsLayout L(dm);
  const Index hd = dm.heads * dm.d;
  const float* qx = norm == Norm::node ? s.qn : q;
  for (int h = 0; h < dm.heads; ++h)
    gemm(ctx, false, false, dm.n, dm.d, dm.d, 1.0f, qx + h * dm.d, hd, s.stats + L.kv + h * dm.d * dm.d, dm.d, 0.0f,
         a + h * dm.d, hd);
  simple_rows_epilogue_kernel<<<warp_blocks(ctx, dm.n * dm.heads), 256, 0, ctx.stream()>>>(
      qx, a, s.stats, s.den, dm.n, dm.heads, dm.vheads, dm.d, L.ks, L.vs);
  DFM_CUDA_LAUNCH_CHECK();
}

void simple_attn_fwd(GpuContext& ctx, const AttnDims& dm, Norm norm, const float* q, const float* k, const float* v,
                     float* a, SimpleSaved& s) {
  const StatsLayout L(dm);
  const Index hd = dm.heads * dm.d, hvd = dm.vheads * dm.d;
  const float* kx = k;  // the rows pass below reads Q (or s.qn) itself
  if (norm == Norm::node) {
    DFM_ASSERT(s.qn && s.kn && s.qnorm && s.knorm);
    row_normalize_kernel<<<warp_blocks(ctx, dm.n * dm.heads), 256, 0, ctx.stream()>>>(q, s.qn, s.qnorm, dm.n,
                                                                                       dm.heads, dm.d);
    DFM_CUDA_LAUNCH_CHECK();
    row_normalize_kernel<<<warp_blocks(ctx, dm.n * dm.heads), 256, 0, ctx.stream()>>>(k, s.kn, s.knorm, dm.n,
                                                                                       dm.heads, dm.d);
    DFM_CUDA_LAUNCH_CHECK();
    kx = s.kn;
  }
  ctx.ensure_scratch(simple_attn_scratch(ctx, dm));
  ScratchScope scope(ctx);
  double* sq = scope.take<double>(2);
  if (norm == Norm::global) {
    sum_squares(ctx, q, dm.n * hd, sq);
    sum_squares(ctx, k, dm.n * hd, sq + 1);
  }
  colsum(ctx, kx, dm.n, hd, hd, s.stats + L.ks, 0.0f);
  colsum(ctx, v, dm.n, hvd, hvd, s.stats + L.vs, 0.0f);
  for (int h = 0; h < dm.heads; ++h) {
    const int hv = dm.vheads == 1 ? 0 : h;
    gemm_tn_tall(ctx, dm.n, dm.d, dm.d, 1.0f, kx + h * dm.d, hd, v + hv * dm.d, hvd, 0.0f,
                 s.stats + L.kv + h * dm.d * dm.d);
  }
  simple_fwd_finalize_kernel<<<1, 256, 0, ctx.stream()>>>(s.stats, sq, norm == Norm::global, L.vs - L.kv);
  DFM_CUDA_LAUNCH_CHECK();
  simple_attn_rows(ctx, dm, norm, q, s, a);
}

void simple_attn_bwd(GpuContext& ctx, const AttnDims& dm, Norm norm, float* q, float* k, const float* v, float* a,
                     const float* da, Index da_ld, Index da_head_stride, float da_scale, SimpleSaved& s, float* dv,
                     float dv_beta, float* dden) {
  const StatsLayout L(dm);
  const Index d = dm.d, hd = dm.heads * d, hvd = dm.vheads * d, dd = d * d;
  float* qx = norm == Norm::node ? s.qn : q;
  float* kx = norm == Norm::node ? s.kn : k;
  ctx.ensure_scratch(simple_attn_scratch(ctx, dm));
  ScratchScope scope(ctx);
  float* dkv = scope.take<float>(static_cast<std::size_t>(dm.heads * dd));
  float* kvq = scope.take<float>(static_cast<std::size_t>(dm.heads * dd));
  float* dkvk = scope.take<float>(static_cast<std::size_t>(dm.heads * dd));
  float* dks = scope.take<float>(static_cast<std::size_t>(hd));
  float* dvs = scope.take<float>(static_cast<std::size_t>(hd));
  float* dvs_out = scope.take<float>(static_cast<std::size_t>(hvd));
  float* dnum = a;

  simple_bwd_prep_kernel<<<warp_blocks(ctx, dm.n * dm.heads), 256, 0, ctx.stream()>>>(
      da, da_ld, da_head_stride, da_scale, a, s.den, dden, dm.n, dm.heads, d);
  DFM_CUDA_LAUNCH_CHECK();
  for (int h = 0; h < dm.heads; ++h) {
    gemm_tn_tall(ctx, dm.n, d, d, 1.0f, qx + h * d, hd, dnum + h * d, hd, 0.0f, dkv + h * dd);
    gemm_tn_tall(ctx, dm.n, d, 1, 1.0f, qx + h * d, hd, dden + h, dm.heads, 0.0f, dks + h * d);
  }
  colsum(ctx, dnum, dm.n, hd, hd, dvs, 0.0f);
  simple_bwd_finalize_kernel<<<1, 256, 0, ctx.stream()>>>(s.stats, dkv, dks, dvs, kvq, dkvk, dvs_out,
                                                          norm == Norm::global, dm.heads, dm.vheads, d, L.kv, L.ks);
  DFM_CUDA_LAUNCH_CHECK();
  for (int h = 0; h < dm.heads; ++h) {  // dV (+)= kn dKVn, before K is overwritten
    const int hv = dm.vheads == 1 ? 0 : h;
    const float beta = (dm.vheads == 1 && h > 0) ? 1.0f : dv_beta;
    gemm(ctx, false, false, dm.n, d, d, 1.0f, kx + h * d, hd, dkvk + h * dd, d, beta, dv + hv * d, hvd);
  }
  simple_bwd_pre_kernel<<<blocks_for(dm.n * hd, 256, 8 * ctx.sms()), 256, 0, ctx.stream()>>>(
      qx, kx, s.stats, dden, dks, dm.n, dm.heads, d, L.ks);
  DFM_CUDA_LAUNCH_CHECK();
  for (int h = 0; h < dm.heads; ++h) {
    const int hv = dm.vheads == 1 ? 0 : h;
    gemm(ctx, false, true, dm.n, d, d, 1.0f, dnum + h * d, hd, kvq + h * dd, d, 1.0f, qx + h * d, hd);
    gemm(ctx, false, true, dm.n, d, d, 1.0f, v + hv * d, hvd, dkvk + h * dd, d, 1.0f, kx + h * d, hd);
  }
  add_bias(ctx, dv, dm.n, hvd, hvd, dvs_out);
  if (norm == Norm::node) {
    row_normalize_bwd_kernel<<<warp_blocks(ctx, dm.n * dm.heads), 256, 0, ctx.stream()>>>(qx, q, s.qnorm, dm.n,
                                                                                           dm.heads, d);
    DFM_CUDA_LAUNCH_CHECK();
    row_normalize_bwd_kernel<<<warp_blocks(ctx, dm.n * dm.heads), 256, 0, ctx.stream()>>>(kx, k, s.knorm, dm.n,
                                                                                           dm.heads, d);
    DFM_CUDA_LAUNCH_CHECK();
  }
}

}  // namespace dfm::cuda
