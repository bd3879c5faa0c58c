// The transposed N x D x D products of the CPU hot paths through OpenBLAS, single-threaded per
// call: the callers already split the N rows over OpenMP threads and call this from each of them.
// Measured on a 2-core EPYC (one thread, 1354 x 64 blocks, Cora's half): h^T h 0.239 ms with
// Eigen's GEMM, 0.093 ms with OpenBLAS ssyrk; h^T X 0.220 -> 0.163 ms. The untransposed row maps
// and the D x D algebra of the folded layer use skinny_gemm.hpp (no packing); odd shapes, Eigen.
#pragma once

#include "core/tensor.hpp"

namespace dfm::cpu::blas {

// A row-major float matrix or a block of one (rows contiguous, any row stride).
using ConstMatRef = Eigen::Ref<const Mat, 0, Eigen::OuterStride<>>;
using MatRef = Eigen::Ref<Mat, 0, Eigen::OuterStride<>>;

// c = alpha * op(a) op(b) + beta * c, op(x) = x^T when the flag says so. c must have its shape.
void gemm(const ConstMatRef& a, bool trans_a, const ConstMatRef& b, bool trans_b, MatRef c, float alpha = 1.0f,
          float beta = 0.0f);

// c = a^T a + beta * c, the whole symmetric [cols, cols] result (ssyrk fills one triangle; the
// other is mirrored).
void gram(const ConstMatRef& a, MatRef c, float beta = 0.0f);

}  // namespace dfm::cpu::blas
