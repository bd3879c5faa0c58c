// End-to-end: DIFFormer trained on the bundled Cora under the citation protocol must reach a
// stated accuracy. Shortened schedule (the paper trains 500 epochs) so that CI stays fast; the
// full protocol over ten fixed splits lives in scripts/ and bench/.
#include <gtest/gtest.h>

#include "data/dataset.hpp"
#include "model/difformer.hpp"
#include "test_util.hpp"
#include "train/trainer.hpp"

namespace dfm {
namespace {

RunResult train_cora(Kernel kernel, int layers, int epochs, float lr, float wd, float dropout) {
  Dataset d = load_node_dataset(test::source_path("data/cora.npz"));
  row_normalise(d);
  citation_graph(d);
  choose_feature_layout(d);
  EXPECT_TRUE(d.sparse);
  const GraphOp graph = graph_operator(d);
  ModelInput in;
  in.sparse = &d.xs;
  in.sparse_t = &d.xs_t;
  in.graph = &graph;
  ModelConfig cfg;
  cfg.in_features = d.features;
  cfg.out_features = d.classes;
  cfg.hidden = 64;
  cfg.layers = layers;
  cfg.kernel = kernel;
  cfg.use_weight = false;
  cfg.dropout = dropout;
  DIFFormer model(cfg);
  std::mt19937_64 rng(0);
  model.init(rng);
  TrainOptions opt;
  opt.epochs = epochs;
  opt.adam.lr = lr;
  opt.adam.weight_decay = wd;
  return train_node_classifier(model, in, d.y, file_split(d), opt, 0);
}

TEST(Cora, DIFFormerSimpleReachesGcnLevelOnPublicSplit) {
  // a 2-layer model at a 10x learning rate: the paper's 8 layers x 500 epochs is a script's job
  const RunResult r = train_cora(Kernel::simple, 2, 100, 1e-2f, 5e-3f, 0.5f);
  std::printf("cora simple: best epoch %d val %.3f test %.3f (%.2f ms/epoch)\n", r.best_epoch, r.val, r.test,
              r.ms_per_epoch);
  EXPECT_GE(r.test, 0.77);  // measured 0.792; GCN 81.5, MLP 56.1 in the paper; the peer gets 82.9 after 500 epochs
}

TEST(Cora, DIFFormerSigmoidLearns) {
  // the paper's Cora DIFFormer-a optimiser settings (lr 1e-3, wd 0.1, dropout 0) on 2 layers
  const RunResult r = train_cora(Kernel::sigmoid, 2, 60, 1e-3f, 0.1f, 0.0f);
  std::printf("cora sigmoid: best epoch %d val %.3f test %.3f (%.2f ms/epoch)\n", r.best_epoch, r.val, r.test,
              r.ms_per_epoch);
  EXPECT_GE(r.test, 0.74);  // measured 0.769 at 100 epochs (best epoch 38); MLP 56.1 in the paper
}

}  // namespace
}  // namespace dfm
