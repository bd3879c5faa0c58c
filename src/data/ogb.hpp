// Large node datasets (SPEC.md section 3, "Large graphs"): the in-memory form the mini-batch and
// full-graph drivers use, and its two readers:
//   * a .npz reader that streams each member straight into its final array (no whole-file copy:
//     a 1.6M-node, 30M-edge graph loads in about its own size), for the SPEC.md section 4 layout
//     with multi-label y [N, T] and unlabeled class rows (y = -1) allowed;
//   * the OGB raw directory layout read directly with zlib: raw/edge.csv.gz, raw/node-feat.csv.gz,
//     raw/node-label.csv.gz, optional raw/edge-feat.csv.gz and raw/num-node-list.csv.gz, and
//     split/<name>/{train,valid,test}.csv.gz. Without node-feat (ogbn-proteins) node features are
//     the mean of the features of each node's incoming edges (edge_index[1] == node), as the
//     official pipeline does (torch_sparse mean over adj_t rows; no incoming edge -> zeros).
// The graph is kept once, as CSR by target with int32 sources (12 bytes per edge with the cached
// normalisation). Also here: a streaming .npz writer (libzip fragments over the caller's arrays:
// no image copies), used by `difformer synth`.
// Not here: the citation-protocol Dataset of data/dataset.hpp (small graphs, dense y only).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.hpp"
#include "data/dataset.hpp"
#include "ops/ops.hpp"

namespace dfm {

// Directed graph stored by target, once: op.adj row i lists the edges j -> i (input order within
// a row) with the NORMALISED values w_ij / sqrt(d_i d_j) of the whole graph, so that `op` is the
// full-graph operator evaluation uses as it is (op.adj_t stays empty); `weight` keeps the raw
// edge weights in the same order (empty = unweighted), which chunk operators renormalise.
struct NodeGraph {
  GraphOp op;
  std::vector<float> weight;
  const Csr& adj() const { return op.adj; }
  bool weighted() const { return !weight.empty(); }
  Index nodes() const { return op.adj.rows; }
  Index edges() const { return op.adj.nnz(); }
};

// Targets of a node task: class labels (y, -1 = unlabeled) or multi-label 0/1 values [N, T]
// (NaN = unlabeled entry).
struct NodeTargets {
  bool multilabel = false;
  std::vector<std::int64_t> y;
  Index classes = 0;
  Mat ym;
  Index rows() const { return multilabel ? ym.rows() : static_cast<Index>(y.size()); }
  Index outputs() const { return multilabel ? ym.cols() : classes; }
  bool labelled(Index i) const;  // class >= 0, or any non-NaN task
  // Rows `nodes` (global ids) in order.
  NodeTargets gather(const std::vector<std::int64_t>& nodes) const;
};

struct LargeDataset {
  std::string path;  // the .npz file or the OGB directory
  Index n = 0, features = 0;
  Mat x;  // [N, F]
  NodeTargets targets;
  NodeGraph graph;
  // The file's own split(s): npz train_idx/val_idx/test_idx (1-D, or [R, n] with one row per
  // run), or the OGB split directory. Empty when there is none.
  std::vector<Split> file_splits;
  std::string file_split_name;
};

struct GraphPrep {
  bool undirected = false;  // add reversed edges, then drop duplicates (torch_geometric to_undirected)
  bool self_loops = true;   // remove self-loops, then append one per node (remove/add_self_loops)
};

// .npz (SPEC.md section 4): x float32/float64 [N, F]; y int [N] (classes, negative = unlabeled) or
// numeric [N, T] with 0/1 (multi-label, NaN = unlabeled); optional edge_index int64/int32 [2, E],
// edge_weight [E], train_idx/val_idx/test_idx.
LargeDataset load_large_npz(const std::string& path, const GraphPrep& prep);
// OGB raw directory (see the file comment). split_name: the directory under split/ ("" = the
// only one there, none = no split).
LargeDataset load_ogb_dir(const std::string& dir, const GraphPrep& prep, const std::string& split_name = "");
// Either, by what `path` is.
LargeDataset load_large_dataset(const std::string& path, const GraphPrep& prep, const std::string& ogb_split = "");

// Builds the CSR-by-target graph from an edge list (sources src[e] -> targets dst[e]), applying prep.
// weight may be empty. `what` names the input in errors.
NodeGraph build_node_graph(Index n, const std::vector<std::int32_t>& src, const std::vector<std::int32_t>& dst,
                           const std::vector<float>& weight, const GraphPrep& prep, const std::string& what);

// Normalised values w_ij / sqrt(d_i d_j) (d = in-degree = row length, edge weights not counted,
// non-finite set to 0) for every entry of a by-target CSR structure, in its order (SPEC.md
// section 1; the same numbers as make_graph_op). weight may be empty (all 1).
std::vector<float> normalised_values(const Csr& structure, const std::vector<float>& weight);
// A copy of the whole graph's operator with its transpose (full-graph training needs adj_t).
GraphOp full_graph_op(const NodeGraph& g);

// Random ratio split over the labelled nodes (rand_train_test_idx of the official code): a
// permutation, the first floor(n_l * train) for training, the next floor(n_l * val) for validation,
// the rest for testing. Deterministic in the seed.
Split ratio_split(const NodeTargets& t, double train, double val, std::uint64_t seed);

// ---- streaming .npz ------------------------------------------------------------------------
// One array to write: dtype string ("<f4", "<i8"), shape, and its bytes as one or more fragments
// (concatenated in C order). The fragments are read in place and must outlive the call.
struct NpzOutArray {
  std::string name, descr;
  std::vector<Index> shape;
  std::vector<std::pair<const void*, std::size_t>> fragments;
};
// Writes PATH.tmp then renames (a failure never leaves a partial PATH). Members are stored
// (compress = false, the fast default for big synthetic graphs) or deflated.
void write_npz_streaming(const std::string& path, const std::vector<NpzOutArray>& arrays, bool compress);

}  // namespace dfm
