// Row-wise and reduction kernels: bias, column sums, sums of squares, the fused combine +
// LayerNorm + ReLU + dropout row kernel and its backward, cross-entropy, Adam. One warp per row
// for row kernels; reductions are two-stage (per-block partials in scratch, then one pass that
// sums them in a fixed order), so results do not depend on scheduling.
#include <cmath>

#include "ops/cuda/cuda_util.cuh"

namespace dfm::cuda {

std::uint64_t mix_seed_host(std::uint64_t seed, std::uint64_t salt) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (salt + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

namespace {

constexpr int kColsumMaxBlocks = 1024;
constexpr int kSumSqBlocks = 1024;
constexpr int kRowBlocksPerSm = 4;

// ---- elementwise -------------------------------------------------------------------------------
__global__ void add_bias_kernel(float* y, Index n, Index cols, Index ld, const float* __restrict__ b) {
  const Index total = n * cols;
  for (Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<Index>(gridDim.x) * blockDim.x) {
    const Index i = e / cols, c = e - i * cols;
    y[i * ld + c] += b[c];
  }
}

__global__ void axpby_kernel(Index count, float alpha, const float* x, float beta, float* y) {
  for (Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<Index>(gridDim.x) * blockDim.x)
    y[e] = beta == 0.0f ? alpha * x[e] : alpha * x[e] + beta * y[e];
}

__global__ void set_u64_kernel(std::uint64_t* p, std::uint64_t value) { *p = value; }

// ---- column sums: block (32, 8) covers 32 columns; grid.x blocks stride over rows -------------
__global__ void colsum_partial_kernel(const float* __restrict__ x, Index n, Index cols, Index ld,
                                      float* __restrict__ part) {
  __shared__ float sh[8][33];
  const Index col = blockIdx.y * 32 + threadIdx.x;
  float s = 0.0f;
  if (col < cols)
    for (Index r = blockIdx.x * 8 + threadIdx.y; r < n; r += static_cast<Index>(gridDim.x) * 8) s += x[r * ld + col];
  sh[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    float t = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += sh[k][threadIdx.x];
    part[blockIdx.x * cols + col] = t;
  }
}

__global__ void colsum_final_kernel(const float* __restrict__ part, int nb, Index cols, float* out, float beta) {
  const Index c = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x;
  if (c >= cols) return;
  double s = 0.0;
  for (int b = 0; b < nb; ++b) s += part[b * cols + c];
  out[c] = beta == 0.0f ? static_cast<float>(s) : beta * out[c] + static_cast<float>(s);
}

int colsum_blocks(Index n) { return blocks_for(n, 8 * 16, kColsumMaxBlocks); }

// ---- sum of squares ------------------------------------------------------------------------------
__global__ void sumsq_partial_kernel(const float* __restrict__ x, Index count, double* part) {
  __shared__ double sh[32];
  double s = 0.0;  // double from the start, as cpu::simple_attn_fwd's norm (memory-bound anyway)
  for (Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; e < count;
       e += static_cast<Index>(gridDim.x) * blockDim.x)
    s = fma(static_cast<double>(x[e]), static_cast<double>(x[e]), s);
  double d = warp_sum(s);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = d;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < (blockDim.x >> 5); ++w) t += sh[w];
    part[blockIdx.x] = t;
  }
}

__global__ void sumsq_final_kernel(const double* part, int nb, double* out) {
  __shared__ double sh[32];
  double s = 0.0;
  for (int b = threadIdx.x; b < nb; b += blockDim.x) s += part[b];
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < (blockDim.x >> 5); ++w) t += sh[w];
    *out = t;
  }
}

// ---- combine + LayerNorm + ReLU + dropout ---------------------------------------------------------
struct RowFwdK {
  Index n, d;
  RowTerm t[3];
  float* z;
  bool ln;
  const float *gamma, *beta;
  float eps;
  bool relu;
  bool drop;
  std::uint32_t threshold;
  float scale;
  const std::uint64_t* seed;
  std::uint64_t salt;
  float* y;
};

