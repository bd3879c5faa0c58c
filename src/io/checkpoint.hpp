// Checkpoints: one .npz with every parameter under its official PyTorch state_dict name
// ("convs.0.Wq.weight", shape [out, in] as torch.nn.Linear) plus the model configuration as JSON
// in `config_json`. A PyTorch state_dict saved with numpy.savez under the same names loads too.
#pragma once
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "model/difformer.hpp"

namespace dfm {

nlohmann::json model_config_to_json(const ModelConfig& c);
// Missing keys keep their defaults; unknown values throw naming the key.
ModelConfig model_config_from_json(const nlohmann::json& j);

void save_checkpoint(const std::string& path, const DIFFormer& model, const nlohmann::json& extra = {});
// Reads the configuration and every parameter; errors name the missing or mis-shaped array.
std::unique_ptr<DIFFormer> load_checkpoint(const std::string& path, nlohmann::json* extra = nullptr);
// Overwrites every parameter of an existing model with the arrays of the same official names in
// `path` (a checkpoint, or a PyTorch state_dict saved with numpy.savez; other arrays are ignored).
// Errors name a missing, mis-shaped or non-finite array. `train --init` uses it.
void load_parameters(const std::string& path, DIFFormer& model);

}  // namespace dfm
