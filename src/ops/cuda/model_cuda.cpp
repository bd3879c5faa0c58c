// DIFFormer on one GPU (the public face is dfm::cuda::Model in ops/cuda_backend.hpp): the same
// ModelConfig, the same flat parameter order and the same arithmetic as src/model/difformer.cpp,
// on the launchers of cuda_ops.hpp. What it keeps between forward and backward is the input of
// every diffusion layer's LayerNorm (z_1 .. z_L), the simple kernel's d x d statistics (and row
// denominators), and the sigmoid kernel's output and row sums; the hidden states, z_0 (one GEMM
// from x), Q, K, V and the simple kernel's A are recomputed in backward (cheap next to the
// memory they would hold), and dropout masks are recomputed from the seed.
//
// Buffers (T = one [N, D] tensor): z L T saved; three rotating T (hidden states forward;
// h_l, dh_{l+1}, dh_l backward); q, k, a: [N, H*D]; v [N, H*D] with use_weight; g [N, Hv*D]
// (graph term forward, value gradient backward). Backward writes dQ and dK in place of Q and K,
// and dlogits in place of the logits (unless the loss runs over an index subset).
// DIFFormer-s with the official global norm, one head and d in {16, 32, 64} takes the folded layer
// (simple_folded.hpp, docs/ALGEBRA.md "On the GPU"): no Q, K, V, A or g buffer at all, only
// rbuf[0..1] and z (4 [N, D] buffers for 2 layers). DIFFORMER_SIMPLE_FOLDED=0 falls back to the
// fused kernels of attn_simple_fused.cu over materialised Q, K, V; DIFFORMER_SIMPLE_UNFUSED=1
// forces the cuBLAS path.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/cuda_ops.hpp"
#include "ops/cuda/simple_folded.hpp"
#include "ops/cuda_backend.hpp"

namespace dfm::cuda {

namespace {
constexpr float kLayerNormEps = 1e-5f;  // as difformer.cpp

Precision parse_precision(const std::string& s) {
  if (s == "fp32") return Precision::fp32;
  if (s == "tf32") return Precision::tf32;
  if (s == "bf16") return Precision::tf32;  // cuBLAS GEMMs on TF32; the sigmoid attention in bf16
  fail("--precision: unknown value '", s, "', expected fp32, tf32 or bf16");
}
AttnPrecision attn_precision(const std::string& s) {
  return s == "bf16" ? AttnPrecision::bf16 : (s == "tf32" ? AttnPrecision::tf32 : AttnPrecision::fp32);
}

struct DevCsr {
  DeviceBuffer<std::int64_t> indptr;
  DeviceBuffer<std::int32_t> indices;
  DeviceBuffer<float> values;
  CsrView view;
  void upload(GpuContext& ctx, const Csr& c) {
    indptr = DeviceBuffer<std::int64_t>(ctx, c.indptr.size());
    indices = DeviceBuffer<std::int32_t>(ctx, std::max<std::size_t>(c.indices.size(), 1));
    values = DeviceBuffer<float>(ctx, std::max<std::size_t>(c.values.size(), 1));
    std::vector<std::int64_t> ip(c.indptr.begin(), c.indptr.end());
    indptr.upload(ip);
    if (!c.indices.empty()) {
      indices.upload(c.indices);
      values.upload(c.values);
    }
    view = CsrView{c.rows, c.cols, c.nnz(), indptr.data(), indices.data(), values.data()};
  }
  void clear() {
    indptr.reset();
    indices.reset();
    values.reset();
    view = CsrView{};
  }
};

bool same_csr(const Csr& a, const Csr& b) {
  return a.rows == b.rows && a.cols == b.cols && a.indptr == b.indptr && a.indices == b.indices &&
         a.values == b.values;
}
}  // namespace

struct Model::Impl {
  struct LayerOff {
    Index wk = -1, bk = -1, wq = -1, bq = -1, wv = -1, bv = -1, ln_g = -1, ln_b = -1;
  };

  ModelConfig cfg;
  DeviceOptions opt;
  GpuContext ctx;
  std::vector<ParamSlot> slots;
  std::vector<LayerOff> lay;
  Index fc_in_w = -1, fc_in_b = -1, fc_out_w = -1, fc_out_b = -1, ln_in_g = -1, ln_in_b = -1, nparams = 0;
  Index D, H, HD, Hv, HvD, C;
  float ca = 1.0f, cg = 1.0f, scale = 1.0f, keep_in = 0.0f;

  DeviceBuffer<float> params, grads, adam_m, adam_v, loss;
  DeviceBuffer<double> adam_state;
  DeviceBuffer<std::uint64_t> seed;

  Index n = 0;
  bool sparse_in = false;
  DeviceBuffer<float> x, w_in_t, dw_in_t;
  DevCsr xs, xst, adj, adjt;
  CsrView adjt_view;
  DeviceBuffer<std::int32_t> labels, idx;
  Index idx_count = 0;
  bool has_labels = false;

