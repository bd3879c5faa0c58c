// Tests of the large-dataset readers (src/data/ogb.*): a tiny OGB raw directory written here with
// zlib (class labels with a missing one, node features, a split; and the ogbn-proteins form with
// node features = mean of incoming edges' features and 0/1 multi-task labels), errors naming the
// file and line, the streaming .npz reader (multi-label y, int32 edges, [runs, n] splits), graph
// preparation (self-loops, to_undirected), the normalised operator against make_graph_op, and
// the ratio split.
#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>

#include "core/error.hpp"
#include "data/npz.hpp"
#include "data/ogb.hpp"
#include "test_util.hpp"

namespace fs = std::filesystem;
using namespace dfm;

namespace {

class OgbTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "dfm_ogb_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  void gz(const fs::path& rel, const std::string& text) {
    fs::create_directories((dir / rel).parent_path());
    gzFile f = gzopen((dir / rel).string().c_str(), "wb");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(gzwrite(f, text.data(), static_cast<unsigned>(text.size())), static_cast<int>(text.size()));
    gzclose(f);
  }
  fs::path dir;
};

using test::expect_error;

std::vector<std::int32_t> row(const Csr& a, Index i) {
  return std::vector<std::int32_t>(a.indices.begin() + a.indptr[i], a.indices.begin() + a.indptr[i + 1]);
}

}  // namespace

TEST_F(OgbTest, ReadsClassDatasetWithFeaturesLabelsAndSplit) {
  gz("raw/num-node-list.csv.gz", "5\n");
  gz("raw/edge.csv.gz", "0,1\n1,2\n3,1\n4,4\n2,0\n");
  gz("raw/node-feat.csv.gz", "0.5,1\n-1,2e-1\n3,4\n5,6\n7,8.25\n");
  gz("raw/node-label.csv.gz", "1\n0\nnan\n2\n1\n");
  gz("split/time/train.csv.gz", "0\n1\n");
  gz("split/time/valid.csv.gz", "3\n");
  gz("split/time/test.csv.gz", "4\n");
  const LargeDataset d = load_large_dataset(dir.string(), GraphPrep{false, true});
  EXPECT_EQ(d.n, 5);
  EXPECT_EQ(d.features, 2);
  EXPECT_FLOAT_EQ(d.x(1, 1), 0.2f);
  EXPECT_FLOAT_EQ(d.x(4, 1), 8.25f);
  EXPECT_FALSE(d.targets.multilabel);
  EXPECT_EQ(d.targets.y, (std::vector<std::int64_t>{1, 0, -1, 2, 1}));  // nan -> unlabeled
  EXPECT_EQ(d.targets.classes, 3);
  EXPECT_FALSE(d.targets.labelled(2));
  // in-edges by target, input order, the (4,4) loop removed and one self-loop appended per node
  EXPECT_EQ(row(d.graph.adj(), 1), (std::vector<std::int32_t>{0, 3, 1}));
  EXPECT_EQ(row(d.graph.adj(), 4), (std::vector<std::int32_t>{4}));
  EXPECT_EQ(d.graph.edges(), 4 + 5);
  ASSERT_EQ(d.file_splits.size(), 1u);
  EXPECT_EQ(d.file_split_name, "ogb:time");
  EXPECT_EQ(d.file_splits[0].train, (std::vector<std::int64_t>{0, 1}));
  EXPECT_EQ(d.file_splits[0].test, (std::vector<std::int64_t>{4}));
}

TEST_F(OgbTest, ProteinsNodeFeaturesAreMeanOfIncomingEdgeFeatures) {
  gz("raw/num-node-list.csv.gz", "4\n");
  gz("raw/edge.csv.gz", "0,1\n2,1\n1,2\n3,1\n");
  gz("raw/edge-feat.csv.gz", "0.1,0.2\n0.3,0.4\n0.5,0.5\n0.8,0.0\n");
  gz("raw/node-label.csv.gz", "1,0,1\n0,0,1\n1,1,0\n0,1,1\n");
  gz("split/species/train.csv.gz", "0\n1\n");
  gz("split/species/valid.csv.gz", "2\n");
  gz("split/species/test.csv.gz", "3\n");
  const LargeDataset d = load_large_dataset(dir.string(), GraphPrep{false, true});
  ASSERT_EQ(d.features, 2);
  // node 1 receives edges 0, 1, 3; node 2 edge 2; nodes 0 and 3 nothing -> zeros
  EXPECT_NEAR(d.x(1, 0), (0.1 + 0.3 + 0.8) / 3, 1e-6);
  EXPECT_NEAR(d.x(1, 1), (0.2 + 0.4 + 0.0) / 3, 1e-6);
  EXPECT_NEAR(d.x(2, 0), 0.5, 1e-6);
  EXPECT_EQ(d.x(0, 0), 0.0f);
  EXPECT_EQ(d.x(3, 1), 0.0f);
  ASSERT_TRUE(d.targets.multilabel);
  EXPECT_EQ(d.targets.outputs(), 3);
  EXPECT_EQ(d.targets.ym(2, 1), 1.0f);
  EXPECT_EQ(d.targets.ym(3, 0), 0.0f);
  EXPECT_EQ(d.file_split_name, "ogb:species");
}

