// Presets (values of SPEC's tables, applied only where the user passed nothing), task detection
// and task defaults, instance splits, and the errors of `difformer train` for bad input. Most
// checks run the real command-line tool on the repository's data files for a couple of epochs.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "core/error.hpp"
#include "data/dataset.hpp"
#include "ops/cuda_backend.hpp"
#include "test_util.hpp"
#include "train/presets.hpp"

namespace dfm {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string setting(const Preset& p, const std::string& flag) {
  for (const auto& s : p.settings)
    if (s.flag == flag) return s.value;
  return "<unset>";
}

TEST(Presets, EveryRowOfTheTablesExists) {
  for (const char* name :
       {"cora-s", "cora-a", "citeseer-s", "citeseer-a", "pubmed-s", "pubmed-a", "20news-s", "20news-a", "chickenpox-s",
        "chickenpox-a", "covid-s", "covid-a", "wikimath-s", "wikimath-a", "chickenpox-s-nograph", "chickenpox-a-nograph",
        "covid-s-nograph", "covid-a-nograph", "wikimath-s-nograph", "wikimath-a-nograph", "20news-s-knn",
        "20news-a-knn", "digits-s"})
    EXPECT_NE(find_preset(name), nullptr) << name;
  EXPECT_EQ(find_preset("cora"), nullptr);
  std::set<std::string> names;
  for (const Preset& p : presets()) {
    EXPECT_TRUE(names.insert(p.name).second) << "duplicate " << p.name;
    EXPECT_TRUE(p.task == "node" || p.task == "instance" || p.task == "temporal") << p.name;
    EXPECT_EQ(setting(p, "--task"), p.task) << p.name;
    for (const auto& s : p.settings) EXPECT_EQ(s.flag.rfind("--", 0), 0u) << p.name << " " << s.flag;
  }
}

TEST(Presets, ValuesAreSpecs) {
  struct Row {
    const char *name, *kernel, *wd, *dropout, *layers, *hidden;
  };
  // SPEC.md section 3, citation table (lr 1e-3, 500 epochs, 5 runs for all).
  for (const Row& r : {Row{"cora-s", "simple", "0.01", "0.2", "8", "64"}, Row{"cora-a", "sigmoid", "0.1", "0.0", "8", "64"},
                       Row{"citeseer-s", "simple", "1.0", "0.2", "4", "64"},
                       Row{"citeseer-a", "sigmoid", "1.0", "0.2", "4", "32"},
                       Row{"pubmed-s", "simple", "1e-4", "0.2", "8", "64"},
                       Row{"pubmed-a", "sigmoid", "0.1", "0.5", "4", "64"}}) {
    const Preset& p = *find_preset(r.name);
    EXPECT_EQ(setting(p, "--kernel"), r.kernel) << r.name;
    EXPECT_EQ(setting(p, "--weight-decay"), r.wd) << r.name;
    EXPECT_EQ(setting(p, "--dropout"), r.dropout) << r.name;
    EXPECT_EQ(setting(p, "--layers"), r.layers) << r.name;
    EXPECT_EQ(setting(p, "--hidden"), r.hidden) << r.name;
    EXPECT_EQ(setting(p, "--lr"), "1e-3") << r.name;
    EXPECT_EQ(setting(p, "--epochs"), "500") << r.name;
    EXPECT_EQ(setting(p, "--split-seed"), "123") << r.name;  // one split shared by the runs
  }
  EXPECT_EQ(setting(*find_preset("pubmed-a"), "--batch-size"), "10000");
  for (const Preset& p : presets()) {
    if (p.task == "temporal") {  // SPEC: 2 layers, hidden 4, up to 200 epochs, patience 20
      EXPECT_EQ(setting(p, "--layers"), "2") << p.name;
      EXPECT_EQ(setting(p, "--hidden"), "4") << p.name;
      EXPECT_EQ(setting(p, "--epochs"), "200") << p.name;
      EXPECT_EQ(setting(p, "--patience"), "20") << p.name;
      const bool nograph = p.name.find("-nograph") != std::string::npos;
      EXPECT_EQ(setting(p, "--no-graph"), nograph ? "true" : "<unset>") << p.name;
      EXPECT_EQ(setting(p, "--step-per-snapshot"), p.name.rfind("wikimath", 0) == 0 ? "true" : "<unset>") << p.name;
    }
    if (p.task == "instance") {  // SPEC: 2 layers, dropout 0, wd 0.1, 600 epochs, 1000 val
      EXPECT_EQ(setting(p, "--layers"), "2") << p.name;
      EXPECT_EQ(setting(p, "--dropout"), "0") << p.name;
      EXPECT_EQ(setting(p, "--weight-decay"), "0.1") << p.name;
      EXPECT_EQ(setting(p, "--epochs"), "600") << p.name;
      EXPECT_EQ(setting(p, "--val"), "1000") << p.name;
      EXPECT_EQ(setting(p, "--test"), "-1") << p.name;
    }
  }
  EXPECT_EQ(setting(*find_preset("20news-s-knn"), "--knn"), "5");
}

TEST(InstanceSplit, KPerClassThousandValidationRestTestFreshPerRun) {
  const Dataset d = load_node_dataset(test::source_path("data/digits.npz"));
  const Split a = random_per_class_split(d.y, d.classes, 10, 1000, -1, 0);
  validate_split(a, d.n, "digits");
  EXPECT_EQ(a.train.size(), 100u);
  EXPECT_EQ(a.val.size(), 1000u);
  EXPECT_EQ(a.test.size(), 1797u - 1100u);
  std::vector<int> per_class(10, 0);
  for (auto i : a.train) ++per_class[d.y[i]];
  for (int c = 0; c < 10; ++c) EXPECT_EQ(per_class[c], 10) << c;
  const Split b = random_per_class_split(d.y, d.classes, 10, 1000, -1, 1);
  EXPECT_NE(a.train, b.train) << "a fresh split per run";
  try {  // more labels per class than some class has
    random_per_class_split(d.y, d.classes, 175, 1000, -1, 0);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("fewer than the 175 training nodes per class"), std::string::npos) << e.what();
  }
}

