// --rng torch: PyTorch's CPU random stream (core/torch_rng.hpp) against values torch drew
// (tests/fixtures/torch_rng.npz, written by tests/fixtures/make_torch_rng.py): nn.Linear's
// initial weights and F.dropout's masks bit for bit, and the reference DIFFormer's initial
// state_dict, two training forwards with dropout in a row and the first one's gradients.
#include <gtest/gtest.h>

#include "core/torch_rng.hpp"
#include "data/npz.hpp"
#include "model/difformer.hpp"
#include "test_util.hpp"
#include "train/trainer.hpp"

namespace dfm {
namespace {

const Npz& fixture() {
  static const Npz z = read_npz(test::source_path("tests/fixtures/torch_rng.npz"));
  return z;
}

TEST(TorchRng, LinearInitIsPyTorchsBitForBit) {
  for (auto [seed, in, out] : {std::tuple{0, 4, 4}, {3, 64, 7}, {11, 1433, 16}}) {
    const std::string key = "linear_" + std::to_string(seed) + "_" + std::to_string(in) + "_" + std::to_string(out);
    const Mat w_ref = fixture().at(key + "_w").to_mat(key), b_ref = fixture().at(key + "_b").to_mat(key);
    Mat w(out, in), b(out, 1);
    TorchCpuGenerator gen(seed);
    gen.linear_init(w.data(), b.data(), out, in);
    ASSERT_EQ(w_ref.rows(), out);
    EXPECT_EQ((w.array() != w_ref.array()).count(), 0) << key;
    EXPECT_EQ((b.array() != b_ref.array()).count(), 0) << key;
  }
}

TEST(TorchRng, DropoutMasksArePyTorchsBitForBit) {
  for (auto [seed, p10, n] : {std::tuple{0, 2, 80}, {1, 5, 5000}, {7, 3, 4096}, {9, 1, 1000}}) {
    const std::string key = "dropout_" + std::to_string(seed) + "_" + std::to_string(p10) + "_" + std::to_string(n);
    const auto ref = fixture().at(key).to_i64(key);
    std::vector<std::uint8_t> keep(static_cast<size_t>(n));
    TorchCpuGenerator gen(seed);
    gen.dropout_keep(keep.data(), n, static_cast<float>(p10) / 10.0f);
    ASSERT_EQ(static_cast<Index>(ref.size()), n);
    Index differ = 0;
    for (Index i = 0; i < n; ++i) differ += keep[i] != ref[i];
    EXPECT_EQ(differ, 0) << key;
  }
}

// The seed's low 32 bits alone seed the stream, as torch.manual_seed does.
TEST(TorchRng, SeedsByItsLow32Bits) {
  TorchCpuGenerator a(5), b((std::uint64_t{1} << 32) + 5), c(6);
  const std::uint32_t ra = a.random();
  EXPECT_EQ(ra, b.random());
  EXPECT_NE(ra, c.random());
}

// kind: simple (no Wv, one head: the folded kernel and its fused tail) or sigmoid (Wv, two heads:
// the generic tail). rows: the training forward restricted to the loss's rows.
void check_model(const std::string& kind, bool restrict_rows) {
  const Npz& z = fixture();
  const std::string pre = "model_" + kind + "_";
  const Mat x = z.at("x").to_mat("x");
  const auto y = z.at("y").to_i64("y");
  const auto ei = z.at("edge_index").to_i64("edge_index");
  const auto train = z.at("train_idx").to_i64("train_idx");
  const Index n = x.rows(), e = static_cast<Index>(ei.size() / 2);
  ModelConfig cfg;
  cfg.in_features = x.cols();
  cfg.hidden = 8;
  cfg.out_features = 3;
  cfg.layers = 2;
  cfg.heads = kind == "simple" ? 1 : 2;
  cfg.kernel = kind == "simple" ? Kernel::simple : Kernel::sigmoid;
  cfg.use_weight = kind != "simple";
  cfg.dropout = 0.3f;
  DIFFormer model(cfg);
  TorchCpuGenerator gen(static_cast<std::uint64_t>(z.at(pre + "seed").to_i64("seed")[0]));
  model.init_torch(gen);
  for (size_t s = 0; s < model.params.slots.size(); ++s) {
    const auto& slot = model.params.slots[s];
    const std::string name = pre + "init__" + test::fixture_name(slot.name);
    const Mat ref = z.at(name).to_mat(name);
    ASSERT_EQ(ref.size(), slot.size()) << name;
    const Eigen::Map<const Mat> got(model.params.ptr(static_cast<int>(s)), ref.rows(), ref.cols());
    EXPECT_EQ((got.array() != ref.array()).count(), 0) << name;
  }
  std::vector<std::int64_t> src(ei.begin(), ei.begin() + e), dst(ei.begin() + e, ei.end());
  const GraphOp graph = make_graph_op<float>(n, src, dst);
  ModelInput in;
  in.dense = &x;
  in.graph = &graph;
  const std::vector<Index> rows(train.begin(), train.end());
  ForwardState state;
  state.torch_dropout = &gen;
  Mat logits, dlogits;
  model.forward(in, true, 0, &state, logits, nullptr, restrict_rows ? &rows : nullptr);
  const Mat ref1 = z.at(pre + "logits1").to_mat("logits1");
  EXPECT_LE(test::rel_err(logits(rows, Eigen::all), ref1(rows, Eigen::all)), 1e-5) << kind << " logits1 train rows";
  if (!restrict_rows) {
    EXPECT_LE(test::rel_err(logits, ref1), 1e-5) << kind << " logits1";
  }
  cpu::cross_entropy(logits, y, train, dlogits);
  model.params.zero_grad();
  model.backward(in, state, dlogits);
  for (size_t s = 0; s < model.params.slots.size(); ++s) {
    const auto& slot = model.params.slots[s];
    const std::string name = pre + "grad__" + test::fixture_name(slot.name);
    const Mat ref = z.at(name).to_mat(name);
    const Eigen::Map<const Mat> got(model.params.grad_ptr(static_cast<int>(s)), ref.rows(), ref.cols());
    EXPECT_LE(test::rel_err(got, ref), 1e-4) << name << " |ref| = " << ref.norm();
  }
  // The stream goes on: the second forward draws the next masks, as the second F.dropout calls do.
  ForwardState state2;
  state2.torch_dropout = &gen;
  model.forward(in, true, 0, &state2, logits);
  EXPECT_LE(test::rel_err(logits, z.at(pre + "logits2").to_mat("logits2")), 1e-5) << kind << " logits2";
}

// The training step of `train --rng torch` (the CPU backend) draws its masks from the stream it is
// given, not from the dropout seed: its loss is the reference forward's.
TEST(TorchRng, CpuTrainStepDrawsFromTheStream) {
  const Npz& z = fixture();
  const Mat x = z.at("x").to_mat("x");
  const auto y = z.at("y").to_i64("y");
  const auto ei = z.at("edge_index").to_i64("edge_index");
  const Index n = x.rows(), e = static_cast<Index>(ei.size() / 2);
  std::vector<std::int64_t> src(ei.begin(), ei.begin() + e), dst(ei.begin() + e, ei.end());
  const GraphOp graph = make_graph_op<float>(n, src, dst);
  ModelInput in;
  in.dense = &x;
  in.graph = &graph;
  Split split;
  split.train = z.at("train_idx").to_i64("train_idx");
  split.val = {1, 2};
  split.test = {4, 5};
  ModelConfig cfg;
  cfg.in_features = x.cols();
  cfg.hidden = 8;
  cfg.out_features = 3;
  cfg.layers = 2;
  cfg.use_weight = false;
  cfg.dropout = 0.3f;
  DIFFormer model(cfg);
  TorchCpuGenerator gen(static_cast<std::uint64_t>(z.at("model_simple_seed").to_i64("seed")[0]));
  model.init_torch(gen);
  auto backend = make_cpu_backend(model, in, y, split, AdamOptions{}, &gen);
  const float loss = backend->step(12345);
  const Mat ref = z.at("model_simple_logits1").to_mat("logits1");
  Mat dref;
  const float ref_loss = cpu::cross_entropy(ref, y, split.train, dref);
  EXPECT_NEAR(loss, ref_loss, 1e-5 * ref_loss);
}

TEST(TorchRng, FoldedModelMatchesPyTorchWithDropout) { check_model("simple", false); }
TEST(TorchRng, FoldedModelOnTrainRowsMatchesPyTorchWithDropout) { check_model("simple", true); }
TEST(TorchRng, SigmoidModelMatchesPyTorchWithDropout) { check_model("sigmoid", false); }

}  // namespace
}  // namespace dfm
