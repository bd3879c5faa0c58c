// The subcommands: flags structs and entry points (one source file each).
#pragma once
#include <cstdint>
#include <string>

#include "cli/common.hpp"

namespace dfm::cli {

struct TrainFlags {
  std::string data, split = "random", splits_file, json_out, device = "cpu";
  int epochs = 500, runs = 5, threads = 0, eval_every = 1, per_class = 20, val = 500, test = 1000;
  std::uint64_t seed = 0;
  float lr = 1e-3f, weight_decay = 0.01f;
  bool quiet = false;
};
struct BenchFlags {
  Index nodes = 10000, features = 128, classes = 10;
  double avg_degree = 10.0;
  int steps = 10, warmup = 2, threads = 0;
  std::string json_out, device = "cpu";
};

int run_train(const TrainFlags& f, const ModelFlags& mf);
int run_bench(const BenchFlags& f, const ModelFlags& mf);

}  // namespace dfm::cli