  std::vector<DeviceBuffer<float>> z, stats, den, a_saved, rowsum;  // z[0] stays empty (recomputed)
  DeviceBuffer<float> rbuf[3], q, k, v, a, g, qn, kn, qnorm, knorm, dden, fused_work, logits, dlogits;
  bool fused = false;  // DIFFormer-s through attn_simple_fused.cu
  // DIFFormer-s with every projection folded (simple_folded.hpp): only rbuf[0..1], z and these
  bool folded = false;
  std::vector<DeviceBuffer<float>> fstats;
  DeviceBuffer<float> fwork, rsum;

  // fwd_done: z_0..z_L and the logits hold the last forward. bwd_ready: the rotating buffers
  // still hold h_{L-1}, h_L (backward consumes them; a second backward needs a new forward).
  bool fwd_done = false, bwd_ready = false, fwd_training = false;
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t graph_exec = nullptr;
  bool graph_failed = false;
  int eager_steps = 0;
  AdamHyper graph_hyper{};

  Impl(const ModelConfig& c, const DeviceOptions& o)
      : cfg(c), opt(o), ctx(parse_precision(o.precision), o.device) {
    cfg.validate();
    DFM_CHECK(cfg.hidden <= 512, "--device cuda: hidden width ", cfg.hidden, " is not supported (at most 512)");
    DFM_CHECK(cfg.kernel != Kernel::sigmoid || cfg.hidden <= sigmoid_attn_max_d(),
              "--device cuda: the sigmoid kernel supports --hidden up to ", sigmoid_attn_max_d(), " (got ",
              cfg.hidden, ")");
    D = cfg.hidden;
    H = cfg.heads;
    HD = H * D;
    Hv = cfg.use_weight ? H : 1;
    HvD = Hv * D;
    C = cfg.out_features;
    const bool mix = cfg.graph_weight > 0 && cfg.use_graph;
    ca = mix ? 1.0f - cfg.graph_weight : 1.0f;
    cg = mix ? cfg.graph_weight : 1.0f;
    keep_in = cfg.use_residual ? 1.0f - cfg.alpha : 0.0f;
    scale = cfg.use_residual ? cfg.alpha : 1.0f;

    DIFFormer host(cfg);  // the parameter layout (names, offsets) of the CPU model
    slots = host.params.slots;
    nparams = host.params.total();
    auto off = [&](const std::string& name) -> Index {
      const int s = host.params.find(name);
      return s < 0 ? -1 : slots[s].offset;
    };
    for (int l = 0; l < cfg.layers; ++l) {
      const std::string p = "convs." + std::to_string(l) + ".";
      LayerOff o;
      o.wk = off(p + "Wk.weight"), o.bk = off(p + "Wk.bias"), o.wq = off(p + "Wq.weight"), o.bq = off(p + "Wq.bias");
      o.wv = off(p + "Wv.weight"), o.bv = off(p + "Wv.bias");
      o.ln_g = off("bns." + std::to_string(l + 1) + ".weight"), o.ln_b = off("bns." + std::to_string(l + 1) + ".bias");
      lay.push_back(o);
    }
    fc_in_w = off("fcs.0.weight"), fc_in_b = off("fcs.0.bias"), fc_out_w = off("fcs.1.weight");
    fc_out_b = off("fcs.1.bias"), ln_in_g = off("bns.0.weight"), ln_in_b = off("bns.0.bias");

    params = DeviceBuffer<float>(ctx, nparams);
    grads = DeviceBuffer<float>(ctx, nparams);
    adam_m = DeviceBuffer<float>(ctx, nparams);
    adam_v = DeviceBuffer<float>(ctx, nparams);
    adam_state = DeviceBuffer<double>(ctx, 3);
    loss = DeviceBuffer<float>(ctx, 1);
    seed = DeviceBuffer<std::uint64_t>(ctx, 1);
    params.upload(host.params.values);  // zeros until upload_params
    reset_optimizer();
  }

  ~Impl() { drop_graph(); }

  void drop_graph() {
    if (graph_exec) cudaGraphExecDestroy(graph_exec);
    if (graph) cudaGraphDestroy(graph);
    graph_exec = nullptr;
    graph = nullptr;
  }

  void reset_optimizer() {
    grads.zero();
    adam_m.zero();
    adam_v.zero();
    adam_state.zero();
    ctx.sync();
  }

  float* P(Index o) { return o < 0 ? nullptr : params.data() + o; }
  float* G(Index o) { return o < 0 ? nullptr : grads.data() + o; }
  bool attention() const { return cfg.kernel != Kernel::none; }
  bool simple() const { return cfg.kernel == Kernel::simple; }
  Norm norm() const { return cfg.qk_norm == QkNorm::global ? Norm::global : Norm::node; }
  AttnDims dims() const { return AttnDims{n, D, static_cast<int>(H), static_cast<int>(Hv)}; }
  float drop_p(bool training) const { return training ? cfg.dropout : 0.0f; }

