#include "data/synth_sbm.hpp"

#include <parallel/algorithm>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.hpp"
#include "data/ogb.hpp"

namespace dfm {

namespace {

// Counter-based stream: splitmix64 over a state derived from (seed, purpose, index).
struct Stream {
  std::uint64_t s;
  Stream(std::uint64_t seed, std::uint64_t purpose, std::uint64_t index) {
    s = seed * 0x9e3779b97f4a7c15ULL ^ (purpose + 1) * 0xd1342543de82ef95ULL;
    s ^= index * 0xbf58476d1ce4e5b9ULL + 0x94d049bb133111ebULL;
    next();
  }
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  std::uint64_t below(std::uint64_t bound) {                                  // [0, bound), exact
    for (;;) {
      const unsigned __int128 m = static_cast<unsigned __int128>(next()) * bound;
      const std::uint64_t lo = static_cast<std::uint64_t>(m);
      if (lo >= bound || lo >= (-bound) % bound) return static_cast<std::uint64_t>(m >> 64);
    }
  }
  // Two standard normals (Box-Muller).
  std::pair<double, double> normal2() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1)), t = 2.0 * M_PI * u2;
    return {r * std::cos(t), r * std::sin(t)};
  }
};

enum Purpose : std::uint64_t { kBlock = 1, kMean = 2, kFeature = 3, kRate = 4, kTask = 5, kEdge = 6 };

}  // namespace

double SbmGraph::edge_homophily() const {
  const Index e = edges();
  if (e == 0) return 0.0;
  Index same = 0;
#pragma omp parallel for reduction(+ : same) schedule(static)
  for (Index k = 0; k < e; ++k) same += block[edge_index[k]] == block[edge_index[e + k]];
  return static_cast<double>(same) / static_cast<double>(e);
}

SbmGraph make_sbm(const SbmOptions& o) {
  DFM_CHECK(o.nodes >= 2, "--nodes must be >= 2 (got ", o.nodes, ")");
  DFM_CHECK(o.nodes <= std::numeric_limits<std::int32_t>::max(), "--nodes must fit int32 node ids (got ", o.nodes, ")");
  DFM_CHECK(o.avg_degree >= 0 && std::isfinite(o.avg_degree), "--avg-degree must be >= 0 (got ", o.avg_degree, ")");
  DFM_CHECK(o.features >= 1, "--features must be >= 1 (got ", o.features, ")");
  DFM_CHECK(o.classes >= 1 && o.classes <= o.nodes, "--classes must be in [1, nodes] (got ", o.classes, ")");
  DFM_CHECK(o.tasks >= 0, "--tasks must be >= 0 (got ", o.tasks, ")");
  DFM_CHECK(o.homophily >= 0 && o.homophily <= 1, "--homophily must be in [0, 1] (got ", o.homophily, ")");
  const Index n = o.nodes, c = o.classes, f = o.features;
  SbmGraph g;
  g.block.resize(static_cast<size_t>(n));
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) g.block[i] = static_cast<std::int64_t>(Stream(o.seed, kBlock, i).below(c));

  // Nodes grouped by block: members of block b are order[start[b] .. start[b + 1]).
  std::vector<Index> start(static_cast<size_t>(c) + 1, 0);
  for (auto b : g.block) ++start[b + 1];
  for (Index b = 0; b < c; ++b) start[b + 1] += start[b];
  std::vector<std::int32_t> order(static_cast<size_t>(n));
  {
    std::vector<Index> next(start.begin(), start.end() - 1);
    for (Index i = 0; i < n; ++i) order[next[g.block[i]]++] = static_cast<std::int32_t>(i);
  }

  // Features.
  Mat mu(c, f);
  const double scale = o.signal / std::sqrt(static_cast<double>(f));
  for (Index b = 0; b < c; ++b) {
    Stream s(o.seed, kMean, b);
    for (Index j = 0; j < f; ++j) mu(b, j) = static_cast<float>(scale * s.normal2().first);
  }
  g.x.resize(n, f);
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) {
    Stream s(o.seed, kFeature, i);
    const auto m = mu.row(g.block[i]);
    for (Index j = 0; j < f; j += 2) {
      const auto [z0, z1] = s.normal2();
      g.x(i, j) = m[j] + static_cast<float>(z0);
      if (j + 1 < f) g.x(i, j + 1) = m[j + 1] + static_cast<float>(z1);
    }
  }

  // Multi-label targets.
  if (o.tasks > 0) {
    Mat rate(c, o.tasks);
    for (Index b = 0; b < c; ++b) {
      Stream s(o.seed, kRate, b);
      for (Index t = 0; t < o.tasks; ++t) rate(b, t) = static_cast<float>(0.05 + 0.9 * s.uniform());
    }
    g.ym.resize(n, o.tasks);
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < n; ++i) {
      Stream s(o.seed, kTask, i);
      for (Index t = 0; t < o.tasks; ++t) g.ym(i, t) = s.uniform() < rate(g.block[i], t) ? 1.0f : 0.0f;
    }
  }

  // Edges: one key min * n + max per pair, sorted and deduplicated.
  const Index pairs = static_cast<Index>(std::llround(static_cast<double>(n) * o.avg_degree / 2.0));
  std::vector<std::uint64_t> keys(static_cast<size_t>(pairs));
