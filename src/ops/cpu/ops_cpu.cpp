// Fast CPU kernels: Eigen GEMMs for the dense algebra, OpenMP over rows for everything else.
// Reductions over N (X^T Y products) are split over threads into private partial results and
// summed, because Eigen's own GEMM parallelises over the (small, D x D) output only.
#include <omp.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.hpp"
#include "ops/ops.hpp"

namespace dfm::cpu {
namespace {

// Number of row chunks for a parallel loop over n rows of `width` floats each: enough for every
// thread, none smaller than a few thousand values.
Index chunk_rows(Index n, Index width) {
  const Index threads = omp_get_max_threads();
  const Index min_rows = std::max<Index>(1, 4096 / std::max<Index>(width, 1));
  return std::max<Index>(min_rows, (n + threads - 1) / threads);
}

// out (+)= a^T b for tall a [N, p], b [N, q]: per-thread partial products over row chunks.
template <typename A, typename B, typename Out>
void tn_accumulate(const A& a, const B& b, Out&& out, bool accumulate) {
  const Index n = a.rows();
  const int threads = omp_get_max_threads();
  if (n < 2048 || threads == 1) {
    if (accumulate)
      out.noalias() += a.transpose() * b;
    else
      out.noalias() = a.transpose() * b;
    return;
  }
  std::vector<Mat> partial(threads, Mat::Zero(a.cols(), b.cols()));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const Index lo = n * t / threads, hi = n * (t + 1) / threads;
    partial[t].noalias() += a.middleRows(lo, hi - lo).transpose() * b.middleRows(lo, hi - lo);
  }
  if (!accumulate) out.setZero();
  for (auto& p : partial) out += p;
}

}  // namespace

namespace {
// out[0..8B) (+)= alpha * sum_e adj(i, j_e) v.row(j_e)[0..8B) for one row: 8-float vector
// accumulators kept in registers over the edges (GCC vector extensions; one FMA per edge in edge
// order), the output read/written once.
typedef float v8f __attribute__((vector_size(32)));
inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
typedef std::uint64_t v4u64 __attribute__((vector_size(32)));
typedef std::uint32_t v4u32 __attribute__((vector_size(16)));
typedef std::int32_t v8i32 __attribute__((vector_size(32)));
typedef std::uint8_t v8u8 __attribute__((vector_size(8)));

// dropout_draw(seed, base + k) >= threshold for k = 0..7, as a lane mask (-1 kept, 0 dropped).
inline v8i32 keep_mask8(std::uint64_t seed, std::uint64_t base, std::uint32_t threshold) {
  v8i32 r;
  if ((base >> 32) == ((base + 7) >> 32)) {  // one key for the 8 lanes: dropout_hash32 on a vector
    typedef std::uint32_t v8u32 __attribute__((vector_size(32)));
    const v8u32 lanes = v8u32{0, 1, 2, 3, 4, 5, 6, 7} + static_cast<std::uint32_t>(base);
    r = reinterpret_cast<v8i32>(dropout_hash32(lanes, dropout_key(seed, base >> 32)));
  } else {
    for (int k = 0; k < 8; ++k) r[k] = static_cast<std::int32_t>(dropout_draw(seed, base + k));
  }
  return r >= static_cast<std::int32_t>(threshold);  // draws are < 2^24: the signed compare is exact
}
// The 8 lanes as bytes 0 / 1 and back. With AVX2 by two saturating packs / one widening load (GCC
// lowers __builtin_convertvector between these widths to per-lane scalar code).
inline void store_keep8(std::uint8_t* k, v8i32 mask) {
#ifdef __AVX2__
  const __m256i m = reinterpret_cast<__m256i>(mask & 1);
  const __m128i w16 = _mm_packs_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(k), _mm_packs_epi16(w16, w16));
#else
  const v8u8 b = __builtin_convertvector(mask & 1, v8u8);
  std::memcpy(k, &b, sizeof b);
#endif
}
inline v8i32 load_keep8(const std::uint8_t* k) {
#ifdef __AVX2__
  const __m256i w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(k)));
  return reinterpret_cast<v8i32>(w) != 0;
#else
  v8u8 b;
  std::memcpy(&b, k, sizeof b);
  return __builtin_convertvector(b, v8i32) != 0;
