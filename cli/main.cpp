// The difformer command-line tool: a thin layer over the library. Each subcommand parses its
// flags, calls the library, prints a short human report and optionally writes JSON.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <numeric>

#include "core/context.hpp"
#include "core/error.hpp"
#include "core/memory.hpp"
#include "data/dataset.hpp"
#include "io/files.hpp"
#include "model/difformer.hpp"
#include "ops/cuda_backend.hpp"
#include "train/synthetic.hpp"
#include "train/trainer.hpp"

using json = nlohmann::json;
using namespace dfm;

namespace {

// Flags shared by every command that builds a model.
struct ModelFlags {
  std::string kernel = "simple", qk_norm = "global";
  int layers = 8, heads = 1;
  Index hidden = 64;
  float alpha = 0.5f, dropout = 0.2f, graph_weight = -1.0f;
  bool no_graph = false, use_weight = false, no_ln = false, no_residual = false;

  void add(CLI::App* app) {
    app->add_option("--kernel", kernel, "global attention: simple (DIFFormer-s), sigmoid (DIFFormer-a), none")
        ->capture_default_str();
    app->add_option("--layers", layers, "diffusion layers")->capture_default_str();
    app->add_option("--hidden", hidden, "hidden width D")->capture_default_str();
    app->add_option("--heads", heads, "attention heads (each of full width D)")->capture_default_str();
    app->add_option("--alpha", alpha, "step size tau of the residual mix")->capture_default_str();
    app->add_option("--dropout", dropout, "dropout probability")->capture_default_str();
    app->add_option("--graph-weight", graph_weight, "<= 0: attention + graph; in (0,1]: convex mix")
        ->capture_default_str();
    app->add_option("--qk-norm", qk_norm, "simple kernel: global (official code) or node (paper)")
        ->capture_default_str();
    app->add_flag("--no-graph", no_graph, "drop the graph term (no GCN propagation)");
    app->add_flag("--use-weight", use_weight, "value projection Wv (off: V = h)");
    app->add_flag("--no-ln", no_ln, "no LayerNorm");
    app->add_flag("--no-residual", no_residual, "no residual mix");
  }
  ModelConfig config(Index in, Index out, bool graph_available) const {
    ModelConfig c;
    c.in_features = in;
    c.out_features = out;
    c.hidden = hidden;
    c.layers = layers;
    c.heads = heads;
    c.kernel = parse_kernel(kernel);
    c.qk_norm = parse_qk_norm(qk_norm);
    c.use_graph = !no_graph && graph_available;
    c.use_weight = use_weight;
    c.use_ln = !no_ln;
    c.use_residual = !no_residual;
    c.alpha = alpha;
    c.dropout = dropout;
    c.graph_weight = graph_weight;
    c.validate();
    return c;
  }
};

json config_json(const ModelConfig& c) {
  return json{{"kernel", kernel_name(c.kernel)},
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

double mean_of(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / v.size(); }
double std_of(const std::vector<double>& v) {  // unbiased, as numpy std(ddof=1)
  if (v.size() < 2) return 0.0;
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / (v.size() - 1));
}
double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : (v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]));
}

// ---- train --------------------------------------------------------------------------------
struct TrainFlags {
  std::string data, split = "random", splits_file, json_out, device = "cpu";
  int epochs = 500, runs = 5, threads = 0, eval_every = 1, per_class = 20, val = 500, test = 1000;
  std::uint64_t seed = 0;
  float lr = 1e-3f, weight_decay = 0.01f;
  bool quiet = false;
};

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

// ---- bench --------------------------------------------------------------------------------
struct BenchFlags {
  Index nodes = 10000, features = 128, classes = 10;
  double avg_degree = 10.0;
  int steps = 10, warmup = 2, threads = 0;
  std::string json_out, device = "cpu";
};

