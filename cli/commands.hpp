// The subcommands: flags structs and entry points (one source file each).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "cli/common.hpp"

namespace dfm::cli {

struct TrainFlags {
  std::string save_path;  // --save: checkpoint of the best run (its best-validation weights)
  std::string init_path;  // --init: every run starts from these weights instead of a random init
  std::string data, split = "random", splits_file, json_out, device = "cpu", precision = "fp32";
  std::string preset, data_dir = "data", task = "auto", knn_metric = "euclidean";
  std::string rng = "default";  // default | torch (PyTorch's CPU stream for init and dropout)
  int first_run = 0;  // runs first_run .. first_run + runs - 1 (to split one protocol over processes)
  int epochs = 500, runs = 5, threads = 0, eval_every = 1, per_class = 20, val = 500, test = 1000;
  int knn = 0;        // 0: no kNN graph
  int patience = 20;  // temporal early stopping
  std::int64_t split_seed = -1;  // >= 0: one random split shared by all runs
  std::uint64_t seed = 0;
  float lr = 1e-3f, weight_decay = 0.01f;
  bool quiet = false, step_per_snapshot = false, paper_mse = false;
  // Filled by configure_train(): where each explicitly set option came from, and notes to print.
  std::vector<std::string> from_user, from_preset, from_task_default, notes;
};
struct BenchFlags {
  Index nodes = 10000, features = 128, classes = 10;
  double avg_degree = 10.0;
  int steps = 10, warmup = 2, threads = 0;
  std::string json_out, device = "cpu", precision = "fp32";
};

// Applies --preset and the task's protocol defaults to the options of `train` that the user did
// not pass, resolves --task auto from the data file, and validates task-specific flags.
void configure_train(CLI::App* train, TrainFlags& f);
int run_train(const TrainFlags& f, const ModelFlags& mf);
int run_presets(bool as_json);
int run_bench(const BenchFlags& f, const ModelFlags& mf);

}  // namespace dfm::cli
