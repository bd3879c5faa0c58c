// cuBLAS-backed dense ops: row-major GEMMs through the transposition trick (a row-major [r, c]
// matrix is the column-major [c, r] matrix with the same leading dimension, so C = A B becomes
// C^T = B^T A^T with the operands swapped), the tall X^T Y reduction, linear layers.
#include <cublasLt.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "ops/cuda/cuda_ops.hpp"

namespace dfm::cuda {
namespace {

int as_int(Index v, const char* what) {
  if (v < 0 || v > INT_MAX) fail("GPU: ", what, " = ", v, " exceeds the 32-bit range of cuBLAS");
  return static_cast<int>(v);
}

// Chunking of gemm_tn_tall: one plain GEMM below kTallPlainRows rows; above, about four chunks
// per SM (a p x q result is only one or two cuBLAS tiles, so the chunks are the parallelism),
// none shorter than kTallMinChunkRows rows, and at most kTallMaxPartialFloats of partials.
constexpr Index kTallPlainRows = 4096;
constexpr Index kTallMinChunkRows = 256;
constexpr Index kTallMaxPartialFloats = Index{8} << 20;

Index tall_chunks(const GpuContext& ctx, Index rows, Index p, Index q) {
  if (rows < kTallPlainRows) return 1;
  Index nb = std::min<Index>(rows / kTallMinChunkRows, 4 * ctx.sms());
  nb = std::min(nb, std::max<Index>(1, kTallMaxPartialFloats / std::max<Index>(1, p * q)));
  return std::max<Index>(nb, 1);
}

// y = x w^T + b through cublasLt with the bias in the GEMM's epilogue (one pass over y instead of
// two). false when cublasLt has no algorithm for these shapes and alignments: the caller falls
// back to cublasSgemm + add_bias.
int pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  int al = 256;
  while (al > 4 && (a % al) != 0) al >>= 1;
  return al;
}

bool linear_fwd_lt(GpuContext& ctx, const float* x, Index n, Index in, const float* w, Index out, const float* b,
                   float* y) {
  if (ctx.lt_disabled || pointer_alignment(b) < 16 || n > INT_MAX || in > INT_MAX || out > INT_MAX) return false;
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  bool ok = false;
  const cublasComputeType_t compute =
      ctx.precision() == Precision::tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
  const std::size_t ws = ctx.blas_workspace_bytes();
  const std::uint32_t al_w = pointer_alignment(w), al_x = pointer_alignment(x), al_y = pointer_alignment(y);
  // column-major view: y^T [out, n] = (w^T)^T [out, in] x^T [in, n]; w^T is w stored [in, out]
  if (cublasLtMatmulDescCreate(&op, compute, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &b, sizeof b) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&la, CUDA_R_32F, in, out, in) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&lb, CUDA_R_32F, in, n, in) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, out, n, out) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_w, sizeof al_w) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_x, sizeof al_x) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_y, sizeof al_y) ==
          CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_y, sizeof al_y) ==
          CUBLAS_STATUS_SUCCESS) {
    cublasLtMatmulHeuristicResult_t res{};
    int count = 0;
    if (cublasLtMatmulAlgoGetHeuristic(ctx.lt(), op, la, lb, lc, lc, pref, 1, &res, &count) ==
            CUBLAS_STATUS_SUCCESS &&
        count > 0) {
      const float one = 1.0f, zero = 0.0f;
      ok = cublasLtMatmul(ctx.lt(), op, &one, w, la, x, lb, &zero, y, lc, y, lc, &res.algo, ctx.blas_workspace(), ws,
                          ctx.stream()) == CUBLAS_STATUS_SUCCESS;
    }
  }
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (lc) cublasLtMatrixLayoutDestroy(lc);
  if (lb) cublasLtMatrixLayoutDestroy(lb);
  if (la) cublasLtMatrixLayoutDestroy(la);
  if (op) cublasLtMatmulDescDestroy(op);
  if (!ok) cudaGetLastError();
  return ok;
}

}  // namespace

void gemm(GpuContext& ctx, bool ta, bool tb, Index m, Index n, Index k, float alpha, const float* a, Index lda,
          const float* b, Index ldb, float beta, float* c, Index ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // C = beta C
    if (beta != 1.0f) {
      DFM_ASSERT(ldc == n);
      axpby(ctx, m * n, 0.0f, c, beta, c);
    }
    return;
  }
  DFM_CUBLAS_CHECK(cublasSgemm(ctx.blas(), tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                               as_int(n, "n"), as_int(m, "m"), as_int(k, "k"), &alpha, b, as_int(ldb, "ldb"), a,
                               as_int(lda, "lda"), &beta, c, as_int(ldc, "ldc")));
}