#pragma omp parallel for schedule(static)
  for (Index e = 0; e < pairs; ++e) {
    Stream s(o.seed, kEdge, e);
    for (int attempt = 0;; ++attempt) {
      const Index u = static_cast<Index>(s.below(n));
      const Index b = g.block[u], size = start[b + 1] - start[b];
      Index v;
      const bool inside = size == n || s.uniform() < o.homophily;
      if (attempt > 64) {  // degenerate block sizes (e.g. one node per block): any other node
        v = static_cast<Index>(s.below(n));
      } else if (inside) {
        if (size < 2) continue;
        v = order[start[b] + static_cast<Index>(s.below(size))];
      } else {
        const Index r = static_cast<Index>(s.below(n - size));
        v = order[r < start[b] ? r : r + size];
      }
      if (u == v) continue;
      const auto lo = static_cast<std::uint64_t>(std::min(u, v)), hi = static_cast<std::uint64_t>(std::max(u, v));
      keys[e] = lo * static_cast<std::uint64_t>(n) + hi;
      break;
    }
  }
  __gnu_parallel::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  const Index unique = static_cast<Index>(keys.size());
  const Index e = 2 * unique;
  g.edge_index.resize(static_cast<size_t>(2 * e));
  std::int64_t* src = g.edge_index.data();
  std::int64_t* dst = src + e;
  const auto un = static_cast<std::uint64_t>(n);
#pragma omp parallel for schedule(static)
  for (Index k = 0; k < unique; ++k) {
    const auto a = static_cast<std::int64_t>(keys[k] / un), b = static_cast<std::int64_t>(keys[k] % un);
    src[2 * k] = a;
    dst[2 * k] = b;
    src[2 * k + 1] = b;
    dst[2 * k + 1] = a;
  }
  return g;
}

void write_sbm_npz(const std::string& path, const SbmGraph& g, bool compress) {
  const Index n = g.x.rows();
  std::vector<NpzOutArray> arrays;
  arrays.push_back({"x", "<f4", {n, g.x.cols()}, {{g.x.data(), sizeof(float) * static_cast<size_t>(g.x.size())}}});
  if (g.ym.size() > 0)
    arrays.push_back({"y", "<f4", {n, g.ym.cols()}, {{g.ym.data(), sizeof(float) * static_cast<size_t>(g.ym.size())}}});
  else
    arrays.push_back({"y", "<i8", {n}, {{g.block.data(), sizeof(std::int64_t) * g.block.size()}}});
  arrays.push_back({"edge_index", "<i8", {2, g.edges()},
                    {{g.edge_index.data(), sizeof(std::int64_t) * g.edge_index.size()}}});
  write_npz_streaming(path, arrays, compress);
}

}  // namespace dfm
