// DIFFormer-s with the Q/K/V projections folded into D x D algebra (docs/ALGEBRA.md derives every
// line). Every sum over the N instances the attention needs is a product with h:
//   G = h^T h, u = h^T 1                         (forward)
//   [h 1]^T [dnum dden]                          (backward)
// so the per-layer cost over N is two GEMMs forward and two backward. The D x D pieces are
// O(H D^3), negligible next to O(N D^2).
#include <omp.h>

#include <cmath>

#include "core/context.hpp"
#include "core/error.hpp"
#include "core/profile.hpp"
#include "ops/cpu/blas.hpp"
#include "ops/cpu/skinny_gemm.hpp"
#include "ops/ops.hpp"

namespace dfm::cpu {
namespace {

// ||h W^T + 1 b^T||_F from wg = W G and u, in double.
double projected_norm(const Mat& wg, const Vec& u, const ConstMatMap& w, const ConstVecMap& b, Index n) {
  // tr(W G W^T): the D x D product in float (done by the caller), the sum in double
  double quad = 0;
  for (Index i = 0; i < w.rows(); ++i) quad += static_cast<double>(wg.row(i).dot(w.row(i)));
  const Eigen::VectorXd bd = b.cast<double>();
  const double cross = 2.0 * bd.dot(w.cast<double>() * u.cast<double>());
  const double s2 = quad + cross + static_cast<double>(n) * bd.squaredNorm();
  return std::sqrt(std::max(s2, 0.0));
}

struct Views {
  ConstMatMap wq, wk;
  ConstVecMap bq, bk;
  bool has_v;
  ConstMatMap wv;
  ConstVecMap bv;
  Views(const FoldedProjections& w, Index hd, Index d)
      : wq(w.wq, hd, d),
        wk(w.wk, hd, d),
        bq(w.bq, hd),
        bk(w.bk, hd),
        has_v(w.wv != nullptr),
        wv(w.wv ? w.wv : w.wq, hd, d),
        bv(w.bv ? w.bv : w.bq, hd) {}
};

// a b for the D x D algebra, through the skinny kernel (a 64^3 product takes about 7 us there
// against 10-20 us in Eigen's GEMM, which packs both operands). Transposed operands are passed as
// row-major copies (Mat(x.transpose()): a 64 x 64 copy costs about 1 us).
Mat nn(const blas::ConstMatRef& a, const blas::ConstMatRef& b) {
  Mat c(a.rows(), b.cols());
  skinny::gemm_nn(a, b, c);
  return c;
}

// out = rows ids[0 .. m) of h (the rows-only mode's blocks of h, for the row maps).
void gather_rows(const Mat& h, const Index* ids, Index m, Mat& out) {
  out.resize(m, h.cols());
  for (Index k = 0; k < m; ++k) out.row(k) = h.row(ids[k]);
}

}  // namespace

void RowSums::start(Index d, int threads) {
  gram_part_.resize(threads);
  u_part_.resize(threads);
  for (int t = 0; t < threads; ++t) {
    gram_part_[t].setZero(d, d);
    u_part_[t].setZero(d);
  }
}

void RowSums::add(int thread, const Mat& h, Index lo, Index hi) {
  if (hi <= lo) return;
  blas::gram(h.middleRows(lo, hi - lo), gram_part_[thread], 1.0f);  // OpenBLAS ssyrk, one thread
  Vec& u = u_part_[thread];
  for (Index i = lo; i < hi; ++i) u += h.row(i).transpose();  // by rows: a column sum strides over h
}

void RowSums::finish() {
  gram_ = gram_part_[0];
  u_ = u_part_[0];
  for (size_t t = 1; t < gram_part_.size(); ++t) {
    gram_ += gram_part_[t];
    u_ += u_part_[t];
  }
}

void simple_attn_fused_fwd(const Mat& h, const FoldedProjections& w, int heads, Mat& a, SimpleFusedState& st,
                           const std::function<void(Index, Index)>* after_rows, const RowSums* sums_of_h,
                           const std::vector<Index>* rows) {
  const Index n = h.rows(), d = h.cols(), hd = heads * d;
  const Views v(w, hd, d);
  const EigenSerialScope serial;
  prof::Section p_gram("fused_fwd.gram");
  if (sums_of_h) {
    st.gram = sums_of_h->gram();
    st.u = sums_of_h->u();
  } else {
    RowSums sums;
    const int threads = omp_get_max_threads();
    sums.start(d, threads);
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      sums.add(t, h, n * t / threads, n * (t + 1) / threads);
    }
    sums.finish();
    st.gram = sums.gram();
    st.u = sums.u();
  }
  DFM_ASSERT(st.gram.rows() == d && st.u.size() == d);
  p_gram.stop();
  prof::Section p_small("fused_fwd.dxd");
  // W_q G and W_k G (the norms need both, the K side is reused for K^T V below). The forward's
  // D x D algebra runs on this thread alone: its products take about 7 us each, so splitting them
  // would save a few us against a 2 us fork/join that stalls whenever the other core is busy
  // (the backward's two 50 us groups do run one per thread).
  st.wqg = nn(v.wq, st.gram);
  st.wkg = nn(v.wk, st.gram);
  const Mat &wqg = st.wqg, &wkg = st.wkg;
  st.sq = projected_norm(wqg, st.u, v.wq, v.bq, n);
  st.sk = projected_norm(wkg, st.u, v.wk, v.bk, n);
  const float isq = static_cast<float>(1.0 / st.sq), isk = static_cast<float>(1.0 / st.sk);
  const float fn = static_cast<float>(n);
  st.kv.resize(hd, d);
  st.ks.resize(heads, d);
  // Row map: [num_1 .. num_H | den_1 .. den_H] = h B + 1 c^T
  Mat b(d, hd + heads);
  Eigen::RowVectorXf c(hd + heads);
  for (int hh = 0; hh < heads; ++hh) {
    const auto wq_h = v.wq.middleRows(hh * d, d), wk_h = v.wk.middleRows(hh * d, d);
    const auto bq_h = v.bq.segment(hh * d, d), bk_h = v.bk.segment(hh * d, d);
    auto kv = st.kv.middleRows(hh * d, d);
    const Vec ks = (wk_h * st.u + fn * bk_h) * isk;
    st.ks.row(hh) = ks.transpose();
    Vec vs;
    if (v.has_v) {  // KV_h = Kn_h^T (h Wv_h^T + 1 bv_h^T)
      const auto wv_h = v.wv.middleRows(hh * d, d);
      const auto bv_h = v.bv.segment(hh * d, d);
      const Mat kv0 = (wkg.middleRows(hh * d, d) + bk_h * st.u.transpose()) * isk;
      kv = nn(kv0, Mat(wv_h.transpose()));
      kv.noalias() += ks * bv_h.transpose();
      vs = wv_h * st.u + fn * bv_h;
    } else {
      kv.noalias() = (wkg.middleRows(hh * d, d) + bk_h * st.u.transpose()) * isk;
      vs = st.u;
    }
    auto b_h = b.middleCols(hh * d, d);
    skinny::gemm_nn(Mat(wq_h.transpose()), kv, b_h);
    b_h *= isq;
    c.segment(hh * d, d) = (kv.transpose() * bq_h * isq + vs).transpose();
    b.col(hd + hh).noalias() = wq_h.transpose() * ks * isq;
    c[hd + hh] = bq_h.dot(ks) * isq + fn;
  }
  p_small.stop();
  prof::Section p_main("fused_fwd.rows");
  a.resize(n, hd);
  st.den.resize(n, heads);
  const int threads = omp_get_max_threads();
  const Index count = rows ? static_cast<Index>(rows->size()) : n;  // rows computed
  const Index* ids = rows ? rows->data() : nullptr;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const Index lo = count * t / threads, hi = count * (t + 1) / threads;
    constexpr Index kRows = 256;  // keep the [rows, H*D+H] tile in cache
    Mat y, hb;
    for (Index r0 = lo; r0 < hi; r0 += kRows) {
      const Index m = std::min(kRows, hi - r0);
      y.resize(m, b.cols());
      if (ids) {
        gather_rows(h, ids + r0, m, hb);
        skinny::gemm_nn(hb, b, y);
      } else {
        skinny::gemm_nn(h.middleRows(r0, m), b, y);
      }
      for (Index k = 0; k < m; ++k) {
        const Index i = ids ? ids[r0 + k] : r0 + k;
        for (int hh = 0; hh < heads; ++hh) {
          const float den = y(k, hd + hh) + c[hd + hh];
          st.den(i, hh) = den;
          a.row(i).segment(hh * d, d) = (y.row(k).segment(hh * d, d) + c.segment(hh * d, d)) / den;
        }
      }
      if (after_rows) (*after_rows)(r0, r0 + m);
    }
  }
}

