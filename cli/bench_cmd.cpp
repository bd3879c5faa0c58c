// `difformer bench`: timed training steps on synthetic data made like the PyTorch peer's.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <string>

#include "cli/commands.hpp"
#include "core/context.hpp"
#include "core/error.hpp"
#include "core/memory.hpp"
#include "data/dataset.hpp"
#include "io/files.hpp"
#include "ops/cuda_backend.hpp"
#include "train/synthetic.hpp"
#include "train/trainer.hpp"

namespace dfm::cli {

namespace {

// The GPU path: the same synthetic problem, initial parameters and optimiser as the CPU path; a
// step is zero_grad + forward + cross-entropy over all N + backward + Adam, all on the device
// (captured in a CUDA graph after the first step). Timed twice: each step synchronised on its own
// (median, min), and a loop of steps synchronised at the ends (mean, as the PyTorch peer times).
// --precision fp32|tf32|bf16 fills cuda::DeviceOptions::precision; environment:
// DIFFORMER_CUDA_GRAPH=0 to run eagerly.
int run_bench_cuda(const BenchFlags& f, const ModelFlags& mf) {
  using clock = std::chrono::steady_clock;
  Context ctx(0, f.threads);
  const auto t_data = clock::now();
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
  const double data_s = std::chrono::duration<double>(clock::now() - t_data).count();

  cuda::DeviceOptions opt;
  opt.precision = f.precision;
  if (const char* e = std::getenv("DIFFORMER_CUDA_GRAPH")) opt.cuda_graph = std::string(e) != "0";
  cuda::Model gpu(cfg, opt);
  gpu.upload_params(model.params);
  gpu.set_input(in);
  gpu.set_labels(p.y);
  const AdamOptions adam{0.01f, 1e-3f};  // the peer benchmark's optimiser settings
  std::vector<double> ms;
  float loss = 0;
  int s = 0;
  for (; s < f.warmup + f.steps; ++s) {
    const auto t0 = clock::now();
    gpu.train_step(static_cast<std::uint64_t>(s), adam, false);
    gpu.synchronize();
    const double t = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    if (s >= f.warmup) ms.push_back(t);
  }
  const auto t0 = clock::now();
  for (int r = 0; r < f.steps; ++r, ++s) gpu.train_step(static_cast<std::uint64_t>(s), adam, false);
  gpu.synchronize();
  const double loop_ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count() / f.steps;
  loss = gpu.train_step(static_cast<std::uint64_t>(s), adam, true);
  const double med = median_of(ms);
  std::printf("bench: N=%lld F=%lld C=%lld E=%zu kernel=%s graph=%s layers=%d hidden=%lld heads=%d device=cuda "
              "(%s, %s%s): %.3f ms/step (median of %d, synchronised per step), %.3f ms/step (mean of a loop), "
              "peak device %.1f MB, loss %.4f, data %.1fs\n",
              (long long)f.nodes, (long long)f.features, (long long)f.classes, p.src.size(), kernel_name(cfg.kernel),
              cfg.use_graph ? "on" : "off", cfg.layers, (long long)cfg.hidden, cfg.heads, gpu.device_name().c_str(),
              opt.precision.c_str(), gpu.graph_captured() ? ", CUDA graph" : "", med, f.steps, loop_ms,
              gpu.peak_device_bytes() / 1048576.0, loss, data_s);
  if (!f.json_out.empty()) {
    json j{{"command", "bench"},
           {"device", "cuda"},
           {"device_name", gpu.device_name()},
           {"precision", opt.precision},
           {"cuda_graph", gpu.graph_captured()},
           {"nodes", f.nodes},
           {"features", f.features},
           {"classes", f.classes},
           {"edges", p.src.size()},
           {"steps", f.steps},
           {"ms_per_step_median", med},
           {"ms_per_step_min", *std::min_element(ms.begin(), ms.end())},
           {"ms_per_step_mean_loop", loop_ms},
           {"peak_device_bytes", gpu.peak_device_bytes()},
           {"peak_rss_bytes", peak_rss_bytes()},
           {"loss", loss},
           {"model", config_json(cfg)}};
    write_text_atomic(f.json_out, j.dump(2) + "\n");
  }
  return 0;
}

}  // namespace

int run_bench(const BenchFlags& f, const ModelFlags& mf) {
  DFM_CHECK(f.device == "cpu" || f.device == "cuda", "--device: expected cpu or cuda, got '", f.device, "'");
  validate_precision(f.device, f.precision);
  if (f.device == "cuda") {
    cuda::require();
    DFM_CHECK(f.nodes >= 2, "--nodes must be >= 2");
    DFM_CHECK(f.steps >= 1, "--steps must be >= 1");
    return run_bench_cuda(f, mf);
  }
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
           {"precision", "fp32"},
           {"peak_device_bytes", 0},
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

}  // namespace dfm::cli
