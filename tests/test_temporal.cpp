// Spatio-temporal regression: a dynamic-graph (edge_ptr) file run through the loader and the
// trainer equals the same protocol written out by hand over hand-built per-snapshot graphs; the
// paper's broadcast MSE and its gradient; the chronological split; input errors naming the input.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "core/context.hpp"
#include "core/error.hpp"
#include "data/npz.hpp"
#include "data/temporal_data.hpp"
#include "test_util.hpp"
#include "train/temporal.hpp"

namespace dfm {
namespace {

namespace fs = std::filesystem;

// A small dynamic-graph data set kept in plain arrays, so the test can build each snapshot's graph
// itself.
struct Synthetic {
  Index T = 9, N = 7, L = 3;
  std::vector<float> x, y, w;
  std::vector<std::int64_t> src, dst, ptr, train{0, 1, 2, 3}, val{4, 5}, test{6, 7, 8};

  explicit Synthetic(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> g;
    std::uniform_int_distribution<int> node(0, static_cast<int>(N) - 1);
    std::uniform_real_distribution<float> weight(0.5f, 2.0f);
    x.resize(static_cast<size_t>(T * N * L));
    y.resize(static_cast<size_t>(T * N));
    for (auto& v : x) v = g(rng);
    for (Index t = 0; t < T; ++t)
      for (Index i = 0; i < N; ++i) {  // a target the lags and a neighbour predict
        const float* xi = &x[(t * N + i) * L];
        y[t * N + i] = 0.6f * xi[L - 1] - 0.3f * xi[0] + 0.2f * g(rng);
      }
    ptr.push_back(0);
    for (Index t = 0; t < T; ++t) {
      const int count = t == 3 ? 0 : 3 + static_cast<int>((t * 5) % 9);  // snapshot 3 has no edges
      for (int e = 0; e < count; ++e) {
        src.push_back(node(rng));
        dst.push_back(node(rng));
        w.push_back(weight(rng));
      }
      ptr.push_back(static_cast<std::int64_t>(src.size()));
    }
  }

  std::map<std::string, NpyArray> arrays() const {
    const Index E = static_cast<Index>(src.size());
    std::vector<std::int64_t> ei(src);
    ei.insert(ei.end(), dst.begin(), dst.end());
    return {{"x", NpyArray::from_f32({T, N, L}, x.data())},
            {"y", NpyArray::from_f32({T, N}, y.data())},
            {"edge_index", NpyArray::from_i64({2, E}, ei.data())},
            {"edge_weight", NpyArray::from_f32({E}, w.data())},
            {"edge_ptr", NpyArray::from_i64({T + 1}, ptr.data())},
            {"train_idx", NpyArray::from_i64({4}, train.data())},
            {"val_idx", NpyArray::from_i64({2}, val.data())},
            {"test_idx", NpyArray::from_i64({3}, test.data())}};
  }

