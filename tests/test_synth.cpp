// Tests of the stochastic block model generator (src/data/synth_sbm.*) and of the `synth` and
// `train-large` commands: graph invariants (symmetric, no self-loops, no duplicates, ~N K edges,
// homophily), class-dependent features, multi-label targets, independence from the thread count,
// the .npz round trip through both readers, and the commands' JSON output.
#include <gtest/gtest.h>
#include <omp.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "core/error.hpp"
#include "data/npz.hpp"
#include "data/ogb.hpp"
#include "data/synth_sbm.hpp"

namespace fs = std::filesystem;
using namespace dfm;

namespace {

SbmOptions opts(Index n, double k, Index c, Index tasks = 0) {
  SbmOptions o;
  o.nodes = n;
  o.avg_degree = k;
  o.features = 6;
  o.classes = c;
  o.tasks = tasks;
  o.homophily = 0.8;
  o.signal = 3.0;
  o.seed = 42;
  return o;
}

class SynthFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "dfm_synth_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  std::string file(const std::string& n) const { return (dir / n).string(); }
  fs::path dir;
};

}  // namespace

TEST(Sbm, GraphInvariants) {
  const SbmGraph g = make_sbm(opts(3000, 10, 3));
  const Index e = g.edges(), n = 3000;
  EXPECT_GT(e, static_cast<Index>(0.97 * n * 10));  // duplicates are rare at this density
  EXPECT_LE(e, n * 10);
  std::set<std::pair<std::int64_t, std::int64_t>> seen;
  for (Index k = 0; k < e; ++k) {
    const auto s = g.edge_index[k], t = g.edge_index[e + k];
    ASSERT_NE(s, t) << "self-loop";
    ASSERT_TRUE(s >= 0 && s < n && t >= 0 && t < n);
    ASSERT_TRUE(seen.insert({s, t}).second) << "duplicate " << s << "->" << t;
  }
  for (const auto& [s, t] : seen) ASSERT_TRUE(seen.count({t, s})) << "missing reverse of " << s << "->" << t;
  EXPECT_NEAR(g.edge_homophily(), 0.8, 0.03);
  // blocks roughly balanced; feature means differ by block
  std::vector<Index> count(3, 0);
  Mat mean = Mat::Zero(3, 6);
  for (Index i = 0; i < n; ++i) {
    ++count[g.block[i]];
    mean.row(g.block[i]) += g.x.row(i);
  }
  for (int c = 0; c < 3; ++c) {
    EXPECT_NEAR(count[c], 1000, 120);
    mean.row(c) /= static_cast<float>(count[c]);
  }
  EXPECT_GT((mean.row(0) - mean.row(1)).norm(), 1.0f);
  EXPECT_GT((mean.row(1) - mean.row(2)).norm(), 1.0f);
}

TEST(Sbm, HomophilyZeroAndOne) {
  SbmOptions o = opts(2000, 8, 4);
  o.homophily = 1.0;
  EXPECT_DOUBLE_EQ(make_sbm(o).edge_homophily(), 1.0);
  o.homophily = 0.0;
  EXPECT_DOUBLE_EQ(make_sbm(o).edge_homophily(), 0.0);
}

TEST(Sbm, SameOutputWhateverTheThreads) {
  const int before = omp_get_max_threads();
  omp_set_num_threads(1);
  const SbmGraph a = make_sbm(opts(4000, 6, 2, 3));
  omp_set_num_threads(std::max(2, before));
  const SbmGraph b = make_sbm(opts(4000, 6, 2, 3));
  omp_set_num_threads(before);
  EXPECT_EQ(a.edge_index, b.edge_index);
  EXPECT_EQ(a.block, b.block);
  EXPECT_TRUE(a.x == b.x);
  EXPECT_TRUE(a.ym == b.ym);
  SbmOptions o = opts(4000, 6, 2, 3);
  o.seed = 43;
  EXPECT_NE(make_sbm(o).edge_index, a.edge_index);
}

TEST(Sbm, MultilabelTargetsDependOnBlock) {
  const SbmGraph g = make_sbm(opts(4000, 4, 2, 5));
  ASSERT_EQ(g.ym.rows(), 4000);
  ASSERT_EQ(g.ym.cols(), 5);
  double diff = 0;
  for (Index t = 0; t < 5; ++t) {
    double r[2] = {0, 0}, c[2] = {0, 0};
    for (Index i = 0; i < 4000; ++i) {
      const float v = g.ym(i, t);
      ASSERT_TRUE(v == 0.0f || v == 1.0f);
      r[g.block[i]] += v;
      c[g.block[i]] += 1;
    }
    diff += std::abs(r[0] / c[0] - r[1] / c[1]);
  }
  EXPECT_GT(diff / 5, 0.1);  // rates drawn per (block, task) from U(0.05, 0.95)
}