#endif
}
inline float hsum8(v8f v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// acc[0..B) = sum_e adj(i, j_e) v.row(j_e)[0..8B), in registers.
template <int B>
inline void gather_acc(const Csr& adj, Index i, const float* v, Index ldv, v8f (&acc)[B]) {
  for (int b = 0; b < B; ++b) acc[b] = v8f{};
  for (Index e = adj.indptr[i]; e < adj.indptr[i + 1]; ++e) {
    const v8f w = v8f{} + adj.values[e];
    const float* src = v + static_cast<Index>(adj.indices[e]) * ldv;
    for (int b = 0; b < B; ++b) acc[b] += w * load8(src + 8 * b);
  }
}

template <int B>
inline void gather_block(const Csr& adj, Index i, const float* v, Index ldv, float* out, float alpha,
                         bool accumulate) {
  v8f acc[B];
  gather_acc(adj, i, v, ldv, acc);
  const v8f a = v8f{} + alpha;
  if (accumulate)
    for (int b = 0; b < B; ++b) store8(out + 8 * b, load8(out + 8 * b) + a * acc[b]);
  else if (alpha != 1.0f)
    for (int b = 0; b < B; ++b) store8(out + 8 * b, a * acc[b]);
  else
    for (int b = 0; b < B; ++b) store8(out + 8 * b, acc[b]);
}

inline void gather_tail(const Csr& adj, Index i, const float* v, Index ldv, Index cols, float* out, float alpha,
                        bool accumulate) {
  for (Index c = 0; c < cols; ++c) {
    float acc = 0.0f;
    for (Index e = adj.indptr[i]; e < adj.indptr[i + 1]; ++e)
      acc = std::fma(adj.values[e], v[static_cast<Index>(adj.indices[e]) * ldv + c], acc);
    out[c] = accumulate ? std::fma(alpha, acc, out[c]) : (alpha != 1.0f ? alpha * acc : acc);
  }
}

void gather_row(const Csr& adj, Index i, const float* v, Index ldv, Index cols, float* out, float alpha,
                bool accumulate) {
  Index c = 0;
  for (; c + 64 <= cols; c += 64) gather_block<8>(adj, i, v + c, ldv, out + c, alpha, accumulate);
  for (; c + 8 <= cols; c += 8) gather_block<1>(adj, i, v + c, ldv, out + c, alpha, accumulate);
  if (c < cols) gather_tail(adj, i, v + c, ldv, cols - c, out + c, alpha, accumulate);
}
}  // namespace

void linear_fwd(CMatRef x, CMatRef w, const float* b, Mat& y) {
  y.resize(x.rows(), w.rows());
  y.noalias() = x * w.transpose();
  if (b) {
    ConstVecMap bias(b, w.rows());
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < y.rows(); ++i) y.row(i) += bias.transpose();
  }
}

void linear_bwd(CMatRef x, CMatRef w, CMatRef dy, Mat* dx, MatRef dw, float* db) {
  if (dx) {
    dx->resize(x.rows(), x.cols());
    dx->noalias() = dy * w;
  }
  tn_accumulate(dy, x, dw, true);
  if (db) {
    VecMap bias_grad(db, dy.cols());
    bias_grad += dy.colwise().sum().transpose();
  }
}

void linear_sparse_fwd(const Csr& x, CMatRef w, const float* b, Mat& y) {
  DFM_ASSERT(x.cols == w.cols());
  const Index out = w.rows(), f = w.cols();
  Mat wt(f, out);  // [F, out]: one contiguous row per input feature
  y.resize(x.rows, out);
#pragma omp parallel
  {
    // the transpose by blocks of features, each thread its own (a plain Eigen transpose is serial)
#pragma omp for schedule(static)
    for (Index f0 = 0; f0 < f; f0 += 64) {
      const Index fb = std::min<Index>(64, f - f0);
      wt.middleRows(f0, fb) = w.middleCols(f0, fb).transpose();
    }
#pragma omp for schedule(dynamic, 256)
    for (Index i = 0; i < x.rows; ++i) {
      float* row = y.data() + i * out;
      gather_row(x, i, wt.data(), out, out, row, 1.0f, false);
      if (b)
        for (Index c = 0; c < out; ++c) row[c] += b[c];
    }
  }
}

void linear_sparse_bwd(const Csr& x_t, CMatRef dy, MatRef dw, float* db) {
  DFM_ASSERT(x_t.cols == dy.rows());
  const Index out = dy.cols(), f = x_t.rows;
  Mat dwt(f, out);  // dW^T, one row per feature: a gather over the nodes holding it
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 64)
    for (Index r = 0; r < f; ++r) gather_row(x_t, r, dy.data(), dy.outerStride(), out, dwt.data() + r * out, 1.0f, false);
#pragma omp for schedule(static)
    for (Index f0 = 0; f0 < f; f0 += 64) {
      const Index fb = std::min<Index>(64, f - f0);
      dw.middleCols(f0, fb) += dwt.middleRows(f0, fb).transpose();
    }
  }
  if (db) {  // by rows: a column sum of row-major dy would stride over it
    VecMap bias_grad(db, out);
    for (Index i = 0; i < dy.rows(); ++i) bias_grad += dy.row(i).transpose();
  }
}

void layernorm_fwd(CMatRef x, const float* gamma, const float* beta, float eps, Mat& y, Mat& xhat, Vec& rstd) {
  const Index n = x.rows(), d = x.cols();
  y.resize(n, d);
  xhat.resize(n, d);
  rstd.resize(n);
  ConstVecMap g(gamma, d), bt(beta, d);
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) {
    const float mean = x.row(i).mean();
    const float var = (x.row(i).array() - mean).square().mean();
    const float r = 1.0f / std::sqrt(var + eps);
    rstd[i] = r;
    xhat.row(i) = (x.row(i).array() - mean) * r;
    y.row(i) = xhat.row(i).array() * g.transpose().array() + bt.transpose().array();
  }
}

