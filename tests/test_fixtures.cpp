// Golden end-to-end tests: the float32 CPU model against the float64 fixtures exported from the
// PyTorch peer (tests/fixtures/README.md): hidden states, logits, loss, every gradient and the
// parameters after one Adam step, each within relative error 1e-4 (norm of the difference over
// norm of the reference, per tensor).
#include <gtest/gtest.h>

#include "data/npz.hpp"
#include "model/difformer.hpp"
#include "test_util.hpp"
#include "train/adam.hpp"

namespace dfm {
namespace {

constexpr double kTol = 1e-4;

class Fixture : public ::testing::TestWithParam<std::string> {};

void run_fixture(const std::string& file, bool sparse_input, bool allow_folded = true) {
  const Npz z = read_npz(test::source_path("tests/fixtures/" + file));
  auto scalar = [&](const char* name) { return z.at(name).to_f64(name)[0]; };
  ModelConfig cfg;
  cfg.in_features = static_cast<Index>(scalar("cfg__in_channels"));
  cfg.hidden = static_cast<Index>(scalar("cfg__hidden_channels"));
  cfg.out_features = static_cast<Index>(scalar("cfg__out_channels"));
  cfg.layers = static_cast<int>(scalar("cfg__num_layers"));
  cfg.heads = static_cast<int>(scalar("cfg__num_heads"));
  cfg.kernel = scalar("cfg__kernel_is_sigmoid") != 0 ? Kernel::sigmoid : Kernel::simple;
  cfg.use_graph = scalar("cfg__use_graph") != 0;
  cfg.alpha = static_cast<float>(scalar("cfg__alpha"));
  cfg.use_weight = true;
  cfg.dropout = 0.0f;
  cfg.allow_folded = allow_folded;
  DIFFormer model(cfg);
  for (size_t s = 0; s < model.params.slots.size(); ++s) {
    const auto& slot = model.params.slots[s];
    const std::string name = test::fixture_name(slot.name);
    const Mat p = z.at(name).to_mat(name);
    ASSERT_EQ(p.size(), slot.size()) << slot.name;
    model.params.mat(static_cast<int>(s)) = Eigen::Map<const Mat>(p.data(), slot.rows, slot.cols);
  }
  const Mat x = z.at("x").to_mat("x");
  const auto y = z.at("y").to_i64("y");
  const auto ei = z.at("edge_index").to_i64("edge_index");
  const Index n = x.rows(), e = static_cast<Index>(ei.size() / 2);
  std::vector<std::int64_t> src(ei.begin(), ei.begin() + e), dst(ei.begin() + e, ei.end());
  GraphOp graph = make_graph_op<float>(n, src, dst);
  const Csr xs = test::dense_to_csr(x), xs_t = csr_transpose(xs);
  ModelInput in;
  if (sparse_input) {
    in.sparse = &xs;
    in.sparse_t = &xs_t;
  } else {
    in.dense = &x;
  }
  if (cfg.use_graph) in.graph = &graph;

  ForwardState state;
  Mat logits;
  std::vector<Mat> hidden;
  model.forward(in, true, 0, &state, logits, &hidden);
  for (int l = 0; l <= cfg.layers; ++l) {
    const std::string name = "hidden__" + std::to_string(l);
    EXPECT_LE(test::rel_err(hidden[l], z.at(name).to_matd(name)), kTol) << file << " " << name;
  }
  EXPECT_LE(test::rel_err(logits, z.at("logits").to_matd("logits")), kTol) << file << " logits";

  std::vector<std::int64_t> all(static_cast<size_t>(n));
  for (Index i = 0; i < n; ++i) all[i] = i;
  Mat dlogits;
  const float loss = cpu::cross_entropy(logits, y, all, dlogits);
  EXPECT_NEAR(loss, scalar("loss"), kTol * std::abs(scalar("loss"))) << file << " loss";

  model.params.zero_grad();
  model.backward(in, state, dlogits);
  for (size_t s = 0; s < model.params.slots.size(); ++s) {
    const auto& slot = model.params.slots[s];
    const std::string name = "grad__" + test::fixture_name(slot.name);
    const MatD ref = z.at(name).to_matd(name);
    const MatD got = Eigen::Map<const Mat>(model.params.grads.data() + slot.offset, ref.rows(), ref.cols())
                         .cast<double>();
    EXPECT_LE(test::rel_err(got, ref), kTol) << file << " " << name << " |ref| = " << ref.norm();
  }

  Adam adam(AdamOptions{0.01f, 1e-3f});
  adam.step(model.params);
  for (size_t s = 0; s < model.params.slots.size(); ++s) {
    const auto& slot = model.params.slots[s];
    const std::string name = "adam1__" + test::fixture_name(slot.name);
    const MatD ref = z.at(name).to_matd(name);
    const MatD got = Eigen::Map<const Mat>(model.params.values.data() + slot.offset, ref.rows(), ref.cols())
                         .cast<double>();
    EXPECT_LE(test::rel_err(got, ref), kTol) << file << " " << name;
  }
}

TEST_P(Fixture, DenseInputMatchesPyTorch) { run_fixture(GetParam(), false); }
TEST_P(Fixture, SparseInputMatchesPyTorch) { run_fixture(GetParam(), true); }
// the simple-kernel fixtures take the folded kernel by default: check the plain path too
TEST_P(Fixture, PlainPathMatchesPyTorch) { run_fixture(GetParam(), true, false); }

INSTANTIATE_TEST_SUITE_P(Golden, Fixture,
                         ::testing::Values("difformer_small_simple_graph.npz", "difformer_small_simple_nograph.npz",
                                           "difformer_small_sigmoid_graph.npz",
                                           "difformer_small_sigmoid_nograph.npz", "difformer_n200_simple_graph.npz",
                                           "difformer_n200_sigmoid_graph.npz"),
                         [](const auto& info) {
                           std::string s = info.param.substr(10, info.param.size() - 14);
                           for (auto& c : s)
                             if (c == '.') c = '_';
                           return s;
                         });

}  // namespace
}  // namespace dfm
