// The CUDA backend against the CPU engine: every GPU op (forward and backward) against dfm::cpu
// on the same random inputs, every golden fixture through the GPU model, and the GPU model
// against the CPU model on configurations the fixtures do not cover (dropout, shared values,
// node norm, no attention, graph mix, no LayerNorm/residual, sparse input, a loss subset, several
// Adam steps, CUDA-graph replay). Tolerances, relative in the norm ||a - b|| / ||b|| per tensor,
// fp32 with TF32 off:
//   kElem 1e-5   elementwise and row-wise ops (LayerNorm, dropout, ReLU, CSR gather, losses, Adam)
//   kGemm 1e-4   GEMMs, attention, and everything downstream of them (model outputs, gradients)
// Compiled only with DIFFORMER_WITH_CUDA; each test skips itself when no GPU is present. Run only
// these with --gtest_filter='*Cuda*'.
#include <gtest/gtest.h>

#ifdef DIFFORMER_WITH_CUDA

#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>

#include "data/dataset.hpp"
#include "data/npz.hpp"
#include "data/ogb.hpp"
#include "data/synth_sbm.hpp"
#include "model/difformer.hpp"
#include "ops/cuda/cuda_ops.hpp"
#include "ops/cuda_backend.hpp"
#include "ops/ops.hpp"
#include "test_util.hpp"
#include "train/adam.hpp"
#include "train/large.hpp"
#include "train/minibatch.hpp"
#include "train/trainer.hpp"

