// `difformer train-large`: large-graph node tasks (SPEC.md section 3, "Large graphs").
#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>

#include "cli/large_commands.hpp"
#include "core/context.hpp"
#include "core/error.hpp"
#include "core/memory.hpp"
#include "data/ogb.hpp"
#include "io/files.hpp"
#include "ops/cuda_backend.hpp"
#include "train/large.hpp"
#include "train/trainer.hpp"

namespace dfm::cli {

namespace {

struct SplitSpec {
  enum Kind { kDefault, kFile, kRatio } kind = kDefault;
  double train = 0.5, val = 0.25;
  std::string ogb_name;
};

SplitSpec parse_split(const std::string& s) {
  SplitSpec sp;
  if (s.empty()) return sp;
  if (s == "file" || s == "public" || s == "ogb") {
    sp.kind = SplitSpec::kFile;
  } else if (s.rfind("ogb:", 0) == 0) {
    sp.kind = SplitSpec::kFile;
    sp.ogb_name = s.substr(4);
  } else if (s.rfind("ratio:", 0) == 0) {
    sp.kind = SplitSpec::kRatio;
    const std::string r = s.substr(6);
    const size_t comma = r.find(',');
    DFM_CHECK(comma != std::string::npos, "--split ", s, ": expected ratio:TRAIN,VALID (e.g. ratio:0.5,0.25)");
    try {
      sp.train = std::stod(r.substr(0, comma));
      sp.val = std::stod(r.substr(comma + 1));
    } catch (const std::exception&) {
      fail("--split ", s, ": expected ratio:TRAIN,VALID with numbers (e.g. ratio:0.5,0.25)");
    }
    DFM_CHECK(sp.train > 0 && sp.val >= 0 && sp.train + sp.val < 1, "--split ", s,
              ": expected TRAIN > 0, VALID >= 0, TRAIN + VALID < 1");
  } else {
    fail("--split: unknown value '", s, "', expected file, ogb:<name> or ratio:TRAIN,VALID");
  }
  return sp;
}

bool given(const CLI::App* sub, const char* flag) { return sub && sub->count(flag) > 0; }

}  // namespace

int run_train_large(LargeFlags f, const CLI::App* sub) {
  using clock = std::chrono::steady_clock;
  // Preset values replace the defaults of every flag the user did not pass.
  if (!f.preset.empty()) {
    const LargePreset* p = find_large_preset(f.preset);
    if (!p) {
      std::string names;
      for (const auto& q : large_presets()) names += (names.empty() ? "" : ", ") + q.name;
      fail("--preset: unknown preset '", f.preset, "' (train-large knows ", names, ")");
    }
    if (!given(sub, "--kernel")) f.model.kernel = kernel_name(p->kernel);
    if (!given(sub, "--hidden")) f.model.hidden = p->hidden;
    if (!given(sub, "--layers")) f.model.layers = p->layers;
    if (!given(sub, "--heads")) f.model.heads = p->heads;
    if (!given(sub, "--alpha")) f.model.alpha = p->alpha;
    if (!given(sub, "--dropout")) f.model.dropout = p->dropout;
    if (!given(sub, "--no-weight")) f.no_weight = !p->use_weight;
    if (!given(sub, "--no-graph")) f.model.no_graph = !p->use_graph;
    if (!given(sub, "--no-ln")) f.model.no_ln = !p->use_ln;
    if (!given(sub, "--no-residual")) f.model.no_residual = !p->use_residual;
    if (!given(sub, "--lr")) f.lr = p->lr;
    if (!given(sub, "--weight-decay")) f.weight_decay = p->weight_decay;
    if (!given(sub, "--batch-size")) f.batch_size = p->batch_size;
    if (!given(sub, "--epochs")) f.epochs = p->epochs;
    if (!given(sub, "--runs")) f.runs = p->runs;
    if (!given(sub, "--eval-every")) f.eval_every = p->eval_every;
    if (!given(sub, "--seed")) f.seed = p->seed;
    if (!given(sub, "--metric")) f.metric = p->metric;
    if (!given(sub, "--split")) f.split = p->split;
    if (!given(sub, "--undirected")) f.undirected = p->undirected;
    if (!given(sub, "--no-self-loops")) f.no_self_loops = !p->self_loops;
  }
  f.model.use_weight = !f.no_weight;
  DFM_CHECK(f.runs >= 1, "--runs must be >= 1 (got ", f.runs, ")");
  DFM_CHECK(f.epochs >= 0, "--epochs must be >= 0 (got ", f.epochs, ")");
  DFM_CHECK(f.batch_size >= 0, "--batch-size must be >= 0 (got ", f.batch_size, ")");
  const SplitSpec sp = parse_split(f.split);
  DFM_CHECK(f.device == "cpu" || f.device == "cuda", "--device: expected cpu or cuda, got '", f.device, "'");
  validate_precision(f.device, f.precision);
  const bool gpu = f.device == "cuda";
  if (gpu) cuda::require();
  Context ctx(f.seed, f.threads);

  // ---- data ----
  GraphPrep prep;
  prep.undirected = f.undirected;
  prep.self_loops = !f.no_self_loops;
  const auto t_load = clock::now();
  LargeDataset d = load_large_dataset(f.data, prep, sp.ogb_name);
  const double load_s = std::chrono::duration<double>(clock::now() - t_load).count();
  const std::int64_t load_peak = peak_rss_bytes();
  const std::int64_t rss_after_load = current_rss_bytes();
  const bool has_graph = d.graph.edges() > 0;
  const ModelConfig cfg = f.model.config(d.features, d.targets.outputs(), has_graph);
  const Metric metric = f.metric.empty() ? default_metric(d.targets) : parse_metric(f.metric);
  DFM_CHECK(!gpu || !d.targets.multilabel, "--device cuda: ", f.data, " has multi-label targets (binary cross-entropy, "
            "ROC-AUC); the GPU model trains single-label (cross-entropy) tasks only so far; use --device cpu");
  const bool use_file = sp.kind == SplitSpec::kFile || (sp.kind == SplitSpec::kDefault && !d.file_splits.empty());
  if (use_file)
    DFM_CHECK(!d.file_splits.empty(), d.path, ": --split file, but the data has no split (train_idx/val_idx/test_idx "
                                              "or split/<name>/); use --split ratio:0.5,0.25");
  const double train_ratio = sp.kind == SplitSpec::kRatio ? sp.train : 0.5;
  const double val_ratio = sp.kind == SplitSpec::kRatio ? sp.val : 0.25;
  const std::string split_desc =
      use_file ? d.file_split_name
               : "ratio:" + std::to_string(train_ratio).substr(0, 4) + "," + std::to_string(val_ratio).substr(0, 4);
  if (use_file && d.file_splits.size() > 1)
    DFM_CHECK(static_cast<size_t>(f.runs) <= d.file_splits.size(), d.path, " has ", d.file_splits.size(),
              " splits (one per run), --runs ", f.runs, " asks for more");

  const Index batch = f.batch_size >= d.n ? d.n : f.batch_size;
  DFM_CHECK(f.path == "auto" || f.path == "lean" || f.path == "model", "--path: expected auto, lean or model, got '",
            f.path, "'");
  // Expected edges of a random chunk: non-loop edges survive with probability ~ (B/N)^2, the
  // node's own self-loop always.
  double chunk_edges = -1;
  if (batch > 0) {
    const double loops = prep.self_loops ? static_cast<double>(d.n) : 0.0;
    const double frac = static_cast<double>(batch) / static_cast<double>(d.n);
    chunk_edges = (static_cast<double>(d.graph.edges()) - loops) * frac * frac + (prep.self_loops ? batch : 0);
  }
  // auto: the model's own step (faster) when its activations fit the budget, else the lean step
  const MemoryEstimate est_model = estimate_memory(cfg, d.n, d.graph.edges(), d.features, d.targets.outputs(), batch,
                                                   false, chunk_edges);
  const bool lean = f.path == "lean" ||
                    (f.path == "auto" && static_cast<double>(est_model.train_step) > f.step_budget_mb * 1048576.0);
  DFM_CHECK(f.eval_path == "lean" || f.eval_path == "model", "--eval-path: expected lean or model, got '",
            f.eval_path, "'");
  MemoryEstimate est = estimate_memory(cfg, d.n, d.graph.edges(), d.features, d.targets.outputs(), batch, lean,
                                       chunk_edges);
  est.eval = estimate_memory(cfg, d.n, d.graph.edges(), d.features, d.targets.outputs(), batch,
                             f.eval_path == "lean", chunk_edges)
                 .eval;
  const Index chunks = batch > 0 ? (d.n + batch - 1) / batch : 1;
  if (!f.quiet) {
    std::printf("%s: %lld nodes, %lld edges (%s%s), %lld features, %s %lld; loaded in %.1f s (peak RSS %s)\n",
                f.data.c_str(), (long long)d.n, (long long)d.graph.edges(), prep.undirected ? "undirected" : "as stored",
                prep.self_loops ? ", self-loops" : "", (long long)d.features,
                d.targets.multilabel ? "multi-label tasks" : "classes", (long long)d.targets.outputs(), load_s,
                format_bytes(load_peak).c_str());
    std::printf("DIFFormer kernel=%s layers=%d hidden=%lld heads=%d weight=%s graph=%s; %s; batch %lld (%lld chunks/epoch), "
                "metric %s, split %s, path %s\n",
                kernel_name(cfg.kernel), cfg.layers, (long long)cfg.hidden, cfg.heads, cfg.use_weight ? "on" : "off",
                cfg.use_graph ? "on" : "off", f.preset.empty() ? "no preset" : ("preset " + f.preset).c_str(),
                (long long)batch, (long long)chunks, metric_name(metric), split_desc.c_str(),
                gpu ? ("cuda, " + f.precision).c_str() : lean && lean_supported(cfg) ? "lean" : "model");
  }
  std::printf("memory estimate: data %s + max(train step %s, evaluation %s) = %s (now resident: %s)\n",
              format_bytes(est.data).c_str(), format_bytes(est.train_step).c_str(), format_bytes(est.eval).c_str(),
              format_bytes(est.peak()).c_str(), format_bytes(rss_after_load).c_str());
  std::fflush(stdout);
  json j_est{{"data_bytes", est.data},
             {"train_step_bytes", est.train_step},
             {"eval_bytes", est.eval},
             {"peak_bytes", est.peak()},
             {"model_path_train_step_bytes", est_model.train_step}};
  if (f.estimate_only) {
    if (!f.json_out.empty())
      write_text_atomic(f.json_out, json{{"command", "train-large"}, {"data", f.data}, {"estimate", j_est}}.dump(2) + "\n");
    return 0;
  }

  LargeTrainOptions opt;
  opt.batch_size = batch;
  opt.epochs = f.epochs;
  opt.eval_every = f.eval_every;
  opt.adam.lr = f.lr;
  opt.adam.weight_decay = f.weight_decay;
  opt.metric = metric;
  opt.lean = lean;
  opt.lean_eval = f.eval_path == "lean";
  opt.device = f.device;
  opt.precision = f.precision;

  std::vector<double> tests, epoch_s, eval_s;
  std::int64_t train_peak = 0, eval_peak = 0, peak_device = 0;
  int gpu_evals = 0, cpu_evals = 0;
  json runs = json::array();
  for (int r = 0; r < f.runs; ++r) {
    const std::uint64_t seed = f.seed + static_cast<std::uint64_t>(r);
    const Split split = use_file ? d.file_splits[d.file_splits.size() > 1 ? r : 0]
                                 : ratio_split(d.targets, train_ratio, val_ratio, seed);
    auto progress = [&](const LargeEpochReport& e) {
      if (f.quiet) return;
      if (e.evaluated)
        std::printf("run %d epoch %d: loss %.4f (%d steps, %d skipped) %.2f s; eval %.2f s: train %.4f val %.4f test %.4f\n",
                    r, e.epoch, e.loss, e.steps, e.skipped, e.train_seconds, e.eval_seconds, e.train, e.val, e.test);
      else
        std::printf("run %d epoch %d: loss %.4f (%d steps, %d skipped) %.2f s\n", r, e.epoch, e.loss, e.steps, e.skipped,
                    e.train_seconds);
      std::fflush(stdout);
    };
    const LargeRunResult res = train_large_run(d, cfg, split, opt, seed, progress);
    tests.push_back(res.test);
    for (double s : res.epoch_seconds) epoch_s.push_back(s);
    for (double s : res.eval_seconds) eval_s.push_back(s);
    train_peak = std::max(train_peak, res.train_peak_rss);
    eval_peak = std::max(eval_peak, res.eval_peak_rss);
    peak_device = std::max(peak_device, res.peak_device_bytes);
    gpu_evals += res.gpu_evals;
    cpu_evals += res.cpu_evals;
    runs.push_back(json{{"seed", seed},
                        {"split", split_desc},
                        {"train_nodes", split.train.size()},
                        {"best_epoch", res.best_epoch},
                        {"train", res.train},
                        {"val", res.val},
                        {"test", res.test},
                        {"steps", res.steps},
                        {"skipped_chunks", res.skipped},
                        {"last_loss", res.last_loss},
                        {"seconds_per_epoch", median_of(res.epoch_seconds)},
                        {"eval_seconds", median_of(res.eval_seconds)},
                        {"train_peak_rss_bytes", res.train_peak_rss},
                        {"eval_peak_rss_bytes", res.eval_peak_rss},
                        {"peak_device_bytes", res.peak_device_bytes}});
  }
  auto finite = [](double v) { return std::isfinite(v) ? json(v) : json(nullptr); };
  const double mean = mean_of(tests), sd = std_of(tests);
  std::printf("test %s: %.4f +- %.4f over %d run(s); %.2f s/epoch (training), %.2f s/evaluation; peak RSS %s "
              "(training %s, evaluation %s)\n",
              metric_name(metric), mean, sd, f.runs, median_of(epoch_s), median_of(eval_s),
              format_bytes(lifetime_peak_rss_bytes()).c_str(), format_bytes(train_peak).c_str(), format_bytes(eval_peak).c_str());
  if (gpu)
    std::printf("device cuda (%s): peak device memory %s; %d evaluation(s) on the GPU, %d on the CPU\n",
                f.precision.c_str(), format_bytes(peak_device).c_str(), gpu_evals, cpu_evals);
  if (!f.json_out.empty()) {
    json j{{"command", "train-large"},
           {"data", f.data},
           {"preset", f.preset},
           {"nodes", d.n},
           {"edges", d.graph.edges()},
           {"features", d.features},
           {"outputs", d.targets.outputs()},
           {"multilabel", d.targets.multilabel},
           {"metric", metric_name(metric)},
           {"test_mean", finite(mean)},
           {"test_std", finite(sd)},
           {"runs", runs},
           {"batch_size", batch},
           {"chunks_per_epoch", chunks},
           {"epochs", f.epochs},
           {"eval_every", f.eval_every},
           {"seconds_per_epoch", median_of(epoch_s)},
           {"ms_per_epoch", 1000.0 * median_of(epoch_s)},
           {"eval_seconds", median_of(eval_s)},
           {"load_seconds", load_s},
           {"peak_rss_bytes", lifetime_peak_rss_bytes()},
           {"load_peak_rss_bytes", load_peak},
           {"rss_after_load_bytes", rss_after_load},
           {"train_peak_rss_bytes", train_peak},
           {"eval_peak_rss_bytes", eval_peak},
           {"estimate", j_est},
           {"path", gpu ? "cuda" : lean && lean_supported(cfg) ? "lean" : "model"},
           {"eval_path", f.eval_path == "lean" && lean_supported(cfg) ? "lean" : "model"},
           {"device", f.device},
           {"precision", f.precision},
           {"peak_device_bytes", peak_device},
           {"gpu_evaluations", gpu_evals},
           {"cpu_evaluations", cpu_evals},
           {"threads", f.threads},
           {"model", config_json(cfg)},
           {"optim", {{"lr", f.lr}, {"weight_decay", f.weight_decay}}},
           {"graph", {{"undirected", prep.undirected}, {"self_loops", prep.self_loops}}},
           {"split", split_desc}};
    write_text_atomic(f.json_out, j.dump(2) + "\n");
  }
  return 0;
}

CLI::App* add_train_large_command(CLI::App& app, LargeFlags& f) {
  CLI::App* large = app.add_subcommand(
      "train-large",
      "large-graph training (SPEC.md section 3): mini-batches of B random nodes (induced subgraphs), full-graph "
      "evaluation in bounded memory, .npz or OGB raw directories; --preset proteins-s | pokec-s");
  large->add_option("--data", f.data, ".npz (x, y [N] or [N,T], edge_index, ...) or an OGB dataset directory (raw/, split/)")
      ->required();
  large->add_option("--preset", f.preset, "proteins-s or pokec-s: the paper's settings; flags you pass override them");
  f.model.add(large);
  large->add_flag("--no-weight", f.no_weight, "no value projection Wv (the default here is Wv on)");
  large->add_option("--batch-size", f.batch_size, "B nodes per mini-batch; 0: full-graph training (no partitioning)")
      ->capture_default_str();
  large->add_option("--epochs", f.epochs, "epochs")->capture_default_str();
  large->add_option("--runs", f.runs, "independent runs; run r uses seed + r")->capture_default_str();
  large->add_option("--seed", f.seed, "base seed (initialisation, permutations, random splits)")->capture_default_str();
  large->add_option("--lr", f.lr, "Adam learning rate")->capture_default_str();
  large->add_option("--weight-decay", f.weight_decay, "coupled L2 weight decay")->capture_default_str();
  large->add_option("--eval-every", f.eval_every,
                    "full-graph evaluation when epoch % K == 0 (the official eval_step); 0: never")
      ->capture_default_str();
  large->add_option("--metric", f.metric, "accuracy or rocauc (default: rocauc for multi-label y [N,T], else accuracy)");
  large->add_option("--split", f.split,
                    "file (the .npz's train_idx/val_idx/test_idx or the OGB split), ogb:<name> (split/<name>), or "
                    "ratio:TRAIN,VALID (random over labelled nodes, fresh per run); default: file when present, else "
                    "ratio:0.5,0.25");
  large->add_flag("--undirected", f.undirected, "add reversed edges and drop duplicates (to_undirected)");
  large->add_flag("--no-self-loops", f.no_self_loops, "keep the graph's self-loops as they are (default: one per node)");
  large->add_option("--path", f.path,
                    "training step: lean (memory-lean: keeps the layer inputs, recomputes the rest in backward), model "
                    "(DIFFormer::forward/backward: keeps every activation, ~30% fewer FLOPs), auto (model when its "
                    "estimated step fits --step-budget-mb, else lean)")
      ->capture_default_str();
  large->add_option("--step-budget-mb", f.step_budget_mb, "--path auto: memory allowed for one training step")
      ->capture_default_str();
  large->add_option("--eval-path", f.eval_path,
                    "full-graph evaluation: lean (streaming, layer by layer in row blocks) or model "
                    "(DIFFormer::forward without state; for comparisons)")
      ->capture_default_str();
  large->add_flag("--estimate-only", f.estimate_only, "load, print the memory estimate, and stop");
  large->add_option("--device", f.device,
                    "cpu or cuda (cuda: every training step on the GPU, full-graph evaluation there when it fits, "
                    "else on the CPU; single-label tasks)")
      ->capture_default_str();
  large->add_option("--precision", f.precision, "cuda: fp32, tf32 or bf16; cpu: fp32 only")->capture_default_str();
  large->add_option("--threads", f.threads, "CPU threads (0: all)")->capture_default_str();
  large->add_option("--json", f.json_out, "write the results as JSON here");
  large->add_flag("--quiet", f.quiet, "only the summary line");
  return large;
}

void LargeCli::add(CLI::App& app) {
  synth = add_synth_command(app, synth_flags);
  large = add_train_large_command(app, large_flags);
}

bool LargeCli::dispatch(int& rc) {
  if (synth && *synth) {
    rc = run_synth(synth_flags);
    return true;
  }
  if (large && *large) {
    rc = run_train_large(large_flags, large);
    return true;
  }
  return false;
}

}  // namespace dfm::cli
