#include "cli/prepare.hpp"

#include "data/knn.hpp"
#include "data/npz.hpp"

namespace dfm::cli {

nlohmann::json preparation_meta(const Preparation& p) {
  return nlohmann::json{{"preprocess", p.row_normalise ? "citation" : "none"}, {"knn", p.knn}, {"knn_metric", p.knn_metric}};
}

Preparation preparation_from_meta(const nlohmann::json& meta) {
  Preparation p;
  if (!meta.is_object()) return p;
  p.row_normalise = meta.value("preprocess", std::string("citation")) == "citation";
  p.knn = meta.value("knn", 0);
  p.knn_metric = meta.value("knn_metric", std::string("euclidean"));
  return p;
}

nlohmann::json prepare_classification_data(Dataset& d, const Preparation& p) {
  if (p.row_normalise) row_normalise(d);
  nlohmann::json info;
  if (p.knn > 0) {
    KnnStats st;
    const KnnLists lists = knn_search(d.x, p.knn, parse_knn_metric(p.knn_metric), &st);
    knn_edges(lists, d.src, d.dst);
    d.edge_weight.clear();
    d.graph_in_file = true;
    info = nlohmann::json{{"k", p.knn}, {"metric", p.knn_metric}, {"seconds", st.seconds},
                          {"fallback_rows", st.fallback_rows}};
  }
  if (d.has_graph()) citation_graph(d);
  choose_feature_layout(d);
  return info;
}

SnapshotGraphs temporal_graphs(const TemporalDataset& d, const Preparation& p) {
  if (p.knn <= 0) return snapshot_graphs(d);
  SnapshotGraphs graphs;
  graphs.dynamic = true;
  const KnnMetric metric = parse_knn_metric(p.knn_metric);
  std::vector<std::int64_t> src, dst;
  for (Index t = 0; t < d.snapshots; ++t) {
    knn_edges(knn_search(d.x[t], p.knn, metric), src, dst);
    graphs.ops.push_back(make_graph_op<float>(d.nodes, src, dst));
  }
  return graphs;
}

}  // namespace dfm::cli