  // ---- input -------------------------------------------------------------------------------------
  void set_input(const ModelInput& in) {
    DFM_CHECK(in.dense || in.sparse, "model: no input features");
    DFM_CHECK(in.features() == cfg.in_features, "model: input has ", in.features(), " features, the model expects ",
              cfg.in_features);
    DFM_CHECK(!cfg.use_graph || in.graph,
              "model: use_graph is on but the input has no graph (pass --no-graph or a file with edge_index)");
    DFM_CHECK(!in.graph || in.graph->nodes() == in.rows(), "model: graph has ", in.graph ? in.graph->nodes() : 0,
              " nodes but the input has ", in.rows(), " rows");
    DFM_CHECK(in.rows() < (Index{1} << 31), "--device cuda: at most 2^31 - 1 rows");
    drop_graph();
    fwd_done = bwd_ready = false;
    n = in.rows();
    sparse_in = in.dense == nullptr;
    x.reset(), xs.clear(), xst.clear(), w_in_t.reset(), dw_in_t.reset();
    if (!sparse_in) {
      x = DeviceBuffer<float>(ctx, static_cast<std::size_t>(n * cfg.in_features));
      x.upload(in.dense->data(), x.size());
    } else {
      DFM_CHECK(in.sparse_t, "model: sparse input needs its transpose for backward");
      xs.upload(ctx, *in.sparse);
      xst.upload(ctx, *in.sparse_t);
      w_in_t = DeviceBuffer<float>(ctx, static_cast<std::size_t>(cfg.in_features * D));
      dw_in_t = DeviceBuffer<float>(ctx, static_cast<std::size_t>(cfg.in_features * D));
    }
    adj.clear(), adjt.clear();
    if (cfg.use_graph) {
      adj.upload(ctx, in.graph->adj);
      if (same_csr(in.graph->adj, in.graph->adj_t)) {  // undirected, unweighted: one copy serves both
        adjt_view = adj.view;
      } else {
        adjt.upload(ctx, in.graph->adj_t);
        adjt_view = adjt.view;
      }
    }
    allocate_activations();
    if (has_labels && labels.size() != static_cast<std::size_t>(n)) has_labels = false;
    if (idx_count > 0) idx.reset(), dlogits.reset(), idx_count = 0;
  }

  void allocate_activations() {
    auto T = [&](Index cols) { return DeviceBuffer<float>(ctx, static_cast<std::size_t>(std::max<Index>(n * cols, 1))); };
    const int L = cfg.layers;
    z.clear(), stats.clear(), den.clear(), a_saved.clear(), rowsum.clear(), fstats.clear();
    for (auto& b : {&q, &k, &v, &a, &g, &qn, &kn, &qnorm, &knorm, &dden, &fused_work, &logits, &dlogits, &fwork, &rsum})
      b->reset();
    for (auto& b : rbuf) b.reset();
    z.emplace_back();  // z_0 is recomputed from x when needed
    for (int l = 1; l <= L; ++l) z.push_back(T(D));
    const char* no_fold = std::getenv("DIFFORMER_SIMPLE_FOLDED");
    const char* unfused_env = std::getenv("DIFFORMER_SIMPLE_UNFUSED");
    folded = attention() && simple() && norm() == Norm::global && H == 1 && ca == 1.0f && folded_supported(D) &&
             !(no_fold && std::string(no_fold) == "0") && !(unfused_env && std::string(unfused_env) == "1");
    if (folded) {  // two rotating [n, D] buffers besides z: see folded_layer_forward / folded_backward_body
      fused = false;
      rbuf[0] = T(D), rbuf[1] = T(D);
      for (int l = 0; l < L; ++l) fstats.emplace_back(ctx, folded_stats_floats(D));
      fwork = DeviceBuffer<float>(ctx, folded_work_floats(ctx, n, D));
      if (cfg.use_graph) {
        rsum = T(1);
        csr_row_sums(ctx, adj.view, rsum.data());
      }
      logits = T(C);
      return;
    }
    for (auto& b : rbuf) b = T(D);
    if (attention()) {
      q = T(HD), k = T(HD), a = T(HD), dden = T(H);
    }
    if (cfg.use_weight) v = T(HD);
    if (cfg.use_graph || attention()) g = T(HvD);
    const char* unfused = std::getenv("DIFFORMER_SIMPLE_UNFUSED");
    fused = attention() && simple() && norm() == Norm::global && H == 1 && ca == 1.0f &&
            simple_fused_supported(dims()) && !(unfused && std::string(unfused) == "1");
    if (attention() && simple()) {
      for (int l = 0; l < L; ++l) {
        stats.emplace_back(ctx, std::max(simple_stats_floats(dims()), simple_fused_stats_floats(dims())));
        if (!fused) den.push_back(T(H));
      }
      if (norm() == Norm::node) qn = T(HD), kn = T(HD), qnorm = T(H), knorm = T(H);
      if (fused) fused_work = DeviceBuffer<float>(ctx, simple_fused_work_floats(dims()));
    }
    if (attention() && !simple())
      for (int l = 0; l < L; ++l) {
        a_saved.push_back(T(HD));
        rowsum.push_back(T(H));
      }
    logits = T(C);  // dlogits overwrite it, unless the loss has an index subset (set_train_index)
  }