namespace dfm {
namespace {

constexpr double kElem = 1e-5;
constexpr double kGemm = 1e-4;

using test::rel_err;

// ||a - b|| / max(||b||, floor): for tensors whose exact value is (close to) zero, where both
// float results are rounding noise (one row: every gradient of the attention vanishes), or where
// the value is a cancellation-dominated sum 10^-8 times smaller than the gradient around it.
template <typename A, typename B>
double rel_err_floor(const A& a, const B& b, double floor) {
  const MatD ad = a.template cast<double>(), bd = b.template cast<double>();
  return (ad - bd).norm() / std::max(bd.norm(), floor);
}
using cuda::DeviceBuffer;

#define SKIP_WITHOUT_GPU() \
  if (!cuda::available()) GTEST_SKIP() << "no GPU: " << cuda::describe()

cuda::GpuContext& gpu() {
  static cuda::GpuContext ctx;
  return ctx;
}

DeviceBuffer<float> dev(const Mat& m) {
  DeviceBuffer<float> b(gpu(), static_cast<std::size_t>(std::max<Index>(m.size(), 1)));
  if (m.size()) b.upload(m.data(), static_cast<std::size_t>(m.size()));
  return b;
}
DeviceBuffer<float> dev_zero(Index r, Index c) {
  DeviceBuffer<float> b(gpu(), static_cast<std::size_t>(std::max<Index>(r * c, 1)));
  b.zero();
  return b;
}
Mat host(const DeviceBuffer<float>& b, Index r, Index c) {
  Mat m(r, c);
  b.download(m.data(), static_cast<std::size_t>(r * c));
  return m;
}

struct DevCsr {
  DeviceBuffer<std::int64_t> ip;
  DeviceBuffer<std::int32_t> ix;
  DeviceBuffer<float> v;
  cuda::CsrView view;
  explicit DevCsr(const Csr& c)
      : ip(gpu(), c.indptr.size()),
        ix(gpu(), std::max<std::size_t>(c.indices.size(), 1)),
        v(gpu(), std::max<std::size_t>(c.values.size(), 1)) {
    std::vector<std::int64_t> p(c.indptr.begin(), c.indptr.end());
    ip.upload(p);
    if (c.nnz()) {
      ix.upload(c.indices);
      v.upload(c.values);
    }
    view = cuda::CsrView{c.rows, c.cols, c.nnz(), ip.data(), ix.data(), v.data()};
  }
};

Mat rand_mat(std::mt19937_64& g, Index r, Index c, float lo = -1, float hi = 1) {
  std::uniform_real_distribution<float> u(lo, hi);
  Mat m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = u(g);
  return m;
}

Csr rand_sparse(std::mt19937_64& g, Index r, Index c, double density) {
  std::uniform_real_distribution<double> u(0, 1);
  Mat m = Mat::Zero(r, c);
  for (Index i = 0; i < m.size(); ++i)
    if (u(g) < density) m.data()[i] = static_cast<float>(2 * u(g) - 1);
  return test::dense_to_csr(m);
}

GraphOp rand_graph(std::mt19937_64& g, Index n, Index pairs, bool self_loops) {
  std::uniform_int_distribution<Index> node(0, n - 1);
  std::vector<std::int64_t> src, dst;
  for (Index e = 0; e < pairs; ++e) {
    const Index a = node(g), b = node(g);
    if (a == b) continue;
    src.push_back(a), dst.push_back(b), src.push_back(b), dst.push_back(a);
  }
  if (self_loops)
    for (Index i = 0; i < n; i += 3) src.push_back(i), dst.push_back(i);  // some nodes, not all
  return make_graph_op<float>(n, src, dst);
}

// ---- linear ------------------------------------------------------------------------------------
void check_linear(Index n, Index in, Index out) {
  std::mt19937_64 g(n + in + out);
  const Mat x = rand_mat(g, n, in), w = rand_mat(g, out, in), dy = rand_mat(g, n, out);
  const Vec b = rand_mat(g, out, 1);
  Mat y, dx;
  Mat dw = rand_mat(g, out, in);  // accumulated into
  Vec db = rand_mat(g, out, 1);
  const Mat dw0 = dw;
  const Vec db0 = db;
  cpu::linear_fwd(x, w, b.data(), y);
  cpu::linear_bwd(x, w, dy, &dx, dw, db.data());
  auto dx_d = dev(x), dw_d = dev(w), db_d = dev(b), dy_d = dev(dy), y_d = dev_zero(n, out), dxo = dev_zero(n, in);
  auto dwo = dev(dw0), dbo = dev(db0);
  cuda::linear_fwd(gpu(), dx_d.data(), n, in, dw_d.data(), out, db_d.data(), y_d.data());
  cuda::linear_bwd(gpu(), dx_d.data(), n, in, dw_d.data(), out, dy_d.data(), dxo.data(), 0.0f, dwo.data(), dbo.data());
  EXPECT_LE(rel_err(host(y_d, n, out), y), kGemm) << "y " << n;
  EXPECT_LE(rel_err(host(dxo, n, in), dx), kGemm) << "dx " << n;
  EXPECT_LE(rel_err(host(dwo, out, in), dw), kGemm) << "dw " << n;
  EXPECT_LE(rel_err(host(dbo, out, 1), Mat(db)), kGemm) << "db " << n;
}

TEST(CudaOps, LinearMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_linear(1000, 37, 19);
  check_linear(70001, 64, 64);  // chunked X^T Y with a remainder row
  check_linear(3, 5, 2);
}

TEST(CudaOps, GemmTallMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(5);
  for (Index rows : {100, 40000, 123457}) {
    const Mat x = rand_mat(g, rows, 24), y = rand_mat(g, rows, 7), c0 = rand_mat(g, 24, 7);
    const Mat ref = 0.5f * (x.transpose() * y) + 2.0f * c0;
    auto xd = dev(x), yd = dev(y), cd = dev(c0);
    cuda::gemm_tn_tall(gpu(), rows, 24, 7, 0.5f, xd.data(), 24, yd.data(), 7, 2.0f, cd.data());
    EXPECT_LE(rel_err(host(cd, 24, 7), ref), kGemm) << rows;
  }
}

TEST(CudaOps, SparseLinearMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(11);
  const Index n = 500, f = 300, out = 40;
  const Csr xs = rand_sparse(g, n, f, 0.05), xt = csr_transpose(xs);
  const Mat w = rand_mat(g, out, f), dy = rand_mat(g, n, out);
  const Vec b = rand_mat(g, out, 1);
  Mat y, dw = Mat::Zero(out, f);
  Vec db = Vec::Zero(out);
  cpu::linear_sparse_fwd(xs, w, b.data(), y);
  cpu::linear_sparse_bwd(xt, dy, dw, db.data());
  DevCsr xs_d(xs), xt_d(xt);
  auto w_d = dev(w), b_d = dev(b), dy_d = dev(dy), wt = dev_zero(f, out), y_d = dev_zero(n, out);
  auto dwt = dev_zero(f, out), dw_d = dev_zero(out, f), db_d = dev_zero(out, 1);
  cuda::transpose(gpu(), w_d.data(), out, f, wt.data());
  cuda::spmm(gpu(), xs_d.view, wt.data(), out, out, y_d.data(), out, 1.0f, 0.0f, b_d.data());
  cuda::spmm(gpu(), xt_d.view, dy_d.data(), out, out, dwt.data(), out, 1.0f, 0.0f);
  cuda::add_transposed(gpu(), dw_d.data(), out, f, dwt.data());
  cuda::colsum(gpu(), dy_d.data(), n, out, out, db_d.data(), 1.0f);
  EXPECT_LE(rel_err(host(y_d, n, out), y), kElem);
  EXPECT_LE(rel_err(host(dw_d, out, f), dw), kElem);
  EXPECT_LE(rel_err(host(db_d, out, 1), Mat(db)), kElem);
}

TEST(CudaOps, GraphPropMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(3);
  const Index n = 1000;
  const GraphOp op = rand_graph(g, n, 4000, true);
  for (Index width : {8, 16, 64, 100, 200}) {
    const Mat v = rand_mat(g, n, width), y0 = rand_mat(g, n, 2 * width);
    Mat ref, ref_t;
    cpu::graph_prop(op.adj, v, ref);
    cpu::graph_prop(op.adj_t, v, ref_t);
    DevCsr a(op.adj), at(op.adj_t);
    auto vd = dev(v), yd = dev_zero(n, width), yt = dev_zero(n, width), y2 = dev(y0);
    cuda::spmm(gpu(), a.view, vd.data(), width, width, yd.data(), width, 1.0f, 0.0f);
    cuda::spmm(gpu(), at.view, vd.data(), width, width, yt.data(), width, 1.0f, 0.0f);
    // scaled, accumulated, written to two column blocks of a wider output
    cuda::spmm(gpu(), a.view, vd.data(), width, width, y2.data(), 2 * width, 0.5f, 2.0f, nullptr, 2, width);
    EXPECT_LE(rel_err(host(yd, n, width), ref), kElem) << width;
    EXPECT_LE(rel_err(host(yt, n, width), ref_t), kElem) << width;
    Mat ref2(n, 2 * width);
    ref2 << 0.5f * ref + 2.0f * y0.leftCols(width), 0.5f * ref + 2.0f * y0.rightCols(width);
    EXPECT_LE(rel_err(host(y2, n, 2 * width), ref2), kElem) << width;
  }
}

// ---- row-wise: combine, LayerNorm, ReLU, dropout ----------------------------------------------------
TEST(CudaOps, LayerNormMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(7);
  for (Index d : {13, 64, 200}) {
    const Index n = 333;
    const Mat x = rand_mat(g, n, d, -3, 2), dy = rand_mat(g, n, d);
    const Vec gamma = rand_mat(g, d, 1, 0.5, 1.5), beta = rand_mat(g, d, 1);
    Mat y, xhat, dx;
    Vec rstd, dgamma = Vec::Zero(d), dbeta = Vec::Zero(d);
    cpu::layernorm_fwd(x, gamma.data(), beta.data(), 1e-5f, y, xhat, rstd);
    cpu::layernorm_bwd(xhat, rstd, gamma.data(), dy, dx, dgamma.data(), dbeta.data());
    auto xd = dev(x), gd = dev(gamma), bd = dev(beta), dyd = dev(dy), yd = dev_zero(n, d), dxd = dev_zero(n, d);
    auto dgd = dev_zero(d, 1), dbd = dev_zero(d, 1), z = dev_zero(n, d), dx2 = dev_zero(n, d);
    cuda::RowNormFwd f;
    f.n = n, f.d = d, f.t[0] = cuda::RowTerm{xd.data(), d, 0, 1, 1.0f}, f.z = z.data();
    f.ln = true, f.gamma = gd.data(), f.beta = bd.data(), f.y = yd.data();
    cuda::row_norm_fwd(gpu(), f);
    cuda::RowNormBwd b;
    b.n = n, b.d = d, b.dy = dyd.data(), b.z = z.data(), b.ln = true, b.gamma = gd.data(), b.beta = bd.data();
    b.dgamma = dgd.data(), b.dbeta = dbd.data(), b.out1 = dxd.data(), b.s1 = 1.0f, b.out2 = dx2.data(), b.s2 = -0.5f;
    cuda::row_norm_bwd(gpu(), b);
    EXPECT_LE(rel_err(host(z, n, d), x), 0.0) << d;
    EXPECT_LE(rel_err(host(yd, n, d), y), kElem) << d;
    EXPECT_LE(rel_err(host(dxd, n, d), dx), kElem) << d;
    EXPECT_LE(rel_err(host(dx2, n, d), Mat(-0.5f * dx)), kElem) << d;
    EXPECT_LE(rel_err(host(dgd, d, 1), Mat(dgamma)), kElem) << d;
    EXPECT_LE(rel_err(host(dbd, d, 1), Mat(dbeta)), kElem) << d;
  }
}

TEST(CudaOps, DropoutMaskIsTheCpuMask) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(8);
  const Index n = 257, d = 40;
  const float p = 0.3f;
  const std::uint64_t seed = 1234, salt = 3;
  Mat x = rand_mat(g, n, d);
  const Mat dy = rand_mat(g, n, d);
  auto xd = dev(x), dyd = dev(dy), yd = dev_zero(n, d), dxd = dev_zero(n, d);
  DeviceBuffer<std::uint64_t> sd(gpu(), 1);
  sd.upload(&seed, 1);
  std::vector<std::uint8_t> keep;
  cpu::dropout_fwd(x, p, cuda::mix_seed_host(seed, salt), keep);
  Mat dx = dy;
  cpu::dropout_bwd(dx, p, keep);
  cuda::RowNormFwd f;
  f.n = n, f.d = d, f.t[0] = cuda::RowTerm{xd.data(), d, 0, 1, 1.0f}, f.drop_p = p, f.seed = sd.data(), f.salt = salt;
  f.y = yd.data();
  cuda::row_norm_fwd(gpu(), f);
  cuda::RowNormBwd b;
  b.n = n, b.d = d, b.dy = dyd.data(), b.z = xd.data(), b.drop_p = p, b.seed = sd.data(), b.salt = salt;
  b.out1 = dxd.data();
  cuda::row_norm_bwd(gpu(), b);
  const Mat y = host(yd, n, d);
  Index kept = 0;
  for (Index i = 0; i < x.size(); ++i) {
    ASSERT_EQ(y.data()[i] != 0.0f, keep[i] != 0) << "element " << i;
    kept += keep[i];
  }
  EXPECT_GT(kept, x.size() / 2);
  EXPECT_LE(rel_err(y, x), kElem);
  EXPECT_LE(rel_err(host(dxd, n, d), dx), kElem);
}

// The input block as difformer.cpp runs it: LayerNorm, ReLU, dropout, and the backward through
// dropout, ReLU (mask from the output) and LayerNorm.
TEST(CudaOps, InputBlockChainMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(9);
  const Index n = 300, d = 64;
  const float p = 0.25f;
  const std::uint64_t seed = 77;
  const Mat x = rand_mat(g, n, d, -2, 2), dy = rand_mat(g, n, d);
  const Vec gamma = rand_mat(g, d, 1, 0.5, 1.5), beta = rand_mat(g, d, 1, -0.3, 0.3);
  Mat h, xhat, dx;
  Vec rstd, dgamma = Vec::Zero(d), dbeta = Vec::Zero(d);
  std::vector<std::uint8_t> keep;
  cpu::layernorm_fwd(x, gamma.data(), beta.data(), 1e-5f, h, xhat, rstd);
  cpu::relu_inplace(h);
  cpu::dropout_fwd(h, p, cuda::mix_seed_host(seed, 0), keep);
  Mat dh = dy;
  cpu::dropout_bwd(dh, p, keep);
  cpu::relu_bwd_inplace(h, dh);
  cpu::layernorm_bwd(xhat, rstd, gamma.data(), dh, dx, dgamma.data(), dbeta.data());
  auto xd = dev(x), gd = dev(gamma), bd = dev(beta), dyd = dev(dy), hd = dev_zero(n, d), dxd = dev_zero(n, d);
  auto dgd = dev_zero(d, 1), dbd = dev_zero(d, 1);
  DeviceBuffer<std::uint64_t> sd(gpu(), 1);
  sd.upload(&seed, 1);
  cuda::RowNormFwd f;
  f.n = n, f.d = d, f.t[0] = cuda::RowTerm{xd.data(), d, 0, 1, 1.0f}, f.ln = true, f.gamma = gd.data();
  f.beta = bd.data(), f.relu = true, f.drop_p = p, f.seed = sd.data(), f.salt = 0, f.y = hd.data();
  cuda::row_norm_fwd(gpu(), f);
  cuda::RowNormBwd b;
  b.n = n, b.d = d, b.dy = dyd.data(), b.z = xd.data(), b.ln = true, b.gamma = gd.data(), b.beta = bd.data();
  b.dgamma = dgd.data(), b.dbeta = dbd.data(), b.relu = true, b.drop_p = p, b.seed = sd.data(), b.salt = 0;
  b.out1 = dxd.data();
  cuda::row_norm_bwd(gpu(), b);
  EXPECT_LE(rel_err(host(hd, n, d), h), kElem);
  EXPECT_LE(rel_err(host(dxd, n, d), dx), kElem);
  EXPECT_LE(rel_err(host(dgd, d, 1), Mat(dgamma)), kElem);
  EXPECT_LE(rel_err(host(dbd, d, 1), Mat(dbeta)), kElem);
}

TEST(CudaOps, CombineTermsMatchFormula) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(10);
  const Index n = 100, d = 24;
  const int heads = 3;
  const Mat a = rand_mat(g, n, heads * d), gg = rand_mat(g, n, d), h = rand_mat(g, n, d);
  Mat ref = Mat::Zero(n, d);
  for (int k = 0; k < heads; ++k) ref += 0.2f * a.middleCols(k * d, d);
  ref += 0.7f * gg + 0.5f * h;
  auto ad = dev(a), gd = dev(gg), hd = dev(h), zd = dev_zero(n, d), yd = dev_zero(n, d);
  cuda::RowNormFwd f;
  f.n = n, f.d = d;
  f.t[0] = cuda::RowTerm{ad.data(), heads * d, d, heads, 0.2f};
  f.t[1] = cuda::RowTerm{gd.data(), d, d, 1, 0.7f};
  f.t[2] = cuda::RowTerm{hd.data(), d, 0, 1, 0.5f};
  f.z = zd.data(), f.y = yd.data();
  cuda::row_norm_fwd(gpu(), f);
  EXPECT_LE(rel_err(host(zd, n, d), ref), kElem);
  EXPECT_LE(rel_err(host(yd, n, d), ref), kElem);
}

