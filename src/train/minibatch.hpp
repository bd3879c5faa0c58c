// Mini-batch training on large graphs exactly as SPEC.md section 3 (and the official
// main-batch.py): every epoch a random permutation of ALL nodes, cut into consecutive chunks of B
// (the last one shorter); per chunk the induced subgraph, its nodes relabelled by their POSITION
// in the chunk (not by sorted id); the whole model run on the chunk alone (graph normalisation,
// degrees, global attention sums all chunk-local); the loss on the chunk's training nodes; one
// Adam step per chunk. A chunk without training nodes is skipped (no step, no NaN).
//
// The permutation is a Fisher-Yates shuffle (i = n-1 .. 1, j uniform in [0, i]) driven by
// splitmix64 with Lemire's exact bounded draw, so it is the same on every platform;
// scripts/np_partition_reference.py recomputes the partition from a stored permutation with
// NumPy and tests/test_minibatch.cpp compares.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "data/ogb.hpp"
#include "model/difformer.hpp"
#include "train/adam.hpp"
#include "train/large.hpp"

namespace dfm {

std::vector<std::int64_t> epoch_permutation(Index n, std::uint64_t seed, std::uint64_t epoch);

// One chunk: its nodes (global ids, row p of the chunk = nodes[p]) and the edges of the induced
// subgraph relabelled to positions. Edge order: by target position, then the graph's own order
// within a target (its input order, self-loop last) -- i.e. torch_geometric's
// subgraph(nodes, edge_index, relabel_nodes=True) stably sorted by target; the graph operator
// built from either order is identical.
struct Chunk {
  std::vector<std::int64_t> nodes;
  std::vector<std::int64_t> src, dst;
  std::vector<float> weight;  // raw edge weights, empty when the graph is unweighted
  Index size() const { return static_cast<Index>(nodes.size()); }
};

class Partitioner {
 public:
  explicit Partitioner(const NodeGraph& g);
  // The induced subgraph on nodes[0..count) (distinct ids).
  void induce(const std::int64_t* nodes, Index count, Chunk& out);

 private:
  const NodeGraph& g_;
  std::vector<std::int32_t> pos_;  // global id -> position in the current chunk, -1 elsewhere
};

// All chunks of one permutation (for tests and inspection; training builds them one at a time).
std::vector<Chunk> partition(const NodeGraph& g, const std::vector<std::int64_t>& perm, Index batch);

// Loss of the node task over rows idx: cross-entropy (classes) or BCE with logits averaged over
// rows x tasks (multi-label).
float node_loss(const Mat& logits, const NodeTargets& t, const std::vector<std::int64_t>& idx, Mat& dlogits);

struct MinibatchWorkspace {
  LeanWorkspace lean;
  ForwardState state;  // model path
  Mat logits, dlogits, x;
  GraphOp full_graph;  // batch 0: the whole graph's operator (with transpose), built once
  bool full_graph_ready = false;
};

struct EpochStats {
  double loss = 0;  // mean over the steps taken
  int steps = 0, skipped = 0;
  double seconds = 0;
};

// One optimiser step on a node set: its features x, graph operator (with transpose; null without
// the graph term), the targets of its rows, the training rows, the dropout seed; full is true when
// the set is the whole graph in node order (the same input every epoch, so a device backend may
// keep it resident). Returns the loss.
using LargeStepFn = std::function<float(const Mat& x, const GraphOp* graph, const NodeTargets& t,
                                        const std::vector<std::int64_t>& rows, std::uint64_t dropout_seed, bool full)>;

// The epoch protocol (permutation, chunks, induced subgraphs, skipped chunks, step seeds) over any
// step function: the CPU step below and the GPU step of train_large_run share it.
EpochStats run_minibatch_epoch(const LargeDataset& d, const std::vector<std::uint8_t>& is_train, Index batch_size,
                               std::uint64_t seed, int epoch, bool use_graph, MinibatchWorkspace& ws,
                               const LargeStepFn& step);

// One epoch. batch_size 0: one step on the whole graph (no permutation, no partitioning).
// is_train[i] != 0 marks training nodes. lean: the memory-lean path where it applies.
EpochStats train_minibatch_epoch(DIFFormer& model, Adam& adam, const LargeDataset& d,
                                 const std::vector<std::uint8_t>& is_train, Index batch_size, std::uint64_t seed,
                                 int epoch, bool lean, MinibatchWorkspace& ws);

// One optimiser step on a node set with its own graph operator: zero_grad, forward, loss on rows
// train_rows, backward, Adam. Returns the loss.
float train_step(DIFFormer& model, Adam& adam, const Mat& x, const GraphOp* graph, const NodeTargets& t,
                 const std::vector<std::int64_t>& train_rows, std::uint64_t dropout_seed, bool lean,
                 MinibatchWorkspace& ws);

}  // namespace dfm