void simple_attn_fused_bwd(const Mat& h, const FoldedProjections& w, int heads, const Mat& a,
                           const SimpleFusedState& st, const Mat& da, Mat& dh, const FoldedGrads& g,
                           bool accumulate, const std::function<void(Index, Index)>* before_rows,
                           const std::function<void(Index, Index)>* after_rows, const std::vector<Index>* rows) {
  const Index n = h.rows(), d = h.cols(), hd = heads * d;
  const Views v(w, hd, d);
  const EigenSerialScope serial;
  const float fn = static_cast<float>(n);
  const float isq = static_cast<float>(1.0 / st.sq), isk = static_cast<float>(1.0 / st.sk);
  // X = [dnum_1 .. dnum_H | dden_1 .. dden_H]
  prof::Section p_x("fused_bwd.x+s");
  DFM_ASSERT(!rows || accumulate);
  const Index count = rows ? static_cast<Index>(rows->size()) : n;  // rows where da may be nonzero
  const Index* ids = rows ? rows->data() : nullptr;
  Mat x(count, hd + heads);  // row k belongs to row ids[k] of h with rows
  // One pass per thread over its rows: build X, then its share of S = h^T X and of t = X^T 1
  // (partials summed in thread order: deterministic for a given thread count).
  const int nth = omp_get_max_threads();
  std::vector<Mat> s_part(nth);
  std::vector<Eigen::RowVectorXf> t_part(nth);
#pragma omp parallel num_threads(nth)
  {
    const int th = omp_get_thread_num();
    const Index lo = count * th / nth, hi = count * (th + 1) / nth;
    if (before_rows && hi > lo) (*before_rows)(lo, hi);
    for (Index k = lo; k < hi; ++k) {
      const Index i = ids ? ids[k] : k;
      for (int hh = 0; hh < heads; ++hh) {
        const float den = st.den(i, hh);
        const auto da_i = da.row(i).segment(hh * d, d);
        x.row(k).segment(hh * d, d) = da_i / den;
        x(k, hd + hh) = -da_i.dot(a.row(i).segment(hh * d, d)) / den;
      }
    }
    s_part[th].setZero(d, hd + heads);
    t_part[th].setZero(hd + heads);
    if (hi > lo) {
      if (ids) {
        Mat hb;
        gather_rows(h, ids + lo, hi - lo, hb);
        blas::gemm(hb, true, x.middleRows(lo, hi - lo), false, s_part[th]);
      } else {
        blas::gemm(h.middleRows(lo, hi - lo), true, x.middleRows(lo, hi - lo), false, s_part[th]);
      }
      for (Index k = lo; k < hi; ++k) t_part[th] += x.row(k);
    }
  }
  for (int th = 1; th < nth; ++th) {
    s_part[0] += s_part[th];
    t_part[0] += t_part[th];
  }
  const Mat& s = s_part[0];                 // [D, HD+H]: R_h and r_h
  const Eigen::RowVectorXf& t = t_part[0];  // t_h and tau_h
  // Per head: dKV_h, dks_h; through the value map E_h = dKV_h Wv_h and f_h = dks_h + dKV_h bv_h
  // (E_h = dKV_h, f_h = dks_h without one); hk_h = h^T Kn_h.
  p_x.stop();
  prof::Section p_small("fused_bwd.dxd");
  std::vector<Mat> dkv(heads), e(heads), hk(heads);
  std::vector<Vec> dks(heads), f(heads);
  double gamma_q = 0, gamma_k = 0;
  for (int hh = 0; hh < heads; ++hh) {
    const auto wq_h = v.wq.middleRows(hh * d, d);
    const auto bq_h = v.bq.segment(hh * d, d), bk_h = v.bk.segment(hh * d, d);
    dkv[hh] = nn(wq_h, s.middleCols(hh * d, d));
    dkv[hh].noalias() += bq_h * t.segment(hh * d, d);
    dkv[hh] *= isq;
    dks[hh] = (wq_h * s.col(hd + hh) + bq_h * t[hd + hh]) * isq;
    if (v.has_v) {
      e[hh] = nn(dkv[hh], v.wv.middleRows(hh * d, d));
      f[hh] = dks[hh] + dkv[hh] * v.bv.segment(hh * d, d);
    } else {
      e[hh] = dkv[hh];
      f[hh] = dks[hh];
    }
    hk[hh] = (st.wkg.middleRows(hh * d, d).transpose() + st.u * bk_h.transpose()) * isk;  // G symmetric
    gamma_q += static_cast<double>(st.kv.middleRows(hh * d, d).cwiseProduct(dkv[hh]).sum()) +
               static_cast<double>(st.ks.row(hh).dot(dks[hh].transpose()));
    gamma_k += static_cast<double>(e[hh].transpose().cwiseProduct(hk[hh]).sum()) +
               static_cast<double>(f[hh].dot(st.ks.row(hh).transpose()));
  }
  const float gq = static_cast<float>(gamma_q), gk = static_cast<float>(gamma_k);
  // Parameter gradients and the D x D maps of dh = X P + h Z + 1 z^T.
  Mat p(hd + heads, d), z = Mat::Zero(d, d);
  Vec zb = Vec::Zero(d);
  MatMap dwq(g.wq, hd, d), dwk(g.wk, hd, d);
  VecMap dbq(g.bq, hd), dbk(g.bk, hd);
  // Two independent groups of D x D products (parameter gradients and P | Z and the value map),
  // one per thread: each takes about 50 us at D = 64, a fork/join about 2 us.
  auto grads_and_p = [&] {
    for (int hh = 0; hh < heads; ++hh) {
      const auto wq_h = v.wq.middleRows(hh * d, d), wk_h = v.wk.middleRows(hh * d, d);
      const auto bq_h = v.bq.segment(hh * d, d), bk_h = v.bk.segment(hh * d, d);
      const auto kv_h = st.kv.middleRows(hh * d, d);
      const Vec ks_h = st.ks.row(hh).transpose();
      const auto r_h = s.middleCols(hh * d, d);
      const Vec rr = s.col(hd + hh);
      const Vec t_h = t.segment(hh * d, d).transpose();
      const float tau = t[hd + hh];
      const auto wqg_h = st.wqg.middleRows(hh * d, d), wkg_h = st.wkg.middleRows(hh * d, d);  // W G, saved
      const Mat kv_rt = nn(kv_h, Mat(r_h.transpose()));
      dwq.middleRows(hh * d, d).noalias() +=
          (kv_rt + ks_h * rr.transpose() - (gq * isq) * (wqg_h + bq_h * st.u.transpose())) * isq;
      dbq.segment(hh * d, d) += (kv_h * t_h + ks_h * tau - (gq * isq) * (wq_h * st.u + fn * bq_h)) * isq;
      const Mat eg = nn(e[hh], st.gram);
      dwk.middleRows(hh * d, d).noalias() +=
          (eg + f[hh] * st.u.transpose() - (gk * isk) * (wkg_h + bk_h * st.u.transpose())) * isk;
      dbk.segment(hh * d, d) += (e[hh] * st.u + fn * f[hh] - (gk * isk) * (wk_h * st.u + fn * bk_h)) * isk;
      auto p_h = p.middleRows(hh * d, d);
      skinny::gemm_nn(Mat(kv_h.transpose()), wq_h, p_h);
      p_h *= isq;
      p.row(hd + hh) = (wq_h.transpose() * ks_h * isq).transpose();
    }
  };
  auto z_and_value = [&] {
    for (int hh = 0; hh < heads; ++hh) {
      const auto wq_h = v.wq.middleRows(hh * d, d), wk_h = v.wk.middleRows(hh * d, d);
      const auto bq_h = v.bq.segment(hh * d, d), bk_h = v.bk.segment(hh * d, d);
      const Vec ks_h = st.ks.row(hh).transpose();
      const Vec t_h = t.segment(hh * d, d).transpose();
      // through Q (norm term), through K, and through V: dV_h = Kn_h dKV_h + 1 t_h^T
      const Mat wq_t = wq_h.transpose(), wk_t = wk_h.transpose();
      const Mat et_wk = nn(Mat(e[hh].transpose()), wk_h);  // its transpose is wk^T e
      z.noalias() += (-gq * isq * isq) * nn(wq_t, wq_h) + et_wk * isk - (gk * isk * isk) * nn(wk_t, wk_h) +
                     et_wk.transpose() * isk;
      zb += (-gq * isq * isq) * (wq_h.transpose() * bq_h) + (wk_h.transpose() * f[hh]) * isk -
            (gk * isk * isk) * (wk_h.transpose() * bk_h) + (e[hh].transpose() * bk_h) * isk;
      if (v.has_v) {
        const auto wv_h = v.wv.middleRows(hh * d, d);
        zb += wv_h.transpose() * t_h;
        MatMap dwv(g.wv, hd, d);
        VecMap dbv(g.bv, hd);
        dwv.middleRows(hh * d, d).noalias() += dkv[hh].transpose() * hk[hh].transpose() + t_h * st.u.transpose();
        dbv.segment(hh * d, d) += dkv[hh].transpose() * ks_h + fn * t_h;
      } else {
        zb += t_h;
      }
    }
  };
#pragma omp parallel sections num_threads(2) if (omp_get_max_threads() > 1)
  {
#pragma omp section
    grads_and_p();
#pragma omp section
    z_and_value();
  }
  p_small.stop();
  prof::Section p_rows("fused_bwd.rows");
  if (accumulate)
    DFM_ASSERT(dh.rows() == n && dh.cols() == d);
  else
    dh.resize(n, d);
  const int threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
  {
    const int th = omp_get_thread_num();
    if (ids) {  // X P on the given rows only (distinct rows: no two threads add to one)
      const Index lo = count * th / threads, hi = count * (th + 1) / threads;
      if (hi > lo) {
        Mat xp(hi - lo, d);
        skinny::gemm_nn(x.middleRows(lo, hi - lo), p, xp);
        for (Index k = lo; k < hi; ++k) dh.row(ids[k]) += xp.row(k - lo);
      }
#pragma omp barrier
    }
    const Index lo = n * th / threads, hi = n * (th + 1) / threads;
    if (hi > lo) {
      auto out = dh.middleRows(lo, hi - lo);
      if (!ids) skinny::gemm_nn(x.middleRows(lo, hi - lo), p, out, accumulate);
      skinny::gemm_nn(h.middleRows(lo, hi - lo), z, out, true);
      out.rowwise() += zb.transpose();
      if (after_rows) (*after_rows)(lo, hi);
    }
  }
}

}  // namespace dfm::cpu
