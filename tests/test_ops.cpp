// Table-driven op tests in the style of ggml's test-backend-ops. Two modes, each a table of cases:
//   OpCompare    the float32 kernels (dfm::cpu) against the double reference (dfm::ref) on random
//                inputs with fixed seeds: every forward output and every backward output, each
//                with a written tolerance (elementwise: max |a-b| / (1 + |b|); GEMM, reductions,
//                attention: ||a-b|| / ||b||);
//   OpGradCheck  every ref backward against central finite differences of the ref forward, in
//                double, through L = sum_k sum(G_k (.) out_k) with random G (so the backward
//                receives G as its output gradient).
// Adding an op means adding one builder below and listing its cases in compare_cases() /
// grad_cases(). Specific hand-computed checks (graph coefficients, explicit N x N attention
// formulas, loss values) and a self-test of the harness (it must be able to fail) follow the
// tables. The worst error measured per op and output is printed at the end of the run.
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "ops/ops.hpp"
#include "test_util.hpp"

namespace dfm {
namespace {

using test::rel_err;

// ---- inputs ----------------------------------------------------------------------------------
struct Rng {
  std::mt19937_64 gen;
  explicit Rng(std::uint64_t seed) : gen(seed) {}
  double uni(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen); }
  std::int64_t integer(std::int64_t lo, std::int64_t hi) {  // inclusive
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(gen);
  }
  Mat mat(Index r, Index c, double lo = -1, double hi = 1) {
    Mat m(r, c);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(uni(lo, hi));
    return m;
  }
  MatD matd(Index r, Index c, double lo = -1, double hi = 1) {
    MatD m(r, c);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = uni(lo, hi);
    return m;
  }
  Vec vec(Index n, double lo = -1, double hi = 1) {
    Vec v(n);
    for (Index i = 0; i < n; ++i) v[i] = static_cast<float>(uni(lo, hi));
    return v;
  }
  // m distinct rows of [0, n) in random order
  std::vector<std::int64_t> subset(Index n, Index m) {
    std::vector<std::int64_t> all(static_cast<size_t>(n));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), gen);
    all.resize(static_cast<size_t>(m));
    return all;
  }
};

MatD dbl(const Mat& m) { return m.cast<double>(); }
// Outputs are prefilled with NaN of the right shape: an element a kernel forgets to write (or
// accumulates into instead of overwriting) shows up as a non-finite value.
Mat poison(Index r, Index c) { return Mat::Constant(r, c, std::numeric_limits<float>::quiet_NaN()); }
Vec poison_vec(Index n) { return Vec::Constant(n, std::numeric_limits<float>::quiet_NaN()); }
VecD dbl(const Vec& v) { return v.cast<double>(); }
MatD as_row(const VecD& v) { return MatD(v.transpose()); }
MatD as_row(const Vec& v) { return MatD(v.cast<double>().transpose()); }
VecD as_vec(const MatD& m) { return Eigen::Map<const VecD>(m.data(), m.size()); }
MatD scalar(double x) { return MatD::Constant(1, 1, x); }

template <typename T>
MatD densify(const CsrT<T>& a) {
  MatD d = MatD::Zero(a.rows, a.cols);
  for (Index i = 0; i < a.rows; ++i)
    for (Index e = a.indptr[i]; e < a.indptr[i + 1]; ++e) d(i, a.indices[e]) += static_cast<double>(a.values[e]);
  return d;
}

// Makes sure a parallel code path (per-thread partial sums) really runs with >1 thread.
struct MinThreads {
  int saved;
  explicit MinThreads(int m) : saved(omp_get_max_threads()) {
    if (saved < m) omp_set_num_threads(m);
  }
  ~MinThreads() { omp_set_num_threads(saved); }
};

std::string num(double x) {  // 0.5 -> "0p5", for test names
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  std::string s;
  for (char c : std::string(buf)) s += c == '.' ? 'p' : (c == '-' ? 'm' : c);
  return s;
}

// ---- tolerances and the worst-error table -----------------------------------------------------
enum class TolKind {
  rel_norm,  // ||got - want|| / ||want||
  mixed,     // max_i |got_i - want_i| / (1 + |want_i|)   (elementwise abs + rel)
  absolute,  // max_i |got_i - want_i|   (0 = exact)
};
struct Tol {
  TolKind kind;
  double bound;
};
constexpr Tol rel_norm(double b) { return {TolKind::rel_norm, b}; }
constexpr Tol mixed(double b) { return {TolKind::mixed, b}; }
constexpr Tol absolute(double b) { return {TolKind::absolute, b}; }
const char* kind_name(TolKind k) {
  return k == TolKind::rel_norm ? "rel_norm" : k == TolKind::mixed ? "mixed" : "abs";
}

// Written per-op tolerances of the compare mode.
constexpr Tol kElementwise = mixed(1e-5);     // relu, dropout, losses, layernorm outputs
constexpr Tol kReduction = rel_norm(1e-4);    // GEMM, reductions over N, attention, sparse products
constexpr double kGradTol = 1e-6;             // finite differences, smooth elementwise / GEMM ops
constexpr double kGradTolAttn = 1e-6;         // finite differences through attention / normalisation
constexpr double kFdEps = 1e-6;

struct Worst {
  double err = -1, bound = 0;
  TolKind kind = TolKind::rel_norm;
  std::string where;
};
std::map<std::string, Worst>& worst_table() {
  static std::map<std::string, Worst> table;
  return table;
}
bool g_record = true;  // off while the harness tests itself

double measure(const MatD& got, const MatD& want, TolKind kind) {
  switch (kind) {
    case TolKind::rel_norm:
      return rel_err(got, want);
    case TolKind::mixed:
      return ((got - want).array().abs() / (1.0 + want.array().abs())).maxCoeff();
    case TolKind::absolute:
      return (got - want).array().abs().maxCoeff();
  }
  return 0;
}

void expect_close(const std::string& family, const std::string& where, const std::string& what, const MatD& got,
                  const MatD& want, Tol tol) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) {
    ADD_FAILURE() << where << " " << what << ": shape " << got.rows() << "x" << got.cols() << ", expected "
                  << want.rows() << "x" << want.cols();
    return;
  }
  if (got.size() == 0) return;
  if (!got.allFinite() || !want.allFinite()) {
    ADD_FAILURE() << where << " " << what << ": non-finite values (got finite " << got.allFinite()
                  << ", want finite " << want.allFinite() << ")";
    return;
  }
  const double err = measure(got, want, tol.kind);
  if (g_record) {
    Worst& w = worst_table()[family + "." + what];
    if (err > w.err) w = {err, tol.bound, tol.kind, where};
  }
  EXPECT_LE(err, tol.bound) << where << " " << what << " (" << kind_name(tol.kind) << "), |want| = " << want.norm();
}

class WorstErrorReport : public ::testing::Environment {
 public:
  void TearDown() override {
    if (worst_table().empty()) return;
    std::printf("\n[ op errors ] worst measured error per op output (bound, kind, case)\n");
    for (const auto& [key, w] : worst_table())
      std::printf("  %-40s %10.3e  <= %8.1e %-8s %s\n", key.c_str(), w.err, w.bound, kind_name(w.kind),
                  w.where.c_str());
  }
};
[[maybe_unused]] ::testing::Environment* const g_report =
    ::testing::AddGlobalTestEnvironment(new WorstErrorReport);

// ============================================================================================
// Mode 1: compare cpu (float32) against ref (double)
// ============================================================================================
struct Check {
  std::string what;
  MatD got, want;
  Tol tol;
};
struct CompareCase {
  std::string name, family;
  std::function<std::vector<Check>()> run;
};
void PrintTo(const CompareCase& c, std::ostream* os) { *os << c.name; }

void run_compare(const CompareCase& c) {
  const std::vector<Check> checks = c.run();
  ASSERT_FALSE(checks.empty()) << c.name << " compared nothing";
  for (const auto& ch : checks) expect_close(c.family, c.name, ch.what, ch.got, ch.want, ch.tol);
}