template <int CPL>  // columns per lane: d <= 32 * CPL
__global__ void __launch_bounds__(256) row_norm_fwd_kernel(RowFwdK a) {
  const int lane = threadIdx.x & 31;
  const Index warp = (blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x) >> 5;
  const Index nwarps = (static_cast<Index>(gridDim.x) * blockDim.x) >> 5;
  const std::uint64_t seed = a.drop ? mix_seed_dev(*a.seed, a.salt) : 0;
  const Index d = a.d;
  for (Index i = warp; i < a.n; i += nwarps) {
    float x[CPL];
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const Index c = lane + 32 * j;
      float s = 0.0f;
      if (c < d) {
#pragma unroll
        for (int t = 0; t < 3; ++t) {
          const RowTerm& term = a.t[t];
          if (!term.p) continue;
          const float* p = term.p + i * term.ld + c;
          float acc = 0.0f;
          for (int h = 0; h < term.heads; ++h) acc += p[h * term.head_stride];
          s += term.w * acc;
        }
        if (a.z) a.z[i * d + c] = s;
      }
      x[j] = s;
      sum += s;
    }
    float rstd = 1.0f, mean = 0.0f;
    if (a.ln) {
      mean = warp_sum(sum) / static_cast<float>(d);
      float var = 0.0f;
#pragma unroll
      for (int j = 0; j < CPL; ++j)
        if (lane + 32 * j < d) var += (x[j] - mean) * (x[j] - mean);
      var = warp_sum(var) / static_cast<float>(d);
      rstd = 1.0f / sqrtf(var + a.eps);
    }
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const Index c = lane + 32 * j;
      if (c >= d) continue;
      float v = x[j];
      if (a.ln) v = (v - mean) * rstd * a.gamma[c] + a.beta[c];
      if (a.relu) v = v > 0.0f ? v : 0.0f;
      if (a.drop) v = dropout_keep(seed, static_cast<std::uint64_t>(i * d + c), a.threshold) ? v * a.scale : 0.0f;
      a.y[i * d + c] = v;
    }
  }
}

struct RowBwdK {
  Index n, d;
  const float* dy;
  const float* z;
  bool ln;
  const float *gamma, *beta;
  float eps;
  bool relu, drop;
  std::uint32_t threshold;
  float scale;
  const std::uint64_t* seed;
  std::uint64_t salt;
  float* out1;
  float s1;
  float* out2;
  float s2;
  float* part;  // [gridDim.x, 2d]: per-block dgamma | dbeta
};

template <int CPL>
__global__ void __launch_bounds__(256) row_norm_bwd_kernel(RowBwdK a) {
  __shared__ float red[8][2 * 32 * CPL];
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  const Index warp = (blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x) >> 5;
  const Index nwarps = (static_cast<Index>(gridDim.x) * blockDim.x) >> 5;
  const std::uint64_t seed = a.drop ? mix_seed_dev(*a.seed, a.salt) : 0;
  const Index d = a.d;
  const float inv_d = 1.0f / static_cast<float>(d);
  float dg[CPL], db[CPL];
#pragma unroll
  for (int j = 0; j < CPL; ++j) dg[j] = db[j] = 0.0f;
  for (Index i = warp; i < a.n; i += nwarps) {
    float x[CPL], g[CPL];
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const Index c = lane + 32 * j;
      x[j] = c < d ? a.z[i * d + c] : 0.0f;
      g[j] = c < d ? a.dy[i * d + c] : 0.0f;
      sum += x[j];
    }
    float mean = 0.0f, rstd = 1.0f;
    if (a.ln) {
      mean = warp_sum(sum) * inv_d;
      float var = 0.0f;
#pragma unroll
      for (int j = 0; j < CPL; ++j)
        if (lane + 32 * j < d) var += (x[j] - mean) * (x[j] - mean);
      var = warp_sum(var) * inv_d;
      rstd = 1.0f / sqrtf(var + a.eps);
    }
    float sg = 0.0f, sgx = 0.0f;
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const Index c = lane + 32 * j;
      if (c >= d) continue;
      const float xh = a.ln ? (x[j] - mean) * rstd : x[j];
      float gj = g[j];
      if (a.drop) gj = dropout_keep(seed, static_cast<std::uint64_t>(i * d + c), a.threshold) ? gj * a.scale : 0.0f;
      if (a.relu) {
        const float yv = a.ln ? xh * a.gamma[c] + a.beta[c] : xh;
        gj = yv > 0.0f ? gj : 0.0f;
      }
      if (a.ln) {
        dg[j] += gj * xh;
        db[j] += gj;
        const float gy = gj * a.gamma[c];
        g[j] = gy;
        sg += gy;
        sgx += gy * xh;
        x[j] = xh;
      } else {
        g[j] = gj;
      }
    }
    if (a.ln) {
      sg = warp_sum(sg) * inv_d;
      sgx = warp_sum(sgx) * inv_d;
    }
