// The node-classification protocol shared by `train --device cpu` and `--device cuda`
// (train_node_classifier over a NodeTrainBackend), driven by a scripted backend: the evaluation
// cadence, the FIRST epoch of best validation wins and its parameters are the ones kept, the
// dropout seed of each epoch, and divergence stops the run with a message.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/error.hpp"
#include "train/trainer.hpp"

namespace dfm {
namespace {

// Nodes 0..1 train, 2..5 validation, 6..9 test, all of class 1. At epoch e the logits predict
// class 1 for the first val_ok[e] validation and test_ok[e] test nodes, class 0 elsewhere.
class Scripted final : public NodeTrainBackend {
 public:
  std::vector<int> val_ok, test_ok;
  std::vector<std::uint64_t> seeds;
  int nan_at = -1;
  int epoch = -1;
  float step(std::uint64_t dropout_seed) override {
    seeds.push_back(dropout_seed);
    ++epoch;
    return epoch == nan_at ? std::numeric_limits<float>::quiet_NaN() : 1.0f / (1 + epoch);
  }
  const Mat& eval_logits() override {
    logits = Mat::Zero(10, 2);
    for (int i = 0; i < 10; ++i) logits(i, 0) = 1;  // class 0
    for (int k = 0; k < val_ok[epoch]; ++k) logits(2 + k, 1) = 2;
    for (int k = 0; k < test_ok[epoch]; ++k) logits(6 + k, 1) = 2;
    ++evals;
    return logits;
  }
  void current_params(FloatBuffer& out) override { out = {static_cast<float>(epoch)}; }
  Mat logits;
  int evals = 0;
};

Split split10() {
  Split s;
  s.train = {0, 1};
  s.val = {2, 3, 4, 5};
  s.test = {6, 7, 8, 9};
  return s;
}

TEST(Trainer, FirstBestValidationEpochWinsWithItsParameters) {
  const std::vector<std::int64_t> y(10, 1);
  Scripted b;
  b.val_ok = {1, 3, 2, 3, 4, 4, 2};
  b.test_ok = {0, 1, 2, 3, 2, 4, 4};
  TrainOptions opt;
  opt.epochs = 7;
  std::vector<EpochReport> reps;
  const RunResult r = train_node_classifier(b, y, split10(), opt, 5, [&](const EpochReport& e) { reps.push_back(e); });
  ASSERT_EQ(reps.size(), 7u);
  EXPECT_EQ(r.best_epoch, 4);  // 4/4 first at epoch 4 (epoch 5 ties, later)
  EXPECT_DOUBLE_EQ(r.val, 1.0);
  EXPECT_DOUBLE_EQ(r.test, 0.5);
  ASSERT_EQ(r.best_params.size(), 1u);
  EXPECT_EQ(r.best_params[0], 4.0f);
  EXPECT_FLOAT_EQ(reps[2].loss, 1.0f / 3);
  EXPECT_DOUBLE_EQ(reps[1].val, 0.75);
  EXPECT_DOUBLE_EQ(reps[0].train, 0.0);
  for (int e = 0; e < 7; ++e) EXPECT_EQ(b.seeds[e], epoch_dropout_seed(5, e)) << e;
  EXPECT_EQ(epoch_dropout_seed(5, 3), 5ULL * 1000003ULL + 3);
  EXPECT_EQ(r.peak_device_bytes, 0);
}

TEST(Trainer, EvaluatesEveryKEpochsAndTheLast) {
  const std::vector<std::int64_t> y(10, 1);
  Scripted b;
  b.val_ok = {4, 1, 2, 1, 1, 3, 1};  // epoch 0 would win, but it is never evaluated
  b.test_ok = {4, 0, 1, 0, 0, 2, 0};
  TrainOptions opt;
  opt.epochs = 7;
  opt.eval_every = 3;
  std::vector<int> evaluated;
  const RunResult r =
      train_node_classifier(b, y, split10(), opt, 0, [&](const EpochReport& e) { evaluated.push_back(e.epoch); });
  EXPECT_EQ(evaluated, (std::vector<int>{2, 5, 6}));
  EXPECT_EQ(b.evals, 3);
  EXPECT_EQ(r.best_epoch, 5);
  EXPECT_DOUBLE_EQ(r.test, 0.5);
}

TEST(Trainer, DivergenceAndBadOptionsAreErrors) {
  const std::vector<std::int64_t> y(10, 1);
  Scripted b;
  b.val_ok.assign(5, 1);
  b.test_ok.assign(5, 1);
  b.nan_at = 2;
  TrainOptions opt;
  opt.epochs = 5;
  try {
    train_node_classifier(b, y, split10(), opt, 0);
    FAIL() << "a NaN loss must stop the run";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("training diverged: loss is nan at epoch 2"), std::string::npos) << e.what();
  }
  Scripted c;
  opt.eval_every = 0;
  EXPECT_THROW(train_node_classifier(c, y, split10(), opt, 0), Error);
  Split empty = split10();
  empty.train.clear();
  opt.eval_every = 1;
  EXPECT_THROW(train_node_classifier(c, y, empty, opt, 0), Error);
}

TEST(Trainer, PrecisionFlagValues) {
  EXPECT_NO_THROW(validate_precision("cpu", "fp32"));
  EXPECT_NO_THROW(validate_precision("cuda", "tf32"));
  EXPECT_NO_THROW(validate_precision("cuda", "bf16"));
  EXPECT_THROW(validate_precision("cpu", "bf16"), Error);
  EXPECT_THROW(validate_precision("cuda", "fp16"), Error);
}

}  // namespace
}  // namespace dfm