// ---- attention ----------------------------------------------------------------------------------
struct AttnCase {
  Index n, d;
  int heads, vheads;
  bool node;
};

TEST(CudaOps, SimpleAttentionMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const AttnCase cases[] = {{300, 64, 1, 1, false}, {257, 8, 2, 1, false},  {257, 16, 2, 2, false},
                            {200, 16, 2, 2, true},  {150, 13, 3, 1, true},  {70000, 64, 1, 1, false},
                            {1, 32, 1, 1, false}};
  for (const AttnCase& c : cases) {
    std::mt19937_64 g(c.n * 7 + c.d);
    const Index hd = c.heads * c.d, hvd = c.vheads * c.d;
    const Mat q = rand_mat(g, c.n, hd), k = rand_mat(g, c.n, hd), v = rand_mat(g, c.n, hvd);
    const Mat da = rand_mat(g, c.n, hd), dv0 = rand_mat(g, c.n, hvd);
    Mat a, dq, dk, dv;
    SimpleAttnState st;
    const QkNorm norm = c.node ? QkNorm::node : QkNorm::global;
    cpu::simple_attn_fwd(q, k, v, c.heads, norm, a, st);
    cpu::simple_attn_bwd(v, c.heads, a, st, da, dq, dk, dv);
    const cuda::AttnDims dm{c.n, c.d, c.heads, c.vheads};
    auto qd = dev(q), kd = dev(k), vd = dev(v), ad = dev_zero(c.n, hd), dad = dev(da), dvd = dev(dv0);
    DeviceBuffer<float> stats(gpu(), cuda::simple_stats_floats(dm));
    auto den = dev_zero(c.n, c.heads), qn = dev_zero(c.n, hd), kn = dev_zero(c.n, hd);
    auto qnorm = dev_zero(c.n, c.heads), knorm = dev_zero(c.n, c.heads), dden = dev_zero(c.n, c.heads);
    cuda::SimpleSaved s{stats.data(), den.data(), qn.data(), kn.data(), qnorm.data(), knorm.data()};
    const cuda::Norm cn = c.node ? cuda::Norm::node : cuda::Norm::global;
    cuda::simple_attn_fwd(gpu(), dm, cn, qd.data(), kd.data(), vd.data(), ad.data(), s);
    const Mat a_gpu = host(ad, c.n, hd);
    // recomputation gives the same rows
    auto a2 = dev_zero(c.n, hd);
    cuda::simple_attn_rows(gpu(), dm, cn, qd.data(), s, a2.data());
    cuda::simple_attn_bwd(gpu(), dm, cn, qd.data(), kd.data(), vd.data(), ad.data(), dad.data(), hd, c.d, 1.0f, s,
                          dvd.data(), 1.0f, dden.data());
    const std::string tag = "n=" + std::to_string(c.n) + " d=" + std::to_string(c.d) + " H=" +
                            std::to_string(c.heads) + " Hv=" + std::to_string(c.vheads) + (c.node ? " node" : "");
    EXPECT_LE(rel_err(a_gpu, a), kGemm) << tag;
    EXPECT_LE(rel_err(host(a2, c.n, hd), a), kGemm) << tag;
    const double floor = 1e-2 * da.norm();  // n = 1: dQ = dK = 0 exactly (A = V whatever Q, K)
    EXPECT_LE(rel_err_floor(host(qd, c.n, hd), dq, floor), kGemm) << tag << " dq";
    EXPECT_LE(rel_err_floor(host(kd, c.n, hd), dk, floor), kGemm) << tag << " dk";
    EXPECT_LE(rel_err(host(dvd, c.n, hvd), Mat(dv + dv0)), kGemm) << tag << " dv";
  }
}

// The fused kernels (attn_simple_fused.cu), dQ and dK written in place of Q and K as the model does.
TEST(CudaOps, SimpleAttentionFusedMatchesCpu) {
  SKIP_WITHOUT_GPU();
  const AttnCase cases[] = {{300, 64, 1, 1, false}, {257, 16, 2, 1, false}, {1500, 32, 2, 2, false},
                            {70000, 64, 1, 1, false}, {65, 32, 3, 1, false}};
  for (const AttnCase& c : cases) {
    std::mt19937_64 g(c.n * 3 + c.d);
    const Index hd = c.heads * c.d, hvd = c.vheads * c.d;
    const Mat q = rand_mat(g, c.n, hd), k = rand_mat(g, c.n, hd), v = rand_mat(g, c.n, hvd), da = rand_mat(g, c.n, hd);
    Mat a, dq, dk, dv;
    SimpleAttnState st;
    cpu::simple_attn_fwd(q, k, v, c.heads, QkNorm::global, a, st);
    cpu::simple_attn_bwd(v, c.heads, a, st, da, dq, dk, dv);
    const cuda::AttnDims dm{c.n, c.d, c.heads, c.vheads};
    ASSERT_TRUE(cuda::simple_fused_supported(dm));
    auto qd = dev(q), kd = dev(k), vd = dev(v), ad = dev_zero(c.n, hd), a2 = dev_zero(c.n, hd), dad = dev(da);
    auto dvd = dev_zero(c.n, hvd);
    DeviceBuffer<float> stats(gpu(), cuda::simple_fused_stats_floats(dm)), work(gpu(), cuda::simple_fused_work_floats(dm));
    cuda::simple_fused_fwd(gpu(), dm, qd.data(), kd.data(), vd.data(), ad.data(), stats.data(), work.data());
    cuda::simple_fused_rows(gpu(), dm, qd.data(), stats.data(), a2.data());
    const std::string tag = "n=" + std::to_string(c.n) + " d=" + std::to_string(c.d) + " H=" +
                            std::to_string(c.heads) + " Hv=" + std::to_string(c.vheads);
    EXPECT_LE(rel_err(host(ad, c.n, hd), a), kGemm) << tag;
    EXPECT_LE(rel_err(host(a2, c.n, hd), a), kGemm) << tag << " rows again";
    cuda::simple_fused_bwd(gpu(), dm, qd.data(), kd.data(), vd.data(), ad.data(), dad.data(), stats.data(), qd.data(),
                           kd.data(), dvd.data(), work.data());
    EXPECT_LE(rel_err(host(qd, c.n, hd), dq), kGemm) << tag << " dq";
    EXPECT_LE(rel_err(host(kd, c.n, hd), dk), kGemm) << tag << " dk";
    EXPECT_LE(rel_err(host(dvd, c.n, hvd), dv), kGemm) << tag << " dv";
  }
}

// dA shared by all heads (head stride 0) and scaled, as the model passes it.
TEST(CudaOps, AttentionBroadcastGradient) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(21);
  const Index n = 180, d = 16;
  const int heads = 2;
  const Index hd = heads * d;
  const Mat q = rand_mat(g, n, hd), k = rand_mat(g, n, hd), v = rand_mat(g, n, d), dshared = rand_mat(g, n, d);
  Mat da(n, hd);
  da << 0.25f * dshared, 0.25f * dshared;
  const cuda::AttnDims dm{n, d, heads, 1};
  for (bool sigmoid : {false, true}) {
    Mat a, dq, dk, dv, rowsum;
    if (sigmoid) {
      cpu::sigmoid_attn_fwd(q, k, v, heads, a, rowsum);
      cpu::sigmoid_attn_bwd(q, k, v, heads, a, rowsum, da, dq, dk, dv);
    } else {
      SimpleAttnState st;
      cpu::simple_attn_fwd(q, k, v, heads, QkNorm::global, a, st);
      cpu::simple_attn_bwd(v, heads, a, st, da, dq, dk, dv);
    }
    auto qd = dev(q), kd = dev(k), vd = dev(v), ad = dev_zero(n, hd), dsd = dev(dshared), dvd = dev_zero(n, d);
    auto dqd = dev_zero(n, hd), dkd = dev_zero(n, hd), work = dev_zero(n, heads), rs = dev_zero(n, heads);
    DeviceBuffer<float> stats(gpu(), cuda::simple_stats_floats(dm));
    auto den = dev_zero(n, heads);
    cuda::SimpleSaved s{stats.data(), den.data()};
    if (sigmoid) {
      cuda::sigmoid_attn_fwd(gpu(), dm, qd.data(), kd.data(), vd.data(), ad.data(), rs.data());
      cuda::sigmoid_attn_bwd(gpu(), dm, qd.data(), kd.data(), vd.data(), ad.data(), rs.data(), dsd.data(), d, 0,
                             0.25f, dqd.data(), dkd.data(), dvd.data(), 0.0f, work.data());
    } else {
      cuda::simple_attn_fwd(gpu(), dm, cuda::Norm::global, qd.data(), kd.data(), vd.data(), ad.data(), s);
      cuda::simple_attn_bwd(gpu(), dm, cuda::Norm::global, qd.data(), kd.data(), vd.data(), ad.data(), dsd.data(), d,
                            0, 0.25f, s, dvd.data(), 0.0f, work.data());
      dqd = std::move(qd);
      dkd = std::move(kd);
    }
    EXPECT_LE(rel_err(host(dqd, n, hd), dq), kGemm) << (sigmoid ? "sigmoid" : "simple");
    EXPECT_LE(rel_err(host(dkd, n, hd), dk), kGemm) << (sigmoid ? "sigmoid" : "simple");
    EXPECT_LE(rel_err(host(dvd, n, d), dv), kGemm) << (sigmoid ? "sigmoid" : "simple");
  }
}

