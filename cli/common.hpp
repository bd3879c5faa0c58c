// Pieces shared by the subcommands of the command-line tool.
#pragma once
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/checkpoint.hpp"
#include "model/difformer.hpp"

namespace dfm::cli {

using json = nlohmann::json;


// Flags shared by every command that builds a model.
struct ModelFlags {
  std::string kernel = "simple", qk_norm = "global";
  int layers = 8, heads = 1;
  Index hidden = 64;
  float alpha = 0.5f, dropout = 0.2f, graph_weight = -1.0f;
  bool no_graph = false, use_weight = false, no_ln = false, no_residual = false;

  void add(CLI::App* app) {
    app->add_option("--kernel", kernel, "global attention: simple (DIFFormer-s), sigmoid (DIFFormer-a), none")
        ->capture_default_str();
    app->add_option("--layers", layers, "diffusion layers")->capture_default_str();
    app->add_option("--hidden", hidden, "hidden width D")->capture_default_str();
    app->add_option("--heads", heads, "attention heads (each of full width D)")->capture_default_str();
    app->add_option("--alpha", alpha, "step size tau of the residual mix")->capture_default_str();
    app->add_option("--dropout", dropout, "dropout probability")->capture_default_str();
    app->add_option("--graph-weight", graph_weight, "<= 0: attention + graph; in (0,1]: convex mix")
        ->capture_default_str();
    app->add_option("--qk-norm", qk_norm, "simple kernel: global (official code) or node (paper)")
        ->capture_default_str();
    app->add_flag("--no-graph", no_graph, "drop the graph term (no GCN propagation)");
    app->add_flag("--use-weight", use_weight, "value projection Wv (off: V = h)");
    app->add_flag("--no-ln", no_ln, "no LayerNorm");
    app->add_flag("--no-residual", no_residual, "no residual mix");
  }
  ModelConfig config(Index in, Index out, bool graph_available) const {
    ModelConfig c;
    c.in_features = in;
    c.out_features = out;
    c.hidden = hidden;
    c.layers = layers;
    c.heads = heads;
    c.kernel = parse_kernel(kernel);
    c.qk_norm = parse_qk_norm(qk_norm);
    c.use_graph = !no_graph && graph_available;
    c.use_weight = use_weight;
    c.use_ln = !no_ln;
    c.use_residual = !no_residual;
    c.alpha = alpha;
    c.dropout = dropout;
    c.graph_weight = graph_weight;
    c.validate();
    return c;
  }
};

inline json config_json(const ModelConfig& c) { return model_config_to_json(c); }

inline double mean_of(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / v.size(); }
inline double std_of(const std::vector<double>& v) {  // unbiased, as numpy std(ddof=1)
  if (v.size() < 2) return 0.0;
  const double m = mean_of(v);
  double s = 0;
  for (double x : v) s += (x - m) * (x - m);
  return std::sqrt(s / (v.size() - 1));
}
inline double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : (v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]));
}


}  // namespace dfm::cli
