#include "train/temporal.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "core/error.hpp"

namespace dfm {

double paper_mse(const Mat& pred, const Mat& y) {
  DFM_ASSERT(pred.rows() == y.rows() && pred.cols() == 1 && y.cols() == 1);
  const Index n = pred.rows();
  // mean_{i,j} (p_i - y_j)^2 = mean(p^2) - 2 mean(p) mean(y) + mean(y^2), in double.
  double sp = 0, sp2 = 0, sy = 0, sy2 = 0;
  for (Index i = 0; i < n; ++i) {
    const double p = pred(i, 0), t = y(i, 0);
    sp += p;
    sp2 += p * p;
    sy += t;
    sy2 += t * t;
  }
  const double inv = 1.0 / static_cast<double>(n);
  return sp2 * inv - 2.0 * (sp * inv) * (sy * inv) + sy2 * inv;
}

void paper_mse_grad(const Mat& pred, const Mat& y, float scale, Mat& dpred) {
  const Index n = pred.rows();
  const double ymean = y.cast<double>().mean();
  dpred.resize(n, 1);
  const double c = 2.0 / static_cast<double>(n) * scale;
  for (Index i = 0; i < n; ++i) dpred(i, 0) = static_cast<float>(c * (pred(i, 0) - ymean));
}

SnapshotScores evaluate_snapshots(DIFFormer& model, const std::vector<ModelInput>& in, const std::vector<Mat>& y,
                                  const std::vector<std::int64_t>& snapshots) {
  SnapshotScores s;
  if (snapshots.empty()) return s;
  Mat out;
  for (auto t : snapshots) {
    model.forward(in[t], false, 0, nullptr, out);
    s.mse += static_cast<double>((out - y[t]).cast<double>().squaredNorm()) / static_cast<double>(out.size());
    s.paper_mse += paper_mse(out, y[t]);
  }
  s.mse /= static_cast<double>(snapshots.size());
  s.paper_mse /= static_cast<double>(snapshots.size());
  return s;
}

TemporalRunResult train_temporal(DIFFormer& model, const std::vector<ModelInput>& in, const std::vector<Mat>& y,
                                 const TemporalSplit& split, const TemporalOptions& opt, std::uint64_t seed,
                                 const std::function<void(const TemporalEpochReport&)>& progress,
                                 TorchCpuGenerator* torch_dropout) {
  using clock = std::chrono::steady_clock;
  DFM_CHECK(opt.epochs > 0, "--epochs must be positive (got ", opt.epochs, ")");
  DFM_CHECK(opt.patience > 0, "--patience must be positive (got ", opt.patience, ")");
  DFM_CHECK(!split.train.empty() && !split.val.empty() && !split.test.empty(),
            "temporal split: train, validation and test snapshots must all be non-empty");
  DFM_ASSERT(in.size() == y.size());
  Adam adam(opt.adam);
  TemporalRunResult r;
  r.seed = seed;
  ForwardState state;
  state.torch_dropout = torch_dropout;
  Mat out, dout;
  std::vector<std::int64_t> all_nodes;
  const float scale = opt.step_per_snapshot ? 1.0f : 1.0f / static_cast<float>(split.train.size());
  double best = std::numeric_limits<double>::infinity();
  int bad = 0;
  std::vector<double> epoch_ms;
  const auto t_start = clock::now();
  for (int epoch = 0; epoch < opt.epochs; ++epoch) {
    const auto t0 = clock::now();
    double loss_sum = 0;
    if (!opt.step_per_snapshot) model.params.zero_grad();
    for (size_t s = 0; s < split.train.size(); ++s) {
      const auto t = split.train[s];
      if (opt.step_per_snapshot) model.params.zero_grad();
      const std::uint64_t dropout_seed =
          seed * 1000003ULL + static_cast<std::uint64_t>(epoch) * split.train.size() + s;
      model.forward(in[t], true, dropout_seed, &state, out);
      double loss;
      if (opt.paper_mse_loss) {
        loss = paper_mse(out, y[t]);
        paper_mse_grad(out, y[t], scale, dout);
      } else {
        if (static_cast<Index>(all_nodes.size()) != out.rows()) {
          all_nodes.resize(static_cast<size_t>(out.rows()));
          std::iota(all_nodes.begin(), all_nodes.end(), 0);
        }
        loss = cpu::mse(out, y[t], all_nodes, dout);
        if (scale != 1.0f) dout *= scale;
      }
      DFM_CHECK(std::isfinite(loss), "training diverged: loss is ", loss, " at epoch ", epoch, ", snapshot ", t,
                " (try a smaller --lr)");
      loss_sum += loss;
      model.backward(in[t], state, dout);
      if (opt.step_per_snapshot) adam.step(model.params);
    }
    if (!opt.step_per_snapshot) adam.step(model.params);
    const SnapshotScores v = evaluate_snapshots(model, in, y, split.val);
    epoch_ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    r.epochs_run = epoch + 1;
    const double crit = opt.paper_mse_loss ? v.paper_mse : v.mse;
    if (progress) progress({epoch, loss_sum / static_cast<double>(split.train.size()), crit});
    if (crit < best) {  // strictly better: the first best epoch wins
      best = crit;
      bad = 0;
      r.best_epoch = epoch;
      r.val = v;
      r.best_params = model.params.values;
    } else if (++bad >= opt.patience) {
      r.stopped_early = true;
      break;
    }
  }
  DFM_CHECK(r.best_epoch >= 0, "training diverged: the validation score was never finite (try a smaller --lr)");
  model.params.values = r.best_params;
  r.test = evaluate_snapshots(model, in, y, split.test);
  r.seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  std::sort(epoch_ms.begin(), epoch_ms.end());
  r.ms_per_epoch = epoch_ms[epoch_ms.size() / 2];
  return r;
}

}  // namespace dfm
