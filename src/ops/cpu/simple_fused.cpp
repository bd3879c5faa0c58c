// DIFFormer-s with the Q/K projections folded into D x D algebra (docs/ALGEBRA.md derives every
// line). With V = h, every sum over the N instances that the attention needs is a product with h:
//   G = h^T h, u = h^T 1                         (forward)
//   [h 1]^T [dnum dden]                          (backward)
// so the per-layer cost over N is two GEMMs forward and two backward, against eight for
// project-then-attend. The D x D pieces are O(H D^3), negligible next to O(N D^2).
#include <omp.h>

#include <cmath>

#include "core/error.hpp"
#include "ops/ops.hpp"

namespace dfm::cpu {
namespace {

// out = a^T b over row chunks in parallel (a [N, p], b [N, q]).
Mat gram_tn(const Mat& a, const Mat& b) {
  const Index n = a.rows();
  const int threads = omp_get_max_threads();
  std::vector<Mat> part(threads, Mat::Zero(a.cols(), b.cols()));
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const Index lo = n * t / threads, hi = n * (t + 1) / threads;
    if (hi > lo) part[t].noalias() += a.middleRows(lo, hi - lo).transpose() * b.middleRows(lo, hi - lo);
  }
  for (int t = 1; t < threads; ++t) part[0] += part[t];
  return part[0];
}

// ||h W^T + 1 b^T||_F from G and u, in double.
double projected_norm(const Mat& gram, const Vec& u, CMatRef w, const float* b, Index n) {
  const Eigen::MatrixXd wd = w.cast<double>();
  const Eigen::VectorXd bd = ConstVecMap(b, w.rows()).cast<double>();
  const double quad = ((wd * gram.cast<double>()).cwiseProduct(wd)).sum();
  const double cross = 2.0 * bd.dot(wd * u.cast<double>());
  const double s2 = quad + cross + static_cast<double>(n) * bd.squaredNorm();
  return std::sqrt(std::max(s2, 0.0));
}

}  // namespace

void simple_attn_fused_fwd(const Mat& h, CMatRef wq, const float* bq, CMatRef wk, const float* bk, int heads,
                           Mat& a, SimpleFusedState& st) {
  const Index n = h.rows(), d = h.cols(), hd = heads * d;
  DFM_ASSERT(wq.rows() == hd && wq.cols() == d && wk.rows() == hd && wk.cols() == d);
  st.gram = gram_tn(h, h);
  st.u = h.colwise().sum().transpose();
  st.sq = projected_norm(st.gram, st.u, wq, bq, n);
  st.sk = projected_norm(st.gram, st.u, wk, bk, n);
  const float isq = static_cast<float>(1.0 / st.sq), isk = static_cast<float>(1.0 / st.sk);
  ConstVecMap bqv(bq, hd), bkv(bk, hd);
  st.kv.resize(hd, d);
  st.ks.resize(heads, d);
  // Row map: [num_1 .. num_H | den_1 .. den_H] = h B + 1 c^T
  Mat b(d, hd + heads);
  Eigen::RowVectorXf c(hd + heads);
  for (int hh = 0; hh < heads; ++hh) {
    const auto wq_h = wq.middleRows(hh * d, d), wk_h = wk.middleRows(hh * d, d);
    auto kv = st.kv.middleRows(hh * d, d);
    kv.noalias() = (wk_h * st.gram + bkv.segment(hh * d, d) * st.u.transpose()) * isk;
    st.ks.row(hh) = ((wk_h * st.u + static_cast<float>(n) * bkv.segment(hh * d, d)) * isk).transpose();
    b.middleCols(hh * d, d).noalias() = wq_h.transpose() * kv * isq;
    c.segment(hh * d, d) = (kv.transpose() * bqv.segment(hh * d, d) * isq + st.u).transpose();
    b.col(hd + hh).noalias() = wq_h.transpose() * st.ks.row(hh).transpose() * isq;
    c[hd + hh] = bqv.segment(hh * d, d).dot(st.ks.row(hh).transpose()) * isq + static_cast<float>(n);
  }
  a.resize(n, hd);
  st.den.resize(n, heads);
  const int threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const Index lo = n * t / threads, hi = n * (t + 1) / threads;
    constexpr Index kRows = 256;  // keep the [rows, H*D+H] tile in cache
    Mat y;
    for (Index r0 = lo; r0 < hi; r0 += kRows) {
      const Index m = std::min(kRows, hi - r0);
      y.noalias() = h.middleRows(r0, m) * b;
      for (Index i = 0; i < m; ++i) {
        for (int hh = 0; hh < heads; ++hh) {
          const float den = y(i, hd + hh) + c[hd + hh];
          st.den(r0 + i, hh) = den;
          a.row(r0 + i).segment(hh * d, d) = (y.row(i).segment(hh * d, d) + c.segment(hh * d, d)) / den;
        }
      }
    }
  }
}

