// A register-blocked float product for the skinny row maps of the folded DIFFormer-s layer,
// c = a b with a = [rows, K] (a block of the N instances) and b = [K, M] small (K, M: D or D+H).
//
// Why not OpenBLAS: for these shapes it packs both operands on every call (its copy routines were
// 11% of a Cora epoch) and ran h B (1354 x 64 x 65, one EPYC core) at 52-58 GFLOP/s. libxsmm
// 1.17 (Debian's, JIT, no packing) reached 72. Here b stays in L1 and is read in place, a is read
// by rows, and a 6 x 16 tile of c lives in 12 AVX registers: 63-80 GFLOP/s on h B and 69-90 on
// X P + h Z (dev/cpuperf/skinny.cpp). The transposed products (h^T X, h^T h) stay with OpenBLAS:
// a kernel of this kind measured no faster there.
//
// Single-threaded (the callers split the rows over OpenMP threads) and deterministic: each output
// is one sum over K in order. Without AVX2 and FMA at compile time it calls OpenBLAS.
#pragma once

#include "core/tensor.hpp"
#include "ops/cpu/blas.hpp"

namespace dfm::cpu::skinny {

// c[m x n] = a[m x k] b[k x n] (+ c when accumulate), all row-major with the given row strides.
void gemm_nn(Index m, Index n, Index k, const float* a, Index lda, const float* b, Index ldb, float* c, Index ldc,
             bool accumulate);

// The same on Eigen blocks (c must have its shape).
void gemm_nn(const blas::ConstMatRef& a, const blas::ConstMatRef& b, blas::MatRef c, bool accumulate = false);

}  // namespace dfm::cpu::skinny