// ---- linear ----------------------------------------------------------------------------------
CompareCase linear_case(Index n, Index f, Index o, bool bias, bool with_dx, bool strided, std::uint64_t seed) {
  std::string name = "linear_N" + std::to_string(n) + "_F" + std::to_string(f) + "_O" + std::to_string(o);
  if (!bias) name += "_nobias";
  if (!with_dx) name += "_nodx";
  if (strided) name += "_stridedx";
  return {name, "linear", [=] {
            MinThreads threads(2);
            Rng r(seed);
            // strided: x is a column block of a wider matrix (an Eigen::Ref with an outer stride)
            const Mat xbig = r.mat(n, f + (strided ? 3 : 0));
            const auto x = xbig.middleCols(strided ? 1 : 0, f);
            const Mat w = r.mat(o, f), dy = r.mat(n, o), dw0 = r.mat(o, f);
            const Vec b = r.vec(o), db0 = r.vec(o);
            const MatD xd = dbl(Mat(x));
            std::vector<Check> out;

            Mat y = poison(n, o);
            cpu::linear_fwd(x, w, bias ? b.data() : nullptr, y);
            MatD yr;
            ref::linear_fwd(xd, dbl(w), bias ? dbl(b) : VecD(), yr);
            out.push_back({"y", dbl(y), yr, kReduction});

            // dx overwritten (prefilled with garbage of the wrong shape), dw/db accumulated onto a base
            Mat dx = poison(n, f), dw = dw0;
            Vec db = db0;
            cpu::linear_bwd(x, w, dy, with_dx ? &dx : nullptr, dw, bias ? db.data() : nullptr);
            MatD dxr, dwr = dbl(dw0);
            VecD dbr = dbl(db0);
            ref::linear_bwd(xd, dbl(w), dbl(dy), with_dx ? &dxr : nullptr, dwr, bias ? &dbr : nullptr);
            if (with_dx) out.push_back({"dx", dbl(dx), dxr, kReduction});
            out.push_back({"dw_accumulated", dbl(dw), dwr, kReduction});
            if (bias) out.push_back({"db_accumulated", as_row(db), as_row(dbr), kReduction});

            // accumulate semantics: two calls from zero give twice one reference call
            Mat dw2 = Mat::Zero(o, f), dw1 = Mat::Zero(o, f);
            Vec db2 = Vec::Zero(o), db1 = Vec::Zero(o);
            for (int rep = 0; rep < 2; ++rep) cpu::linear_bwd(x, w, dy, nullptr, dw2, bias ? db2.data() : nullptr);
            cpu::linear_bwd(x, w, dy, nullptr, dw1, bias ? db1.data() : nullptr);
            MatD dwz = MatD::Zero(o, f);
            VecD dbz = VecD::Zero(o);
            ref::linear_bwd(xd, dbl(w), dbl(dy), nullptr, dwz, &dbz);
            out.push_back({"dw_twice", dbl(dw2), 2.0 * dwz, kReduction});
            // dW as a view into a flat gradient buffer (as the model passes it): only its own
            // slots change, by exactly the same amount
            {
              const Index guard = 5, size = o * f;
              std::vector<float> flat(static_cast<size_t>(size + 2 * guard), 3.0f);
              MatMap view(flat.data() + guard, o, f);
              view = dw0;
              Vec dbf = db0;
              cpu::linear_bwd(x, w, dy, nullptr, view, bias ? dbf.data() : nullptr);
              out.push_back({"dw_flat_buffer_view", dbl(Mat(view)), dbl(dw), absolute(0)});
              Index touched = 0;
              for (Index i = 0; i < guard; ++i) touched += (flat[i] != 3.0f) + (flat[guard + size + i] != 3.0f);
              out.push_back({"dw_flat_buffer_guards", scalar(static_cast<double>(touched)), scalar(0), absolute(0)});
            }
            out.push_back({"dw_twice_vs_2x_once", dbl(dw2), 2.0 * dbl(dw1), rel_norm(1e-6)});
            if (bias) {
              out.push_back({"db_twice", as_row(db2), as_row(VecD(2.0 * dbz)), kReduction});
              out.push_back({"db_twice_vs_2x_once", as_row(db2), as_row(Vec(2.0f * db1)), rel_norm(1e-6)});
            }
            return out;
          }};
}

// ---- a^T b over tall matrices (per-thread partial products for N >= 2048) -------------------------
CompareCase tn_product_case(Index n, Index p, Index q, bool strided, std::uint64_t seed) {
  return {"tn_product_N" + std::to_string(n) + "_P" + std::to_string(p) + "_Q" + std::to_string(q) +
              (strided ? "_strided" : ""),
          "tn_product", [=] {
            MinThreads threads(2);
            Rng r(seed);
            const Mat abig = r.mat(n, p + (strided ? 5 : 0)), b = r.mat(n, q);
            const auto a = abig.middleCols(strided ? 2 : 0, p);
            Mat out = poison(p, q);
            cpu::tn_product(a, b, out);
            return std::vector<Check>{{"out", dbl(out), MatD(dbl(Mat(a)).transpose() * dbl(b)), kReduction}};
          }};
}

// ---- linear with a sparse input --------------------------------------------------------------
CompareCase linear_sparse_case(Index n, Index f, Index o, double density, bool bias, std::uint64_t seed) {
  std::string name = "linear_sparse_N" + std::to_string(n) + "_F" + std::to_string(f) + "_O" + std::to_string(o);
  if (!bias) name += "_nobias";
  return {name, "linear_sparse", [=] {
            MinThreads threads(2);
            Rng r(seed);
            Mat xdense = Mat::Zero(n, f);
            for (Index i = 0; i < n; ++i) {
              if (i == 1) continue;  // an empty row
              for (Index j = 1; j + 1 < f; ++j)  // features 0 and f-1 never present
                if (r.uni(0, 1) < density) xdense(i, j) = static_cast<float>(r.uni(-1, 1));
            }
            const Csr xs = test::dense_to_csr(xdense), xt = csr_transpose(xs);
            const CsrD xsd = test::to_double(xs);
            const Mat w = r.mat(o, f), dy = r.mat(n, o), dw0 = r.mat(o, f);
            const Vec b = r.vec(o), db0 = r.vec(o);
            std::vector<Check> out;
            out.push_back({"density", scalar(static_cast<double>(xs.nnz()) / static_cast<double>(n * f)),
                           scalar(density * static_cast<double>(f - 2) / f * (n - 1) / n), absolute(0.01)});

            Mat y = poison(n, o);
            cpu::linear_sparse_fwd(xs, w, bias ? b.data() : nullptr, y);
            MatD yr, yd;
            ref::linear_sparse_fwd(xsd, dbl(w), bias ? dbl(b) : VecD(), yr);
            ref::linear_fwd(dbl(xdense), dbl(w), bias ? dbl(b) : VecD(), yd);
            out.push_back({"y", dbl(y), yr, kReduction});
            out.push_back({"ref_sparse_vs_ref_dense", yr, yd, rel_norm(1e-13)});

            Mat dw = dw0;
            Vec db = db0;
            cpu::linear_sparse_bwd(xt, dy, dw, bias ? db.data() : nullptr);
            MatD dwr = dbl(dw0);
            VecD dbr = dbl(db0);
            ref::linear_sparse_bwd(xsd, dbl(dy), dwr, bias ? &dbr : nullptr);
            out.push_back({"dw_accumulated", dbl(dw), dwr, kReduction});
            out.push_back({"dw_absent_feature_untouched", dbl(Mat(dw.col(0))), dbl(Mat(dw0.col(0))), absolute(0)});
            if (bias) out.push_back({"db_accumulated", as_row(db), as_row(dbr), kReduction});
            // and against the dense weight gradient dy^T x
            MatD dwd = MatD::Zero(o, f);
            ref::linear_bwd(dbl(xdense), dbl(w), dbl(dy), nullptr, dwd, nullptr);
            out.push_back({"ref_dw_sparse_vs_dense", MatD(dwr - dbl(dw0)), dwd, rel_norm(1e-13)});
            return out;
          }};
}

// ---- layernorm ---------------------------------------------------------------------------------
CompareCase layernorm_case(Index n, Index d, std::uint64_t seed) {
  return {"layernorm_N" + std::to_string(n) + "_D" + std::to_string(d), "layernorm", [=] {
            MinThreads threads(2);
            Rng r(seed);
            Mat x = r.mat(n, d);
            for (Index i = 0; i < n; ++i) x.row(i) = x.row(i) * static_cast<float>(r.uni(0.2, 3)) +
                                                     Eigen::RowVectorXf::Constant(d, static_cast<float>(r.uni(-4, 4)));
            const Vec gamma = r.vec(d, 0.5, 1.5), beta = r.vec(d, -0.5, 0.5), dg0 = r.vec(d), db0 = r.vec(d);
            const Mat dy = r.mat(n, d);
            const float eps = 1e-5f;
            std::vector<Check> out;

            Mat y = poison(n, d), xhat = poison(n, d);
            Vec rstd = poison_vec(n);
            cpu::layernorm_fwd(x, gamma.data(), beta.data(), eps, y, xhat, rstd);
            MatD yr, xhr;
            ref::layernorm_fwd(dbl(x), dbl(gamma), dbl(beta), eps, yr);
            ref::layernorm_fwd(dbl(x), VecD::Ones(d), VecD::Zero(d), eps, xhr);
            VecD rstd_r(n);
            for (Index i = 0; i < n; ++i) {
              const VecD row = dbl(Mat(x.row(i))).transpose();
              const double mean = row.mean();
              rstd_r[i] = 1.0 / std::sqrt((row.array() - mean).square().mean() + eps);
            }
            out.push_back({"y", dbl(y), yr, kElementwise});
            out.push_back({"xhat", dbl(xhat), xhr, kElementwise});
            out.push_back({"rstd", as_row(rstd), as_row(rstd_r), kElementwise});

            Mat dx = poison(n, d);
            Vec dg = dg0, db = db0;
            cpu::layernorm_bwd(xhat, rstd, gamma.data(), dy, dx, dg.data(), db.data());
            MatD dxr;
            VecD dgr = dbl(dg0), dbr = dbl(db0);
            ref::layernorm_bwd(dbl(x), dbl(gamma), eps, dbl(dy), dxr, dgr, dbr);
            out.push_back({"dx", dbl(dx), dxr, kReduction});
            out.push_back({"dgamma_accumulated", as_row(dg), as_row(dgr), kReduction});
            out.push_back({"dbeta_accumulated", as_row(db), as_row(dbr), kReduction});
            return out;
          }};
}