class Cli : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("dfm_presets_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  // Runs `difformer ARGS` from the repository root; returns the exit code, fills `out`.
  int run(const std::string& args, std::string& out) {
    const std::string log = (dir_ / "log.txt").string();
    const std::string cmd = "cd " + std::string(DIFFORMER_SOURCE_DIR) + " && " + DIFFORMER_CLI + " " + args + " > " +
                            log + " 2>&1";
    const int rc = std::system(cmd.c_str());
    std::ifstream f(log);
    std::stringstream ss;
    ss << f.rdbuf();
    out = ss.str();
    return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
  }
  json train_json(const std::string& args) {
    const std::string js = (dir_ / "out.json").string();
    std::string out;
    EXPECT_EQ(run("train " + args + " --threads 1 --quiet --json " + js, out), 0) << out;
    std::ifstream f(js);
    return f ? json::parse(f) : json();
  }
  void expect_error(const std::string& args, const std::string& what) {
    std::string out;
    EXPECT_EQ(run(args, out), 1) << args << "\n" << out;
    EXPECT_NE(out.find(what), std::string::npos) << args << ": expected '" << what << "' in:\n" << out;
  }
  static bool has(const json& list, const std::string& flag) {
    return std::find(list.begin(), list.end(), flag) != list.end();
  }
  fs::path dir_;
};

TEST_F(Cli, PresetsCommandListsEveryPreset) {
  std::string out;
  ASSERT_EQ(run("presets --json", out), 0) << out;
  const json j = json::parse(out);
  ASSERT_EQ(j.size(), presets().size());
  EXPECT_EQ(j[0]["name"], "cora-s");
  EXPECT_EQ(j[0]["settings"]["--weight-decay"], "0.01");
  ASSERT_EQ(run("presets", out), 0);
  for (const Preset& p : presets()) EXPECT_NE(out.find(p.name), std::string::npos) << p.name;
}