  // ---- forward -------------------------------------------------------------------------------------
  RowNormFwd hidden_norm(int j, bool training, const float* zin, float* out) {
    // h_j from z_j: the input block (j = 0: LayerNorm bns.0, ReLU) or layer j-1 (bns.j)
    RowNormFwd r;
    r.n = n, r.d = D;
    r.t[0] = RowTerm{zin, D, 0, 1, 1.0f};
    r.ln = cfg.use_ln;
    r.gamma = P(j == 0 ? ln_in_g : lay[j - 1].ln_g);
    r.beta = P(j == 0 ? ln_in_b : lay[j - 1].ln_b);
    r.eps = kLayerNormEps;
    r.relu = j == 0;
    r.drop_p = drop_p(training);
    r.seed = seed.data();
    r.salt = static_cast<std::uint64_t>(j);
    r.y = out;
    return r;
  }

  // z_0 = x W_in^T + b_in into out (not kept: one GEMM from x recomputes it)
  void compute_z0(float* out) {
    if (!sparse_in) {
      linear_fwd(ctx, x.data(), n, cfg.in_features, P(fc_in_w), D, P(fc_in_b), out);
    } else {
      transpose(ctx, P(fc_in_w), D, cfg.in_features, w_in_t.data());
      spmm(ctx, xs.view, w_in_t.data(), D, D, out, D, 1.0f, 0.0f, P(fc_in_b));
    }
  }

  void input_forward(bool training) {
    compute_z0(rbuf[1].data());  // h_1's buffer is free until layer 0 writes it
    row_norm_fwd(ctx, hidden_norm(0, training, rbuf[1].data(), rbuf[0].data()));
  }

  const float* project_v(const LayerOff& o, const float* h) {
    if (!cfg.use_weight) return h;
    linear_fwd(ctx, h, n, D, P(o.wv), HD, P(o.bv), v.data());
    return v.data();
  }
  void project_qk(const LayerOff& o, const float* h) {
    linear_fwd(ctx, h, n, D, P(o.wq), HD, P(o.bq), q.data());
    linear_fwd(ctx, h, n, D, P(o.wk), HD, P(o.bk), k.data());
  }
  SimpleSaved simple_saved(int l) {
    SimpleSaved s;
    s.stats = stats[l].data();
    s.den = den[l].data();
    if (norm() == Norm::node) s.qn = qn.data(), s.kn = kn.data(), s.qnorm = qnorm.data(), s.knorm = knorm.data();
    return s;
  }

  void layer_forward(int l, bool training, const float* h, float* out) {
    const LayerOff& o = lay[l];
    const float* vp = project_v(o, h);
    const float* att = nullptr;
    if (attention()) {
      project_qk(o, h);
      if (fused) {
        simple_fused_fwd(ctx, dims(), q.data(), k.data(), vp, a.data(), stats[l].data(), fused_work.data());
        att = a.data();
      } else if (simple()) {
        SimpleSaved s = simple_saved(l);
        simple_attn_fwd(ctx, dims(), norm(), q.data(), k.data(), vp, a.data(), s);
        att = a.data();
      } else {
        sigmoid_attn_fwd(ctx, dims(), q.data(), k.data(), vp, a_saved[l].data(), rowsum[l].data(),
                         attn_precision(opt.precision));
        att = a_saved[l].data();
      }
    }
    if (cfg.use_graph) spmm(ctx, adj.view, vp, HvD, HvD, g.data(), HvD, 1.0f, 0.0f);
    RowNormFwd r;
    r.n = n, r.d = D;
    int t = 0;
    if (att) r.t[t++] = RowTerm{att, HD, D, static_cast<int>(H), scale * ca / static_cast<float>(H)};
    if (cfg.use_graph) r.t[t++] = RowTerm{g.data(), HvD, D, static_cast<int>(Hv), scale * cg / static_cast<float>(Hv)};
    if (keep_in != 0.0f) r.t[t++] = RowTerm{h, D, 0, 1, keep_in};
    r.z = z[l + 1].data();
    r.ln = cfg.use_ln;
    r.gamma = P(o.ln_g), r.beta = P(o.ln_b), r.eps = kLayerNormEps;
    r.drop_p = drop_p(training);
    r.seed = seed.data();
    r.salt = static_cast<std::uint64_t>(l + 1);
    r.y = out;
    row_norm_fwd(ctx, r);
  }