// ---- relu --------------------------------------------------------------------------------------
CompareCase relu_case(Index n, Index c, std::uint64_t seed) {
  return {"relu_N" + std::to_string(n) + "_C" + std::to_string(c), "relu", [=] {
            Rng r(seed);
            Mat x = r.mat(n, c);
            for (Index i = 0; i < x.size(); i += 7) x.data()[i] = 0.0f;  // exact zeros: not > 0
            const Mat dy = r.mat(n, c);
            std::vector<Check> out;
            Mat y = x;
            cpu::relu_inplace(y);
            MatD yr;
            ref::relu_fwd(dbl(x), yr);
            out.push_back({"y", dbl(y), yr, absolute(0)});
            Mat d = dy;
            cpu::relu_bwd_inplace(y, d);
            MatD dr;
            ref::relu_bwd(yr, dbl(dy), dr);
            out.push_back({"dx", dbl(d), dr, absolute(0)});
            return out;
          }};
}

// ---- dropout -----------------------------------------------------------------------------------
CompareCase dropout_case(float p, std::uint64_t seed) {
  return {"dropout_p" + num(p) + "_seed" + std::to_string(seed), "dropout", [=] {
            const Index rows = 200, cols = 500;  // 1e5 elements
            Rng r(seed * 31 + 7);
            const Mat x = r.mat(rows, cols, 0.5, 1.5);  // never 0: a zero output means dropped
            const Mat g = r.mat(rows, cols);
            std::vector<Check> out;

            Mat y = x;
            std::vector<std::uint8_t> keep;
            cpu::dropout_fwd(y, p, seed, keep);
            if (keep.size() != static_cast<size_t>(x.size())) {
              ADD_FAILURE() << "keep has " << keep.size() << " entries, expected " << x.size();
              return out;
            }
            Index kept = 0, bad_flag = 0, zero_mismatch = 0;
            for (Index i = 0; i < x.size(); ++i) {
              kept += keep[i] == 1;
              bad_flag += keep[i] > 1;
              zero_mismatch += (y.data()[i] == 0.0f) != (keep[i] == 0);
            }
            const double n = static_cast<double>(x.size());
            // binomial std at p = 0.5: 0.0016; 0.01 is > 6 sigma
            out.push_back({"kept_fraction", scalar(kept / n), scalar(1.0 - p), absolute(0.01)});
            out.push_back({"keep_flags_are_0_or_1", scalar(static_cast<double>(bad_flag)), scalar(0), absolute(0)});
            out.push_back(
                {"zero_iff_dropped", scalar(static_cast<double>(zero_mismatch)), scalar(0), absolute(0)});
            Index same_as_next = 0;
            for (size_t i = 0; i + 1 < keep.size(); ++i) same_as_next += keep[i] == keep[i + 1];
            out.push_back({"adjacent_elements_independent", scalar(same_as_next / (n - 1)),
                           scalar(p * p + (1.0 - p) * (1.0 - p)), absolute(0.01)});
            MatD yr;
            ref::dropout_apply(keep, p, dbl(x), yr);  // kept scaled by 1/(1-p), dropped 0
            out.push_back({"y_vs_ref_apply", dbl(y), yr, mixed(1e-6)});

            // same seed: the same mask, whatever the number of threads
            Mat y2 = x;
            std::vector<std::uint8_t> keep2;
            cpu::dropout_fwd(y2, p, seed, keep2);
            Mat y1 = x;
            std::vector<std::uint8_t> keep1;
            {
              const int saved = omp_get_max_threads();
              omp_set_num_threads(1);
              cpu::dropout_fwd(y1, p, seed, keep1);
              omp_set_num_threads(saved);
            }
            out.push_back({"same_seed_same_mask", scalar(keep2 == keep ? 1 : 0), scalar(1), absolute(0)});
            out.push_back({"one_thread_same_mask", scalar(keep1 == keep ? 1 : 0), scalar(1), absolute(0)});
            out.push_back({"same_seed_same_output", dbl(y2), dbl(y), absolute(0)});

            // another seed: an independent mask, disagreeing on a fraction 2p(1-p)
            Mat y3 = x;
            std::vector<std::uint8_t> keep3;
            cpu::dropout_fwd(y3, p, seed + 1, keep3);
            Index differ = 0;
            for (size_t i = 0; i < keep.size(); ++i) differ += keep[i] != keep3[i];
            out.push_back(
                {"other_seed_disagreement", scalar(differ / n), scalar(2.0 * p * (1.0 - p)), absolute(0.01)});

            // backward: the same mask and scale, i.e. ref::dropout_apply on the gradient
            Mat dg = g;
            cpu::dropout_bwd(dg, p, keep);
            MatD dgr;
            ref::dropout_apply(keep, p, dbl(g), dgr);
            out.push_back({"dx_vs_ref_apply", dbl(dg), dgr, mixed(1e-6)});
            return out;
          }};
}

// ---- DIFFormer-s attention -----------------------------------------------------------------------
// vcols < 0: one value head per attention head (V [N, H*D]); else V has vcols columns, shared by all
// heads (the use_weight=off model: V = h with D columns).
std::string value_tag(Index vcols, Index d) {
  return vcols < 0 ? "_vPerHead" : (vcols == d ? "_vShared" : "_vShared" + std::to_string(vcols));
}

// [N, H*Dv]: v repeated for every head when it is shared (one value head)
MatD value_per_head(const MatD& v, int heads, bool shared) { return shared ? MatD(v.replicate(1, heads)) : v; }

// zero_rows: one q row-head and one k row-head exactly zero (node norm: the 1e-12 clamp of
// torch.nn.functional.normalize, whose backward has no projection term)
CompareCase simple_attn_case(Index n, int heads, Index d, Index vcols, QkNorm norm, std::uint64_t seed,
                             bool zero_rows = false) {
  const std::string name = "simple_attn_N" + std::to_string(n) + "_H" + std::to_string(heads) + "_D" +
                           std::to_string(d) + value_tag(vcols, d) +
                           (norm == QkNorm::global ? "_globalnorm" : "_nodenorm") + (zero_rows ? "_zerorows" : "");
  return {name, "simple_attn", [=] {
            MinThreads threads(2);
            Rng r(seed);
            Mat q = r.mat(n, heads * d, -0.5, 1.0), k = r.mat(n, heads * d, -0.5, 1.0);
            if (zero_rows) {
              q.row(2).segment((heads - 1) * d, d).setZero();
              k.row(3).segment(0, d).setZero();
            }
            const Mat v = r.mat(n, vcols < 0 ? heads * d : vcols);
            std::vector<Check> out;
            const Index dv_cols = vcols < 0 ? d : vcols;
            Mat a = poison(n, heads * dv_cols);
            SimpleAttnState st;
            st.kv = poison(heads * d, dv_cols);
            st.ks = poison(heads, d);
            st.vs = poison(heads, dv_cols);
            st.den = poison(n, heads);
            cpu::simple_attn_fwd(q, k, v, heads, norm, a, st);
            MatD ar;
            SimpleAttnStateD sr;
            ref::simple_attn_fwd(dbl(q), dbl(k), dbl(v), heads, norm, ar, sr);
            out.push_back({"a", dbl(a), ar, kReduction});
            out.push_back({"state_den", dbl(st.den), sr.den, kReduction});
            out.push_back({"state_kv", dbl(st.kv), sr.kv, kReduction});

            const Mat da = r.mat(n, a.cols());
            Mat dq = poison(n, q.cols()), dk = poison(n, k.cols()), dv = poison(n, v.cols());
            cpu::simple_attn_bwd(v, heads, a, st, da, dq, dk, dv);
            MatD dqr, dkr, dvr;
            ref::simple_attn_bwd(dbl(v), heads, ar, sr, dbl(da), dqr, dkr, dvr);
            if (n == 1) {
              // one instance attends only to itself: a = v and a does not depend on q, k
              out.push_back({"a_single_node_equals_v", dbl(a), value_per_head(dbl(v), heads, vcols >= 0), rel_norm(1e-6)});
              out.push_back({"dq_single_node_zero", dbl(dq), MatD::Zero(n, q.cols()), absolute(1e-6)});
              out.push_back({"dk_single_node_zero", dbl(dk), MatD::Zero(n, k.cols()), absolute(1e-6)});
            } else {
              out.push_back({"dq", dbl(dq), dqr, kReduction});
              out.push_back({"dk", dbl(dk), dkr, kReduction});
            }
            out.push_back({"dv", dbl(dv), dvr, kReduction});
            return out;
          }};
}