TEST_F(Cli, PresetAppliesAndPassedFlagsOverrideWherever) {
  // after --preset
  json j = train_json("--preset chickenpox-s --epochs 2 --runs 1 --lr 0.05");
  EXPECT_EQ(j["task"], "temporal");
  EXPECT_EQ(j["preset"], "chickenpox-s");
  EXPECT_FLOAT_EQ(j["settings"]["lr"].get<float>(), 0.05f);
  EXPECT_EQ(j["settings"]["epochs"], 2);
  EXPECT_EQ(j["settings"]["data"], "data/chickenpox.npz");
  EXPECT_EQ(j["settings"]["patience"], 20);
  EXPECT_FLOAT_EQ(j["settings"]["weight_decay"].get<float>(), 0.0f);  // the preset's, not the default 0.01
  EXPECT_EQ(j["model"]["hidden"], 4);
  EXPECT_EQ(j["model"]["layers"], 2);
  EXPECT_EQ(j["model"]["kernel"], "simple");
  EXPECT_FLOAT_EQ(j["model"]["dropout"].get<float>(), 0.2f);
  EXPECT_TRUE(j["model"]["use_graph"]);
  EXPECT_TRUE(has(j["settings"]["set_by_user"], "--lr"));
  EXPECT_FALSE(has(j["settings"]["set_by_preset"], "--lr"));
  EXPECT_TRUE(has(j["settings"]["set_by_preset"], "--weight-decay"));
  // before --preset
  j = train_json("--lr 0.05 --hidden 6 --preset chickenpox-a --epochs 1 --runs 1");
  EXPECT_FLOAT_EQ(j["settings"]["lr"].get<float>(), 0.05f);
  EXPECT_EQ(j["model"]["hidden"], 6);
  EXPECT_EQ(j["model"]["kernel"], "sigmoid");
  // a w/o-graph row
  j = train_json("--preset chickenpox-s-nograph --epochs 1 --runs 1");
  EXPECT_FALSE(j["model"]["use_graph"]);
  EXPECT_EQ(j["graph"], "none");
}

TEST_F(Cli, CitationPresetSharesOneSplitAcrossRuns) {
  const json j = train_json("--preset cora-s --epochs 2 --runs 2 --layers 2");
  EXPECT_EQ(j["task"], "node");
  EXPECT_EQ(j["metric"], "accuracy");
  ASSERT_EQ(j["runs"].size(), 2u);
  EXPECT_EQ(j["runs"][0]["split"], "random (seed 123)");
  EXPECT_EQ(j["runs"][1]["split"], "random (seed 123)");
  EXPECT_EQ(j["runs"][0]["train_size"], 140);
  EXPECT_EQ(j["runs"][0]["val_size"], 500);
  EXPECT_EQ(j["runs"][0]["test_size"], 1000);
  EXPECT_NE(j["runs"][0]["seed"], j["runs"][1]["seed"]);
  for (const char* key : {"metric", "test_mean", "test_std", "runs", "ms_per_epoch", "peak_rss_bytes",
                          "seconds_per_epoch", "settings"})
    EXPECT_TRUE(j.contains(key)) << key;
}

// --first-run K --runs 1 is run K of a longer invocation: its seed, its split row, its result.
TEST_F(Cli, FirstRunGivesThatRunOfTheWholeProtocol) {
  const std::string common = "--preset cora-s --splits data/splits/cora_random10.npz --epochs 3 --layers 2 ";
  const json all = train_json(common + "--runs 3");
  const json third = train_json(common + "--runs 1 --first-run 2");
  ASSERT_EQ(all["runs"].size(), 3u);
  ASSERT_EQ(third["runs"].size(), 1u);
  EXPECT_EQ(third["runs"][0]["seed"], 2);
  EXPECT_EQ(third["runs"][0]["split"], all["runs"][2]["split"]);
  EXPECT_NE(all["runs"][2]["split"], all["runs"][0]["split"]);
  EXPECT_EQ(third["runs"][0]["val"], all["runs"][2]["val"]);
  EXPECT_EQ(third["runs"][0]["test"], all["runs"][2]["test"]);
  EXPECT_EQ(third["runs"][0]["best_epoch"], all["runs"][2]["best_epoch"]);
  std::string out;
  EXPECT_NE(run("train " + common + "--runs 1 --first-run 10", out), 0);
  EXPECT_NE(out.find("run 10"), std::string::npos) << out;  // the split file has 10 rows
  EXPECT_NE(run("train " + common + "--runs 2 --first-run 9", out), 0);  // refused before run 9 trains
  EXPECT_EQ(out.find("run 10/"), std::string::npos) << out;
  EXPECT_NE(out.find("run 10 asked for"), std::string::npos) << out;
  expect_error("train " + common + "--first-run -1", "--first-run must be >= 0");
}