#pragma unroll
    for (int j = 0; j < CPL; ++j) {
      const Index c = lane + 32 * j;
      if (c >= d) continue;
      const float dz = a.ln ? rstd * (g[j] - sg - x[j] * sgx) : g[j];
      a.out1[i * d + c] = a.s1 * dz;
      if (a.out2) a.out2[i * d + c] = a.s2 * dz;
    }
  }
  if (!a.ln) return;
#pragma unroll
  for (int j = 0; j < CPL; ++j) {
    red[wib][lane + 32 * j] = dg[j];
    red[wib][32 * CPL + lane + 32 * j] = db[j];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < 2 * 32 * CPL; e += blockDim.x) {
    float s = 0.0f;
    for (int w = 0; w < (blockDim.x >> 5); ++w) s += red[w][e];
    const int half = e / (32 * CPL), c = e % (32 * CPL);
    if (c < d) a.part[blockIdx.x * 2 * d + half * d + c] = s;
  }
}

__global__ void ln_param_grad_final_kernel(const float* __restrict__ part, int nb, Index d, float* dgamma,
                                           float* dbeta) {
  const Index e = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x;
  if (e >= 2 * d) return;
  double s = 0.0;
  for (int b = 0; b < nb; ++b) s += part[b * 2 * d + e];
  if (e < d)
    dgamma[e] += static_cast<float>(s);
  else
    dbeta[e - d] += static_cast<float>(s);
}

int row_blocks(const GpuContext& ctx, Index n) { return blocks_for(n, 8, kRowBlocksPerSm * ctx.sms()); }

std::uint32_t dropout_threshold(float p) {  // as cpu::dropout_fwd
  return static_cast<std::uint32_t>(std::ceil(static_cast<double>(p) * (1u << 24)));
}

// ---- cross-entropy ---------------------------------------------------------------------------------
constexpr int kCeBlocks = 512;
__global__ void __launch_bounds__(256)
    ce_kernel(const float* logits, Index classes, const std::int32_t* __restrict__ labels,
              const std::int32_t* __restrict__ idx, Index count, float inv, float* dlogits, double* part) {
  __shared__ double sh[8];
  const int lane = threadIdx.x & 31;
  const Index warp = (blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x) >> 5;
  const Index nwarps = (static_cast<Index>(gridDim.x) * blockDim.x) >> 5;
  double loss = 0.0;
  for (Index t = warp; t < count; t += nwarps) {
    const Index i = idx ? idx[t] : t;
    const float* l = logits + i * classes;  // may alias dlogits: every read precedes the writes
    float mx = -INFINITY;
    for (Index c = lane; c < classes; c += 32) mx = fmaxf(mx, l[c]);
    mx = warp_max(mx);
    float se = 0.0f;
    for (Index c = lane; c < classes; c += 32) se += expf(l[c] - mx);
    se = warp_sum(se);
    const float lse = mx + logf(se);
    const int y = labels[i];
    const float ly = l[y];  // before dlogits (possibly in place) overwrites it
    __syncwarp();
    float* dl = dlogits + i * classes;
    for (Index c = lane; c < classes; c += 32) dl[c] = expf(l[c] - lse) * inv - (c == y ? inv : 0.0f);
    if (lane == 0) loss += static_cast<double>(lse - ly);
  }
  if (lane == 0) sh[threadIdx.x >> 5] = loss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0.0;
    for (int w = 0; w < 8; ++w) s += sh[w];
    part[blockIdx.x] = s;
  }
}

__global__ void ce_final_kernel(const double* part, int nb, double inv, float* loss) {
  if (threadIdx.x != 0) return;
  double s = 0.0;
  for (int b = 0; b < nb; ++b) s += part[b];
  *loss = static_cast<float>(s * inv);
}

// ---- Adam ----------------------------------------------------------------------------------------
__global__ void adam_prologue_kernel(double* st, float lr, float beta1, float beta2) {
  st[0] += 1.0;
  const double t = st[0];
  const double bc1 = 1.0 - pow(static_cast<double>(beta1), t);
  const double bc2 = 1.0 - pow(static_cast<double>(beta2), t);
  st[1] = static_cast<double>(static_cast<float>(static_cast<double>(lr) / bc1));
  st[2] = static_cast<double>(static_cast<float>(sqrt(bc2)));
}

__global__ void adam_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                            float* __restrict__ v, Index count, float b1, float b2, float wd, float eps,
                            const double* __restrict__ st) {
  const float step_size = static_cast<float>(st[1]), bc2_sqrt = static_cast<float>(st[2]);
  for (Index i = blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<Index>(gridDim.x) * blockDim.x) {
    const float gi = g[i] + wd * p[i];
    const float mi = b1 * m[i] + (1.0f - b1) * gi;
    const float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    p[i] -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
  }
}

}  // namespace