// ---- DIFFormer-a attention -----------------------------------------------------------------------
// scale: q, k uniform in [-scale, scale] (scale 3, D 8: logits of several units, saturated sigmoids)
CompareCase sigmoid_attn_case(Index n, int heads, Index d, Index vcols, std::uint64_t seed, double scale = 1.0) {
  const std::string name = "sigmoid_attn_N" + std::to_string(n) + "_H" + std::to_string(heads) + "_D" +
                           std::to_string(d) + value_tag(vcols, d) + (scale != 1.0 ? "_scale" + num(scale) : "");
  return {name, "sigmoid_attn", [=] {
            Rng r(seed);
            const Mat q = r.mat(n, heads * d, -scale, scale), k = r.mat(n, heads * d, -scale, scale);
            const Mat v = r.mat(n, vcols < 0 ? heads * d : vcols);
            std::vector<Check> out;
            Mat a = poison(n, heads * (vcols < 0 ? d : vcols)), rowsum = poison(n, heads);
            cpu::sigmoid_attn_fwd(q, k, v, heads, a, rowsum);
            MatD ar, rr;
            ref::sigmoid_attn_fwd(dbl(q), dbl(k), dbl(v), heads, ar, rr);
            out.push_back({"a", dbl(a), ar, kReduction});
            out.push_back({"rowsum", dbl(rowsum), rr, kReduction});

            const Mat da = r.mat(n, a.cols());
            Mat dq = poison(n, q.cols()), dk = poison(n, k.cols()), dv = poison(n, v.cols());
            cpu::sigmoid_attn_bwd(q, k, v, heads, a, rowsum, da, dq, dk, dv);
            MatD dqr, dkr, dvr;
            ref::sigmoid_attn_bwd(dbl(q), dbl(k), dbl(v), heads, ar, rr, dbl(da), dqr, dkr, dvr);
            if (n == 1) {
              // one instance attends only to itself: a = v and a does not depend on q, k
              out.push_back({"a_single_node_equals_v", dbl(a), value_per_head(dbl(v), heads, vcols >= 0), rel_norm(1e-6)});
              out.push_back({"dq_single_node_zero", dbl(dq), MatD::Zero(n, q.cols()), absolute(1e-6)});
              out.push_back({"dk_single_node_zero", dbl(dk), MatD::Zero(n, k.cols()), absolute(1e-6)});
            } else {
              out.push_back({"dq", dbl(dq), dqr, kReduction});
              out.push_back({"dk", dbl(dk), dkr, kReduction});
            }
            out.push_back({"dv", dbl(dv), dvr, kReduction});
            return out;
          }};
}

// ---- graph propagation ---------------------------------------------------------------------------
// Random directed graph: node 0 has in-degree 0 and is the source of three edges (its coefficients
// are inf * w -> 0), the first edges are repeated (duplicates are separate terms), weights random.
struct EdgeList {
  Index n = 0;
  std::vector<std::int64_t> src, dst;
  std::vector<float> w;
};
EdgeList random_graph(Index n, Index e, std::uint64_t seed) {
  Rng r(seed);
  EdgeList g;
  g.n = n;
  auto add = [&](std::int64_t s, std::int64_t t) {
    g.src.push_back(s);
    g.dst.push_back(t);
    g.w.push_back(static_cast<float>(r.uni(0.2, 2.0)));
  };
  add(0, 1);
  add(0, 2);
  add(0, n - 1);
  for (Index i = 0; i < e; ++i) add(r.integer(0, n - 1), r.integer(1, n - 1));
  for (Index i = 0; i < 6; ++i) add(g.src[3 + i], g.dst[3 + i]);  // duplicated edges
  for (Index i = 1; i < n; i += 3) add(i, i);                         // some self-loops (not on node 0)
  return g;
}

// adj coefficient of every edge, by hand from SPEC: w / sqrt(d_dst d_src), 0 where d_src = 0
std::vector<double> hand_coeffs(const EdgeList& g, bool weighted) {
  std::vector<double> indeg(static_cast<size_t>(g.n), 0.0), c(g.src.size());
  for (auto t : g.dst) indeg[t] += 1;
  for (size_t e = 0; e < g.src.size(); ++e) {
    const double dd = indeg[g.dst[e]], ds = indeg[g.src[e]];
    c[e] = ds == 0 ? 0.0 : (weighted ? g.w[e] : 1.0) / std::sqrt(dd * ds);
  }
  return c;
}

CompareCase graph_case(Index n, Index e, bool weighted, std::uint64_t seed) {
  return {"graph_prop_N" + std::to_string(n) + "_E" + std::to_string(e) + (weighted ? "_weighted" : ""),
          "graph_prop", [=] {
            const EdgeList g = random_graph(n, e, seed);
            const std::vector<double> c = hand_coeffs(g, weighted);
            const GraphOp opf = make_graph_op<float>(n, g.src, g.dst, weighted ? &g.w : nullptr);
            const GraphOpD opd = make_graph_op<double>(n, g.src, g.dst, weighted ? &g.w : nullptr);
            Rng r(seed + 99);
            const Index width = 6;
            const Mat v = r.mat(n, width), gout = r.mat(n, width);
            std::vector<Check> out;
            out.push_back({"nnz", scalar(static_cast<double>(opf.adj.nnz())),
                           scalar(static_cast<double>(g.src.size())), absolute(0)});
            out.push_back({"zero_in_degree_row_empty", scalar(static_cast<double>(opd.adj.indptr[1] - opd.adj.indptr[0])),
                           scalar(0), absolute(0)});
            // forward and backward expected from the edge list
            MatD fwd = MatD::Zero(n, width), bwd = MatD::Zero(n, width);
            for (size_t k = 0; k < g.src.size(); ++k) {
              fwd.row(g.dst[k]) += c[k] * dbl(v).row(g.src[k]);
              bwd.row(g.src[k]) += c[k] * dbl(gout).row(g.dst[k]);
            }
            if (n <= 200) {  // dense views of the operator
              MatD hand = MatD::Zero(n, n);
              for (size_t k = 0; k < g.src.size(); ++k) hand(g.dst[k], g.src[k]) += c[k];
              out.push_back({"adj_double_vs_hand", densify(opd.adj), hand, mixed(1e-14)});
              out.push_back({"adj_float_vs_hand", densify(opf.adj), hand, mixed(1e-7)});
              out.push_back({"adj_t_is_transpose", densify(opd.adj_t), MatD(densify(opd.adj).transpose()), absolute(0)});
              out.push_back({"adj_t_float_is_transpose", densify(opf.adj_t), MatD(densify(opf.adj).transpose()),
                             absolute(0)});
            }
            Mat gf = poison(n, width);
            cpu::graph_prop(opf.adj, v, gf);
            {  // v as a column block of a wider matrix (an Eigen::Ref with an outer stride)
              Mat vbig = Mat::Zero(n, width + 4);
              vbig.middleCols(3, width) = v;
              Mat gs = poison(n, width);
              cpu::graph_prop(opf.adj, vbig.middleCols(3, width), gs);
              out.push_back({"g_strided_v", dbl(gs), dbl(gf), absolute(0)});
            }
            MatD gr;
            ref::graph_prop(opd.adj, dbl(v), gr);
            out.push_back({"g", dbl(gf), gr, kReduction});
            out.push_back({"g_vs_edge_list", dbl(gf), fwd, kReduction});
            out.push_back({"ref_g_vs_edge_list", gr, fwd, rel_norm(1e-14)});
            out.push_back({"g_zero_in_degree_row", dbl(Mat(gf.row(0))), MatD::Zero(1, width), absolute(0)});
            // backward of g = adj v: dv = adj^T dg, through adj_t
            Mat dvf = poison(n, width);
            cpu::graph_prop(opf.adj_t, gout, dvf);
            MatD dvr;
            ref::graph_prop(opd.adj_t, dbl(gout), dvr);
            out.push_back({"dv", dbl(dvf), dvr, kReduction});
            out.push_back({"dv_vs_edge_list", dbl(dvf), bwd, kReduction});
            return out;
          }};
}

// ---- losses -------------------------------------------------------------------------------------
enum class LossKind { cross_entropy, bce, mse };

