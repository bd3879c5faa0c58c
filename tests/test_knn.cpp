// The fast exact kNN search against the double brute-force reference: same neighbour lists (in
// the same order), ties broken by index, for both metrics, across several query and key blocks.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <limits>
#include <set>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/error.hpp"
#include "data/dataset.hpp"
#include "data/knn.hpp"

namespace dfm {
namespace {

Mat gaussian(Index n, Index f, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> g;
  Mat x(n, f);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = g(rng);
  return x;
}

// Small integers: many exactly equal distances, so the index tie-break decides most lists.
Mat ties(Index n, Index f, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> u(0, 2);
  Mat x(n, f);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(u(rng));
  return x;
}

void expect_same_lists(const KnnLists& a, const KnnLists& b, const std::string& what) {
  ASSERT_EQ(a.n, b.n);
  ASSERT_EQ(a.k, b.k);
  Index mismatched = 0, first = -1;
  for (Index i = 0; i < a.n; ++i)
    if (!std::equal(a.row(i), a.row(i) + a.k, b.row(i))) {
      if (first < 0) first = i;
      ++mismatched;
    }
  EXPECT_EQ(mismatched, 0) << what << ": first differing row " << first;
}

TEST(Knn, EuclideanMatchesBruteForceAcrossBlocks) {
  // 2600 rows: two key blocks and 21 query blocks of the fast path.
  const Mat x = gaussian(2600, 12, 1);
  const KnnLists ref17 = knn_bruteforce(x, 17, KnnMetric::euclidean);
  for (int k : {1, 2, 5, 17}) {
    KnnStats st;
    const KnnLists fast = knn_search(x, k, KnnMetric::euclidean, &st);
    KnnLists ref;  // a list for k is the first k entries of the list for 17 (same total order)
    ref.n = ref17.n;
    ref.k = k;
    for (Index i = 0; i < ref17.n; ++i) ref.idx.insert(ref.idx.end(), ref17.row(i), ref17.row(i) + k);
    expect_same_lists(fast, ref, "euclidean k=" + std::to_string(k));
    EXPECT_LE(st.fallback_rows, 26) << "the float ranking should prove almost every row on its own";
  }
}

TEST(Knn, CosineMatchesBruteForceWithZeroRows) {
  Mat x = gaussian(900, 20, 2);
  for (Index i = 0; i < 900; i += 97) x.row(i).setZero();  // distance 1 to everything
  for (int k : {1, 5, 9}) {
    expect_same_lists(knn_search(x, k, KnnMetric::cosine), knn_bruteforce(x, k, KnnMetric::cosine),
                      "cosine k=" + std::to_string(k));
  }
}

TEST(Knn, TiesBrokenByIndexAndDuplicatesHandled) {
  const Mat x = ties(1500, 3, 3);  // 27 distinct points over 1500 rows: massive ties
  for (auto m : {KnnMetric::euclidean, KnnMetric::cosine}) {
    KnnStats st;
    const KnnLists fast = knn_search(x, 6, m, &st);
    expect_same_lists(fast, knn_bruteforce(x, 6, m), std::string("ties ") + knn_metric_name(m));
    EXPECT_GT(st.fallback_rows, 0) << "this data must exercise the exact fallback path";
  }
  // Self first, then the smallest indices among the (many) exact duplicates of row 1000.
  const KnnLists l = knn_search(x, 4, KnnMetric::euclidean);
  EXPECT_EQ(l.row(1000)[0], 1000);
  std::vector<std::int64_t> dups;
  for (Index j = 0; j < 1500 && dups.size() < 3; ++j)
    if (j != 1000 && x.row(j) == x.row(1000)) dups.push_back(j);
  ASSERT_EQ(dups.size(), 3u);
  EXPECT_EQ(std::vector<std::int64_t>(l.row(1000) + 1, l.row(1000) + 4), dups);
}

TEST(Knn, ThreadCountDoesNotChangeTheResult) {
  const Mat x = gaussian(1200, 7, 4);
  const KnnLists ref = knn_bruteforce(x, 5, KnnMetric::euclidean);
#ifdef _OPENMP
  for (int t : {1, 2, 3}) {
    omp_set_num_threads(t);
    expect_same_lists(knn_search(x, 5, KnnMetric::euclidean), ref, "threads=" + std::to_string(t));
  }
  omp_set_num_threads(omp_get_num_procs());
#else
  expect_same_lists(knn_search(x, 5, KnnMetric::euclidean), ref, "single thread");
#endif
}

TEST(Knn, GraphIsSymmetricWithOneSelfLoopPerNode) {
  const Mat x = gaussian(300, 5, 5);
  const KnnLists l = knn_search(x, 5, KnnMetric::euclidean);
  Dataset d;
  d.n = 300;
  knn_edges(l, d.src, d.dst);
  ASSERT_EQ(d.src.size(), 300u * 5u);
  for (size_t e = 0; e < d.src.size(); ++e) EXPECT_EQ(d.dst[e], static_cast<std::int64_t>(e / 5));  // j -> i
  citation_graph(d);  // symmetrise, drop self-loops, add one per node
  std::set<std::pair<std::int64_t, std::int64_t>> edges;
  Index loops = 0;
  for (size_t e = 0; e < d.src.size(); ++e) {
    EXPECT_TRUE(edges.insert({d.src[e], d.dst[e]}).second) << "duplicate edge";
    loops += d.src[e] == d.dst[e];
  }
  EXPECT_EQ(loops, 300);
  for (auto [s, t] : edges) EXPECT_TRUE(edges.count({t, s})) << s << " -> " << t << " has no reverse";
  for (Index i = 0; i < 300; ++i)
    for (int q = 1; q < 5; ++q) EXPECT_TRUE(edges.count({l.row(i)[q], i}));
}

TEST(Knn, BadArgumentsNameTheFlag) {
  const Mat x = gaussian(10, 3, 6);
  try {
    knn_search(x, 0, KnnMetric::euclidean);
    FAIL() << "k = 0 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--knn must be >= 1"), std::string::npos) << e.what();
  }
  try {
    knn_search(x, 11, KnnMetric::euclidean);
    FAIL() << "k > n accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds the number of instances (10)"), std::string::npos) << e.what();
  }
  try {
    parse_knn_metric("manhattan");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--knn-metric"), std::string::npos) << e.what();
  }
  Mat bad = x;
  bad(3, 1) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(knn_search(bad, 2, KnnMetric::euclidean), Error);
}

}  // namespace
}  // namespace dfm