// ---- launchers -----------------------------------------------------------------------------------
void add_bias(GpuContext& ctx, float* y, Index n, Index cols, Index ld, const float* b) {
  if (n * cols == 0) return;
  add_bias_kernel<<<blocks_for(n * cols, 256, 8 * ctx.sms()), 256, 0, ctx.stream()>>>(y, n, cols, ld, b);
  DFM_CUDA_LAUNCH_CHECK();
}

void axpby(GpuContext& ctx, Index count, float alpha, const float* x, float beta, float* y) {
  if (count == 0) return;
  axpby_kernel<<<blocks_for(count, 256, 8 * ctx.sms()), 256, 0, ctx.stream()>>>(count, alpha, x, beta, y);
  DFM_CUDA_LAUNCH_CHECK();
}

void set_device_u64(GpuContext& ctx, std::uint64_t* p, std::uint64_t value) {
  set_u64_kernel<<<1, 1, 0, ctx.stream()>>>(p, value);
  DFM_CUDA_LAUNCH_CHECK();
}

std::size_t colsum_scratch(Index cols) {
  return static_cast<std::size_t>(kColsumMaxBlocks) * static_cast<std::size_t>(cols) * sizeof(float) + 256;
}

void colsum(GpuContext& ctx, const float* x, Index n, Index cols, Index ld, float* out, float beta) {
  if (cols == 0) return;
  ctx.ensure_scratch(colsum_scratch(cols));
  ScratchScope scope(ctx);
  const int nb = n > 0 ? colsum_blocks(n) : 1;
  float* part = scope.take<float>(static_cast<std::size_t>(nb * cols));
  if (n > 0) {
    colsum_partial_kernel<<<dim3(nb, static_cast<unsigned>((cols + 31) / 32)), dim3(32, 8), 0, ctx.stream()>>>(
        x, n, cols, ld, part);
    DFM_CUDA_LAUNCH_CHECK();
  } else {
    DFM_CUDA_CHECK(cudaMemsetAsync(part, 0, cols * sizeof(float), ctx.stream()));
  }
  colsum_final_kernel<<<blocks_for(cols, 256, 1 << 20), 256, 0, ctx.stream()>>>(part, nb, cols, out, beta);
  DFM_CUDA_LAUNCH_CHECK();
}

std::size_t sum_squares_scratch() { return kSumSqBlocks * sizeof(double) + 256; }

void sum_squares(GpuContext& ctx, const float* x, Index count, double* out) {
  ctx.ensure_scratch(sum_squares_scratch());
  ScratchScope scope(ctx);
  const int nb = blocks_for(std::max<Index>(count, 1), 256 * 8, kSumSqBlocks);
  double* part = scope.take<double>(static_cast<std::size_t>(nb));
  sumsq_partial_kernel<<<nb, 256, 0, ctx.stream()>>>(x, count, part);
  DFM_CUDA_LAUNCH_CHECK();
  sumsq_final_kernel<<<1, 256, 0, ctx.stream()>>>(part, nb, out);
  DFM_CUDA_LAUNCH_CHECK();
}

void row_norm_fwd(GpuContext& ctx, const RowNormFwd& a) {
  if (a.n == 0) return;
  DFM_CHECK(a.d >= 1 && a.d <= 512, "GPU: hidden width ", a.d, " is not supported (1 .. 512)");
  RowFwdK k{a.n, a.d, {a.t[0], a.t[1], a.t[2]}, a.z, a.ln, a.gamma, a.beta, a.eps, a.relu,
            a.drop_p > 0.0f, dropout_threshold(a.drop_p), a.drop_p < 1.0f ? 1.0f / (1.0f - a.drop_p) : 0.0f,
            a.seed, a.salt, a.y};
  DFM_ASSERT(!k.drop || a.seed);
  const int nb = row_blocks(ctx, a.n);
  if (a.d <= 32)
    row_norm_fwd_kernel<1><<<nb, 256, 0, ctx.stream()>>>(k);
  else if (a.d <= 64)
    row_norm_fwd_kernel<2><<<nb, 256, 0, ctx.stream()>>>(k);
  else if (a.d <= 128)
    row_norm_fwd_kernel<4><<<nb, 256, 0, ctx.stream()>>>(k);
  else if (a.d <= 256)
    row_norm_fwd_kernel<8><<<nb, 256, 0, ctx.stream()>>>(k);
  else  // wide layers (the paper's 20News / image settings use hidden 300)
    row_norm_fwd_kernel<16><<<nb, 256, 0, ctx.stream()>>>(k);
  DFM_CUDA_LAUNCH_CHECK();
}

