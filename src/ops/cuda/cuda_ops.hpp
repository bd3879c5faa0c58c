// The op families of DIFFormer on the GPU: host-side launchers over raw device pointers, with
// the semantics of dfm::cpu (ops/ops.hpp) unless a comment says otherwise. Every launcher runs on
// the context's stream and returns at once; nothing synchronises except where stated.
// Conventions: matrices are row-major with an explicit leading dimension (ld); a [N, H, D]
// tensor is [N, H*D]; input gradients are OVERWRITTEN, parameter gradients ACCUMULATED (+=),
// as in ops.hpp. The kernels compile without Eigen: this header is shared by .cu and .cpp files.
//
// Not here: the model (model_cuda.cpp) and the public, CUDA-free API (ops/cuda_backend.hpp).
#pragma once
#include <cstddef>
#include <cstdint>

#include "ops/cuda/cuda_core.hpp"

namespace dfm::cuda {

using Index = std::int64_t;
enum class Norm { global, node };  // mirrors dfm::QkNorm (ops.hpp), kept Eigen-free here

// The splitmix64 mix that DIFFormer (src/model/difformer.cpp) uses to derive per-layer dropout
// seeds: mix_seed(seed, 0) for the input block, mix_seed(seed, l + 1) for layer l.
std::uint64_t mix_seed_host(std::uint64_t seed, std::uint64_t salt);

// ---- GEMM (cuBLAS, row-major through the transposition trick) --------------------------------
// C[m, n] = alpha op(A)[m, k] op(B)[k, n] + beta C.
void gemm(GpuContext& ctx, bool ta, bool tb, Index m, Index n, Index k, float alpha, const float* a, Index lda,
          const float* b, Index ldb, float beta, float* c, Index ldc);
// C[p, q] = alpha X^T Y + beta C for tall X [rows, p], Y [rows, q] and a contiguous C. The sum
// over rows is cut into chunks (a strided-batched GEMM, then one GEMV over the partials), so that
// a 64 x 64 result over 10^7 rows still keeps every SM busy. Deterministic.
void gemm_tn_tall(GpuContext& ctx, Index rows, Index p, Index q, float alpha, const float* x, Index ldx,
                  const float* y, Index ldy, float beta, float* c);
std::size_t gemm_tn_tall_scratch(const GpuContext& ctx, Index rows, Index p, Index q);

// ---- linear layers -----------------------------------------------------------------------------
// y[n, out] = x[n, in] w^T + b (b may be null): cublasLt with the bias in the epilogue where it
// has an algorithm (DIFFORMER_NO_LT=1 turns it off), else cublasSgemm and a bias pass.
void linear_fwd(GpuContext& ctx, const float* x, Index n, Index in, const float* w, Index out, const float* b,
                float* y);
// dx = dy w + dx_beta * dx (dx may be null); dw += dy^T x; db += colsum(dy) (db may be null).
void linear_bwd(GpuContext& ctx, const float* x, Index n, Index in, const float* w, Index out, const float* dy,
                float* dx, float dx_beta, float* dw, float* db);

// ---- small dense helpers -----------------------------------------------------------------------
void add_bias(GpuContext& ctx, float* y, Index n, Index cols, Index ld, const float* b);  // y[i, :] += b
// out[c] = beta * out[c] + sum_i x[i, c]; two-stage, deterministic.
void colsum(GpuContext& ctx, const float* x, Index n, Index cols, Index ld, float* out, float beta);
std::size_t colsum_scratch(Index cols);
// *out = sum of squares of x[0 .. count), accumulated in double (out is a device double).
void sum_squares(GpuContext& ctx, const float* x, Index count, double* out);
std::size_t sum_squares_scratch();
// at[cols, rows] = a[rows, cols]^T ; c[rows, cols] += b^T for b [cols, rows].
void transpose(GpuContext& ctx, const float* a, Index rows, Index cols, float* at);
void add_transposed(GpuContext& ctx, float* c, Index rows, Index cols, const float* b);
void axpby(GpuContext& ctx, Index count, float alpha, const float* x, float beta, float* y);  // y = a x + b y
// *p = value, enqueued on the stream (a kernel argument: safe to call again before it runs).
void set_device_u64(GpuContext& ctx, std::uint64_t* p, std::uint64_t value);

// ---- sparse: CSR row-per-warp gather ------------------------------------------------------------
struct CsrView {
  Index rows = 0, cols = 0, nnz = 0;
  const std::int64_t* indptr = nullptr;  // rows + 1
  const std::int32_t* indices = nullptr;
  const float* values = nullptr;
};
// For every row i and column c < width, r < reps:
//   y[i*ldy + r*rep_stride + c] = alpha * sum_e values[e] x[indices[e]*ldx + c] + beta * y[...] + bias[c]
// (bias may be null; beta = 0 never reads y). Used for the graph term G = adj V and its transpose,
// and for the sparse-input linear layer (x CSR times W^T, and x^T CSR times dY for the weight).
void spmm(GpuContext& ctx, const CsrView& a, const float* x, Index ldx, Index width, float* y, Index ldy, float alpha,
          float beta, const float* bias = nullptr, int reps = 1, Index rep_stride = 0);

// ---- row-wise combine, LayerNorm, ReLU, dropout (one warp per row) -------------------------------
// Dropout uses the counter-based hash of cpu::dropout_fwd with seed mix_seed(*seed, salt): the
// mask is bit-identical to the CPU's for the same seed, and nothing is stored (backward
// recomputes it). seed is a device pointer so that a captured CUDA graph can replay new seeds.
struct RowTerm {  // z[i, c] += w * sum_{h < heads} p[i*ld + h*head_stride + c]
  const float* p = nullptr;
  Index ld = 0, head_stride = 0;
  int heads = 1;
  float w = 0.0f;
};
struct RowNormFwd {
  Index n = 0, d = 0;
  RowTerm t[3];
  float* z = nullptr;  // optional: store z (the LayerNorm input), [n, d]
  bool ln = false;
  const float *gamma = nullptr, *beta = nullptr;
  float eps = 1e-5f;
  bool relu = false;
  float drop_p = 0.0f;
  const std::uint64_t* seed = nullptr;
  std::uint64_t salt = 0;
  float* y = nullptr;  // dropout(relu(LN(z))) [n, d]
};
void row_norm_fwd(GpuContext& ctx, const RowNormFwd& a);
// Backward of row_norm_fwd from z (its stored input): dz = LN'(relu'(dropout'(dy))); writes
// out1 = s1 * dz and, if out2, out2 = s2 * dz (may alias nothing). dgamma, dbeta accumulated.
struct RowNormBwd {
  Index n = 0, d = 0;
  const float* dy = nullptr;
  const float* z = nullptr;
  bool ln = false;
  const float *gamma = nullptr, *beta = nullptr;
  float eps = 1e-5f;
  float *dgamma = nullptr, *dbeta = nullptr;
  bool relu = false;
  float drop_p = 0.0f;
  const std::uint64_t* seed = nullptr;
  std::uint64_t salt = 0;
  float* out1 = nullptr;
  float s1 = 1.0f;
  float* out2 = nullptr;
  float s2 = 1.0f;
};
void row_norm_bwd(GpuContext& ctx, const RowNormBwd& a);
std::size_t row_norm_bwd_scratch(Index d);

// ---- losses and optimiser -------------------------------------------------------------------------
// Mean cross-entropy over the rows idx[0 .. count) (all n rows when idx is null) into *loss
// (device float); dlogits overwritten, zero outside the index set. With idx null, dlogits may be
// logits (in place).
void cross_entropy(GpuContext& ctx, const float* logits, Index n, Index classes, const std::int32_t* labels,
                   const std::int32_t* idx, Index count, float* dlogits, float* loss);
std::size_t cross_entropy_scratch();

struct AdamHyper {
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.0f;
};
// torch.optim.Adam with coupled L2 (as train/adam.cpp), one kernel over the flat buffer. state is
// 3 device doubles {t, step_size, sqrt(bias_correction2)}: t advances on the device, so that a
// captured training step replays correctly. Zero the state to start.
void adam_step(GpuContext& ctx, float* params, const float* grads, float* m, float* v, Index count,
               const AdamHyper& h, double* state);

// ---- DIFFormer-s (simple) global attention -------------------------------------------------------
struct AttnDims {
  Index n = 0, d = 0;
  int heads = 1, vheads = 1;  // Q, K [n, heads*d]; V [n, vheads*d] (vheads 1: shared by all heads)
};
// Saved state, device memory owned by the caller:
//   stats  simple_stats_floats(): [inv_q, inv_k, c, 0] | KVn (heads*d*d, head h row-major d x d)
//          | ksn (heads*d) | vs (vheads*d), with KVn = sum_l kn_l v_l^T, ksn = sum_l kn_l,
//          vs = sum_l v_l, kn = K * inv_k (global) or the row-normalised K (node)
//   den    [n, heads] = qn_i . ksn + n
// With Norm::node, qn and kn ([n, heads*d]) receive the row-normalised Q and K and qnorm, knorm
// ([n, heads]) their norms; with Norm::global they may be null.
struct SimpleSaved {
  float* stats = nullptr;
  float* den = nullptr;
  float *qn = nullptr, *kn = nullptr, *qnorm = nullptr, *knorm = nullptr;
};
std::size_t simple_stats_floats(const AttnDims& dm);
void simple_attn_fwd(GpuContext& ctx, const AttnDims& dm, Norm norm, const float* q, const float* k, const float* v,
                     float* a, SimpleSaved& s);
// Recomputes a from q (node: from s.qn, which must still hold the forward's values) and the stats.
void simple_attn_rows(GpuContext& ctx, const AttnDims& dm, Norm norm, const float* q, const SimpleSaved& s, float* a);
// Backward. dA is read as da_scale * da[i*da_ld + h*da_head_stride + c] (stride 0: one [n, d]
// gradient shared by all heads). q and k are OVERWRITTEN by dQ and dK; a is clobbered; dv =
// dv_beta * dv + the attention's part. Node norm: s.qn, s.kn are clobbered too (recompute them
// with the forward first). dden: [n, heads] floats of workspace.
void simple_attn_bwd(GpuContext& ctx, const AttnDims& dm, Norm norm, float* q, float* k, const float* v, float* a,
                     const float* da, Index da_ld, Index da_head_stride, float da_scale, SimpleSaved& s, float* dv,
                     float dv_beta, float* dden);
std::size_t simple_attn_scratch(const GpuContext& ctx, const AttnDims& dm);

// The same attention (global norm only, d in {16, 32, 64}) with its passes over N fused
// (attn_simple_fused.cu, the library port of dev/cuda/attn_simple.cu version 2): two passes over
// N forward, three backward. Its own stats layout (simple_fused_stats_floats) and workspace
// (simple_fused_work_floats, about 2 n heads floats). dA has Q's layout [n, heads*d], unscaled.
// dq may be q and dk may be k (in place); dv is OVERWRITTEN.
bool simple_fused_supported(const AttnDims& dm);
std::size_t simple_fused_stats_floats(const AttnDims& dm);
std::size_t simple_fused_work_floats(const AttnDims& dm);
void simple_fused_fwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v, float* a,
                      float* stats, float* work);
