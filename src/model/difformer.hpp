// DIFFormer (SPEC.md section 1) on the CPU: input block, L diffusion layers, output layer.
// forward() fills a ForwardState that backward() consumes (llm.c / tiny-cuda-nn style); an
// inference forward passes no state and keeps no activations. backward() ACCUMULATES into the
// flat gradient buffer (zero it with params.zero_grad() before each step).
#pragma once
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "core/torch_rng.hpp"
#include "model/params.hpp"
#include "ops/ops.hpp"

namespace dfm {

enum class Kernel { simple, sigmoid, none };
const char* kernel_name(Kernel k);
Kernel parse_kernel(const std::string& s);  // throws on an unknown name
QkNorm parse_qk_norm(const std::string& s);

struct ModelConfig {
  Index in_features = 0;
  Index hidden = 64;
  Index out_features = 0;
  int layers = 2;
  int heads = 1;
  Kernel kernel = Kernel::simple;
  QkNorm qk_norm = QkNorm::global;
  bool use_graph = true;
  bool use_weight = true;   // value projection Wv; off: V = h, one head shared by all heads
  bool use_ln = true;
  bool use_residual = true;
  float alpha = 0.5f;
  float dropout = 0.0f;
  float graph_weight = -1.0f;  // <= 0: attention + graph; in (0, 1]: (1-g) attention + g graph
  bool allow_folded = true;    // tests turn the folded DIFFormer-s kernel off to compare paths
  void validate() const;
};

// The model's input: features (dense, or sparse CSR with its transpose for backward) and the
// optional normalised graph operator.
struct ModelInput {
  const Mat* dense = nullptr;
  const Csr* sparse = nullptr;
  const Csr* sparse_t = nullptr;
  const GraphOp* graph = nullptr;
  Index rows() const { return dense ? dense->rows() : sparse->rows; }
  Index features() const { return dense ? dense->cols() : sparse->cols; }
};

struct LayerState {
  Mat q, k, v;  // v only with use_weight; q, k only for the sigmoid kernel (simple keeps qn, kn)
  Mat a;        // global attention output per head [N, H*Dv]
  SimpleAttnState simple;
  cpu::SimpleFusedState fused;  // simple kernel, global norm, no Wv: projections folded in
  Mat rowsum;   // sigmoid kernel
  Mat xhat;     // LayerNorm
  Vec rstd;
  std::vector<std::uint8_t> keep;  // dropout
};

struct ForwardState {
  Mat in_xhat;  // input block LayerNorm
  Vec in_rstd;
  std::vector<std::uint8_t> in_keep;
  std::vector<Mat> hidden;  // h_0 .. h_L (after dropout)
  std::vector<LayerState> layers;
  std::vector<Index> rows;  // the rows the last layer and the logits were computed on (empty: all)
  // --rng torch: when set, a training forward draws its dropout masks from this stream as
  // F.dropout does (input block, then each layer, N x D each, at the start of the forward)
  // instead of from the counter hash of the dropout seed.
  TorchCpuGenerator* torch_dropout = nullptr;
};

class DIFFormer {
 public:
  explicit DIFFormer(const ModelConfig& cfg);
  // PyTorch-default initialisation: Linear U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LayerNorm 1 / 0.
  void init(std::mt19937_64& rng);
  // The same distributions drawn from PyTorch's stream in the official module's creation order
  // (fcs.0, bns.0, then per layer Wk, Wq[, Wv], bns.l+1, then fcs.1): after torch.manual_seed(s),
  // the reference DIFFormer's initial weights exactly.
  void init_torch(TorchCpuGenerator& gen);

  // logits [N, C]. training: dropout on (seeded by dropout_seed). state: saved for backward
  // (nullptr = inference, nothing kept). hidden: if given, receives h_0..h_L.
  // rows (sorted, distinct), when given: only these rows of the logits are needed (the loss's or
  // the metrics' rows). The last layer and the output map may then run on them alone (the layers
  // before feed every row to the next attention, so they run in full); the other rows of logits
  // come out zero. Those rows' logits, and backward's gradients, are the same as without rows.
  void forward(const ModelInput& in, bool training, std::uint64_t dropout_seed, ForwardState* state, Mat& logits,
               std::vector<Mat>* hidden = nullptr, const std::vector<Index>* rows = nullptr);
  // Node embeddings h_L [N, D] only (inference).
  void embed(const ModelInput& in, Mat& h);
  void backward(const ModelInput& in, ForwardState& state, const Mat& dlogits);

  const ModelConfig& config() const { return cfg_; }
  ParamStore params;

 private:
  struct LayerSlots {
    int wk = -1, bk = -1, wq = -1, bq = -1, wv = -1, bv = -1, ln_g = -1, ln_b = -1;
  };
  // h_in -> h_out for one layer; ls != nullptr keeps what backward needs. in_sums, when given,
  // holds h_in's G and u; out_sums, when given, may be filled with h_out's (returns whether it was:
  // the folded layer with the fused tail sums each block of h_out as it writes it).
  // rows (fused_layer() only): h_out is computed on those rows alone, the others left unspecified;
  // backward then reads dh_out on those rows alone. masks_given: ls->keep holds this layer's
  // dropout mask already (--rng torch); it is applied, not drawn.
  bool layer_forward(int l, const ModelInput& in, const Mat& h_in, bool training, std::uint64_t seed,
                     LayerState* ls, Mat& h_out, const cpu::RowSums* in_sums = nullptr,
                     cpu::RowSums* out_sums = nullptr, const std::vector<Index>* rows = nullptr,
                     bool masks_given = false);
  void layer_backward(int l, const ModelInput& in, const Mat& h_in, LayerState& ls, Mat& dh_out, Mat& dh_in,
                      const std::vector<Index>* rows = nullptr);
  int value_heads() const { return cfg_.use_weight ? cfg_.heads : 1; }
  // DIFFormer-s with the official global q/k norm takes the folded kernel, which never forms
  // Q, K or V (docs/ALGEBRA.md).
  bool fused_simple() const {
    return cfg_.allow_folded && cfg_.kernel == Kernel::simple && cfg_.qk_norm == QkNorm::global;
  }
  // The folded DIFFormer-s layer whose tail (residual mix, graph, LayerNorm, dropout) runs fused
  // into the attention's row passes, forward and backward: one head, no Wv, LayerNorm, the plain
  // sum of the attention and graph terms.
  bool fused_layer() const {
    const bool mix = cfg_.graph_weight > 0 && cfg_.use_graph;
    return fused_simple() && cfg_.use_ln && !cfg_.use_weight && cfg_.heads == 1 && !mix;
  }
  cpu::FoldedProjections folded_projections(int l) const;
  // Head means of Wv and bv: with V_h = h Wv_h^T + bv_h the head mean of the graph terms is
  // (adj h) mean(Wv)^T + (adj 1) mean(bv)^T.
  void mean_value_map(int l, Mat& wv_mean, Vec& bv_mean) const;

  ModelConfig cfg_;
  std::vector<LayerSlots> layer_slots_;
  int fc_in_w_ = -1, fc_in_b_ = -1, fc_out_w_ = -1, fc_out_b_ = -1, ln_in_g_ = -1, ln_in_b_ = -1;
  // scratch reused between calls (inference path)
  Mat scratch_q_, scratch_k_, scratch_v_, scratch_a_, scratch_g_, scratch_o_;
};

}  // namespace dfm
