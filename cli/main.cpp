// The difformer command-line tool: a thin layer over the library. main() only declares the
// subcommands and their flags and dispatches; each subcommand lives in cli/<name>_cmd.cpp.
#include <cstdio>

#include "cli/commands.hpp"
#include "core/error.hpp"

using namespace dfm::cli;

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
