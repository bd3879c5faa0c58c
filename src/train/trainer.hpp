// Full-batch training of node classifiers under the citation protocol (SPEC.md section 3): one
// Adam step per epoch on the training nodes, an inference forward over all nodes every epoch, and
// the test score taken at the (first) epoch of best validation score.
//
// The protocol (epoch loop, evaluation cadence, best-validation selection, timing) is written once
// against NodeTrainBackend; the CPU backend runs dfm::DIFFormer, the CUDA backend a cuda::Model
// (src/ops/cuda_backend.hpp) initialised from the same CPU parameters, so both devices start from
// the same weights and draw the same dropout masks.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
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
  FloatBuffer best_params;  // parameters at the best-validation epoch
  std::int64_t peak_device_bytes = 0;  // GPU allocator high-water mark (0 on the CPU)
};


// One device's training step and inference forward over a fixed input, labels and training rows.
class NodeTrainBackend {
 public:
  virtual ~NodeTrainBackend() = default;
  // zero_grad + forward (dropout seeded by dropout_seed) + cross-entropy over the training rows +
  // backward + Adam; returns the loss.
  virtual float step(std::uint64_t dropout_seed) = 0;
  // Inference forward (no dropout) over every row; the logits [N, C] on the host.
  virtual const Mat& eval_logits() = 0;
  // The current parameter values (the flat order of ParamStore).
  virtual void current_params(FloatBuffer& out) = 0;
  virtual std::int64_t peak_device_bytes() const { return 0; }
};

// `model` must be initialised; the backends keep references to model, in, y and split.
// torch_dropout (--rng torch): the stream the training forwards draw their dropout masks from
// (kept by reference; nullptr: the counter hash of each step's dropout seed).
std::unique_ptr<NodeTrainBackend> make_cpu_backend(DIFFormer& model, const ModelInput& in,
                                                   const std::vector<std::int64_t>& y, const Split& split,
                                                   const AdamOptions& adam,
                                                   TorchCpuGenerator* torch_dropout = nullptr);
// Uploads model's parameters, the input, labels and training rows once. precision: fp32|tf32|bf16
// (cuda::DeviceOptions::precision). Throws "built without CUDA" / "no device" where there is none.
std::unique_ptr<NodeTrainBackend> make_cuda_backend(const DIFFormer& model, const ModelInput& in,
                                                    const std::vector<std::int64_t>& y, const Split& split,
                                                    const AdamOptions& adam, const std::string& precision);

// The protocol over any backend. progress, when set, is called after every evaluated epoch.
RunResult train_node_classifier(NodeTrainBackend& backend, const std::vector<std::int64_t>& y, const Split& split,
                                const TrainOptions& opt, std::uint64_t seed,
                                const std::function<void(const EpochReport&)>& progress = {});

// Trains `model` (already initialised) on the CPU and returns the best-validation result.
RunResult train_node_classifier(DIFFormer& model, const ModelInput& in, const std::vector<std::int64_t>& y,
                                const Split& split, const TrainOptions& opt, std::uint64_t seed,
                                const std::function<void(const EpochReport&)>& progress = {});

// The dropout seed of epoch `epoch` of run `seed` (both devices).
inline std::uint64_t epoch_dropout_seed(std::uint64_t seed, int epoch) {
  return seed * 1000003ULL + static_cast<std::uint64_t>(epoch);
}

// --precision: fp32, tf32 or bf16; anything but fp32 needs --device cuda. Throws dfm::Error
// naming the flag and the allowed values.
void validate_precision(const std::string& device, const std::string& precision);

}  // namespace dfm
