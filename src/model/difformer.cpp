#include "model/difformer.hpp"

#include <omp.h>

#include <cmath>

#include "core/error.hpp"
#include "core/profile.hpp"

namespace dfm {

namespace {
constexpr float kLayerNormEps = 1e-5f;

Vec graph_row_sums(const Csr& adj) {
  Vec r(adj.rows);
  for (Index i = 0; i < adj.rows; ++i) {
    float acc = 0;
    for (Index e = adj.indptr[i]; e < adj.indptr[i + 1]; ++e) acc += adj.values[e];
    r[i] = acc;
  }
  return r;
}

std::uint64_t mix_seed(std::uint64_t seed, std::uint64_t salt) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (salt + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
}  // namespace

const char* kernel_name(Kernel k) {
  switch (k) {
    case Kernel::simple: return "simple";
    case Kernel::sigmoid: return "sigmoid";
    case Kernel::none: return "none";
  }
  return "?";
}

Kernel parse_kernel(const std::string& s) {
  if (s == "simple") return Kernel::simple;
  if (s == "sigmoid") return Kernel::sigmoid;
  if (s == "none") return Kernel::none;
  fail("--kernel: unknown kernel '", s, "', expected simple, sigmoid or none");
}

QkNorm parse_qk_norm(const std::string& s) {
  if (s == "global") return QkNorm::global;
  if (s == "node") return QkNorm::node;
  fail("--qk-norm: unknown value '", s, "', expected global or node");
}

void ModelConfig::validate() const {
  DFM_CHECK(in_features > 0, "model: input features must be positive (got ", in_features, ")");
  DFM_CHECK(hidden > 0, "--hidden must be positive (got ", hidden, ")");
  DFM_CHECK(out_features > 0, "model: output size must be positive (got ", out_features, ")");
  DFM_CHECK(layers >= 0, "--layers must be >= 0 (got ", layers, ")");
  DFM_CHECK(heads >= 1, "--heads must be >= 1 (got ", heads, ")");
  DFM_CHECK(dropout >= 0.0f && dropout < 1.0f, "--dropout must be in [0, 1) (got ", dropout, ")");
  DFM_CHECK(graph_weight <= 1.0f, "--graph-weight must be <= 1 (got ", graph_weight, ")");
  DFM_CHECK(std::isfinite(alpha), "--alpha must be finite");
}

DIFFormer::DIFFormer(const ModelConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  const Index d = cfg_.hidden, hd = cfg_.heads * d;
  // state_dict order of the official module: convs, fcs, bns
  for (int l = 0; l < cfg_.layers; ++l) {
    LayerSlots s;
    const std::string p = "convs." + std::to_string(l) + ".";
    s.wk = params.add(p + "Wk.weight", hd, d);
    s.bk = params.add(p + "Wk.bias", hd, 1);
    s.wq = params.add(p + "Wq.weight", hd, d);
    s.bq = params.add(p + "Wq.bias", hd, 1);
    if (cfg_.use_weight) {
      s.wv = params.add(p + "Wv.weight", hd, d);
      s.bv = params.add(p + "Wv.bias", hd, 1);
    }
    layer_slots_.push_back(s);
  }
  fc_in_w_ = params.add("fcs.0.weight", d, cfg_.in_features);
  fc_in_b_ = params.add("fcs.0.bias", d, 1);
  fc_out_w_ = params.add("fcs.1.weight", cfg_.out_features, d);
  fc_out_b_ = params.add("fcs.1.bias", cfg_.out_features, 1);
  ln_in_g_ = params.add("bns.0.weight", d, 1);
  ln_in_b_ = params.add("bns.0.bias", d, 1);
  for (int l = 0; l < cfg_.layers; ++l) {
    layer_slots_[l].ln_g = params.add("bns." + std::to_string(l + 1) + ".weight", d, 1);
    layer_slots_[l].ln_b = params.add("bns." + std::to_string(l + 1) + ".bias", d, 1);
  }
  params.allocate();
}

void DIFFormer::init(std::mt19937_64& rng) {
  auto uniform = [&](int w, int b, Index fan_in) {
    const float bound = 1.0f / std::sqrt(static_cast<float>(fan_in));
    std::uniform_real_distribution<float> dist(-bound, bound);
    for (int s : {w, b}) {
      float* p = params.ptr(s);
      for (Index i = 0; i < params.slots[s].size(); ++i) p[i] = dist(rng);
    }
  };
  auto layernorm = [&](int g, int b) {
    params.mat(g).setOnes();
    params.mat(b).setZero();
  };
  uniform(fc_in_w_, fc_in_b_, cfg_.in_features);
  layernorm(ln_in_g_, ln_in_b_);
  for (auto& s : layer_slots_) {
    uniform(s.wk, s.bk, cfg_.hidden);
    uniform(s.wq, s.bq, cfg_.hidden);
    if (cfg_.use_weight) uniform(s.wv, s.bv, cfg_.hidden);
    layernorm(s.ln_g, s.ln_b);
  }
  uniform(fc_out_w_, fc_out_b_, cfg_.hidden);
}

void DIFFormer::init_torch(TorchCpuGenerator& gen) {
  auto linear = [&](int w, int b) {
    const ParamSlot& slot = params.slots[w];
    gen.linear_init(params.ptr(w), params.ptr(b), slot.rows, slot.cols);
  };
  auto layernorm = [&](int g, int b) {
    params.mat(g).setOnes();
    params.mat(b).setZero();
  };
  linear(fc_in_w_, fc_in_b_);
  layernorm(ln_in_g_, ln_in_b_);
  for (auto& s : layer_slots_) {
    linear(s.wk, s.bk);
    linear(s.wq, s.bq);
    if (cfg_.use_weight) linear(s.wv, s.bv);
    layernorm(s.ln_g, s.ln_b);
  }
  linear(fc_out_w_, fc_out_b_);
}

bool DIFFormer::layer_forward(int l, const ModelInput& in, const Mat& h_in, bool training, std::uint64_t seed,
                              LayerState* ls, Mat& h_out, const cpu::RowSums* in_sums, cpu::RowSums* out_sums,
                              const std::vector<Index>* rows, bool masks_given) {
  DFM_ASSERT(!rows || (fused_layer() && !out_sums));
  DFM_ASSERT(!masks_given || (ls && !out_sums && ls->keep.size() == static_cast<size_t>(h_in.rows() * cfg_.hidden)));
  const LayerSlots& s = layer_slots_[l];
  const Index n = h_in.rows(), d = cfg_.hidden;
  const int heads = cfg_.heads, vheads = value_heads();
  const bool attention = cfg_.kernel != Kernel::none;
  Mat& q = ls ? ls->q : scratch_q_;
  Mat& k = ls ? ls->k : scratch_k_;
  Mat& a = ls ? ls->a : scratch_a_;

  const Mat* v = &h_in;  // without Wv the layer input is the single shared value head
  if (cfg_.use_weight && !(attention && fused_simple())) {
    Mat& vbuf = ls ? ls->v : scratch_v_;
    cpu::linear_fwd(h_in, params.mat(s.wv), params.ptr(s.bv), vbuf);
    v = &vbuf;
  }
  const bool mix = cfg_.graph_weight > 0 && cfg_.use_graph;
  const float ca = mix ? 1.0f - cfg_.graph_weight : 1.0f;
  const float cg = mix ? cfg_.graph_weight : 1.0f;

  const bool folded = attention && fused_simple();
  prof::Section t_attn("fwd.attn");
  if (folded) {
    cpu::SimpleFusedState local;
    // With V = h (no Wv) the whole tail (residual mix, graph gather, LayerNorm, dropout) runs on
    // each block of attention rows as soon as it is computed, while it is in cache.
    if (cfg_.use_ln && !cfg_.use_weight) {
      DFM_CHECK(!cfg_.use_graph || in.graph,
                "model: use_graph is on but the input has no graph (pass --no-graph or a file with edge_index)");
      const bool drop = training && cfg_.dropout > 0, draw = drop && !masks_given;
      cpu::MixInputs m;
      m.h_in = &h_in;
      m.keep_in = cfg_.use_residual ? 1.0f - cfg_.alpha : 0.0f;
      m.scale = cfg_.use_residual ? cfg_.alpha : 1.0f;
      m.a = &a;
      m.heads = heads;
      m.wa = ca / heads;
      if (cfg_.use_graph) {
        m.adj = &in.graph->adj;
        m.gsrc = &h_in;
        m.cg = cg;
      }
      h_out.resize(n, d);
      Mat* xhat = ls ? &ls->xhat : nullptr;
      Vec* rstd = ls ? &ls->rstd : nullptr;
      if (xhat) xhat->resize(n, d);
      if (rstd) rstd->resize(n);
      std::vector<std::uint8_t> local_keep;
      std::vector<std::uint8_t>* keep = draw ? (ls ? &ls->keep : &local_keep) : nullptr;
      if (keep) keep->resize(static_cast<size_t>(n * d));
      if (ls && !drop) ls->keep.clear();
      const float p = draw ? cfg_.dropout : 0.0f;
      const std::uint64_t lseed = mix_seed(seed, l + 1);
      const float *gamma = params.ptr(s.ln_g), *beta = params.ptr(s.ln_b);
      std::uint8_t* pk = keep ? keep->data() : nullptr;
      if (out_sums) out_sums->start(d, omp_get_max_threads());
      const Index* ids = rows ? rows->data() : nullptr;
      const std::function<void(Index, Index)> tail = [&](Index lo, Index hi) {
        cpu::mix_layernorm_dropout_rows(m, gamma, beta, kLayerNormEps, p, lseed, pk, h_out, xhat, rstd, lo, hi, ids);
        if (out_sums) out_sums->add(omp_get_thread_num(), h_out, lo, hi);
      };
      cpu::simple_attn_fused_fwd(h_in, folded_projections(l), heads, a, ls ? ls->fused : local, &tail, in_sums,
                                 rows);
      if (masks_given) cpu::dropout_apply(h_out, cfg_.dropout, ls->keep, rows);
      if (out_sums) out_sums->finish();
      return out_sums != nullptr;
    }
    cpu::simple_attn_fused_fwd(h_in, folded_projections(l), heads, a, ls ? ls->fused : local, nullptr, in_sums);
  } else if (attention) {
    cpu::linear_fwd(h_in, params.mat(s.wq), params.ptr(s.bq), q);
    cpu::linear_fwd(h_in, params.mat(s.wk), params.ptr(s.bk), k);
    if (cfg_.kernel == Kernel::simple) {
      SimpleAttnState local;
      cpu::simple_attn_fwd(q, k, *v, heads, cfg_.qk_norm, a, ls ? ls->simple : local);
      if (ls) {  // the normalised copies in the state are all backward needs
        q.resize(0, 0);
        k.resize(0, 0);
      }
    } else {
      Mat local_rowsum;
      cpu::sigmoid_attn_fwd(q, k, *v, heads, a, ls ? ls->rowsum : local_rowsum);
    }
  }
  t_attn.stop();
  prof::Section t_tail("fwd.graph+tail");
  // The graph term's head mean, [N, D] (times cg below). With one value head (V = h_in, or
  // vheads == 1) and LayerNorm on, the fused tail gathers it row by row instead.
  Mat& g = scratch_g_;
  const bool keep_in_use = cfg_.use_residual;
  const float keep_in = keep_in_use ? 1.0f - cfg_.alpha : 0.0f, scale = keep_in_use ? cfg_.alpha : 1.0f;
  const bool drop = training && cfg_.dropout > 0;
  const bool fused_tail = cfg_.use_ln;
  const Mat* g_src = nullptr;  // the fused tail's gather source
  if (cfg_.use_graph) {
    DFM_CHECK(in.graph, "model: use_graph is on but the input has no graph (pass --no-graph or a file with edge_index)");
    if (folded && cfg_.use_weight) {  // V never formed: (adj h) mean(Wv)^T + (adj 1) mean(bv)^T
      Mat& ah = scratch_q_;
      cpu::graph_prop(in.graph->adj, h_in, ah);
      Mat wv_mean;
      Vec bv_mean;
      mean_value_map(l, wv_mean, bv_mean);
      g.resize(n, d);
      g.noalias() = ah * wv_mean.transpose();
      const Vec rowsum = graph_row_sums(in.graph->adj);
#pragma omp parallel for schedule(static)
      for (Index i = 0; i < n; ++i) g.row(i) += rowsum[i] * bv_mean.transpose();
    } else if (vheads == 1 && fused_tail) {
      g_src = v;
    } else if (vheads == 1) {
      cpu::graph_prop(in.graph->adj, *v, g);
    } else {
      Mat& gv = scratch_k_;
      cpu::graph_prop(in.graph->adj, *v, gv);
      g.resize(n, d);
      g = gv.middleCols(0, d);
      for (int h = 1; h < vheads; ++h) g += gv.middleCols(h * d, d);
      if (vheads > 1) g /= static_cast<float>(vheads);
    }
  }
  const float wa = ca / heads;
  if (fused_tail) {
    // z = alpha * (head mean of the attention and graph terms) + (1 - alpha) * h_in, LayerNorm
    // and dropout in one pass over the rows.
    cpu::MixInputs m;
    m.h_in = &h_in;
    m.keep_in = keep_in;
    m.scale = scale;
    m.a = attention ? &a : nullptr;
    m.heads = heads;
    m.wa = wa;
    if (cfg_.use_graph) {
      m.cg = cg;
      if (g_src) {
        m.adj = &in.graph->adj;
        m.gsrc = g_src;
      } else {
        m.g = &g;
      }
    }
    std::vector<std::uint8_t> local_keep;
    const bool draw = drop && !masks_given;
    cpu::mix_layernorm_dropout_fwd(m, params.ptr(s.ln_g), params.ptr(s.ln_b), kLayerNormEps, draw ? cfg_.dropout : 0.0f,
                                   mix_seed(seed, l + 1), draw ? (ls ? &ls->keep : &local_keep) : nullptr, h_out,
                                   ls ? &ls->xhat : nullptr, ls ? &ls->rstd : nullptr);
    if (masks_given) cpu::dropout_apply(h_out, cfg_.dropout, ls->keep);
    if (ls && !drop) ls->keep.clear();
    return false;
  }
  // z = alpha * (head mean of the attention and graph terms) + (1 - alpha) * h_in, in one pass.
  Mat& z = h_out;
  z.resize(n, d);
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) {
    auto zi = z.row(i);
    zi.setZero();
    if (attention)
      for (int h = 0; h < heads; ++h) zi += wa * a.row(i).segment(h * d, d);
    if (cfg_.use_graph) zi += cg * g.row(i);
    zi = scale * zi + keep_in * h_in.row(i);
  }
  if (masks_given) {
    cpu::dropout_apply(h_out, cfg_.dropout, ls->keep);
  } else if (drop) {
    std::vector<std::uint8_t> local_keep;
    cpu::dropout_fwd(h_out, cfg_.dropout, mix_seed(seed, l + 1), ls ? ls->keep : local_keep);
  } else if (ls) {
    ls->keep.clear();
  }
  return false;
}

void DIFFormer::forward(const ModelInput& in, bool training, std::uint64_t dropout_seed, ForwardState* state,
                        Mat& logits, std::vector<Mat>* hidden, const std::vector<Index>* rows) {
  DFM_CHECK(in.dense || in.sparse, "model: no input features");
  DFM_CHECK(in.features() == cfg_.in_features, "model: input has ", in.features(), " features, the model expects ",
            cfg_.in_features);
  DFM_CHECK(!in.graph || in.graph->nodes() == in.rows(), "model: graph has ", in.graph ? in.graph->nodes() : 0,
            " nodes but the input has ", in.rows(), " rows");
  const int layers = cfg_.layers;
  // Only `rows` of the logits needed: the last layer and the output map run on them alone. (An
  // empty list runs everything: state->rows empty means all rows to backward.)
  const std::vector<Index>* last_rows =
      rows && !rows->empty() && !hidden && layers > 0 && fused_layer() ? rows : nullptr;
  if (last_rows)
    for (size_t k = 0; k < rows->size(); ++k)
      DFM_CHECK((*rows)[k] >= 0 && (*rows)[k] < in.rows() && (k == 0 || (*rows)[k] > (*rows)[k - 1]),
                "model: the rows of the logits asked for must be sorted, distinct and within [0, ", in.rows(), ")");
  std::vector<Mat> local(2);
  if (state) {
    state->hidden.resize(layers + 1);
    state->layers.resize(layers);
    if (last_rows)
      state->rows = *last_rows;
    else
      state->rows.clear();
  }
  auto h_at = [&](int l) -> Mat& { return state ? state->hidden[l] : local[l % 2]; };
  const bool drop = training && cfg_.dropout > 0;
  // --rng torch: every site's mask is drawn now, in F.dropout's order (input block, then each
  // layer); the sites apply them. The sums a layer's tail makes for the next layer would be taken
  // before the mask, so they are not passed on then.
  const bool given = drop && state && state->torch_dropout;
  if (given) {
    const Index nd = in.rows() * cfg_.hidden;
    state->in_keep.resize(static_cast<size_t>(nd));
    state->torch_dropout->dropout_keep(state->in_keep.data(), nd, cfg_.dropout);
    for (auto& ls : state->layers) {
      ls.keep.resize(static_cast<size_t>(nd));
      state->torch_dropout->dropout_keep(ls.keep.data(), nd, cfg_.dropout);
    }
  }

  Mat& h0 = h_at(0);
  prof::Section t_in("fwd.input");
  Mat x1;
  if (in.dense)
    cpu::linear_fwd(*in.dense, params.mat(fc_in_w_), params.ptr(fc_in_b_), cfg_.use_ln ? x1 : h0);
  else
    cpu::linear_sparse_fwd(*in.sparse, params.mat(fc_in_w_), params.ptr(fc_in_b_), cfg_.use_ln ? x1 : h0);
  cpu::RowSums sums[2];  // G and u of the next layer's input, when the previous tail summed them
  const cpu::RowSums* in_sums = nullptr;
  if (cfg_.use_ln) {  // LayerNorm, ReLU and dropout in one row pass (summing G and u of h_0 for
                      // the folded first layer)
    cpu::MixInputs m;
    m.h_in = &x1;
    m.keep_in = 1.0f;
    m.scale = 0.0f;
    m.relu = true;
    std::vector<std::uint8_t> keep;
    const bool draw = drop && !given, summed = fused_simple() && layers > 0 && !given;
    cpu::mix_layernorm_dropout_fwd(m, params.ptr(ln_in_g_), params.ptr(ln_in_b_), kLayerNormEps,
                                   draw ? cfg_.dropout : 0.0f, mix_seed(dropout_seed, 0),
                                   draw ? (state ? &state->in_keep : &keep) : nullptr, h0,
                                   state ? &state->in_xhat : nullptr, state ? &state->in_rstd : nullptr,
                                   summed ? &sums[0] : nullptr);
    if (given) cpu::dropout_apply(h0, cfg_.dropout, state->in_keep);
    if (summed) in_sums = &sums[0];
    if (state && !drop) state->in_keep.clear();
  } else {
    cpu::relu_inplace(h0);
    if (given) {
      cpu::dropout_apply(h0, cfg_.dropout, state->in_keep);
    } else if (drop) {
      std::vector<std::uint8_t> keep;
      cpu::dropout_fwd(h0, cfg_.dropout, mix_seed(dropout_seed, 0), state ? state->in_keep : keep);
    } else if (state) {
      state->in_keep.clear();
    }
  }
  t_in.stop();
  if (hidden) hidden->assign(1, h0);
  for (int l = 0; l < layers; ++l) {
    cpu::RowSums* out_sums = l + 1 < layers && !given ? &sums[(l + 1) % 2] : nullptr;
    const bool summed = layer_forward(l, in, h_at(l), training, dropout_seed, state ? &state->layers[l] : nullptr,
                                      h_at(l + 1), in_sums, out_sums, l + 1 == layers ? last_rows : nullptr, given);
    in_sums = summed ? out_sums : nullptr;
    if (hidden) hidden->push_back(h_at(l + 1));
  }
  prof::Section t_out("fwd.output");
  if (last_rows) {
    const Mat& h = h_at(layers);
    const Mat h_rows = h(*last_rows, Eigen::all);
    Mat logits_rows;
    cpu::linear_fwd(h_rows, params.mat(fc_out_w_), params.ptr(fc_out_b_), logits_rows);
    logits.setZero(h.rows(), logits_rows.cols());
    logits(*last_rows, Eigen::all) = logits_rows;
  } else {
    cpu::linear_fwd(h_at(layers), params.mat(fc_out_w_), params.ptr(fc_out_b_), logits);
  }
}

void DIFFormer::embed(const ModelInput& in, Mat& h) {
  std::vector<Mat> hidden;
  Mat logits;
  forward(in, false, 0, nullptr, logits, &hidden);
  h = std::move(hidden.back());
}

void DIFFormer::layer_backward(int l, const ModelInput& in, const Mat& h_in, LayerState& ls, Mat& dh_out,
                               Mat& dh_in, const std::vector<Index>* rows) {
  DFM_ASSERT(!rows || fused_layer());
  const LayerSlots& s = layer_slots_[l];
  const Index n = h_in.rows(), d = cfg_.hidden;
  const int heads = cfg_.heads, vheads = value_heads();
  const bool attention = cfg_.kernel != Kernel::none;
  const bool mix = cfg_.graph_weight > 0 && cfg_.use_graph;
  const float ca = mix ? 1.0f - cfg_.graph_weight : 1.0f;
  const float cg = mix ? cfg_.graph_weight : 1.0f;

  // Through dropout, LayerNorm and the residual mix: d(head mean) = scale * dz, dh_in starts at
  // keep_in * dz.
  const float keep_in = cfg_.use_residual ? 1.0f - cfg_.alpha : 0.0f, scale = cfg_.use_residual ? cfg_.alpha : 1.0f;
  Mat& d_o = scratch_o_;
  const float wa = ca / heads;
  if (fused_layer()) {
    // One pass pair over the rows: each thread runs the tail's backward on its rows right before
    // the attention reads them (da = d_o), and adds the graph term to its rows of dh_in right
    // after the attention's row maps wrote them.
    prof::Section t_attn("bwd.fused");
    if (rows) {  // dh_out is zero outside rows: so are d_o and the tail's part of dh_in
      d_o.setZero(n, d);
      dh_in.setZero(n, d);
    } else {
      d_o.resize(n, d);
      dh_in.resize(n, d);
    }
    const Index* ids = rows ? rows->data() : nullptr;
    const int threads = omp_get_max_threads();
    std::vector<Vec> dg(threads, Vec::Zero(d)), db(threads, Vec::Zero(d));
    const std::uint8_t* keep = ls.keep.empty() ? nullptr : ls.keep.data();
    const float* gamma = params.ptr(s.ln_g);
    const std::function<void(Index, Index)> tail = [&](Index lo, Index hi) {
      const int t = omp_get_thread_num();
      cpu::dropout_layernorm_mix_bwd_rows(keep, cfg_.dropout, ls.xhat, ls.rstd, gamma, dh_out, scale, keep_in, d_o,
                                          &dh_in, dg[t].data(), db[t].data(), lo, hi, ids);
    };
    const std::function<void(Index, Index)> graph = [&](Index lo, Index hi) {
      cpu::graph_prop_rows(in.graph->adj_t, d_o, dh_in, cg, true, lo, hi);
    };
    cpu::FoldedGrads grads{params.grad_ptr(s.wq), params.grad_ptr(s.bq), params.grad_ptr(s.wk),
                           params.grad_ptr(s.bk), nullptr, nullptr};
    cpu::simple_attn_fused_bwd(h_in, folded_projections(l), heads, ls.a, ls.fused, d_o, dh_in, grads, true, &tail,
                               cfg_.use_graph ? &graph : nullptr, rows);
    VecMap dgamma(params.grad_ptr(s.ln_g), d), dbeta(params.grad_ptr(s.ln_b), d);
    for (int t = 0; t < threads; ++t) {
      dgamma += dg[t];
      dbeta += db[t];
    }
    return;
  }
  prof::Section t_tail("bwd.tail");
  if (cfg_.use_ln) {
    cpu::dropout_layernorm_mix_bwd(ls.keep.empty() ? nullptr : &ls.keep, cfg_.dropout, ls.xhat, ls.rstd,
                                   params.ptr(s.ln_g), dh_out, scale, keep_in, d_o, &dh_in, params.grad_ptr(s.ln_g),
                                   params.grad_ptr(s.ln_b));
  } else {
    if (!ls.keep.empty()) cpu::dropout_bwd(dh_out, cfg_.dropout, ls.keep);
    d_o.resize(n, d);
    dh_in.resize(n, d);
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < n; ++i) {
      dh_in.row(i) = keep_in * dh_out.row(i);
      d_o.row(i) = scale * dh_out.row(i);
    }
  }
  t_tail.stop();
  if (attention && fused_simple()) {
    prof::Section t_attn("bwd.attn");
    // Folded path: Q, K, V never formed; the attention adds its whole dh contribution.
    const Mat* da = &d_o;
    if (heads != 1 || wa != 1.0f) {
      Mat& dab = scratch_a_;
      dab.resize(n, heads * d);
#pragma omp parallel for schedule(static)
      for (Index i = 0; i < n; ++i)
        for (int h = 0; h < heads; ++h) dab.row(i).segment(h * d, d) = wa * d_o.row(i);
      da = &dab;
    }
    cpu::FoldedGrads grads{params.grad_ptr(s.wq), params.grad_ptr(s.bq), params.grad_ptr(s.wk),
                           params.grad_ptr(s.bk), cfg_.use_weight ? params.grad_ptr(s.wv) : nullptr,
                           cfg_.use_weight ? params.grad_ptr(s.bv) : nullptr};
    cpu::simple_attn_fused_bwd(h_in, folded_projections(l), heads, ls.a, ls.fused, *da, dh_in, grads, true);
    t_attn.stop();
    prof::Section t_graph("bwd.graph");
    if (cfg_.use_graph) {
      if (cfg_.use_weight) {
        // g = (adj h) mean(Wv)^T + (adj 1) mean(bv)^T: dWv_h, dbv_h get 1/H of the mean's gradient
        Mat& t = scratch_k_;
        Mat wv_mean;
        Vec bv_mean;
        mean_value_map(l, wv_mean, bv_mean);
        Mat& ah = scratch_v_;
        cpu::graph_prop(in.graph->adj, h_in, ah);
        Mat dwv(d, d);
        cpu::tn_product(d_o, ah, dwv);
        const Vec rowsum = graph_row_sums(in.graph->adj);
        const Vec dbv = d_o.transpose() * rowsum;
        for (int h = 0; h < heads; ++h) {
          params.grad_mat(s.wv).middleRows(h * d, d) += (cg / heads) * dwv;
          VecMap(params.grad_ptr(s.bv) + h * d, d) += (cg / heads) * dbv;
        }
        Mat dah = (cg * d_o) * wv_mean;
        cpu::graph_prop(in.graph->adj_t, dah, t);
        dh_in += t;
      } else {
        cpu::graph_prop(in.graph->adj_t, d_o, dh_in, cg, true);
      }
    }
    return;
  }
  const Mat& v = cfg_.use_weight ? ls.v : h_in;
  Mat& dv = scratch_v_;  // gradient of the value tensor, [N, vheads * D]
  Mat& tmp = scratch_q_;
  if (cfg_.use_graph) {
    cpu::graph_prop(in.graph->adj_t, d_o, tmp);
    dv.resize(n, vheads * d);
    for (int h = 0; h < vheads; ++h) dv.middleCols(h * d, d) = (cg / vheads) * tmp;
  } else {
    dv.setZero(n, vheads * d);
  }
  if (attention) {
    Mat& da = scratch_a_;
    da.resize(n, heads * d);
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < n; ++i)
      for (int h = 0; h < heads; ++h) da.row(i).segment(h * d, d) = (ca / heads) * d_o.row(i);
    Mat dq, dk, dv_attn;
    if (cfg_.kernel == Kernel::simple)
      cpu::simple_attn_bwd(v, heads, ls.a, ls.simple, da, dq, dk, dv_attn);
    else
      cpu::sigmoid_attn_bwd(ls.q, ls.k, v, heads, ls.a, ls.rowsum, da, dq, dk, dv_attn);
    dv += dv_attn;
    cpu::linear_bwd(h_in, params.mat(s.wq), dq, &tmp, params.grad_mat(s.wq), params.grad_ptr(s.bq));
    dh_in += tmp;
    cpu::linear_bwd(h_in, params.mat(s.wk), dk, &tmp, params.grad_mat(s.wk), params.grad_ptr(s.bk));
    dh_in += tmp;
  }
  if (cfg_.use_weight) {
    cpu::linear_bwd(h_in, params.mat(s.wv), dv, &tmp, params.grad_mat(s.wv), params.grad_ptr(s.bv));
    dh_in += tmp;
  } else {
    dh_in += dv;
  }
}