  // Snapshot t's operator, built from its own slice of the edge arrays.
  GraphOp graph_by_hand(Index t) const {
    std::vector<std::int64_t> s(src.begin() + ptr[t], src.begin() + ptr[t + 1]);
    std::vector<std::int64_t> d(dst.begin() + ptr[t], dst.begin() + ptr[t + 1]);
    std::vector<float> ww(w.begin() + ptr[t], w.begin() + ptr[t + 1]);
    return make_graph_op<float>(N, s, d, &ww);
  }
  Mat x_of(Index t) const { return ConstMatMap(x.data() + t * N * L, N, L); }
  Mat y_of(Index t) const { return ConstMatMap(y.data() + t * N, N, 1); }
};

ModelConfig small_config(Kernel kernel, Index lags) {
  ModelConfig c;
  c.in_features = lags;
  c.out_features = 1;
  c.hidden = 5;
  c.layers = 2;
  c.heads = 1;
  c.kernel = kernel;
  c.use_graph = true;
  c.use_weight = false;
  c.dropout = 0.0f;  // so the hand loop needs no dropout seeds
  return c;
}

struct HandResult {
  FloatBuffer params;
  double test_mse = 0, test_paper = 0;
  int best_epoch = -1;
};

// SPEC's temporal protocol written out plainly: mean over training snapshots of the per-node
// MSE, gradients accumulated and one Adam step per epoch (or a step per snapshot), early stopping
// on the validation MSE, best weights restored, test MSE averaged over the test snapshots.
HandResult hand_train(const ModelConfig& cfg, std::uint64_t seed, const std::vector<ModelInput>& in,
                      const std::vector<Mat>& y, const Synthetic& s, int epochs, int patience, float lr,
                      bool step_per_snapshot) {
  DIFFormer m(cfg);
  std::mt19937_64 rng(seed);
  m.init(rng);
  AdamOptions ao;
  ao.lr = lr;
  Adam adam(ao);
  double best = std::numeric_limits<double>::infinity();
  int bad = 0;
  HandResult h;
  auto mse_over = [&](const std::vector<std::int64_t>& idx, double* paper) {
    double sum = 0, psum = 0;
    for (auto t : idx) {
      Mat out;
      m.forward(in[t], false, 0, nullptr, out);
      double e = 0, p = 0;
      for (Index i = 0; i < s.N; ++i) {
        e += std::pow(double(out(i, 0)) - y[t](i, 0), 2);
        for (Index j = 0; j < s.N; ++j) p += std::pow(double(out(i, 0)) - y[t](j, 0), 2);
      }
      sum += e / s.N;
      psum += p / (s.N * s.N);
    }
    if (paper) *paper = psum / idx.size();
    return sum / idx.size();
  };
  for (int epoch = 0; epoch < epochs; ++epoch) {
    if (!step_per_snapshot) m.params.zero_grad();
    for (auto t : s.train) {
      if (step_per_snapshot) m.params.zero_grad();
      ForwardState st;
      Mat out;
      m.forward(in[t], true, 0, &st, out);
      Mat d = (out - y[t]) * (2.0f / s.N);
      if (!step_per_snapshot) d /= static_cast<float>(s.train.size());
      m.backward(in[t], st, d);
      if (step_per_snapshot) adam.step(m.params);
    }
    if (!step_per_snapshot) adam.step(m.params);
    const double v = mse_over(s.val, nullptr);
    if (v < best) {
      best = v;
      bad = 0;
      h.best_epoch = epoch;
      h.params = m.params.values;
    } else if (++bad >= patience) {
      break;
    }
  }
  m.params.values = h.params;
  h.test_mse = mse_over(s.test, &h.test_paper);
  return h;
}

double max_abs_diff(const FloatBuffer& a, const FloatBuffer& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::abs(double(a[i]) - b[i]));
  return m;
}

class TemporalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dfm_temporal_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
    // Snapshots of 7 nodes: one thread (OpenMP fork/join per op dominates, worse on a busy machine).
    Context(0, 1).apply_threads();
  }
  void TearDown() override {
    fs::remove_all(dir_);
#ifdef _OPENMP
    omp_set_num_threads(omp_get_num_procs());
#endif
  }
  std::string file(const std::string& name) const { return (dir_ / name).string(); }
  // Writes `arrays` and returns the loader's error message ("" when it loads).
  std::string load_error(const std::map<std::string, NpyArray>& arrays) {
    const std::string p = file("bad.npz");
    write_npz(p, arrays);
    try {
      load_temporal_dataset(p);
      temporal_split(load_temporal_dataset(p));
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  }
  int run_cli(const std::string& args, std::string& output) {
    const std::string out = file("cli.txt");
    const int rc = std::system((std::string(DIFFORMER_CLI) + " " + args + " > " + out + " 2>&1").c_str());
    std::ifstream f(out);
    std::stringstream ss;
    ss << f.rdbuf();
    output = ss.str();
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }
  fs::path dir_;
};