TEST(Sbm, RejectsBadOptions) {
  EXPECT_THROW(make_sbm(opts(1, 4, 1)), Error);
  EXPECT_THROW(make_sbm(opts(100, -1, 2)), Error);
  SbmOptions o = opts(100, 4, 2);
  o.homophily = 1.5;
  EXPECT_THROW(make_sbm(o), Error);
}

TEST_F(SynthFiles, NpzRoundTripThroughBothReaders) {
  const SbmGraph g = make_sbm(opts(500, 6, 3));
  const std::string p = file("g.npz");
  write_sbm_npz(p, g, false);
  EXPECT_FALSE(fs::exists(p + ".tmp"));
  const Npz z = read_npz(p);  // the project's reader (numpy layout)
  EXPECT_EQ(z.at("y").to_i64("y"), g.block);
  EXPECT_EQ(z.at("edge_index").to_i64("edge_index"), g.edge_index);
  EXPECT_TRUE(z.at("x").to_mat("x") == g.x);
  write_sbm_npz(p, g, true);  // deflated members stream too
  const LargeDataset d = load_large_npz(p, GraphPrep{false, false});
  EXPECT_TRUE(d.x == g.x);
  EXPECT_EQ(d.targets.y, g.block);
  EXPECT_EQ(d.graph.edges(), g.edges());
  const SbmGraph m = make_sbm(opts(300, 4, 2, 7));
  write_sbm_npz(p, m, false);
  const LargeDataset dm = load_large_npz(p, GraphPrep{});
  ASSERT_TRUE(dm.targets.multilabel);
  EXPECT_TRUE(dm.targets.ym == m.ym);
}

TEST_F(SynthFiles, SynthAndTrainLargeCommandsWriteJson) {
  const std::string cli = DIFFORMER_CLI;
  const std::string data = file("s.npz"), sj = file("s.json"), tj = file("t.json");
  const std::string synth = cli + " synth --nodes 3000 --avg-degree 8 --features 8 --classes 2 --homophily 0.9 "
                                  "--signal 2 --seed 3 --out " + data + " --json " + sj + " --quiet";
  ASSERT_EQ(std::system(synth.c_str()), 0) << synth;
  nlohmann::json s = nlohmann::json::parse(std::ifstream(sj));
  EXPECT_EQ(s["nodes"], 3000);
  EXPECT_GT(s["edges"].get<long>(), 23000);
  const std::string train = cli + " train-large --data " + data +
                             " --preset pokec-s --hidden 16 --batch-size 1000 --epochs 4 --eval-every 2 --runs 2 --threads 1 "
                            "--json " + tj + " --quiet > /dev/null";
  ASSERT_EQ(std::system(train.c_str()), 0) << train;
  nlohmann::json t = nlohmann::json::parse(std::ifstream(tj));
  EXPECT_EQ(t["metric"], "accuracy");
  EXPECT_EQ(t["preset"], "pokec-s");
  EXPECT_EQ(t["model"]["hidden"], 16);  // the flag overrides the preset
  EXPECT_EQ(t["model"]["layers"], 3);   // the preset's
  EXPECT_EQ(t["runs"].size(), 2u);
  EXPECT_EQ(t["chunks_per_epoch"], 3);
  EXPECT_EQ(t["split"], "ratio:0.50,0.25");
  EXPECT_GT(t["test_mean"].get<double>(), 0.7);
  for (const char* k : {"test_std", "seconds_per_epoch", "ms_per_epoch", "eval_seconds", "peak_rss_bytes",
                        "train_peak_rss_bytes", "eval_peak_rss_bytes", "estimate"})
    EXPECT_TRUE(t.contains(k)) << k;
  EXPECT_GT(t["eval_peak_rss_bytes"].get<long>(), 0);
  // an unknown preset is an error that lists the known ones
  const std::string bad = cli + " train-large --data " + data + " --preset nope --quiet 2> " + file("err.txt");
  EXPECT_NE(std::system(bad.c_str()), 0);
  std::ifstream err(file("err.txt"));
  const std::string msg((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
  EXPECT_NE(msg.find("proteins-s"), std::string::npos) << msg;
}
