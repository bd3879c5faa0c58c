// The op families of DIFFormer, forward and backward, in two implementations with the same
// semantics:
//   dfm::ref  naive scalar loops in double precision: the specification the fast kernels and the
//             CUDA kernels are tested against (and checked by central finite differences);
//   dfm::cpu  float32 kernels on Eigen GEMMs + OpenMP.
// Conventions for every backward: input gradients (dX, dQ, ...) are OVERWRITTEN; parameter
// gradients (dW, db, dgamma, dbeta) are ACCUMULATED (+=), so that one flat gradient buffer can be
// zeroed once per step. A [N, H, D] tensor is an [N, H*D] row-major matrix (head-major columns).
#pragma once
#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "core/tensor.hpp"

namespace dfm {

enum class QkNorm { global, node };

// Graph operator of the DIFFormer graph term: adj(i, j) = w_ij / sqrt(d_i d_j) for every edge
// j -> i (d = in-degree, edge weights not counted in d, non-finite factors set to 0), stored by
// target rows, plus its transpose for the backward pass.
template <typename T>
struct GraphOpT {
  CsrT<T> adj;    // rows = targets i, columns = sources j
  CsrT<T> adj_t;  // rows = sources j, columns = targets i
  Index nodes() const { return adj.rows; }
};
using GraphOp = GraphOpT<float>;
using GraphOpD = GraphOpT<double>;

// Builds the operator from edge_index (src = edges[e], dst = edges[E + e]) and optional weights.
// Throws when an index is out of [0, n).
template <typename T>
GraphOpT<T> make_graph_op(Index n, const std::vector<std::int64_t>& src, const std::vector<std::int64_t>& dst,
                          const std::vector<float>* weight = nullptr);

// Saved state of the simple (DIFFormer-s) attention, reused by its backward.
template <typename T>
struct SimpleAttnStateT {
  using M = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using V = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  M qn, kn;   // normalised q and k [N, H*D]
  M kv;       // [H*D, Dv]: rows h*D..h*D+D-1 hold sum_l kn_l v_l^T of head h
  M ks;       // [H, D]  sum_l kn_l
  M vs;       // [H, Dv] sum_l v_l (per value head, repeated for shared values)
  M den;      // [N, H]
  V qnorm, knorm;  // global: 1 value; node: N*H values (row-major [N, H])
};
using SimpleAttnState = SimpleAttnStateT<float>;
using SimpleAttnStateD = SimpleAttnStateT<double>;

// ------------------------------------------------------------------------------------------
namespace ref {
// linear: Y = X W^T + b, W [out, in]; b may be empty.
void linear_fwd(const MatD& x, const MatD& w, const VecD& b, MatD& y);
void linear_bwd(const MatD& x, const MatD& w, const MatD& dy, MatD* dx, MatD& dw, VecD* db);
void linear_sparse_fwd(const CsrD& x, const MatD& w, const VecD& b, MatD& y);
void linear_sparse_bwd(const CsrD& x, const MatD& dy, MatD& dw, VecD* db);
void layernorm_fwd(const MatD& x, const VecD& gamma, const VecD& beta, double eps, MatD& y);
void layernorm_bwd(const MatD& x, const VecD& gamma, double eps, const MatD& dy, MatD& dx, VecD& dgamma,
                   VecD& dbeta);
void relu_fwd(const MatD& x, MatD& y);
void relu_bwd(const MatD& y, const MatD& dy, MatD& dx);  // y = relu output
void dropout_apply(const std::vector<std::uint8_t>& keep, double p, const MatD& x, MatD& y);
void simple_attn_fwd(const MatD& q, const MatD& k, const MatD& v, int heads, QkNorm norm, MatD& a,
                     SimpleAttnStateD& st);
void simple_attn_bwd(const MatD& v, int heads, const MatD& a, const SimpleAttnStateD& st, const MatD& da,
                     MatD& dq, MatD& dk, MatD& dv);
void sigmoid_attn_fwd(const MatD& q, const MatD& k, const MatD& v, int heads, MatD& a, MatD& rowsum);
void sigmoid_attn_bwd(const MatD& q, const MatD& k, const MatD& v, int heads, const MatD& a,
                      const MatD& rowsum, const MatD& da, MatD& dq, MatD& dk, MatD& dv);
void graph_prop(const CsrD& adj, const MatD& v, MatD& g);  // g = adj v
double cross_entropy(const MatD& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx,
                     MatD& dlogits);
double bce_with_logits(const MatD& logits, const MatD& y, const std::vector<std::int64_t>& idx, MatD& dlogits);
double mse(const MatD& pred, const MatD& y, const std::vector<std::int64_t>& idx, MatD& dpred);
}  // namespace ref

// ------------------------------------------------------------------------------------------
namespace cpu {
using MatRef = Eigen::Ref<Mat>;
using CMatRef = Eigen::Ref<const Mat>;

void linear_fwd(CMatRef x, CMatRef w, const float* b, Mat& y);
// dx may be null (first layer); dw, db accumulated; db may be null.
void linear_bwd(CMatRef x, CMatRef w, CMatRef dy, Mat* dx, MatRef dw, float* db);
void linear_sparse_fwd(const Csr& x, CMatRef w, const float* b, Mat& y);
// x_t is the TRANSPOSE of the sparse input ([F, N]): the weight gradient is then a
// conflict-free row-parallel gather, dW^T[f] = sum_i x(i, f) dy[i].
void linear_sparse_bwd(const Csr& x_t, CMatRef dy, MatRef dw, float* db);

// LayerNorm over columns; saves xhat (normalised input) and rstd for backward. y may alias
// nothing else. x is not needed by backward.
void layernorm_fwd(CMatRef x, const float* gamma, const float* beta, float eps, Mat& y, Mat& xhat, Vec& rstd);
void layernorm_bwd(const Mat& xhat, const Vec& rstd, const float* gamma, CMatRef dy, Mat& dx, float* dgamma,
                   float* dbeta);
void relu_inplace(Mat& x);
void relu_bwd_inplace(const Mat& y, Mat& dy);  // dy *= (y > 0)

// Dropout with a counter-based hash: the mask depends only on (seed, element index), so it is
// reproducible whatever the number of threads. keep is filled (1 = kept); x scaled in place.
void dropout_fwd(Mat& x, float p, std::uint64_t seed, std::vector<std::uint8_t>& keep);
// The same on the flat elements [begin, end) of a tensor: x and keep point at element begin.
void dropout_fwd_range(float* x, std::uint8_t* keep, Index begin, Index end, float p, std::uint64_t seed);
// The counter hash: a uniform 24-bit draw for flat element i. A keyed 32-bit integer hash of the
// low word of i (lowbias32's xor-shift-multiply rounds, the two key words entering before each
// multiply, so masks of different seeds are not permutations of each other); the key is the seed
// mixed with the high word of i. Only 32-bit multiplies: AVX2 and the GPU have them natively
// (with the 64-bit splitmix64 per element this replaces, dropout was about 30% of a Cora training
// layer's row pass on the CPU). The top 24 bits are
// the draw; kept when the draw is >= dropout_threshold(p). The CUDA backend has the same function
// (ops/cuda/cuda_util.cuh) and tests check that the masks are equal.
inline std::uint64_t dropout_key(std::uint64_t seed, std::uint64_t high_word) {
  return seed ^ (high_word * 0xd1342543de82ef95ULL);
}
// U: std::uint32_t, or a GCC vector of them (the CPU's 8-lane path runs the same rounds).
template <typename U>
inline U dropout_hash32(U x, std::uint64_t key) {
  x ^= static_cast<std::uint32_t>(key);
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x ^= static_cast<std::uint32_t>(key >> 32);
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x >> 8;
}
inline std::uint32_t dropout_draw(std::uint64_t seed, std::uint64_t i) {
  return dropout_hash32(static_cast<std::uint32_t>(i), dropout_key(seed, i >> 32));
}
inline std::uint32_t dropout_threshold(float p) {
  return static_cast<std::uint32_t>(std::ceil(static_cast<double>(p) * (1u << 24)));
}
// x *= keep / (1 - p): a mask drawn elsewhere (--rng torch) applied in the forward, and the
// backward of dropout. rows, when given: on those rows only.
void dropout_apply(Mat& x, float p, const std::vector<std::uint8_t>& keep, const std::vector<Index>* rows = nullptr);
void dropout_bwd(Mat& dx, float p, const std::vector<std::uint8_t>& keep);

void simple_attn_fwd(const Mat& q, const Mat& k, const Mat& v, int heads, QkNorm norm, Mat& a,
                     SimpleAttnState& st);
void simple_attn_bwd(const Mat& v, int heads, const Mat& a, const SimpleAttnState& st, const Mat& da, Mat& dq,
                     Mat& dk, Mat& dv);

// Sigmoid (DIFFormer-a) attention streamed over blocks of keys: O(N*D) memory in both passes.
// rowsum [N, H] = sum_j sigmoid(q_i . k_j), saved for backward.
void sigmoid_attn_fwd(const Mat& q, const Mat& k, const Mat& v, int heads, Mat& a, Mat& rowsum);
void sigmoid_attn_bwd(const Mat& q, const Mat& k, const Mat& v, int heads, const Mat& a, const Mat& rowsum,
                      const Mat& da, Mat& dq, Mat& dk, Mat& dv);

// g = alpha * adj v (row-parallel gather), or g += alpha * adj v with accumulate (g already sized).
void graph_prop(const Csr& adj, CMatRef v, Mat& g, float alpha = 1.0f, bool accumulate = false);
// The same on rows [lo, hi) of g only, serially (to run inside a caller's parallel region); g sized.
void graph_prop_rows(const Csr& adj, CMatRef v, Mat& g, float alpha, bool accumulate, Index lo, Index hi);

// The row-wise tail of a diffusion layer in one pass over the rows:
//   z = scale * (wa * sum_h a_h + cg * G) + keep_in * h_in,   y = LayerNorm(z) (gamma, beta),
//   y = dropout(y) when keep is given (the mask of dropout_fwd on y's flat indices),
// where G is g when given, else adj * gsrc gathered row by row (never stored), else absent; with
// relu, y = max(y, 0) between LayerNorm and dropout. With scale 0 the z terms other than
// keep_in * h_in are skipped (not multiplied by 0).
// xhat and rstd (for backward) may be null.
struct MixInputs {
  const Mat* h_in = nullptr;
  float keep_in = 0.0f, scale = 1.0f;
  const Mat* a = nullptr;  // [N, heads*D] or null
  int heads = 1;
  float wa = 1.0f;
  const Mat* g = nullptr;     // [N, D] or null
  const Csr* adj = nullptr;   // with gsrc [N, D]: G = adj gsrc
  const Mat* gsrc = nullptr;
  float cg = 1.0f;
  bool relu = false;  // y = relu(LayerNorm(z)) before dropout (the input block)
};
// sums, when given, receives G and u of y (see RowSums, declared below), summed while in cache.
class RowSums;
void mix_layernorm_dropout_fwd(const MixInputs& m, const float* gamma, const float* beta, float eps, float p,
                               std::uint64_t seed, std::vector<std::uint8_t>* keep, Mat& y, Mat* xhat, Vec* rstd,
                               RowSums* sums = nullptr);
// The same on rows [lo, hi) only, serially (to run inside a caller's parallel region): y, xhat,
// rstd and keep (flat, n*D bytes, or null) must already be sized. With row_ids, on rows
// row_ids[lo .. hi) instead (each once).
void mix_layernorm_dropout_rows(const MixInputs& m, const float* gamma, const float* beta, float eps, float p,
                                std::uint64_t seed, std::uint8_t* keep, Mat& y, Mat* xhat, Vec* rstd, Index lo,
                                Index hi, const Index* row_ids = nullptr);
// Its backward through dropout (when keep is given), LayerNorm and the residual mix:
//   dz = LayerNorm_bwd(dropout_bwd(dy)),  d_o = scale * dz,  dh_in = keep_in * dz  (both overwritten;
// dh_in may be null), dgamma, dbeta accumulated. relu_out, when given, is the forward's output y
// with a ReLU between LayerNorm and dropout (the input block): the gradient passes where y > 0
// (a dropped entry has none anyway).
void dropout_layernorm_mix_bwd(const std::vector<std::uint8_t>* keep, float p, const Mat& xhat, const Vec& rstd,
                               const float* gamma, const Mat& dy, float scale, float keep_in, Mat& d_o, Mat* dh_in,
                               float* dgamma, float* dbeta, const Mat* relu_out = nullptr);
// The same on rows [lo, hi) only, serially: d_o and dh_in sized, keep flat (n*D bytes) or null,
// dgamma and dbeta accumulated (the caller's per-thread partials). With row_ids, on rows
// row_ids[lo .. hi) instead.
void dropout_layernorm_mix_bwd_rows(const std::uint8_t* keep, float p, const Mat& xhat, const Vec& rstd,
                                    const float* gamma, const Mat& dy, float scale, float keep_in, Mat& d_o,
                                    Mat* dh_in, float* dgamma, float* dbeta, Index lo, Index hi,
                                    const Index* row_ids = nullptr, const Mat* relu_out = nullptr);
// out = a^T b for tall a [N, p], b [N, q], split over threads by rows (Eigen's GEMM would only
// split the small p x q output).
void tn_product(CMatRef a, CMatRef b, Mat& out);

// DIFFormer-s with the projections folded in, for the official global q/k norm: Q = h Wq^T + bq,
// K = h Wk^T + bk and V = h Wv^T + bv (or V = h, one head shared by all, when wv is null) are never
// formed. Every sum over the N instances the attention needs reduces to the Gram matrix
// G = h^T h and u = h^T 1, so forward costs two GEMMs of N x D x D and backward two, against five
// and ten for project-then-attend (docs/ALGEBRA.md derives every line). Same results as
// linear_fwd + simple_attn_fwd. Weights are [H*D, D] as torch.nn.Linear, biases [H*D].
struct FoldedProjections {
  const float *wq = nullptr, *bq = nullptr, *wk = nullptr, *bk = nullptr;
  const float *wv = nullptr, *bv = nullptr;  // null: V = h
};
struct FoldedGrads {  // accumulated (+=); wv/bv only used with a value projection
  float *wq = nullptr, *bq = nullptr, *wk = nullptr, *bk = nullptr, *wv = nullptr, *bv = nullptr;
};
struct SimpleFusedState {
  Mat den;          // [N, H]
  Mat kv;           // [H*D, D]: KV_h = Kn_h^T V_h
  Mat ks;           // [H, D]   sum_l kn_l
  Mat gram;         // [D, D]   G = h^T h
  Mat wqg, wkg;     // [H*D, D] W_q G, W_k G (kept for the backward's parameter gradients)
  Vec u;            // [D]      h^T 1
  double sq = 0, sk = 0;  // ||Q||_F, ||K||_F
};
// G = h^T h and u = h^T 1 summed block by block: each thread adds its blocks of rows (in row
// order) to its own partial, finish() sums the partials in thread order (deterministic for a given
// thread count). The folded layer's tail adds each block of its output while it is in cache, so
// the next layer does not read h again for them.
class RowSums {
 public:
  void start(Index d, int threads);
  void add(int thread, const Mat& h, Index lo, Index hi);  // rows [lo, hi) of h
  void finish();
  const Mat& gram() const { return gram_; }
  const Vec& u() const { return u_; }