CompareCase loss_case(LossKind kind, Index n, Index c, Index m, double scale, std::uint64_t seed) {
  const char* fam = kind == LossKind::cross_entropy ? "cross_entropy" : kind == LossKind::bce ? "bce_with_logits" : "mse";
  return {std::string(fam) + "_N" + std::to_string(n) + "_C" + std::to_string(c) + "_idx" + std::to_string(m) +
              "_scale" + num(scale),
          fam, [=] {
            Rng r(seed);
            const Mat logits = r.mat(n, c, -scale, scale);
            const std::vector<std::int64_t> idx = r.subset(n, m);
            std::vector<Check> out;
            Mat dl = poison(n, c);  // must be overwritten everywhere, zero outside idx
            MatD dlr;
            double loss = 0, loss_r = 0;
            if (kind == LossKind::cross_entropy) {
              std::vector<std::int64_t> y(static_cast<size_t>(n));
              for (auto& t : y) t = r.integer(0, c - 1);
              loss = cpu::cross_entropy(logits, y, idx, dl);
              loss_r = ref::cross_entropy(dbl(logits), y, idx, dlr);
            } else if (kind == LossKind::bce) {
              Mat y = r.mat(n, c, 0, 1);
              for (Index i = 0; i < y.size(); ++i)  // hard labels, with some soft targets
                if (i % 5 != 0) y.data()[i] = y.data()[i] < 0.5f ? 0.0f : 1.0f;
              loss = cpu::bce_with_logits(logits, y, idx, dl);
              loss_r = ref::bce_with_logits(dbl(logits), dbl(y), idx, dlr);
            } else {
              const Mat y = r.mat(n, c, -scale, scale);
              loss = cpu::mse(logits, y, idx, dl);
              loss_r = ref::mse(dbl(logits), dbl(y), idx, dlr);
            }
            out.push_back({"loss", scalar(loss), scalar(loss_r), kElementwise});
            // gradients are O(1/|idx|): relative checks
            out.push_back({"dlogits", dbl(dl), dlr, rel_norm(1e-5)});
            MatD scaled = dbl(dl) * static_cast<double>(m), scaled_r = dlr * static_cast<double>(m);
            out.push_back({"dlogits_times_idx", scaled, scaled_r, kElementwise});
            std::vector<bool> in(static_cast<size_t>(n), false);
            for (auto i : idx) in[i] = true;
            MatD outside = MatD::Zero(1, 1), outside_r = MatD::Zero(1, 1);
            for (Index i = 0; i < n; ++i)
              if (!in[i]) {
                outside(0, 0) += dl.row(i).cwiseAbs().sum();
                outside_r(0, 0) += dlr.row(i).cwiseAbs().sum();
              }
            out.push_back({"dlogits_outside_idx_zero", outside, scalar(0), absolute(0)});
            out.push_back({"ref_dlogits_outside_idx_zero", outside_r, scalar(0), absolute(0)});
            return out;
          }};
}

std::vector<CompareCase> compare_cases() {
  std::vector<CompareCase> c;
  // linear: small, the N >= 2048 parallel dW path, no dx, no bias, a strided (Ref) input
  c.push_back(linear_case(7, 5, 3, true, true, false, 1));
  c.push_back(linear_case(64, 33, 17, true, true, false, 2));
  c.push_back(linear_case(64, 33, 17, false, true, false, 3));
  c.push_back(linear_case(64, 33, 17, true, false, false, 4));
  c.push_back(linear_case(50, 12, 8, true, true, true, 5));
  c.push_back(linear_case(3000, 24, 16, true, true, false, 6));
  c.push_back(linear_case(3000, 24, 16, false, false, false, 7));
  c.push_back(tn_product_case(10, 4, 3, false, 8));
  c.push_back(tn_product_case(5000, 8, 8, false, 9));
  c.push_back(tn_product_case(5000, 16, 1, true, 10));
  // sparse input, ~5% density
  c.push_back(linear_sparse_case(400, 150, 12, 0.05, true, 11));
  c.push_back(linear_sparse_case(400, 150, 12, 0.05, false, 12));
  c.push_back(linear_sparse_case(3000, 300, 16, 0.05, true, 13));
  c.push_back(layernorm_case(64, 33, 21));
  c.push_back(layernorm_case(3000, 64, 22));
  c.push_back(layernorm_case(5, 1, 23));  // one feature: xhat = 0, y = beta
  c.push_back(relu_case(1000, 17, 31));
  for (float p : {0.0f, 0.2f, 0.5f, 0.9f, 1.0f}) c.push_back(dropout_case(p, 1234));
  c.push_back(dropout_case(0.5f, 987654321ULL));
  // simple attention: qk_norm global and node, heads 1 and 3, per-head and shared values,
  // N small, medium and > 2048 (per-thread partial reductions)
  for (QkNorm norm : {QkNorm::global, QkNorm::node})
    for (Index n : {Index{1}, Index{5}, Index{97}, Index{5000}}) {
      const std::uint64_t s = 40 + static_cast<std::uint64_t>(n) + (norm == QkNorm::node ? 7 : 0);
      c.push_back(simple_attn_case(n, 1, 8, -1, norm, s));
      c.push_back(simple_attn_case(n, 3, 8, -1, norm, s + 1));
      c.push_back(simple_attn_case(n, 3, 8, 8, norm, s + 2));
      if (n == 97) c.push_back(simple_attn_case(n, 1, 8, 5, norm, s + 3));
    }
  c.push_back(simple_attn_case(97, 3, 8, -1, QkNorm::node, 55, true));
  c.push_back(simple_attn_case(97, 3, 8, 8, QkNorm::node, 56, true));
  // sigmoid attention: N not a multiple of the 128-query / 256-key blocks
  for (Index n : {Index{1}, Index{7}, Index{300}, Index{1000}}) {
    const std::uint64_t s = 60 + static_cast<std::uint64_t>(n);
    c.push_back(sigmoid_attn_case(n, 1, 8, -1, s));
    c.push_back(sigmoid_attn_case(n, 2, 8, -1, s + 1));
    c.push_back(sigmoid_attn_case(n, 2, 8, 8, s + 2));
    if (n == 300) c.push_back(sigmoid_attn_case(n, 1, 8, 5, s + 3));
  }
  c.push_back(sigmoid_attn_case(300, 2, 8, -1, 65, 3.0));
  c.push_back(graph_case(50, 300, true, 71));
  c.push_back(graph_case(50, 300, false, 72));
  c.push_back(graph_case(3000, 30000, true, 73));
  for (double scale : {3.0, 30.0}) {
    c.push_back(loss_case(LossKind::cross_entropy, 40, 7, 15, scale, 81));
    c.push_back(loss_case(LossKind::bce, 40, 5, 15, scale, 82));
    c.push_back(loss_case(LossKind::mse, 40, 3, 15, scale, 83));
  }
  c.push_back(loss_case(LossKind::cross_entropy, 40, 7, 40, 3.0, 84));  // every row
  return c;
}

