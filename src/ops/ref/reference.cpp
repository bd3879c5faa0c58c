// Naive double-precision reference kernels: the executable specification of every op (SPEC.md
// section 1). Deliberately plain loops with no blocking or threading, so that each line can be
// read against the formula. Used by the tests only; never on a hot path.
#include <cmath>

#include "core/error.hpp"
#include "ops/ops.hpp"

namespace dfm::ref {

void linear_fwd(const MatD& x, const MatD& w, const VecD& b, MatD& y) {
  DFM_ASSERT(x.cols() == w.cols());
  y.resize(x.rows(), w.rows());
  for (Index i = 0; i < x.rows(); ++i)
    for (Index o = 0; o < w.rows(); ++o) {
      double s = b.size() ? b[o] : 0.0;
      for (Index f = 0; f < x.cols(); ++f) s += x(i, f) * w(o, f);
      y(i, o) = s;
    }
}

void linear_bwd(const MatD& x, const MatD& w, const MatD& dy, MatD* dx, MatD& dw, VecD* db) {
  if (dx) {
    dx->setZero(x.rows(), x.cols());
    for (Index i = 0; i < x.rows(); ++i)
      for (Index o = 0; o < w.rows(); ++o)
        for (Index f = 0; f < x.cols(); ++f) (*dx)(i, f) += dy(i, o) * w(o, f);
  }
  for (Index i = 0; i < x.rows(); ++i)
    for (Index o = 0; o < w.rows(); ++o) {
      for (Index f = 0; f < x.cols(); ++f) dw(o, f) += dy(i, o) * x(i, f);
      if (db) (*db)[o] += dy(i, o);
    }
}

void linear_sparse_fwd(const CsrD& x, const MatD& w, const VecD& b, MatD& y) {
  y.resize(x.rows, w.rows());
  for (Index i = 0; i < x.rows; ++i)
    for (Index o = 0; o < w.rows(); ++o) {
      double s = b.size() ? b[o] : 0.0;
      for (Index e = x.indptr[i]; e < x.indptr[i + 1]; ++e) s += x.values[e] * w(o, x.indices[e]);
      y(i, o) = s;
    }
}

void linear_sparse_bwd(const CsrD& x, const MatD& dy, MatD& dw, VecD* db) {
  for (Index i = 0; i < x.rows; ++i)
    for (Index o = 0; o < dy.cols(); ++o) {
      for (Index e = x.indptr[i]; e < x.indptr[i + 1]; ++e) dw(o, x.indices[e]) += dy(i, o) * x.values[e];
      if (db) (*db)[o] += dy(i, o);
    }
}

void layernorm_fwd(const MatD& x, const VecD& gamma, const VecD& beta, double eps, MatD& y) {
  const Index n = x.rows(), d = x.cols();
  y.resize(n, d);
  for (Index i = 0; i < n; ++i) {
    double mean = 0, var = 0;
    for (Index j = 0; j < d; ++j) mean += x(i, j);
    mean /= d;
    for (Index j = 0; j < d; ++j) var += (x(i, j) - mean) * (x(i, j) - mean);
    var /= d;  // biased, as torch.nn.LayerNorm
    for (Index j = 0; j < d; ++j) y(i, j) = (x(i, j) - mean) / std::sqrt(var + eps) * gamma[j] + beta[j];
  }
}

void layernorm_bwd(const MatD& x, const VecD& gamma, double eps, const MatD& dy, MatD& dx, VecD& dgamma,
                   VecD& dbeta) {
  const Index n = x.rows(), d = x.cols();
  dx.resize(n, d);
  for (Index i = 0; i < n; ++i) {
    double mean = 0, var = 0;
    for (Index j = 0; j < d; ++j) mean += x(i, j);
    mean /= d;
    for (Index j = 0; j < d; ++j) var += (x(i, j) - mean) * (x(i, j) - mean);
    var /= d;
    const double rstd = 1.0 / std::sqrt(var + eps);
    double sum_g = 0, sum_gx = 0;  // sums of g = dy*gamma and g*xhat
    for (Index j = 0; j < d; ++j) {
      const double xhat = (x(i, j) - mean) * rstd;
      const double g = dy(i, j) * gamma[j];
      sum_g += g;
      sum_gx += g * xhat;
      dgamma[j] += dy(i, j) * xhat;
      dbeta[j] += dy(i, j);
    }
    for (Index j = 0; j < d; ++j) {
      const double xhat = (x(i, j) - mean) * rstd;
      dx(i, j) = rstd * (dy(i, j) * gamma[j] - sum_g / d - xhat * sum_gx / d);
    }
  }
}

void relu_fwd(const MatD& x, MatD& y) {
  y.resize(x.rows(), x.cols());
  for (Index i = 0; i < x.size(); ++i) y.data()[i] = x.data()[i] > 0 ? x.data()[i] : 0.0;
}

void relu_bwd(const MatD& y, const MatD& dy, MatD& dx) {
  dx.resize(y.rows(), y.cols());
  for (Index i = 0; i < y.size(); ++i) dx.data()[i] = y.data()[i] > 0 ? dy.data()[i] : 0.0;
}

void dropout_apply(const std::vector<std::uint8_t>& keep, double p, const MatD& x, MatD& y) {
  y.resize(x.rows(), x.cols());
  const double scale = p < 1.0 ? 1.0 / (1.0 - p) : 0.0;
  for (Index i = 0; i < x.size(); ++i) y.data()[i] = keep[i] ? x.data()[i] * scale : 0.0;
}

// ---- DIFFormer-s -------------------------------------------------------------------------
// Per head h: a_i = (qn_i^T KV + vs) / (qn_i . ks + N), KV = sum_l kn_l v_l^T, ks = sum_l kn_l.
void simple_attn_fwd(const MatD& q, const MatD& k, const MatD& v, int heads, QkNorm norm, MatD& a,
                     SimpleAttnStateD& st) {
  const Index n = q.rows(), d = q.cols() / heads, dv = v.cols() / (v.cols() == q.cols() ? heads : 1);
  const int vheads = v.cols() == q.cols() ? heads : 1;
  DFM_ASSERT(v.cols() == vheads * dv);
  st.qn = q;
  st.kn = k;
  if (norm == QkNorm::global) {
    double sq = 0, sk = 0;
    for (Index i = 0; i < q.size(); ++i) sq += q.data()[i] * q.data()[i];
    for (Index i = 0; i < k.size(); ++i) sk += k.data()[i] * k.data()[i];
    st.qnorm = VecD::Constant(1, std::sqrt(sq));
    st.knorm = VecD::Constant(1, std::sqrt(sk));
    st.qn /= st.qnorm[0];
    st.kn /= st.knorm[0];
  } else {
    st.qnorm.resize(n * heads);
    st.knorm.resize(n * heads);
    for (Index i = 0; i < n; ++i)
      for (int h = 0; h < heads; ++h) {
        double sq = 0, sk = 0;
        for (Index c = 0; c < d; ++c) {
          sq += q(i, h * d + c) * q(i, h * d + c);
          sk += k(i, h * d + c) * k(i, h * d + c);
        }
        // torch.nn.functional.normalize semantics: divide by max(norm, 1e-12)
        st.qnorm[i * heads + h] = std::max(std::sqrt(sq), 1e-12);
        st.knorm[i * heads + h] = std::max(std::sqrt(sk), 1e-12);
        for (Index c = 0; c < d; ++c) {
          st.qn(i, h * d + c) /= st.qnorm[i * heads + h];
          st.kn(i, h * d + c) /= st.knorm[i * heads + h];
        }
      }
  }
  st.kv.setZero(heads * d, dv);
  st.ks.setZero(heads, d);
  st.vs.setZero(heads, dv);
  st.den.resize(n, heads);
  a.resize(n, heads * dv);
  for (int h = 0; h < heads; ++h) {
    const int hv = vheads == 1 ? 0 : h;
    for (Index l = 0; l < n; ++l)
      for (Index c = 0; c < d; ++c) {
        st.ks(h, c) += st.kn(l, h * d + c);
        for (Index e = 0; e < dv; ++e) st.kv(h * d + c, e) += st.kn(l, h * d + c) * v(l, hv * dv + e);
      }
    for (Index l = 0; l < n; ++l)
      for (Index e = 0; e < dv; ++e) st.vs(h, e) += v(l, hv * dv + e);
    for (Index i = 0; i < n; ++i) {
      double den = static_cast<double>(n);
      for (Index c = 0; c < d; ++c) den += st.qn(i, h * d + c) * st.ks(h, c);
      st.den(i, h) = den;
      for (Index e = 0; e < dv; ++e) {
        double num = st.vs(h, e);
        for (Index c = 0; c < d; ++c) num += st.qn(i, h * d + c) * st.kv(h * d + c, e);
        a(i, h * dv + e) = num / den;
      }
    }
  }
}

void simple_attn_bwd(const MatD& v, int heads, const MatD& a, const SimpleAttnStateD& st, const MatD& da,
                     MatD& dq, MatD& dk, MatD& dv_out) {
  const Index n = st.qn.rows(), d = st.qn.cols() / heads;
  const int vheads = v.cols() == st.qn.cols() ? heads : 1;
  const Index dv = v.cols() / vheads;
  MatD dqn = MatD::Zero(n, heads * d), dkn = MatD::Zero(n, heads * d);
  dv_out.setZero(n, v.cols());
  for (int h = 0; h < heads; ++h) {
    const int hv = vheads == 1 ? 0 : h;
    MatD dkv = MatD::Zero(d, dv);
    VecD dks = VecD::Zero(d), dvs = VecD::Zero(dv);
    for (Index i = 0; i < n; ++i) {
      const double den = st.den(i, h);
      double dden = 0;
      for (Index e = 0; e < dv; ++e) dden -= da(i, h * dv + e) * a(i, h * dv + e) / den;
      for (Index e = 0; e < dv; ++e) {
        const double dnum = da(i, h * dv + e) / den;
        dvs[e] += dnum;
        for (Index c = 0; c < d; ++c) {
          dqn(i, h * d + c) += st.kv(h * d + c, e) * dnum;
          dkv(c, e) += st.qn(i, h * d + c) * dnum;
        }
      }
      for (Index c = 0; c < d; ++c) {
        dqn(i, h * d + c) += dden * st.ks(h, c);
        dks[c] += dden * st.qn(i, h * d + c);
      }
    }
    for (Index l = 0; l < n; ++l) {
      for (Index c = 0; c < d; ++c) {
        double g = dks[c];
        for (Index e = 0; e < dv; ++e) g += dkv(c, e) * v(l, hv * dv + e);
        dkn(l, h * d + c) = g;
      }
      for (Index e = 0; e < dv; ++e) {
        double g = dvs[e];
        for (Index c = 0; c < d; ++c) g += dkv(c, e) * st.kn(l, h * d + c);
        dv_out(l, hv * dv + e) += g;
      }
    }
  }
  // Through the normalisation xn = x / s: dx = (dxn - xn * <dxn, xn>) / s, the inner product over
  // the whole tensor (global) or over each node-head row (node).
  auto unnormalise = [&](const MatD& xn, const VecD& s, const MatD& dxn, MatD& dx) {
    dx.resize(xn.rows(), xn.cols());
    if (s.size() == 1) {
      double dot = 0;
      for (Index i = 0; i < xn.size(); ++i) dot += dxn.data()[i] * xn.data()[i];
      for (Index i = 0; i < xn.size(); ++i) dx.data()[i] = (dxn.data()[i] - xn.data()[i] * dot) / s[0];
    } else {
      for (Index i = 0; i < n; ++i)
        for (int h = 0; h < heads; ++h) {
          double dot = 0;
          for (Index c = 0; c < d; ++c) dot += dxn(i, h * d + c) * xn(i, h * d + c);
          const double sc = s[i * heads + h];
          // below the clamp torch's normalize divides by a constant: no projection term
          const bool clamped = sc <= 1e-12;
          for (Index c = 0; c < d; ++c)
            dx(i, h * d + c) = (dxn(i, h * d + c) - (clamped ? 0.0 : xn(i, h * d + c) * dot)) / sc;
        }
    }
  };
  unnormalise(st.qn, st.qnorm, dqn, dq);
  unnormalise(st.kn, st.knorm, dkn, dk);
}

// ---- DIFFormer-a -------------------------------------------------------------------------
static double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

void sigmoid_attn_fwd(const MatD& q, const MatD& k, const MatD& v, int heads, MatD& a, MatD& rowsum) {
  const Index n = q.rows(), d = q.cols() / heads;
  const int vheads = v.cols() == q.cols() ? heads : 1;
  const Index dv = v.cols() / vheads;
  a.setZero(n, heads * dv);
  rowsum.setZero(n, heads);
  for (int h = 0; h < heads; ++h) {
    const int hv = vheads == 1 ? 0 : h;
    for (Index i = 0; i < n; ++i) {
      for (Index j = 0; j < n; ++j) {
        double z = 0;
        for (Index c = 0; c < d; ++c) z += q(i, h * d + c) * k(j, h * d + c);
        const double w = sigmoid(z);
        rowsum(i, h) += w;
        for (Index e = 0; e < dv; ++e) a(i, h * dv + e) += w * v(j, hv * dv + e);
      }
      for (Index e = 0; e < dv; ++e) a(i, h * dv + e) /= rowsum(i, h);
    }
  }
}

void sigmoid_attn_bwd(const MatD& q, const MatD& k, const MatD& v, int heads, const MatD& a,
                      const MatD& rowsum, const MatD& da, MatD& dq, MatD& dk, MatD& dv_out) {
  const Index n = q.rows(), d = q.cols() / heads;
  const int vheads = v.cols() == q.cols() ? heads : 1;
  const Index dv = v.cols() / vheads;
  dq.setZero(n, q.cols());
  dk.setZero(n, k.cols());
  dv_out.setZero(n, v.cols());
  for (int h = 0; h < heads; ++h) {
    const int hv = vheads == 1 ? 0 : h;
    for (Index i = 0; i < n; ++i) {
      double delta = 0;  // dA_i . A_i
      for (Index e = 0; e < dv; ++e) delta += da(i, h * dv + e) * a(i, h * dv + e);
      const double r = rowsum(i, h);
      for (Index j = 0; j < n; ++j) {
        double z = 0;
        for (Index c = 0; c < d; ++c) z += q(i, h * d + c) * k(j, h * d + c);
        const double w = sigmoid(z);
        double dp = 0;  // dA_i . V_j
        for (Index e = 0; e < dv; ++e) {
          dp += da(i, h * dv + e) * v(j, hv * dv + e);
          dv_out(j, hv * dv + e) += w / r * da(i, h * dv + e);
        }
        const double dz = w * (1 - w) * (dp - delta) / r;
        for (Index c = 0; c < d; ++c) {
          dq(i, h * d + c) += dz * k(j, h * d + c);
          dk(j, h * d + c) += dz * q(i, h * d + c);
        }
      }
    }
  }
}

void graph_prop(const CsrD& adj, const MatD& v, MatD& g) {
  g.setZero(adj.rows, v.cols());
  for (Index i = 0; i < adj.rows; ++i)
    for (Index e = adj.indptr[i]; e < adj.indptr[i + 1]; ++e)
      for (Index c = 0; c < v.cols(); ++c) g(i, c) += adj.values[e] * v(adj.indices[e], c);
}

// ---- losses --------------------------------------------------------------------------------
double cross_entropy(const MatD& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx,
                     MatD& dlogits) {
  dlogits.setZero(logits.rows(), logits.cols());
  double loss = 0;
  const double inv = 1.0 / static_cast<double>(idx.size());
  for (auto i : idx) {
    double mx = logits.row(i).maxCoeff(), se = 0;
    for (Index c = 0; c < logits.cols(); ++c) se += std::exp(logits(i, c) - mx);
    const double lse = mx + std::log(se);
    loss += lse - logits(i, y[i]);
    for (Index c = 0; c < logits.cols(); ++c) dlogits(i, c) = std::exp(logits(i, c) - lse) * inv;
    dlogits(i, y[i]) -= inv;
  }
  return loss * inv;
}

double bce_with_logits(const MatD& logits, const MatD& y, const std::vector<std::int64_t>& idx, MatD& dlogits) {
  dlogits.setZero(logits.rows(), logits.cols());
  const double inv = 1.0 / static_cast<double>(idx.size() * logits.cols());
  double loss = 0;
  for (auto i : idx)
    for (Index t = 0; t < logits.cols(); ++t) {
      const double z = logits(i, t), target = y(i, t);
      loss += std::max(z, 0.0) - z * target + std::log1p(std::exp(-std::abs(z)));
      dlogits(i, t) = (sigmoid(z) - target) * inv;
    }
  return loss * inv;
}

double mse(const MatD& pred, const MatD& y, const std::vector<std::int64_t>& idx, MatD& dpred) {
  dpred.setZero(pred.rows(), pred.cols());
  const double inv = 1.0 / static_cast<double>(idx.size() * pred.cols());
  double loss = 0;
  for (auto i : idx)
    for (Index t = 0; t < pred.cols(); ++t) {
      const double r = pred(i, t) - y(i, t);
      loss += r * r;
      dpred(i, t) = 2 * r * inv;
    }
  return loss * inv;
}

}  // namespace dfm::ref
