#include "data/dataset.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "core/error.hpp"
#include "data/npz.hpp"

namespace dfm {

namespace {
const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::i32: return "int32";
    case DType::i64: return "int64";
    case DType::u8: return "uint8";
    case DType::b1: return "bool";
    case DType::unicode: return "unicode";
  }
  return "?";
}

std::string shape_str(const std::vector<Index>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void expect(const NpyArray& a, const std::string& what, DType t, size_t ndim) {
  DFM_CHECK(a.dtype == t, what, ": dtype ", dtype_name(a.dtype), ", expected ", dtype_name(t));
  DFM_CHECK(a.shape.size() == ndim, what, ": shape ", shape_str(a.shape), ", expected ", ndim, " dimensions");
}

std::vector<std::int64_t> read_index(const Npz& z, const std::string& name, Index nodes) {
  const std::string what = z.path + ": " + name;
  const NpyArray& a = z.at(name);
  expect(a, what, DType::i64, 1);
  auto idx = a.to_i64(what);
  for (auto i : idx) DFM_CHECK(i >= 0 && i < nodes, what, ": index ", i, " out of range [0, ", nodes, ")");
  return idx;
}
}  // namespace

Dataset load_node_dataset(const std::string& path) {
  const Npz z = read_npz(path);
  Dataset d;
  d.path = path;
  const NpyArray& x = z.at("x");
  expect(x, path + ": x", DType::f32, 2);
  d.x = x.to_mat(path + ": x");
  d.n = d.x.rows();
  d.features = d.x.cols();
  DFM_CHECK(d.n > 0 && d.features > 0, path, ": x is empty (shape ", shape_str(x.shape), ")");
  DFM_CHECK(d.x.allFinite(), path, ": x contains NaN or infinite values");

  const NpyArray& y = z.at("y");
  expect(y, path + ": y", DType::i64, 1);
  DFM_CHECK(y.dim(0) == d.n, path, ": y has ", y.dim(0), " labels, expected one per row of x (", d.n, ")");
  d.y = y.to_i64(path + ": y");
  const auto [lo, hi] = std::minmax_element(d.y.begin(), d.y.end());
  DFM_CHECK(*lo >= 0, path, ": y has a negative label (", *lo, ")");
  d.classes = *hi + 1;

  if (z.has("edge_index")) {
    const NpyArray& ei = z.at("edge_index");
    expect(ei, path + ": edge_index", DType::i64, 2);
    DFM_CHECK(ei.dim(0) == 2, path, ": edge_index has shape ", shape_str(ei.shape), ", expected [2, E]");
    const auto e = ei.to_i64(path + ": edge_index");
    const Index count = ei.dim(1);
    d.src.assign(e.begin(), e.begin() + count);
    d.dst.assign(e.begin() + count, e.end());
    for (Index k = 0; k < count; ++k)
      DFM_CHECK(d.src[k] >= 0 && d.src[k] < d.n && d.dst[k] >= 0 && d.dst[k] < d.n, path, ": edge_index column ", k,
                " = (", d.src[k], ", ", d.dst[k], ") is out of range for ", d.n, " nodes");
    d.graph_in_file = true;
    if (z.has("edge_weight")) {
      const NpyArray& w = z.at("edge_weight");
      expect(w, path + ": edge_weight", DType::f32, 1);
      DFM_CHECK(w.dim(0) == count, path, ": edge_weight has ", w.dim(0), " entries, expected one per edge (", count,
                ")");
      d.edge_weight = w.to_f32(path + ": edge_weight");
      for (float v : d.edge_weight) DFM_CHECK(std::isfinite(v), path, ": edge_weight contains NaN or inf");
    }
  }
  if (z.has("train_idx")) d.train_idx = read_index(z, "train_idx", d.n);
  if (z.has("val_idx")) d.val_idx = read_index(z, "val_idx", d.n);
  if (z.has("test_idx")) d.test_idx = read_index(z, "test_idx", d.n);
  return d;
}

void row_normalise(Dataset& d) {
  DFM_ASSERT(!d.sparse);
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < d.n; ++i) {
    const float s = d.x.row(i).sum();
    if (s != 0.0f) d.x.row(i) /= s;
  }
}

void citation_graph(Dataset& d) {
  std::vector<std::pair<std::int64_t, std::int64_t>> pairs;
  pairs.reserve(2 * d.src.size() + static_cast<size_t>(d.n));
  for (size_t e = 0; e < d.src.size(); ++e) {
    if (d.src[e] == d.dst[e]) continue;
    pairs.emplace_back(d.src[e], d.dst[e]);
    pairs.emplace_back(d.dst[e], d.src[e]);
  }
  std::sort(pairs.begin(), pairs.end());
  pairs.erase(std::unique(pairs.begin(), pairs.end()), pairs.end());
  d.src.clear();
  d.dst.clear();
  for (auto& [s, t] : pairs) {
    d.src.push_back(s);
    d.dst.push_back(t);
  }
  for (Index i = 0; i < d.n; ++i) {  // appended at the end, as add_self_loops does
    d.src.push_back(i);
    d.dst.push_back(i);
  }
  d.edge_weight.clear();
}