TEST_F(TemporalTest, DynamicGraphRunEqualsHandBuiltSnapshotGraphs) {
  const Synthetic s(7);
  const std::string p = file("dyn.npz");
  write_npz(p, s.arrays());
  const TemporalDataset d = load_temporal_dataset(p);
  ASSERT_TRUE(d.dynamic());
  const SnapshotGraphs graphs = snapshot_graphs(d);
  ASSERT_EQ(graphs.ops.size(), static_cast<size_t>(s.T));
  const TemporalSplit split = temporal_split(d);
  EXPECT_EQ(split.train, s.train);
  EXPECT_EQ(split.test, s.test);

  // The loader's inputs, and inputs made by hand from the plain arrays.
  std::vector<GraphOp> hand_ops;
  std::vector<Mat> hand_x, hand_y;
  for (Index t = 0; t < s.T; ++t) {
    hand_ops.push_back(s.graph_by_hand(t));
    hand_x.push_back(s.x_of(t));
    hand_y.push_back(s.y_of(t));
  }
  std::vector<ModelInput> in_file(s.T), in_hand(s.T);
  for (Index t = 0; t < s.T; ++t) {
    in_file[t].dense = &d.x[t];
    in_file[t].graph = graphs.of(t);
    in_hand[t].dense = &hand_x[t];
    in_hand[t].graph = &hand_ops[t];
  }
  for (Kernel kernel : {Kernel::simple, Kernel::sigmoid}) {
    SCOPED_TRACE(kernel_name(kernel));
    const ModelConfig cfg = small_config(kernel, s.L);
    TemporalOptions opt;
    opt.epochs = 30;
    opt.patience = 5;
    opt.adam.lr = 0.02f;
    DIFFormer a(cfg), b(cfg);
    std::mt19937_64 ra(11), rb(11);
    a.init(ra);
    b.init(rb);
    const TemporalRunResult res_file = train_temporal(a, in_file, d.y, split, opt, 11);
    const TemporalRunResult res_hand_graphs = train_temporal(b, in_hand, hand_y, split, opt, 11);
    EXPECT_EQ(res_file.best_params, res_hand_graphs.best_params);  // bitwise: the same graphs
    EXPECT_EQ(res_file.test.mse, res_hand_graphs.test.mse);

    const HandResult h = hand_train(cfg, 11, in_hand, hand_y, s, opt.epochs, opt.patience, opt.adam.lr, false);
    EXPECT_EQ(res_file.best_epoch, h.best_epoch);
    EXPECT_LT(max_abs_diff(res_file.best_params, h.params), 1e-5);
    EXPECT_NEAR(res_file.test.mse, h.test_mse, 1e-5 * h.test_mse);
    EXPECT_NEAR(res_file.test.paper_mse, h.test_paper, 1e-5 * h.test_paper);
    EXPECT_GT(res_file.best_epoch, 0) << "the run should learn something";

    // The per-snapshot graphs matter: snapshot 5 through snapshot 0's graph gives other outputs.
    Mat own, other;
    a.forward(in_file[5], false, 0, nullptr, own);
    ModelInput wrong = in_file[5];
    wrong.graph = graphs.of(0);
    a.forward(wrong, false, 0, nullptr, other);
    EXPECT_GT((own - other).norm(), 1e-4);
  }
}