int run_bench(const BenchFlags& f, const ModelFlags& mf) {
  if (f.device == "cuda") cuda::require();
  DFM_CHECK(f.nodes >= 2, "--nodes must be >= 2");
  DFM_CHECK(f.steps >= 1, "--steps must be >= 1");
  Context ctx(0, f.threads);
  const SyntheticProblem p = make_synthetic(f.nodes, f.features, f.classes, f.avg_degree, 0, !mf.no_graph);
  const ModelConfig cfg = mf.config(f.features, f.classes, !mf.no_graph);
  GraphOp graph;
  if (cfg.use_graph) graph = make_graph_op<float>(f.nodes, p.src, p.dst);
  ModelInput in;
  in.dense = &p.x;
  if (cfg.use_graph) in.graph = &graph;
  DIFFormer model(cfg);
  std::mt19937_64 rng(0);
  model.init(rng);
  Adam adam(AdamOptions{0.01f, 1e-3f});  // the peer benchmark's optimiser settings
  std::vector<std::int64_t> all(static_cast<size_t>(f.nodes));
  std::iota(all.begin(), all.end(), 0);
  ForwardState state;
  Mat logits, dlogits;
  std::vector<double> ms;
  float loss = 0;
  for (int s = 0; s < f.warmup + f.steps; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    model.params.zero_grad();
    model.forward(in, true, static_cast<std::uint64_t>(s), &state, logits);
    loss = cpu::cross_entropy(logits, p.y, all, dlogits);
    model.backward(in, state, dlogits);
    adam.step(model.params);
    const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (s >= f.warmup) ms.push_back(t);
  }
  const double med = median_of(ms);
  std::printf("bench: N=%lld F=%lld C=%lld E=%zu kernel=%s graph=%s layers=%d hidden=%lld heads=%d: %.2f ms/step "
              "(median of %d), peak RSS %.1f MB, loss %.4f\n",
              (long long)f.nodes, (long long)f.features, (long long)f.classes, p.src.size(), kernel_name(cfg.kernel),
              cfg.use_graph ? "on" : "off", cfg.layers, (long long)cfg.hidden, cfg.heads, med, f.steps,
              peak_rss_bytes() / 1048576.0, loss);
  if (!f.json_out.empty()) {
    json j{{"command", "bench"},
           {"device", "cpu"},
           {"nodes", f.nodes},
           {"features", f.features},
           {"classes", f.classes},
           {"edges", p.src.size()},
           {"threads", f.threads},
           {"steps", f.steps},
           {"ms_per_step_median", med},
           {"ms_per_step_min", *std::min_element(ms.begin(), ms.end())},
           {"peak_rss_bytes", peak_rss_bytes()},
           {"loss", loss},
           {"model", config_json(cfg)}};
    write_text_atomic(f.json_out, j.dump(2) + "\n");
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"difformer: DIFFormer (Wu et al., ICLR 2023) training, evaluation and benchmarks"};
  app.require_subcommand(1);

  TrainFlags tf;
  ModelFlags train_model;
  auto* train = app.add_subcommand("train", "train node classifiers (defaults: the paper's Cora DIFFormer-s settings)");
  train->add_option("--data", tf.data, ".npz dataset (x, y, optional edge_index, train_idx/val_idx/test_idx)")
      ->required();
  train_model.add(train);
  train->add_option("--lr", tf.lr, "Adam learning rate")->capture_default_str();
  train->add_option("--weight-decay", tf.weight_decay, "coupled L2 weight decay")->capture_default_str();
  train->add_option("--epochs", tf.epochs, "epochs (one full-batch Adam step each)")->capture_default_str();
  train->add_option("--runs", tf.runs, "independent runs; run r uses seed + r")->capture_default_str();
  train->add_option("--seed", tf.seed, "base seed (split, initialisation, dropout)")->capture_default_str();
  train->add_option("--split", tf.split, "random (per class) or public (the file's train/val/test_idx)")
      ->capture_default_str();
  train->add_option("--splits", tf.splits_file, "split file with [R, n] train_idx/val_idx/test_idx; run r uses row r");
  train->add_option("--per-class", tf.per_class, "random split: training nodes per class")->capture_default_str();
  train->add_option("--val", tf.val, "random split: validation nodes")->capture_default_str();
  train->add_option("--test", tf.test, "random split: test nodes (-1: all the rest)")->capture_default_str();
  train->add_option("--eval-every", tf.eval_every, "evaluate every K epochs")->capture_default_str();
  train->add_option("--threads", tf.threads, "CPU threads (0: all)")->capture_default_str();
  train->add_option("--device", tf.device, "cpu or cuda")->capture_default_str();
  train->add_option("--json", tf.json_out, "write the results as JSON here");
  train->add_flag("--quiet", tf.quiet, "only the summary line");

  BenchFlags bf;
  ModelFlags bench_model;
  bench_model.layers = 2;
  bench_model.dropout = 0.0f;
  bench_model.use_weight = true;
  auto* bench = app.add_subcommand("bench", "time training steps on synthetic data made like the PyTorch peer's");
  bench->add_option("--nodes", bf.nodes, "N")->capture_default_str();
  bench->add_option("--features", bf.features, "F")->capture_default_str();
  bench->add_option("--classes", bf.classes, "C")->capture_default_str();
  bench->add_option("--avg-degree", bf.avg_degree, "average degree of the random graph")->capture_default_str();
  bench->add_option("--steps", bf.steps, "timed steps")->capture_default_str();
  bench->add_option("--warmup", bf.warmup, "untimed steps first")->capture_default_str();
  bench->add_option("--threads", bf.threads, "CPU threads (0: all)")->capture_default_str();
  bench->add_option("--device", bf.device, "cpu or cuda")->capture_default_str();
  bench->add_option("--json", bf.json_out, "write the results as JSON here");
  bench_model.add(bench);
  bench->add_flag("--no-weight", [&](std::int64_t) { bench_model.use_weight = false; }, "no value projection");

  CLI11_PARSE(app, argc, argv);
  try {
    if (*train) return run_train(tf, train_model);
    if (*bench) return run_bench(bf, bench_model);
  } catch (const dfm::Error& e) {
    std::fprintf(stderr, "difformer: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "difformer: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
