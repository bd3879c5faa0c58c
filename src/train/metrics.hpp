// Evaluation metrics of node-level tasks (SPEC.md section 3, large graphs): accuracy, binary
// ROC-AUC, and multi-task ROC-AUC averaged over the tasks that have both classes among the
// evaluated nodes (the rule of the OGB evaluator and of the official eval_rocauc).
//
// ROC-AUC is the Mann-Whitney rank formula with average ranks for tied scores:
//   AUC = (sum of the ranks of the positives - P (P + 1) / 2) / (P * Q)
// (P positives, Q negatives), which is what sklearn.metrics.roc_auc_score returns, ties included.
// Not here: losses (cpu::cross_entropy / cpu::bce_with_logits in ops.hpp) and model selection.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.hpp"

namespace dfm {

enum class Metric { accuracy, rocauc };
Metric parse_metric(const std::string& s);  // accuracy|acc, rocauc|auc; throws naming --metric
const char* metric_name(Metric m);

// Binary ROC-AUC of `score` against labels in {0, 1}; NaN when either class is absent.
double roc_auc(const std::vector<float>& score, const std::vector<std::uint8_t>& label);

// Accuracy of argmax(logits) against class labels over the rows in idx (0 when idx is empty).
double accuracy_classes(const Mat& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx);
// Multi-label accuracy: the fraction of (row, task) pairs with (logit > 0) == (y == 1); NaN
// targets are skipped.
double accuracy_multilabel(const Mat& logits, const Mat& y, const std::vector<std::int64_t>& idx);

// ROC-AUC of multi-label logits [N, T] against y [N, T] (0/1, NaN = unlabeled) over rows idx:
// the mean over the tasks having at least one positive and one negative labelled row there.
// tasks_used (optional) receives how many tasks entered the mean; NaN when none did.
double rocauc_multilabel(const Mat& logits, const Mat& y, const std::vector<std::int64_t>& idx,
                         int* tasks_used = nullptr);
// ROC-AUC of class logits [N, C]: C = 2 scores each row by logit_1 - logit_0 (a monotone map of
// softmax p_1, as the official code uses); C > 2 is the one-vs-rest mean over classes present
// with both signs, scored by softmax probabilities. Rows with a negative label are skipped.
double rocauc_classes(const Mat& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx,
                      int* classes_used = nullptr);

}  // namespace dfm
