// Exact k-nearest-neighbour graphs over the rows of a feature matrix, for instance sets that
// have no input graph (SPEC.md section 3: "a kNN graph (k=5, Euclidean, self included,
// symmetrised)", as sklearn.neighbors.kneighbors_graph(include_self=True) + to_undirected).
//
// "Exact" means: the neighbour lists equal those of the double-precision brute-force reference
// knn_bruteforce() below, ties broken by the smaller index. The fast path ranks candidates with
// blocked float GEMM distances (||a||^2 + ||b||^2 - 2 a.b, Eigen) over the tiles of the upper
// triangle of the symmetric distance matrix (OpenMP over tiles, each tile updating the lists of
// both its row blocks), a vectorised threshold test and per-row partial sorts into a bounded list
// per row and thread; it merges the threads' lists and re-ranks a margin of candidates with the
// exact double distances and proves, with a rounding-error bound of the float distances, that no
// point outside the candidates can enter the list; a row where the proof fails (near-ties at the
// cut-off) falls back to an exact scan of all points. What it deliberately is not: approximate.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace dfm {

enum class KnnMetric { euclidean, cosine };
KnnMetric parse_knn_metric(const std::string& s);  // "euclidean" | "cosine"; throws otherwise
const char* knn_metric_name(KnnMetric m);

// Row i's k neighbours, self first (always included, as include_self=True), then the k-1
// nearest other rows ascending by (distance, index). Distances: Euclidean (squared, same order)
// or cosine distance 1 - a.b / (|a| |b|), with a zero row at distance 1 from everything.
struct KnnLists {
  Index n = 0;
  int k = 0;
  std::vector<std::int64_t> idx;  // [n, k] row-major
  const std::int64_t* row(Index i) const { return idx.data() + i * k; }
};

struct KnnStats {
  Index fallback_rows = 0;  // rows that needed the exact full scan
  double seconds = 0;
};

// Fast exact search (see the file comment). k must be in [1, n]; errors name --knn.
KnnLists knn_search(const Mat& x, int k, KnnMetric metric, KnnStats* stats = nullptr);
// The specification: all pairwise distances in double, full sort per row. O(n^2 f).
KnnLists knn_bruteforce(const Mat& x, int k, KnnMetric metric);

// The distance both implementations rank by, in double, between rows a and b of length f.
// For cosine, na and nb are the rows' double L2 norms (ignored for Euclidean).
double knn_exact_distance(const float* a, const float* b, Index f, KnnMetric metric, double na, double nb);

// Directed edges neighbour j -> centre i for every listed pair, self-loops included (the
// source_to_target flow of torch_geometric's knn_graph). Callers symmetrise when they want to.
void knn_edges(const KnnLists& lists, std::vector<std::int64_t>& src, std::vector<std::int64_t>& dst);

}  // namespace dfm