void layernorm_bwd(const Mat& xhat, const Vec& rstd, const float* gamma, CMatRef dy, Mat& dx, float* dgamma,
                   float* dbeta) {
  const Index n = xhat.rows(), d = xhat.cols();
  dx.resize(n, d);
  ConstVecMap g(gamma, d);
  const int threads = omp_get_max_threads();
  std::vector<Vec> dg(threads, Vec::Zero(d)), dbt(threads, Vec::Zero(d));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    Eigen::ArrayXf gy(d);
#pragma omp for schedule(static)
    for (Index i = 0; i < n; ++i) {
      gy = dy.row(i).transpose().array() * g.array();
      const float mean_g = gy.mean();
      const float mean_gx = (gy * xhat.row(i).transpose().array()).mean();
      dx.row(i) = (rstd[i] * (gy - mean_g - xhat.row(i).transpose().array() * mean_gx)).transpose();
      dg[t].array() += dy.row(i).transpose().array() * xhat.row(i).transpose().array();
      dbt[t] += dy.row(i).transpose();
    }
  }
  VecMap dgm(dgamma, d), dbm(dbeta, d);
  for (int t = 0; t < threads; ++t) {
    dgm += dg[t];
    dbm += dbt[t];
  }
}

void relu_inplace(Mat& x) {
  float* p = x.data();
  const Index n = x.size();
#pragma omp parallel for simd schedule(static)
  for (Index i = 0; i < n; ++i) p[i] = p[i] > 0.0f ? p[i] : 0.0f;
}

void relu_bwd_inplace(const Mat& y, Mat& dy) {
  const float* py = y.data();
  float* pd = dy.data();
  const Index n = y.size();
#pragma omp parallel for simd schedule(static)
  for (Index i = 0; i < n; ++i) pd[i] = py[i] > 0.0f ? pd[i] : 0.0f;
}


void dropout_fwd(Mat& x, float p, std::uint64_t seed, std::vector<std::uint8_t>& keep) {
  const Index n = x.size();
  keep.resize(static_cast<size_t>(n));
  dropout_fwd_range(x.data(), keep.data(), 0, n, p, seed);
}

void dropout_fwd_range(float* x, std::uint8_t* keep, Index begin, Index end, float p, std::uint64_t seed) {
  const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  const std::uint32_t threshold = dropout_threshold(p);
  const Index n = end - begin;
#pragma omp parallel for schedule(static) if (n > 65536)
  for (Index b0 = 0; b0 < n; b0 += 1024) {
    const Index m = std::min<Index>(1024, n - b0);
    std::uint8_t* kp = keep + b0;
    float* xp = x + b0;
    const std::uint64_t base = static_cast<std::uint64_t>(begin + b0);
#pragma omp simd
    for (Index i = 0; i < m; ++i) kp[i] = dropout_draw(seed, base + static_cast<std::uint64_t>(i)) >= threshold;
#pragma omp simd
    for (Index i = 0; i < m; ++i) xp[i] = kp[i] ? xp[i] * scale : 0.0f;
  }
}

void dropout_apply(Mat& x, float p, const std::vector<std::uint8_t>& keep, const std::vector<Index>* rows) {
  DFM_ASSERT(keep.size() == static_cast<size_t>(x.size()));
  const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  float* px = x.data();
  const std::uint8_t* kp = keep.data();
  if (rows) {
    const Index d = x.cols(), m = static_cast<Index>(rows->size());
#pragma omp parallel for schedule(static) if (m * d > 65536)
    for (Index k = 0; k < m; ++k)
      for (Index i = (*rows)[k] * d, end = i + d; i < end; ++i) px[i] = kp[i] ? px[i] * scale : 0.0f;
    return;
  }
  const Index n = x.size();
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (Index i = 0; i < n; ++i) px[i] = kp[i] ? px[i] * scale : 0.0f;
}

void dropout_bwd(Mat& dx, float p, const std::vector<std::uint8_t>& keep) { dropout_apply(dx, p, keep); }

// ---- DIFFormer-s -------------------------------------------------------------------------
namespace {
// xn = x / ||x|| (global) or per node-head row; returns the norms.
void normalise(const Mat& x, int heads, QkNorm norm, Mat& xn, Vec& s) {
  const Index n = x.rows(), d = x.cols() / heads;
  xn.resize(n, x.cols());
  if (norm == QkNorm::global) {
    double sq = 0;
    const float* p = x.data();
    const Index size = x.size();
#pragma omp parallel for reduction(+ : sq) schedule(static)
    for (Index i = 0; i < size; ++i) sq += static_cast<double>(p[i]) * p[i];
    s = Vec::Constant(1, static_cast<float>(std::sqrt(sq)));
    const float inv = 1.0f / s[0];
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < n; ++i) xn.row(i) = x.row(i) * inv;
  } else {
    s.resize(n * heads);
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < n; ++i)
      for (int h = 0; h < heads; ++h) {
        const float nr = std::max(x.row(i).segment(h * d, d).norm(), 1e-12f);
        s[i * heads + h] = nr;
        xn.row(i).segment(h * d, d) = x.row(i).segment(h * d, d) / nr;
      }
  }
}

