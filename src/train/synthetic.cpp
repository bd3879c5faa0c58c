#include "train/synthetic.hpp"

#include <algorithm>
#include <parallel/algorithm>  // __gnu_parallel::sort (OpenMP): the edge keys at N = 5e7 are 5e8 integers
#include <random>

namespace dfm {

SyntheticProblem make_synthetic(Index n, Index features, Index classes, double avg_degree, std::uint64_t seed,
                                bool with_graph) {
  SyntheticProblem p;
  p.x.resize(n, features);
  p.y.resize(static_cast<size_t>(n));
  // Rows are filled in parallel from per-row streams, so the data do not depend on the threads.
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) {
    std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL + static_cast<std::uint64_t>(i));
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (Index j = 0; j < features; ++j) p.x(i, j) = normal(rng);
    p.y[i] = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(classes));
  }
  if (!with_graph) return p;
  std::mt19937_64 rng(seed + 1);
  std::uniform_int_distribution<std::int64_t> node(0, n - 1);
  const Index pairs = static_cast<Index>(static_cast<double>(n) * avg_degree / 2.0 + 0.5);
  std::vector<std::int64_t> keys;
  keys.reserve(static_cast<size_t>(pairs));
  for (Index e = 0; e < pairs; ++e) {
    const std::int64_t a = node(rng), b = node(rng);
    if (a == b) continue;
    keys.push_back(std::min(a, b) * n + std::max(a, b));
  }
  __gnu_parallel::sort(keys.begin(), keys.end());  // integers: the same order as std::sort
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  std::vector<std::int64_t> directed;
  directed.reserve(2 * keys.size());
  for (auto k : keys) {
    directed.push_back(k);                         // (a, b)
    directed.push_back((k % n) * n + k / n);       // (b, a)
  }
  __gnu_parallel::sort(directed.begin(), directed.end());
  p.src.resize(directed.size());
  p.dst.resize(directed.size());
  for (size_t e = 0; e < directed.size(); ++e) {
    p.src[e] = directed[e] / n;
    p.dst[e] = directed[e] % n;
  }
  return p;
}

}  // namespace dfm