class OpCompare : public ::testing::TestWithParam<CompareCase> {};
TEST_P(OpCompare, CpuMatchesRef) { run_compare(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Ops, OpCompare, ::testing::ValuesIn(compare_cases()),
                         [](const auto& info) { return info.param.name; });

// ============================================================================================
// Mode 2: gradient check of every ref backward by central differences of the ref forward
// ============================================================================================
using MatDs = std::vector<MatD>;
struct GradCase {
  std::string name, family;
  std::vector<std::string> input_names;
  MatDs inputs;  // every input is perturbed
  std::function<MatDs(const MatDs&)> fwd;
  std::function<MatDs(const MatDs& inputs, const MatDs& dout)> bwd;  // one gradient per input
  double tol = kGradTol;
};
void PrintTo(const GradCase& c, std::ostream* os) { *os << c.name; }

double functional(const MatDs& out, const MatDs& g) {
  double s = 0;
  for (size_t k = 0; k < out.size(); ++k) s += (out[k].array() * g[k].array()).sum();
  return s;
}

void run_gradcheck(const GradCase& c) {
  Rng r(0x5eed);
  MatDs in = c.inputs;
  const MatDs out = c.fwd(in);
  MatDs g;
  for (const auto& o : out) g.push_back(r.matd(o.rows(), o.cols()));
  const MatDs grads = c.bwd(in, g);
  ASSERT_EQ(grads.size(), in.size()) << c.name;
  for (size_t t = 0; t < in.size(); ++t) {
    MatD fd(in[t].rows(), in[t].cols());
    for (Index e = 0; e < in[t].size(); ++e) {
      const double x0 = in[t].data()[e], h = kFdEps * std::max(1.0, std::abs(x0));
      in[t].data()[e] = x0 + h;
      const double lp = functional(c.fwd(in), g);
      in[t].data()[e] = x0 - h;
      const double lm = functional(c.fwd(in), g);
      in[t].data()[e] = x0;
      fd.data()[e] = (lp - lm) / (2 * h);
    }
    EXPECT_GT(fd.norm(), 0.0) << c.name << " d" << c.input_names[t] << ": the functional does not depend on it";
    expect_close(c.family + "_gradcheck", c.name, "d" + c.input_names[t], grads[t], fd, rel_norm(c.tol));
  }
}

GradCase linear_grad(bool bias) {
  Rng r(101);
  GradCase c{bias ? "linear" : "linear_nobias", "linear", {"x", "w"}, {r.matd(5, 4), r.matd(3, 4)}, {}, {}};
  if (bias) {
    c.input_names.push_back("b");
    c.inputs.push_back(r.matd(1, 3));
  }
  c.fwd = [bias](const MatDs& in) {
    MatD y;
    ref::linear_fwd(in[0], in[1], bias ? as_vec(in[2]) : VecD(), y);
    return MatDs{y};
  };
  c.bwd = [bias](const MatDs& in, const MatDs& g) {
    MatD dx, dw = MatD::Zero(in[1].rows(), in[1].cols());
    VecD db = VecD::Zero(in[1].rows());
    ref::linear_bwd(in[0], in[1], g[0], &dx, dw, bias ? &db : nullptr);
    MatDs out{dx, dw};
    if (bias) out.push_back(as_row(db));
    return out;
  };
  return c;
}

GradCase linear_sparse_grad() {
  Rng r(102);
  MatD xd = MatD::Zero(6, 10);
  for (Index i = 0; i < xd.size(); ++i)
    if (r.uni(0, 1) < 0.3) xd.data()[i] = r.uni(-1, 1);
  const CsrD x = test::to_double(test::dense_to_csr(xd.cast<float>()));
  GradCase c{"linear_sparse", "linear_sparse", {"w", "b"}, {r.matd(3, 10), r.matd(1, 3)}, {}, {}};
  c.fwd = [x](const MatDs& in) {
    MatD y;
    ref::linear_sparse_fwd(x, in[0], as_vec(in[1]), y);
    return MatDs{y};
  };
  c.bwd = [x](const MatDs& in, const MatDs& g) {
    MatD dw = MatD::Zero(in[0].rows(), in[0].cols());
    VecD db = VecD::Zero(in[0].rows());
    ref::linear_sparse_bwd(x, g[0], dw, &db);
    return MatDs{dw, as_row(db)};
  };
  return c;
}

GradCase layernorm_grad() {
  Rng r(103);
  MatD x = r.matd(5, 7);
  for (Index i = 0; i < x.rows(); ++i) x.row(i).array() = x.row(i).array() * r.uni(0.3, 2) + r.uni(-3, 3);
  GradCase c{"layernorm", "layernorm", {"x", "gamma", "beta"}, {x, r.matd(1, 7, 0.5, 1.5), r.matd(1, 7)}, {}, {}};
  const double eps = 1e-5;
  c.fwd = [eps](const MatDs& in) {
    MatD y;
    ref::layernorm_fwd(in[0], as_vec(in[1]), as_vec(in[2]), eps, y);
    return MatDs{y};
  };
  c.bwd = [eps](const MatDs& in, const MatDs& g) {
    MatD dx;
    VecD dg = VecD::Zero(in[0].cols()), db = VecD::Zero(in[0].cols());
    ref::layernorm_bwd(in[0], as_vec(in[1]), eps, g[0], dx, dg, db);
    return MatDs{dx, as_row(dg), as_row(db)};
  };
  return c;
}

GradCase relu_grad() {
  Rng r(104);
  MatD x = r.matd(6, 5);
  for (Index i = 0; i < x.size(); ++i)  // keep away from the kink
    if (std::abs(x.data()[i]) < 0.05) x.data()[i] = 0.3;
  GradCase c{"relu", "relu", {"x"}, {x}, {}, {}};
  c.fwd = [](const MatDs& in) {
    MatD y;
    ref::relu_fwd(in[0], y);
    return MatDs{y};
  };
  c.bwd = [](const MatDs& in, const MatDs& g) {
    MatD y, dx;
    ref::relu_fwd(in[0], y);
    ref::relu_bwd(y, g[0], dx);
    return MatDs{dx};
  };
  return c;
}

// Dropout is diagonal: its backward is the same masked scaling applied to the gradient.
GradCase dropout_grad() {
  Rng r(105);
  const float p = 0.3f;
  Mat dummy = Mat::Ones(8, 9);
  std::vector<std::uint8_t> keep;
  cpu::dropout_fwd(dummy, p, 42, keep);
  GradCase c{"dropout", "dropout", {"x"}, {r.matd(8, 9)}, {}, {}};
  c.fwd = [keep, p](const MatDs& in) {
    MatD y;
    ref::dropout_apply(keep, p, in[0], y);
    return MatDs{y};
  };
  c.bwd = [keep, p](const MatDs&, const MatDs& g) {
    MatD dx;
    ref::dropout_apply(keep, p, g[0], dx);
    return MatDs{dx};
  };
  return c;
}

GradCase simple_attn_grad(int heads, Index vcols, QkNorm norm, std::uint64_t seed) {
  Rng r(seed);
  const Index n = 6, d = 4;
  GradCase c{"simple_attn_H" + std::to_string(heads) + value_tag(vcols, d) +
                 (norm == QkNorm::global ? "_globalnorm" : "_nodenorm"),
             "simple_attn",
             {"q", "k", "v"},
             {r.matd(n, heads * d, -0.5, 1.0), r.matd(n, heads * d, -0.5, 1.0), r.matd(n, vcols < 0 ? heads * d : vcols)},
             {},
             {},
             kGradTolAttn};
  c.fwd = [heads, norm](const MatDs& in) {
    MatD a;
    SimpleAttnStateD st;
    ref::simple_attn_fwd(in[0], in[1], in[2], heads, norm, a, st);
    return MatDs{a};
  };
  c.bwd = [heads, norm](const MatDs& in, const MatDs& g) {
    MatD a, dq, dk, dv;
    SimpleAttnStateD st;
    ref::simple_attn_fwd(in[0], in[1], in[2], heads, norm, a, st);
    ref::simple_attn_bwd(in[2], heads, a, st, g[0], dq, dk, dv);
    return MatDs{dq, dk, dv};
  };
  return c;
}

GradCase sigmoid_attn_grad(int heads, Index vcols, std::uint64_t seed) {
  Rng r(seed);
  const Index n = 6, d = 4;
  GradCase c{"sigmoid_attn_H" + std::to_string(heads) + value_tag(vcols, d),
             "sigmoid_attn",
             {"q", "k", "v"},
             {r.matd(n, heads * d), r.matd(n, heads * d), r.matd(n, vcols < 0 ? heads * d : vcols)},
             {},
             {},
             kGradTolAttn};
  c.fwd = [heads](const MatDs& in) {
    MatD a, rs;
    ref::sigmoid_attn_fwd(in[0], in[1], in[2], heads, a, rs);
    return MatDs{a};
  };
  c.bwd = [heads](const MatDs& in, const MatDs& g) {
    MatD a, rs, dq, dk, dv;
    ref::sigmoid_attn_fwd(in[0], in[1], in[2], heads, a, rs);
    ref::sigmoid_attn_bwd(in[0], in[1], in[2], heads, a, rs, g[0], dq, dk, dv);
    return MatDs{dq, dk, dv};
  };
  return c;
}

// g = adj v; its backward is adj^T dg through the stored transpose
GradCase graph_grad() {
  const EdgeList el = random_graph(8, 20, 106);
  const GraphOpD op = make_graph_op<double>(el.n, el.src, el.dst, &el.w);
  Rng r(106);
  GradCase c{"graph_prop", "graph_prop", {"v"}, {r.matd(8, 3)}, {}, {}};
  c.fwd = [op](const MatDs& in) {
    MatD g;
    ref::graph_prop(op.adj, in[0], g);
    return MatDs{g};
  };
  c.bwd = [op](const MatDs&, const MatDs& g) {
    MatD dv;
    ref::graph_prop(op.adj_t, g[0], dv);
    return MatDs{dv};
  };
  return c;
}

GradCase loss_grad(LossKind kind) {
  Rng r(107 + static_cast<int>(kind));
  const Index n = 8, c = 4;
  const std::vector<std::int64_t> idx{5, 1, 3, 6};
  std::vector<std::int64_t> labels(n);
  for (auto& t : labels) t = r.integer(0, c - 1);
  MatD y = r.matd(n, c, 0, 1);
  if (kind == LossKind::bce)
    for (Index i = 0; i < y.size(); i += 2) y.data()[i] = y.data()[i] < 0.5 ? 0.0 : 1.0;
  const char* fam = kind == LossKind::cross_entropy ? "cross_entropy" : kind == LossKind::bce ? "bce_with_logits" : "mse";
  GradCase gc{fam, fam, {"logits"}, {r.matd(n, c, -3, 3)}, {}, {}};
  auto eval = [kind, labels, y, idx](const MatD& logits, MatD& dl) {
    if (kind == LossKind::cross_entropy) return ref::cross_entropy(logits, labels, idx, dl);
    if (kind == LossKind::bce) return ref::bce_with_logits(logits, y, idx, dl);
    return ref::mse(logits, y, idx, dl);
  };
  gc.fwd = [eval](const MatDs& in) {
    MatD dl;
    return MatDs{scalar(eval(in[0], dl))};
  };
  gc.bwd = [eval](const MatDs& in, const MatDs& g) {
    MatD dl;
    eval(in[0], dl);
    return MatDs{MatD(dl * g[0](0, 0))};
  };
  return gc;
}

std::vector<GradCase> grad_cases() {
  std::vector<GradCase> c;
  c.push_back(linear_grad(true));
  c.push_back(linear_grad(false));
  c.push_back(linear_sparse_grad());
  c.push_back(layernorm_grad());
  c.push_back(relu_grad());
  c.push_back(dropout_grad());
  std::uint64_t seed = 200;
  for (QkNorm norm : {QkNorm::global, QkNorm::node}) {
    c.push_back(simple_attn_grad(1, -1, norm, seed++));
    c.push_back(simple_attn_grad(1, 3, norm, seed++));
    c.push_back(simple_attn_grad(3, -1, norm, seed++));
    c.push_back(simple_attn_grad(3, 4, norm, seed++));
  }
  c.push_back(sigmoid_attn_grad(1, -1, seed++));
  c.push_back(sigmoid_attn_grad(1, 3, seed++));
  c.push_back(sigmoid_attn_grad(2, -1, seed++));
  c.push_back(sigmoid_attn_grad(2, 4, seed++));
  c.push_back(graph_grad());
  c.push_back(loss_grad(LossKind::cross_entropy));
  c.push_back(loss_grad(LossKind::bce));
  c.push_back(loss_grad(LossKind::mse));
  return c;
}

class OpGradCheck : public ::testing::TestWithParam<GradCase> {};
TEST_P(OpGradCheck, RefBackwardMatchesFiniteDifferences) { run_gradcheck(GetParam()); }
INSTANTIATE_TEST_SUITE_P(Ops, OpGradCheck, ::testing::ValuesIn(grad_cases()),
                         [](const auto& info) { return info.param.name; });

// ============================================================================================
// Specific checks
// ============================================================================================

// 4 nodes; node 0 has in-degree 0 and is a source; edge 1 -> 2 appears twice.
//   e  src dst  w        in-degree: d0 = 0, d1 = 2, d2 = 4, d3 = 1
//   0   0   1   2.0      adj(1,0) = 2.0 / sqrt(2*0) = inf -> 0
//   1   0   2   0.5      adj(2,0) = 0
//   2   1   2   1.5      adj(2,1) = 1.5 / sqrt(4*2)  } summed: 2.5 / sqrt(8)
//   3   2   1  -1.0      adj(1,2) = -1 / sqrt(2*4)
//   4   3   2   3.0      adj(2,3) = 3 / sqrt(4*1) = 1.5
//   5   2   3   0.25     adj(3,2) = 0.25 / sqrt(1*4) = 0.125
//   6   1   2   1.0      adj(2,1) += 1 / sqrt(8)
const std::vector<std::int64_t> kSrc4{0, 0, 1, 2, 3, 2, 1}, kDst4{1, 2, 2, 1, 2, 3, 2};
const std::vector<float> kW4{2.0f, 0.5f, 1.5f, -1.0f, 3.0f, 0.25f, 1.0f};

template <typename T>
void check_hand_graph(double tol) {
  const GraphOpT<T> op = make_graph_op<T>(4, kSrc4, kDst4, &kW4);
  for (auto x : op.adj.values) EXPECT_TRUE(std::isfinite(static_cast<double>(x)));
  EXPECT_EQ(op.adj.nnz(), 7);
  EXPECT_EQ(op.adj.indptr[1] - op.adj.indptr[0], 0) << "node 0 has no incoming edge";
  MatD want = MatD::Zero(4, 4);
  want(2, 1) = 2.5 / std::sqrt(8.0);
  want(1, 2) = -1.0 / std::sqrt(8.0);
  want(2, 3) = 1.5;
  want(3, 2) = 0.125;
  const MatD got = densify(op.adj);
  for (Index i = 0; i < 4; ++i)
    for (Index j = 0; j < 4; ++j) EXPECT_NEAR(got(i, j), want(i, j), tol) << "adj(" << i << "," << j << ")";
  const MatD got_t = densify(op.adj_t);
  for (Index i = 0; i < 4; ++i)
    for (Index j = 0; j < 4; ++j) EXPECT_NEAR(got_t(i, j), want(j, i), tol) << "adj_t(" << i << "," << j << ")";
  // each stored coefficient of an edge out of node 0 is exactly 0, not NaN
  for (Index i = 0; i < 4; ++i)
    for (Index e = op.adj.indptr[i]; e < op.adj.indptr[i + 1]; ++e)
      if (op.adj.indices[e] == 0) {
        EXPECT_EQ(op.adj.values[e], T(0));
      }

  // unweighted: 1 / sqrt(d_i d_j)
  const GraphOpT<T> u = make_graph_op<T>(4, kSrc4, kDst4);
  MatD want_u = MatD::Zero(4, 4);
  want_u(2, 1) = 2.0 / std::sqrt(8.0);
  want_u(1, 2) = 1.0 / std::sqrt(8.0);
  want_u(2, 3) = 0.5;
  want_u(3, 2) = 0.5;
  const MatD got_u = densify(u.adj);
  for (Index i = 0; i < 4; ++i)
    for (Index j = 0; j < 4; ++j) EXPECT_NEAR(got_u(i, j), want_u(i, j), tol) << "unweighted adj(" << i << "," << j << ")";
}

TEST(OpGraph, HandComputedCoefficientsDouble) { check_hand_graph<double>(1e-15); }
TEST(OpGraph, HandComputedCoefficientsFloat) { check_hand_graph<float>(1e-7); }

TEST(OpGraph, ZeroWeightOutOfZeroDegreeSourceIsZeroNotNaN) {
  std::vector<float> w = kW4;
  w[0] = 0.0f;  // inf * 0 = NaN before the clean-up
  const GraphOpD op = make_graph_op<double>(4, kSrc4, kDst4, &w);
  for (auto x : op.adj.values) EXPECT_TRUE(std::isfinite(x));
  for (auto x : op.adj_t.values) EXPECT_TRUE(std::isfinite(x));
  MatD g;
  ref::graph_prop(op.adj, MatD::Ones(4, 2), g);
  EXPECT_TRUE(g.allFinite());
  EXPECT_NEAR(g(1, 0), -1.0 / std::sqrt(8.0), 1e-15);
}

TEST(OpGraph, BadEdgeIndexThrows) {
  using V = std::vector<std::int64_t>;
  EXPECT_THROW(make_graph_op<float>(4, V{0, 4}, V{1, 2}), Error);
  EXPECT_THROW(make_graph_op<float>(4, V{0, 1}, V{1, 4}), Error);
  EXPECT_THROW(make_graph_op<float>(4, V{-1}, V{0}), Error);
  EXPECT_THROW(make_graph_op<double>(4, V{0}, V{-3}), Error);
  EXPECT_THROW(make_graph_op<float>(0, V{0}, V{0}), Error);
  EXPECT_THROW(make_graph_op<float>(4, V{0, 1}, V{1}), Error);  // length mismatch
  const std::vector<float> w{1.0f};
  EXPECT_THROW(make_graph_op<float>(4, V{0, 1}, V{1, 2}, &w), Error);  // one weight per edge
  EXPECT_NO_THROW(make_graph_op<float>(4, V{0, 3}, V{3, 0}));
  EXPECT_NO_THROW(make_graph_op<float>(4, V{}, V{}));
}

// a_ij = (1 + qn_i . kn_j) / sum_m (1 + qn_i . kn_m) built as an explicit N x N matrix per head.
MatD simple_attn_explicit(const MatD& q, const MatD& k, const MatD& v, int heads, QkNorm norm, MatD* den) {
  const Index n = q.rows(), d = q.cols() / heads;
  const int vheads = v.cols() == q.cols() ? heads : 1;
  const Index dv = v.cols() / vheads;
  MatD qn = q, kn = k;
  if (norm == QkNorm::global) {
    qn /= q.norm();  // one Frobenius norm over the whole [N, H, D] tensor
    kn /= k.norm();
  } else {
    for (Index i = 0; i < n; ++i)
      for (int h = 0; h < heads; ++h) {
        qn.row(i).segment(h * d, d).normalize();
        kn.row(i).segment(h * d, d).normalize();
      }
  }
  MatD out = MatD::Zero(n, heads * dv);
  if (den) den->resize(n, heads);
  for (int h = 0; h < heads; ++h) {
    const int hv = vheads == 1 ? 0 : h;
    MatD w(n, n);
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < n; ++j) w(i, j) = 1.0 + qn.row(i).segment(h * d, d).dot(kn.row(j).segment(h * d, d));
    for (Index i = 0; i < n; ++i) {
      const double s = w.row(i).sum();
      if (den) (*den)(i, h) = s;
      w.row(i) /= s;
    }
    out.middleCols(h * dv, dv) = w * v.middleCols(hv * dv, dv);
  }
  return out;
}

