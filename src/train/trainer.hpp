// Full-batch training of node classifiers under the citation protocol (SPEC.md section 3): one
// Adam step per epoch on the training nodes, an inference forward over all nodes every epoch, and
// the test score taken at the (first) epoch of best validation score.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "data/dataset.hpp"
#include "model/difformer.hpp"
#include "train/adam.hpp"

namespace dfm {

struct TrainOptions {
  int epochs = 500;
  AdamOptions adam;
  int eval_every = 1;
};

struct EpochReport {
  int epoch = 0;
  float loss = 0;
  double train = 0, val = 0, test = 0;  // accuracy in [0, 1]
};

struct RunResult {
  std::uint64_t seed = 0;
  int best_epoch = -1;
  double val = 0, test = 0;  // at the best-validation epoch, accuracy in [0, 1]
  double ms_per_epoch = 0;   // median over epochs of (training step + evaluation forward)
  double seconds = 0;
  std::vector<float> best_params;  // parameters at the best-validation epoch
};

double accuracy(const Mat& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx);

// Trains `model` (already initialised) and returns the best-validation result. progress, when
// set, is called after every evaluated epoch.
RunResult train_node_classifier(DIFFormer& model, const ModelInput& in, const std::vector<std::int64_t>& y,
                                const Split& split, const TrainOptions& opt, std::uint64_t seed,
                                const std::function<void(const EpochReport&)>& progress = {});

}  // namespace dfm
