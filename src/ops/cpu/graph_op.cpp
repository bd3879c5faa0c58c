// Construction of the normalised graph operator of the DIFFormer graph term (SPEC.md, section 1).
#include <cmath>
#include <limits>

#include "core/error.hpp"
#include "ops/ops.hpp"

namespace dfm {

template <typename T>
GraphOpT<T> make_graph_op(Index n, const std::vector<std::int64_t>& src, const std::vector<std::int64_t>& dst,
                          const std::vector<float>* weight) {
  DFM_CHECK(src.size() == dst.size(), "edge_index: source and target rows differ in length");
  DFM_CHECK(!weight || weight->size() == src.size(), "edge_weight has ", weight ? weight->size() : 0,
            " entries, expected one per edge (", src.size(), ")");
  const Index e_count = static_cast<Index>(src.size());
  std::vector<Index> indeg(static_cast<size_t>(n), 0);
  for (Index e = 0; e < e_count; ++e) {
    DFM_CHECK(src[e] >= 0 && src[e] < n && dst[e] >= 0 && dst[e] < n, "edge_index: edge ", e, " (", src[e],
              " -> ", dst[e], ") is out of range for ", n, " nodes");
    ++indeg[dst[e]];
  }
  GraphOpT<T> op;
  CsrT<T>& a = op.adj;
  a.rows = a.cols = n;
  a.indptr.assign(static_cast<size_t>(n) + 1, 0);
  for (Index i = 0; i < n; ++i) a.indptr[i + 1] = a.indptr[i] + indeg[i];
  a.indices.resize(static_cast<size_t>(e_count));
  a.values.resize(static_cast<size_t>(e_count));
  std::vector<Index> next(a.indptr.begin(), a.indptr.end() - 1);
  for (Index e = 0; e < e_count; ++e) {
    const Index i = dst[e], j = src[e];
    // 1/sqrt(d_i d_j), computed as the official code does: inf for a zero degree, then set to 0.
    double c = (1.0 / std::sqrt(static_cast<double>(indeg[i]))) * (1.0 / std::sqrt(static_cast<double>(indeg[j])));
    if (weight) c *= (*weight)[e];
    if (!std::isfinite(c)) c = 0.0;
    const Index slot = next[i]++;
    a.indices[slot] = static_cast<std::int32_t>(j);
    a.values[slot] = static_cast<T>(c);
  }
  op.adj_t = csr_transpose(a);
  return op;
}

template GraphOpT<float> make_graph_op<float>(Index, const std::vector<std::int64_t>&,
                                              const std::vector<std::int64_t>&, const std::vector<float>*);
template GraphOpT<double> make_graph_op<double>(Index, const std::vector<std::int64_t>&,
                                                const std::vector<std::int64_t>&, const std::vector<float>*);

}  // namespace dfm