TEST(OpSimpleAttn, RefMatchesExplicitWeightMatrix) {
  Rng r(301);
  for (QkNorm norm : {QkNorm::global, QkNorm::node})
    for (int heads : {1, 3})
      for (Index vcols : {Index{-1}, Index{4}, Index{3}}) {
        const Index n = 9, d = 4;
        const MatD q = r.matd(n, heads * d, -0.5, 1), k = r.matd(n, heads * d, -0.5, 1);
        const MatD v = r.matd(n, vcols < 0 ? heads * d : vcols);
        MatD den_explicit;
        const MatD want = simple_attn_explicit(q, k, v, heads, norm, &den_explicit);
        MatD a;
        SimpleAttnStateD st;
        ref::simple_attn_fwd(q, k, v, heads, norm, a, st);
        const std::string where = std::string("H") + std::to_string(heads) + value_tag(vcols, d) +
                                  (norm == QkNorm::global ? "_global" : "_node");
        expect_close("simple_attn_explicit", where, "ref_a", a, want, rel_norm(1e-13));
        expect_close("simple_attn_explicit", where, "ref_den", st.den, den_explicit, rel_norm(1e-13));
      }
}

TEST(OpSimpleAttn, CpuMatchesExplicitWeightMatrix) {
  Rng r(302);
  for (QkNorm norm : {QkNorm::global, QkNorm::node}) {
    const Index n = 300, d = 8;
    const int heads = 3;
    const Mat q = r.mat(n, heads * d, -0.5, 1), k = r.mat(n, heads * d, -0.5, 1), v = r.mat(n, d);
    const MatD want = simple_attn_explicit(dbl(q), dbl(k), dbl(v), heads, norm, nullptr);
    Mat a;
    SimpleAttnState st;
    cpu::simple_attn_fwd(q, k, v, heads, norm, a, st);
    expect_close("simple_attn_explicit", norm == QkNorm::global ? "N300_H3_global" : "N300_H3_node", "cpu_a", dbl(a),
                 want, kReduction);
  }
}

