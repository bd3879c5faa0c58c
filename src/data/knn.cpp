#include "data/knn.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <utility>

#ifdef __AVX__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/error.hpp"

namespace dfm {

namespace {

constexpr double kUnitRoundoff = 1.0 / 16777216.0;  // float: 2^-24

double row_norm(const float* a, Index f) {
  double s = 0;
  for (Index t = 0; t < f; ++t) s += static_cast<double>(a[t]) * static_cast<double>(a[t]);
  return std::sqrt(s);
}

void check_k(Index n, int k) {
  DFM_CHECK(k >= 1, "--knn must be >= 1 (got ", k, ")");
  DFM_CHECK(k <= n, "--knn ", k, " exceeds the number of instances (", n, ")");
}

using Cand = std::pair<double, std::int64_t>;

// Exact scan of every other row: the k-1 smallest (distance, index) pairs, ascending.
void exact_row(const Mat& x, const std::vector<double>& norms, Index i, int others, KnnMetric m,
               std::vector<Cand>& scratch, std::int64_t* out) {
  const Index n = x.rows(), f = x.cols();
  scratch.clear();
  for (Index j = 0; j < n; ++j)
    if (j != i) scratch.emplace_back(knn_exact_distance(&x(i, 0), &x(j, 0), f, m, norms[i], norms[j]), j);
  std::partial_sort(scratch.begin(), scratch.begin() + others, scratch.end());
  for (int l = 0; l < others; ++l) out[l] = scratch[l].second;
}

}  // namespace

KnnMetric parse_knn_metric(const std::string& s) {
  if (s == "euclidean") return KnnMetric::euclidean;
  if (s == "cosine") return KnnMetric::cosine;
  fail("--knn-metric: unknown metric '", s, "', expected euclidean or cosine");
}

const char* knn_metric_name(KnnMetric m) { return m == KnnMetric::euclidean ? "euclidean" : "cosine"; }

// Not inlined: the fast path and the reference must round identically, so that equal distances
// (ties) are equal in both and the index tie-break gives the same lists.
__attribute__((noinline)) double knn_exact_distance(const float* a, const float* b, Index f, KnnMetric metric,
                                                    double na, double nb) {
  if (metric == KnnMetric::euclidean) {
    double s = 0;
    for (Index t = 0; t < f; ++t) {
      const double d = static_cast<double>(a[t]) - static_cast<double>(b[t]);
      s += d * d;
    }
    return s;
  }
  if (na == 0.0 || nb == 0.0) return 1.0;
  double dot = 0;
  for (Index t = 0; t < f; ++t) dot += static_cast<double>(a[t]) * static_cast<double>(b[t]);
  return 1.0 - dot / (na * nb);
}

KnnLists knn_bruteforce(const Mat& x, int k, KnnMetric metric) {
  const Index n = x.rows(), f = x.cols();
  check_k(n, k);
  std::vector<double> norms(static_cast<size_t>(n));
  for (Index i = 0; i < n; ++i) norms[i] = row_norm(&x(i, 0), f);
  KnnLists out;
  out.n = n;
  out.k = k;
  out.idx.resize(static_cast<size_t>(n * k));
  std::vector<Cand> all;
  for (Index i = 0; i < n; ++i) {
    all.clear();
    for (Index j = 0; j < n; ++j)
      if (j != i) all.emplace_back(knn_exact_distance(&x(i, 0), &x(j, 0), f, metric, norms[i], norms[j]), j);
    std::sort(all.begin(), all.end());
    std::int64_t* row = out.idx.data() + i * k;
    row[0] = i;
    for (int l = 1; l < k; ++l) row[l] = all[l - 1].second;
  }
  return out;
}

namespace {

// Per-thread candidate lists of every row: up to `cap` (distance, index) pairs, of which the best
// `keep` survive each partial sort. thr[i]: the worst kept distance after the last partial sort
// (every pair this list ever dropped or refused is >= thr[i]).
struct CandidateLists {
  Index keep = 0, cap = 0;
  std::vector<std::pair<float, std::int32_t>> pairs;
  std::vector<std::int32_t> count;
  std::vector<float> thr;
  CandidateLists(Index n, Index keep_) : keep(keep_), cap(2 * keep_) {
    pairs.resize(static_cast<size_t>(n * cap));
    count.assign(static_cast<size_t>(n), 0);
    thr.assign(static_cast<size_t>(n), std::numeric_limits<float>::infinity());
  }
  void offer(Index i, float d, std::int32_t j) {
    if (!(d < thr[i])) return;
    auto* p = pairs.data() + i * cap;
    p[count[i]++] = {d, j};
    if (count[i] == cap) {  // partial sort: keep the best `keep`
      std::nth_element(p, p + (keep - 1), p + cap);
      count[i] = static_cast<std::int32_t>(keep);
      thr[i] = p[keep - 1].first;
    }
  }
  // Offers d[0..len) as the distances of row i to rows j0 .. j0+len-1, skipping row `self`. The
  // threshold test is vectorised: most distances are refused eight at a time.
  void scan(Index i, const float* d, Index len, Index j0, Index self) {
    Index c = 0;
#ifdef __AVX__
    for (; c + 8 <= len; c += 8) {
      const __m256 v = _mm256_loadu_ps(d + c);
      int mask = _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(thr[i]), _CMP_LT_OQ));
      while (mask) {
        const int b = __builtin_ctz(static_cast<unsigned>(mask));
        mask &= mask - 1;
        if (j0 + c + b != self) offer(i, d[c + b], static_cast<std::int32_t>(j0 + c + b));
      }
    }
#endif
    for (; c < len; ++c)
      if (d[c] < thr[i] && j0 + c != self) offer(i, d[c], static_cast<std::int32_t>(j0 + c));
  }
};

}  // namespace