TEST(CudaOps, SigmoidAttentionMatchesCpu) {
  SKIP_WITHOUT_GPU();
  // d > 64 takes the key-chunked cuBLAS path: chunks of 96 keys for the first wide case (so that
  // several chunks and a ragged last one are crossed), the default chunking for the others.
  const AttnCase cases[] = {{300, 64, 1, 1, false},  {130, 8, 2, 1, false},  {129, 16, 2, 2, false},
                            {64, 32, 1, 1, false},   {1000, 64, 1, 1, false}, {1, 20, 1, 1, false},
                            {301, 100, 2, 1, false}, {257, 300, 1, 1, false}, {700, 80, 2, 2, false}};
  for (const AttnCase& c : cases) {
    if (c.d == 100)
      setenv("DIFFORMER_SIGMOID_CHUNK_KEYS", "96", 1);
    else
      unsetenv("DIFFORMER_SIGMOID_CHUNK_KEYS");
    std::mt19937_64 g(c.n * 5 + c.d);
    const Index hd = c.heads * c.d, hvd = c.vheads * c.d;
    const Mat q = rand_mat(g, c.n, hd), k = rand_mat(g, c.n, hd), v = rand_mat(g, c.n, hvd);
    const Mat da = rand_mat(g, c.n, hd), dv0 = rand_mat(g, c.n, hvd);
    Mat a, rowsum, dq, dk, dv;
    cpu::sigmoid_attn_fwd(q, k, v, c.heads, a, rowsum);
    cpu::sigmoid_attn_bwd(q, k, v, c.heads, a, rowsum, da, dq, dk, dv);
    const cuda::AttnDims dm{c.n, c.d, c.heads, c.vheads};
    auto qd = dev(q), kd = dev(k), vd = dev(v), ad = dev_zero(c.n, hd), rs = dev_zero(c.n, c.heads);
    auto dad = dev(da), dqd = dev_zero(c.n, hd), dkd = dev_zero(c.n, hd), dvd = dev(dv0), delta = dev_zero(c.n, c.heads);
    cuda::sigmoid_attn_fwd(gpu(), dm, qd.data(), kd.data(), vd.data(), ad.data(), rs.data());
    cuda::sigmoid_attn_bwd(gpu(), dm, qd.data(), kd.data(), vd.data(), ad.data(), rs.data(), dad.data(), hd, c.d, 1.0f,
                           dqd.data(), dkd.data(), dvd.data(), 1.0f, delta.data());
    const std::string tag = "n=" + std::to_string(c.n) + " d=" + std::to_string(c.d) + " H=" +
                            std::to_string(c.heads) + " Hv=" + std::to_string(c.vheads);
    EXPECT_LE(rel_err(host(ad, c.n, hd), a), kGemm) << tag;
    EXPECT_LE(rel_err(host(rs, c.n, c.heads), rowsum), kGemm) << tag;
    const double floor = 1e-2 * da.norm();  // n = 1: dQ = dK = 0 exactly
    EXPECT_LE(rel_err_floor(host(dqd, c.n, hd), dq, floor), kGemm) << tag << " dq";
    EXPECT_LE(rel_err_floor(host(dkd, c.n, hd), dk, floor), kGemm) << tag << " dk";
    EXPECT_LE(rel_err(host(dvd, c.n, hvd), Mat(dv + dv0)), kGemm) << tag << " dv";
    // dQ written over Q (the model's in-place use)
    cuda::sigmoid_attn_bwd(gpu(), dm, qd.data(), kd.data(), vd.data(), ad.data(), rs.data(), dad.data(), hd, c.d, 1.0f,
                           qd.data(), dkd.data(), dvd.data(), 0.0f, delta.data());
    EXPECT_LE(rel_err_floor(host(qd, c.n, hd), dq, floor), kGemm) << tag << " dq in place";
  }
  unsetenv("DIFFORMER_SIGMOID_CHUNK_KEYS");
}

// ---- loss and optimiser ---------------------------------------------------------------------------------
TEST(CudaOps, CrossEntropyMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(12);
  const Index n = 500, c = 7;
  const Mat logits = rand_mat(g, n, c, -4, 4);
  std::vector<std::int64_t> y(n), all(n);
  std::vector<std::int32_t> y32(n);
  for (Index i = 0; i < n; ++i) y32[i] = static_cast<std::int32_t>(y[i] = static_cast<std::int64_t>(g() % c));
  std::iota(all.begin(), all.end(), 0);
  std::vector<std::int64_t> sub = {3, 17, 250, 499, 0};
  std::vector<std::int32_t> sub32(sub.begin(), sub.end());
  DeviceBuffer<std::int32_t> yd(gpu(), n), sd(gpu(), sub.size());
  yd.upload(y32);
  sd.upload(sub32);
  auto ld = dev(logits), dld = dev_zero(n, c), lossd = dev_zero(1, 1);
  for (bool subset : {false, true}) {
    Mat dl;
    const float loss = cpu::cross_entropy(logits, y, subset ? sub : all, dl);
    cuda::cross_entropy(gpu(), ld.data(), n, c, yd.data(), subset ? sd.data() : nullptr,
                        subset ? static_cast<Index>(sub.size()) : 0, dld.data(), lossd.data());
    EXPECT_NEAR(host(lossd, 1, 1)(0, 0), loss, kElem * std::abs(loss)) << subset;
    EXPECT_LE(rel_err(host(dld, n, c), dl), kElem) << subset;
  }
}

TEST(CudaOps, AdamMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 g(13);
  ParamStore ps;
  ps.add("w", 1000, 3);
  ps.allocate();
  ps.mat(0) = rand_mat(g, 1000, 3);
  auto p = dev(ps.mat(0)), m = dev_zero(1000, 3), v = dev_zero(1000, 3);
  DeviceBuffer<double> st(gpu(), 3);
  st.zero();
  Adam adam(AdamOptions{0.01f, 1e-3f});
  for (int s = 0; s < 4; ++s) {
    ps.grad_mat(0) = rand_mat(g, 1000, 3);
    auto gd = dev(ps.grad_mat(0));
    adam.step(ps);
    cuda::adam_step(gpu(), p.data(), gd.data(), m.data(), v.data(), 3000, cuda::AdamHyper{0.01f, 0.9f, 0.999f, 1e-8f, 1e-3f},
                    st.data());
    EXPECT_LE(rel_err(host(p, 1000, 3), Mat(ps.mat(0))), kElem) << "step " << s;
  }
}

// ---- the GPU model -----------------------------------------------------------------------------------
class CudaFixture : public ::testing::TestWithParam<std::string> {};

