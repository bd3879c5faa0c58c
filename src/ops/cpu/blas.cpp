#include "ops/cpu/blas.hpp"

#include <cblas.h>

#include "core/error.hpp"

namespace dfm::cpu::blas {
namespace {

// OpenBLAS must never start threads of its own inside our OpenMP regions: one thread per call,
// set once before the first call.
void single_threaded() {
  static const bool once = (openblas_set_num_threads(1), true);
  (void)once;
}

}  // namespace

void gemm(const ConstMatRef& a, bool trans_a, const ConstMatRef& b, bool trans_b, MatRef c, float alpha, float beta) {
  const Index m = trans_a ? a.cols() : a.rows(), k = trans_a ? a.rows() : a.cols();
  const Index kb = trans_b ? b.cols() : b.rows(), n = trans_b ? b.rows() : b.cols();
  DFM_ASSERT(k == kb && c.rows() == m && c.cols() == n);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves c untouched only for beta == 1
    c *= beta;
    return;
  }
  single_threaded();
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a.data(),
              static_cast<int>(a.outerStride()), b.data(), static_cast<int>(b.outerStride()), beta, c.data(),
              static_cast<int>(c.outerStride()));
}

void gram(const ConstMatRef& a, MatRef c, float beta) {
  const Index n = a.cols(), k = a.rows();
  DFM_ASSERT(c.rows() == n && c.cols() == n);
  if (n == 0) return;
  if (k == 0) {
    c *= beta;
    return;
  }
  single_threaded();
  cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, static_cast<int>(n), static_cast<int>(k), 1.0f, a.data(),
              static_cast<int>(a.outerStride()), beta, c.data(), static_cast<int>(c.outerStride()));
  for (Index i = 1; i < n; ++i)
    for (Index j = 0; j < i; ++j) c(i, j) = c(j, i);
}

}  // namespace dfm::cpu::blas
