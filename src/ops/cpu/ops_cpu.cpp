// Fast CPU kernels: Eigen GEMMs for the dense algebra, OpenMP over rows for everything else.
// Reductions over N (X^T Y products) are split over threads into private partial results and
// summed, because Eigen's own GEMM parallelises over the (small, D x D) output only.
#include <omp.h>

#include <algorithm>
#include <cmath>

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
  const Mat wt = w.transpose();  // [F, out]: one contiguous row per input feature
  y.resize(x.rows, w.rows());
#pragma omp parallel for schedule(dynamic, 256)
  for (Index i = 0; i < x.rows; ++i) {
    auto row = y.row(i);
    if (b)
      row = ConstVecMap(b, w.rows()).transpose();
    else
      row.setZero();
    for (Index e = x.indptr[i]; e < x.indptr[i + 1]; ++e) row += x.values[e] * wt.row(x.indices[e]);
  }
}

void linear_sparse_bwd(const Csr& x_t, CMatRef dy, MatRef dw, float* db) {
  DFM_ASSERT(x_t.cols == dy.rows());
  const Index out = dy.cols();
#pragma omp parallel
  {
    Vec acc(out);
#pragma omp for schedule(dynamic, 64)
    for (Index f = 0; f < x_t.rows; ++f) {
      if (x_t.indptr[f] == x_t.indptr[f + 1]) continue;  // feature never present: no work
      acc.setZero();
      for (Index e = x_t.indptr[f]; e < x_t.indptr[f + 1]; ++e) acc += x_t.values[e] * dy.row(x_t.indices[e]).transpose();
      dw.col(f) += acc;
    }
  }
  if (db) VecMap(db, out) += dy.colwise().sum().transpose();
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

namespace {
inline std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
}  // namespace

void dropout_fwd(Mat& x, float p, std::uint64_t seed, std::vector<std::uint8_t>& keep) {
  const Index n = x.size();
  keep.resize(static_cast<size_t>(n));
  const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  // keep when a uniform 24-bit draw is >= p
  const std::uint32_t threshold = static_cast<std::uint32_t>(std::ceil(static_cast<double>(p) * (1u << 24)));
  float* px = x.data();
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) {
    const std::uint32_t r = static_cast<std::uint32_t>(splitmix64(seed ^ (static_cast<std::uint64_t>(i) * 0xd1342543de82ef95ULL)) >> 40);
    const bool k = r >= threshold;
    keep[i] = k;
    px[i] = k ? px[i] * scale : 0.0f;
  }
}

void dropout_bwd(Mat& dx, float p, const std::vector<std::uint8_t>& keep) {
  const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  float* pd = dx.data();
  const Index n = dx.size();
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) pd[i] = keep[i] ? pd[i] * scale : 0.0f;
}

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

void graph_prop(const Csr& adj, CMatRef v, Mat& g) {
  g.resize(adj.rows, v.cols());
#pragma omp parallel for schedule(dynamic, 256)
  for (Index i = 0; i < adj.rows; ++i) {
    auto row = g.row(i);
    row.setZero();
    for (Index e = adj.indptr[i]; e < adj.indptr[i + 1]; ++e) row += adj.values[e] * v.row(adj.indices[e]);
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
