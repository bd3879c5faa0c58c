// `difformer train`: the three task families of SPEC.md section 3 through one model.
//   node      citation protocol: row-normalised features, undirected graph + self-loops, per-class
//             random split (or the file's public split, or a split file), best-validation test score;
//   instance  a set without an input graph: raw features, k labelled per class, 1000 validation,
//             the rest test, a fresh split per run; optional exact kNN graph (--knn);
//   temporal  snapshots x [T, N, L] -> y [T, N], each with its own (static or edge_ptr-dynamic)
//             graph; early stopping on validation MSE (train/temporal.hpp).
// configure_train() resolves --preset, --task auto and the task's protocol defaults before
// run_train() sees the flags; each family has its own function below.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <optional>
#include <random>

#include "cli/commands.hpp"
#include "cli/prepare.hpp"
#include "core/context.hpp"
#include "core/error.hpp"
#include "core/memory.hpp"
#include "core/torch_rng.hpp"
#include "data/dataset.hpp"
#include "data/knn.hpp"
#include "data/temporal_data.hpp"
#include "io/checkpoint.hpp"
#include "io/files.hpp"
#include "ops/cuda_backend.hpp"
#include "train/presets.hpp"
#include "train/temporal.hpp"
#include "train/trainer.hpp"

namespace dfm::cli {

namespace {

// Sets an option as if it had been typed: clear, add the value, convert into the bound variable.
void set_option(CLI::Option* o, const std::string& value) {
  o->clear();
  o->add_result(value);
  o->run_callback();
}

bool was_set(const TrainFlags& f, const std::string& flag) {
  for (const auto* v : {&f.from_user, &f.from_preset, &f.from_task_default})
    if (std::find(v->begin(), v->end(), flag) != v->end()) return true;
  return false;
}

json settings_json(const TrainFlags& f) {
  return json{{"data", f.data},
              {"task", f.task},
              {"preset", f.preset},
              {"lr", f.lr},
              {"weight_decay", f.weight_decay},
              {"epochs", f.epochs},
              {"runs", f.runs},
              {"first_run", f.first_run},
              {"seed", f.seed},
              {"threads", f.threads},
              {"device", f.device},
              {"precision", f.precision},
              {"split", f.split},
              {"splits_file", f.splits_file},
              {"split_seed", f.split_seed},
              {"per_class", f.per_class},
              {"val", f.val},
              {"test", f.test},
              {"knn", f.knn},
              {"knn_metric", f.knn_metric},
              {"patience", f.patience},
              {"step_per_snapshot", f.step_per_snapshot},
              {"paper_mse_loss", f.paper_mse},
              {"eval_every", f.eval_every},
              {"init", f.init_path},
              {"rng", f.rng},
              {"set_by_user", f.from_user},
              {"set_by_preset", f.from_preset},
              {"set_by_task_default", f.from_task_default}};
}

void print_notes(const TrainFlags& f) {
  for (const auto& n : f.notes) std::fprintf(stderr, "note: %s\n", n.c_str());
}

// ---------------------------------------------------------------------------------------------
// node and instance classification
// --init: the file's weights, read and checked once before the runs (empty without --init).
FloatBuffer init_file_weights(const TrainFlags& f, const ModelConfig& cfg) {
  if (f.init_path.empty()) return {};
  DIFFormer model(cfg);
  load_parameters(f.init_path, model);
  return model.params.values;
}
// A run's starting weights: the --init file's, else the seeded PyTorch-default initialisation.
// torch (--rng torch): the initialisation is drawn from this stream, as the reference module's
// construction draws it, even under --init (the reference run loads its state_dict after
// construction, so its dropout masks come after those draws).
void start_weights(DIFFormer& model, std::uint64_t seed, const FloatBuffer& from_file, TorchCpuGenerator* torch) {
  if (torch) {
    model.init_torch(*torch);
  } else if (from_file.empty()) {
    std::mt19937_64 rng(seed);
    model.init(rng);
  }
  if (!from_file.empty()) model.params.values = from_file;
}

int train_classification(const TrainFlags& f, const ModelFlags& mf) {
  const bool instance = f.task == "instance";
  Context ctx(f.seed, f.threads);
  Dataset d = load_node_dataset(f.data);
  // Only the citation protocol row-normalises (reference_targets.py); instance features stay raw.
  Preparation prep;
  prep.row_normalise = !instance;
  prep.knn = f.knn;
  prep.knn_metric = f.knn_metric;
  if (f.knn > 0 && d.graph_in_file && !f.quiet)
    std::fprintf(stderr, "note: --knn %d replaces the edge_index of %s\n", f.knn, f.data.c_str());
  const json knn_info = prepare_classification_data(d, prep);
  if (f.knn > 0 && !f.quiet)
    std::printf("kNN graph: k=%d %s, %.2f s (%lld rows needed the exact full scan)\n", f.knn, f.knn_metric.c_str(),
                knn_info["seconds"].get<double>(), (long long)knn_info["fallback_rows"].get<Index>());
  const ModelConfig cfg = mf.config(d.features, d.classes, d.has_graph());
  if (!mf.no_graph && !d.has_graph() && !instance)
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
    std::printf("%s [%s]: %lld %s, %lld features (%s), %lld classes, %lld edges; DIFFormer kernel=%s layers=%d "
                "hidden=%lld heads=%d graph=%s\n",
                f.data.c_str(), f.task.c_str(), (long long)d.n, instance ? "instances" : "nodes", (long long)d.features,
                d.sparse ? "sparse" : "dense", (long long)d.classes, (long long)d.edges(), kernel_name(cfg.kernel),
                cfg.layers, (long long)cfg.hidden, cfg.heads, cfg.use_graph ? "on" : "off");

  TrainOptions opt;
  opt.epochs = f.epochs;
  opt.adam.lr = f.lr;
  opt.adam.weight_decay = f.weight_decay;
  opt.eval_every = f.eval_every;
  const bool gpu = f.device == "cuda";
  std::int64_t peak_device = 0;
  const FloatBuffer init_weights = init_file_weights(f, cfg);
  std::vector<double> tests, ms;
  json runs = json::array();
  double best_val = -1.0;
  // The last run's split row is read (and checked) before any training: a too-short split file
  // fails at once, not after hours of runs.
  if (!f.splits_file.empty()) load_split_file(f.splits_file, f.first_run + f.runs - 1, d.n);
  for (int r = f.first_run; r < f.first_run + f.runs; ++r) {
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
      const std::uint64_t split_seed = f.split_seed >= 0 ? static_cast<std::uint64_t>(f.split_seed) : seed;
      split = random_per_class_split(d.y, d.classes, f.per_class, f.val, f.test, split_seed);
      validate_split(split, d.n, "random split (--per-class " + std::to_string(f.per_class) + ", --val " +
                                     std::to_string(f.val) + ", --test " + std::to_string(f.test) + ")");
      split_name = "random (seed " + std::to_string(split_seed) + ")";
    }
    DIFFormer model(cfg);
    std::optional<TorchCpuGenerator> torch;
    if (f.rng == "torch") torch.emplace(seed);
    start_weights(model, seed, init_weights, torch ? &*torch : nullptr);
    // The same initial weights, dropout masks and protocol on either device.
    auto backend = gpu ? make_cuda_backend(model, in, d.y, split, opt.adam, f.precision)
                       : make_cpu_backend(model, in, d.y, split, opt.adam, torch ? &*torch : nullptr);
    const RunResult res = train_node_classifier(*backend, d.y, split, opt, seed);
    backend.reset();  // frees the device memory before the next run
    peak_device = std::max(peak_device, res.peak_device_bytes);
    if (!f.save_path.empty() && res.val > best_val) {  // --save keeps the best run's best epoch
      best_val = res.val;
      model.params.values = res.best_params;
      json meta = preparation_meta(prep);
      meta.update(json{{"task", f.task}, {"data", f.data}, {"seed", seed}, {"best_epoch", res.best_epoch}});
      save_checkpoint(f.save_path, model, meta);
    }
    tests.push_back(100.0 * res.test);
    ms.push_back(res.ms_per_epoch);
    runs.push_back(json{{"seed", seed},
                        {"split", split_name},
                        {"train_size", split.train.size()},
                        {"val_size", split.val.size()},
                        {"test_size", split.test.size()},
                        {"best_epoch", res.best_epoch},
                        {"val", 100.0 * res.val},
                        {"test", 100.0 * res.test},
                        {"ms_per_epoch", res.ms_per_epoch},
                        {"seconds", res.seconds},
                        {"peak_device_bytes", res.peak_device_bytes}});
    if (!f.quiet)
      std::printf("run %d/%d seed %llu split %s (%zu/%zu/%zu): best epoch %d, val %.2f, test %.2f  (%.1f s, %.2f "
                  "ms/epoch)\n",
                  r + 1, f.first_run + f.runs, (unsigned long long)seed, split_name.c_str(), split.train.size(), split.val.size(),
                  split.test.size(), res.best_epoch, 100.0 * res.val, 100.0 * res.test, res.seconds, res.ms_per_epoch);
    std::fflush(stdout);
  }
  const double mean = mean_of(tests), sd = std_of(tests);
  std::printf("test accuracy: %.2f +- %.2f over %d run(s) (median %.2f); %.2f ms/epoch; peak RSS %.1f MB", mean, sd,
              f.runs, median_of(tests), median_of(ms), peak_rss_bytes() / 1048576.0);
  if (gpu) std::printf("; peak device %.1f MB (%s)", peak_device / 1048576.0, f.precision.c_str());
  std::printf("\n");
  if (!f.json_out.empty()) {
    json j{{"command", "train"},
           {"data", f.data},
           {"task", f.task},
           {"preset", f.preset},
           {"metric", "accuracy"},
           {"test_mean", mean},
           {"test_std", sd},
           {"test_median", median_of(tests)},
           {"runs", runs},
           {"ms_per_epoch", median_of(ms)},
           {"seconds_per_epoch", median_of(ms) / 1000.0},
           {"peak_rss_bytes", peak_rss_bytes()},
           {"device", f.device},
           {"precision", f.precision},
           {"peak_device_bytes", peak_device},
           {"threads", f.threads},
           {"model", config_json(cfg)},
           {"optim", {{"lr", f.lr}, {"weight_decay", f.weight_decay}, {"epochs", f.epochs}}},
           {"split", f.splits_file.empty() ? f.split : f.splits_file},
           {"settings", settings_json(f)}};
    if (!knn_info.is_null()) j["knn_graph"] = knn_info;
    write_text_atomic(f.json_out, j.dump(2) + "\n");
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// spatio-temporal regression
int train_temporal_task(const TrainFlags& f, const ModelFlags& mf) {
  TemporalDataset d = load_temporal_dataset(f.data);
  // Snapshots are small sets (20 to ~1000 nodes, hidden 4): OpenMP fork/join per op costs more
  // than it saves there, so --threads 0 means one thread below kParallelNodes nodes.
  constexpr Index kParallelNodes = 4096;
  const int threads = f.threads == 0 && d.nodes < kParallelNodes ? 1 : f.threads;
  Context ctx(f.seed, threads);
  const TemporalSplit split = temporal_split(d);
  // Graphs as stored (no self-loops added, not symmetrised), or a kNN graph per snapshot; --save
  // records this preparation for eval.
  Preparation prep;
  prep.row_normalise = false;
  prep.knn = mf.no_graph ? 0 : f.knn;
  prep.knn_metric = f.knn_metric;
  const SnapshotGraphs graphs = temporal_graphs(d, prep);
  const bool graph_available = !graphs.ops.empty();
  const ModelConfig cfg = mf.config(d.lags, 1, graph_available);
  if (!mf.no_graph && !graph_available)
    std::fprintf(stderr, "note: %s has no edge_index: training without the graph term\n", f.data.c_str());
  std::vector<ModelInput> in(static_cast<size_t>(d.snapshots));
  for (Index t = 0; t < d.snapshots; ++t) {
    in[t].dense = &d.x[t];
    if (cfg.use_graph) in[t].graph = graphs.of(t);
  }
  if (!f.quiet)
    std::printf("%s [temporal]: %lld snapshots of %lld nodes x %lld lags, %s graph (%lld edges), split %zu/%zu/%zu "
                "snapshots; DIFFormer kernel=%s layers=%d hidden=%lld graph=%s\n",
                f.data.c_str(), (long long)d.snapshots, (long long)d.nodes, (long long)d.lags,
                f.knn > 0 ? "kNN" : d.dynamic() ? "dynamic" : "static", (long long)d.src.size(), split.train.size(),
                split.val.size(), split.test.size(), kernel_name(cfg.kernel), cfg.layers, (long long)cfg.hidden,
                cfg.use_graph ? "on" : "off");

  TemporalOptions opt;
  opt.epochs = f.epochs;
  opt.patience = f.patience;
  opt.adam.lr = f.lr;
  opt.adam.weight_decay = f.weight_decay;
  opt.step_per_snapshot = f.step_per_snapshot;
  opt.paper_mse_loss = f.paper_mse;
  std::vector<double> mses, papers, ms;
  json runs = json::array();
  double best_val = std::numeric_limits<double>::infinity();
  const FloatBuffer init_weights = init_file_weights(f, cfg);
  for (int r = f.first_run; r < f.first_run + f.runs; ++r) {
    const std::uint64_t seed = f.seed + static_cast<std::uint64_t>(r);
    DIFFormer model(cfg);
    std::optional<TorchCpuGenerator> torch;
    if (f.rng == "torch") torch.emplace(seed);
    start_weights(model, seed, init_weights, torch ? &*torch : nullptr);
    const TemporalRunResult res = train_temporal(model, in, d.y, split, opt, seed, {}, torch ? &*torch : nullptr);
    const double crit = opt.paper_mse_loss ? res.val.paper_mse : res.val.mse;
    if (!f.save_path.empty() && crit < best_val) {  // --save keeps the best run (its best-validation weights)
      best_val = crit;
      json meta = preparation_meta(prep);
      meta.update(json{{"task", "temporal"}, {"data", f.data}, {"seed", seed}, {"best_epoch", res.best_epoch}});
      save_checkpoint(f.save_path, model, meta);
    }
    mses.push_back(res.test.mse);
    papers.push_back(res.test.paper_mse);
    ms.push_back(res.ms_per_epoch);
    runs.push_back(json{{"seed", seed},
                        {"best_epoch", res.best_epoch},
                        {"epochs_run", res.epochs_run},
                        {"stopped_early", res.stopped_early},
                        {"val", res.val.mse},
                        {"val_paper_mse", res.val.paper_mse},
                        {"test", res.test.mse},
                        {"test_paper_mse", res.test.paper_mse},
                        {"ms_per_epoch", res.ms_per_epoch},
                        {"seconds", res.seconds}});
    if (!f.quiet)
      std::printf("run %d/%d seed %llu: best epoch %d of %d, val MSE %.4f, test MSE %.4f, paper_mse %.4f  (%.1f s, "
                  "%.2f ms/epoch)\n",
                  r + 1, f.first_run + f.runs, (unsigned long long)seed, res.best_epoch, res.epochs_run, res.val.mse, res.test.mse,
                  res.test.paper_mse, res.seconds, res.ms_per_epoch);
    std::fflush(stdout);
  }
  std::printf("test MSE: %.4f +- %.4f over %d run(s); paper_mse %.4f +- %.4f; %.2f ms/epoch; peak RSS %.1f MB\n",
              mean_of(mses), std_of(mses), f.runs, mean_of(papers), std_of(papers), median_of(ms),
              peak_rss_bytes() / 1048576.0);
  if (!f.json_out.empty()) {
    json j{{"command", "train"},
           {"data", f.data},
           {"task", "temporal"},
           {"preset", f.preset},
           {"metric", "mse"},
           {"test_mean", mean_of(mses)},
           {"test_std", std_of(mses)},
           {"test_median", median_of(mses)},
           {"paper_mse_mean", mean_of(papers)},
           {"paper_mse_std", std_of(papers)},
           {"runs", runs},
           {"ms_per_epoch", median_of(ms)},
           {"seconds_per_epoch", median_of(ms) / 1000.0},
           {"peak_rss_bytes", peak_rss_bytes()},
           {"device", "cpu"},
           {"precision", "fp32"},
           {"peak_device_bytes", 0},
           {"threads", threads},
           {"model", config_json(cfg)},
           {"optim", {{"lr", f.lr}, {"weight_decay", f.weight_decay}, {"epochs", f.epochs}}},
           {"split",
            {{"train", split.train.size()},
             {"val", split.val.size()},
             {"test", split.test.size()},
             {"source", d.train_idx.empty() ? "chronological 20/20/60" : "file"}}},
           {"graph", !cfg.use_graph ? "none" : f.knn > 0 ? "knn" : d.dynamic() ? "dynamic" : "static"},
           {"settings", settings_json(f)}};
    write_text_atomic(f.json_out, j.dump(2) + "\n");
  }
  return 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void configure_train(CLI::App* train, TrainFlags& f) {
  for (const CLI::Option* o : train->get_options())
    if (o->count() > 0 && !o->get_lnames().empty()) f.from_user.push_back("--" + o->get_lnames().front());

  // Only options the user did not pass take a preset's (then the task's) values, wherever on the
  // command line --preset stands.
  auto apply = [&](const std::vector<PresetSetting>& settings, std::vector<std::string>& record,
                   const std::string& who) {
    for (const PresetSetting& s : settings) {
      CLI::Option* o = train->get_option_no_throw(s.flag);
      if (!o) {
        f.notes.push_back(who + " asks for " + s.flag + " " + s.value + ", which this build of train does not have");
        continue;
      }
      if (o->count() > 0) continue;
      set_option(o, s.value);
      record.push_back(s.flag);
    }
  };
  if (!f.preset.empty()) {
    const Preset* p = find_preset(f.preset);
    DFM_CHECK(p, "--preset: unknown preset '", f.preset, "'; known: ", preset_names(), " (see `difformer presets`)");
    if (f.data.empty()) {
      f.data = f.data_dir + "/" + p->data_file;
      f.from_preset.push_back("--data");
    }
    apply(p->settings, f.from_preset, "preset " + p->name);
  }
  DFM_CHECK(!f.data.empty(), "--data is required (a .npz file), or --preset NAME");
  if (f.task == "citation") f.task = "node";
  if (f.task == "auto") {
    f.task = detect_task(f.data);
    if (!f.quiet) f.notes.push_back("--task auto: " + f.data + " is a " + f.task + " dataset");
  }
  DFM_CHECK(f.task == "node" || f.task == "instance" || f.task == "temporal", "--task: expected node, instance, "
            "temporal or auto, got '", f.task, "'");
  apply(task_defaults(f.task), f.from_task_default, "the " + f.task + " protocol");

  // Flag checks that need to know what was passed, not only the value.
  DFM_CHECK(!was_set(f, "--knn") || f.knn >= 1, "--knn must be >= 1 (got ", f.knn, ")");
  parse_knn_metric(f.knn_metric);
  DFM_CHECK(f.runs >= 1, "--runs must be >= 1 (got ", f.runs, ")");
  DFM_CHECK(f.first_run >= 0, "--first-run must be >= 0 (got ", f.first_run, ")");
  DFM_CHECK(f.epochs >= 1, "--epochs must be >= 1 (got ", f.epochs, ")");
  DFM_CHECK(f.split == "random" || f.split == "public", "--split: expected random or public, got '", f.split, "'");
  if (f.task == "temporal") {
    DFM_CHECK(f.splits_file.empty(), "--splits is for node/instance tasks; a temporal run takes its snapshot split "
              "from the file's train_idx/val_idx/test_idx (else chronological 20/20/60)");
    DFM_CHECK(f.patience >= 1, "--patience must be >= 1 (got ", f.patience, ")");
    for (const char* flag : {"--per-class", "--val", "--test", "--split", "--split-seed", "--eval-every"})
      if (std::find(f.from_user.begin(), f.from_user.end(), flag) != f.from_user.end())
        f.notes.push_back(std::string(flag) + " is ignored for a temporal task");
  } else {
    DFM_CHECK(f.eval_every >= 1, "--eval-every must be >= 1 (got ", f.eval_every, ")");
    for (const char* flag : {"--patience", "--step-per-snapshot", "--paper-mse"})
      if (std::find(f.from_user.begin(), f.from_user.end(), flag) != f.from_user.end())
        f.notes.push_back(std::string(flag) + " only applies to a temporal task; ignored");
  }
}

int run_train(const TrainFlags& f, const ModelFlags& mf) {
  DFM_CHECK(f.device == "cpu" || f.device == "cuda", "--device: expected cpu or cuda, got '", f.device, "'");
  validate_precision(f.device, f.precision);
  DFM_CHECK(f.rng == "default" || f.rng == "torch", "--rng: expected default or torch, got '", f.rng, "'");
  DFM_CHECK(f.rng != "torch" || f.device == "cpu", "--rng torch reproduces PyTorch's CPU generator and runs on the CPU "
            "engine only (use --device cpu)");
  DFM_CHECK(f.device != "cuda" || f.task != "temporal", "--device cuda: temporal task not supported yet (use --device "
            "cpu)");
  if (f.device == "cuda") cuda::require();
  print_notes(f);
  if (!f.preset.empty() && !f.quiet) {
    std::string s;
    for (const auto& flag : f.from_preset) s += " " + flag;
    std::printf("preset %s set:%s\n", f.preset.c_str(), s.empty() ? " (nothing: every option was given)" : s.c_str());
  }
  if (f.task == "temporal") return train_temporal_task(f, mf);
  return train_classification(f, mf);
}

}  // namespace dfm::cli
