#include "io/checkpoint.hpp"

#include <cmath>
#include <string>

#include "core/error.hpp"
#include "data/npz.hpp"

namespace dfm {

nlohmann::json model_config_to_json(const ModelConfig& c) {
  return nlohmann::json{{"kernel", kernel_name(c.kernel)},
                        {"layers", c.layers},
                        {"hidden", c.hidden},
                        {"heads", c.heads},
                        {"alpha", c.alpha},
                        {"dropout", c.dropout},
                        {"graph_weight", c.graph_weight},
                        {"qk_norm", c.qk_norm == QkNorm::global ? "global" : "node"},
                        {"use_graph", c.use_graph},
                        {"use_weight", c.use_weight},
                        {"use_ln", c.use_ln},
                        {"use_residual", c.use_residual},
                        {"in_features", c.in_features},
                        {"out_features", c.out_features}};
}

ModelConfig model_config_from_json(const nlohmann::json& j) {
  ModelConfig c;
  try {
    if (j.contains("kernel")) c.kernel = parse_kernel(j.at("kernel").get<std::string>());
    if (j.contains("qk_norm")) c.qk_norm = parse_qk_norm(j.at("qk_norm").get<std::string>());
    c.layers = j.value("layers", c.layers);
    c.hidden = j.value("hidden", c.hidden);
    c.heads = j.value("heads", c.heads);
    c.alpha = j.value("alpha", c.alpha);
    c.dropout = j.value("dropout", c.dropout);
    c.graph_weight = j.value("graph_weight", c.graph_weight);
    c.use_graph = j.value("use_graph", c.use_graph);
    c.use_weight = j.value("use_weight", c.use_weight);
    c.use_ln = j.value("use_ln", c.use_ln);
    c.use_residual = j.value("use_residual", c.use_residual);
    c.in_features = j.value("in_features", c.in_features);
    c.out_features = j.value("out_features", c.out_features);
  } catch (const nlohmann::json::exception& e) {
    fail("model configuration: ", e.what());
  }
  c.validate();
  return c;
}

void save_checkpoint(const std::string& path, const DIFFormer& model, const nlohmann::json& extra) {
  std::map<std::string, NpyArray> arrays;
  for (size_t s = 0; s < model.params.slots.size(); ++s) {
    const ParamSlot& slot = model.params.slots[s];
    std::vector<Index> shape = slot.cols == 1 ? std::vector<Index>{slot.rows} : std::vector<Index>{slot.rows, slot.cols};
    arrays[slot.name] = NpyArray::from_f32(shape, model.params.values.data() + slot.offset);
  }
  arrays["config_json"] = NpyArray::from_string(model_config_to_json(model.config()).dump());
  if (!extra.is_null()) arrays["meta_json"] = NpyArray::from_string(extra.dump());
  write_npz(path, arrays);
}

namespace {
// Every parameter of `model` from the arrays of z, by its official name, shape checked.
void copy_parameters(const Npz& z, const std::string& path, DIFFormer& model) {
  for (size_t s = 0; s < model.params.slots.size(); ++s) {
    const ParamSlot& slot = model.params.slots[s];
    const std::string what = path + ": " + slot.name;
    DFM_CHECK(z.has(slot.name), what, " is missing (the model of these settings has it, shape ", slot.rows, " x ",
              slot.cols, ")");
    const NpyArray& a = z.at(slot.name);
    const bool shape_ok = slot.cols == 1 ? (a.shape.size() == 1 && a.shape[0] == slot.rows) ||
                                               (a.shape.size() == 2 && a.shape[0] == slot.rows && a.shape[1] == 1)
                                         : a.shape.size() == 2 && a.shape[0] == slot.rows && a.shape[1] == slot.cols;
    DFM_CHECK(shape_ok, what, " has shape ", a.shape.size() == 2 ? std::to_string(a.shape[0]) + " x " + std::to_string(a.shape[1])
                                                                 : std::to_string(a.numel()) + " values",
              ", expected ", slot.rows, " x ", slot.cols, " (a checkpoint of other settings?)");
    const auto v = a.to_f32(what);
    for (float x : v) DFM_CHECK(std::isfinite(x), what, " holds a non-finite value");
    std::copy(v.begin(), v.end(), model.params.values.begin() + slot.offset);
  }
}
}  // namespace

std::unique_ptr<DIFFormer> load_checkpoint(const std::string& path, nlohmann::json* extra) {
  const Npz z = read_npz(path);
  nlohmann::json cfg_json;
  try {
    cfg_json = nlohmann::json::parse(z.at("config_json").to_string(path + ": config_json"));
  } catch (const nlohmann::json::exception& e) {
    fail(path, ": config_json is not valid JSON (", e.what(), ")");
  }
  auto model = std::make_unique<DIFFormer>(model_config_from_json(cfg_json));
  copy_parameters(z, path, *model);
  if (extra && z.has("meta_json")) *extra = nlohmann::json::parse(z.at("meta_json").to_string(path + ": meta_json"));
  return model;
}

void load_parameters(const std::string& path, DIFFormer& model) {
  copy_parameters(read_npz(path), path, model);
}

}  // namespace dfm
