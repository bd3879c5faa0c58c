// The large-graph subcommands: `difformer synth` (stochastic block model graphs, .npz) and
// `difformer train-large` (mini-batch / full-graph training with full-graph evaluation, OGB raw
// directories or .npz, proteins-s / pokec-s presets, memory accounting). main() only calls
// LargeCli::add before parsing and LargeCli::dispatch after.
#pragma once
#include <cstdint>
#include <string>

#include "cli/common.hpp"

namespace dfm::cli {

struct SynthFlags {
  Index nodes = 0, features = 16, classes = 2, tasks = 0;
  double avg_degree = 10.0, homophily = 0.8, signal = 1.0;
  std::uint64_t seed = 0;
  std::string out, json_out;
  bool compress = false, quiet = false;
  int threads = 0;
};

struct LargeFlags {
  std::string data, preset, split, metric, json_out, ogb_split;
  Index batch_size = 10000;
  int epochs = 1, runs = 1, eval_every = 1, threads = 0;
  std::uint64_t seed = 0;
  float lr = 1e-2f, weight_decay = 0.0f;
  std::string path = "lean";  // lean | model | auto
  std::string eval_path = "lean";  // lean | model
  std::string device = "cpu", precision = "fp32";
  double step_budget_mb = 1024;
  bool undirected = false, no_self_loops = false, quiet = false, estimate_only = false;
  bool no_weight = false;
  ModelFlags model;
  LargeFlags() {
    model.layers = 3;
    model.hidden = 64;
    model.dropout = 0.0f;
    model.use_weight = true;
  }
};

// Declare the subcommands and their flags (synth_cmd.cpp, large_cmd.cpp).
CLI::App* add_synth_command(CLI::App& app, SynthFlags& f);
CLI::App* add_train_large_command(CLI::App& app, LargeFlags& f);
int run_synth(const SynthFlags& f);
// sub: the parsed subcommand (to tell flags the user passed from defaults a preset may replace).
int run_train_large(LargeFlags f, const CLI::App* sub);

struct LargeCli {
  SynthFlags synth_flags;
  LargeFlags large_flags;
  CLI::App* synth = nullptr;
  CLI::App* large = nullptr;
  void add(CLI::App& app);
  // Runs the parsed subcommand when it is one of these; returns false otherwise.
  bool dispatch(int& rc);
};

}  // namespace dfm::cli