std::size_t row_norm_bwd_scratch(Index d) {
  return static_cast<std::size_t>(kRowBlocksPerSm) * 1024 * 2 * static_cast<std::size_t>(d) * sizeof(float) + 256;
}

void row_norm_bwd(GpuContext& ctx, const RowNormBwd& a) {
  if (a.n == 0) return;
  DFM_CHECK(a.d >= 1 && a.d <= 512, "GPU: hidden width ", a.d, " is not supported (1 .. 512)");
  ctx.ensure_scratch(row_norm_bwd_scratch(a.d));
  ScratchScope scope(ctx);
  const int nb = row_blocks(ctx, a.n);
  float* part = a.ln ? scope.take<float>(static_cast<std::size_t>(nb) * 2 * a.d) : nullptr;
  RowBwdK k{a.n, a.d, a.dy, a.z, a.ln, a.gamma, a.beta, a.eps, a.relu, a.drop_p > 0.0f,
            dropout_threshold(a.drop_p), a.drop_p < 1.0f ? 1.0f / (1.0f - a.drop_p) : 0.0f, a.seed, a.salt,
            a.out1, a.s1, a.out2, a.s2, part};
  DFM_ASSERT(!k.drop || a.seed);
  if (a.d <= 32)
    row_norm_bwd_kernel<1><<<nb, 256, 0, ctx.stream()>>>(k);
  else if (a.d <= 64)
    row_norm_bwd_kernel<2><<<nb, 256, 0, ctx.stream()>>>(k);
  else if (a.d <= 128)
    row_norm_bwd_kernel<4><<<nb, 256, 0, ctx.stream()>>>(k);
  else if (a.d <= 256)
    row_norm_bwd_kernel<8><<<nb, 256, 0, ctx.stream()>>>(k);
  else  // wide layers (the paper's 20News / image settings use hidden 300)
    row_norm_bwd_kernel<16><<<nb, 256, 0, ctx.stream()>>>(k);
  DFM_CUDA_LAUNCH_CHECK();
  if (a.ln) {
    ln_param_grad_final_kernel<<<blocks_for(2 * a.d, 128, 1 << 20), 128, 0, ctx.stream()>>>(part, nb, a.d, a.dgamma,
                                                                                          a.dbeta);
    DFM_CUDA_LAUNCH_CHECK();
  }
}

std::size_t cross_entropy_scratch() { return kCeBlocks * sizeof(double) + 256; }

void cross_entropy(GpuContext& ctx, const float* logits, Index n, Index classes, const std::int32_t* labels,
                   const std::int32_t* idx, Index count, float* dlogits, float* loss) {
  if (!idx) count = n;
  DFM_CHECK(count > 0, "cross_entropy: empty index set");
  ctx.ensure_scratch(cross_entropy_scratch());
  ScratchScope scope(ctx);
  if (idx) DFM_CUDA_CHECK(cudaMemsetAsync(dlogits, 0, n * classes * sizeof(float), ctx.stream()));
  const int nb = blocks_for(count, 8, kCeBlocks);
  double* part = scope.take<double>(static_cast<std::size_t>(nb));
  const float inv = 1.0f / static_cast<float>(count);
  ce_kernel<<<nb, 256, 0, ctx.stream()>>>(logits, classes, labels, idx, count, inv, dlogits, part);
  DFM_CUDA_LAUNCH_CHECK();
  ce_final_kernel<<<1, 32, 0, ctx.stream()>>>(part, nb, static_cast<double>(inv), loss);
  DFM_CUDA_LAUNCH_CHECK();
}

void adam_step(GpuContext& ctx, float* params, const float* grads, float* m, float* v, Index count,
               const AdamHyper& h, double* state) {
  adam_prologue_kernel<<<1, 1, 0, ctx.stream()>>>(state, h.lr, h.beta1, h.beta2);
  DFM_CUDA_LAUNCH_CHECK();
  if (count == 0) return;
  adam_kernel<<<blocks_for(count, 256, 8 * ctx.sms()), 256, 0, ctx.stream()>>>(params, grads, m, v, count, h.beta1,
                                                                               h.beta2, h.weight_decay, h.eps, state);
  DFM_CUDA_LAUNCH_CHECK();
}

}  // namespace dfm::cuda