KnnLists knn_search(const Mat& x, int k, KnnMetric metric, KnnStats* stats) {
  const auto t0 = std::chrono::steady_clock::now();
  const Index n = x.rows(), f = x.cols();
  check_k(n, k);
  DFM_CHECK(n < (Index(1) << 31), "kNN graph: at most 2^31 - 1 instances (got ", n, ")");
  DFM_CHECK(x.allFinite(), "kNN graph: the features contain NaN or infinite values");
  KnnLists out;
  out.n = n;
  out.k = k;
  out.idx.resize(static_cast<size_t>(n * k));
  const int others = k - 1;
  if (others == 0) {
    for (Index i = 0; i < n; ++i) out.idx[i] = i;
    if (stats) *stats = KnnStats{0, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()};
    return out;
  }
  // Candidates kept per row by the float ranking: a margin above k-1 so that the exact re-rank
  // nearly always proves the list without a full scan.
  const Index margin = std::max<Index>(8, others);
  const Index keep = std::min<Index>(n - 1, others + margin);
  const bool all_candidates = keep == n - 1;

  std::vector<double> norms(static_cast<size_t>(n));
#pragma omp parallel for schedule(static)
  for (Index i = 0; i < n; ++i) norms[i] = row_norm(&x(i, 0), f);

  // GEMM operand: the rows themselves (Euclidean) or the unit rows (cosine).
  Mat unit;
  if (metric == KnnMetric::cosine) {
    unit.resize(n, f);
#pragma omp parallel for schedule(static)
    for (Index i = 0; i < n; ++i) {
      if (norms[i] > 0)
        unit.row(i) = (x.row(i).cast<double>() / norms[i]).cast<float>();
      else
        unit.row(i).setZero();
    }
  }
  const Mat& xs = metric == KnnMetric::cosine ? unit : x;
  Vec sq(n);
  for (Index i = 0; i < n; ++i) sq[i] = xs.row(i).squaredNorm();
  const float max_sq = sq.maxCoeff();
  // |float distance - double distance| <= err: the dot product and the norms each carry at most
  // ~f unit roundoffs relative to |a|^2 + |b|^2 (unit rows: 2), plus the three final roundings;
  // the factor 4 (8 for cosine) is a safety margin over that first-order bound.
  const double gamma = static_cast<double>(f + 4) * kUnitRoundoff;

  // The distance matrix is symmetric: only tiles (a, b) with a <= b are computed, and each
  // updates the lists of both row blocks. Every thread keeps its own lists of all rows (no
  // races), merged per row at the end; a pair a thread refused is >= that thread's threshold,
  // which is >= the merged keep-th distance, so the proof below holds for the merged lists.
  constexpr Index kBlock = 256;
  const Index blocks = (n + kBlock - 1) / kBlock;
  std::vector<std::pair<Index, Index>> tiles;
  for (Index a = 0; a < blocks; ++a)
    for (Index b = a; b < blocks; ++b) tiles.emplace_back(a, b);
#ifdef _OPENMP
  int nthreads = omp_get_max_threads();
#else
  int nthreads = 1;
#endif
  // Each thread's lists take n * 2 * keep * 8 bytes: fewer threads rather than over 2 GiB.
  const double list_bytes = static_cast<double>(n) * 2.0 * static_cast<double>(keep) * 8.0;
  nthreads = std::max(1, std::min(nthreads, static_cast<int>(2147483648.0 / list_bytes)));
  std::vector<CandidateLists> lists;
  lists.reserve(static_cast<size_t>(nthreads));
  for (int t = 0; t < nthreads; ++t) lists.emplace_back(n, keep);
#pragma omp parallel num_threads(nthreads)
  {
#ifdef _OPENMP
    CandidateLists& mine = lists[static_cast<size_t>(omp_get_thread_num())];
#else
    CandidateLists& mine = lists[0];
#endif
    Mat g(kBlock, kBlock), gt(kBlock, kBlock);
#pragma omp for schedule(dynamic, 4)
    for (size_t tile = 0; tile < tiles.size(); ++tile) {
      const auto [a, b] = tiles[tile];
      const Index q0 = a * kBlock, rq = std::min(kBlock, n - q0);
      const Index k0 = b * kBlock, rk = std::min(kBlock, n - k0);
      auto d = g.topLeftCorner(rq, rk);
      d.noalias() = xs.middleRows(q0, rq) * xs.middleRows(k0, rk).transpose();
      if (metric == KnnMetric::euclidean) {
        for (Index r = 0; r < rq; ++r) {
          float* row = &g(r, 0);
          const float sr = sq[q0 + r];
          const float* sk = sq.data() + k0;
          for (Index c = 0; c < rk; ++c) row[c] = sr + sk[c] - 2.0f * row[c];
        }
      } else {
        d.array() = 1.0f - d.array();
      }
      for (Index r = 0; r < rq; ++r) mine.scan(q0 + r, &g(r, 0), rk, k0, q0 + r);
      if (a != b) {
        gt.topLeftCorner(rk, rq) = d.transpose();
        for (Index c = 0; c < rk; ++c) mine.scan(k0 + c, &gt(c, 0), rq, q0, -1);
      }
    }
  }

  Index fallbacks = 0;
#pragma omp parallel reduction(+ : fallbacks)
  {
    std::vector<std::pair<float, std::int32_t>> merged;
    std::vector<Cand> exact, scratch;
#pragma omp for schedule(dynamic, 64)
    for (Index i = 0; i < n; ++i) {
      merged.clear();
      for (const CandidateLists& l : lists) {
        const auto* p = l.pairs.data() + i * l.cap;
        merged.insert(merged.end(), p, p + l.count[i]);
      }
      if (static_cast<Index>(merged.size()) > keep) {
        std::nth_element(merged.begin(), merged.begin() + (keep - 1), merged.end());
        merged.resize(static_cast<size_t>(keep));
      }
      float f_keep = -std::numeric_limits<float>::infinity();  // largest float distance kept
      exact.clear();
      for (auto& [dist, j] : merged) {
        f_keep = std::max(f_keep, dist);
        exact.emplace_back(knn_exact_distance(&x(i, 0), &x(j, 0), f, metric, norms[i], norms[j]), j);
      }
      std::int64_t* row = out.idx.data() + i * k;
      row[0] = i;
      bool proven = static_cast<Index>(exact.size()) >= others;
      if (proven) {
        std::partial_sort(exact.begin(), exact.begin() + others, exact.end());
        if (!all_candidates) {
          // Every row outside the candidates has float distance >= f_keep, so exact distance
          // >= f_keep - err; it cannot enter the list (or tie with its last entry) if that
          // exceeds the last entry's exact distance.
          const double err = metric == KnnMetric::euclidean ? 4.0 * gamma * (static_cast<double>(sq[i]) + max_sq)
                                                            : 8.0 * gamma;
          proven = static_cast<double>(f_keep) - err > exact[others - 1].first;
        }
      }
      if (proven) {
        for (int l = 0; l < others; ++l) row[1 + l] = exact[l].second;
      } else {
        exact_row(x, norms, i, others, metric, scratch, row + 1);
        ++fallbacks;
      }
    }
  }
  if (stats) {
    stats->fallback_rows = fallbacks;
    stats->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  return out;
}

void knn_edges(const KnnLists& lists, std::vector<std::int64_t>& src, std::vector<std::int64_t>& dst) {
  src.clear();
  dst.clear();
  src.reserve(lists.idx.size());
  dst.reserve(lists.idx.size());
  for (Index i = 0; i < lists.n; ++i)
    for (int l = 0; l < lists.k; ++l) {
      src.push_back(lists.row(i)[l]);
      dst.push_back(i);
    }
}

}  // namespace dfm