// --init: every run starts from the file's weights. With lr 0 nothing moves, so runs of different
// seeds (different random initialisations without --init) give the same scores, on a node task
// and on a temporal one; a file of other settings is refused.
TEST_F(Cli, InitStartsEveryRunFromTheCheckpoint) {
  const std::string ck = (dir_ / "ck.npz").string();
  const std::string node = "--data data/cora.npz --layers 2 --hidden 16 --dropout 0 --split public ";
  std::string out;
  ASSERT_EQ(run("train " + node + "--epochs 3 --runs 1 --seed 7 --quiet --save " + ck, out), 0) << out;
  const json free = train_json(node + "--epochs 1 --runs 2 --lr 0");
  EXPECT_NE(free["runs"][0]["test"], free["runs"][1]["test"]);  // the seeds' own initialisations differ
  const json fixed = train_json(node + "--epochs 1 --runs 2 --lr 0 --init " + ck);
  EXPECT_EQ(fixed["runs"][0]["val"], fixed["runs"][1]["val"]);
  EXPECT_EQ(fixed["runs"][0]["test"], fixed["runs"][1]["test"]);
  EXPECT_EQ(fixed["settings"]["init"], ck);
  expect_error("train --data data/cora.npz --layers 3 --hidden 16 --epochs 1 --runs 1 --init " + ck, "is missing");
  EXPECT_NE(run("train " + node + "--epochs 1 --init " + (dir_ / "none.npz").string(), out), 0);
  EXPECT_NE(out.find("--init: File does not exist"), std::string::npos) << out;

  const std::string cp = (dir_ / "cp.npz").string();
  const std::string temporal = "--preset chickenpox-s --dropout 0 ";
  ASSERT_EQ(run("train " + temporal + "--epochs 2 --runs 1 --quiet --save " + cp, out), 0) << out;
  const json t = train_json(temporal + "--epochs 1 --runs 2 --lr 0 --init " + cp);
  EXPECT_EQ(t["runs"][0]["test"], t["runs"][1]["test"]);
  const json tf = train_json(temporal + "--epochs 1 --runs 2 --lr 0");
  EXPECT_NE(tf["runs"][0]["test"], tf["runs"][1]["test"]);
}

// eval rebuilds the inputs a checkpoint was trained on from its meta_json: a kNN graph replacing
// the file's edge_index (node task), and temporal snapshots with their stored graphs; the scores
// equal those of the training run's best epoch.
TEST_F(Cli, EvalScoresACheckpointOnTheInputsItWasTrainedOn) {
  const std::string ck = (dir_ / "knn.npz").string(), ej = (dir_ / "eval.json").string();
  const json t = train_json("--data data/cora.npz --knn 3 --split public --layers 2 --hidden 16 --epochs 5 --runs 1 "
                            "--save " + ck);
  std::string out;
  ASSERT_EQ(run("eval --model " + ck + " --data data/cora.npz --threads 1 --json " + ej, out), 0) << out;
  std::ifstream fe(ej);
  const json e = json::parse(fe);
  EXPECT_NEAR(e["val"].get<double>(), t["runs"][0]["val"].get<double>(), 1e-9);
  EXPECT_NEAR(e["test"].get<double>(), t["runs"][0]["test"].get<double>(), 1e-9);

  const std::string cp = (dir_ / "cp.npz").string(), tj = (dir_ / "teval.json").string();
  const json tt = train_json("--preset chickenpox-s --epochs 8 --runs 2 --save " + cp);
  ASSERT_EQ(run("eval --model " + cp + " --data data/chickenpox.npz --threads 1 --json " + tj, out), 0) << out;
  std::ifstream ft(tj);
  const json te = json::parse(ft);
  EXPECT_EQ(te["metric"], "mse");
  const int best = tt["runs"][0]["val"].get<double>() <= tt["runs"][1]["val"].get<double>() ? 0 : 1;
  EXPECT_NEAR(te["val"].get<double>(), tt["runs"][best]["val"].get<double>(), 1e-6);
  EXPECT_NEAR(te["test"].get<double>(), tt["runs"][best]["test"].get<double>(), 1e-6);
  EXPECT_NEAR(te["paper_mse"]["test"].get<double>(), tt["runs"][best]["test_paper_mse"].get<double>(), 1e-6);
  expect_error("embed --model " + cp + " --data data/chickenpox.npz --out " + (dir_ / "h.npy").string(),
               "is a temporal dataset");
}