TEST_F(TemporalTest, StepPerSnapshotMatchesHandLoopAndDiffers) {
  const Synthetic s(8);
  std::vector<GraphOp> ops;
  std::vector<Mat> xs, ys;
  for (Index t = 0; t < s.T; ++t) {
    ops.push_back(s.graph_by_hand(t));
    xs.push_back(s.x_of(t));
    ys.push_back(s.y_of(t));
  }
  std::vector<ModelInput> in(s.T);
  for (Index t = 0; t < s.T; ++t) in[t] = ModelInput{&xs[t], nullptr, nullptr, &ops[t]};
  const TemporalSplit split{s.train, s.val, s.test};
  const ModelConfig cfg = small_config(Kernel::simple, s.L);
  TemporalOptions opt;
  opt.epochs = 12;
  opt.patience = 100;
  opt.adam.lr = 0.01f;
  opt.step_per_snapshot = true;
  DIFFormer a(cfg);
  std::mt19937_64 r(3);
  a.init(r);
  const TemporalRunResult per_snapshot = train_temporal(a, in, ys, split, opt, 3);
  const HandResult h = hand_train(cfg, 3, in, ys, s, opt.epochs, opt.patience, opt.adam.lr, true);
  EXPECT_LT(max_abs_diff(per_snapshot.best_params, h.params), 1e-5);
  const HandResult accumulated = hand_train(cfg, 3, in, ys, s, opt.epochs, opt.patience, opt.adam.lr, false);
  EXPECT_GT(max_abs_diff(per_snapshot.best_params, accumulated.params), 1e-4);
}

TEST_F(TemporalTest, CliRunOnDynamicFileEqualsHandRun) {
  const Synthetic s(9);
  const std::string p = file("dyn.npz"), js = file("out.json");
  write_npz(p, s.arrays());
  std::string out;
  ASSERT_EQ(run_cli("train --data " + p + " --kernel simple --layers 2 --hidden 5 --dropout 0 --lr 0.02 "
                    "--weight-decay 0 --epochs 25 --patience 4 --runs 1 --seed 5 --threads 1 --quiet --json " + js,
                    out),
            0)
      << out;
  std::ifstream f(js);
  const auto j = nlohmann::json::parse(f);
  EXPECT_EQ(j["task"], "temporal");  // detected from x [T, N, L]
  EXPECT_EQ(j["metric"], "mse");
  EXPECT_EQ(j["graph"], "dynamic");
  EXPECT_EQ(j["split"]["source"], "file");

  std::vector<GraphOp> ops;
  std::vector<Mat> xs, ys;
  for (Index t = 0; t < s.T; ++t) {
    ops.push_back(s.graph_by_hand(t));
    xs.push_back(s.x_of(t));
    ys.push_back(s.y_of(t));
  }
  std::vector<ModelInput> in(s.T);
  for (Index t = 0; t < s.T; ++t) in[t] = ModelInput{&xs[t], nullptr, nullptr, &ops[t]};
  const HandResult h = hand_train(small_config(Kernel::simple, s.L), 5, in, ys, s, 25, 4, 0.02f, false);
  EXPECT_NEAR(j["test_mean"].get<double>(), h.test_mse, 1e-5 * h.test_mse);
  EXPECT_NEAR(j["paper_mse_mean"].get<double>(), h.test_paper, 1e-5 * h.test_paper);
  EXPECT_EQ(j["runs"][0]["best_epoch"].get<int>(), h.best_epoch);
  for (const char* key : {"test_std", "paper_mse_std", "ms_per_epoch", "seconds_per_epoch", "peak_rss_bytes", "settings"})
    EXPECT_TRUE(j.contains(key)) << key;
}

// --rng torch draws the initialisation and dropout masks as the PyTorch reference does after
// torch.manual_seed(run): the bundled chickenpox preset then gives the reference's own per-run
// test MSE. The reference's figures: dev/cuda/sigmoid_chunked.h200.log (peer_temporal_seeds.py,
// torch 2.11 on the H200 host's CPU, printed to 4 decimals). The default stream gives other runs
// (0.8336 and 0.8615 for chickenpox-s seeds 0 and 1), so the test fails if --rng is ignored.
TEST_F(TemporalTest, TorchStreamGivesTheReferenceRunsOnChickenpox) {
  const std::map<std::string, std::vector<double>> peer{{"chickenpox-s", {0.8267, 0.8547}},
                                                       {"chickenpox-a", {0.7916, 0.8025}}};
  for (const auto& [preset, mse] : peer) {
    const std::string js = file(preset + ".json");
    std::string out;
    ASSERT_EQ(run_cli("train --preset " + preset + " --data-dir " + test::source_path("data") +
                          " --rng torch --runs 2 --threads 1 --quiet --json " + js,
                      out),
              0)
        << out;
    std::ifstream f(js);
    const auto j = nlohmann::json::parse(f);
    EXPECT_EQ(j["settings"]["rng"], "torch");
    for (size_t r = 0; r < mse.size(); ++r)
      EXPECT_NEAR(j["runs"][r]["test"].get<double>(), mse[r], 1.5e-4) << preset << " seed " << r;
  }
}

