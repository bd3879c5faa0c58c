#include "train/trainer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.hpp"
#include "ops/cuda_backend.hpp"
#include "train/metrics.hpp"

namespace dfm {

void validate_precision(const std::string& device, const std::string& precision) {
  DFM_CHECK(precision == "fp32" || precision == "tf32" || precision == "bf16", "--precision: expected fp32, tf32 or "
            "bf16, got '", precision, "'");
  DFM_CHECK(device == "cuda" || precision == "fp32", "--precision ", precision, " needs --device cuda (the CPU "
            "engine computes in fp32 only)");
}

namespace {

class CpuBackend final : public NodeTrainBackend {
 public:
  CpuBackend(DIFFormer& model, const ModelInput& in, const std::vector<std::int64_t>& y, const Split& split,
             const AdamOptions& adam, TorchCpuGenerator* torch_dropout)
      : model_(model), in_(in), y_(y), split_(split), adam_(adam) {
    state_.torch_dropout = torch_dropout;
    // The loss reads the training rows' logits, the metrics the three splits': the model's last
    // layer then runs on those rows alone.
    train_rows_ = sorted_distinct({&split.train});
    eval_rows_ = sorted_distinct({&split.train, &split.val, &split.test});
  }
  float step(std::uint64_t dropout_seed) override {
    model_.params.zero_grad();
    model_.forward(in_, true, dropout_seed, &state_, logits_, nullptr, &train_rows_);
    const float loss = cpu::cross_entropy(logits_, y_, split_.train, dlogits_);
    if (!std::isfinite(loss)) return loss;
    model_.backward(in_, state_, dlogits_);
    adam_.step(model_.params);
    return loss;
  }
  const Mat& eval_logits() override {
    model_.forward(in_, false, 0, nullptr, eval_, nullptr, &eval_rows_);
    return eval_;
  }
  void current_params(FloatBuffer& out) override { out = model_.params.values; }

 private:
  static std::vector<Index> sorted_distinct(std::initializer_list<const std::vector<std::int64_t>*> lists) {
    std::vector<Index> rows;
    for (const auto* list : lists) rows.insert(rows.end(), list->begin(), list->end());
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    return rows;
  }
  DIFFormer& model_;
  const ModelInput& in_;
  const std::vector<std::int64_t>& y_;
  const Split& split_;
  Adam adam_;
  ForwardState state_;
  Mat logits_, dlogits_, eval_;
  std::vector<Index> train_rows_, eval_rows_;
};

class CudaBackend final : public NodeTrainBackend {
 public:
  CudaBackend(const DIFFormer& model, const ModelInput& in, const std::vector<std::int64_t>& y, const Split& split,
              const AdamOptions& adam, const std::string& precision)
      : gpu_(model.config(), options(precision)), adam_(adam), params_(model.params) {
    gpu_.upload_params(model.params);
    gpu_.set_input(in);
    gpu_.set_labels(y);
    gpu_.set_train_index(split.train);
  }
  float step(std::uint64_t dropout_seed) override { return gpu_.train_step(dropout_seed, adam_, true); }
  const Mat& eval_logits() override {
    gpu_.forward(false, 0);
    gpu_.download_logits(eval_);
    return eval_;
  }
  void current_params(FloatBuffer& out) override {
    gpu_.download_params(params_);
    out = params_.values;
  }
  std::int64_t peak_device_bytes() const override { return gpu_.peak_device_bytes(); }

 private:
  static cuda::DeviceOptions options(const std::string& precision) {
    cuda::DeviceOptions o;
    o.precision = precision;
    return o;
  }
  cuda::Model gpu_;
  AdamOptions adam_;
  ParamStore params_;
  Mat eval_;
};

}  // namespace

std::unique_ptr<NodeTrainBackend> make_cpu_backend(DIFFormer& model, const ModelInput& in,
                                                   const std::vector<std::int64_t>& y, const Split& split,
                                                   const AdamOptions& adam, TorchCpuGenerator* torch_dropout) {
  return std::make_unique<CpuBackend>(model, in, y, split, adam, torch_dropout);
}

std::unique_ptr<NodeTrainBackend> make_cuda_backend(const DIFFormer& model, const ModelInput& in,
                                                    const std::vector<std::int64_t>& y, const Split& split,
                                                    const AdamOptions& adam, const std::string& precision) {
  cuda::require();
  return std::make_unique<CudaBackend>(model, in, y, split, adam, precision);
}

RunResult train_node_classifier(NodeTrainBackend& backend, const std::vector<std::int64_t>& y, const Split& split,
                                const TrainOptions& opt, std::uint64_t seed,
                                const std::function<void(const EpochReport&)>& progress) {
  using clock = std::chrono::steady_clock;
  DFM_CHECK(opt.epochs > 0, "--epochs must be positive (got ", opt.epochs, ")");
  DFM_CHECK(opt.eval_every >= 1, "--eval-every must be >= 1 (got ", opt.eval_every, ")");
  DFM_CHECK(!split.train.empty(), "training split is empty");
  RunResult r;
  r.seed = seed;
  r.val = -1;
  std::vector<double> epoch_ms;
  const auto t_start = clock::now();
  for (int epoch = 0; epoch < opt.epochs; ++epoch) {
    const auto t0 = clock::now();
    const float loss = backend.step(epoch_dropout_seed(seed, epoch));
    DFM_CHECK(std::isfinite(loss), "training diverged: loss is ", loss, " at epoch ", epoch,
              " (try a smaller --lr)");
    const bool evaluate = (epoch + 1) % opt.eval_every == 0 || epoch + 1 == opt.epochs;
    if (!evaluate) continue;
    const Mat& eval_logits = backend.eval_logits();
    epoch_ms.push_back(std::chrono::duration<double, std::milli>(clock::now() - t0).count());
    EpochReport rep{epoch, loss, accuracy_classes(eval_logits, y, split.train), accuracy_classes(eval_logits, y, split.val),
                    accuracy_classes(eval_logits, y, split.test)};
    if (rep.val > r.val) {  // strictly better: the FIRST epoch of best validation wins
      r.val = rep.val;
      r.test = rep.test;
      r.best_epoch = epoch;
      backend.current_params(r.best_params);
    }
    if (progress) progress(rep);
  }
  r.seconds = std::chrono::duration<double>(clock::now() - t_start).count();
  std::sort(epoch_ms.begin(), epoch_ms.end());
  r.ms_per_epoch = epoch_ms.empty() ? 0.0 : epoch_ms[epoch_ms.size() / 2];
  r.peak_device_bytes = backend.peak_device_bytes();
  return r;
}

RunResult train_node_classifier(DIFFormer& model, const ModelInput& in, const std::vector<std::int64_t>& y,
                                const Split& split, const TrainOptions& opt, std::uint64_t seed,
                                const std::function<void(const EpochReport&)>& progress) {
  auto backend = make_cpu_backend(model, in, y, split, opt.adam);
  return train_node_classifier(*backend, y, split, opt, seed, progress);
}

}  // namespace dfm