void unnormalise(const Mat& xn, const Vec& s, int heads, const Mat& dxn, Mat& dx) {
  const Index n = xn.rows(), d = xn.cols() / heads;
  dx.resize(n, xn.cols());
  if (s.size() == 1) {
    double dot = 0;
    const float *a = dxn.data(), *b = xn.data();
    const Index size = xn.size();
#pragma omp parallel for reduction(+ : dot) schedule(static)
    for (Index i = 0; i < size; ++i) dot += static_cast<double>(a[i]) * b[i];
    const float inv = 1.0f / s[0], fdot = static_cast<float>(dot);
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < n; ++i) dx.row(i) = (dxn.row(i) - xn.row(i) * fdot) * inv;
  } else {
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < n; ++i)
      for (int h = 0; h < heads; ++h) {
        const float sc = s[i * heads + h];
        const float dot = sc <= 1e-12f ? 0.0f : dxn.row(i).segment(h * d, d).dot(xn.row(i).segment(h * d, d));
        dx.row(i).segment(h * d, d) = (dxn.row(i).segment(h * d, d) - xn.row(i).segment(h * d, d) * dot) / sc;
      }
  }
}
}  // namespace

void simple_attn_fwd(const Mat& q, const Mat& k, const Mat& v, int heads, QkNorm norm, Mat& a,
                     SimpleAttnState& st) {
  const Index n = q.rows(), d = q.cols() / heads;
  const int vheads = v.cols() == q.cols() ? heads : 1;
  const Index dv = v.cols() / vheads;
  normalise(q, heads, norm, st.qn, st.qnorm);
  normalise(k, heads, norm, st.kn, st.knorm);
  st.kv.resize(heads * d, dv);
  st.ks.resize(heads, d);
  st.vs.resize(heads, dv);
  st.den.resize(n, heads);
  a.resize(n, heads * dv);
  for (int h = 0; h < heads; ++h) {
    const int hv = vheads == 1 ? 0 : h;
    const auto kh = st.kn.middleCols(h * d, d);
    const auto vh = v.middleCols(hv * dv, dv);
    tn_accumulate(kh, vh, st.kv.middleRows(h * d, d), false);
    st.ks.row(h) = kh.colwise().sum();
    st.vs.row(h) = vh.colwise().sum();
  }
  const Index rows = chunk_rows(n, heads * dv);
#pragma omp parallel for schedule(static)
  for (Index lo = 0; lo < n; lo += rows) {
    const Index m = std::min(rows, n - lo);
    for (int h = 0; h < heads; ++h) {
      const auto qh = st.qn.block(lo, h * d, m, d);
      auto ah = a.block(lo, h * dv, m, dv);
      ah.noalias() = qh * st.kv.middleRows(h * d, d);
      for (Index i = 0; i < m; ++i) {
        const float den = qh.row(i).dot(st.ks.row(h)) + static_cast<float>(n);
        st.den(lo + i, h) = den;
        ah.row(i) = (ah.row(i) + st.vs.row(h)) / den;
      }
    }
  }
}

void simple_attn_bwd(const Mat& v, int heads, const Mat& a, const SimpleAttnState& st, const Mat& da, Mat& dq,
                     Mat& dk, Mat& dv_out) {
  const Index n = st.qn.rows(), d = st.qn.cols() / heads;
  const int vheads = v.cols() == st.qn.cols() ? heads : 1;
  const Index dv = v.cols() / vheads;
  Mat dqn(n, heads * d), dkn(n, heads * d), dnum(n, dv);
  Vec dden(n);
  dv_out.setZero(n, v.cols());
  const Index rows = chunk_rows(n, dv);
  for (int h = 0; h < heads; ++h) {
    const int hv = vheads == 1 ? 0 : h;
    const auto kv = st.kv.middleRows(h * d, d);  // [d, dv]
#pragma omp parallel for schedule(static)
    for (Index lo = 0; lo < n; lo += rows) {
      const Index m = std::min(rows, n - lo);
      for (Index i = lo; i < lo + m; ++i) {
        const float den = st.den(i, h);
        dnum.row(i) = da.row(i).segment(h * dv, dv) / den;
        dden[i] = -da.row(i).segment(h * dv, dv).dot(a.row(i).segment(h * dv, dv)) / den;
      }
      dqn.block(lo, h * d, m, d).noalias() = dnum.middleRows(lo, m) * kv.transpose();
      dqn.block(lo, h * d, m, d) += dden.segment(lo, m) * st.ks.row(h);
    }
    const auto qh = st.qn.middleCols(h * d, d);
    Mat dkv(d, dv);
    tn_accumulate(qh, dnum, dkv, false);
    Mat dks(1, d);
    tn_accumulate(dden, qh, dks, false);
    const Eigen::RowVectorXf dvs = dnum.colwise().sum();
    const auto kh = st.kn.middleCols(h * d, d);
#pragma omp parallel for schedule(static)
    for (Index lo = 0; lo < n; lo += rows) {
      const Index m = std::min(rows, n - lo);
      auto dkh = dkn.block(lo, h * d, m, d);
      dkh.noalias() = v.block(lo, hv * dv, m, dv) * dkv.transpose();
      dkh.rowwise() += dks.row(0);
      auto dvh = dv_out.block(lo, hv * dv, m, dv);
      dvh.noalias() += kh.middleRows(lo, m) * dkv;
      dvh.rowwise() += dvs;
    }
  }
  unnormalise(st.qn, st.qnorm, heads, dqn, dq);
  unnormalise(st.kn, st.knorm, heads, dkn, dk);
}

