// One whole DIFFormer-s diffusion layer on the GPU with the Q/K/V projections folded into d x d
// algebra (docs/ALGEBRA.md; the CPU twin is src/ops/cpu/simple_fused.cpp): one head, the official
// global q/k norm, d in {16, 32, 64}, value projection on or off, graph term on or off. Neither Q,
// K, V nor the attention output is ever stored: a layer needs, besides its input h [n, d], one
// [n, d] buffer for the graph product and its saved LayerNorm input z [n, d]. Kernels live in
// attn_simple_fused.cu (they share its tile helpers); model_cuda.cpp drives them.
//
// Forward of layer l (h = h_l):
//   folded_fwd_stats   one pass over h: G = h^T h, u = h^T 1 (per-block partials, fixed-order sum),
//                      then one block folds them with the weights into the saved stats
//                      (s_q, s_k, KV, ks, and the row maps M, c, m, e of A = (h M + c) / (h m + e))
//   spmm               g = adj h                                      (caller, sparse.cu)
//   folded_fwd_rows    one pass: z = wa A + wg (g Wv^T + rowsum(adj) bv^T) + wr h, stored; then
//                      y = dropout(LN(z)). y may overwrite g or h (row tiles are read first).
// Backward (d_o = dz, the gradient at z, from row_norm_bwd; t = adj^T d_o by the caller):
//   folded_bwd         [reduce] one pass over h, d_o, t: h^T dnum, h^T dden, h^T t, column sums
//                      (A, dnum, dden recomputed from h); [fold] one block: parameter gradients
//                      (+=) and the maps P, Z, zb; [rows] one pass: dh = dnum P + dden m + h Z + zb
//                      + wg t Wv + wr d_o. dh may overwrite d_o.
#pragma once
#include <cstddef>
#include <cstdint>

#include "ops/cuda/cuda_ops.hpp"

namespace dfm::cuda {

struct FoldedWeights {  // device pointers into the flat parameter (gradient) buffer
  const float *wq = nullptr, *bq = nullptr, *wk = nullptr, *bk = nullptr;
  const float *wv = nullptr, *bv = nullptr;  // null: V = h
  float *dwq = nullptr, *dbq = nullptr, *dwk = nullptr, *dbk = nullptr, *dwv = nullptr, *dbv = nullptr;
};

struct FoldedRowsFwd {
  Index n = 0, d = 0;
  const float* h = nullptr;
  const float* g = nullptr;       // adj h, or null without the graph term
  const float* rowsum = nullptr;  // [n] row sums of adj (needed with g)
  const float* stats = nullptr;
  float wa = 1.0f, wg = 1.0f, wr = 0.0f;
  float* z = nullptr;  // stored LayerNorm input [n, d]
  bool ln = true;
  const float *gamma = nullptr, *beta = nullptr;
  float eps = 1e-5f;
  float drop_p = 0.0f;
  const std::uint64_t* seed = nullptr;
  std::uint64_t salt = 0;
  float* y = nullptr;  // may be h or g
};

bool folded_supported(Index d);
std::size_t folded_stats_floats(Index d);
std::size_t folded_work_floats(const GpuContext& ctx, Index n, Index d);
void folded_fwd_stats(GpuContext& ctx, Index n, Index d, const float* h, const FoldedWeights& w, float* stats,
                      float* work);
void folded_fwd_rows(GpuContext& ctx, const FoldedRowsFwd& a);
// t may be null (no graph term; wg unused). dh may alias d_o.
void folded_bwd(GpuContext& ctx, Index n, Index d, const float* h, const float* d_o, const float* t,
                const float* stats, const FoldedWeights& w, float wa, float wg, float wr, float* work, float* dh);
// r[i] = sum of row i's values
void csr_row_sums(GpuContext& ctx, const CsrView& m, float* r);

}  // namespace dfm::cuda
