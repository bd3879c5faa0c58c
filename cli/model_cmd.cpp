// `difformer eval` (accuracy of a checkpoint on a dataset's split, or its MSE on a temporal
// dataset's snapshots) and `difformer embed` (export the node embeddings h_L, or the logits, as .npy).
#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/common.hpp"
#include "cli/model_commands.hpp"
#include "cli/prepare.hpp"
#include "core/context.hpp"
#include "core/error.hpp"
#include "data/dataset.hpp"
#include "data/npz.hpp"
#include "io/checkpoint.hpp"
#include "io/files.hpp"
#include "train/metrics.hpp"
#include "train/temporal.hpp"
#include "train/trainer.hpp"

namespace dfm::cli {
namespace {

struct Loaded {
  std::unique_ptr<DIFFormer> model;
  Dataset data;
  GraphOp graph;
  ModelInput in;
};

// The dataset prepared exactly as the checkpoint's training run prepared it (meta_json: row
// normalisation, kNN graph), by the same code as `train` (cli/prepare.hpp).
void load(const ModelUseFlags& f, Loaded& l) {
  nlohmann::json meta;
  l.model = load_checkpoint(f.model, &meta);
  l.data = load_node_dataset(f.data);
  Dataset& d = l.data;
  const ModelConfig& cfg = l.model->config();
  DFM_CHECK(d.features == cfg.in_features, f.data, ": x has ", d.features, " features, the model in ", f.model,
            " expects ", cfg.in_features);
  prepare_classification_data(d, preparation_from_meta(meta));
  if (cfg.use_graph) {
    DFM_CHECK(d.has_graph(), f.data, ": the model uses the graph term but the file has no edge_index");
    l.graph = graph_operator(d);
    l.in.graph = &l.graph;
  }
  if (d.sparse) {
    l.in.sparse = &d.xs;
    l.in.sparse_t = &d.xs_t;
  } else {
    l.in.dense = &d.x;
  }
}

// eval of a temporal checkpoint: per-node MSE (and the paper's broadcast MSE) over the file's
// chronological train / val / test snapshots, as `train --task temporal` reports them.
int run_eval_temporal(const ModelUseFlags& f) {
  nlohmann::json meta;
  auto model = load_checkpoint(f.model, &meta);
  const TemporalDataset d = load_temporal_dataset(f.data);
  const ModelConfig& cfg = model->config();
  DFM_CHECK(d.lags == cfg.in_features, f.data, ": x has ", d.lags, " lags per node, the model in ", f.model,
            " expects ", cfg.in_features);
  DFM_CHECK(cfg.out_features == 1, f.model, ": a temporal model has one output, this one has ", cfg.out_features);
  const Preparation prep = preparation_from_meta(meta);
  const SnapshotGraphs graphs = temporal_graphs(d, prep);
  DFM_CHECK(!cfg.use_graph || !graphs.ops.empty(), f.data,
            ": the model uses the graph term but the file has no edge_index");
  std::vector<ModelInput> in(static_cast<size_t>(d.snapshots));
  for (Index t = 0; t < d.snapshots; ++t) {
    in[t].dense = &d.x[t];
    if (cfg.use_graph) in[t].graph = graphs.of(t);
  }
  const TemporalSplit split = temporal_split(d);
  const SnapshotScores tr = evaluate_snapshots(*model, in, d.y, split.train),
                       va = evaluate_snapshots(*model, in, d.y, split.val),
                       te = evaluate_snapshots(*model, in, d.y, split.test);
  std::printf("%s on %s: train %.4f, val %.4f, test %.4f (per-node MSE); paper_mse test %.4f\n", f.model.c_str(),
              f.data.c_str(), tr.mse, va.mse, te.mse, te.paper_mse);
  if (!f.json_out.empty())
    write_text_atomic(f.json_out, json{{"command", "eval"},
                                       {"model", f.model},
                                       {"data", f.data},
                                       {"task", "temporal"},
                                       {"metric", "mse"},
                                       {"train", tr.mse},
                                       {"val", va.mse},
                                       {"test", te.mse},
                                       {"paper_mse", {{"train", tr.paper_mse}, {"val", va.paper_mse}, {"test", te.paper_mse}}}}
                                          .dump(2) +
                                      "\n");
  return 0;
}

}  // namespace

void add_eval_command(CLI::App& app, ModelUseFlags& f) {
  auto* c = app.add_subcommand("eval", "score a saved model (train --save) on a dataset: accuracy on a split, or per-node MSE on temporal snapshots");
  c->add_option("--model", f.model, "checkpoint .npz")->required();
  c->add_option("--data", f.data, ".npz dataset")->required();
  c->add_option("--split", f.split, "public (the file's train/val/test_idx)")->capture_default_str();
  c->add_option("--splits", f.splits_file, "split file; --run picks the row");
  c->add_option("--run", f.run, "row of --splits")->capture_default_str();
  c->add_option("--threads", f.threads, "CPU threads (0: all)");
  c->add_option("--json", f.json_out, "write the results as JSON here");
}

void add_embed_command(CLI::App& app, ModelUseFlags& f) {
  auto* c = app.add_subcommand("embed", "export node embeddings h_L (or logits) of a saved model as .npy");
  c->add_option("--model", f.model, "checkpoint .npz")->required();
  c->add_option("--data", f.data, ".npz dataset")->required();
  c->add_option("--out", f.out, "output .npy, float32 [N, D] (or [N, C] with --logits)")->required();
  c->add_flag("--logits", f.logits, "export the logits instead of h_L");
  c->add_option("--threads", f.threads, "CPU threads (0: all)");
}

int run_eval(const ModelUseFlags& f) {
  Context ctx(0, f.threads);
  if (detect_task(f.data) == "temporal") return run_eval_temporal(f);
  Loaded l;
  load(f, l);
  Split s = f.splits_file.empty() ? file_split(l.data) : load_split_file(f.splits_file, f.run, l.data.n);
  Mat logits;
  l.model->forward(l.in, false, 0, nullptr, logits);
  const double tr = accuracy_classes(logits, l.data.y, s.train), va = accuracy_classes(logits, l.data.y, s.val),
               te = accuracy_classes(logits, l.data.y, s.test);
  std::printf("%s on %s: train %.2f, val %.2f, test %.2f (accuracy, %%)\n", f.model.c_str(), f.data.c_str(),
              100 * tr, 100 * va, 100 * te);
  if (!f.json_out.empty())
    write_text_atomic(f.json_out, json{{"command", "eval"},
                                       {"model", f.model},
                                       {"data", f.data},
                                       {"metric", "accuracy"},
                                       {"train", 100 * tr},
                                       {"val", 100 * va},
                                       {"test", 100 * te}}
                                          .dump(2) +
                                      "\n");
  return 0;
}

int run_embed(const ModelUseFlags& f) {
  Context ctx(0, f.threads);
  DFM_CHECK(detect_task(f.data) != "temporal", "embed: ", f.data,
            " is a temporal dataset (x [T, N, L]); embed takes node or instance data (eval takes temporal data)");
  Loaded l;
  load(f, l);
  Mat out;
  if (f.logits)
    l.model->forward(l.in, false, 0, nullptr, out);
  else
    l.model->embed(l.in, out);
  write_npy(f.out, NpyArray::from_f32({out.rows(), out.cols()}, out.data()));
  std::printf("wrote %s: float32 [%lld, %lld]\n", f.out.c_str(), (long long)out.rows(), (long long)out.cols());
  return 0;
}

}  // namespace dfm::cli