TEST_F(Cli, InstanceTaskDetectedWithItsDefaultsAndSplitSizes) {
  const json j = train_json("--data data/digits.npz --per-class 10 --epochs 2 --runs 2");
  EXPECT_EQ(j["task"], "instance");  // no edge_index
  EXPECT_EQ(j["model"]["layers"], 2);
  EXPECT_EQ(j["model"]["hidden"], 300);
  EXPECT_FALSE(j["model"]["use_graph"]);
  EXPECT_TRUE(has(j["settings"]["set_by_task_default"], "--hidden"));
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(j["runs"][r]["train_size"], 100);
    EXPECT_EQ(j["runs"][r]["val_size"], 1000);
    EXPECT_EQ(j["runs"][r]["test_size"], 697);
    EXPECT_EQ(j["runs"][r]["split"], "random (seed " + std::to_string(r) + ")");  // fresh per run
  }
}

TEST_F(Cli, KnnGraphOnAnInstanceSet) {
  const json j = train_json("--preset digits-s --knn 5 --knn-metric cosine --epochs 2 --runs 1");
  EXPECT_TRUE(j["model"]["use_graph"]);
  EXPECT_EQ(j["knn_graph"]["k"], 5);
  EXPECT_EQ(j["knn_graph"]["metric"], "cosine");
}

TEST_F(Cli, BadInputIsNamed) {
  expect_error("train --data data/digits.npz --knn 0", "--knn must be >= 1");
  expect_error("train --data data/digits.npz --knn 2000", "--knn 2000 exceeds the number of instances (1797)");
  expect_error("train --data data/digits.npz --knn 3 --knn-metric manhattan", "--knn-metric: unknown metric");
  expect_error("train --preset nope", "--preset: unknown preset 'nope'; known: cora-s, cora-a");
  expect_error("train --epochs 3", "--data is required");
  expect_error("train --data data/cora.npz --task temporal", "data/cora.npz: x has shape [2708, 1433], expected 3 "
                                                             "dimensions [T, N, L]");
  expect_error("train --data data/chickenpox.npz --task instance", "data/chickenpox.npz: x: shape [517, 20, 4], "
                                                                    "expected 2 dimensions");
  expect_error("train --data data/chickenpox.npz --splits data/splits/cora_random10.npz", "--splits is for node/instance");
  expect_error("train --data data/digits.npz --per-class 0 --epochs 1", "empty training set");
  expect_error("train --data data/digits.npz --task graph", "--task: expected node, instance, temporal or auto");
  expect_error("train --preset pubmed-s", "data/pubmed.npz");
}

TEST_F(Cli, DeviceAndPrecisionFlagsAreChecked) {
  expect_error("train --data data/cora.npz --precision bf16 --device cpu --epochs 1",
               "--precision bf16 needs --device cuda");
  expect_error("train --data data/cora.npz --precision tf32 --epochs 1", "--precision tf32 needs --device cuda");
  expect_error("train --data data/cora.npz --precision foo --epochs 1", "--precision: expected fp32, tf32 or bf16, got 'foo'");
  expect_error("train --data data/cora.npz --precision foo --device cuda --epochs 1",
               "--precision: expected fp32, tf32 or bf16, got 'foo'");
  expect_error("train --data data/cora.npz --device tpu --epochs 1", "--device: expected cpu or cuda, got 'tpu'");
  expect_error("train --data data/chickenpox.npz --device cuda --epochs 1",
               "--device cuda: temporal task not supported yet");
  expect_error("bench --nodes 100 --precision bf16", "--precision bf16 needs --device cuda");
  expect_error("bench --nodes 100 --precision half --device cuda", "--precision: expected fp32, tf32 or bf16, got 'half'");
  expect_error("train-large --data data/cora.npz --precision bf16", "--precision bf16 needs --device cuda");
  expect_error("train-large --data data/cora.npz --precision x --device cuda", "--precision: expected fp32, tf32 or bf16");
  if (!cuda::available()) {
    expect_error("train --data data/cora.npz --device cuda --epochs 1", "--device cuda");
    expect_error("train-large --data data/cora.npz --device cuda --epochs 1", "--device cuda");
  }
  // the CPU report says where it ran
  const json j = train_json("--data data/cora.npz --epochs 2 --runs 1 --layers 1 --precision fp32");
  EXPECT_EQ(j["device"], "cpu");
  EXPECT_EQ(j["precision"], "fp32");
  EXPECT_EQ(j["peak_device_bytes"], 0);
  EXPECT_EQ(j["runs"][0]["peak_device_bytes"], 0);
}

}  // namespace
}  // namespace dfm