  float* hidden_buf(int j) { return rbuf[j % 2].data(); }

  // ---- folded DIFFormer-s (simple_folded.hpp) --------------------------------------------------
  // Forward of layer l: h in rbuf[l % 2]; g = adj h goes to rbuf[(l+1) % 2], which then receives
  // h_{l+1} in place; z_{l+1} is saved. Nothing else of size N is written.
  FoldedWeights folded_weights(int l) {
    const LayerOff& o = lay[l];
    FoldedWeights w;
    w.wq = P(o.wq), w.bq = P(o.bq), w.wk = P(o.wk), w.bk = P(o.bk);
    w.dwq = G(o.wq), w.dbq = G(o.bq), w.dwk = G(o.wk), w.dbk = G(o.bk);
    if (cfg.use_weight) w.wv = P(o.wv), w.bv = P(o.bv), w.dwv = G(o.wv), w.dbv = G(o.bv);
    return w;
  }

  void folded_layer_forward(int l, bool training, const float* h, float* out) {
    const LayerOff& o = lay[l];
    folded_fwd_stats(ctx, n, D, h, folded_weights(l), fstats[l].data(), fwork.data());
    if (cfg.use_graph) spmm(ctx, adj.view, h, D, D, out, D, 1.0f, 0.0f);
    FoldedRowsFwd r;
    r.n = n, r.d = D, r.h = h;
    r.g = cfg.use_graph ? out : nullptr;
    r.rowsum = cfg.use_graph ? rsum.data() : nullptr;
    r.stats = fstats[l].data();
    r.wa = scale * ca / static_cast<float>(H), r.wg = scale * cg, r.wr = keep_in;
    r.z = z[l + 1].data();
    r.ln = cfg.use_ln;
    r.gamma = P(o.ln_g), r.beta = P(o.ln_b), r.eps = kLayerNormEps;
    r.drop_p = drop_p(training);
    r.seed = seed.data();
    r.salt = static_cast<std::uint64_t>(l + 1);
    r.y = out;
    folded_fwd_rows(ctx, r);
  }

  // Backward with two [n, D] buffers besides z: dh stays in rbuf[L % 2] (h_L, then dh_L .. dh_0 in
  // place); h_l is rebuilt in the other one (h_{L-1} is still there after the forward); t = adj^T d_o
  // goes into z_{l+1}, dead once the LayerNorm backward has read it.
  void folded_backward_body() {
    const int L = cfg.layers;
    float* dh = hidden_buf(L);
    float* hb = rbuf[(L + 1) % 2].data();
    linear_bwd(ctx, dh, n, D, P(fc_out_w), C, dlogits_buf(), nullptr, 0.0f, G(fc_out_w), G(fc_out_b));
    linear_bwd(ctx, dh, n, D, P(fc_out_w), C, dlogits_buf(), dh, 0.0f, nullptr, nullptr);  // h_L no longer needed
    for (int l = L - 1; l >= 0; --l) {
      if (l < L - 1) {
        if (l == 0) {
          compute_z0(hb);
          row_norm_fwd(ctx, hidden_norm(0, fwd_training, hb, hb));
        } else {
          row_norm_fwd(ctx, hidden_norm(l, fwd_training, z[l].data(), hb));
        }
      }
      const LayerOff& o = lay[l];
      RowNormBwd r;
      r.n = n, r.d = D;
      r.dy = dh;
      r.z = z[l + 1].data();
      r.ln = cfg.use_ln;
      r.gamma = P(o.ln_g), r.beta = P(o.ln_b), r.eps = kLayerNormEps;
      r.dgamma = G(o.ln_g), r.dbeta = G(o.ln_b);
      r.drop_p = drop_p(fwd_training);
      r.seed = seed.data();
      r.salt = static_cast<std::uint64_t>(l + 1);
      r.out1 = dh, r.s1 = 1.0f;  // d_o = dz, in place
      row_norm_bwd(ctx, r);
      float* t = nullptr;
      if (cfg.use_graph) {
        t = z[l + 1].data();
        spmm(ctx, adjt_view, dh, D, D, t, D, 1.0f, 0.0f);
      }
      folded_bwd(ctx, n, D, hb, dh, t, fstats[l].data(), folded_weights(l), scale * ca / static_cast<float>(H),
                 scale * cg, keep_in, fwork.data(), dh);
    }
    input_backward(dh, hb);
  }