// A_i = sum_j sigmoid(q_i . k_j) v_j / sum_j sigmoid(q_i . k_j), no scale, no normalisation
MatD sigmoid_attn_explicit(const MatD& q, const MatD& k, const MatD& v, int heads, MatD& rowsum) {
  const Index n = q.rows(), d = q.cols() / heads;
  const int vheads = v.cols() == q.cols() ? heads : 1;
  const Index dv = v.cols() / vheads;
  MatD out(n, heads * dv);
  rowsum.resize(n, heads);
  for (int h = 0; h < heads; ++h) {
    const int hv = vheads == 1 ? 0 : h;
    const MatD z = q.middleCols(h * d, d) * k.middleCols(h * d, d).transpose();
    const MatD w = (1.0 + (-z.array()).exp()).inverse().matrix();
    rowsum.col(h) = w.rowwise().sum();
    out.middleCols(h * dv, dv) = rowsum.col(h).cwiseInverse().asDiagonal() * (w * v.middleCols(hv * dv, dv));
  }
  return out;
}

TEST(OpSigmoidAttn, RefMatchesExplicitFormula) {
  Rng r(303);
  for (int heads : {1, 2})
    for (Index vcols : {Index{-1}, Index{4}}) {
      const Index n = 9, d = 4;
      const MatD q = r.matd(n, heads * d, -1.5, 1.5), k = r.matd(n, heads * d, -1.5, 1.5);
      const MatD v = r.matd(n, vcols < 0 ? heads * d : vcols);
      MatD rs_explicit, a, rs;
      const MatD want = sigmoid_attn_explicit(q, k, v, heads, rs_explicit);
      ref::sigmoid_attn_fwd(q, k, v, heads, a, rs);
      const std::string where = std::string("H") + std::to_string(heads) + value_tag(vcols, d);
      expect_close("sigmoid_attn_explicit", where, "ref_a", a, want, rel_norm(1e-13));
      expect_close("sigmoid_attn_explicit", where, "ref_rowsum", rs, rs_explicit, rel_norm(1e-13));
    }
}

TEST(OpSigmoidAttn, CpuMatchesExplicitFormula) {
  Rng r(304);
  for (Index vcols : {Index{-1}, Index{8}}) {
    const Index n = 300, d = 8;
    const int heads = 2;
    const Mat q = r.mat(n, heads * d), k = r.mat(n, heads * d), v = r.mat(n, vcols < 0 ? heads * d : vcols);
    MatD rs_explicit;
    const MatD want = sigmoid_attn_explicit(dbl(q), dbl(k), dbl(v), heads, rs_explicit);
    Mat a, rs;
    cpu::sigmoid_attn_fwd(q, k, v, heads, a, rs);
    expect_close("sigmoid_attn_explicit", "N300_H2" + value_tag(vcols, d), "cpu_a", dbl(a), want, kReduction);
    expect_close("sigmoid_attn_explicit", "N300_H2" + value_tag(vcols, d), "cpu_rowsum", dbl(rs), rs_explicit,
                 kReduction);
  }
}

TEST(OpLoss, HandComputedValues) {
  const std::vector<std::int64_t> idx{0, 2};
  // cross-entropy of uniform logits over C classes is log C; gradient (1/C - onehot) / |idx|
  {
    Mat logits = Mat::Zero(3, 4);
    logits(1, 0) = 100.0f;  // a row outside idx, ignored
    Mat dl;
    const float loss = cpu::cross_entropy(logits, {1, 0, 3}, idx, dl);
    EXPECT_NEAR(loss, std::log(4.0), 1e-6);
    EXPECT_NEAR(dl(0, 1), (0.25 - 1.0) / 2, 1e-7);
    EXPECT_NEAR(dl(0, 0), 0.25 / 2, 1e-7);
    EXPECT_EQ(dl.row(1).cwiseAbs().sum(), 0.0f);
  }
  // BCE at logit 0 is log 2; gradient (0.5 - y) / (|idx| T)
  {
    Mat dl;
    const float loss = cpu::bce_with_logits(Mat::Zero(3, 2), Mat::Ones(3, 2), idx, dl);
    EXPECT_NEAR(loss, std::log(2.0), 1e-6);
    EXPECT_NEAR(dl(2, 1), (0.5 - 1.0) / 4, 1e-7);
  }
  // MSE: residuals 1 and 3 on rows 0 and 2 -> (1 + 9) / 2
  {
    Mat pred(3, 1), y = Mat::Zero(3, 1), dl;
    pred << 1, 5, -3;
    EXPECT_NEAR(cpu::mse(pred, y, idx, dl), 5.0, 1e-6);
    EXPECT_NEAR(dl(2, 0), 2 * -3.0 / 2, 1e-6);
    EXPECT_EQ(dl(1, 0), 0.0f);
  }
}

TEST(OpLoss, EmptyIndexSetThrows) {
  Mat dl;
  const std::vector<std::int64_t> none;
  EXPECT_THROW(cpu::cross_entropy(Mat::Zero(3, 2), {0, 1, 0}, none, dl), Error);
  EXPECT_THROW(cpu::bce_with_logits(Mat::Zero(3, 2), Mat::Zero(3, 2), none, dl), Error);
  EXPECT_THROW(cpu::mse(Mat::Zero(3, 2), Mat::Zero(3, 2), none, dl), Error);
}

// ---- the harness itself must be able to fail ------------------------------------------------
int count_failures(const std::function<void()>& fn) {
  ::testing::TestPartResultArray results;
  {
    ::testing::ScopedFakeTestPartResultReporter reporter(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &results);
    fn();
  }
  int failures = 0;
  for (int i = 0; i < results.size(); ++i) failures += results.GetTestPartResult(i).failed();
  return failures;
}

TEST(OpHarness, DetectsWrongResults) {
  g_record = false;
  const MatD ones = MatD::Ones(3, 3);
  EXPECT_EQ(count_failures([&] { expect_close("t", "t", "same", ones, ones, rel_norm(0)); }), 0);
  EXPECT_EQ(count_failures([&] { expect_close("t", "t", "off", MatD(ones * 1.001), ones, kReduction); }), 1);
  EXPECT_EQ(count_failures([&] { expect_close("t", "t", "off", MatD(ones * 1.0001), ones, kElementwise); }), 1);
  EXPECT_EQ(count_failures([&] { expect_close("t", "t", "shape", MatD::Ones(3, 2), ones, kReduction); }), 1);
  MatD nan = ones;
  nan(1, 1) = std::nan("");
  EXPECT_EQ(count_failures([&] { expect_close("t", "t", "nan", nan, ones, kReduction); }), 1);

  // a gradient check with a backward off by 0.1% on one input fails on that input only
  GradCase bad = linear_grad(true);
  const auto good_bwd = bad.bwd;
  bad.bwd = [good_bwd](const MatDs& in, const MatDs& g) {
    MatDs out = good_bwd(in, g);
    out[1](0, 0) *= 1.001;
    return out;
  };
  EXPECT_EQ(count_failures([&] { run_gradcheck(bad); }), 1);
  EXPECT_EQ(count_failures([&] { run_gradcheck(linear_grad(true)); }), 0);

  // a compare case with a wrong expectation fails
  CompareCase wrong = linear_case(7, 5, 3, true, true, false, 1);
  const auto good_run = wrong.run;
  wrong.run = [good_run] {
    auto checks = good_run();
    checks[0].want(0, 0) += 1e-2;
    return checks;
  };
  EXPECT_GE(count_failures([&] { run_compare(wrong); }), 1);
  g_record = true;
}

}  // namespace
}  // namespace dfm
