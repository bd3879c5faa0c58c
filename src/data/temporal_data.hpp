// Spatio-temporal datasets (SPEC.md section 4, ../shared/data/README.md): T snapshots of the same
// N nodes, each an independent set with its own graph. x float32 [T, N, L] (L lags), y float32
// [T, N]; edge_index int64 [2, E] with optional edge_weight float32 [E] is either one static
// graph shared by every snapshot or, with edge_ptr int64 [T+1], a dynamic graph whose snapshot t
// owns the columns edge_ptr[t] .. edge_ptr[t+1]-1. train_idx / val_idx / test_idx are SNAPSHOT
// indices. Graphs are used as stored: no self-loops added, no symmetrising, weights multiply in.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.hpp"
#include "ops/ops.hpp"

namespace dfm {

struct TemporalDataset {
  std::string path;
  Index snapshots = 0, nodes = 0, lags = 0;
  std::vector<Mat> x;  // T matrices [N, L]
  std::vector<Mat> y;  // T matrices [N, 1]
  // Edges src[e] -> dst[e] (all snapshots concatenated when dynamic); weights empty if absent.
  std::vector<std::int64_t> src, dst;
  std::vector<float> edge_weight;
  std::vector<std::int64_t> edge_ptr;  // T + 1 entries when the graph is dynamic, else empty
  bool graph_in_file = false;
  bool dynamic() const { return !edge_ptr.empty(); }
  std::vector<std::int64_t> train_idx, val_idx, test_idx;  // the file's split, when present
};

// Reads and validates the file; every error names the file, the array and what was expected
// (wrong rank of x, y not [T, N], edge_ptr not T+1 long / not starting at 0 / decreasing / not
// ending at E, out-of-range nodes or snapshots, non-finite values).
TemporalDataset load_temporal_dataset(const std::string& path);

// Snapshot index sets (chronological when drawn here).
struct TemporalSplit {
  std::vector<std::int64_t> train, val, test;
};
// The file's snapshot split when it has one, else the chronological split of the official code
// (torch_geometric_temporal.temporal_signal_split applied twice): the first floor(0.2 T)
// snapshots train, the next floor(0.25 * rest) validate, the remaining ~60% test.
TemporalSplit temporal_split(const TemporalDataset& d);
// Non-empty, in [0, T), disjoint; `what` names the source in errors.
void validate_temporal_split(const TemporalSplit& s, Index snapshots, const std::string& what);

// The graph operator of each snapshot: ops holds one operator (static graph) or one per snapshot
// (dynamic); of(t) is snapshot t's.
struct SnapshotGraphs {
  std::vector<GraphOp> ops;
  bool dynamic = false;
  const GraphOp* of(Index t) const { return ops.empty() ? nullptr : &ops[dynamic ? t : 0]; }
};
SnapshotGraphs snapshot_graphs(const TemporalDataset& d);
// Snapshot t's edges (its slice when dynamic, all edges when static).
void snapshot_edges(const TemporalDataset& d, Index t, std::vector<std::int64_t>& src, std::vector<std::int64_t>& dst,
                    std::vector<float>& weight);

// Kind of a .npz by its arrays: x of rank 3 -> "temporal"; rank 2 with edge_index -> "node";
// rank 2 without -> "instance"; anything else is an error naming the file and x's shape.
std::string detect_task(const std::string& path);

}  // namespace dfm
