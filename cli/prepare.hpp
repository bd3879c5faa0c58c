// The data preparation of `train`, in one place, so that `eval` and `embed` rebuild exactly the
// inputs a checkpoint was trained on (from the settings `train --save` writes into its meta_json).
#pragma once
#include <nlohmann/json.hpp>
#include <string>

#include "data/dataset.hpp"
#include "data/temporal_data.hpp"

namespace dfm::cli {

struct Preparation {
  bool row_normalise = true;  // the citation protocol; instance features stay raw
  int knn = 0;                // > 0: replace the graph by a kNN graph of the (prepared) features
  std::string knn_metric = "euclidean";
};
// The checkpoint meta_json fields that record a Preparation, and back. A checkpoint without
// meta_json (a PyTorch state_dict saved with numpy.savez) gets the citation protocol.
nlohmann::json preparation_meta(const Preparation& p);
Preparation preparation_from_meta(const nlohmann::json& meta);

// Node / instance data: row-normalise (when asked), build the kNN graph (knn > 0), make any graph
// undirected with one self-loop per node (the official pipelines' to_undirected /
// remove_self_loops / add_self_loops, for citation and kNN graphs alike), choose the feature
// layout. Returns the kNN graph's figures ({k, metric, seconds, fallback_rows}) or null.
nlohmann::json prepare_classification_data(Dataset& d, const Preparation& p);

// Temporal data: each snapshot's stored graph (no self-loops added, not symmetrised), or with
// p.knn > 0 a kNN graph per snapshot (p.row_normalise does not apply to snapshots).
SnapshotGraphs temporal_graphs(const TemporalDataset& d, const Preparation& p);

}  // namespace dfm::cli
