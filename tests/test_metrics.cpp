// Tests of the node-task metrics (src/train/metrics.*): ROC-AUC against an independent pairwise
// reference (ties count one half, which is what the rank formula with average ranks gives and
// sklearn returns), hand-computed cases, the OGB multi-task rule, and accuracy.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "train/metrics.hpp"

using namespace dfm;

namespace {

// O(P * Q) definition: P(score_pos > score_neg) + 0.5 P(equal).
double pairwise_auc(const std::vector<float>& s, const std::vector<std::uint8_t>& l) {
  double num = 0, pairs = 0;
  for (size_t i = 0; i < s.size(); ++i)
    for (size_t j = 0; j < s.size(); ++j)
      if (l[i] && !l[j]) {
        pairs += 1;
        num += s[i] > s[j] ? 1.0 : (s[i] == s[j] ? 0.5 : 0.0);
      }
  return num / pairs;
}

}  // namespace

TEST(Metrics, RocAucHandComputed) {
  // sklearn's documented example: 0.75
  EXPECT_DOUBLE_EQ(roc_auc({0.1f, 0.4f, 0.35f, 0.8f}, {0, 0, 1, 1}), 0.75);
  // ties across classes: positives {0.5, 0.9, 0.5}, negatives {0.5, 0.2}: (0.5+1+1+1+0.5+1)/6
  EXPECT_NEAR(roc_auc({0.5f, 0.5f, 0.2f, 0.9f, 0.5f}, {0, 1, 0, 1, 1}), 5.0 / 6.0, 1e-12);
  // all scores tied: 0.5
  EXPECT_DOUBLE_EQ(roc_auc({1.f, 1.f, 1.f, 1.f}, {0, 1, 1, 0}), 0.5);
  // perfect and reversed
  EXPECT_DOUBLE_EQ(roc_auc({0.f, 1.f, 2.f, 3.f}, {0, 0, 1, 1}), 1.0);
  EXPECT_DOUBLE_EQ(roc_auc({3.f, 2.f, 1.f, 0.f}, {0, 0, 1, 1}), 0.0);
  // one class only: undefined
  EXPECT_TRUE(std::isnan(roc_auc({0.1f, 0.2f}, {1, 1})));
  EXPECT_TRUE(std::isnan(roc_auc({0.1f, 0.2f}, {0, 0})));
}

TEST(Metrics, RocAucMatchesPairwiseReferenceWithTies) {
  std::mt19937_64 rng(11);
  for (int trial = 0; trial < 30; ++trial) {
    const int n = 5 + static_cast<int>(rng() % 300);
    const int levels = 1 + static_cast<int>(rng() % 12);  // few distinct scores: many ties
    std::vector<float> s(n);
    std::vector<std::uint8_t> l(n);
    for (int i = 0; i < n; ++i) {
      s[i] = static_cast<float>(rng() % levels) * 0.25f;
      l[i] = (rng() % 3) == 0;
    }
    l[0] = 1;
    l[1] = 0;
    EXPECT_NEAR(roc_auc(s, l), pairwise_auc(s, l), 1e-12) << "trial " << trial;
  }
}

TEST(Metrics, MultilabelAveragesTasksWithBothClasses) {
  // 6 rows, 4 tasks: task 2 has only positives among the evaluated rows, task 3 only NaN/negatives.
  const float nan = std::nanf("");
  Mat y(6, 4), z(6, 4);
  y << 1, 0, 1, 0,  //
      0, 1, 1, nan,  //
      1, 1, 1, 0,    //
      0, 0, 1, 0,    //
      1, nan, 1, nan,  //
      0, 1, 0, 1;      // row 5 is not evaluated
  z << 0.9f, 0.1f, 0.3f, 0.0f,  //
      0.2f, 0.8f, 0.1f, 0.5f,   //
      0.7f, 0.2f, 0.9f, 0.1f,   //
      0.7f, 0.4f, 0.2f, 0.3f,   //
      0.6f, 0.9f, 0.4f, 0.2f,   //
      0.0f, 0.0f, 0.0f, 0.0f;
  const std::vector<std::int64_t> idx{0, 1, 2, 3, 4};
  int used = -1;
  const double got = rocauc_multilabel(z, y, idx, &used);
  EXPECT_EQ(used, 2);
  const double t0 = roc_auc({0.9f, 0.2f, 0.7f, 0.7f, 0.6f}, {1, 0, 1, 0, 1});
  const double t1 = roc_auc({0.1f, 0.8f, 0.2f, 0.4f}, {0, 1, 1, 0});  // row 4 is NaN: skipped
  EXPECT_NEAR(got, 0.5 * (t0 + t1), 1e-12);
  EXPECT_NEAR(t0, pairwise_auc({0.9f, 0.2f, 0.7f, 0.7f, 0.6f}, {1, 0, 1, 0, 1}), 1e-12);
  // no task with both classes: NaN and zero tasks
  EXPECT_TRUE(std::isnan(rocauc_multilabel(z, y, {5}, &used)));
  EXPECT_EQ(used, 0);
}

TEST(Metrics, BinaryClassRocAucUsesLogitMargin) {
  Mat z(5, 2);
  z << 0, 1,  //
      2, 0,   //
      0, 0,   //
      1, 3,   //
      5, 4;
  const std::vector<std::int64_t> y{1, 0, 1, -1, 0};  // row 3 unlabeled: skipped
  const double got = rocauc_classes(z, y, {0, 1, 2, 3, 4});
  EXPECT_NEAR(got, roc_auc({1.f, -2.f, 0.f, -1.f}, {1, 0, 1, 0}), 1e-12);
  EXPECT_NEAR(got, 1.0, 1e-12);
}

TEST(Metrics, MulticlassRocAucIsOneVsRestMean) {
  Mat z(6, 3);
  z << 3, 0, 0,  //
      0, 3, 0,   //
      0, 0, 3,   //
      2, 1, 0,   //
      0, 2, 1,   //
      1, 0, 2;
  const std::vector<std::int64_t> y{0, 1, 2, 0, 1, 2};
  int used = 0;
  EXPECT_NEAR(rocauc_classes(z, y, {0, 1, 2, 3, 4, 5}, &used), 1.0, 1e-12);
  EXPECT_EQ(used, 3);
}

TEST(Metrics, Accuracy) {
  Mat z(4, 3);
  z << 1, 2, 0,  //
      5, 5, 1,   // tie: the first maximum wins (torch.argmax)
      0, 0, 1,   //
      2, 0, 0;
  EXPECT_DOUBLE_EQ(accuracy_classes(z, {1, 0, 2, 1}, {0, 1, 2, 3}), 0.75);
  EXPECT_DOUBLE_EQ(accuracy_classes(z, {1, 1, 2, 1}, {1}), 0.0);
  Mat y(2, 2), m(2, 2);
  y << 1, 0, 0, std::nanf("");
  m << 0.5f, 0.2f, -1.f, 3.f;
  EXPECT_DOUBLE_EQ(accuracy_multilabel(m, y, {0, 1}), 2.0 / 3.0);
  EXPECT_EQ(parse_metric("acc"), Metric::accuracy);
  EXPECT_EQ(parse_metric("rocauc"), Metric::rocauc);
  EXPECT_THROW(parse_metric("f1"), std::runtime_error);
}
