#include "train/minibatch.hpp"

#include <chrono>
#include <cmath>
#include <numeric>

#include "core/error.hpp"

namespace dfm {

namespace {
std::uint64_t next_state(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
// Uniform in [0, bound): Lemire's multiply with rejection, exact.
std::uint64_t bounded(std::uint64_t& state, std::uint64_t bound) {
  for (;;) {
    const unsigned __int128 m = static_cast<unsigned __int128>(next_state(state)) * bound;
    const std::uint64_t lo = static_cast<std::uint64_t>(m);
    if (lo >= bound || lo >= (-bound) % bound) return static_cast<std::uint64_t>(m >> 64);
  }
}
std::uint64_t step_seed(std::uint64_t seed, int epoch, Index chunk) {
  std::uint64_t s = seed ^ 0x2545f4914f6cdd1dULL;
  s += static_cast<std::uint64_t>(epoch) * 0x9e3779b97f4a7c15ULL;
  next_state(s);
  s += static_cast<std::uint64_t>(chunk) * 0xd1342543de82ef95ULL;
  return next_state(s);
}
}  // namespace

std::vector<std::int64_t> epoch_permutation(Index n, std::uint64_t seed, std::uint64_t epoch) {
  std::vector<std::int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  // state = seed * golden + epoch: distinct streams per (seed, epoch)
  std::uint64_t state = seed * 0x9e3779b97f4a7c15ULL + epoch * 0xbf58476d1ce4e5b9ULL + 0x632be59bd9b4e019ULL;
  for (Index i = n - 1; i > 0; --i) {
    const auto j = static_cast<Index>(bounded(state, static_cast<std::uint64_t>(i) + 1));
    std::swap(p[i], p[j]);
  }
  return p;
}

Partitioner::Partitioner(const NodeGraph& g) : g_(g), pos_(static_cast<size_t>(g.nodes()), -1) {}

void Partitioner::induce(const std::int64_t* nodes, Index count, Chunk& out) {
  const Csr& a = g_.adj();
  const Index n = g_.nodes();
  out.nodes.assign(nodes, nodes + count);
  for (Index p = 0; p < count; ++p) {
    const auto v = nodes[p];
    DFM_CHECK(v >= 0 && v < n, "partition: node ", v, " out of range [0, ", n, ")");
    DFM_CHECK(pos_[v] < 0, "partition: node ", v, " appears twice in a chunk");
    pos_[v] = static_cast<std::int32_t>(p);
  }
  // Count the kept in-edges of each position, then fill in order (parallel over targets).
  std::vector<Index> start(static_cast<size_t>(count) + 1, 0);
#pragma omp parallel for schedule(dynamic, 256) if (count > 4096)
  for (Index p = 0; p < count; ++p) {
    const auto i = nodes[p];
    Index k = 0;
    for (Index e = a.indptr[i]; e < a.indptr[i + 1]; ++e) k += pos_[a.indices[e]] >= 0;
    start[p + 1] = k;
  }
  for (Index p = 0; p < count; ++p) start[p + 1] += start[p];
  const size_t total = static_cast<size_t>(start[count]);
  out.src.resize(total);
  out.dst.resize(total);
  out.weight.resize(g_.weighted() ? total : 0);
#pragma omp parallel for schedule(dynamic, 256) if (count > 4096)
  for (Index p = 0; p < count; ++p) {
    const auto i = nodes[p];
    Index w = start[p];
    for (Index e = a.indptr[i]; e < a.indptr[i + 1]; ++e) {
      const std::int32_t q = pos_[a.indices[e]];
      if (q < 0) continue;
      out.src[w] = q;
      out.dst[w] = p;
      if (g_.weighted()) out.weight[w] = g_.weight[e];
      ++w;
    }
  }
  for (Index p = 0; p < count; ++p) pos_[nodes[p]] = -1;
}

std::vector<Chunk> partition(const NodeGraph& g, const std::vector<std::int64_t>& perm, Index batch) {
  DFM_CHECK(batch > 0, "partition: batch size must be positive (got ", batch, ")");
  DFM_CHECK(static_cast<Index>(perm.size()) == g.nodes(), "partition: permutation has ", perm.size(),
            " entries for ", g.nodes(), " nodes");
  Partitioner part(g);
  std::vector<Chunk> out;
  const Index n = g.nodes();
  for (Index lo = 0; lo < n; lo += batch) {
    out.emplace_back();
    part.induce(perm.data() + lo, std::min(batch, n - lo), out.back());
  }
  return out;
}

float node_loss(const Mat& logits, const NodeTargets& t, const std::vector<std::int64_t>& idx, Mat& dlogits) {
  return t.multilabel ? cpu::bce_with_logits(logits, t.ym, idx, dlogits) : cpu::cross_entropy(logits, t.y, idx, dlogits);
}

float train_step(DIFFormer& model, Adam& adam, const Mat& x, const GraphOp* graph, const NodeTargets& t,
                 const std::vector<std::int64_t>& train_rows, std::uint64_t dropout_seed, bool lean,
                 MinibatchWorkspace& ws) {
  const ModelConfig& cfg = model.config();
  model.params.zero_grad();
  auto loss_fn = [&](const Mat& logits, Mat& dlogits) { return node_loss(logits, t, train_rows, dlogits); };
  float loss;
  if (lean && lean_supported(cfg)) {
    loss = lean_forward_backward(model, x, cfg.use_graph ? graph : nullptr, true, dropout_seed, loss_fn, ws.lean);
  } else {
    ModelInput in;
    in.dense = &x;
    if (cfg.use_graph) in.graph = graph;
    model.forward(in, true, dropout_seed, &ws.state, ws.logits);
    loss = loss_fn(ws.logits, ws.dlogits);
    DFM_CHECK(std::isfinite(loss), "training diverged: loss is ", loss, " (try a smaller --lr)");
    model.backward(in, ws.state, ws.dlogits);
    ws.state = ForwardState{};  // release the activations between steps
  }
  adam.step(model.params);
  return loss;
}

EpochStats run_minibatch_epoch(const LargeDataset& d, const std::vector<std::uint8_t>& is_train, Index batch_size,
                               std::uint64_t seed, int epoch, bool use_graph, MinibatchWorkspace& ws,
                               const LargeStepFn& step) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  DFM_CHECK(batch_size >= 0, "--batch-size must be >= 0 (got ", batch_size, ")");
  DFM_CHECK(static_cast<Index>(is_train.size()) == d.n, "train mask has ", is_train.size(), " entries for ", d.n,
            " nodes");
  EpochStats st;
  double loss_sum = 0;
  if (batch_size == 0) {
    // Full-graph training: the whole graph, in node order, one step.
    if (use_graph && !ws.full_graph_ready) {
      ws.full_graph = full_graph_op(d.graph);
      ws.full_graph_ready = true;
    }
    std::vector<std::int64_t> rows;
    for (Index i = 0; i < d.n; ++i)
      if (is_train[i]) rows.push_back(i);
    if (rows.empty()) {
      st.skipped = 1;
    } else {
      st.loss = step(d.x, use_graph ? &ws.full_graph : nullptr, d.targets, rows, step_seed(seed, epoch, 0), true);
      st.steps = 1;
    }
    st.seconds = std::chrono::duration<double>(clock::now() - t0).count();
    return st;
  }
  const std::vector<std::int64_t> perm = epoch_permutation(d.n, seed, static_cast<std::uint64_t>(epoch));
  Partitioner part(d.graph);
  Chunk chunk;
  const Index chunks = (d.n + batch_size - 1) / batch_size;
  for (Index k = 0; k < chunks; ++k) {
    const Index lo = k * batch_size, m = std::min(batch_size, d.n - lo);
    const std::int64_t* nodes = perm.data() + lo;
    std::vector<std::int64_t> rows;
    for (Index p = 0; p < m; ++p)
      if (is_train[nodes[p]]) rows.push_back(p);
    if (rows.empty()) {
      ++st.skipped;
      continue;
    }
    GraphOp op;
    if (use_graph) {
      part.induce(nodes, m, chunk);
      op = make_graph_op<float>(m, chunk.src, chunk.dst, d.graph.weighted() ? &chunk.weight : nullptr);
      chunk.src = {};
      chunk.dst = {};
      chunk.weight = {};
    } else {
      chunk.nodes.assign(nodes, nodes + m);
    }
    ws.x.resize(m, d.features);
#pragma omp parallel for schedule(static) if (m > 4096)
    for (Index p = 0; p < m; ++p) ws.x.row(p) = d.x.row(nodes[p]);
    const NodeTargets t = d.targets.gather(chunk.nodes);
    loss_sum += step(ws.x, use_graph ? &op : nullptr, t, rows, step_seed(seed, epoch, k), false);
    ++st.steps;
  }
  st.loss = loss_sum / std::max(st.steps, 1);
  st.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  return st;
}

EpochStats train_minibatch_epoch(DIFFormer& model, Adam& adam, const LargeDataset& d,
                                 const std::vector<std::uint8_t>& is_train, Index batch_size, std::uint64_t seed,
                                 int epoch, bool lean, MinibatchWorkspace& ws) {
  auto cpu_step = [&](const Mat& x, const GraphOp* graph, const NodeTargets& t, const std::vector<std::int64_t>& rows,
                      std::uint64_t dropout_seed, bool) {
    return train_step(model, adam, x, graph, t, rows, dropout_seed, lean, ws);
  };
  return run_minibatch_epoch(d, is_train, batch_size, seed, epoch, model.config().use_graph, ws, cpu_step);
}

}  // namespace dfm