TEST_F(OgbTest, ErrorsNameTheFileAndLine) {
  gz("raw/num-node-list.csv.gz", "3\n");
  gz("raw/edge.csv.gz", "0,1\n1,7\n");
  gz("raw/node-feat.csv.gz", "1\n2\n3\n");
  gz("raw/node-label.csv.gz", "0\n1\n0\n");
  expect_error([&] { load_large_dataset(dir.string(), GraphPrep{}); }, {"edge.csv.gz:2", "out of range"});
  gz("raw/edge.csv.gz", "0,1\n1,x\n");
  expect_error([&] { load_large_dataset(dir.string(), GraphPrep{}); }, {"edge.csv.gz:2", "cannot parse"});
  gz("raw/edge.csv.gz", "0,1\n");
  gz("raw/node-feat.csv.gz", "1\n2,3\n3\n");
  expect_error([&] { load_large_dataset(dir.string(), GraphPrep{}); }, {"node-feat.csv.gz:2", "expected 1"});
  gz("raw/node-feat.csv.gz", "1\n2\n3\n");
  fs::remove(dir / "raw/node-label.csv.gz");
  expect_error([&] { load_large_dataset(dir.string(), GraphPrep{}); }, {"node-label.csv.gz"});
  expect_error([&] { load_large_dataset((dir / "nothing").string(), GraphPrep{}); }, {"nothing"});
}

TEST_F(OgbTest, StreamingNpzReaderHandlesMultilabelInt32EdgesAndRunSplits) {
  const Index n = 6, t = 2, e = 4;
  std::vector<float> x(n * 3);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.5f * static_cast<float>(i);
  const std::vector<float> y{1, 0, 0, 1, 1, 1, 0, 0, std::nanf(""), 1, 0, 1};
  const std::vector<std::int64_t> ei{0, 1, 2, 5, 1, 2, 3, 0};
  const std::vector<std::int64_t> tr{0, 1, 2, 1}, va{3, 4}, te{5, 0};  // [2, 2], [2, 1], [2, 1]
  NpyArray ei32;
  ei32.dtype = DType::i32;
  ei32.shape = {2, e};
  ei32.bytes.resize(4 * 2 * e);
  for (Index k = 0; k < 2 * e; ++k) {
    const std::int32_t v = static_cast<std::int32_t>(ei[k]);
    std::memcpy(ei32.bytes.data() + 4 * k, &v, 4);
  }
  const std::string path = (dir / "g.npz").string();
  write_npz(path, {{"x", NpyArray::from_f32({n, 3}, x.data())},
                   {"y", NpyArray::from_f32({n, t}, y.data())},
                   {"edge_index", ei32},
                   {"train_idx", NpyArray::from_i64({2, 2}, tr.data())},
                   {"val_idx", NpyArray::from_i64({2, 1}, va.data())},
                   {"test_idx", NpyArray::from_i64({2, 1}, te.data())}});
  const LargeDataset d = load_large_dataset(path, GraphPrep{true, false});
  EXPECT_EQ(d.x(5, 2), 0.5f * 17);
  ASSERT_TRUE(d.targets.multilabel);
  EXPECT_TRUE(std::isnan(d.targets.ym(4, 0)));
  EXPECT_EQ(d.targets.ym(5, 1), 1.0f);
  // undirected: 0-1, 1-2, 2-3, 5-0 both ways, no loops added
  EXPECT_EQ(d.graph.edges(), 8);
  EXPECT_EQ(row(d.graph.adj(), 0), (std::vector<std::int32_t>{1, 5}));
  ASSERT_EQ(d.file_splits.size(), 2u);
  EXPECT_EQ(d.file_splits[1].train, (std::vector<std::int64_t>{2, 1}));
  EXPECT_EQ(d.file_splits[1].test, (std::vector<std::int64_t>{0}));
  // a 0/1 check on multi-label values
  const std::vector<float> bad{2, 0, 0, 1, 1, 1, 0, 0, 0, 1, 0, 1};
  write_npz(path, {{"x", NpyArray::from_f32({n, 3}, x.data())}, {"y", NpyArray::from_f32({n, t}, bad.data())}});
  expect_error([&] { load_large_dataset(path, GraphPrep{}); }, {"g.npz: y", "0, 1 or NaN"});
}