void run_fixture_gpu(const std::string& file, bool sparse_input) {
  const Npz z = read_npz(test::source_path("tests/fixtures/" + file));
  auto scalar = [&](const char* name) { return z.at(name).to_f64(name)[0]; };
  ModelConfig cfg;
  cfg.in_features = static_cast<Index>(scalar("cfg__in_channels"));
  cfg.hidden = static_cast<Index>(scalar("cfg__hidden_channels"));
  cfg.out_features = static_cast<Index>(scalar("cfg__out_channels"));
  cfg.layers = static_cast<int>(scalar("cfg__num_layers"));
  cfg.heads = static_cast<int>(scalar("cfg__num_heads"));
  cfg.kernel = scalar("cfg__kernel_is_sigmoid") != 0 ? Kernel::sigmoid : Kernel::simple;
  cfg.use_graph = scalar("cfg__use_graph") != 0;
  cfg.alpha = static_cast<float>(scalar("cfg__alpha"));
  cfg.use_weight = true;
  cfg.dropout = 0.0f;
  DIFFormer model(cfg);
  for (size_t s = 0; s < model.params.slots.size(); ++s) {
    const auto& slot = model.params.slots[s];
    const std::string name = test::fixture_name(slot.name);
    const Mat p = z.at(name).to_mat(name);
    ASSERT_EQ(p.size(), slot.size()) << slot.name;
    model.params.mat(static_cast<int>(s)) = Eigen::Map<const Mat>(p.data(), slot.rows, slot.cols);
  }
  const Mat x = z.at("x").to_mat("x");
  const auto y = z.at("y").to_i64("y");
  const auto ei = z.at("edge_index").to_i64("edge_index");
  const Index n = x.rows(), e = static_cast<Index>(ei.size() / 2);
  std::vector<std::int64_t> src(ei.begin(), ei.begin() + e), dst(ei.begin() + e, ei.end());
  GraphOp graph = make_graph_op<float>(n, src, dst);
  const Csr xs = test::dense_to_csr(x), xs_t = csr_transpose(xs);
  ModelInput in;
  if (sparse_input) {
    in.sparse = &xs;
    in.sparse_t = &xs_t;
  } else {
    in.dense = &x;
  }
  if (cfg.use_graph) in.graph = &graph;

  cuda::Model gm(cfg);
  gm.upload_params(model.params);
  gm.set_input(in);
  gm.set_labels(y);
  gm.forward(true, 0);
  std::vector<Mat> hidden;
  gm.download_hidden(hidden);
  for (int l = 0; l <= cfg.layers; ++l) {
    const std::string name = "hidden__" + std::to_string(l);
    EXPECT_LE(rel_err(hidden[l], z.at(name).to_matd(name)), kGemm) << file << " " << name;
  }
  Mat logits;
  gm.download_logits(logits);
  EXPECT_LE(rel_err(logits, z.at("logits").to_matd("logits")), kGemm) << file << " logits";
  gm.zero_grad();
  const float loss = gm.loss_and_dlogits();
  EXPECT_NEAR(loss, scalar("loss"), kGemm * std::abs(scalar("loss"))) << file << " loss";
  gm.backward();
  ParamStore got = model.params;
  gm.download_params(got);
  for (size_t s = 0; s < got.slots.size(); ++s) {
    const auto& slot = got.slots[s];
    const std::string name = "grad__" + test::fixture_name(slot.name);
    const MatD ref = z.at(name).to_matd(name);
    const MatD gg = Eigen::Map<const Mat>(got.grads.data() + slot.offset, ref.rows(), ref.cols()).cast<double>();
    EXPECT_LE(rel_err(gg, ref), kGemm) << file << " " << name << " |ref| = " << ref.norm();
  }
  gm.adam_step(AdamOptions{0.01f, 1e-3f});
  gm.download_params(got);
  for (size_t s = 0; s < got.slots.size(); ++s) {
    const auto& slot = got.slots[s];
    const std::string name = "adam1__" + test::fixture_name(slot.name);
    const MatD ref = z.at(name).to_matd(name);
    const MatD pv = Eigen::Map<const Mat>(got.values.data() + slot.offset, ref.rows(), ref.cols()).cast<double>();
    EXPECT_LE(rel_err(pv, ref), kGemm) << file << " " << name;
  }
}

TEST_P(CudaFixture, DenseInputMatchesPyTorch) {
  SKIP_WITHOUT_GPU();
  run_fixture_gpu(GetParam(), false);
}
TEST_P(CudaFixture, SparseInputMatchesPyTorch) {
  SKIP_WITHOUT_GPU();
  run_fixture_gpu(GetParam(), true);
}

INSTANTIATE_TEST_SUITE_P(Golden, CudaFixture,
                         ::testing::Values("difformer_small_simple_graph.npz", "difformer_small_simple_nograph.npz",
                                           "difformer_small_sigmoid_graph.npz",
                                           "difformer_small_sigmoid_nograph.npz", "difformer_n200_simple_graph.npz",
                                           "difformer_n200_sigmoid_graph.npz"),
                         [](const auto& info) {
                           std::string s = info.param.substr(10, info.param.size() - 14);
                           for (auto& c : s)
                             if (c == '.') c = '_';
                           return s;
                         });

// GPU model against the CPU model for `steps` Adam steps on random data.
struct ModelCase {
  std::string name;
  ModelConfig cfg;
  bool sparse = false, subset = false;
  int steps = 2;
  double grad_tol = kGemm;  // per-tensor relative error of the gradients, GPU against CPU float
};

std::vector<ModelCase> model_cases() {
  auto base = [] {
    ModelConfig c;
    c.in_features = 20, c.hidden = 16, c.out_features = 4, c.layers = 2, c.heads = 1;
    c.dropout = 0.0f;
    return c;
  };
  std::vector<ModelCase> cs;
  {
    ModelCase m{"simple_shared_values_dropout", base()};
    m.cfg.use_weight = false, m.cfg.dropout = 0.3f;
    cs.push_back(m);
  }
  {
    ModelCase m{"simple_node_norm_two_heads", base()};
    m.cfg.qk_norm = QkNorm::node, m.cfg.heads = 2, m.cfg.use_weight = true;
    cs.push_back(m);
  }
  {
    ModelCase m{"simple_two_heads_shared_values", base()};
    m.cfg.heads = 2, m.cfg.use_weight = false, m.cfg.hidden = 64;
    cs.push_back(m);
  }
  {
    ModelCase m{"gcn_kernel_none", base()};
    m.cfg.kernel = Kernel::none, m.cfg.use_weight = true;
    cs.push_back(m);
  }
  {
    ModelCase m{"mlp_no_graph_no_attention", base()};
    m.cfg.kernel = Kernel::none, m.cfg.use_graph = false, m.cfg.use_weight = false;
    cs.push_back(m);
  }
  {
    ModelCase m{"graph_weight_mix", base()};
    m.cfg.graph_weight = 0.3f, m.cfg.use_weight = true, m.cfg.layers = 3;
    cs.push_back(m);
  }
  {
    ModelCase m{"no_ln_no_residual", base()};
    m.cfg.use_ln = false, m.cfg.use_residual = false, m.cfg.use_weight = true;
    // the attention's gradients here are cancellation (see StepsMatch): with the CPU engine on one
    // thread the H200 measured 1.04e-4 and 1.06e-4 (convs.1.Wk.bias, convs.1.Wq.weight, step 0),
    // on 2 and 16 threads every tensor below 1e-4
    m.grad_tol = 2e-4;
    cs.push_back(m);
  }
  {
    ModelCase m{"sigmoid_two_heads_dropout", base()};
    m.cfg.kernel = Kernel::sigmoid, m.cfg.heads = 2, m.cfg.use_weight = true, m.cfg.dropout = 0.2f;
    cs.push_back(m);
  }
  {
    ModelCase m{"sigmoid_shared_values", base()};
    m.cfg.kernel = Kernel::sigmoid, m.cfg.use_weight = false;
    cs.push_back(m);
  }
  {
    ModelCase m{"sparse_input_subset_loss", base()};
    m.cfg.use_weight = true, m.cfg.dropout = 0.1f;
    m.sparse = true, m.subset = true;
    cs.push_back(m);
  }
  {
    // the paper's 20News / image settings: hidden 300, no graph (LayerNorm rows of 300 > 256)
    ModelCase m{"simple_wide_hidden_300_no_graph", base()};
    m.cfg.hidden = 300, m.cfg.use_graph = false, m.cfg.use_weight = false, m.cfg.dropout = 0.1f;
    cs.push_back(m);
  }
  {
    // 20news-a: DIFFormer-a at hidden 300 (the key-chunked sigmoid path)
    ModelCase m{"sigmoid_wide_hidden_300_no_graph", base()};
    m.cfg.kernel = Kernel::sigmoid, m.cfg.hidden = 300, m.cfg.use_graph = false, m.cfg.use_weight = false;
    // the W_q gradients are small sums with cancellation over 300-wide dot products: the H200
    // measured 1.01e-4 and 1.10e-4 (convs.0/1.Wq, step 1) against the CPU float engine, every
    // other tensor below 1e-4
    m.grad_tol = 3e-4;
    cs.push_back(m);
  }
  {
    ModelCase m{"zero_layers", base()};
    m.cfg.layers = 0;
    cs.push_back(m);
  }
  return cs;
}

void PrintTo(const ModelCase& m, std::ostream* os) { *os << m.name; }

class CudaModelVsCpu : public ::testing::TestWithParam<ModelCase> {};

