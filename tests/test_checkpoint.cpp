// Checkpoints round-trip every parameter and the configuration; bad files are refused by name.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <random>

#include "core/error.hpp"
#include "data/npz.hpp"
#include "io/checkpoint.hpp"
#include "test_util.hpp"

namespace dfm {
namespace {

TEST(Checkpoint, RoundTripGivesIdenticalModel) {
  ModelConfig cfg;
  cfg.in_features = 5;
  cfg.out_features = 3;
  cfg.hidden = 8;
  cfg.layers = 2;
  cfg.heads = 2;
  cfg.kernel = Kernel::sigmoid;
  cfg.use_weight = true;
  cfg.graph_weight = 0.3f;
  DIFFormer model(cfg);
  std::mt19937_64 rng(5);
  model.init(rng);
  const std::string path = (std::filesystem::temp_directory_path() / "dfm_ckpt_test.npz").string();
  save_checkpoint(path, model, nlohmann::json{{"preprocess", "citation"}});
  nlohmann::json meta;
  auto loaded = load_checkpoint(path, &meta);
  EXPECT_EQ(meta.at("preprocess"), "citation");
  EXPECT_EQ(loaded->config().kernel, Kernel::sigmoid);
  EXPECT_EQ(loaded->config().heads, 2);
  EXPECT_FLOAT_EQ(loaded->config().graph_weight, 0.3f);
  ASSERT_EQ(loaded->params.values.size(), model.params.values.size());
  EXPECT_EQ(loaded->params.values, model.params.values);
  // the same forward
  Mat x = Mat::Random(9, 5), l1, l2;
  std::vector<std::int64_t> src{0, 1, 2, 3}, dst{1, 2, 3, 0};
  const GraphOp g = make_graph_op<float>(9, src, dst);
  ModelInput in;
  in.dense = &x;
  in.graph = &g;
  model.forward(in, false, 0, nullptr, l1);
  loaded->forward(in, false, 0, nullptr, l2);
  EXPECT_EQ(test::rel_err(l1, l2), 0.0);
  std::remove(path.c_str());
}

TEST(Checkpoint, MissingParameterIsNamed) {
  const std::string path = (std::filesystem::temp_directory_path() / "dfm_ckpt_bad.npz").string();
  std::map<std::string, NpyArray> arrays;
  arrays["config_json"] = NpyArray::from_string(R"({"in_features": 4, "out_features": 2, "hidden": 4, "layers": 1})");
  write_npz(path, arrays);
  try {
    load_checkpoint(path);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("convs.0.Wk.weight"), std::string::npos) << e.what();
  }
  arrays["config_json"] = NpyArray::from_string(R"({"in_features": 4, "out_features": 2, "kernel": "bogus"})");
  write_npz(path, arrays);
  EXPECT_THROW(load_checkpoint(path), Error);
  std::remove(path.c_str());
}

// train --init: load_parameters overwrites every parameter of an existing model (bitwise), and a
// file of other settings is refused with the array and both shapes named.
TEST(Checkpoint, LoadParametersOverwritesEveryParameterAndChecksShapes) {
  ModelConfig cfg;
  cfg.in_features = 5;
  cfg.out_features = 3;
  cfg.hidden = 8;
  cfg.layers = 2;
  DIFFormer saved(cfg), target(cfg);
  std::mt19937_64 r1(1), r2(2);
  saved.init(r1);
  target.init(r2);
  ASSERT_NE(saved.params.values, target.params.values);
  const std::string path = (std::filesystem::temp_directory_path() / "dfm_ckpt_init.npz").string();
  save_checkpoint(path, saved);
  load_parameters(path, target);
  EXPECT_EQ(target.params.values, saved.params.values);
  ModelConfig wider = cfg;
  wider.hidden = 16;
  DIFFormer other(wider);
  test::expect_error([&] { load_parameters(path, other); }, {"convs.0.Wk.weight has shape 8 x 8, expected 16 x 16"});
  ModelConfig deeper = cfg;
  deeper.layers = 3;
  DIFFormer more(deeper);
  test::expect_error([&] { load_parameters(path, more); }, {"convs.2.", "is missing"});
  std::remove(path.c_str());
}

// A PyTorch state_dict saved with numpy.savez has no meta_json: `embed` must treat it as a
// citation-preprocessed model, exactly as a checkpoint whose meta says so.
TEST(Checkpoint, CheckpointWithoutMetaEmbedsLikeCitationMeta) {
  ModelConfig cfg;
  cfg.in_features = 1433;  // Cora
  cfg.out_features = 7;
  cfg.hidden = 8;
  cfg.layers = 2;
  DIFFormer model(cfg);
  std::mt19937_64 rng(11);
  model.init(rng);
  const auto dir = std::filesystem::temp_directory_path();
  const std::string bare = (dir / "dfm_ckpt_nometa.npz").string(), meta = (dir / "dfm_ckpt_meta.npz").string();
  save_checkpoint(bare, model);
  save_checkpoint(meta, model, nlohmann::json{{"preprocess", "citation"}});
  const std::string data = std::string(DIFFORMER_SOURCE_DIR) + "/data/cora.npz";
  std::vector<std::vector<float>> out;
  for (const std::string& ck : {bare, meta}) {
    const std::string npy = ck + ".logits.npy";
    const std::string cmd = std::string(DIFFORMER_CLI) + " embed --model " + ck + " --data " + data +
                            " --logits --threads 1 --out " + npy + " > /dev/null 2>&1";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    const NpyArray a = read_npy(npy);
    ASSERT_EQ(a.shape, (std::vector<Index>{2708, 7}));
    out.push_back(a.to_f32(npy));
    std::remove(npy.c_str());
  }
  EXPECT_EQ(out[0], out[1]);
  std::remove(bare.c_str());
  std::remove(meta.c_str());
}

}  // namespace
}  // namespace dfm
