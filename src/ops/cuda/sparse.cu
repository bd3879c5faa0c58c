// CSR times dense, one warp per row: the 32 lanes first load up to 32 (column, value) pairs of
// the row, then broadcast them one at a time by shuffle while every lane gathers its columns of
// the source row (128-byte coalesced loads per edge). No atomics: rows are independent, and the
// transpose needed by a backward pass is a separate CSR (GraphOp::adj_t, the sparse input's x^T).
// Measured against cuSPARSE SpMM: not yet (ROADMAP in the report).
#include "ops/cuda/cuda_util.cuh"

namespace dfm::cuda {
namespace {

struct SpmmK {
  Index rows;
  const std::int64_t* indptr;
  const std::int32_t* indices;
  const float* values;
  const float* x;
  Index ldx, width;
  float* y;
  Index ldy;
  float alpha, beta;
  const float* bias;
  int reps;
  Index rep_stride;
};

template <int CPL>  // columns per lane in one pass over the row's edges
__global__ void __launch_bounds__(256) spmm_kernel(SpmmK a) {
  const int lane = threadIdx.x & 31;
  const Index warp = (blockIdx.x * static_cast<Index>(blockDim.x) + threadIdx.x) >> 5;
  const Index nwarps = (static_cast<Index>(gridDim.x) * blockDim.x) >> 5;
  for (Index i = warp; i < a.rows; i += nwarps) {
    const Index e0 = a.indptr[i], e1 = a.indptr[i + 1];
    for (Index col0 = 0; col0 < a.width; col0 += 32 * CPL) {
      float acc[CPL];
#pragma unroll
      for (int k = 0; k < CPL; ++k) acc[k] = 0.0f;
      for (Index eb = e0; eb < e1; eb += 32) {
        const int cnt = static_cast<int>(e1 - eb < 32 ? e1 - eb : 32);
        int my_j = 0;
        float my_v = 0.0f;
        if (lane < cnt) {
          my_j = a.indices[eb + lane];
          my_v = a.values[eb + lane];
        }
#pragma unroll 4
        for (int t = 0; t < cnt; ++t) {
          const int j = __shfl_sync(kFullMask, my_j, t);
          const float v = __shfl_sync(kFullMask, my_v, t);
          const float* xr = a.x + static_cast<Index>(j) * a.ldx + col0;
#pragma unroll
          for (int k = 0; k < CPL; ++k) {
            const Index c = lane + 32 * k;
            if (col0 + c < a.width) acc[k] = fmaf(v, __ldg(xr + c), acc[k]);
          }
        }
      }
#pragma unroll
      for (int k = 0; k < CPL; ++k) {
        const Index c = col0 + lane + 32 * k;
        if (c >= a.width) continue;
        const float val = a.alpha * acc[k] + (a.bias ? a.bias[c] : 0.0f);
        for (int r = 0; r < a.reps; ++r) {
          float* out = a.y + i * a.ldy + r * a.rep_stride + c;
          *out = a.beta == 0.0f ? val : val + a.beta * *out;
        }
      }
    }
  }
}

}  // namespace

void spmm(GpuContext& ctx, const CsrView& m, const float* x, Index ldx, Index width, float* y, Index ldy, float alpha,
          float beta, const float* bias, int reps, Index rep_stride) {
  if (m.rows == 0 || width == 0) return;
  SpmmK k{m.rows, m.indptr, m.indices, m.values, x, ldx, width, y, ldy, alpha, beta, bias, reps, rep_stride};
  const int nb = blocks_for(m.rows, 8, 16 * ctx.sms());
  if (width <= 32)
    spmm_kernel<1><<<nb, 256, 0, ctx.stream()>>>(k);
  else if (width <= 64)
    spmm_kernel<2><<<nb, 256, 0, ctx.stream()>>>(k);
  else
    spmm_kernel<4><<<nb, 256, 0, ctx.stream()>>>(k);
  DFM_CUDA_LAUNCH_CHECK();
}

}  // namespace dfm::cuda