// ---- DIFFormer-a -------------------------------------------------------------------------
// Flash-style streaming: for a block of queries, loop over blocks of keys, form the small
// sigmoid tile in cache and fold it into the running numerator and row sum. Nothing N x N is
// ever stored; backward recomputes the tiles.
namespace {
constexpr Index kQueryBlock = 128;
constexpr Index kKeyBlock = 256;

inline void sigmoid_inplace(Mat& s) { s = s.array().logistic().matrix(); }
}  // namespace

void sigmoid_attn_fwd(const Mat& q, const Mat& k, const Mat& v, int heads, Mat& a, Mat& rowsum) {
  const Index n = q.rows(), d = q.cols() / heads;
  const int vheads = v.cols() == q.cols() ? heads : 1;
  const Index dv = v.cols() / vheads;
  a.resize(n, heads * dv);
  rowsum.resize(n, heads);
  const Index qblocks = (n + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel
  {
    Mat s, num;
    Vec r;
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int h = 0; h < heads; ++h)
      for (Index qb = 0; qb < qblocks; ++qb) {
        const int hv = vheads == 1 ? 0 : h;
        const Index q0 = qb * kQueryBlock, mq = std::min(kQueryBlock, n - q0);
        const auto qt = q.block(q0, h * d, mq, d);
        num.setZero(mq, dv);
        r.setZero(mq);
        for (Index k0 = 0; k0 < n; k0 += kKeyBlock) {
          const Index mk = std::min(kKeyBlock, n - k0);
          s.resize(mq, mk);
          s.noalias() = qt * k.block(k0, h * d, mk, d).transpose();
          sigmoid_inplace(s);
          r += s.rowwise().sum();
          num.noalias() += s * v.block(k0, hv * dv, mk, dv);
        }
        a.block(q0, h * dv, mq, dv) = r.cwiseInverse().asDiagonal() * num;
        rowsum.block(q0, h, mq, 1) = r;
      }
  }
}

void sigmoid_attn_bwd(const Mat& q, const Mat& k, const Mat& v, int heads, const Mat& a, const Mat& rowsum,
                      const Mat& da, Mat& dq, Mat& dk, Mat& dv_out) {
  const Index n = q.rows(), d = q.cols() / heads;
  const int vheads = v.cols() == q.cols() ? heads : 1;
  const Index dv = v.cols() / vheads;
  dq.setZero(n, q.cols());
  const int threads = omp_get_max_threads();
  // Key-side gradients are summed over all query blocks: one private copy per thread.
  std::vector<Mat> dk_part(threads, Mat::Zero(n, k.cols())), dv_part(threads, Mat::Zero(n, v.cols()));
  const Index qblocks = (n + kQueryBlock - 1) / kQueryBlock;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    Mat s, dp, dqt, da_scaled;
    Vec rinv, delta;
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int h = 0; h < heads; ++h)
      for (Index qb = 0; qb < qblocks; ++qb) {
        const int hv = vheads == 1 ? 0 : h;
        const Index q0 = qb * kQueryBlock, mq = std::min(kQueryBlock, n - q0);
        const auto qt = q.block(q0, h * d, mq, d);
        const auto dat = da.block(q0, h * dv, mq, dv);
        rinv = rowsum.block(q0, h, mq, 1).cwiseInverse();
        delta = (dat.array() * a.block(q0, h * dv, mq, dv).array()).rowwise().sum();
        da_scaled = rinv.asDiagonal() * dat;  // dA_i / r_i: folds the normaliser into one small matrix
        dqt.setZero(mq, d);
        for (Index k0 = 0; k0 < n; k0 += kKeyBlock) {
          const Index mk = std::min(kKeyBlock, n - k0);
          const auto kt = k.block(k0, h * d, mk, d);
          const auto vt = v.block(k0, hv * dv, mk, dv);
          s.resize(mq, mk);
          s.noalias() = qt * kt.transpose();
          sigmoid_inplace(s);
          // dV_j += sum_i w_ij dA_i / r_i
          dv_part[t].block(k0, hv * dv, mk, dv).noalias() += s.transpose() * da_scaled;
          // dz_ij = w (1 - w) (dA_i . V_j - delta_i) / r_i
          dp.resize(mq, mk);
          dp.noalias() = da_scaled * vt.transpose();
          dp = ((dp.array().colwise() - (delta.array() * rinv.array())) * s.array() * (1.0f - s.array())).matrix();
          dqt.noalias() += dp * kt;
          dk_part[t].block(k0, h * d, mk, d).noalias() += dp.transpose() * qt;
        }
        dq.block(q0, h * d, mq, d) = dqt;
      }
  }
  dk = std::move(dk_part[0]);
  dv_out = std::move(dv_part[0]);
  for (int t = 1; t < threads; ++t) {
    dk += dk_part[t];
    dv_out += dv_part[t];
  }
}

void tn_product(CMatRef a, CMatRef b, Mat& out) {
  out.resize(a.cols(), b.cols());
  tn_accumulate(a, b, out, false);
}

