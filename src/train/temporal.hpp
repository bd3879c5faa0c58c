// Spatio-temporal regression (SPEC.md section 3): every snapshot is an independent set of N nodes
// with its own graph; the model maps x[t] [N, L] to one value per node. Training as the official
// code (and the PyTorch peer's reference_targets.py): per epoch, the loss is the mean over the
// training snapshots of the per-node MSE, gradients accumulated over the snapshots (forward +
// backward per snapshot, scaled by 1 / T_train) and ONE Adam step; or one step per snapshot
// (the official WikiMath variant). Early stopping on the validation MSE with patience; the
// best-validation weights are restored before the test snapshots are scored.
//
// Metric: per-node MSE. The paper's numbers came from a prediction [N, 1] against a target [N],
// which broadcasts to the N x N pairwise error mean_{i,j} (p_i - y_j)^2 ("paper MSE"); it is
// reported beside the MSE, and with paper_mse_loss it becomes the training loss and the early
// stopping criterion (the official code's behaviour), for reproduction only.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "data/temporal_data.hpp"
#include "model/difformer.hpp"
#include "train/adam.hpp"

namespace dfm {

struct TemporalOptions {
  int epochs = 200;
  int patience = 20;  // stop after this many epochs without a better validation score
  AdamOptions adam;
  bool step_per_snapshot = false;
  bool paper_mse_loss = false;
};

// mean over i, j of (pred_i - y_j)^2 for pred, y [N, 1] (the [N,1] vs [N] broadcast).
double paper_mse(const Mat& pred, const Mat& y);
// Its gradient with respect to pred: 2 / N (pred_i - mean(y)), times `scale`. Overwrites dpred.
void paper_mse_grad(const Mat& pred, const Mat& y, float scale, Mat& dpred);

struct SnapshotScores {
  double mse = 0, paper_mse = 0;  // means over the snapshots
};
// Inference over the listed snapshots (dropout off).
SnapshotScores evaluate_snapshots(DIFFormer& model, const std::vector<ModelInput>& in, const std::vector<Mat>& y,
                                  const std::vector<std::int64_t>& snapshots);

struct TemporalEpochReport {
  int epoch = 0;
  double train_loss = 0, val = 0;  // val: the selection criterion (MSE, or paper MSE)
};

struct TemporalRunResult {
  std::uint64_t seed = 0;
  int best_epoch = -1, epochs_run = 0;
  bool stopped_early = false;
  SnapshotScores val, test;  // at the best-validation weights
  double ms_per_epoch = 0;   // median over epochs of (training pass + validation pass)
  double seconds = 0;
  FloatBuffer best_params;
};

// in[t] / y[t]: model input and target [N, 1] of snapshot t (inputs carry that snapshot's graph).
// The model must be initialised; on return it holds the best-validation weights. torch_dropout
// (--rng torch): the stream the training forwards draw their dropout masks from, snapshot by
// snapshot as the reference loop does (nullptr: the counter hash of seed, epoch and snapshot).
TemporalRunResult train_temporal(DIFFormer& model, const std::vector<ModelInput>& in, const std::vector<Mat>& y,
                                 const TemporalSplit& split, const TemporalOptions& opt, std::uint64_t seed,
                                 const std::function<void(const TemporalEpochReport&)>& progress = {},
                                 TorchCpuGenerator* torch_dropout = nullptr);

}  // namespace dfm