  void forward_body(bool training) {
    DFM_CHECK(n > 0, "model: set_input() first");
    input_forward(training);
    for (int l = 0; l < cfg.layers; ++l) {
      if (folded)
        folded_layer_forward(l, training, hidden_buf(l), hidden_buf(l + 1));
      else
        layer_forward(l, training, hidden_buf(l), hidden_buf(l + 1));
    }
    linear_fwd(ctx, hidden_buf(cfg.layers), n, D, P(fc_out_w), C, P(fc_out_b), logits.data());
    fwd_done = bwd_ready = true;
    fwd_training = training;
  }

  float* dlogits_buf() { return idx_count ? dlogits.data() : logits.data(); }

  void loss_body() {
    DFM_CHECK(has_labels, "model: set_labels() first");
    cross_entropy(ctx, logits.data(), n, C, labels.data(), idx_count ? idx.data() : nullptr, idx_count,
                  dlogits_buf(), loss.data());
  }

  // ---- backward ------------------------------------------------------------------------------------
  // h = h_l (input), dh = dh_{l+1} (in; becomes the gradient of the head mean), out = dh_l
  void layer_backward(int l, const float* h, float* dh, float* out) {
    const LayerOff& o = lay[l];
    RowNormBwd r;
    r.n = n, r.d = D;
    r.dy = dh;
    r.z = z[l + 1].data();
    r.ln = cfg.use_ln;
    r.gamma = P(o.ln_g), r.beta = P(o.ln_b), r.eps = kLayerNormEps;
    r.dgamma = G(o.ln_g), r.dbeta = G(o.ln_b);
    r.drop_p = drop_p(fwd_training);
    r.seed = seed.data();
    r.salt = static_cast<std::uint64_t>(l + 1);
    r.out1 = dh, r.s1 = scale;  // in place: each row is read before it is written
    r.out2 = out, r.s2 = keep_in;
    row_norm_bwd(ctx, r);
    const float* d_o = dh;

    const float* vp = project_v(o, h);
    bool dv_valid = false;  // g holds the value gradient (attention part written first, graph added)
    float *dq = nullptr, *dk = nullptr;
    if (attention()) {
      project_qk(o, h);
      const float da_scale = ca / static_cast<float>(H);
      dq = q.data();
      if (fused) {  // H = 1 and da_scale = 1: dA is d_o itself
        simple_fused_rows(ctx, dims(), q.data(), stats[l].data(), a.data());
        simple_fused_bwd(ctx, dims(), q.data(), k.data(), vp, a.data(), d_o, stats[l].data(), q.data(), k.data(),
                         g.data(), fused_work.data());
        dk = k.data();
      } else if (simple()) {
        SimpleSaved s = simple_saved(l);
        if (norm() == Norm::node)
          simple_attn_fwd(ctx, dims(), norm(), q.data(), k.data(), vp, a.data(), s);  // qn, kn, A again
        else
          simple_attn_rows(ctx, dims(), norm(), q.data(), s, a.data());
        simple_attn_bwd(ctx, dims(), norm(), q.data(), k.data(), vp, a.data(), d_o, D, 0, da_scale, s, g.data(),
                        0.0f, dden.data());
        dk = k.data();
      } else {
        sigmoid_attn_bwd(ctx, dims(), q.data(), k.data(), vp, a_saved[l].data(), rowsum[l].data(), d_o, D, 0,
                         da_scale, q.data(), a.data(), g.data(), 0.0f, dden.data(), attn_precision(opt.precision));
        dk = a.data();
      }
      dv_valid = true;
    }
    if (cfg.use_graph) {
      spmm(ctx, adjt_view, d_o, D, D, g.data(), HvD, cg / static_cast<float>(Hv), dv_valid ? 1.0f : 0.0f, nullptr,
           static_cast<int>(Hv), D);
      dv_valid = true;
    }
    if (attention()) {
      linear_bwd(ctx, h, n, D, P(o.wq), HD, dq, out, 1.0f, G(o.wq), G(o.bq));
      linear_bwd(ctx, h, n, D, P(o.wk), HD, dk, out, 1.0f, G(o.wk), G(o.bk));
    }
    if (dv_valid) {
      if (cfg.use_weight)
        linear_bwd(ctx, h, n, D, P(o.wv), HD, g.data(), out, 1.0f, G(o.wv), G(o.bv));
      else
        axpby(ctx, n * D, 1.0f, g.data(), 1.0f, out);
    }
  }

