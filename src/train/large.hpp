// Large graphs (SPEC.md section 3): memory-lean DIFFormer computations, the large-graph training
// driver (mini-batch or full-graph training, full-graph evaluation, runs), the proteins-s /
// pokec-s presets, and memory accounting.
//
// Memory-lean path ("lean"): the same mathematics as DIFFormer::forward/backward (tests compare
// logits and every gradient), computed layer by layer in blocks of rows, so that nothing of size
// [N, *] is kept except
//   inference: the layer state h [N, D] (updated in place) and the value tensor V [N, H*D] that
//              the graph term gathers from (with use_weight); the simple kernel's global sums
//              (||Q||_F through the Gram matrix h^T h, sum k v^T, sum k, sum v) come from one
//              streaming pass, and the outputs from a second;
//   training:  the layer inputs h_0..h_L, dh in and out, V and the gradient of the layer output
//              ([N, D] each), and two [N, H] vectors; Q, K, attention outputs, LayerNorm and
//              dropout intermediates are recomputed per block in backward (dropout masks are a
//              hash of the element index, so recomputation is exact).
// That is (L + 4 + Hv) N D floats for training (Hv = value heads) against the ForwardState plus
// backward temporaries of DIFFormer::forward/backward; measured on a 100,000-node batch (D 128,
// 3 layers, 1.9M edges): 0.46 GB against 1.06 GB above the data, for ~1.4x the GEMM work. The
// global sums of the forward are kept per layer and reused by backward. Inference over 1.63M
// nodes: 2.4 GB process peak against 7.1 GB for DIFFormer::forward without state.
// The lean path covers the simple (DIFFormer-s) and none kernels with dense features; the sigmoid
// kernel uses DIFFormer::forward/backward.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "data/ogb.hpp"
#include "model/difformer.hpp"
#include "train/adam.hpp"
#include "train/metrics.hpp"

