#include "ops/cpu/skinny_gemm.hpp"

#include <algorithm>
#include <vector>

#include "core/error.hpp"
#include "ops/cpu/blas.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DFM_SKINNY_AVX2 1
#endif

namespace dfm::cpu::skinny {

#ifdef DFM_SKINNY_AVX2
namespace {

constexpr Index kTileRows = 6;  // 6 x 16 tile: 12 accumulators + 2 B vectors + 1 broadcast of 16 registers

// c[R x 8W] (+)= a[R x k] b[k x 8W]: each element of a broadcast against 1-2 vectors of b's row.
template <int R, int W>
inline void tile(Index k, const float* a, Index lda, const float* b, Index ldb, float* c, Index ldc,
                 bool accumulate) {
  __m256 acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm256_setzero_ps();
  for (Index kk = 0; kk < k; ++kk) {
    __m256 bv[W];
    for (int w = 0; w < W; ++w) bv[w] = _mm256_loadu_ps(b + kk * ldb + 8 * w);
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + kk);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm256_fmadd_ps(av, bv[w], acc[r][w]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int w = 0; w < W; ++w) {
      float* p = c + r * ldc + 8 * w;
      _mm256_storeu_ps(p, accumulate ? _mm256_add_ps(_mm256_loadu_ps(p), acc[r][w]) : acc[r][w]);
    }
}

// The first n8 (a multiple of 8) columns of c for one block of R rows: 16-wide tiles, then one 8-wide.
template <int R>
void tiles(Index n8, Index k, const float* a, Index lda, const float* b, Index ldb, float* c, Index ldc,
           bool accumulate) {
  Index j = 0;
  for (; j + 16 <= n8; j += 16) tile<R, 2>(k, a, lda, b + j, ldb, c + j, ldc, accumulate);
  if (j < n8) tile<R, 1>(k, a, lda, b + j, ldb, c + j, ldc, accumulate);
}

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// dot(a[0..k), bt[0..k)) in 8 lanes, then the k % 8 tail.
inline float dot(Index k, const float* a, const float* bt) {
  __m256 acc = _mm256_setzero_ps();
  Index kk = 0;
  for (; kk + 8 <= k; kk += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + kk), _mm256_loadu_ps(bt + kk), acc);
  float s = hsum(acc);
  for (; kk < k; ++kk) s += a[kk] * bt[kk];
  return s;
}

template <typename F>
inline void by_rows(Index rows, F&& block) {  // blocks of kTileRows, then one of the remainder
  Index r = 0;
  for (; r + kTileRows <= rows; r += kTileRows) block(r, std::integral_constant<int, 6>{});
  switch (rows - r) {
    case 5: block(r, std::integral_constant<int, 5>{}); break;
    case 4: block(r, std::integral_constant<int, 4>{}); break;
    case 3: block(r, std::integral_constant<int, 3>{}); break;
    case 2: block(r, std::integral_constant<int, 2>{}); break;
    case 1: block(r, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

}  // namespace

void gemm_nn(Index m, Index n, Index k, const float* a, Index lda, const float* b, Index ldb, float* c, Index ldc,
             bool accumulate) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (Index i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  const Index n8 = n - n % 8;
  // The last n % 8 columns as dot products with b's columns, copied contiguous once.
  std::vector<float> bt(static_cast<size_t>((n - n8) * k));
  for (Index j = n8; j < n; ++j)
    for (Index kk = 0; kk < k; ++kk) bt[(j - n8) * k + kk] = b[kk * ldb + j];
  by_rows(m, [&](Index i0, auto rows) {
    constexpr int R = decltype(rows)::value;
    tiles<R>(n8, k, a + i0 * lda, lda, b, ldb, c + i0 * ldc, ldc, accumulate);
    for (Index i = i0; i < i0 + R; ++i)
      for (Index j = n8; j < n; ++j) {
        const float v = dot(k, a + i * lda, bt.data() + (j - n8) * k);
        c[i * ldc + j] = accumulate ? c[i * ldc + j] + v : v;
      }
  });
}

#else  // no AVX2 + FMA: OpenBLAS

void gemm_nn(Index m, Index n, Index k, const float* a, Index lda, const float* b, Index ldb, float* c, Index ldc,
             bool accumulate) {
  using Stride = Eigen::OuterStride<>;
  blas::gemm(Eigen::Map<const Mat, 0, Stride>(a, m, k, Stride(lda)), false,
             Eigen::Map<const Mat, 0, Stride>(b, k, n, Stride(ldb)), false, Eigen::Map<Mat, 0, Stride>(c, m, n, Stride(ldc)),
             1.0f, accumulate ? 1.0f : 0.0f);
}

#endif

}  // namespace dfm::cpu::skinny

namespace dfm::cpu::skinny {

void gemm_nn(const blas::ConstMatRef& a, const blas::ConstMatRef& b, blas::MatRef c, bool accumulate) {
  DFM_ASSERT(a.cols() == b.rows() && c.rows() == a.rows() && c.cols() == b.cols());
  gemm_nn(a.rows(), b.cols(), a.cols(), a.data(), a.outerStride(), b.data(), b.outerStride(), c.data(),
          c.outerStride(), accumulate);
}

}  // namespace dfm::cpu::skinny