TEST_P(CudaModelVsCpu, StepsMatch) {
  SKIP_WITHOUT_GPU();
  const ModelCase& mc = GetParam();
  const ModelConfig& cfg = mc.cfg;
  std::mt19937_64 g(42);
  const Index n = 300;
  const Mat x = rand_mat(g, n, cfg.in_features);
  const Csr xs = rand_sparse(g, n, cfg.in_features, 0.2), xst = csr_transpose(xs);
  std::vector<std::int64_t> y(n), idx;
  for (auto& v : y) v = static_cast<std::int64_t>(g() % cfg.out_features);
  for (Index i = 0; i < n; ++i)
    if (!mc.subset || i % 4 == 1) idx.push_back(i);
  const GraphOp graph = rand_graph(g, n, 900, true);
  ModelInput in;
  if (mc.sparse) {
    in.sparse = &xs;
    in.sparse_t = &xst;
  } else {
    in.dense = &x;
  }
  if (cfg.use_graph) in.graph = &graph;

  DIFFormer cpu_model(cfg);
  std::mt19937_64 rng(1);
  cpu_model.init(rng);
  cuda::Model gm(cfg);
  gm.upload_params(cpu_model.params);
  gm.set_input(in);
  gm.set_labels(y);
  if (mc.subset) gm.set_train_index(idx);
  Adam adam(AdamOptions{0.01f, 1e-3f});
  ParamStore got = cpu_model.params;
  for (int s = 0; s < mc.steps; ++s) {
    const std::uint64_t seed = 100 + s;
    ForwardState state;
    Mat logits, dlogits;
    cpu_model.params.zero_grad();
    cpu_model.forward(in, true, seed, &state, logits);
    const float loss = cpu::cross_entropy(logits, y, idx, dlogits);
    cpu_model.backward(in, state, dlogits);

    gm.zero_grad();
    gm.forward(true, seed);
    Mat gl;
    gm.download_logits(gl);
    EXPECT_LE(rel_err(gl, logits), kGemm) << mc.name << " step " << s << " logits";
    const float gloss = gm.loss_and_dlogits();
    EXPECT_NEAR(gloss, loss, kGemm * std::abs(loss)) << mc.name << " step " << s;
    gm.backward();
    gm.download_params(got);
    // Without LayerNorm and residual the attention's gradients are ~1e-8 of the others and pure
    // cancellation: the CPU engine alone moves them by 4e-3 between 1 and 2 threads. Each tensor is
    // compared relative to its own norm, floored at 1e-6 of the whole gradient's.
    const double floor = 1e-6 * Eigen::Map<const Vec>(cpu_model.params.grads.data(), got.total()).norm();
    for (size_t k = 0; k < got.slots.size(); ++k) {
      const auto& slot = got.slots[k];
      const Mat ref = Eigen::Map<const Mat>(cpu_model.params.grads.data() + slot.offset, slot.rows, slot.cols);
      const Mat gg = Eigen::Map<const Mat>(got.grads.data() + slot.offset, slot.rows, slot.cols);
      EXPECT_LE(rel_err_floor(gg, ref, floor), mc.grad_tol) << mc.name << " step " << s << " grad " << slot.name;
    }
    adam.step(cpu_model.params);
    gm.adam_step(AdamOptions{0.01f, 1e-3f});
  }
  gm.download_params(got);
  const Mat pv = Eigen::Map<const Mat>(got.values.data(), got.total(), 1);
  const Mat pr = Eigen::Map<const Mat>(cpu_model.params.values.data(), got.total(), 1);
  EXPECT_LE(rel_err(pv, pr), kGemm) << mc.name << " parameters after " << mc.steps << " steps";
}

INSTANTIATE_TEST_SUITE_P(Configs, CudaModelVsCpu, ::testing::ValuesIn(model_cases()),
                         [](const auto& info) { return info.param.name; });

// train_step (eager first, then captured and replayed as a CUDA graph) against step-by-step calls.
TEST(CudaModel, TrainStepGraphReplayMatchesEager) {
  SKIP_WITHOUT_GPU();
  ModelConfig cfg;
  cfg.in_features = 12, cfg.hidden = 32, cfg.out_features = 3, cfg.layers = 2, cfg.dropout = 0.2f;
  cfg.use_weight = true;
  std::mt19937_64 g(5);
  const Index n = 500;
  const Mat x = rand_mat(g, n, cfg.in_features);
  std::vector<std::int64_t> y(n);
  for (auto& v : y) v = static_cast<std::int64_t>(g() % cfg.out_features);
  const GraphOp graph = rand_graph(g, n, 1500, false);
  ModelInput in;
  in.dense = &x;
  in.graph = &graph;
  DIFFormer host(cfg);
  std::mt19937_64 rng(2);
  host.init(rng);
  cuda::DeviceOptions with_graph, eager;
  eager.cuda_graph = false;
  cuda::Model a(cfg, with_graph), b(cfg, eager);
  for (cuda::Model* m : {&a, &b}) {
    m->upload_params(host.params);
    m->set_input(in);
    m->set_labels(y);
  }
  const AdamOptions opt{0.01f, 1e-3f};
  for (int s = 0; s < 5; ++s) {
    const float la = a.train_step(10 + s, opt), lb = b.train_step(10 + s, opt);
    EXPECT_NEAR(la, lb, 1e-6 * std::abs(lb)) << "step " << s;
  }
  EXPECT_TRUE(a.graph_captured());
  EXPECT_FALSE(b.graph_captured());
  ParamStore pa = host.params, pb = host.params;
  a.download_params(pa);
  b.download_params(pb);
  EXPECT_LE(rel_err(Eigen::Map<const Mat>(pa.values.data(), pa.total(), 1),
                    Eigen::Map<const Mat>(pb.values.data(), pb.total(), 1)),
            1e-6);
  EXPECT_GT(a.peak_device_bytes(), 0);
}

TEST(CudaModel, RejectsBadInput) {
  SKIP_WITHOUT_GPU();
  ModelConfig cfg;
  cfg.in_features = 4, cfg.hidden = 8, cfg.out_features = 2;
  cuda::Model m(cfg);
  const Mat x = Mat::Zero(10, 5);
  ModelInput in;
  in.dense = &x;
  EXPECT_THROW(m.set_input(in), Error);  // 5 features, model expects 4 (and no graph)
  ModelConfig big = cfg;
  big.kernel = Kernel::sigmoid, big.hidden = 1024;  // widest GPU head: 512
  EXPECT_THROW(cuda::Model bad(big), Error);
}

// ---- training drivers on the GPU -------------------------------------------------------------------
// `difformer train --device cuda`: the shared protocol (train_node_classifier over a backend) on
// Cora with the GPU backend against the CPU backend, from the same initial weights and with the
// same dropout masks. The two are the same computation in a different float summation order, so
// they agree step for step until roundoff is amplified by training itself: the first 20 epochs'
// losses within 1e-4 relative and accuracies within half a point; after that the losses within 2%
// and the accuracies within 2 points; the best-validation selection alike within 2 points.
TEST(CudaTrain, CoraEpochsMatchCpu) {
  SKIP_WITHOUT_GPU();
  Dataset d = load_node_dataset(test::source_path("data/cora.npz"));
  row_normalise(d);
  citation_graph(d);
  choose_feature_layout(d);
  ASSERT_TRUE(d.sparse);
  ModelConfig cfg;
  cfg.in_features = d.features, cfg.out_features = d.classes;
  cfg.hidden = 64, cfg.layers = 4, cfg.dropout = 0.2f, cfg.kernel = Kernel::simple;
  cfg.validate();
  const GraphOp graph = graph_operator(d);
  ModelInput in;
  in.sparse = &d.xs;
  in.sparse_t = &d.xs_t;
  in.graph = &graph;
  const Split split = load_split_file(test::source_path("data/splits/cora_random10.npz"), 0, d.n);
  TrainOptions opt;
  opt.epochs = 40;
  // lr 2e-3: the run learns smoothly (validation 0.73 at epoch 40). At 5e-3 its loss dropped
  // abruptly near epoch 32, where the float summation order decides the trajectory: there the CPU
  // engine on 16 threads and the GPU parted by 35 points of training accuracy on the H200, and the
  // CPU engine on 1 thread and on 16 finished 3.5 test points apart.
  opt.adam = AdamOptions{2e-3f, 5e-4f};
  std::vector<EpochReport> rc, rg;
  DIFFormer a(cfg), b(cfg);
  std::mt19937_64 ra(7), rb(7);
  a.init(ra), b.init(rb);
  auto cpu_backend = make_cpu_backend(a, in, d.y, split, opt.adam);
  const RunResult c = train_node_classifier(*cpu_backend, d.y, split, opt, 7, [&](const EpochReport& e) { rc.push_back(e); });
  auto gpu_backend = make_cuda_backend(b, in, d.y, split, opt.adam, "fp32");
  const RunResult g = train_node_classifier(*gpu_backend, d.y, split, opt, 7, [&](const EpochReport& e) { rg.push_back(e); });
  ASSERT_EQ(rc.size(), rg.size());
  double worst = 0;
  for (size_t e = 0; e < rc.size(); ++e) {
    const double rel = std::abs(rg[e].loss - rc[e].loss) / std::abs(rc[e].loss);
    const bool lockstep = e < 20;
    if (lockstep) worst = std::max(worst, rel);
    const double loss_tol = lockstep ? 1e-4 : 2e-2, acc_tol = lockstep ? 0.005 : 0.02;
    EXPECT_LE(rel, loss_tol) << "epoch " << e << " loss gpu " << rg[e].loss << " cpu " << rc[e].loss;
    EXPECT_NEAR(rg[e].train, rc[e].train, acc_tol) << "epoch " << e;
    EXPECT_NEAR(rg[e].val, rc[e].val, acc_tol) << "epoch " << e;
    EXPECT_NEAR(rg[e].test, rc[e].test, acc_tol) << "epoch " << e;
  }
  std::printf("CoraEpochsMatchCpu: worst relative loss difference %.2e over the first 20 of %zu epochs; best epoch cpu %d gpu %d, "
              "test cpu %.2f gpu %.2f; %.2f vs %.2f ms/epoch\n",
              worst, rc.size(), c.best_epoch, g.best_epoch, 100 * c.test, 100 * g.test, c.ms_per_epoch,
              g.ms_per_epoch);
  EXPECT_GT(rc.back().val, 0.5) << "the run must learn for the comparison to mean something";  // 7 classes: chance ~0.15
  EXPECT_NEAR(g.val, c.val, 0.02);
  EXPECT_NEAR(g.test, c.test, 0.02);
  EXPECT_EQ(g.best_params.size(), c.best_params.size());
  if (g.best_epoch == c.best_epoch && c.best_epoch < 20) {  // the weights compare only in lockstep
    EXPECT_LE(rel_err(Eigen::Map<const Vec>(g.best_params.data(), g.best_params.size()),
                      Eigen::Map<const Vec>(c.best_params.data(), c.best_params.size())),
              1e-3);
  }
  EXPECT_GT(g.peak_device_bytes, 0);
  EXPECT_EQ(c.peak_device_bytes, 0);
}