namespace dfm {

// ---- memory-lean computations ---------------------------------------------------------------
bool lean_supported(const ModelConfig& c);  // kernel simple or none

// Inference logits [N, C] over all rows of x (graph may be null without use_graph; only adj is
// used). Keeps one [N, D] state (two without use_weight when the graph is on) plus V.
void lean_forward(const DIFFormer& model, const Mat& x, const GraphOp* graph, Mat& logits);

struct LeanWorkspace {
  std::vector<Mat> hidden;  // h_0 .. h_L
  Mat dh, dh_prev, v, dout, den, dden, logits, dlogits;
  void release() { *this = LeanWorkspace{}; }
};

// loss(logits, dlogits) returns the loss and fills dlogits.
using LossFn = std::function<float(const Mat& logits, Mat& dlogits)>;

// One forward (dropout on when training, seeded like DIFFormer::forward) and backward:
// ACCUMULATES parameter gradients into model.params.grads (zero them first). graph needs adj and
// adj_t. Returns the loss.
float lean_forward_backward(DIFFormer& model, const Mat& x, const GraphOp* graph, bool training,
                            std::uint64_t dropout_seed, const LossFn& loss, LeanWorkspace& ws);

// ---- memory accounting ------------------------------------------------------------------------
// Peak resident set since the last reset_peak_rss() (VmHWM of /proc/self/status; the process-wide
// high-water mark when the kernel refuses the reset). reset_peak_rss() returns false then.
// The reset also resets getrusage's ru_maxrss (core/memory.hpp peak_rss_bytes), so the process
// lifetime peak is kept here: lifetime_peak_rss_bytes().
bool reset_peak_rss();
std::int64_t phase_peak_rss_bytes();
std::int64_t lifetime_peak_rss_bytes();

struct MemoryEstimate {
  std::int64_t data = 0;        // features, targets, graph (CSR + evaluation operator)
  std::int64_t train_step = 0;  // one step on a batch (lean or model path)
  std::int64_t eval = 0;        // one full-graph evaluation
  std::int64_t peak() const { return data + std::max(train_step, eval); }
};
// Up-front estimate for a run (batch 0 = the whole graph); expected_batch_edges < 0: derived
// from the graph's density for a random batch.
MemoryEstimate estimate_memory(const ModelConfig& cfg, Index nodes, Index edges, Index features, Index outputs,
                               Index batch, bool lean, double expected_batch_edges = -1);
std::string format_bytes(std::int64_t b);

// ---- the driver ---------------------------------------------------------------------------------
struct LargeTrainOptions {
  Index batch_size = 10000;  // 0: full-graph training (no partitioning)
  int epochs = 1;
  int eval_every = 1;  // evaluate when epoch % eval_every == 0 (as the official eval_step); 0: never
  AdamOptions adam;
  Metric metric = Metric::accuracy;
  bool lean = true;       // training step: memory-lean, or DIFFormer::forward/backward
  bool lean_eval = true;  // evaluation: streaming, or DIFFormer::forward without state (comparisons)
  // "cuda": every training step on the GPU (one cuda::Model reused across chunks; batch 0 keeps
  // the whole graph resident and replays the step as a CUDA graph), full-graph evaluation on the
  // GPU when it fits (else the CPU path above). Single-label (cross-entropy) targets only.
  std::string device = "cpu";
  std::string precision = "fp32";  // cuda: fp32 | tf32 | bf16
};

struct LargeEpochReport {
  int epoch = 0;
  double loss = 0;
  int steps = 0, skipped = 0;
  double train_seconds = 0;
  bool evaluated = false;
  double train = 0, val = 0, test = 0, eval_seconds = 0;
};

struct LargeRunResult {
  std::uint64_t seed = 0;
  int best_epoch = -1;
  double train = 0, val = 0, test = 0;  // metric at the best-validation evaluation
  std::vector<double> epoch_seconds;    // training part of every epoch
  std::vector<double> eval_seconds;     // every full-graph evaluation
  std::int64_t train_peak_rss = 0;      // process peak (VmHWM) during training epochs
  std::int64_t eval_peak_rss = 0;       // process peak during evaluations
  int steps = 0, skipped = 0;
  double last_loss = 0;
  std::int64_t peak_device_bytes = 0;  // GPU allocator high-water mark (0 on the CPU)
  int gpu_evals = 0, cpu_evals = 0;     // where the full-graph evaluations ran
};

// One run: initialises the model from `seed`, trains with Adam, evaluates on the full graph.
LargeRunResult train_large_run(const LargeDataset& d, const ModelConfig& cfg, const Split& split,
                               const LargeTrainOptions& opt, std::uint64_t seed,
                               const std::function<void(const LargeEpochReport&)>& progress = {});

// Full-graph evaluation of the metric on the three parts of split; logits kept in `logits`.
void evaluate_large(DIFFormer& model, const LargeDataset& d, const GraphOp* graph, const Split& split,
                    Metric metric, bool lean, Mat& logits, double& train, double& val, double& test);
double score_metric(Metric m, const Mat& logits, const NodeTargets& t, const std::vector<std::int64_t>& idx);
Metric default_metric(const NodeTargets& t);  // multi-label: rocauc; classes: accuracy

// ---- presets ----------------------------------------------------------------------------------
// The paper's large-graph settings (SPEC.md section 3 and the official run.sh).
struct LargePreset {
  std::string name, description;
  std::string data_file;  // what the preset expects under a data directory
  std::string published;  // the paper's number
  // model
  Kernel kernel = Kernel::simple;
  Index hidden = 64;
  int layers = 3, heads = 1;
  float alpha = 0.5f, dropout = 0.0f;
  bool use_weight = true, use_graph = true, use_ln = true, use_residual = true;
  // optimisation and protocol
  float lr = 1e-2f, weight_decay = 0.0f;
  Index batch_size = 10000;
  int epochs = 1000, runs = 5, eval_every = 9;
  std::uint64_t seed = 123;
  std::string metric = "rocauc";
  std::string split = "file";  // "file" (the dataset's own split) or "ratio:0.5,0.25"
  bool undirected = false, self_loops = true;
};
const std::vector<LargePreset>& large_presets();              // proteins-s, pokec-s
const LargePreset* find_large_preset(const std::string& name);  // nullptr when unknown
// The preset as (flag, value) settings of `difformer train-large` ("true" for a bare flag), the
// form of src/train/presets.hpp's PresetSetting, for wiring into `difformer train --preset`.
std::vector<std::pair<std::string, std::string>> large_preset_flags(const LargePreset& p);

}  // namespace dfm