std::size_t gemm_tn_tall_scratch(const GpuContext& ctx, Index rows, Index p, Index q) {
  const Index nb = tall_chunks(ctx, rows, p, q);
  return nb > 1 ? static_cast<std::size_t>(nb * p * q) * sizeof(float) + 256 : 0;
}

void gemm_tn_tall(GpuContext& ctx, Index rows, Index p, Index q, float alpha, const float* x, Index ldx,
                  const float* y, Index ldy, float beta, float* c) {
  const Index nb = tall_chunks(ctx, rows, p, q);
  if (nb == 1) {
    gemm(ctx, true, false, p, q, rows, alpha, x, ldx, y, ldy, beta, c, q);
    return;
  }
  ctx.ensure_scratch(gemm_tn_tall_scratch(ctx, rows, p, q));
  const float* ones = ctx.ones(static_cast<std::size_t>(nb));
  ScratchScope scope(ctx);
  float* part = scope.take<float>(static_cast<std::size_t>(nb * p * q));
  const Index chunk = rows / nb;  // nb full chunks; the rest of the rows goes through one more GEMM
  const float one = 1.0f, zero = 0.0f;
  // Partial i = X_i^T Y_i, stored row-major [p, q] (column-major [q, p]) at part + i*p*q.
  DFM_CUBLAS_CHECK(cublasSgemmStridedBatched(
      ctx.blas(), CUBLAS_OP_N, CUBLAS_OP_T, as_int(q, "q"), as_int(p, "p"), as_int(chunk, "chunk"), &one, y,
      as_int(ldy, "ldy"), static_cast<long long>(chunk * ldy), x, as_int(ldx, "ldx"),
      static_cast<long long>(chunk * ldx), &zero, part, as_int(q, "q"), static_cast<long long>(p * q),
      as_int(nb, "chunks")));
  // C = alpha * sum_i partial_i + beta * C: the partials are the columns of a [p*q, nb] matrix.
  DFM_CUBLAS_CHECK(cublasSgemv(ctx.blas(), CUBLAS_OP_N, as_int(p * q, "p*q"), as_int(nb, "chunks"), &alpha, part,
                               as_int(p * q, "p*q"), ones, 1, &beta, c, 1));
  const Index done = nb * chunk;
  if (done < rows)
    gemm(ctx, true, false, p, q, rows - done, alpha, x + done * ldx, ldx, y + done * ldy, ldy, 1.0f, c, q);
}

void linear_fwd(GpuContext& ctx, const float* x, Index n, Index in, const float* w, Index out, const float* b,
                float* y) {
  if (b && n > 0 && linear_fwd_lt(ctx, x, n, in, w, out, b, y)) return;
  gemm(ctx, false, true, n, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
  if (b) add_bias(ctx, y, n, out, out, b);
}

void linear_bwd(GpuContext& ctx, const float* x, Index n, Index in, const float* w, Index out, const float* dy,
                float* dx, float dx_beta, float* dw, float* db) {
  if (dx) gemm(ctx, false, false, n, in, out, 1.0f, dy, out, w, in, dx_beta, dx, in);
  if (dw) gemm_tn_tall(ctx, n, out, in, 1.0f, dy, out, x, in, 1.0f, dw);
  if (db) colsum(ctx, dy, n, out, out, db, 1.0f);
}

void transpose(GpuContext& ctx, const float* a, Index rows, Index cols, float* at) {
  // column-major view: a is [cols, rows] (ld cols); at is [rows, cols] (ld rows) = a^T
  const float one = 1.0f, zero = 0.0f;
  DFM_CUBLAS_CHECK(cublasSgeam(ctx.blas(), CUBLAS_OP_T, CUBLAS_OP_N, as_int(rows, "rows"), as_int(cols, "cols"),
                               &one, a, as_int(cols, "cols"), &zero, at, as_int(rows, "rows"), at,
                               as_int(rows, "rows")));
}

void add_transposed(GpuContext& ctx, float* c, Index rows, Index cols, const float* b) {
  // column-major: c is [cols, rows] (ld cols); b [cols, rows] row-major is column-major [rows, cols]
  // (ld rows), whose transpose is what we add. In place (C = A, transa = N) is allowed.
  const float one = 1.0f;
  DFM_CUBLAS_CHECK(cublasSgeam(ctx.blas(), CUBLAS_OP_N, CUBLAS_OP_T, as_int(cols, "cols"), as_int(rows, "rows"),
                               &one, c, as_int(cols, "cols"), &one, b, as_int(rows, "rows"), c,
                               as_int(cols, "cols")));
}

}  // namespace dfm::cuda
