// Node-level datasets read from .npz (SPEC.md section 4), validated on load, plus the citation
// preprocessing and the train/validation/test splits of SPEC.md section 3.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.hpp"
#include "ops/ops.hpp"

namespace dfm {

struct Dataset {
  std::string path;
  Index n = 0, features = 0;
  // Features: dense, or CSR (with its transpose) when mostly zeros; exactly one is used.
  bool sparse = false;
  Mat x;
  Csr xs, xs_t;
  std::vector<std::int64_t> y;  // class labels in [0, classes)
  Index classes = 0;
  // Directed edges src[e] -> dst[e]; weights empty when the file has none.
  std::vector<std::int64_t> src, dst;
  std::vector<float> edge_weight;
  bool has_graph() const { return !src.empty() || graph_in_file; }
  bool graph_in_file = false;
  // The file's own split, when present.
  std::vector<std::int64_t> train_idx, val_idx, test_idx;
  Index edges() const { return static_cast<Index>(src.size()); }
};

// Reads x float32 [N, F], y int64 [N], optional edge_index int64 [2, E], edge_weight float32 [E],
// train_idx / val_idx / test_idx int64. Every dtype, shape, index range and finiteness is checked;
// errors name the file, the array and what was expected.
Dataset load_node_dataset(const std::string& path);

// Divides each feature row by its sum (zero rows stay zero), as torch_geometric NormalizeFeatures.
void row_normalise(Dataset& d);
// Makes the graph undirected, removes self-loops and duplicates, then adds one self-loop per node
// (to_undirected, remove_self_loops, add_self_loops of the official pipeline). Drops weights.
void citation_graph(Dataset& d);
// Stores the features as CSR when at most `max_density` of them are non-zero, else dense.
void choose_feature_layout(Dataset& d, double max_density = 0.1);

struct Split {
  std::vector<std::int64_t> train, val, test;
};
// `per_class` random training nodes of every class; the rest shuffled: the first `val` for
// validation, the next `test` for testing (test < 0: all the rest). Deterministic in the seed.
Split random_per_class_split(const std::vector<std::int64_t>& y, Index classes, Index per_class, Index val,
                             Index test, std::uint64_t seed);
// Row `run` of the [R, n] arrays train_idx / val_idx / test_idx of a split file.
Split load_split_file(const std::string& path, int run, Index nodes);
// The file's own split; error when the dataset has none.
Split file_split(const Dataset& d);
// Checks indices are in range, non-empty and disjoint; `what` names the source in errors.
void validate_split(const Split& s, Index nodes, const std::string& what);

GraphOp graph_operator(const Dataset& d);

}  // namespace dfm
