#include "data/temporal_data.hpp"

#include <algorithm>
#include <cmath>

#include "core/error.hpp"
#include "data/npz.hpp"

namespace dfm {

namespace {

std::string shape_str(const std::vector<Index>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void expect_dtype(const NpyArray& a, const std::string& what, DType t, const char* tname) {
  DFM_CHECK(a.dtype == t, what, ": dtype is not ", tname, " (descr '", a.descr(), "')");
}

std::vector<std::int64_t> read_snapshot_index(const Npz& z, const std::string& name, Index snapshots) {
  const std::string what = z.path + ": " + name;
  const NpyArray& a = z.at(name);
  expect_dtype(a, what, DType::i64, "int64");
  DFM_CHECK(a.shape.size() == 1, what, ": shape ", shape_str(a.shape), ", expected [n] snapshot indices");
  auto idx = a.to_i64(what);
  for (auto t : idx)
    DFM_CHECK(t >= 0 && t < snapshots, what, ": snapshot index ", t, " out of range [0, ", snapshots, ")");
  return idx;
}

}  // namespace

TemporalDataset load_temporal_dataset(const std::string& path) {
  const Npz z = read_npz(path);
  TemporalDataset d;
  d.path = path;
  const NpyArray& x = z.at("x");
  expect_dtype(x, path + ": x", DType::f32, "float32");
  DFM_CHECK(x.shape.size() == 3, path, ": x has shape ", shape_str(x.shape),
            ", expected 3 dimensions [T, N, L] (snapshots, nodes, lags) for a temporal dataset");
  d.snapshots = x.dim(0);
  d.nodes = x.dim(1);
  d.lags = x.dim(2);
  DFM_CHECK(d.snapshots > 0 && d.nodes > 0 && d.lags > 0, path, ": x is empty (shape ", shape_str(x.shape), ")");
  const std::vector<float> xv = x.to_f32(path + ": x");
  for (float v : xv) DFM_CHECK(std::isfinite(v), path, ": x contains NaN or infinite values");

  const NpyArray& y = z.at("y");
  expect_dtype(y, path + ": y", DType::f32, "float32");
  DFM_CHECK(y.shape.size() == 2 && y.dim(0) == d.snapshots && y.dim(1) == d.nodes, path, ": y has shape ",
            shape_str(y.shape), ", expected [T, N] = [", d.snapshots, ", ", d.nodes, "] (one target per node and snapshot)");
  const std::vector<float> yv = y.to_f32(path + ": y");
  for (float v : yv) DFM_CHECK(std::isfinite(v), path, ": y contains NaN or infinite values");

  const Index n = d.nodes, l = d.lags;
  d.x.resize(static_cast<size_t>(d.snapshots));
  d.y.resize(static_cast<size_t>(d.snapshots));
  for (Index t = 0; t < d.snapshots; ++t) {
    d.x[t] = ConstMatMap(xv.data() + t * n * l, n, l);
    d.y[t] = ConstMatMap(yv.data() + t * n, n, 1);
  }

  if (z.has("edge_index")) {
    const NpyArray& ei = z.at("edge_index");
    expect_dtype(ei, path + ": edge_index", DType::i64, "int64");
    DFM_CHECK(ei.shape.size() == 2 && ei.dim(0) == 2, path, ": edge_index has shape ", shape_str(ei.shape),
              ", expected [2, E]");
    const auto e = ei.to_i64(path + ": edge_index");
    const Index count = ei.dim(1);
    d.src.assign(e.begin(), e.begin() + count);
    d.dst.assign(e.begin() + count, e.end());
    for (Index k = 0; k < count; ++k)
      DFM_CHECK(d.src[k] >= 0 && d.src[k] < n && d.dst[k] >= 0 && d.dst[k] < n, path, ": edge_index column ", k,
                " = (", d.src[k], ", ", d.dst[k], ") is out of range for ", n, " nodes");
    d.graph_in_file = true;
    if (z.has("edge_weight")) {
      const NpyArray& w = z.at("edge_weight");
      expect_dtype(w, path + ": edge_weight", DType::f32, "float32");
      DFM_CHECK(w.shape.size() == 1 && w.dim(0) == count, path, ": edge_weight has shape ", shape_str(w.shape),
                ", expected [E] = [", count, "] (one weight per edge)");
      d.edge_weight = w.to_f32(path + ": edge_weight");
      for (float v : d.edge_weight) DFM_CHECK(std::isfinite(v), path, ": edge_weight contains NaN or inf");
    }
    if (z.has("edge_ptr")) {
      const NpyArray& p = z.at("edge_ptr");
      expect_dtype(p, path + ": edge_ptr", DType::i64, "int64");
      DFM_CHECK(p.shape.size() == 1 && p.dim(0) == d.snapshots + 1, path, ": edge_ptr has shape ",
                shape_str(p.shape), ", expected [T+1] = [", d.snapshots + 1,
                "] (snapshot t owns edges edge_ptr[t] .. edge_ptr[t+1]-1)");
      d.edge_ptr = p.to_i64(path + ": edge_ptr");
      DFM_CHECK(d.edge_ptr.front() == 0, path, ": edge_ptr[0] is ", d.edge_ptr.front(), ", expected 0");
      for (Index t = 0; t < d.snapshots; ++t)
        DFM_CHECK(d.edge_ptr[t] <= d.edge_ptr[t + 1], path, ": edge_ptr is not monotone: edge_ptr[", t, "] = ",
                  d.edge_ptr[t], " > edge_ptr[", t + 1, "] = ", d.edge_ptr[t + 1]);
      DFM_CHECK(d.edge_ptr.back() == count, path, ": edge_ptr[T] is ", d.edge_ptr.back(),
                ", expected the number of edges E = ", count);
    }
  } else {
    DFM_CHECK(!z.has("edge_ptr"), path, ": edge_ptr without edge_index");
    DFM_CHECK(!z.has("edge_weight"), path, ": edge_weight without edge_index");
  }
  if (z.has("train_idx")) d.train_idx = read_snapshot_index(z, "train_idx", d.snapshots);
  if (z.has("val_idx")) d.val_idx = read_snapshot_index(z, "val_idx", d.snapshots);
  if (z.has("test_idx")) d.test_idx = read_snapshot_index(z, "test_idx", d.snapshots);
  return d;
}

void validate_temporal_split(const TemporalSplit& s, Index snapshots, const std::string& what) {
  DFM_CHECK(!s.train.empty(), what, ": empty training set (no training snapshots)");
  DFM_CHECK(!s.val.empty(), what, ": empty validation set (no validation snapshots)");
  DFM_CHECK(!s.test.empty(), what, ": empty test set (no test snapshots)");
  std::vector<std::uint8_t> seen(static_cast<size_t>(snapshots), 0);
  const std::vector<std::int64_t>* parts[] = {&s.train, &s.val, &s.test};
  const char* names[] = {"train", "val", "test"};
  for (int p = 0; p < 3; ++p)
    for (auto t : *parts[p]) {
      DFM_CHECK(t >= 0 && t < snapshots, what, ": ", names[p], " snapshot ", t, " out of range [0, ", snapshots, ")");
      DFM_CHECK(!seen[t], what, ": snapshot ", t, " is listed twice in train/val/test");
      seen[t] = 1;
    }
}

TemporalSplit temporal_split(const TemporalDataset& d) {
  TemporalSplit s;
  const bool any = !d.train_idx.empty() || !d.val_idx.empty() || !d.test_idx.empty();
  if (any) {
    s = {d.train_idx, d.val_idx, d.test_idx};
    validate_temporal_split(s, d.snapshots, d.path + " (train_idx/val_idx/test_idx)");
    return s;
  }
  // temporal_signal_split(train_ratio=0.2), then the rest with ratio 0.2 / (1 - 0.2).
  const Index T = d.snapshots;
  const Index n_train = static_cast<Index>(0.2 * static_cast<double>(T));
  const Index n_val = static_cast<Index>(0.25 * static_cast<double>(T - n_train));
  for (Index t = 0; t < T; ++t) (t < n_train ? s.train : t < n_train + n_val ? s.val : s.test).push_back(t);
  validate_temporal_split(s, T, d.path + " (chronological 20/20/60 split of " + std::to_string(T) + " snapshots)");
  return s;
}

void snapshot_edges(const TemporalDataset& d, Index t, std::vector<std::int64_t>& src, std::vector<std::int64_t>& dst,
                    std::vector<float>& weight) {
  const Index a = d.dynamic() ? d.edge_ptr[t] : 0;
  const Index b = d.dynamic() ? d.edge_ptr[t + 1] : static_cast<Index>(d.src.size());
  src.assign(d.src.begin() + a, d.src.begin() + b);
  dst.assign(d.dst.begin() + a, d.dst.begin() + b);
  if (d.edge_weight.empty())
    weight.clear();
  else
    weight.assign(d.edge_weight.begin() + a, d.edge_weight.begin() + b);
}

SnapshotGraphs snapshot_graphs(const TemporalDataset& d) {
  SnapshotGraphs g;
  if (!d.graph_in_file) return g;
  g.dynamic = d.dynamic();
  const Index count = g.dynamic ? d.snapshots : 1;
  g.ops.resize(static_cast<size_t>(count));
  std::vector<std::int64_t> src, dst;
  std::vector<float> w;
  for (Index t = 0; t < count; ++t) {
    snapshot_edges(d, t, src, dst, w);
    g.ops[t] = make_graph_op<float>(d.nodes, src, dst, w.empty() ? nullptr : &w);
  }
  return g;
}

std::string detect_task(const std::string& path) {
  const Npz z = read_npz(path);
  const NpyArray& x = z.at("x");
  if (x.shape.size() == 3) return "temporal";
  DFM_CHECK(x.shape.size() == 2, path, ": x has shape ", shape_str(x.shape),
            ", expected [N, F] (node / instance data) or [T, N, L] (temporal data)");
  return z.has("edge_index") ? "node" : "instance";
}

}  // namespace dfm