void simple_fused_rows(GpuContext& ctx, const AttnDims& dm, const float* q, const float* stats, float* a);
void simple_fused_bwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v,
                      const float* a, const float* da, const float* stats, float* dq, float* dk, float* dv,
                      float* work);

// ---- DIFFormer-a (sigmoid) attention, flash-style ---------------------------------------------------
// w_ij = sigmoid(q_i . k_j) (no scaling), A_i = sum_j w_ij v_j / r_i, r_i = sum_j w_ij saved in
// rowsum [n, heads]. d <= 64: register-tiled kernels streaming key tiles through shared memory,
// O(n d) memory; 64 < d <= 512 (sigmoid_attn_max_d): key chunks through cuBLAS, O(n B) scratch.
// Precision of the attention products (the row normaliser r_i is accumulated in fp32 always):
//   fp32  the fp32 CUDA-core kernels (exact; dQ summed by atomics, in no fixed order:
//         DIFFORMER_SIGMOID_SIMT=pass for a bitwise reproducible, slower backward);
//         DIFFORMER_SIGMOID_IMPL=mma: on the tensor cores as three TF32 products with the operands
//         split hi + lo ("3xTF32"), a little faster (fwd + bwd 34.5 against 39.1 ms at N = 3e4,
//         d = 64) but its error grows with N (2.9e-5 at N = 4099 against 6.2e-7;
//         tests/test_cuda_attention.cpp)
//   tf32  operands rounded to TF32, fp32 accumulation (about 3e-4 relative error)
//   bf16  operands rounded to bf16, fp32 accumulation (about 3e-3)
// tf32 and bf16 run mma.sync kernels with the score tile in registers (attn_sigmoid_tc.cuh);
// DIFFORMER_SIGMOID_IMPL=wmma selects the WMMA kernels (scores through shared memory).
enum class AttnPrecision { fp32, tf32, bf16 };
void sigmoid_attn_fwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v, float* a,
                      float* rowsum, AttnPrecision prec = AttnPrecision::fp32);
// dq, dk overwritten; dq may alias q (each query tile is read before its gradient is written),
// nothing else may alias; dv = dv_beta * dv + the attention's part.
// delta: [n, heads] floats of workspace. dA as in simple_attn_bwd.
void sigmoid_attn_bwd(GpuContext& ctx, const AttnDims& dm, const float* q, const float* k, const float* v,
                      const float* a, const float* rowsum, const float* da, Index da_ld, Index da_head_stride,
                      float da_scale, float* dq, float* dk, float* dv, float dv_beta, float* delta,
                      AttnPrecision prec = AttnPrecision::fp32);
int sigmoid_attn_max_d();

}  // namespace dfm::cuda