void graph_prop(const Csr& adj, CMatRef v, Mat& g, float alpha, bool accumulate) {
  const Index cols = v.cols(), ldv = v.outerStride();
  if (accumulate)
    DFM_ASSERT(g.rows() == adj.rows && g.cols() == cols);
  else
    g.resize(adj.rows, cols);
  const float* pv = v.data();
  float* pg = g.data();
#pragma omp parallel for schedule(dynamic, 256) if (adj.rows * cols > 16384)
  for (Index i = 0; i < adj.rows; ++i) gather_row(adj, i, pv, ldv, cols, pg + i * cols, alpha, accumulate);
}

void graph_prop_rows(const Csr& adj, CMatRef v, Mat& g, float alpha, bool accumulate, Index lo, Index hi) {
  DFM_ASSERT(g.rows() == adj.rows && g.cols() == v.cols() && lo >= 0 && hi <= adj.rows);
  for (Index i = lo; i < hi; ++i)
    gather_row(adj, i, v.data(), v.outerStride(), v.cols(), g.data() + i * g.cols(), alpha, accumulate);
}

// ---- fused row passes of a diffusion layer ---------------------------------------------------
void mix_layernorm_dropout_rows(const MixInputs& m, const float* gamma, const float* beta, float eps, float p,
                                std::uint64_t seed, std::uint8_t* keep, Mat& y, Mat* xhat, Vec* rstd, Index lo,
                                Index hi, const Index* row_ids) {
  const Mat& h_in = *m.h_in;
  const Index d = h_in.cols();
  const float dscale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  const std::uint32_t threshold = dropout_threshold(p);
  const float fd = static_cast<float>(d);
  const float wa = m.wa, cg = m.cg, scale = m.scale, keep_in = m.keep_in;
  const bool relu = m.relu, terms = scale != 0.0f;
  const int heads = m.heads;
  const float* pa = m.a && terms ? m.a->data() : nullptr;
  const Index lda = m.a ? m.a->cols() : 0;
  const float* pg = m.g && terms ? m.g->data() : nullptr;
  const Csr* adj = m.g || !terms ? nullptr : m.adj;
  const float* psrc = adj ? m.gsrc->data() : nullptr;
  const Index ldsrc = adj ? m.gsrc->outerStride() : 0;
  const float* ph = h_in.data();
  float* py = y.data();
  float* px = xhat ? xhat->data() : nullptr;
  float* pr = rstd ? rstd->data() : nullptr;
  std::uint8_t* pk = keep;
  {
    std::vector<float> buf(static_cast<size_t>(2 * d));
    float* __restrict gi = buf.data();
    float* __restrict z = buf.data() + d;
    if (d == 64) {  // the row in eight 8-float registers, one pass
      constexpr int B = 8;
      for (Index k = lo; k < hi; ++k) {
        const Index i = row_ids ? row_ids[k] : k;
        // zr = sum_h wa a_h + cg g, in that order (as the generic path below). The gathered graph
        // row stays in the eight registers it is summed in (a round trip through memory and a
        // second set of eight accumulators cost register spills), and each 8-float block of the
        // heads' sum is formed next to it.
        v8f zr[B];
        if (adj) {
          gather_acc(*adj, i, psrc, ldsrc, zr);
        } else if (pg) {
          for (int b = 0; b < B; ++b) zr[b] = load8(pg + i * d + 8 * b);
        }
        const bool graph = adj || pg;
        for (int b = 0; b < B; ++b) {
          v8f t = v8f{};
          if (pa)
            for (int hh = 0; hh < heads; ++hh) t += wa * load8(pa + i * lda + hh * d + 8 * b);
          zr[b] = graph ? t + cg * zr[b] : t;
        }
        const float* hi = ph + i * d;
        v8f sum = v8f{};
        for (int b = 0; b < B; ++b) {
          zr[b] = scale * zr[b] + keep_in * load8(hi + 8 * b);
          sum += zr[b];
        }
        const float mean = hsum8(sum) / fd;
        v8f var = v8f{};
        for (int b = 0; b < B; ++b) {
          zr[b] -= mean;
          var += zr[b] * zr[b];
        }
        const float r = 1.0f / std::sqrt(hsum8(var) / fd + eps);
        if (pr) pr[i] = r;
        float* yi = py + i * d;
        for (int b = 0; b < B; ++b) {
          zr[b] *= r;
          if (px) store8(px + i * d + 8 * b, zr[b]);
          v8f yv = zr[b] * load8(gamma + 8 * b) + load8(beta + 8 * b);
          if (relu) yv = yv > 0.0f ? yv : v8f{};
          if (pk) {
            const v8i32 km = keep_mask8(seed, static_cast<std::uint64_t>(i * d + 8 * b), threshold);
            store_keep8(pk + i * d + 8 * b, km);
            yv = km ? yv * dscale : v8f{};
          }
          store8(yi + 8 * b, yv);
        }
      }
    } else {
    for (Index k = lo; k < hi; ++k) {
      const Index i = row_ids ? row_ids[k] : k;
      const float* __restrict hi = ph + i * d;
      for (Index c = 0; c < d; ++c) z[c] = 0.0f;
      if (pa)
        for (int hh = 0; hh < heads; ++hh) {
          const float* __restrict ai = pa + i * lda + hh * d;
          for (Index c = 0; c < d; ++c) z[c] += wa * ai[c];
        }
      if (pg) {
        const float* __restrict g = pg + i * d;
        for (Index c = 0; c < d; ++c) z[c] += cg * g[c];
      } else if (adj) {
        gather_row(*adj, i, psrc, ldsrc, d, gi, 1.0f, false);
        for (Index c = 0; c < d; ++c) z[c] += cg * gi[c];
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (Index c = 0; c < d; ++c) {
        z[c] = scale * z[c] + keep_in * hi[c];
        sum += z[c];
      }
      const float mean = sum / fd;
      float var = 0.0f;
#pragma omp simd reduction(+ : var)
      for (Index c = 0; c < d; ++c) {
        z[c] -= mean;
        var += z[c] * z[c];
      }
      const float r = 1.0f / std::sqrt(var / fd + eps);
      if (pr) pr[i] = r;
      float* __restrict yi = py + i * d;
      for (Index c = 0; c < d; ++c) z[c] *= r;  // xhat
      if (px) std::memcpy(px + i * d, z, sizeof(float) * static_cast<size_t>(d));
      for (Index c = 0; c < d; ++c) yi[c] = z[c] * gamma[c] + beta[c];
      if (relu)
        for (Index c = 0; c < d; ++c) yi[c] = yi[c] > 0.0f ? yi[c] : 0.0f;
      if (pk) {
        std::uint8_t* __restrict ki = pk + i * d;
        const std::uint64_t base = static_cast<std::uint64_t>(i * d);
        for (Index c = 0; c < d; ++c) ki[c] = dropout_draw(seed, base + static_cast<std::uint64_t>(c)) >= threshold;
        for (Index c = 0; c < d; ++c) yi[c] = ki[c] ? yi[c] * dscale : 0.0f;
      }
    }
    }
  }
}

void mix_layernorm_dropout_fwd(const MixInputs& m, const float* gamma, const float* beta, float eps, float p,
                               std::uint64_t seed, std::vector<std::uint8_t>* keep, Mat& y, Mat* xhat, Vec* rstd,
                               RowSums* sums) {
  const Index n = m.h_in->rows(), d = m.h_in->cols();
  y.resize(n, d);
  if (xhat) xhat->resize(n, d);
  if (rstd) rstd->resize(n);
  if (keep) keep->resize(static_cast<size_t>(n * d));
  std::uint8_t* pk = keep ? keep->data() : nullptr;
  if (sums) sums->start(d, omp_get_max_threads());
#pragma omp parallel if (n * d > 16384)
  {
    const Index t = omp_get_thread_num(), nt = omp_get_num_threads();
    const Index lo = n * t / nt, hi = n * (t + 1) / nt;
    constexpr Index kRows = 256;  // summed while in cache
    for (Index r0 = lo; r0 < hi; r0 += kRows) {
      const Index r1 = std::min(hi, r0 + kRows);
      mix_layernorm_dropout_rows(m, gamma, beta, eps, p, seed, pk, y, xhat, rstd, r0, r1);
      if (sums) sums->add(static_cast<int>(t), y, r0, r1);
    }
  }
  if (sums) sums->finish();
}

void dropout_layernorm_mix_bwd_rows(const std::uint8_t* keep, float p, const Mat& xhat, const Vec& rstd,
                                    const float* gamma, const Mat& dy, float scale, float keep_in, Mat& d_o,
                                    Mat* dh_in, float* dgamma, float* dbeta, Index lo, Index hi,
                                    const Index* row_ids, const Mat* relu_out) {
  const Index d = xhat.cols();
  const float* pro = relu_out ? relu_out->data() : nullptr;
  const float dscale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  const float fd = static_cast<float>(d);
  std::vector<float> buf(static_cast<size_t>(2 * d));
  float* g = buf.data();       // dy after dropout
  float* gy = buf.data() + d;  // g * gamma
  float* pdg = dgamma;
  float* pdb = dbeta;
  if (d == 64) {  // the row in registers
    constexpr int B = 8;
    v8f dga[B], dba[B];
    for (int b = 0; b < B; ++b) dga[b] = dba[b] = v8f{};
    for (Index k = lo; k < hi; ++k) {
      const Index i = row_ids ? row_ids[k] : k;
      const float* dyi = dy.data() + i * d;
      const float* xi = xhat.data() + i * d;
      v8f gv[B], gyv[B], xv[B];
      v8f sg = v8f{}, sgx = v8f{};
      for (int b = 0; b < B; ++b) {
        gv[b] = load8(dyi + 8 * b);
        if (keep) gv[b] = load_keep8(keep + i * d + 8 * b) ? gv[b] * dscale : v8f{};
        if (pro) gv[b] = load8(pro + i * d + 8 * b) > 0.0f ? gv[b] : v8f{};
        xv[b] = load8(xi + 8 * b);
        gyv[b] = gv[b] * load8(gamma + 8 * b);
        sg += gyv[b];
        sgx += gyv[b] * xv[b];
        dga[b] += gv[b] * xv[b];
        dba[b] += gv[b];
      }
      const float mean_g = hsum8(sg) / fd, mean_gx = hsum8(sgx) / fd, r = rstd[i];
      float* oi = d_o.data() + i * d;
      float* dhi = dh_in ? dh_in->data() + i * d : nullptr;
      for (int b = 0; b < B; ++b) {
        const v8f dz = r * (gyv[b] - mean_g - xv[b] * mean_gx);
        store8(oi + 8 * b, scale * dz);
        if (dhi) store8(dhi + 8 * b, keep_in * dz);
      }
    }
    for (int b = 0; b < B; ++b) {
      store8(pdg + 8 * b, load8(pdg + 8 * b) + dga[b]);
      store8(pdb + 8 * b, load8(pdb + 8 * b) + dba[b]);
    }
  } else {
    for (Index k = lo; k < hi; ++k) {
      const Index i = row_ids ? row_ids[k] : k;
      const float* dyi = dy.data() + i * d;
      const float* xi = xhat.data() + i * d;
      if (keep) {
        const std::uint8_t* ki = keep + i * d;
#pragma omp simd
        for (Index c = 0; c < d; ++c) g[c] = ki[c] ? dyi[c] * dscale : 0.0f;
      } else {
#pragma omp simd
        for (Index c = 0; c < d; ++c) g[c] = dyi[c];
      }
      if (pro)
        for (Index c = 0; c < d; ++c) g[c] = pro[i * d + c] > 0.0f ? g[c] : 0.0f;
      float sg = 0.0f, sgx = 0.0f;
#pragma omp simd reduction(+ : sg, sgx)
      for (Index c = 0; c < d; ++c) {
        gy[c] = g[c] * gamma[c];
        sg += gy[c];
        sgx += gy[c] * xi[c];
        pdg[c] += g[c] * xi[c];
        pdb[c] += g[c];
      }
      const float mean_g = sg / fd, mean_gx = sgx / fd, r = rstd[i];
      float* oi = d_o.data() + i * d;
      float* dhi = dh_in ? dh_in->data() + i * d : nullptr;
      for (Index c = 0; c < d; ++c) {
        const float dz = r * (gy[c] - mean_g - xi[c] * mean_gx);
        oi[c] = scale * dz;
        if (dhi) dhi[c] = keep_in * dz;
      }
    }
  }
}

void dropout_layernorm_mix_bwd(const std::vector<std::uint8_t>* keep, float p, const Mat& xhat, const Vec& rstd,
                               const float* gamma, const Mat& dy, float scale, float keep_in, Mat& d_o, Mat* dh_in,
                               float* dgamma, float* dbeta, const Mat* relu_out) {
  const Index n = xhat.rows(), d = xhat.cols();
  d_o.resize(n, d);
  if (dh_in) dh_in->resize(n, d);
  const int threads = n * d > 16384 ? omp_get_max_threads() : 1;
  std::vector<Vec> dg(threads, Vec::Zero(d)), dbt(threads, Vec::Zero(d));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    dropout_layernorm_mix_bwd_rows(keep ? keep->data() : nullptr, p, xhat, rstd, gamma, dy, scale, keep_in, d_o, dh_in,
                                   dg[t].data(), dbt[t].data(), n * t / threads, n * (t + 1) / threads, nullptr,
                                   relu_out);
  }
  VecMap dgm(dgamma, d), dbm(dbeta, d);
  for (int t = 0; t < threads; ++t) {
    dgm += dg[t];
    dbm += dbt[t];
  }
}