 private:
  std::vector<Mat> gram_part_;
  std::vector<Vec> u_part_;
  Mat gram_;
  Vec u_;
};
// after_rows, when given, is called by the computing thread on each finished block of rows
// [lo, hi) of a (and st.den), while they are in cache (the layer tail fuses in there).
// sums_of_h, when given, holds h's G and u (finished), which are then not recomputed.
// rows, when given (distinct), limits the output to those rows of a and st.den (the others are left
// unspecified; the sums still run over all of h); after_rows then gets ranges [lo, hi) of *rows.
void simple_attn_fused_fwd(const Mat& h, const FoldedProjections& w, int heads, Mat& a, SimpleFusedState& st,
                           const std::function<void(Index, Index)>* after_rows = nullptr,
                           const RowSums* sums_of_h = nullptr, const std::vector<Index>* rows = nullptr);
// dh is OVERWRITTEN with the attention's whole contribution (through Q, K and V); the parameter
// gradients are accumulated.
// before_rows, when given, is called by each thread on its rows [lo, hi) before it reads them from
// da (the caller's layer tail writes them there, and dh's rows with accumulate); after_rows on its
// rows [lo, hi) of dh once they are complete (every row of da is final by then).
// rows, when given (distinct), says da is zero outside those rows: only they are read, and
// before_rows gets ranges [lo, hi) of *rows; needs accumulate (dh still gets every row's terms).
void simple_attn_fused_bwd(const Mat& h, const FoldedProjections& w, int heads, const Mat& a,
                           const SimpleFusedState& st, const Mat& da, Mat& dh, const FoldedGrads& g,
                           bool accumulate = false,  // accumulate: dh += (dh already sized)
                           const std::function<void(Index, Index)>* before_rows = nullptr,
                           const std::function<void(Index, Index)>* after_rows = nullptr,
                           const std::vector<Index>* rows = nullptr);

// Losses over the rows listed in idx (mean over them); dlogits is overwritten, zero outside idx.
float cross_entropy(const Mat& logits, const std::vector<std::int64_t>& y, const std::vector<std::int64_t>& idx,
                    Mat& dlogits);
float bce_with_logits(const Mat& logits, const Mat& y, const std::vector<std::int64_t>& idx, Mat& dlogits);
float mse(const Mat& pred, const Mat& y, const std::vector<std::int64_t>& idx, Mat& dpred);
}  // namespace cpu

}  // namespace dfm
