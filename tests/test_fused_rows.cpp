// The fused row passes of a diffusion layer (cpu::mix_layernorm_dropout_fwd,
// cpu::dropout_layernorm_mix_bwd) and graph_prop's scaled/accumulating form, against the double
// reference ops composed step by step, with the dropout mask of cpu::dropout_fwd.
#include <gtest/gtest.h>

#include <random>

#include "ops/ops.hpp"
#include "test_util.hpp"

namespace dfm {
namespace {

using test::rel_err;

Mat rand_mat(Index r, Index c, std::mt19937_64& g) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  Mat m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = d(g);
  return m;
}

GraphOp rand_graph(Index n, Index e, std::mt19937_64& g) {
  std::uniform_int_distribution<std::int64_t> u(0, n - 1);
  std::vector<std::int64_t> src, dst;
  for (Index k = 0; k < e; ++k) {
    src.push_back(u(g));
    dst.push_back(u(g));
  }
  return make_graph_op<float>(n, src, dst);
}

MatD dbl(const Mat& m) { return m.cast<double>(); }

struct Case {
  Index n, d;
  int heads;
  bool graph_gather, graph_dense, dropout, residual;
  bool relu = false;
};

class FusedRows : public ::testing::TestWithParam<Case> {};

TEST_P(FusedRows, ForwardAndBackwardMatchComposedReference) {
  const Case c = GetParam();
  std::mt19937_64 gen(c.n * 31 + c.d);
  const Index n = c.n, d = c.d;
  const Mat h = rand_mat(n, d, gen), a = rand_mat(n, c.heads * d, gen), gd = rand_mat(n, d, gen);
  const Mat src = rand_mat(n, d, gen);
  const GraphOp op = rand_graph(n, 5 * n, gen);
  Vec gamma = Vec::Random(d), beta = Vec::Random(d);
  const float keep_in = c.residual ? 0.5f : 0.0f, scale = c.residual ? 0.5f : 1.0f, wa = 0.7f / c.heads, cg = 0.3f;
  const float p = c.dropout ? 0.3f : 0.0f, eps = 1e-5f;
  const std::uint64_t seed = 12345;

  cpu::MixInputs m;
  m.h_in = &h;
  m.keep_in = keep_in;
  m.scale = scale;
  m.a = &a;
  m.heads = c.heads;
  m.wa = wa;
  m.relu = c.relu;
  if (c.graph_gather) {
    m.adj = &op.adj;
    m.gsrc = &src;
    m.cg = cg;
  } else if (c.graph_dense) {
    m.g = &gd;
    m.cg = cg;
  }
  Mat y, xhat;
  Vec rstd;
  std::vector<std::uint8_t> keep;
  cpu::mix_layernorm_dropout_fwd(m, gamma.data(), beta.data(), eps, p, seed, c.dropout ? &keep : nullptr, y, &xhat,
                                 &rstd);
  Mat y2;
  cpu::mix_layernorm_dropout_fwd(m, gamma.data(), beta.data(), eps, p, seed, nullptr, y2, nullptr, nullptr);

  // reference: z in double, LayerNorm, dropout with the mask of dropout_fwd
  MatD z = MatD::Zero(n, d);
  for (int hh = 0; hh < c.heads; ++hh) z += wa * dbl(a).middleCols(hh * d, d);
  if (c.graph_gather) {
    MatD gr;
    ref::graph_prop(test::to_double(op.adj), dbl(src), gr);
    z += cg * gr;
  } else if (c.graph_dense) {
    z += cg * dbl(gd);
  }
  z = scale * z + keep_in * dbl(h);
  MatD yr, xr;
  ref::layernorm_fwd(z, gamma.cast<double>(), beta.cast<double>(), eps, yr);
  ref::layernorm_fwd(z, VecD::Ones(d), VecD::Zero(d), eps, xr);
  if (c.relu) yr = yr.cwiseMax(0.0);
  EXPECT_LT(rel_err(y2, yr), 1e-5) << "no dropout";
  EXPECT_LT(rel_err(xhat, xr), 1e-5);
  MatD yd = yr;
  if (c.dropout) {
    Mat ones = Mat::Ones(n, d);
    std::vector<std::uint8_t> keep_ref;
    cpu::dropout_fwd(ones, p, seed, keep_ref);
    ASSERT_EQ(keep, keep_ref) << "the mask must be dropout_fwd's";
    MatD mask = dbl(ones);
    yd = yr.cwiseProduct(mask);
    Index kept = 0;
    for (auto k : keep) kept += k;
    EXPECT_GT(kept, 0);
    EXPECT_LT(kept, n * d);
  }
  EXPECT_LT(rel_err(y, yd), 1e-5);

  // backward (with relu, through the ReLU too: its gate is read from the forward's output y)
  const Mat dy = rand_mat(n, d, gen);
  MatD dyd = dbl(dy);
  if (c.dropout)
    for (Index i = 0; i < n * d; ++i) dyd.data()[i] = keep[i] ? dyd.data()[i] / (1.0 - p) : 0.0;
  if (c.relu)
    for (Index i = 0; i < n * d; ++i) dyd.data()[i] = yr.data()[i] > 0.0 ? dyd.data()[i] : 0.0;
  MatD dxr;
  VecD dgr = VecD::Zero(d), dbr = VecD::Zero(d);
  ref::layernorm_bwd(z, gamma.cast<double>(), eps, dyd, dxr, dgr, dbr);
  Mat d_o, dh;
  Vec dg = Vec::Constant(d, 1.0f), db = Vec::Constant(d, -1.0f);  // accumulated into
  cpu::dropout_layernorm_mix_bwd(c.dropout ? &keep : nullptr, p, xhat, rstd, gamma.data(), dy, scale, keep_in, d_o, &dh,
                                 dg.data(), db.data(), c.relu ? &y : nullptr);
  EXPECT_LT(rel_err(d_o, MatD(scale * dxr)), 1e-4);
  if (c.residual) {
    EXPECT_LT(rel_err(dh, MatD(keep_in * dxr)), 1e-4);
  } else {
    EXPECT_EQ(dh.cwiseAbs().maxCoeff(), 0.0f);
  }
  EXPECT_LT(rel_err(dg, VecD(dgr.array() + 1.0)), 1e-5);
  EXPECT_LT(rel_err(db, VecD(dbr.array() - 1.0)), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Shapes, FusedRows,
                         ::testing::Values(Case{300, 64, 1, true, false, true, true},
                                           Case{257, 64, 1, true, false, false, true},
                                           Case{129, 20, 2, true, false, true, false},
                                           Case{200, 75, 1, false, true, true, true},
                                           Case{64, 13, 3, false, false, true, true},
                                           Case{3000, 64, 1, true, false, true, true},
                                           Case{300, 64, 1, true, false, true, true, true},
                                           Case{100, 24, 1, false, true, true, true, true}));

TEST(GraphPropScaled, AccumulateAndScaleMatchReference) {
  std::mt19937_64 gen(7);
  for (Index width : {1, 7, 64, 75, 139}) {
    const Index n = 500;
    const GraphOp op = rand_graph(n, 6 * n, gen);
    const Mat v = rand_mat(n, width, gen), base = rand_mat(n, width, gen);
    MatD gr;
    ref::graph_prop(test::to_double(op.adj), dbl(v), gr);
    Mat g;
    cpu::graph_prop(op.adj, v, g);
    EXPECT_LT(rel_err(g, gr), 1e-6) << width;
    cpu::graph_prop(op.adj, v, g, 0.25f);
    EXPECT_LT(rel_err(g, MatD(0.25 * gr)), 1e-6) << width;
    Mat acc = base;
    cpu::graph_prop(op.adj, v, acc, -0.5f, true);
    EXPECT_LT(rel_err(acc, MatD(dbl(base) - 0.5 * gr)), 1e-6) << width;
  }
}

}  // namespace
}  // namespace dfm
