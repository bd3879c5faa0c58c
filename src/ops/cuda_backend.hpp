// Entry points of the optional CUDA backend that the rest of the library may call whether or not
// it was compiled in (src/ops/cuda_stub.cpp answers when it was not: every call but available()
// and describe() throws "built without CUDA"). No CUDA type appears here.
//
// cuda::Model is DIFFormer on one GPU: the same ModelConfig and the same flat parameter order
// as dfm::DIFFormer (so parameters copy host <-> device as one buffer), forward / cross-entropy /
// backward / Adam on the device. Activations kept between forward and backward: the LayerNorm
// input of each diffusion layer (L N D floats) and the attention's small statistics (sigmoid:
// its output and row sums); hidden states, Q, K, V and dropout masks are recomputed. DIFFormer-s
// with the global norm and one head of width 16/32/64 runs the folded layer, which stores no Q,
// K, V, attention output or graph buffer at all (src/ops/cuda/model_cuda.cpp says which buffers
// each path keeps).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/difformer.hpp"
#include "train/adam.hpp"

namespace dfm::cuda {
bool available();        // compiled in AND a device is present
std::string describe();  // one line: device name and memory, or why there is none
void require();          // throws dfm::Error naming the reason when !available()

struct DeviceOptions {
  // "fp32": true single precision everywhere (TF32 off). "tf32": cuBLAS GEMMs and the sigmoid
  // attention on TF32 tensor cores. "bf16": GEMMs on TF32, the sigmoid attention in bf16. The CLI
  // takes it from --precision (train, bench, train-large; dfm::validate_precision).
  std::string precision = "fp32";
  bool cuda_graph = true;          // capture train_step() in a CUDA graph after its first eager run
  int device = 0;
};

class Model {
 public:
  Model(const ModelConfig& cfg, const DeviceOptions& opt = {});
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  const ModelConfig& config() const;
  // Parameters (and gradients) in the order of dfm::DIFFormer's ParamStore.
  void upload_params(const ParamStore& p);    // values; gradients and Adam state are reset
  void download_params(ParamStore& p) const;  // values and gradients

  // Uploads the features (dense, or sparse with its transpose) and the graph, and sizes every
  // buffer for in.rows() instances. Call again for another input (buffers are resized).
  void set_input(const ModelInput& in);
  void set_labels(const std::vector<std::int64_t>& y);            // one class per row
  void set_train_index(const std::vector<std::int64_t>& idx);     // loss rows; empty = all

  void forward(bool training, std::uint64_t dropout_seed);  // logits stay on the device
  // The logits of the last forward; loss_and_dlogits() overwrites them with dlogits when the loss
  // spans all rows (no train index), so download before it.
  void download_logits(Mat& logits) const;
  void download_hidden(std::vector<Mat>& hidden);  // h_0 .. h_L of the last forward
  float loss_and_dlogits();                         // cross-entropy over the train index
  void zero_grad();
  void backward();                                  // accumulates into the gradients
  void adam_step(const AdamOptions& opt);

  // zero_grad + forward(training) + cross-entropy + backward + Adam in one call; captured into a
  // CUDA graph after the first call when DeviceOptions::cuda_graph (the loss of a replayed step
  // is read back only when asked: read_loss = false keeps the step free of host round trips).
  float train_step(std::uint64_t dropout_seed, const AdamOptions& opt, bool read_loss = true);
  bool graph_captured() const;

  void synchronize() const;
  std::int64_t peak_device_bytes() const;  // high-water mark of the allocator (CUDA context excluded)
  std::int64_t current_device_bytes() const;
  void reset_peak_device_bytes();
  std::string device_name() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace dfm::cuda
