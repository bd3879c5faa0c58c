// Synthetic node-classification graphs for tests and scale runs: a stochastic block model with
// class-dependent features (`difformer synth`).
//   * blocks: every node gets a block uniformly at random in [0, C); with tasks = 0 the block is
//     the class label y (int64 [N]); with tasks = T > 0, y is multi-label float32 [N, T] drawn per
//     node as Bernoulli(p[block, t]) with rates p ~ U(0.05, 0.95) per (block, task);
//   * features: x_i = mu[block_i] + N(0, I), mu[c] ~ N(0, signal^2 / F I) (class means about
//     signal * sqrt(2) apart);
//   * edges: round(N K / 2) node pairs: a uniform node u, then with probability `homophily` a
//     uniform other node of u's block, else a uniform node of another block; self pairs are
//     redrawn, duplicate pairs dropped, and each pair stored in both directions (so K is the
//     average number of directed edges per node, before duplicates).
// Every random draw is a counter-based hash of (seed, purpose, index), so the output depends on
// the seed alone, never on the thread count. Not here: the peer-style uniform random graphs of
// train/synthetic.hpp.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace dfm {

struct SbmOptions {
  Index nodes = 0;
  double avg_degree = 10;
  Index features = 16;
  Index classes = 2;  // blocks
  Index tasks = 0;    // > 0: multi-label targets
  double homophily = 0.8;
  double signal = 1.0;
  std::uint64_t seed = 0;
};

struct SbmGraph {
  Mat x;                               // [N, F]
  std::vector<std::int64_t> block;     // [N] block = class label
  Mat ym;                              // [N, T] when tasks > 0
  std::vector<std::int64_t> edge_index;  // [2, E]: sources then targets
  Index edges() const { return static_cast<Index>(edge_index.size() / 2); }
  double edge_homophily() const;  // fraction of edges inside a block
};

SbmGraph make_sbm(const SbmOptions& opt);
// x, y (block labels int64 [N], or the multi-label float32 [N, T]) and edge_index, atomically.
void write_sbm_npz(const std::string& path, const SbmGraph& g, bool compress = false);

}  // namespace dfm