TEST_F(TemporalTest, RngFlagIsChecked) {
  std::string out;
  EXPECT_NE(run_cli("train --preset chickenpox-s --data-dir " + test::source_path("data") + " --rng numpy", out), 0);
  EXPECT_NE(out.find("--rng: expected default or torch, got 'numpy'"), std::string::npos) << out;
  EXPECT_NE(run_cli("train --preset cora-s --data-dir " + test::source_path("data") + " --rng torch --device cuda", out),
            0);
  EXPECT_NE(out.find("--rng torch"), std::string::npos) << out;
}

TEST(TemporalMetric, PaperMseIsTheBroadcastErrorAndItsGradient) {
  std::mt19937_64 rng(1);
  std::normal_distribution<float> g;
  Mat p(13, 1), y(13, 1);
  for (Index i = 0; i < 13; ++i) {
    p(i, 0) = g(rng);
    y(i, 0) = g(rng);
  }
  double naive = 0;
  for (Index i = 0; i < 13; ++i)
    for (Index j = 0; j < 13; ++j) naive += std::pow(double(p(i, 0)) - y(j, 0), 2);
  naive /= 169.0;
  EXPECT_NEAR(paper_mse(p, y), naive, 1e-12 * naive);
  Mat grad;
  paper_mse_grad(p, y, 1.0f, grad);
  for (Index i = 0; i < 13; ++i) {
    Mat pp = p, pm = p;
    const float h = 1e-2f;
    pp(i, 0) += h;
    pm(i, 0) -= h;
    const double fd = (paper_mse(pp, y) - paper_mse(pm, y)) / (double(pp(i, 0)) - pm(i, 0));
    EXPECT_NEAR(grad(i, 0), fd, 1e-4) << i;
  }
  // The identity mean_ij (p_i - y_j)^2 = mean_i (p_i - mean y)^2 + var(y).
  const double ym = y.cast<double>().mean();
  const double var = (y.cast<double>().array() - ym).square().mean();
  const double ident = (p.cast<double>().array() - ym).square().mean() + var;
  EXPECT_NEAR(paper_mse(p, y), ident, 1e-9);
}

TEST(TemporalSplit, ChronologicalDefaultWhenTheFileHasNone) {
  TemporalDataset d;
  d.path = "mem";
  d.snapshots = 517;  // Chickenpox: the file's own split is 103 / 103 / 311
  TemporalSplit s = temporal_split(d);
  EXPECT_EQ(s.train.size(), 103u);
  EXPECT_EQ(s.val.size(), 103u);
  EXPECT_EQ(s.test.size(), 311u);
  EXPECT_EQ(s.train.back(), 102);
  EXPECT_EQ(s.val.front(), 103);
  EXPECT_EQ(s.test.front(), 206);
  EXPECT_EQ(s.test.back(), 516);
  d.snapshots = 53;  // Covid: 10 / 10 / 33
  s = temporal_split(d);
  EXPECT_EQ(s.train.size(), 10u);
  EXPECT_EQ(s.val.size(), 10u);
  EXPECT_EQ(s.test.size(), 33u);
  d.snapshots = 3;  // too short: an error naming the source, not an empty set
  try {
    temporal_split(d);
    FAIL() << "3 snapshots accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("empty training set"), std::string::npos) << e.what();
  }
}