void simple_attn_fused_bwd(const Mat& h, CMatRef wq, const float* bq, CMatRef wk, const float* bk, int heads,
                           const Mat& a, const SimpleFusedState& st, const Mat& da, Mat& dh, MatRef dwq, float* dbq,
                           MatRef dwk, float* dbk) {
  const Index n = h.rows(), d = h.cols(), hd = heads * d;
  const float fn = static_cast<float>(n);
  const float isq = static_cast<float>(1.0 / st.sq), isk = static_cast<float>(1.0 / st.sk);
  ConstVecMap bqv(bq, hd), bkv(bk, hd);
  // X = [dnum_1 .. dnum_H | dden_1 .. dden_H]
  Mat x(n, hd + heads);
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i)
    for (int hh = 0; hh < heads; ++hh) {
      const float den = st.den(i, hh);
      const auto da_i = da.row(i).segment(hh * d, d);
      x.row(i).segment(hh * d, d) = da_i / den;
      x(i, hd + hh) = -da_i.dot(a.row(i).segment(hh * d, d)) / den;
    }
  const Mat s = gram_tn(h, x);                                // [D, HD+H]: R_h and r_h
  const Eigen::RowVectorXf t = x.colwise().sum();             // t_h and tau_h
  Mat dkv(hd, d), dks(heads, d);
  double gamma_q = 0, gamma_k = 0;
  for (int hh = 0; hh < heads; ++hh) {
    const auto wq_h = wq.middleRows(hh * d, d), wk_h = wk.middleRows(hh * d, d);
    const auto r_h = s.middleCols(hh * d, d);
    auto dkv_h = dkv.middleRows(hh * d, d);
    dkv_h.noalias() = (wq_h * r_h + bqv.segment(hh * d, d) * t.segment(hh * d, d)) * isq;
    dks.row(hh) = ((wq_h * s.col(hd + hh) + bqv.segment(hh * d, d) * t[hd + hh]) * isq).transpose();
    const Mat hk = (st.gram * wk_h.transpose() + st.u * bkv.segment(hh * d, d).transpose()) * isk;  // h^T Kn_h
    gamma_q += static_cast<double>(st.kv.middleRows(hh * d, d).cwiseProduct(dkv_h).sum()) +
               static_cast<double>(st.ks.row(hh).dot(dks.row(hh)));
    gamma_k += static_cast<double>(dkv_h.transpose().cwiseProduct(hk).sum()) +
               static_cast<double>(dks.row(hh).dot(st.ks.row(hh)));
  }
  const float gq = static_cast<float>(gamma_q), gk = static_cast<float>(gamma_k);
  // Parameter gradients and the D x D maps of dh = X P + h Z + 1 z^T.
  Mat p(hd + heads, d), z = Mat::Zero(d, d);
  Vec zb = Vec::Zero(d);
  VecMap dbqv(dbq, hd), dbkv(dbk, hd);
  for (int hh = 0; hh < heads; ++hh) {
    const auto wq_h = wq.middleRows(hh * d, d), wk_h = wk.middleRows(hh * d, d);
    const auto kv_h = st.kv.middleRows(hh * d, d);
    const auto dkv_h = dkv.middleRows(hh * d, d);
    const Vec ks_h = st.ks.row(hh).transpose(), dks_h = dks.row(hh).transpose();
    const auto bq_h = bqv.segment(hh * d, d), bk_h = bkv.segment(hh * d, d);
    const auto r_h = s.middleCols(hh * d, d);
    const Vec rr = s.col(hd + hh);
    const Vec t_h = t.segment(hh * d, d).transpose();
    const float tau = t[hd + hh];
    dwq.middleRows(hh * d, d).noalias() +=
        (kv_h * r_h.transpose() + ks_h * rr.transpose() - (gq * isq) * (wq_h * st.gram + bq_h * st.u.transpose())) *
        isq;
    dbqv.segment(hh * d, d) += (kv_h * t_h + ks_h * tau - (gq * isq) * (wq_h * st.u + fn * bq_h)) * isq;
    dwk.middleRows(hh * d, d).noalias() +=
        (dkv_h * st.gram + dks_h * st.u.transpose() - (gk * isk) * (wk_h * st.gram + bk_h * st.u.transpose())) * isk;
    dbkv.segment(hh * d, d) += (dkv_h * st.u + fn * dks_h - (gk * isk) * (wk_h * st.u + fn * bk_h)) * isk;
    p.middleRows(hh * d, d).noalias() = kv_h.transpose() * wq_h * isq;
    p.row(hd + hh) = (wq_h.transpose() * ks_h * isq).transpose();
    z.noalias() += (-gq * isq * isq) * (wq_h.transpose() * wq_h) + (dkv_h.transpose() * wk_h) * isk -
                   (gk * isk * isk) * (wk_h.transpose() * wk_h) + (wk_h.transpose() * dkv_h) * isk;
    zb += (-gq * isq * isq) * (wq_h.transpose() * bq_h) + (wk_h.transpose() * dks_h) * isk -
          (gk * isk * isk) * (wk_h.transpose() * bk_h) + (dkv_h.transpose() * bk_h) * isk + t_h;
  }
  dh.resize(n, d);
  const int threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int th = omp_get_thread_num();
    const Index lo = n * th / threads, hi = n * (th + 1) / threads;
    if (hi > lo) {
      auto out = dh.middleRows(lo, hi - lo);
      out.noalias() = x.middleRows(lo, hi - lo) * p;
      out.noalias() += h.middleRows(lo, hi - lo) * z;
      out.rowwise() += zb.transpose();
    }
  }
}

}  // namespace dfm::cpu