// ---- losses --------------------------------------------------------------------------------
float cross_entropy(const Mat& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx,
                    Mat& dlogits) {
  DFM_CHECK(!idx.empty(), "cross_entropy: empty index set");
  dlogits.setZero(logits.rows(), logits.cols());
  const float inv = 1.0f / static_cast<float>(idx.size());
  double loss = 0;
  for (auto i : idx) {
    const float mx = logits.row(i).maxCoeff();
    const float lse = mx + std::log((logits.row(i).array() - mx).exp().sum());
    loss += lse - logits(i, y[i]);
    dlogits.row(i) = (logits.row(i).array() - lse).exp() * inv;
    dlogits(i, y[i]) -= inv;
  }
  return static_cast<float>(loss * inv);
}

float bce_with_logits(const Mat& logits, const Mat& y, const std::vector<std::int64_t>& idx, Mat& dlogits) {
  DFM_CHECK(!idx.empty(), "bce_with_logits: empty index set");
  dlogits.setZero(logits.rows(), logits.cols());
  const float inv = 1.0f / static_cast<float>(idx.size() * logits.cols());
  double loss = 0;
  for (auto i : idx)
    for (Index t = 0; t < logits.cols(); ++t) {
      const float z = logits(i, t), target = y(i, t);
      loss += std::max(z, 0.0f) - z * target + std::log1p(std::exp(-std::abs(z)));
      dlogits(i, t) = (1.0f / (1.0f + std::exp(-z)) - target) * inv;
    }
  return static_cast<float>(loss * inv);
}

float mse(const Mat& pred, const Mat& y, const std::vector<std::int64_t>& idx, Mat& dpred) {
  DFM_CHECK(!idx.empty(), "mse: empty index set");
  dpred.setZero(pred.rows(), pred.cols());
  const float inv = 1.0f / static_cast<float>(idx.size() * pred.cols());
  double loss = 0;
  for (auto i : idx)
    for (Index t = 0; t < pred.cols(); ++t) {
      const float r = pred(i, t) - y(i, t);
      loss += static_cast<double>(r) * r;
      dpred(i, t) = 2.0f * r * inv;
    }
  return static_cast<float>(loss * inv);
}

}  // namespace dfm::cpu
