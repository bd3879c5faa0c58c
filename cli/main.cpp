// The difformer command-line tool: a thin layer over the library. main() only declares the
// subcommands and their flags and dispatches; each subcommand lives in cli/<name>_cmd.cpp.
#include <cstdio>

#include "cli/commands.hpp"
#include "cli/large_commands.hpp"
#include "cli/model_commands.hpp"
#include "core/error.hpp"

using namespace dfm::cli;

int main(int argc, char** argv) {
  CLI::App app{"difformer: DIFFormer (Wu et al., ICLR 2023) training, evaluation and benchmarks"};
  app.require_subcommand(1);

  TrainFlags tf;
  ModelFlags train_model;
  auto* train = app.add_subcommand(
      "train",
      "train DIFFormer on a node (citation), instance or spatio-temporal task; flags default to the paper's Cora "
      "DIFFormer-s settings, or to the task's protocol (SPEC.md section 3); --preset NAME sets a whole protocol row");
  train->add_option("--preset", tf.preset, "a protocol row (see `difformer presets`); flags you pass override it");
  train->add_option("--data", tf.data, ".npz dataset: x [N,F] or [T,N,L], y, optional edge_index/edge_weight/edge_ptr, "
                                       "train_idx/val_idx/test_idx (default with --preset: DATA_DIR/<preset's file>)");
  train->add_option("--data-dir", tf.data_dir, "where --preset looks for its data file")->capture_default_str();
  train->add_option("--task", tf.task,
                    "node (citation protocol), instance (no input graph), temporal (snapshots), or auto: temporal "
                    "when x is [T,N,L], node when the file has edge_index, else instance")
      ->capture_default_str();
  train_model.add(train);
  train->add_option("--lr", tf.lr, "Adam learning rate")->capture_default_str();
  train->add_option("--weight-decay", tf.weight_decay, "coupled L2 weight decay")->capture_default_str();
  train->add_option("--epochs", tf.epochs, "epochs (one full-batch Adam step each; temporal: the most epochs)")
      ->capture_default_str();
  train->add_option("--save", tf.save_path, "save the best run's best-validation weights (checkpoint .npz)");
  train->add_option("--init", tf.init_path,
                    "start every run from these weights (a `train --save` checkpoint, or a PyTorch state_dict saved "
                    "with numpy.savez under the official names) instead of the seeded random initialisation; the "
                    "seed still draws splits and dropout")
      ->check(CLI::ExistingFile);
  train->add_option("--runs", tf.runs, "independent runs; run r uses seed + r")->capture_default_str();
  train->add_option("--first-run", tf.first_run,
                    "run the runs first-run .. first-run + runs - 1 (seed + r, --splits row r): one protocol split over "
                    "processes gives exactly the runs of a single invocation")
      ->capture_default_str();
  train->add_option("--seed", tf.seed, "base seed (split, initialisation, dropout)")->capture_default_str();
  train->add_option("--rng", tf.rng,
                    "default: seeded std::mt19937_64 initialisation and counter-hash dropout masks (the same whatever "
                    "the thread count or device); torch: PyTorch's CPU generator, so that run r starts from the "
                    "weights and drops the units of the PyTorch reference run after torch.manual_seed(seed + r) "
                    "(CPU only)")
      ->capture_default_str();
  train->add_option("--split", tf.split, "random (per class) or public (the file's train/val/test_idx)")
      ->capture_default_str();
  train->add_option("--splits", tf.splits_file, "split file with [R, n] train_idx/val_idx/test_idx; run r uses row r");
  train->add_option("--split-seed", tf.split_seed,
                    "random split: >= 0 draws ONE split with this seed for all runs (the published citation runs); "
                    "-1: a fresh split per run (seed + r)")
      ->capture_default_str();
  train->add_option("--per-class", tf.per_class, "random split: training nodes per class")->capture_default_str();
  train->add_option("--val", tf.val, "random split: validation nodes")->capture_default_str();
  train->add_option("--test", tf.test, "random split: test nodes (-1: all the rest)")->capture_default_str();
  train->add_option("--knn", tf.knn, "build an exact kNN graph with K neighbours (self included) from x; node/instance: "
                                     "symmetrised + self-loops, replacing any file graph; temporal: per snapshot, "
                                     "neighbour -> node, as the official code's knn option");
  train->add_option("--knn-metric", tf.knn_metric, "kNN distance: euclidean or cosine")->capture_default_str();
  train->add_option("--patience", tf.patience, "temporal: stop after this many epochs without a better validation MSE")
      ->capture_default_str();
  train->add_flag("--step-per-snapshot", tf.step_per_snapshot,
                  "temporal: one Adam step per training snapshot (official WikiMath variant) instead of one per epoch");
  train->add_flag("--paper-mse", tf.paper_mse,
                  "temporal: train and early-stop on the paper's broadcast MSE mean_ij (p_i - y_j)^2 (reproduction only)");
  train->add_option("--eval-every", tf.eval_every, "evaluate every K epochs")->capture_default_str();
  train->add_option("--threads", tf.threads, "CPU threads (0: all)")->capture_default_str();
  train->add_option("--device", tf.device, "cpu or cuda")->capture_default_str();
  train->add_option("--precision", tf.precision,
                    "cuda: fp32 (true single precision), tf32 (tensor-core GEMMs) or bf16; cpu: fp32 only")
      ->capture_default_str();
  train->add_option("--json", tf.json_out, "write the results as JSON here");
  train->add_flag("--quiet", tf.quiet, "only the summary line");

  bool presets_json = false;
  auto* presets = app.add_subcommand("presets", "list the --preset rows of `difformer train` with their settings");
  presets->add_flag("--json", presets_json, "as JSON");

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
  bench->add_option("--precision", bf.precision, "cuda: fp32, tf32 or bf16; cpu: fp32 only")->capture_default_str();
  bench->add_option("--json", bf.json_out, "write the results as JSON here");
  bench_model.add(bench);
  bench->add_flag("--no-weight", [&](std::int64_t) { bench_model.use_weight = false; }, "no value projection");

  LargeCli large_cli;  // synth, train-large: cli/large_commands.hpp
  large_cli.add(app);

  ModelUseFlags eval_flags, embed_flags;  // eval, embed: cli/model_cmd.cpp
  add_eval_command(app, eval_flags);
  add_embed_command(app, embed_flags);

  CLI11_PARSE(app, argc, argv);
  try {
    if (*train) {
      configure_train(train, tf);
      return run_train(tf, train_model);
    }
    if (*presets) return run_presets(presets_json);
    if (*bench) return run_bench(bf, bench_model);
    if (int rc = 0; large_cli.dispatch(rc)) return rc;
    if (app.got_subcommand("eval")) return run_eval(eval_flags);
    if (app.got_subcommand("embed")) return run_embed(embed_flags);
  } catch (const dfm::Error& e) {
    std::fprintf(stderr, "difformer: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "difformer: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
