// Built when DIFFORMER_CUDA is off: the library still links, and asking for the GPU says why not.
#include "core/error.hpp"
#include "ops/cuda_backend.hpp"

namespace dfm::cuda {

bool available() { return false; }
std::string describe() { return "built without CUDA (configure with -DDIFFORMER_CUDA=ON)"; }
void require() { fail("--device cuda: this difformer was ", describe()); }

struct Model::Impl {
  ModelConfig cfg;
};

Model::Model(const ModelConfig&, const DeviceOptions&) { require(); }
Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;
const ModelConfig& Model::config() const { require(); return impl_->cfg; }
void Model::upload_params(const ParamStore&) { require(); }
void Model::download_params(ParamStore&) const { require(); }
void Model::set_input(const ModelInput&) { require(); }
void Model::set_labels(const std::vector<std::int64_t>&) { require(); }
void Model::set_train_index(const std::vector<std::int64_t>&) { require(); }
void Model::forward(bool, std::uint64_t) { require(); }
void Model::download_logits(Mat&) const { require(); }
void Model::download_hidden(std::vector<Mat>&) { require(); }
float Model::loss_and_dlogits() { require(); return 0.0f; }
void Model::zero_grad() { require(); }
void Model::backward() { require(); }
void Model::adam_step(const AdamOptions&) { require(); }
float Model::train_step(std::uint64_t, const AdamOptions&, bool) { require(); return 0.0f; }
bool Model::graph_captured() const { return false; }
void Model::synchronize() const { require(); }
std::int64_t Model::peak_device_bytes() const { return 0; }
std::int64_t Model::current_device_bytes() const { return 0; }
void Model::reset_peak_device_bytes() {}
std::string Model::device_name() const { return describe(); }

}  // namespace dfm::cuda
