#include "train/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.hpp"

namespace dfm {

Metric parse_metric(const std::string& s) {
  if (s == "accuracy" || s == "acc") return Metric::accuracy;
  if (s == "rocauc" || s == "auc" || s == "roc-auc") return Metric::rocauc;
  fail("--metric: unknown metric '", s, "', expected accuracy or rocauc");
}

const char* metric_name(Metric m) { return m == Metric::accuracy ? "accuracy" : "rocauc"; }

double roc_auc(const std::vector<float>& score, const std::vector<std::uint8_t>& label) {
  DFM_CHECK(score.size() == label.size(), "roc_auc: ", score.size(), " scores but ", label.size(), " labels");
  const size_t n = score.size();
  std::vector<std::uint32_t> order(n);
  std::iota(order.begin(), order.end(), 0u);
  std::sort(order.begin(), order.end(), [&](std::uint32_t a, std::uint32_t b) { return score[a] < score[b]; });
  double pos_rank_sum = 0;
  std::uint64_t pos = 0;
  for (size_t lo = 0; lo < n;) {
    size_t hi = lo + 1;
    while (hi < n && score[order[hi]] == score[order[lo]]) ++hi;
    const double avg_rank = 0.5 * static_cast<double>(lo + 1 + hi);  // ranks lo+1 .. hi, averaged
    for (size_t k = lo; k < hi; ++k)
      if (label[order[k]]) {
        pos_rank_sum += avg_rank;
        ++pos;
      }
    lo = hi;
  }
  const std::uint64_t neg = n - pos;
  if (pos == 0 || neg == 0) return std::numeric_limits<double>::quiet_NaN();
  const double p = static_cast<double>(pos), q = static_cast<double>(neg);
  return (pos_rank_sum - p * (p + 1.0) / 2.0) / (p * q);
}

double accuracy_classes(const Mat& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx) {
  if (idx.empty()) return 0.0;
  Index correct = 0;
#pragma omp parallel for reduction(+ : correct) schedule(static) if (idx.size() > 20000)
  for (size_t k = 0; k < idx.size(); ++k) {
    const auto i = idx[k];
    Index pred = 0;
    logits.row(i).maxCoeff(&pred);  // first maximum, as torch.argmax
    correct += pred == y[i];
  }
  return static_cast<double>(correct) / static_cast<double>(idx.size());
}

double accuracy_multilabel(const Mat& logits, const Mat& y, const std::vector<std::int64_t>& idx) {
  Index correct = 0, total = 0;
  for (auto i : idx)
    for (Index t = 0; t < y.cols(); ++t) {
      const float target = y(i, t);
      if (std::isnan(target)) continue;
      ++total;
      correct += (logits(i, t) > 0.0f) == (target == 1.0f);
    }
  return total ? static_cast<double>(correct) / static_cast<double>(total) : 0.0;
}

double rocauc_multilabel(const Mat& logits, const Mat& y, const std::vector<std::int64_t>& idx, int* tasks_used) {
  DFM_CHECK(logits.cols() == y.cols(), "rocauc: ", logits.cols(), " outputs but ", y.cols(), " tasks");
  const Index tasks = y.cols();
  std::vector<double> auc(static_cast<size_t>(tasks), std::numeric_limits<double>::quiet_NaN());
#pragma omp parallel for schedule(dynamic, 1) if (tasks > 1 && idx.size() * tasks > 20000)
  for (Index t = 0; t < tasks; ++t) {
    std::vector<float> s;
    std::vector<std::uint8_t> l;
    s.reserve(idx.size());
    l.reserve(idx.size());
    for (auto i : idx) {
      const float target = y(i, t);
      if (std::isnan(target)) continue;  // is_labeled = y == y
      s.push_back(logits(i, t));
      l.push_back(target == 1.0f);
    }
    auc[t] = roc_auc(s, l);
  }
  double sum = 0;
  int used = 0;
  for (double a : auc)
    if (!std::isnan(a)) {
      sum += a;
      ++used;
    }
  if (tasks_used) *tasks_used = used;
  return used ? sum / used : std::numeric_limits<double>::quiet_NaN();
}

double rocauc_classes(const Mat& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx,
                      int* classes_used) {
  const Index c = logits.cols();
  DFM_CHECK(c >= 2, "rocauc: class logits need at least 2 columns (got ", c, ")");
  std::vector<std::int64_t> rows;
  rows.reserve(idx.size());
  for (auto i : idx)
    if (y[i] >= 0) rows.push_back(i);
  if (c == 2) {
    std::vector<float> s(rows.size());
    std::vector<std::uint8_t> l(rows.size());
    for (size_t k = 0; k < rows.size(); ++k) {
      s[k] = logits(rows[k], 1) - logits(rows[k], 0);
      l[k] = y[rows[k]] == 1;
    }
    const double a = roc_auc(s, l);
    if (classes_used) *classes_used = std::isnan(a) ? 0 : 1;
    return a;
  }
  Mat prob(static_cast<Index>(rows.size()), c);
  for (size_t k = 0; k < rows.size(); ++k) {
    const auto z = logits.row(rows[k]).array();
    const float mx = z.maxCoeff();
    const auto e = (z - mx).exp();
    prob.row(static_cast<Index>(k)) = e / e.sum();
  }
  double sum = 0;
  int used = 0;
  for (Index cls = 0; cls < c; ++cls) {
    std::vector<float> s(rows.size());
    std::vector<std::uint8_t> l(rows.size());
    for (size_t k = 0; k < rows.size(); ++k) {
      s[k] = prob(static_cast<Index>(k), cls);
      l[k] = y[rows[k]] == cls;
    }
    const double a = roc_auc(s, l);
    if (!std::isnan(a)) {
      sum += a;
      ++used;
    }
  }
  if (classes_used) *classes_used = used;
  return used ? sum / used : std::numeric_limits<double>::quiet_NaN();
}

}  // namespace dfm