LargeDataset sbm_dataset(Index n, Index classes, std::uint64_t seed) {
  SbmOptions o;
  o.nodes = n, o.avg_degree = 6, o.features = 12, o.classes = classes, o.homophily = 0.8, o.signal = 1.0, o.seed = seed;
  const SbmGraph sg = make_sbm(o);
  LargeDataset d;
  d.n = sg.x.rows();
  d.features = sg.x.cols();
  d.x = sg.x;
  d.targets.y = sg.block;
  d.targets.classes = classes;
  const Index e = sg.edges();
  std::vector<std::int32_t> src(e), dst(e);
  for (Index k = 0; k < e; ++k) {
    src[k] = static_cast<std::int32_t>(sg.edge_index[k]);
    dst[k] = static_cast<std::int32_t>(sg.edge_index[e + k]);
  }
  d.graph = build_node_graph(d.n, src, dst, {}, GraphPrep{true, true}, "sbm");
  return d;
}

// `difformer train-large --device cuda`: mini-batch steps (one cuda::Model reused across chunks
// of different sizes and graphs, some chunks skipped) and full-graph steps (batch 0, CUDA graph
// replay), each with full-graph evaluation on the GPU, against the CPU driver.
TEST(CudaTrainLarge, ChunkedAndFullGraphMatchCpu) {
  SKIP_WITHOUT_GPU();
  const LargeDataset d = sbm_dataset(1300, 3, 5);
  ModelConfig cfg;
  cfg.in_features = d.features, cfg.out_features = 3, cfg.hidden = 16, cfg.layers = 2;
  cfg.use_weight = true, cfg.dropout = 0.1f, cfg.kernel = Kernel::simple;
  cfg.validate();
  // few training nodes, small chunks: some chunks have none and are skipped
  const Split split = ratio_split(d.targets, 0.02, 0.3, 3);
  for (const Index batch : {Index{100}, Index{0}}) {
    LargeTrainOptions opt;
    opt.batch_size = batch;
    opt.epochs = 5;
    opt.eval_every = 1;
    opt.adam = AdamOptions{1e-2f, 0.0f};
    opt.metric = Metric::accuracy;
    std::vector<LargeEpochReport> rc, rg;
    const LargeRunResult c = train_large_run(d, cfg, split, opt, 11, [&](const LargeEpochReport& e) { rc.push_back(e); });
    opt.device = "cuda";
    const LargeRunResult g = train_large_run(d, cfg, split, opt, 11, [&](const LargeEpochReport& e) { rg.push_back(e); });
    ASSERT_EQ(rc.size(), rg.size());
    for (size_t e = 0; e < rc.size(); ++e) {
      EXPECT_EQ(rg[e].steps, rc[e].steps) << "batch " << batch << " epoch " << e;
      EXPECT_EQ(rg[e].skipped, rc[e].skipped) << "batch " << batch << " epoch " << e;
      EXPECT_LE(std::abs(rg[e].loss - rc[e].loss), 1e-4 * std::abs(rc[e].loss)) << "batch " << batch << " epoch " << e;
      EXPECT_NEAR(rg[e].val, rc[e].val, 0.005) << "batch " << batch << " epoch " << e;
      EXPECT_NEAR(rg[e].test, rc[e].test, 0.005) << "batch " << batch << " epoch " << e;
    }
    if (batch > 0) {
      EXPECT_GT(c.skipped, 0) << "the split should leave some chunks without training nodes";
    }
    EXPECT_EQ(g.gpu_evals, 5);
    EXPECT_EQ(g.cpu_evals, 0);
    EXPECT_EQ(c.cpu_evals, 5);
    EXPECT_GT(g.peak_device_bytes, 0);
    EXPECT_NEAR(g.test, c.test, 0.005);
  }
  // multi-label targets are refused on the GPU with a message
  LargeDataset ml = d;
  ml.targets.multilabel = true;
  ml.targets.ym = Mat::Zero(d.n, 3);
  LargeTrainOptions opt;
  opt.device = "cuda";
  opt.epochs = 1;
  try {
    train_large_run(ml, cfg, split, opt, 0);
    FAIL() << "multi-label on cuda must throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multi-label"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dfm

#endif  // DIFFORMER_WITH_CUDA

// =================================================================================================
// The folded DIFFormer-s layer (ops/cuda/simple_folded.hpp) against the CPU's folded kernel plus the
// graph term, LayerNorm and residual written out with cpu:: ops; and the whole GPU model at d = 64
// on several thousand rows (many blocks, a partial last tile) against the CPU model.
// =================================================================================================
#ifdef DIFFORMER_WITH_CUDA
#include "ops/cuda/simple_folded.hpp"

namespace dfm {
namespace {

void check_folded_layer(Index n, Index d, bool use_v, bool graph, bool in_place) {
  std::mt19937_64 g(1000 + n + d + (use_v ? 7 : 0) + (graph ? 13 : 0));
  const float sc = 1.0f / std::sqrt(static_cast<float>(d));
  const Mat h = rand_mat(g, n, d);
  const Mat wq = rand_mat(g, d, d, -sc, sc), wk = rand_mat(g, d, d, -sc, sc), wv = rand_mat(g, d, d, -sc, sc);
  const Mat bq = rand_mat(g, d, 1, -sc, sc), bk = rand_mat(g, d, 1, -sc, sc), bv = rand_mat(g, d, 1, -sc, sc);
  const Mat gamma = rand_mat(g, d, 1, 0.5f, 1.5f), beta = rand_mat(g, d, 1, -0.2f, 0.2f);
  const GraphOp gr = rand_graph(g, n, 3 * n, true);
  const float wa = 0.5f, wg = 0.7f, wr = 0.5f;
  // CPU: z = wa A + wg (adj h Wv^T + rowsum bv^T) + wr h, y = LN(z)
  cpu::FoldedProjections fp{wq.data(), bq.data(), wk.data(), bk.data(), use_v ? wv.data() : nullptr,
                            use_v ? bv.data() : nullptr};
  Mat a;
  cpu::SimpleFusedState st;
  cpu::simple_attn_fused_fwd(h, fp, 1, a, st);
  Mat z = wa * a + wr * h;
  if (graph) {
    Mat ah;
    cpu::graph_prop(gr.adj, h, ah);
    Mat gg = use_v ? Mat(ah * wv.transpose()) : ah;
    if (use_v)
      for (Index i = 0; i < n; ++i) {
        float rs = 0;
        for (Index e = gr.adj.indptr[i]; e < gr.adj.indptr[i + 1]; ++e) rs += gr.adj.values[e];
        gg.row(i) += rs * bv.col(0).transpose();
      }
    z += wg * gg;
  }
  Mat y, xhat;
  Vec rstd;
  cpu::layernorm_fwd(z, gamma.data(), beta.data(), 1e-5f, y, xhat, rstd);
  const Mat dout = rand_mat(g, n, d);
  Mat dwq = Mat::Zero(d, d), dwk = Mat::Zero(d, d), dwv = Mat::Zero(d, d);
  Mat dbq = Mat::Zero(d, 1), dbk = Mat::Zero(d, 1), dbv = Mat::Zero(d, 1);
  cpu::FoldedGrads fg{dwq.data(), dbq.data(), dwk.data(), dbk.data(), use_v ? dwv.data() : nullptr,
                      use_v ? dbv.data() : nullptr};
  const Mat da = wa * dout;
  Mat dh_att;
  cpu::simple_attn_fused_bwd(h, fp, 1, a, st, da, dh_att, fg);
  Mat dh = dh_att + wr * dout;
  if (graph) {
    Mat t;
    cpu::graph_prop(gr.adj_t, dout, t);
    if (use_v) {
      dh += wg * (t * wv);
      dwv += wg * Mat(t.transpose() * h);
      dbv += wg * Mat(t.colwise().sum().transpose());
    } else {
      dh += wg * t;
    }
  }
  // GPU
  auto hd = dev(h), wqd = dev(wq), wkd = dev(wk), wvd = dev(wv), bqd = dev(bq), bkd = dev(bk), bvd = dev(bv);
  auto gmd = dev(gamma), btd = dev(beta);
  auto dwqd = dev_zero(d, d), dwkd = dev_zero(d, d), dwvd = dev_zero(d, d);
  auto dbqd = dev_zero(d, 1), dbkd = dev_zero(d, 1), dbvd = dev_zero(d, 1);
  cuda::FoldedWeights w;
  w.wq = wqd.data(), w.bq = bqd.data(), w.wk = wkd.data(), w.bk = bkd.data();
  w.dwq = dwqd.data(), w.dbq = dbqd.data(), w.dwk = dwkd.data(), w.dbk = dbkd.data();
  if (use_v) w.wv = wvd.data(), w.bv = bvd.data(), w.dwv = dwvd.data(), w.dbv = dbvd.data();
  DeviceBuffer<float> stats(gpu(), cuda::folded_stats_floats(d)), work(gpu(), cuda::folded_work_floats(gpu(), n, d));
  DevCsr adj(gr.adj), adjt(gr.adj_t);
  auto gbuf = dev_zero(n, d), rsd = dev_zero(n, 1), zd = dev_zero(n, d), yd = dev_zero(n, d);
  cuda::folded_fwd_stats(gpu(), n, d, hd.data(), w, stats.data(), work.data());
  if (graph) {
    cuda::spmm(gpu(), adj.view, hd.data(), d, d, gbuf.data(), d, 1.0f, 0.0f);
    cuda::csr_row_sums(gpu(), adj.view, rsd.data());
  }
  cuda::FoldedRowsFwd r;
  r.n = n, r.d = d, r.h = hd.data(), r.g = graph ? gbuf.data() : nullptr, r.rowsum = rsd.data();
  r.stats = stats.data(), r.wa = wa, r.wg = wg, r.wr = wr, r.z = zd.data(), r.ln = true;
  r.gamma = gmd.data(), r.beta = btd.data(), r.eps = 1e-5f;
  r.y = in_place ? (graph ? gbuf.data() : hd.data()) : yd.data();
  cuda::folded_fwd_rows(gpu(), r);
  const std::string tag = "n " + std::to_string(n) + " d " + std::to_string(d) + (use_v ? " Wv" : "") +
                          (graph ? " graph" : "") + (in_place ? " in place" : "");
  EXPECT_LE(rel_err(host(zd, n, d), z), kGemm) << "z " << tag;
  const Mat yg = in_place ? (graph ? host(gbuf, n, d) : host(hd, n, d)) : host(yd, n, d);
  EXPECT_LE(rel_err(yg, y), kGemm) << "y " << tag;
  if (in_place && !graph) hd = dev(h);  // the input was overwritten
  auto dod = dev(dout), td = dev_zero(n, d), dhd = dev_zero(n, d);
  if (graph) cuda::spmm(gpu(), adjt.view, dod.data(), d, d, td.data(), d, 1.0f, 0.0f);
  float* dh_out = in_place ? dod.data() : dhd.data();
  cuda::folded_bwd(gpu(), n, d, hd.data(), dod.data(), graph ? td.data() : nullptr, stats.data(), w, wa, wg, wr,
                   work.data(), dh_out);
  EXPECT_LE(rel_err(in_place ? host(dod, n, d) : host(dhd, n, d), dh), kGemm) << "dh " << tag;
  EXPECT_LE(rel_err(host(dwqd, d, d), dwq), kGemm) << "dWq " << tag;
  EXPECT_LE(rel_err(host(dbqd, d, 1), dbq), kGemm) << "dbq " << tag;
  EXPECT_LE(rel_err(host(dwkd, d, d), dwk), kGemm) << "dWk " << tag;
  // The K-bias gradient is a cancellation of O(N) terms (N f against gamma_k (Wk u + N bk)); its norm
  // is ~1e-3 of dWk's. Measured on the CPU (float fold against the double reference below): 8e-5 at
  // n = 3001, d = 64 and 5e-4 at n = 300; the GPU (double fold of float sums) differed from the CPU
  // by 1.9e-4 there. So dbk is checked against the double reference (project, ref::simple_attn_fwd
  // and _bwd, column sums of dK) at 1e-3, a wrong formula being off by O(1); dbq there at kGemm.
  {
    const MatD h64 = h.cast<double>();
    MatD q64, k64, v64 = h64;
    ref::linear_fwd(h64, wq.cast<double>(), bq.col(0).cast<double>(), q64);
    ref::linear_fwd(h64, wk.cast<double>(), bk.col(0).cast<double>(), k64);
    if (use_v) ref::linear_fwd(h64, wv.cast<double>(), bv.col(0).cast<double>(), v64);
    SimpleAttnStateD st64;
    MatD a64, dq64, dk64, dv64;
    ref::simple_attn_fwd(q64, k64, v64, 1, QkNorm::global, a64, st64);
    ref::simple_attn_bwd(v64, 1, a64, st64, da.cast<double>(), dq64, dk64, dv64);
    const MatD dbk64 = dk64.colwise().sum().transpose(), dbq64 = dq64.colwise().sum().transpose();
    const double gpu_err = rel_err_floor(host(dbkd, d, 1), dbk64, 0.0), cpu_err = rel_err_floor(dbk, dbk64, 0.0);
    std::printf("folded layer %s: dbk rel err vs double reference: GPU %.2e, CPU float %.2e\n", tag.c_str(), gpu_err,
                cpu_err);
    EXPECT_LE(gpu_err, 1e-3) << "dbk vs double " << tag;
    EXPECT_LE(rel_err_floor(host(dbqd, d, 1), dbq64, 0.0), kGemm) << "dbq vs double " << tag;
    EXPECT_LE(rel_err(host(dbkd, d, 1), dbk), 1e-3) << "dbk vs CPU float " << tag;
  }
  if (use_v) {
    EXPECT_LE(rel_err(host(dwvd, d, d), dwv), kGemm) << "dWv " << tag;
    EXPECT_LE(rel_err(host(dbvd, d, 1), dbv), kGemm) << "dbv " << tag;
  }
}

TEST(CudaOps, FoldedSimpleLayerMatchesCpu) {
  SKIP_WITHOUT_GPU();
  check_folded_layer(3001, 64, true, true, true);
  check_folded_layer(3001, 64, true, true, false);
  check_folded_layer(777, 32, false, true, true);
  check_folded_layer(1500, 16, true, false, true);
  check_folded_layer(5, 64, true, true, false);  // fewer rows than one tile
}

// The GPU model (folded path: one head, global norm, d = 64) against the CPU model on 3000 rows.
void check_folded_model(ModelConfig cfg, Index n, bool subset) {
  std::mt19937_64 g(77);
  const Mat x = rand_mat(g, n, cfg.in_features);
  std::vector<std::int64_t> y(n), idx;
  for (auto& v : y) v = static_cast<std::int64_t>(g() % cfg.out_features);
  for (Index i = 0; i < n; ++i)
    if (!subset || i % 3 == 0) idx.push_back(i);
  const GraphOp graph = rand_graph(g, n, 5 * n, false);
  ModelInput in;
  in.dense = &x;
  if (cfg.use_graph) in.graph = &graph;
  DIFFormer cpu_model(cfg);
  std::mt19937_64 rng(3);
  cpu_model.init(rng);
  cuda::Model gm(cfg);
  gm.upload_params(cpu_model.params);
  gm.set_input(in);
  gm.set_labels(y);
  if (subset) gm.set_train_index(idx);
  Adam adam(AdamOptions{0.01f, 1e-3f});
  ParamStore got = cpu_model.params;
  for (int s = 0; s < 2; ++s) {
    // Each step from the same parameters on both sides: after an Adam step they differ in the last
    // bits, and Adam's per-component normalisation turns a roundoff-sized gradient into a full
    // lr-sized step (the unsynchronised step-1 gradients differed by 1.5e-4 after a change of the
    // CPU's summation order alone). The Adam steps themselves are compared at the end.
    if (s > 0) {
      gm.download_params(got);
      cpu_model.params.values = got.values;
    }
    ForwardState state;
    Mat logits, dlogits;
    cpu_model.params.zero_grad();
    cpu_model.forward(in, true, 200 + s, &state, logits);
    const float loss = cpu::cross_entropy(logits, y, idx, dlogits);
    cpu_model.backward(in, state, dlogits);
    gm.zero_grad();
    gm.forward(true, 200 + s);
    Mat gl;
    gm.download_logits(gl);
    EXPECT_LE(rel_err(gl, logits), kGemm) << "step " << s << " logits";
    EXPECT_NEAR(gm.loss_and_dlogits(), loss, kGemm * std::abs(loss)) << "step " << s;
    gm.backward();
    gm.download_params(got);
    for (const auto& slot : got.slots) {
      const Mat ref = Eigen::Map<const Mat>(cpu_model.params.grads.data() + slot.offset, slot.rows, slot.cols);
      const Mat gg = Eigen::Map<const Mat>(got.grads.data() + slot.offset, slot.rows, slot.cols);
      // Wk.bias: a cancellation of O(N) float terms on the CPU (FoldedSimpleLayerMatchesCpu checks
      // the GPU's against the double reference at kGemm); 1e-3 here.
      const bool kbias = slot.name.find("Wk.bias") != std::string::npos;
      EXPECT_LE(rel_err(gg, ref), kbias ? 1e-3 : kGemm) << "step " << s << " grad " << slot.name;
    }
    adam.step(cpu_model.params);
    gm.adam_step(AdamOptions{0.01f, 1e-3f});
  }
  gm.download_params(got);
  EXPECT_LE(rel_err(Eigen::Map<const Mat>(got.values.data(), got.total(), 1),
                    Eigen::Map<const Mat>(cpu_model.params.values.data(), got.total(), 1)),
            kGemm);
}

TEST(CudaModel, FoldedSimpleMatchesCpuModel) {
  SKIP_WITHOUT_GPU();
  ModelConfig cfg;
  cfg.in_features = 40, cfg.hidden = 64, cfg.out_features = 5, cfg.layers = 3, cfg.heads = 1;
  cfg.use_weight = true, cfg.dropout = 0.1f;
  check_folded_model(cfg, 3000, false);
  cfg.use_graph = false, cfg.layers = 2, cfg.dropout = 0.0f;
  check_folded_model(cfg, 2999, true);
}

}  // namespace
}  // namespace dfm
#endif  // DIFFORMER_WITH_CUDA
