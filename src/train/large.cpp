#include "train/large.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <memory>
#include <sstream>

#include "core/context.hpp"
#include "core/error.hpp"
#include "core/memory.hpp"
#include "ops/cuda_backend.hpp"
#include "ops/ops.hpp"
#include "train/minibatch.hpp"

namespace dfm {

namespace {

constexpr float kLnEps = 1e-5f;  // as the model
constexpr Index kRows = 2048;    // rows per block

// The model's seed mixing (src/model/difformer.cpp), reproduced so that block-wise recomputation
// draws the same masks (the hash itself is ops.hpp's dropout_draw).
std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t salt) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (salt + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

struct Dropout {
  bool on = false;
  float scale = 1.0f;
  std::uint32_t threshold = 0;
  std::uint64_t seed = 0;
  Dropout() = default;
  Dropout(bool training, float p, std::uint64_t s) : on(training && p > 0), seed(s) {
    scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    threshold = cpu::dropout_threshold(p);
  }
  // y = keep ? y * scale : 0 for rows [lo, lo + m) of an [n, width] matrix (global element ids).
  template <typename Block>
  void apply(Block&& y, Index lo) const {
    if (!on) return;
    const Index w = y.cols();
    for (Index r = 0; r < y.rows(); ++r)
      for (Index c = 0; c < w; ++c) {
        const std::uint64_t i = static_cast<std::uint64_t>((lo + r) * w + c);
        const std::uint32_t h = cpu::dropout_draw(seed, i);
        y(r, c) = h >= threshold ? y(r, c) * scale : 0.0f;
      }
  }
};

struct LayerSlots {
  int wq = -1, bq = -1, wk = -1, bk = -1, wv = -1, bv = -1, ln_g = -1, ln_b = -1;
};
struct Slots {
  int fc_in_w, fc_in_b, fc_out_w, fc_out_b, ln_in_g, ln_in_b;
  std::vector<LayerSlots> layers;
};

Slots find_slots(const ParamStore& p, const ModelConfig& c) {
  auto get = [&](const std::string& name) {
    const int s = p.find(name);
    DFM_ASSERT(s >= 0);
    return s;
  };
  Slots s;
  s.fc_in_w = get("fcs.0.weight");
  s.fc_in_b = get("fcs.0.bias");
  s.fc_out_w = get("fcs.1.weight");
  s.fc_out_b = get("fcs.1.bias");
  s.ln_in_g = get("bns.0.weight");
  s.ln_in_b = get("bns.0.bias");
  for (int l = 0; l < c.layers; ++l) {
    const std::string q = "convs." + std::to_string(l) + ".";
    LayerSlots ls;
    ls.wq = get(q + "Wq.weight");
    ls.bq = get(q + "Wq.bias");
    ls.wk = get(q + "Wk.weight");
    ls.bk = get(q + "Wk.bias");
    if (c.use_weight) {
      ls.wv = get(q + "Wv.weight");
      ls.bv = get(q + "Wv.bias");
    }
    ls.ln_g = get("bns." + std::to_string(l + 1) + ".weight");
    ls.ln_b = get("bns." + std::to_string(l + 1) + ".bias");
    s.layers.push_back(ls);
  }
  return s;
}

// Runs fn(thread, lo, m) over blocks of kRows rows; static schedule, so that per-thread partial
// sums (reduced in thread order) are deterministic for a given thread count.
template <typename Fn>
void for_blocks(Index n, Fn&& fn) {
  const Index nb = (n + kRows - 1) / kRows;
#pragma omp parallel if (nb > 1)  // one block: no team (barriers are costly on a busy machine)
  {
    const int t = omp_get_thread_num();
#pragma omp for schedule(static)
    for (Index b = 0; b < nb; ++b) fn(t, b * kRows, std::min(kRows, n - b * kRows));
  }
}

// Column sums of a row-major block by adding rows (Eigen's colwise().sum() walks columns with a
// stride here, about 20x slower).
template <typename Block>
Eigen::RowVectorXf colsum(const Block& a) {
  Eigen::RowVectorXf s = Eigen::RowVectorXf::Zero(a.cols());
  for (Index i = 0; i < a.rows(); ++i) s += a.row(i);
  return s;
}

inline void add_bias(Eigen::Ref<Mat> y, const float* b) {
  const ConstVecMap bias(b, y.cols());
  y.rowwise() += bias.transpose();
}

// Row-wise LayerNorm with the model's expressions; xhat and rstd kept for backward.
void ln_rows(const Mat& z, const float* gamma, const float* beta, Mat& y, Mat& xhat, Vec& rstd) {
  const Index m = z.rows(), d = z.cols();
  y.resize(m, d);
  xhat.resize(m, d);
  rstd.resize(m);
  const ConstVecMap g(gamma, d), bt(beta, d);
  for (Index i = 0; i < m; ++i) {
    const float mean = z.row(i).mean();
    const float var = (z.row(i).array() - mean).square().mean();
    const float r = 1.0f / std::sqrt(var + kLnEps);
    rstd[i] = r;
    xhat.row(i) = (z.row(i).array() - mean) * r;
    y.row(i) = xhat.row(i).array() * g.transpose().array() + bt.transpose().array();
  }
}
// dz from dy; dgamma, dbeta accumulated.
void ln_rows_bwd(const Mat& xhat, const Vec& rstd, const float* gamma, const Mat& dy, Mat& dz, Vec& dgamma,
                 Vec& dbeta) {
  const Index m = xhat.rows(), d = xhat.cols();
  dz.resize(m, d);
  const ConstVecMap g(gamma, d);
  Eigen::ArrayXf gy(d);
  for (Index i = 0; i < m; ++i) {
    gy = dy.row(i).transpose().array() * g.array();
    const float mean_g = gy.mean();
    const float mean_gx = (gy * xhat.row(i).transpose().array()).mean();
    dz.row(i) = (rstd[i] * (gy - mean_g - xhat.row(i).transpose().array() * mean_gx)).transpose();
    dgamma.array() += dy.row(i).transpose().array() * xhat.row(i).transpose().array();
    dbeta += dy.row(i).transpose();
  }
}

// Per-row, per-head unit normalisation (qk_norm = node), as the model's normalise().
void normalise_rows(Mat& x, int heads, Vec& norms) {
  const Index m = x.rows(), d = x.cols() / heads;
  norms.resize(m * heads);
  for (Index i = 0; i < m; ++i)
    for (int h = 0; h < heads; ++h) {
      const float nr = std::max(x.row(i).segment(h * d, d).norm(), 1e-12f);
      norms[i * heads + h] = nr;
      x.row(i).segment(h * d, d) /= nr;
    }
}

// g[r] = sum over row (lo + r) of csr: value * src[col] (all columns of src). Random row reads
// dominate on large graphs, so the rows a few edges ahead are prefetched.
void gather_rows(const Csr& a, const Mat& src, Index lo, Index m, Mat& g) {
  const Index w = src.cols();
  g.setZero(m, w);
  const float* base = src.data();
  const Index end = a.indptr[lo + m];
  constexpr Index kAhead = 6;
  for (Index r = 0; r < m; ++r) {
    float* out = g.data() + r * w;
    for (Index e = a.indptr[lo + r]; e < a.indptr[lo + r + 1]; ++e) {
      if (e + kAhead < end) {
        const float* next = base + static_cast<Index>(a.indices[e + kAhead]) * w;
        for (Index c = 0; c < w; c += 16) __builtin_prefetch(next + c, 0, 0);
      }
      const float v = a.values[e];
      const float* in = base + static_cast<Index>(a.indices[e]) * w;
#pragma omp simd
      for (Index c = 0; c < w; ++c) out[c] += v * in[c];
    }
  }
}

// Everything one layer needs besides its input: parameters and the global sums of pass 1.
struct LayerCtx {
  const ModelConfig* cfg = nullptr;
  Index n = 0, d = 0;
  int heads = 1, vheads = 1;
  bool attention = false, global_norm = true;
  float ca = 1, cg = 1;
  ConstMatMap wq{nullptr, 0, 0}, wk{nullptr, 0, 0}, wv{nullptr, 0, 0};
  const float *bq = nullptr, *bk = nullptr, *bv = nullptr, *ln_g = nullptr, *ln_b = nullptr;
  // pass-1 results
  float qnorm = 1, knorm = 1;
  Mat kv;  // [H*D, D]: rows h*D.. of head h hold sum_l kn_l v_l^T
  Mat ks;  // [H, D]
  Mat vs;  // [Hv, D]
};

LayerCtx make_ctx(const DIFFormer& model, const Slots& s, int l, Index n) {
  const ModelConfig& c = model.config();
  const LayerSlots& ls = s.layers[l];
  LayerCtx x;
  x.cfg = &c;
  x.n = n;
  x.d = c.hidden;
  x.heads = c.heads;
  x.vheads = c.use_weight ? c.heads : 1;
  x.attention = c.kernel != Kernel::none;
  x.global_norm = c.qk_norm == QkNorm::global;
  const bool mix = c.graph_weight > 0 && c.use_graph;
  x.ca = mix ? 1.0f - c.graph_weight : 1.0f;
  x.cg = mix ? c.graph_weight : 1.0f;
  const ParamStore& p = model.params;
  new (&x.wq) ConstMatMap(p.ptr(ls.wq), p.slots[ls.wq].rows, p.slots[ls.wq].cols);
  new (&x.wk) ConstMatMap(p.ptr(ls.wk), p.slots[ls.wk].rows, p.slots[ls.wk].cols);
  if (c.use_weight) new (&x.wv) ConstMatMap(p.ptr(ls.wv), p.slots[ls.wv].rows, p.slots[ls.wv].cols);
  x.bq = p.ptr(ls.bq);
  x.bk = p.ptr(ls.bk);
  x.bv = c.use_weight ? p.ptr(ls.bv) : nullptr;
  x.ln_g = p.ptr(ls.ln_g);
  x.ln_b = p.ptr(ls.ln_b);
  return x;
}

struct Scratch {
  Mat q, k, v, a, o, z, y, xhat, g, dy, dz, dq, dk, dv, dnum, dqn, dkn, t;
  Vec rstd, qn_norm, kn_norm, den;
  Vec dgamma, dbeta;
};

// Pass 1: the global sums of the simple kernel (unless !stats: backward reuses the forward's),
// and V rows into v_out (when given, with use_weight).
void layer_stats(LayerCtx& c, const Mat& h, Mat* v_out, bool stats = true) {
  const Index n = c.n, d = c.d, hd = c.heads * d;
  const int threads = omp_get_max_threads();
  std::vector<Scratch> sc(threads);
  std::vector<MatD> kv(threads), ks(threads), vs(threads), gram(threads);
  std::vector<VecD> hsum(threads);
  std::vector<double> ksq(threads, 0.0);
  const bool need_v = c.cfg->use_weight && ((c.attention && stats) || v_out);
  for_blocks(n, [&](int t, Index lo, Index m) {
    Scratch& s = sc[t];
    const auto hb = h.middleRows(lo, m);
    if (c.cfg->use_weight && need_v) {
      s.v.noalias() = hb * c.wv.transpose();
      add_bias(s.v, c.bv);
      if (v_out) v_out->middleRows(lo, m) = s.v;
    }
    if (!c.attention || !stats) return;
    if (kv[t].size() == 0) {
      kv[t] = MatD::Zero(hd, d);
      ks[t] = MatD::Zero(c.heads, d);
      vs[t] = MatD::Zero(c.vheads, d);
      if (c.global_norm) {
        gram[t] = MatD::Zero(d, d);
        hsum[t] = VecD::Zero(d);
      }
    }
    const Eigen::Ref<const Mat> vb = c.cfg->use_weight ? Eigen::Ref<const Mat>(s.v) : Eigen::Ref<const Mat>(hb);
    s.k.noalias() = hb * c.wk.transpose();
    add_bias(s.k, c.bk);
    if (c.global_norm) {
      double sq = 0;  // float within a row (vectorised), double across rows
      for (Index i = 0; i < m; ++i) sq += static_cast<double>(s.k.row(i).squaredNorm());
      ksq[t] += sq;
      s.t.noalias() = hb.transpose() * hb;
      gram[t] += s.t.cast<double>();
      hsum[t] += colsum(hb).transpose().cast<double>();
    } else {
      normalise_rows(s.k, c.heads, s.kn_norm);
    }
    for (int hh = 0; hh < c.heads; ++hh) {
      const int hv = c.vheads == 1 ? 0 : hh;
      s.t.noalias() = s.k.middleCols(hh * d, d).transpose() * vb.middleCols(hv * d, d);
      kv[t].middleRows(hh * d, d) += s.t.cast<double>();
      ks[t].row(hh) += colsum(s.k.middleCols(hh * d, d)).cast<double>();
    }
    for (int hv = 0; hv < c.vheads; ++hv) vs[t].row(hv) += colsum(vb.middleCols(hv * d, d)).cast<double>();
  });
  if (!c.attention || !stats) return;
  MatD kv_sum = MatD::Zero(hd, d), ks_sum = MatD::Zero(c.heads, d), vs_sum = MatD::Zero(c.vheads, d);
  MatD g_sum = MatD::Zero(d, d);
  VecD h_sum = VecD::Zero(d);
  double k_sq = 0;
  for (int t = 0; t < threads; ++t) {
    if (kv[t].size() == 0) continue;
    kv_sum += kv[t];
    ks_sum += ks[t];
    vs_sum += vs[t];
    if (c.global_norm) {
      g_sum += gram[t];
      h_sum += hsum[t];
      k_sq += ksq[t];
    }
  }
  if (c.global_norm) {
    // ||Q||_F^2 = sum_i ||W h_i + b||^2 = tr(W G W^T) + 2 b.(W s) + n ||b||^2, G = h^T h, s = sum h
    const MatD w = c.wq.cast<double>();
    const VecD b = ConstVecMap(c.bq, hd).cast<double>();
    const double q_sq = (w * g_sum).cwiseProduct(w).sum() + 2.0 * b.dot(w * h_sum) + static_cast<double>(n) * b.squaredNorm();
    c.qnorm = static_cast<float>(std::sqrt(std::max(q_sq, 0.0)));
    c.knorm = static_cast<float>(std::sqrt(k_sq));
    const double inv = 1.0 / static_cast<double>(c.knorm);
    kv_sum *= inv;
    ks_sum *= inv;
  }
  c.kv = kv_sum.cast<float>();
  c.ks = ks_sum.cast<float>();
  c.vs = vs_sum.cast<float>();
}

// Pass-2 forward of rows [lo, lo+m): fills s.q (normalised q), s.a (attention per head), s.den
// ([m * H], row-major), s.z (pre-norm), s.y (post-norm, pre-dropout); with LN also s.xhat, s.rstd.
// vsrc: the value rows the graph term gathers (V, or h without use_weight).
void layer_rows(const LayerCtx& c, const Mat& h, const Mat* vsrc, const GraphOp* graph, Index lo, Index m,
                Scratch& s) {
  const Index d = c.d, hd = c.heads * d;
  const auto hb = h.middleRows(lo, m);
  s.o.setZero(m, d);
  if (c.attention) {
    s.q.noalias() = hb * c.wq.transpose();
    add_bias(s.q, c.bq);
    if (c.global_norm)
      s.q *= 1.0f / c.qnorm;
    else
      normalise_rows(s.q, c.heads, s.qn_norm);
    s.a.resize(m, hd);
    s.den.resize(m * c.heads);
    for (int hh = 0; hh < c.heads; ++hh) {
      const int hv = c.vheads == 1 ? 0 : hh;
      const auto qh = s.q.middleCols(hh * d, d);
      auto ah = s.a.middleCols(hh * d, d);
      ah.noalias() = qh * c.kv.middleRows(hh * d, d);
      for (Index i = 0; i < m; ++i) {
        const float den = qh.row(i).dot(c.ks.row(hh)) + static_cast<float>(c.n);
        s.den[i * c.heads + hh] = den;
        ah.row(i) = (ah.row(i) + c.vs.row(hv)) / den;
      }
      s.o += (c.ca / c.heads) * ah;
    }
  }
  if (c.cfg->use_graph) {
    gather_rows(graph->adj, *vsrc, lo, m, s.g);
    for (int hv = 0; hv < c.vheads; ++hv) s.o += (c.cg / c.vheads) * s.g.middleCols(hv * d, d);
  }
  if (c.cfg->use_residual)
    s.z = c.cfg->alpha * s.o + (1.0f - c.cfg->alpha) * hb;
  else
    s.z = s.o;
  if (c.cfg->use_ln)
    ln_rows(s.z, c.ln_g, c.ln_b, s.y, s.xhat, s.rstd);
  else
    s.y = s.z;
}

// One layer forward: h_out = layer(h_in). h_out may alias h_in unless the graph term reads h
// (use_graph without use_weight). v: [N, Hv*D] scratch for the values (with use_weight and graph).
void layer_forward(LayerCtx& c, const Mat& h_in, const GraphOp* graph, const Dropout& drop, Mat& v, Mat& h_out) {
  const bool graph_v = c.cfg->use_graph && c.cfg->use_weight;
  if (graph_v) v.resize(c.n, c.vheads * c.d);
  layer_stats(c, h_in, graph_v ? &v : nullptr);
  const Mat* vsrc = c.cfg->use_weight ? &v : &h_in;
  if (&h_out != &h_in) h_out.resize(c.n, c.d);
  const int threads = omp_get_max_threads();
  std::vector<Scratch> sc(threads);
  for_blocks(c.n, [&](int t, Index lo, Index m) {
    Scratch& s = sc[t];
    layer_rows(c, h_in, vsrc, graph, lo, m, s);
    drop.apply(s.y, lo);
    h_out.middleRows(lo, m) = s.y;  // rows lo..lo+m of h_in are no longer needed by anyone
  });
}

// Input block rows: y = LN(x W^T + b) (pre-ReLU) with xhat/rstd; s.z holds x W^T + b.
void input_rows(const DIFFormer& model, const Slots& sl, const Mat& x, Index lo, Index m, Scratch& s) {
  const ModelConfig& cfg = model.config();
  const ParamStore& p = model.params;
  const ConstMatMap w(p.ptr(sl.fc_in_w), cfg.hidden, cfg.in_features);
  s.z.noalias() = x.middleRows(lo, m) * w.transpose();
  add_bias(s.z, p.ptr(sl.fc_in_b));
  if (cfg.use_ln)
    ln_rows(s.z, p.ptr(sl.ln_in_g), p.ptr(sl.ln_in_b), s.y, s.xhat, s.rstd);
  else
    s.y = s.z;
}

void input_forward(const DIFFormer& model, const Slots& sl, const Mat& x, const Dropout& drop, Mat& h0) {
  const Index n = x.rows();
  h0.resize(n, model.config().hidden);
  std::vector<Scratch> sc(omp_get_max_threads());
  for_blocks(n, [&](int t, Index lo, Index m) {
    Scratch& s = sc[t];
    input_rows(model, sl, x, lo, m, s);
    s.y = s.y.cwiseMax(0.0f);
    drop.apply(s.y, lo);
    h0.middleRows(lo, m) = s.y;
  });
}

void check_inputs(const DIFFormer& model, const Mat& x, const GraphOp* graph) {
  const ModelConfig& c = model.config();
  DFM_CHECK(lean_supported(c), "lean path: kernel ", kernel_name(c.kernel), " is not supported (simple or none)");
  DFM_CHECK(x.cols() == c.in_features, "model: input has ", x.cols(), " features, the model expects ", c.in_features);
  DFM_CHECK(!c.use_graph || graph, "model: use_graph is on but the input has no graph");
  DFM_CHECK(!c.use_graph || graph->nodes() == x.rows(), "model: graph has ", graph ? graph->nodes() : 0,
            " nodes but the input has ", x.rows(), " rows");
}

}  // namespace

bool lean_supported(const ModelConfig& c) { return c.kernel == Kernel::simple || c.kernel == Kernel::none; }

void lean_forward(const DIFFormer& model, const Mat& x, const GraphOp* graph, Mat& logits) {
  check_inputs(model, x, graph);
  const EigenSerialScope serial;
  const ModelConfig& cfg = model.config();
  const Slots sl = find_slots(model.params, cfg);
  const Index n = x.rows();
  Mat h, h2, v;
  input_forward(model, sl, x, Dropout(), h);
  const bool two_buffers = cfg.use_graph && !cfg.use_weight;
  for (int l = 0; l < cfg.layers; ++l) {
    LayerCtx c = make_ctx(model, sl, l, n);
    if (two_buffers) {
      layer_forward(c, h, graph, Dropout(), v, h2);
      std::swap(h, h2);
    } else {
      layer_forward(c, h, graph, Dropout(), v, h);
    }
  }
  v.resize(0, 0);
  h2.resize(0, 0);
  const ParamStore& p = model.params;
  cpu::linear_fwd(h, ConstMatMap(p.ptr(sl.fc_out_w), cfg.out_features, cfg.hidden), p.ptr(sl.fc_out_b), logits);
}

float lean_forward_backward(DIFFormer& model, const Mat& x, const GraphOp* graph, bool training,
                            std::uint64_t dropout_seed, const LossFn& loss, LeanWorkspace& ws) {
  check_inputs(model, x, graph);
  const EigenSerialScope serial;
  const ModelConfig& cfg = model.config();
  const Slots sl = find_slots(model.params, cfg);
  ParamStore& P = model.params;
  const Index n = x.rows(), d = cfg.hidden, hd = cfg.heads * d;
  const int L = cfg.layers;
  const int threads = omp_get_max_threads();
  auto drop_at = [&](int salt) { return Dropout(training, cfg.dropout, mix_seed(dropout_seed, salt)); };

  // ---- forward, keeping h_0..h_L ----
  ws.hidden.resize(L + 1);
  input_forward(model, sl, x, drop_at(0), ws.hidden[0]);
  std::vector<LayerCtx> ctxs;  // per layer: parameters and the global sums, reused by backward
  ctxs.reserve(L);
  for (int l = 0; l < L; ++l) {
    ctxs.push_back(make_ctx(model, sl, l, n));
    layer_forward(ctxs.back(), ws.hidden[l], graph, drop_at(l + 1), ws.v, ws.hidden[l + 1]);
  }
  const ConstMatMap w_out(P.ptr(sl.fc_out_w), cfg.out_features, d);
  cpu::linear_fwd(ws.hidden[L], w_out, P.ptr(sl.fc_out_b), ws.logits);
  const float value = loss(ws.logits, ws.dlogits);
  DFM_CHECK(std::isfinite(value), "training diverged: loss is ", value, " (try a smaller --lr)");
  cpu::linear_bwd(ws.hidden[L], w_out, ws.dlogits, &ws.dh, P.grad_mat(sl.fc_out_w), P.grad_ptr(sl.fc_out_b));

  // ---- layers, last to first ----
  for (int l = L - 1; l >= 0; --l) {
    LayerCtx& c = ctxs[l];
    const LayerSlots& ls = sl.layers[l];
    const Mat& h_in = ws.hidden[l];
    const Dropout drop = drop_at(l + 1);
    const bool graph_v = cfg.use_graph && cfg.use_weight;
    if (graph_v) ws.v.resize(n, c.vheads * d);
    if (graph_v) layer_stats(c, h_in, &ws.v, false);  // V rows for the graph term
    const Mat* vsrc = cfg.use_weight ? &ws.v : &h_in;
    ws.dh_prev.resize(n, d);
    ws.dout.resize(n, d);
    if (c.attention) {
      ws.den.resize(n, c.heads);
      ws.dden.resize(n, c.heads);
    }
    // Pass 2: recompute the output rows, back through dropout, LayerNorm and the residual.
    std::vector<Scratch> sc(threads);
    std::vector<MatD> dkv(threads), dks(threads), dvs(threads);
    for_blocks(n, [&](int t, Index lo, Index m) {
      Scratch& s = sc[t];
      if (s.dgamma.size() == 0) {
        s.dgamma = Vec::Zero(d);
        s.dbeta = Vec::Zero(d);
      }
      layer_rows(c, h_in, vsrc, graph, lo, m, s);
      s.dy = ws.dh.middleRows(lo, m);
      drop.apply(s.dy, lo);
      if (cfg.use_ln)
        ln_rows_bwd(s.xhat, s.rstd, c.ln_g, s.dy, s.dz, s.dgamma, s.dbeta);
      else
        s.dz = s.dy;
      if (cfg.use_residual) {
        ws.dh_prev.middleRows(lo, m) = (1.0f - cfg.alpha) * s.dz;
        ws.dout.middleRows(lo, m) = cfg.alpha * s.dz;
      } else {
        ws.dh_prev.middleRows(lo, m).setZero();
        ws.dout.middleRows(lo, m) = s.dz;
      }
      if (!c.attention) return;
      if (dkv[t].size() == 0) {
        dkv[t] = MatD::Zero(hd, d);
        dks[t] = MatD::Zero(c.heads, d);
        dvs[t] = MatD::Zero(c.heads, d);
      }
      const auto d_o = ws.dout.middleRows(lo, m);
      s.dnum.resize(m, d);
      Vec dden(m);
      for (int hh = 0; hh < c.heads; ++hh) {
        const float coef = c.ca / c.heads;
        for (Index i = 0; i < m; ++i) {
          const float den = s.den[i * c.heads + hh];
          s.dnum.row(i) = (coef * d_o.row(i)) / den;
          dden[i] = -(coef * d_o.row(i)).dot(s.a.row(i).segment(hh * d, d)) / den;
          ws.den(lo + i, hh) = den;
          ws.dden(lo + i, hh) = dden[i];
        }
        const auto qh = s.q.middleCols(hh * d, d);
        s.t.noalias() = qh.transpose() * s.dnum;
        dkv[t].middleRows(hh * d, d) += s.t.cast<double>();
        dks[t].row(hh) += (dden.transpose() * qh).cast<double>();
        dvs[t].row(hh) += colsum(s.dnum).cast<double>();
      }
    });
    if (cfg.use_ln) {
      VecMap g(P.grad_ptr(ls.ln_g), d), b(P.grad_ptr(ls.ln_b), d);
      for (auto& s : sc)
        if (s.dgamma.size()) {
          g += s.dgamma;
          b += s.dbeta;
        }
    }
    Mat dKV, dKS, dVS;
    float dot = 0;
    if (c.attention) {
      MatD a = MatD::Zero(hd, d), b = MatD::Zero(c.heads, d), e = MatD::Zero(c.heads, d);
      for (int t = 0; t < threads; ++t)
        if (dkv[t].size()) {
          a += dkv[t];
          b += dks[t];
          e += dvs[t];
        }
      // sum_i dqn_i . qn_i = sum_j dkn_j . kn_j = <KV, dKV> + <ks, dks> (global normalisation)
      dot = static_cast<float>((a.cwiseProduct(c.kv.cast<double>())).sum() + (b.cwiseProduct(c.ks.cast<double>())).sum());
      dKV = a.cast<float>();
      dKS = b.cast<float>();
      dVS = e.cast<float>();
    }
    // Pass 3: gradients of q, k, v (attention and graph), parameter gradients, dh_in.
    const int vh = c.vheads;
    std::vector<Mat> gwq(threads), gwk(threads), gwv(threads);
    std::vector<Vec> gbq(threads), gbk(threads), gbv(threads);
    const bool any_v = c.attention || cfg.use_graph;
    for_blocks(n, [&](int t, Index lo, Index m) {
      Scratch& s = sc[t];
      const auto hb = h_in.middleRows(lo, m);
      const auto d_o = ws.dout.middleRows(lo, m);
      if (!any_v) return;
      s.dv.setZero(m, vh * d);
      if (cfg.use_graph) {
        gather_rows(graph->adj_t, ws.dout, lo, m, s.g);
        for (int hv = 0; hv < vh; ++hv) s.dv.middleCols(hv * d, d) += (c.cg / vh) * s.g;
      }
      if (c.attention) {
        if (gwq[t].size() == 0) {
          gwq[t] = Mat::Zero(hd, d);
          gwk[t] = Mat::Zero(hd, d);
          gbq[t] = Vec::Zero(hd);
          gbk[t] = Vec::Zero(hd);
        }
        s.q.noalias() = hb * c.wq.transpose();
        add_bias(s.q, c.bq);
        s.k.noalias() = hb * c.wk.transpose();
        add_bias(s.k, c.bk);
        if (c.global_norm) {
          s.q *= 1.0f / c.qnorm;
          s.k *= 1.0f / c.knorm;
        } else {
          normalise_rows(s.q, c.heads, s.qn_norm);
          normalise_rows(s.k, c.heads, s.kn_norm);
        }
        if (cfg.use_weight && !graph_v) {
          s.v.noalias() = hb * c.wv.transpose();
          add_bias(s.v, c.bv);
        }
        const Eigen::Ref<const Mat> vb = !cfg.use_weight ? Eigen::Ref<const Mat>(hb)
                                         : graph_v       ? Eigen::Ref<const Mat>(ws.v.middleRows(lo, m))
                                                         : Eigen::Ref<const Mat>(s.v);
        s.dqn.resize(m, hd);
        s.dkn.resize(m, hd);
        s.dnum.resize(m, d);
        const float coef = c.ca / c.heads;
        for (int hh = 0; hh < c.heads; ++hh) {
          const int hv = vh == 1 ? 0 : hh;
          for (Index i = 0; i < m; ++i) s.dnum.row(i) = (coef * d_o.row(i)) / ws.den(lo + i, hh);
          auto dq = s.dqn.middleCols(hh * d, d);
          dq.noalias() = s.dnum * c.kv.middleRows(hh * d, d).transpose();
          for (Index i = 0; i < m; ++i) dq.row(i) += ws.dden(lo + i, hh) * c.ks.row(hh);
          auto dk = s.dkn.middleCols(hh * d, d);
          dk.noalias() = vb.middleCols(hv * d, d) * dKV.middleRows(hh * d, d).transpose();
          dk.rowwise() += dKS.row(hh);
          auto dvh = s.dv.middleCols(hv * d, d);
          dvh.noalias() += s.k.middleCols(hh * d, d) * dKV.middleRows(hh * d, d);
          dvh.rowwise() += dVS.row(hh);
        }
        // back through the normalisation of q and k
        if (c.global_norm) {
          s.dq = (s.dqn - s.q * dot) * (1.0f / c.qnorm);
          s.dk = (s.dkn - s.k * dot) * (1.0f / c.knorm);
        } else {
          s.dq.resize(m, hd);
          s.dk.resize(m, hd);
          for (Index i = 0; i < m; ++i)
            for (int hh = 0; hh < c.heads; ++hh) {
              const float nq = s.qn_norm[i * c.heads + hh], nk = s.kn_norm[i * c.heads + hh];
              const auto qs = s.q.row(i).segment(hh * d, d), ks = s.k.row(i).segment(hh * d, d);
              const float dq_dot = nq <= 1e-12f ? 0.0f : s.dqn.row(i).segment(hh * d, d).dot(qs);
              const float dk_dot = nk <= 1e-12f ? 0.0f : s.dkn.row(i).segment(hh * d, d).dot(ks);
              s.dq.row(i).segment(hh * d, d) = (s.dqn.row(i).segment(hh * d, d) - qs * dq_dot) / nq;
              s.dk.row(i).segment(hh * d, d) = (s.dkn.row(i).segment(hh * d, d) - ks * dk_dot) / nk;
            }
        }
        gwq[t].noalias() += s.dq.transpose() * hb;
        gbq[t] += colsum(s.dq).transpose();
        gwk[t].noalias() += s.dk.transpose() * hb;
        gbk[t] += colsum(s.dk).transpose();
        auto dhb = ws.dh_prev.middleRows(lo, m);
        dhb.noalias() += s.dq * c.wq;
        dhb.noalias() += s.dk * c.wk;
      }
      auto dhb = ws.dh_prev.middleRows(lo, m);
      if (cfg.use_weight) {
        if (gwv[t].size() == 0) {
          gwv[t] = Mat::Zero(vh * d, d);
          gbv[t] = Vec::Zero(vh * d);
        }
        gwv[t].noalias() += s.dv.transpose() * hb;
        gbv[t] += colsum(s.dv).transpose();
        dhb.noalias() += s.dv * c.wv;
      } else {
        dhb += s.dv;
      }
    });
    for (int t = 0; t < threads; ++t) {
      if (gwq[t].size()) {
        P.grad_mat(ls.wq) += gwq[t];
        VecMap(P.grad_ptr(ls.bq), hd) += gbq[t];
        P.grad_mat(ls.wk) += gwk[t];
        VecMap(P.grad_ptr(ls.bk), hd) += gbk[t];
      }
      if (gwv[t].size()) {
        P.grad_mat(ls.wv) += gwv[t];
        VecMap(P.grad_ptr(ls.bv), vh * d) += gbv[t];
      }
    }
    std::swap(ws.dh, ws.dh_prev);
  }
  ws.v.resize(0, 0);
  ws.dout.resize(0, 0);
  ws.dh_prev.resize(0, 0);

  // ---- input block ----
  {
    const Dropout drop = drop_at(0);
    std::vector<Scratch> sc(threads);
    std::vector<Mat> gw(threads);
    std::vector<Vec> gb(threads);
    for_blocks(n, [&](int t, Index lo, Index m) {
      Scratch& s = sc[t];
      if (gw[t].size() == 0) {
        gw[t] = Mat::Zero(d, cfg.in_features);
        gb[t] = Vec::Zero(d);
        s.dgamma = Vec::Zero(d);
        s.dbeta = Vec::Zero(d);
      }
      input_rows(model, sl, x, lo, m, s);
      s.dy = ws.dh.middleRows(lo, m);
      drop.apply(s.dy, lo);
      s.dy = (s.y.array() > 0.0f).select(s.dy, 0.0f);
      if (cfg.use_ln)
        ln_rows_bwd(s.xhat, s.rstd, P.ptr(sl.ln_in_g), s.dy, s.dz, s.dgamma, s.dbeta);
      else
        s.dz = s.dy;
      gw[t].noalias() += s.dz.transpose() * x.middleRows(lo, m);
      gb[t] += colsum(s.dz).transpose();
    });
    for (int t = 0; t < threads; ++t) {
      if (gw[t].size() == 0) continue;
      P.grad_mat(sl.fc_in_w) += gw[t];
      VecMap(P.grad_ptr(sl.fc_in_b), d) += gb[t];
      if (cfg.use_ln) {
        VecMap(P.grad_ptr(sl.ln_in_g), d) += sc[t].dgamma;
        VecMap(P.grad_ptr(sl.ln_in_b), d) += sc[t].dbeta;
      }
    }
  }
  return value;
}

// ---- memory accounting ----------------------------------------------------------------------------
namespace {
std::int64_t g_lifetime_peak = 0;  // the largest phase peak seen before a reset
}

bool reset_peak_rss() {
  g_lifetime_peak = std::max({g_lifetime_peak, phase_peak_rss_bytes(), peak_rss_bytes()});
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  f.flush();
  return f.good();
}

std::int64_t phase_peak_rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream is(line.substr(6));
      std::int64_t kb = 0;
      is >> kb;
      return kb * 1024;
    }
  return peak_rss_bytes();
}

