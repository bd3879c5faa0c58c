// `difformer train`: node classification under the citation protocol.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>

#include "cli/commands.hpp"
#include "core/context.hpp"
#include "core/error.hpp"
#include "core/memory.hpp"
#include "data/dataset.hpp"
#include "io/files.hpp"
#include "ops/cuda_backend.hpp"
#include "train/synthetic.hpp"
#include "train/trainer.hpp"

namespace dfm::cli {

int run_train(const TrainFlags& f, const ModelFlags& mf) {
  if (f.device == "cuda") cuda::require();
  DFM_CHECK(f.device == "cpu" || f.device == "cuda", "--device: expected cpu or cuda, got '", f.device, "'");
  DFM_CHECK(f.runs >= 1, "--runs must be >= 1 (got ", f.runs, ")");
  DFM_CHECK(f.eval_every >= 1, "--eval-every must be >= 1 (got ", f.eval_every, ")");
  DFM_CHECK(f.split == "random" || f.split == "public", "--split: expected random or public, got '", f.split, "'");
  Context ctx(f.seed, f.threads);
  Dataset d = load_node_dataset(f.data);
  // Citation protocol (SPEC.md section 3): row-normalised features, undirected graph with one
  // self-loop per node; bag-of-words features go sparse so the first layer skips the zeros.
  row_normalise(d);
  if (d.has_graph()) citation_graph(d);
  choose_feature_layout(d);
  const ModelConfig cfg = mf.config(d.features, d.classes, d.has_graph());
  if (!mf.no_graph && !d.has_graph())
    std::fprintf(stderr, "note: %s has no edge_index: training without the graph term\n", f.data.c_str());
  GraphOp graph;
  if (cfg.use_graph) graph = graph_operator(d);
  ModelInput in;
  if (d.sparse) {
    in.sparse = &d.xs;
    in.sparse_t = &d.xs_t;
  } else {
    in.dense = &d.x;
  }
  if (cfg.use_graph) in.graph = &graph;
  if (!f.quiet)
    std::printf("%s: %lld nodes, %lld features (%s), %lld classes, %lld edges; DIFFormer kernel=%s layers=%d hidden=%lld "
                "heads=%d graph=%s\n",
                f.data.c_str(), (long long)d.n, (long long)d.features, d.sparse ? "sparse" : "dense",
                (long long)d.classes, (long long)d.edges(), kernel_name(cfg.kernel), cfg.layers, (long long)cfg.hidden,
                cfg.heads, cfg.use_graph ? "on" : "off");

  TrainOptions opt;
  opt.epochs = f.epochs;
  opt.adam.lr = f.lr;
  opt.adam.weight_decay = f.weight_decay;
  opt.eval_every = f.eval_every;
  std::vector<double> tests, ms;
  json runs = json::array();
  for (int r = 0; r < f.runs; ++r) {
    const std::uint64_t seed = f.seed + static_cast<std::uint64_t>(r);
    Split split;
    std::string split_name;
    if (!f.splits_file.empty()) {
      split = load_split_file(f.splits_file, r, d.n);
      split_name = f.splits_file + " row " + std::to_string(r);
    } else if (f.split == "public") {
      split = file_split(d);
      split_name = "public";
    } else {
      split = random_per_class_split(d.y, d.classes, f.per_class, f.val, f.test, seed);
      validate_split(split, d.n, "random split");
      split_name = "random (seed " + std::to_string(seed) + ")";
    }
    DIFFormer model(cfg);
    std::mt19937_64 rng(seed);
    model.init(rng);
    const RunResult res = train_node_classifier(model, in, d.y, split, opt, seed);
    tests.push_back(100.0 * res.test);
    ms.push_back(res.ms_per_epoch);
    runs.push_back(json{{"seed", seed},
                        {"split", split_name},
                        {"best_epoch", res.best_epoch},
                        {"val", 100.0 * res.val},
                        {"test", 100.0 * res.test},
                        {"ms_per_epoch", res.ms_per_epoch},
                        {"seconds", res.seconds}});
    if (!f.quiet)
      std::printf("run %d/%d seed %llu split %s: best epoch %d, val %.2f, test %.2f  (%.1f s, %.2f ms/epoch)\n", r + 1,
                  f.runs, (unsigned long long)seed, split_name.c_str(), res.best_epoch, 100.0 * res.val,
                  100.0 * res.test, res.seconds, res.ms_per_epoch);
    std::fflush(stdout);
  }
  const double mean = mean_of(tests), sd = std_of(tests);
  std::printf("test accuracy: %.2f +- %.2f over %d run(s) (median %.2f); %.2f ms/epoch; peak RSS %.1f MB\n", mean, sd,
              f.runs, median_of(tests), median_of(ms), peak_rss_bytes() / 1048576.0);
  if (!f.json_out.empty()) {
    json j{{"command", "train"},
           {"data", f.data},
           {"task", "node"},
           {"metric", "accuracy"},
           {"test_mean", mean},
           {"test_std", sd},
           {"test_median", median_of(tests)},
           {"runs", runs},
           {"ms_per_epoch", median_of(ms)},
           {"peak_rss_bytes", peak_rss_bytes()},
           {"threads", f.threads},
           {"model", config_json(cfg)},
           {"optim", {{"lr", f.lr}, {"weight_decay", f.weight_decay}, {"epochs", f.epochs}}},
           {"split", f.splits_file.empty() ? f.split : f.splits_file}};
    write_text_atomic(f.json_out, j.dump(2) + "\n");
  }
  return 0;
}

}  // namespace dfm::cli