  void backward_body() {
    DFM_CHECK(bwd_ready, "model: backward() needs a forward() first (one backward per forward)");
    bwd_ready = false;
    if (folded) {
      folded_backward_body();
      return;
    }
    const int L = cfg.layers;
    // the three rotating buffers: h_L sits in hidden_buf(L), h_{L-1} in hidden_buf(L-1)
    float* dh = rbuf[2].data();
    linear_bwd(ctx, hidden_buf(L), n, D, P(fc_out_w), C, dlogits_buf(), dh, 0.0f, G(fc_out_w), G(fc_out_b));
    float* free_buf = hidden_buf(L);  // h_L is no longer needed
    float* hbuf = L > 0 ? hidden_buf(L - 1) : nullptr;
    for (int l = L - 1; l >= 0; --l) {
      if (l < L - 1) {  // recompute h_l (from z_0 recomputed into the free buffer, for l = 0)
        const float* zl = z[l].data();
        if (l == 0) compute_z0(free_buf), zl = free_buf;
        row_norm_fwd(ctx, hidden_norm(l, fwd_training, zl, hbuf));
      }
      float* out = free_buf;
      layer_backward(l, hbuf, dh, out);
      free_buf = dh;
      dh = out;
    }
    input_backward(dh, free_buf);
  }

  // input block: dh = dh_0 (overwritten); z_0 once more into free_buf
  void input_backward(float* dh, float* free_buf) {
    compute_z0(free_buf);
    RowNormBwd r;
    r.n = n, r.d = D;
    r.dy = dh;
    r.z = free_buf;
    r.ln = cfg.use_ln;
    r.gamma = P(ln_in_g), r.beta = P(ln_in_b), r.eps = kLayerNormEps;
    r.dgamma = G(ln_in_g), r.dbeta = G(ln_in_b);
    r.relu = true;
    r.drop_p = drop_p(fwd_training);
    r.seed = seed.data();
    r.salt = 0;
    r.out1 = dh, r.s1 = 1.0f;
    row_norm_bwd(ctx, r);
    if (!sparse_in) {
      linear_bwd(ctx, x.data(), n, cfg.in_features, P(fc_in_w), D, dh, nullptr, 0.0f, G(fc_in_w), G(fc_in_b));
    } else {
      spmm(ctx, xst.view, dh, D, D, dw_in_t.data(), D, 1.0f, 0.0f);
      add_transposed(ctx, G(fc_in_w), D, cfg.in_features, dw_in_t.data());
      colsum(ctx, dh, n, D, D, G(fc_in_b), 1.0f);
    }
  }

  void zero_grad_body() { DFM_CUDA_CHECK(cudaMemsetAsync(grads.data(), 0, nparams * sizeof(float), ctx.stream())); }

  void adam_body(const AdamHyper& hp) {
    ::dfm::cuda::adam_step(ctx, params.data(), grads.data(), adam_m.data(), adam_v.data(), nparams, hp, adam_state.data());
  }

  void step_body(const AdamHyper& hp) {
    zero_grad_body();
    forward_body(true);
    loss_body();
    backward_body();
    adam_body(hp);
  }

  float read_loss() {
    float l = 0.0f;
    loss.download(&l, 1);
    return l;
  }