TEST(OgbGraph, UndirectedDedupAndWeights) {
  // 0->1 twice (w 1, 2), 1->0 (w 4), 2->2 loop (removed), 2->1
  const NodeGraph g = build_node_graph(3, {0, 0, 1, 2, 2}, {1, 1, 0, 2, 1}, {1, 2, 4, 9, 0.5f}, GraphPrep{true, true}, "w");
  // target 0: from 1 (w 4) then its loop; target 1: from 0 (1 + 2 + 4 merged... each direction
  // counted once per stored edge: 0->1 (1), 0->1 (2), reverse of 1->0 (4) -> 7), from 2 (0.5), loop
  const Csr& a = g.adj();
  EXPECT_EQ(row(a, 0), (std::vector<std::int32_t>{1, 0}));
  EXPECT_EQ(row(a, 1), (std::vector<std::int32_t>{0, 2, 1}));
  ASSERT_TRUE(g.weighted());
  EXPECT_FLOAT_EQ(g.weight[a.indptr[1]], 7.0f);
  EXPECT_FLOAT_EQ(g.weight[a.indptr[1] + 1], 0.5f);
  EXPECT_FLOAT_EQ(g.weight[a.indptr[1] + 2], 1.0f);  // the appended self-loop
  EXPECT_FLOAT_EQ(g.weight[a.indptr[0]], 7.0f);  // reverse of 0->1 (1, 2) and 1->0 (4)
  EXPECT_EQ(row(a, 2), (std::vector<std::int32_t>{1, 2}));
  // op.adj holds the normalised operator: w / sqrt(d_i d_j), in-degrees 2, 3, 2
  EXPECT_FLOAT_EQ(a.values[a.indptr[1]], static_cast<float>(7.0 / std::sqrt(3.0 * 2.0)));
}

TEST(OgbGraph, NormalisedOperatorEqualsMakeGraphOp) {
  std::vector<std::int32_t> s{0, 1, 2, 3, 3, 4, 1, 0}, t{1, 2, 3, 0, 1, 1, 1, 4};
  const std::vector<float> w{1, 2, 0.5f, 1, 3, 1, 1, 2};
  const NodeGraph g = build_node_graph(6, s, t, w, GraphPrep{false, false}, "g");  // node 5 isolated
  const GraphOp a = full_graph_op(g);
  EXPECT_EQ(a.adj.values, g.adj().values);
  // the same edges in CSR order through make_graph_op
  std::vector<std::int64_t> src, dst;
  std::vector<float> ww;
  for (Index i = 0; i < 6; ++i)
    for (Index e = g.adj().indptr[i]; e < g.adj().indptr[i + 1]; ++e) {
      src.push_back(g.adj().indices[e]);
      dst.push_back(i);
      ww.push_back(g.weight[e]);
    }
  const GraphOp b = make_graph_op<float>(6, src, dst, &ww);
  EXPECT_EQ(a.adj.indptr, b.adj.indptr);
  EXPECT_EQ(a.adj.indices, b.adj.indices);
  EXPECT_EQ(a.adj.values, b.adj.values);
  EXPECT_EQ(a.adj_t.indices, b.adj_t.indices);
  EXPECT_EQ(a.adj_t.values, b.adj_t.values);
}

TEST(OgbGraph, RatioSplitOverLabelledNodes) {
  NodeTargets t;
  t.classes = 2;
  for (int i = 0; i < 1001; ++i) t.y.push_back(i % 10 == 0 ? -1 : i % 2);
  const Split s = ratio_split(t, 0.5, 0.25, 3);
  EXPECT_EQ(s.train.size(), 450u);  // 900 labelled: floor(450), floor(225), the rest
  EXPECT_EQ(s.val.size(), 225u);
  EXPECT_EQ(s.test.size(), 225u);
  std::set<std::int64_t> all(s.train.begin(), s.train.end());
  all.insert(s.val.begin(), s.val.end());
  all.insert(s.test.begin(), s.test.end());
  EXPECT_EQ(all.size(), 900u);
  for (auto i : all) EXPECT_NE(i % 10, 0);
  EXPECT_EQ(ratio_split(t, 0.5, 0.25, 3).train, s.train);
  EXPECT_NE(ratio_split(t, 0.5, 0.25, 4).train, s.train);
  EXPECT_THROW(ratio_split(t, 0.8, 0.3, 0), Error);
}
