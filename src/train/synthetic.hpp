// Synthetic problems made exactly the way the PyTorch peer's benchmark makes them
// (../shared/peer/peer_bench.py): x ~ N(0, 1) [N, F], labels uniform in [0, C), and a random
// undirected graph of average degree ~k: n*k/2 random pairs, self pairs dropped, both
// directions, duplicates removed, sorted by (source, target).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.hpp"

namespace dfm {

struct SyntheticProblem {
  Mat x;
  std::vector<std::int64_t> y;
  std::vector<std::int64_t> src, dst;
};

SyntheticProblem make_synthetic(Index n, Index features, Index classes, double avg_degree, std::uint64_t seed,
                                bool with_graph = true);

}  // namespace dfm