std::int64_t lifetime_peak_rss_bytes() {
  return std::max({g_lifetime_peak, phase_peak_rss_bytes(), peak_rss_bytes()});
}

std::string format_bytes(std::int64_t b) {
  char buf[64];
  const double v = static_cast<double>(b);
  if (v >= 1024.0 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.2f GiB", v / (1024.0 * 1024 * 1024));
  else
    std::snprintf(buf, sizeof buf, "%.1f MiB", v / (1024.0 * 1024));
  return buf;
}

MemoryEstimate estimate_memory(const ModelConfig& cfg, Index nodes, Index edges, Index features, Index outputs,
                               Index batch, bool lean, double expected_batch_edges) {
  const double N = static_cast<double>(nodes), E = static_cast<double>(edges), F = static_cast<double>(features);
  const double D = static_cast<double>(cfg.hidden), C = static_cast<double>(outputs), L = cfg.layers;
  const double H = cfg.heads, Hv = cfg.use_weight ? cfg.heads : 1;
  const bool full = batch <= 0 || batch >= nodes;
  const double B = full ? N : static_cast<double>(batch);
  double eb = expected_batch_edges;
  if (eb < 0) eb = full ? E : E * (B / N) * (B / N) + B;
  const bool use_lean = lean && lean_supported(cfg);
  const double threads = omp_get_max_threads();
  MemoryEstimate m;
  // features + targets (<= 8 bytes a node or 4 a task) + the graph (CSR by target with the
  // normalised values: the evaluation operator itself)
  double data = N * F * 4 + std::max(8.0, 4 * C) * N + 8 * N + 8 * E;
  m.data = static_cast<std::int64_t>(data);
  double step;
  if (use_lean)
    step = (L + 4 + Hv) * B * D * 4 + 8 * B * H + threads * 20.0 * kRows * H * D * 4;
  else
    step = ((L + 2) + L * (Hv + 3 * H + 1) + 6 * H) * B * D * 4;
  step += 2 * B * C * 4;                                        // logits, dlogits
  if (!full) step += B * F * 4 + 16 * B + 16 * eb;              // chunk features, ids, edge list
  if (cfg.use_graph) step += full ? 16 * N + 16 * E : 16 * B + 16 * eb;  // operator (adj + adj_t)
  m.train_step = static_cast<std::int64_t>(step);
  double ev = use_lean ? (1 + Hv + ((cfg.use_graph && !cfg.use_weight) ? 1 : 0)) * N * D * 4
                       : (8 + 3 * H) * N * D * 4;
  ev += N * C * 4 + threads * 20.0 * kRows * H * D * 4;
  m.eval = static_cast<std::int64_t>(ev);
  return m;
}

// ---- evaluation ------------------------------------------------------------------------------------
Metric default_metric(const NodeTargets& t) { return t.multilabel ? Metric::rocauc : Metric::accuracy; }

double score_metric(Metric m, const Mat& logits, const NodeTargets& t, const std::vector<std::int64_t>& idx) {
  if (m == Metric::accuracy)
    return t.multilabel ? accuracy_multilabel(logits, t.ym, idx) : accuracy_classes(logits, t.y, idx);
  int used = 0;
  const double a = t.multilabel ? rocauc_multilabel(logits, t.ym, idx, &used) : rocauc_classes(logits, t.y, idx, &used);
  DFM_CHECK(used > 0, "rocauc: no ", t.multilabel ? "task" : "class", " has both positive and negative labels among the ",
            idx.size(), " evaluated nodes (the OGB evaluator refuses this too)");
  return a;
}

void evaluate_large(DIFFormer& model, const LargeDataset& d, const GraphOp* graph, const Split& split, Metric metric,
                    bool lean, Mat& logits, double& train, double& val, double& test) {
  const ModelConfig& cfg = model.config();
  if (lean && lean_supported(cfg)) {
    lean_forward(model, d.x, cfg.use_graph ? graph : nullptr, logits);
  } else {
    ModelInput in;
    in.dense = &d.x;
    if (cfg.use_graph) in.graph = graph;
    model.forward(in, false, 0, nullptr, logits);
  }
  train = score_metric(metric, logits, d.targets, split.train);
  val = score_metric(metric, logits, d.targets, split.val);
  test = score_metric(metric, logits, d.targets, split.test);
}

// ---- driver ------------------------------------------------------------------------------------------
namespace {

// The GPU side of a large run: one cuda::Model for every chunk (set_input resizes its buffers),
// the whole graph kept resident between full-graph steps and evaluations.
struct GpuLarge {
  cuda::Model gpu;
  AdamOptions adam;
  bool use_graph;
  bool full_loaded = false;  // the model holds the whole graph with its labels and training rows
  bool eval_on_gpu = true;   // false after a full-graph evaluation did not fit
  std::vector<std::int64_t> labels;

  static cuda::DeviceOptions options(const LargeTrainOptions& o) {
    cuda::DeviceOptions d;
    d.precision = o.precision;
    d.cuda_graph = o.batch_size == 0;  // chunks change the input every step: nothing to replay
    return d;
  }
  GpuLarge(const DIFFormer& model, const LargeTrainOptions& o)
      : gpu(model.config(), options(o)), adam(o.adam), use_graph(model.config().use_graph) {
    gpu.upload_params(model.params);
  }
  void load(const Mat& x, const GraphOp* graph, const NodeTargets& t, const std::vector<std::int64_t>& rows,
            bool full) {
    ModelInput in;
    in.dense = &x;
    if (use_graph) in.graph = graph;
    gpu.set_input(in);
    labels.resize(t.y.size());
    for (size_t i = 0; i < t.y.size(); ++i) labels[i] = t.y[i] < 0 ? 0 : t.y[i];  // unlabelled: never a loss row
    gpu.set_labels(labels);
    gpu.set_train_index(rows);
    full_loaded = full;
  }
  float step(const Mat& x, const GraphOp* graph, const NodeTargets& t, const std::vector<std::int64_t>& rows,
             std::uint64_t dropout_seed, bool full) {
    if (!(full && full_loaded)) load(x, graph, t, rows, full);
    const float loss = gpu.train_step(dropout_seed, adam, true);
    DFM_CHECK(std::isfinite(loss), "training diverged: loss is ", loss, " (try a smaller --lr)");
    return loss;
  }
  // Inference over the whole graph; false (and a note) when it does not fit on the device.
  bool evaluate(const LargeDataset& d, MinibatchWorkspace& ws, const std::vector<std::int64_t>& train_rows,
                Mat& logits) {
    if (!eval_on_gpu) return false;
    try {
      if (!full_loaded) {
        if (use_graph && !ws.full_graph_ready) {
          ws.full_graph = full_graph_op(d.graph);
          ws.full_graph_ready = true;
        }
        load(d.x, use_graph ? &ws.full_graph : nullptr, d.targets, train_rows, true);
      }
      gpu.forward(false, 0);
      gpu.download_logits(logits);
      return true;
    } catch (const Error& e) {
      std::fprintf(stderr, "note: full-graph evaluation does not fit on the GPU (%s); evaluating on the CPU\n",
                   e.what());
      eval_on_gpu = false;
      full_loaded = false;
      return false;
    }
  }
};

}  // namespace

LargeRunResult train_large_run(const LargeDataset& d, const ModelConfig& cfg, const Split& split,
                               const LargeTrainOptions& opt, std::uint64_t seed,
                               const std::function<void(const LargeEpochReport&)>& progress) {
  DFM_CHECK(opt.epochs >= 0, "--epochs must be >= 0 (got ", opt.epochs, ")");
  DFM_CHECK(opt.eval_every >= 0, "--eval-every must be >= 0 (got ", opt.eval_every, ")");
  DFM_CHECK(cfg.in_features == d.features, "model expects ", cfg.in_features, " features, ", d.path, " has ", d.features);
  DFM_CHECK(cfg.out_features == d.targets.outputs(), "model has ", cfg.out_features, " outputs, ", d.path, " has ",
            d.targets.outputs());
  DFM_CHECK(opt.device == "cpu" || opt.device == "cuda", "--device: expected cpu or cuda, got '", opt.device, "'");
  DFM_CHECK(opt.device == "cpu" || !d.targets.multilabel, "--device cuda: multi-label targets (binary cross-entropy, "
            "ROC-AUC tasks such as ogbn-proteins) are not supported on the GPU yet; use --device cpu");
  validate_split(split, d.n, "split");
  for (auto i : split.train)
    DFM_CHECK(d.targets.labelled(i), "split: training node ", i, " has no label");
  DIFFormer model(cfg);
  std::mt19937_64 rng(seed);
  model.init(rng);
  Adam adam(opt.adam);
  std::vector<std::uint8_t> is_train(static_cast<size_t>(d.n), 0);
  for (auto i : split.train) is_train[i] = 1;
  MinibatchWorkspace ws;
  std::unique_ptr<GpuLarge> gpu;
  if (opt.device == "cuda") {
    cuda::require();
    gpu = std::make_unique<GpuLarge>(model, opt);
  }
  std::vector<std::int64_t> train_rows(split.train.begin(), split.train.end());
  std::sort(train_rows.begin(), train_rows.end());  // the full-graph step's rows, in node order
  auto step = [&](const Mat& x, const GraphOp* graph, const NodeTargets& t, const std::vector<std::int64_t>& rows,
                  std::uint64_t dropout_seed, bool full) {
    return gpu ? gpu->step(x, graph, t, rows, dropout_seed, full)
               : train_step(model, adam, x, graph, t, rows, dropout_seed, opt.lean, ws);
  };
  Mat logits;
  LargeRunResult r;
  r.seed = seed;
  r.val = -std::numeric_limits<double>::infinity();
  for (int epoch = 0; epoch < opt.epochs; ++epoch) {
    LargeEpochReport rep;
    rep.epoch = epoch;
    reset_peak_rss();
    const EpochStats st = run_minibatch_epoch(d, is_train, opt.batch_size, seed, epoch, cfg.use_graph, ws, step);
    if (gpu) gpu->gpu.synchronize();
    r.train_peak_rss = std::max(r.train_peak_rss, phase_peak_rss_bytes());
    rep.loss = st.loss;
    rep.steps = st.steps;
    rep.skipped = st.skipped;
    rep.train_seconds = st.seconds;
    r.steps += st.steps;
    r.skipped += st.skipped;
    r.last_loss = st.loss;
    r.epoch_seconds.push_back(st.seconds);
    if (opt.eval_every > 0 && epoch % opt.eval_every == 0) {
      reset_peak_rss();
      const auto t0 = std::chrono::steady_clock::now();
      if (gpu && gpu->evaluate(d, ws, train_rows, logits)) {
        rep.train = score_metric(opt.metric, logits, d.targets, split.train);
        rep.val = score_metric(opt.metric, logits, d.targets, split.val);
        rep.test = score_metric(opt.metric, logits, d.targets, split.test);
        ++r.gpu_evals;
      } else {
        if (gpu) gpu->gpu.download_params(model.params);
        // the graph's own operator (normalised at load); adj_t is not needed for inference
        const GraphOp* g = cfg.use_graph ? &d.graph.op : nullptr;
        // streaming inference whatever the training path: its memory is the N-sized bound
        evaluate_large(model, d, g, split, opt.metric, opt.lean_eval, logits, rep.train, rep.val, rep.test);
        ++r.cpu_evals;
      }
      logits.resize(0, 0);
      rep.eval_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      r.eval_peak_rss = std::max(r.eval_peak_rss, phase_peak_rss_bytes());
      r.eval_seconds.push_back(rep.eval_seconds);
      rep.evaluated = true;
      if (rep.val > r.val) {  // strictly better: the first epoch of best validation wins
        r.val = rep.val;
        r.test = rep.test;
        r.train = rep.train;
        r.best_epoch = epoch;
      }
    }
    if (progress) progress(rep);
  }
  if (gpu) r.peak_device_bytes = gpu->gpu.peak_device_bytes();
  if (r.best_epoch < 0) r.val = std::numeric_limits<double>::quiet_NaN(), r.test = r.val, r.train = r.val;
  return r;
}

// ---- presets -------------------------------------------------------------------------------------------
const std::vector<LargePreset>& large_presets() {
  static const std::vector<LargePreset> presets = [] {
    std::vector<LargePreset> v;
    LargePreset p;
    p.name = "proteins-s";
    p.data_file = "ogbn-proteins";  // the OGB directory (raw/, split/species/)
    p.published = "79.49 +- 0.44 ROC-AUC";
    p.description = "ogbn-proteins, DIFFormer-s: 3 layers, hidden 64, Wv, lr 1e-2, wd 0, dropout 0, batch 10000, "
                    "1000 epochs, eval every 9, ROC-AUC, the OGB species split, graph as stored + self-loops";
    p.hidden = 64;
    p.batch_size = 10000;
    p.epochs = 1000;
    p.metric = "rocauc";
    p.split = "file";
    p.undirected = false;
    v.push_back(p);
    p = LargePreset{};
    p.name = "pokec-s";
    p.data_file = "pokec.npz";
    p.published = "69.24 +- 0.76 accuracy";
    p.description = "Pokec, DIFFormer-s: 3 layers, hidden 128, Wv, lr 1e-2, wd 0, dropout 0, batch 100000, 500 epochs, "
                    "eval every 9, accuracy, random 50/25/25 split per run, undirected + self-loops";
    p.hidden = 128;
    p.batch_size = 100000;
    p.epochs = 500;
    p.metric = "accuracy";
    p.split = "ratio:0.5,0.25";
    p.undirected = true;
    v.push_back(p);
    return v;
  }();
  return presets;
}

std::vector<std::pair<std::string, std::string>> large_preset_flags(const LargePreset& p) {
  auto num = [](double v) {
    std::ostringstream os;
    os << v;
    return os.str();
  };
  std::vector<std::pair<std::string, std::string>> f = {
      {"--kernel", kernel_name(p.kernel)},
      {"--layers", std::to_string(p.layers)},
      {"--hidden", std::to_string(p.hidden)},
      {"--heads", std::to_string(p.heads)},
      {"--alpha", num(p.alpha)},
      {"--dropout", num(p.dropout)},
      {"--lr", num(p.lr)},
      {"--weight-decay", num(p.weight_decay)},
      {"--batch-size", std::to_string(p.batch_size)},
      {"--epochs", std::to_string(p.epochs)},
      {"--runs", std::to_string(p.runs)},
      {"--eval-every", std::to_string(p.eval_every)},
      {"--seed", std::to_string(p.seed)},
      {"--metric", p.metric},
      {"--split", p.split},
  };
  if (p.use_weight) f.emplace_back("--use-weight", "true");
  if (!p.use_graph) f.emplace_back("--no-graph", "true");
  if (!p.use_ln) f.emplace_back("--no-ln", "true");
  if (!p.use_residual) f.emplace_back("--no-residual", "true");
  if (p.undirected) f.emplace_back("--undirected", "true");
  if (!p.self_loops) f.emplace_back("--no-self-loops", "true");
  return f;
}

const LargePreset* find_large_preset(const std::string& name) {
  for (const auto& p : large_presets())
    if (p.name == name) return &p;
  return nullptr;
}

}  // namespace dfm
