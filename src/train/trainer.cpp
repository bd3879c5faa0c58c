#include "train/trainer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.hpp"

namespace dfm {

double accuracy(const Mat& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx) {
  if (idx.empty()) return 0.0;
  Index correct = 0;
  for (auto i : idx) {
    Index pred = 0;
    logits.row(i).maxCoeff(&pred);  // first maximum, as torch.argmax
    correct += pred == y[i];
  }
  return static_cast<double>(correct) / static_cast<double>(idx.size());
}

RunResult train_node_classifier(DIFFormer& model, const ModelInput& in, const std::vector<std::int64_t>& y,
                                const Split& split, const TrainOptions& opt, std::uint64_t seed,
                                const std::function<void(const EpochReport&)>& progress) {
  using clock = std::chrono::steady_clock;
  DFM_CHECK(opt.epochs > 0, "--epochs must be positive (got ", opt.epochs, ")");
  DFM_CHECK(!split.train.empty(), "training split is empty");
  Adam adam(opt.adam);
  RunResult r;
  r.seed = seed;
  r.val = -1;
  ForwardState state;
  Mat logits, dlogits, eval_logits;
  std::vector<double> epoch_ms;
  const auto t_start = clock::now();
  for (int epoch = 0; epoch < opt.epochs; ++epoch) {
    const auto t0 = clock::now();
    model.params.zero_grad();
    model.forward(in, true, seed * 1000003ULL + static_cast<std::uint64_t>(epoch), &state, logits);
    const float loss = cpu::cross_entropy(logits, y, split.train, dlogits);
    DFM_CHECK(std::isfinite(loss), "training diverged: loss is ", loss, " at epoch ", epoch,
              " (try a smaller --lr)");
    model.backward(in, state, dlogits);
    adam.step(model.params);
    const bool evaluate = (epoch + 1) % opt.eval_every == 0 || epoch + 1 == opt.epochs;
    if (!evaluate) continue;
    model.forward(in, false, 0, nullptr, eval_logits);
    epoch_ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    EpochReport rep{epoch, loss, accuracy(eval_logits, y, split.train), accuracy(eval_logits, y, split.val),
                    accuracy(eval_logits, y, split.test)};
    if (rep.val > r.val) {  // strictly better: the FIRST epoch of best validation wins
      r.val = rep.val;
      r.test = rep.test;
      r.best_epoch = epoch;
      r.best_params = model.params.values;
    }
    if (progress) progress(rep);
  }
  r.seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  std::sort(epoch_ms.begin(), epoch_ms.end());
  r.ms_per_epoch = epoch_ms.empty() ? 0.0 : epoch_ms[epoch_ms.size() / 2];
  return r;
}

}  // namespace dfm
