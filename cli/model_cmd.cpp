// `difformer eval` (accuracy of a checkpoint on a dataset's split) and `difformer embed` (export
// the node embeddings h_L, or the logits, as .npy).
#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/common.hpp"
#include "cli/model_commands.hpp"
#include "core/context.hpp"
#include "core/error.hpp"
#include "data/dataset.hpp"
#include "data/npz.hpp"
#include "io/checkpoint.hpp"
#include "io/files.hpp"
#include "train/metrics.hpp"
#include "train/trainer.hpp"

namespace dfm::cli {
namespace {

struct Loaded {
  std::unique_ptr<DIFFormer> model;
  Dataset data;
  GraphOp graph;
  ModelInput in;
};

// The dataset prepared exactly as the checkpoint's training run prepared it (meta_json).
void load(const ModelUseFlags& f, Loaded& l) {
  nlohmann::json meta;
  l.model = load_checkpoint(f.model, &meta);
  l.data = load_node_dataset(f.data);
  Dataset& d = l.data;
  const ModelConfig& cfg = l.model->config();
  DFM_CHECK(d.features == cfg.in_features, f.data, ": x has ", d.features, " features, the model in ", f.model,
            " expects ", cfg.in_features);
  // A checkpoint without meta_json (a PyTorch state_dict saved with numpy.savez) gets the
  // citation preprocessing, as `train` applies to node data by default.
  const std::string preprocess =
      meta.is_object() ? meta.value("preprocess", std::string("citation")) : std::string("citation");
  if (preprocess == "citation") {
    row_normalise(d);
    if (d.has_graph()) citation_graph(d);
  }
  choose_feature_layout(d);
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

}  // namespace

void add_eval_command(CLI::App& app, ModelUseFlags& f) {
  auto* c = app.add_subcommand("eval", "accuracy of a saved model (train --save) on a dataset");
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