TEST_F(TemporalTest, RealChickenpoxLoadsWithItsSplitAndStaticGraph) {
  const TemporalDataset d = load_temporal_dataset(test::source_path("data/chickenpox.npz"));
  EXPECT_EQ(d.snapshots, 517);
  EXPECT_EQ(d.nodes, 20);
  EXPECT_EQ(d.lags, 4);
  EXPECT_FALSE(d.dynamic());
  EXPECT_EQ(d.src.size(), 102u);
  const TemporalSplit s = temporal_split(d);
  EXPECT_EQ(s.train.size(), 103u);
  EXPECT_EQ(s.val.size(), 103u);
  EXPECT_EQ(s.test.size(), 311u);
  const SnapshotGraphs g = snapshot_graphs(d);
  ASSERT_EQ(g.ops.size(), 1u);
  EXPECT_EQ(g.of(0), g.of(400));
  // x[t] lags are the series shifted: the last lag of snapshot t+1 is y of snapshot t.
  for (Index i = 0; i < d.nodes; ++i) EXPECT_EQ(d.x[1](i, d.lags - 1), d.y[0](i, 0));
}

TEST_F(TemporalTest, BadInputsAreNamed) {
  const Synthetic s(1);
  auto arrays = s.arrays();
  auto expect_error = [&](const std::map<std::string, NpyArray>& a, const std::string& what) {
    const std::string msg = load_error(a);
    EXPECT_NE(msg.find(what), std::string::npos) << "expected '" << what << "' in: '" << msg << "'";
    EXPECT_NE(msg.find("bad.npz"), std::string::npos) << "the message must name the file: " << msg;
  };
  // edge_ptr of length T instead of T+1
  auto a = arrays;
  a["edge_ptr"] = NpyArray::from_i64({s.T}, s.ptr.data());
  expect_error(a, "edge_ptr has shape [9], expected [T+1] = [10]");
  // edge_ptr decreasing
  std::vector<std::int64_t> ptr = s.ptr;
  std::swap(ptr[2], ptr[5]);
  a = arrays;
  a["edge_ptr"] = NpyArray::from_i64({s.T + 1}, ptr.data());
  expect_error(a, "edge_ptr is not monotone");
  // edge_ptr not covering the edges
  ptr = s.ptr;
  ptr.back() -= 1;
  a = arrays;
  a["edge_ptr"] = NpyArray::from_i64({s.T + 1}, ptr.data());
  expect_error(a, "expected the number of edges");
  // x of rank 2
  a = arrays;
  a["x"] = NpyArray::from_f32({s.T * s.N, s.L}, s.x.data());
  expect_error(a, "x has shape [63, 3], expected 3 dimensions [T, N, L]");
  // y not [T, N]
  a = arrays;
  a["y"] = NpyArray::from_f32({s.T * s.N}, s.y.data());
  expect_error(a, "y has shape [63], expected [T, N] = [9, 7]");
  // empty validation split
  a = arrays;
  const std::int64_t none = 0;
  a["val_idx"] = NpyArray::from_i64({0}, &none);
  expect_error(a, "empty validation set");
  // snapshot index out of range
  std::vector<std::int64_t> test_idx{6, 7, 9};
  a = arrays;
  a["test_idx"] = NpyArray::from_i64({3}, test_idx.data());
  expect_error(a, "test_idx: snapshot index 9 out of range [0, 9)");
  // overlapping splits
  std::vector<std::int64_t> val_idx{3, 4};
  a = arrays;
  a["val_idx"] = NpyArray::from_i64({2}, val_idx.data());
  expect_error(a, "snapshot 3 is listed twice");
  // edge out of range
  std::vector<std::int64_t> ei(s.src);
  ei.insert(ei.end(), s.dst.begin(), s.dst.end());
  ei[0] = 7;
  a = arrays;
  a["edge_index"] = NpyArray::from_i64({2, static_cast<Index>(s.src.size())}, ei.data());
  expect_error(a, "is out of range for 7 nodes");
}

}  // namespace
}  // namespace dfm