void choose_feature_layout(Dataset& d, double max_density) {
  if (d.sparse) return;
  Index nnz = 0;
  for (Index i = 0; i < d.x.size(); ++i) nnz += d.x.data()[i] != 0.0f;
  if (static_cast<double>(nnz) > max_density * static_cast<double>(d.x.size())) return;
  Csr& c = d.xs;
  c.rows = d.n;
  c.cols = d.features;
  c.indptr.assign(1, 0);
  c.indices.reserve(static_cast<size_t>(nnz));
  c.values.reserve(static_cast<size_t>(nnz));
  for (Index i = 0; i < d.n; ++i) {
    for (Index j = 0; j < d.features; ++j)
      if (d.x(i, j) != 0.0f) {
        c.indices.push_back(static_cast<std::int32_t>(j));
        c.values.push_back(d.x(i, j));
      }
    c.indptr.push_back(static_cast<Index>(c.indices.size()));
  }
  d.xs_t = csr_transpose(c);
  d.sparse = true;
  d.x.resize(0, 0);
}

Split random_per_class_split(const std::vector<std::int64_t>& y, Index classes, Index per_class, Index val,
                             Index test, std::uint64_t seed) {
  const Index n = static_cast<Index>(y.size());
  std::mt19937_64 rng(seed);
  std::vector<std::int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  Split s;
  std::vector<Index> taken(static_cast<size_t>(classes), 0);
  std::vector<std::int64_t> rest;
  for (auto i : perm) {
    if (taken[y[i]] < per_class) {
      ++taken[y[i]];
      s.train.push_back(i);
    } else {
      rest.push_back(i);
    }
  }
  for (Index c = 0; c < classes; ++c)
    DFM_CHECK(taken[c] == per_class || taken[c] == 0, "split: class ", c, " has only ", taken[c],
              " nodes, fewer than the ", per_class, " training nodes per class asked for");
  std::shuffle(rest.begin(), rest.end(), rng);
  DFM_CHECK(static_cast<Index>(rest.size()) > val, "split: ", rest.size(), " nodes remain after the training nodes, not enough for ",
            val, " validation nodes and a test set");
  s.val.assign(rest.begin(), rest.begin() + val);
  const Index avail = static_cast<Index>(rest.size()) - val;
  const Index t = test < 0 ? avail : std::min(test, avail);
  s.test.assign(rest.begin() + val, rest.begin() + val + t);
  std::sort(s.train.begin(), s.train.end());
  return s;
}

Split load_split_file(const std::string& path, int run, Index nodes) {
  const Npz z = read_npz(path);
  Split s;
  auto row = [&](const char* name) {
    const std::string what = path + ": " + name;
    const NpyArray& a = z.at(name);
    expect(a, what, DType::i64, 2);
    DFM_CHECK(run >= 0 && run < a.dim(0), what, " has ", a.dim(0), " rows (one split per run), run ", run,
              " asked for; --first-run + --runs must be <= ", a.dim(0));
    const auto all = a.to_i64(what);
    const Index w = a.dim(1);
    return std::vector<std::int64_t>(all.begin() + run * w, all.begin() + (run + 1) * w);
  };
  s.train = row("train_idx");
  s.val = row("val_idx");
  s.test = row("test_idx");
  validate_split(s, nodes, path);
  return s;
}

Split file_split(const Dataset& d) {
  DFM_CHECK(!d.train_idx.empty() && !d.val_idx.empty() && !d.test_idx.empty(), d.path,
            ": --split public needs train_idx, val_idx and test_idx in the file");
  Split s{d.train_idx, d.val_idx, d.test_idx};
  validate_split(s, d.n, d.path);
  return s;
}

void validate_split(const Split& s, Index nodes, const std::string& what) {
  DFM_CHECK(!s.train.empty(), what, ": empty training set");
  DFM_CHECK(!s.val.empty(), what, ": empty validation set");
  DFM_CHECK(!s.test.empty(), what, ": empty test set");
  std::vector<std::uint8_t> seen(static_cast<size_t>(nodes), 0);
  const std::vector<std::int64_t>* parts[] = {&s.train, &s.val, &s.test};
  const char* names[] = {"train", "val", "test"};
  for (int p = 0; p < 3; ++p)
    for (auto i : *parts[p]) {
      DFM_CHECK(i >= 0 && i < nodes, what, ": ", names[p], " index ", i, " out of range [0, ", nodes, ")");
      DFM_CHECK(!(seen[i] & ~(1u << p)), what, ": node ", i, " is in more than one of train/val/test");
      seen[i] |= static_cast<std::uint8_t>(1u << p);
    }
}

GraphOp graph_operator(const Dataset& d) {
  return make_graph_op<float>(d.n, d.src, d.dst, d.edge_weight.empty() ? nullptr : &d.edge_weight);
}

}  // namespace dfm