  void train_step(std::uint64_t s, const AdamOptions& ao) {
    const AdamHyper hp{ao.lr, ao.beta1, ao.beta2, ao.eps, ao.weight_decay};
    set_device_u64(ctx, seed.data(), s);
    const bool same_hyper = std::memcmp(&hp, &graph_hyper, sizeof hp) == 0;
    if (graph_exec && same_hyper) {
      DFM_CUDA_CHECK(cudaGraphLaunch(graph_exec, ctx.stream()));
      fwd_done = true, bwd_ready = false, fwd_training = true;
      return;
    }
    if (!opt.cuda_graph || graph_failed || eager_steps == 0) {  // the first step sizes the scratch arena
      step_body(hp);
      ++eager_steps;
      return;
    }
    drop_graph();
    try {
      ctx.sync();
      DFM_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
      try {
        step_body(hp);
      } catch (...) {
        cudaGraph_t broken = nullptr;
        cudaStreamEndCapture(ctx.stream(), &broken);
        if (broken) cudaGraphDestroy(broken);
        throw;
      }
      DFM_CUDA_CHECK(cudaStreamEndCapture(ctx.stream(), &graph));
      DFM_CUDA_CHECK(cudaGraphInstantiate(&graph_exec, graph, 0));
      graph_hyper = hp;
    } catch (const Error& e) {
      std::fprintf(stderr, "note: CUDA graph capture failed, running eagerly: %s\n", e.what());
      cudaGetLastError();
      drop_graph();
      graph_failed = true;
      step_body(hp);
      return;
    }
    DFM_CUDA_CHECK(cudaGraphLaunch(graph_exec, ctx.stream()));
    fwd_done = true, bwd_ready = false, fwd_training = true;
  }
};

// ---- public API ------------------------------------------------------------------------------------
Model::Model(const ModelConfig& cfg, const DeviceOptions& opt) {
  require();
  impl_ = std::make_unique<Impl>(cfg, opt);
}
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

const ModelConfig& Model::config() const { return impl_->cfg; }

void Model::upload_params(const ParamStore& p) {
  DFM_CHECK(p.total() == impl_->nparams, "upload_params: ", p.total(), " values, the model has ", impl_->nparams);
  impl_->params.upload(p.values);
  impl_->reset_optimizer();
}

void Model::download_params(ParamStore& p) const {
  DFM_CHECK(p.total() == impl_->nparams, "download_params: ", p.total(), " values, the model has ", impl_->nparams);
  impl_->params.download(p.values.data(), p.values.size());
  impl_->grads.download(p.grads.data(), p.grads.size());
}

void Model::set_input(const ModelInput& in) { impl_->set_input(in); }

void Model::set_labels(const std::vector<std::int64_t>& y) {
  Impl& m = *impl_;
  DFM_CHECK(static_cast<Index>(y.size()) == m.n, "labels: ", y.size(), " values for ", m.n, " rows (set_input first)");
  std::vector<std::int32_t> y32(y.size());
  for (std::size_t i = 0; i < y.size(); ++i) {
    DFM_CHECK(y[i] >= 0 && y[i] < m.C, "labels: row ", i, " has class ", y[i], ", expected 0 .. ", m.C - 1);
    y32[i] = static_cast<std::int32_t>(y[i]);
  }
  m.labels = DeviceBuffer<std::int32_t>(m.ctx, std::max<std::size_t>(y32.size(), 1));
  m.labels.upload(y32);
  m.has_labels = true;
  m.drop_graph();
}

void Model::set_train_index(const std::vector<std::int64_t>& idx) {
  Impl& m = *impl_;
  m.drop_graph();
  m.idx.reset();
  m.dlogits.reset();
  m.idx_count = static_cast<Index>(idx.size());
  if (idx.empty()) return;
  std::vector<std::int32_t> i32(idx.size());
  for (std::size_t i = 0; i < idx.size(); ++i) {
    DFM_CHECK(idx[i] >= 0 && idx[i] < m.n, "train index: ", idx[i], " is out of range for ", m.n, " rows");
    i32[i] = static_cast<std::int32_t>(idx[i]);
  }
  m.idx = DeviceBuffer<std::int32_t>(m.ctx, i32.size());
  m.idx.upload(i32);
  m.dlogits = DeviceBuffer<float>(m.ctx, static_cast<std::size_t>(std::max<Index>(m.n * m.C, 1)));
}

void Model::forward(bool training, std::uint64_t dropout_seed) {
  set_device_u64(impl_->ctx, impl_->seed.data(), dropout_seed);
  impl_->forward_body(training);
}

void Model::download_logits(Mat& out) const {
  Impl& m = *impl_;
  out.resize(m.n, m.C);
  m.logits.download(out.data(), static_cast<std::size_t>(out.size()));
}

void Model::download_hidden(std::vector<Mat>& hidden) {
  Impl& m = *impl_;
  DFM_CHECK(m.fwd_done, "download_hidden: no forward yet");
  DeviceBuffer<float> tmp(m.ctx, static_cast<std::size_t>(std::max<Index>(m.n * m.D, 1)));
  DeviceBuffer<float> z0(m.ctx, static_cast<std::size_t>(std::max<Index>(m.n * m.D, 1)));
  m.compute_z0(z0.data());
  hidden.assign(static_cast<std::size_t>(m.cfg.layers) + 1, Mat());
  for (int j = 0; j <= m.cfg.layers; ++j) {
    row_norm_fwd(m.ctx, m.hidden_norm(j, m.fwd_training, j == 0 ? z0.data() : m.z[j].data(), tmp.data()));
    hidden[j].resize(m.n, m.D);
    tmp.download(hidden[j].data(), static_cast<std::size_t>(hidden[j].size()));
  }
}

float Model::loss_and_dlogits() {
  impl_->loss_body();
  return impl_->read_loss();
}

void Model::zero_grad() { impl_->zero_grad_body(); }
void Model::backward() { impl_->backward_body(); }
void Model::adam_step(const AdamOptions& o) { impl_->adam_body(AdamHyper{o.lr, o.beta1, o.beta2, o.eps, o.weight_decay}); }

float Model::train_step(std::uint64_t dropout_seed, const AdamOptions& opt, bool read_loss) {
  impl_->train_step(dropout_seed, opt);
  return read_loss ? impl_->read_loss() : std::nanf("");
}

bool Model::graph_captured() const { return impl_->graph_exec != nullptr; }
void Model::synchronize() const { impl_->ctx.sync(); }
std::int64_t Model::peak_device_bytes() const { return impl_->ctx.allocator().peak_bytes(); }
std::int64_t Model::current_device_bytes() const { return impl_->ctx.allocator().current_bytes(); }
void Model::reset_peak_device_bytes() { impl_->ctx.allocator().reset_peak(); }

std::string Model::device_name() const { return describe(); }

}  // namespace dfm::cuda