cpu::FoldedProjections DIFFormer::folded_projections(int l) const {
  const LayerSlots& s = layer_slots_[l];
  cpu::FoldedProjections w;
  w.wq = params.ptr(s.wq);
  w.bq = params.ptr(s.bq);
  w.wk = params.ptr(s.wk);
  w.bk = params.ptr(s.bk);
  if (cfg_.use_weight) {
    w.wv = params.ptr(s.wv);
    w.bv = params.ptr(s.bv);
  }
  return w;
}

void DIFFormer::mean_value_map(int l, Mat& wv_mean, Vec& bv_mean) const {
  const LayerSlots& s = layer_slots_[l];
  const Index d = cfg_.hidden;
  const auto wv = params.mat(s.wv);
  ConstVecMap bv(params.ptr(s.bv), cfg_.heads * d);
  wv_mean = wv.middleRows(0, d);
  bv_mean = bv.segment(0, d);
  for (int h = 1; h < cfg_.heads; ++h) {
    wv_mean += wv.middleRows(h * d, d);
    bv_mean += bv.segment(h * d, d);
  }
  wv_mean /= static_cast<float>(cfg_.heads);
  bv_mean /= static_cast<float>(cfg_.heads);
}

void DIFFormer::backward(const ModelInput& in, ForwardState& state, const Mat& dlogits) {
  const int layers = cfg_.layers;
  DFM_ASSERT(static_cast<int>(state.hidden.size()) == layers + 1);
  Mat dh, dh_prev;
  prof::Section t_out("bwd.output");
  const std::vector<Index>* last_rows = state.rows.empty() ? nullptr : &state.rows;
  if (last_rows) {  // h_L and the logits exist on these rows only (dlogits is zero elsewhere)
    const Mat h_rows = state.hidden[layers](*last_rows, Eigen::all);
    const Mat dlogits_rows = dlogits(*last_rows, Eigen::all);
    Mat dh_rows;
    cpu::linear_bwd(h_rows, params.mat(fc_out_w_), dlogits_rows, &dh_rows, params.grad_mat(fc_out_w_),
                    params.grad_ptr(fc_out_b_));
    dh.resize(state.hidden[layers].rows(), dh_rows.cols());  // read on last_rows only
    dh(*last_rows, Eigen::all) = dh_rows;
  } else {
    cpu::linear_bwd(state.hidden[layers], params.mat(fc_out_w_), dlogits, &dh, params.grad_mat(fc_out_w_),
                    params.grad_ptr(fc_out_b_));
  }
  t_out.stop();
  for (int l = layers - 1; l >= 0; --l) {
    layer_backward(l, in, state.hidden[l], state.layers[l], dh, dh_prev, l + 1 == layers ? last_rows : nullptr);
    std::swap(dh, dh_prev);
  }
  prof::Section t_in("bwd.input");
  // ReLU backward from its (post-dropout) output: dropped entries already have zero gradient,
  // and a kept entry is positive exactly when the ReLU output was.
  Mat dx1;
  if (cfg_.use_ln) {  // dropout, ReLU and LayerNorm backward in one row pass
    cpu::dropout_layernorm_mix_bwd(state.in_keep.empty() ? nullptr : &state.in_keep, cfg_.dropout, state.in_xhat,
                                   state.in_rstd, params.ptr(ln_in_g_), dh, 1.0f, 0.0f, dx1, nullptr,
                                   params.grad_ptr(ln_in_g_), params.grad_ptr(ln_in_b_), &state.hidden[0]);
  } else {
    if (!state.in_keep.empty()) cpu::dropout_bwd(dh, cfg_.dropout, state.in_keep);
    cpu::relu_bwd_inplace(state.hidden[0], dh);
    dx1 = std::move(dh);
  }
  if (in.dense) {
    cpu::linear_bwd(*in.dense, params.mat(fc_in_w_), dx1, nullptr, params.grad_mat(fc_in_w_),
                    params.grad_ptr(fc_in_b_));
  } else {
    DFM_CHECK(in.sparse_t, "model: sparse input needs its transpose for backward");
    cpu::linear_sparse_bwd(*in.sparse_t, dx1, params.grad_mat(fc_in_w_), params.grad_ptr(fc_in_b_));
  }
}

}  // namespace dfm
