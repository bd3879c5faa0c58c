// The register-blocked skinny product (cpu::skinny::gemm_nn) against a double-precision reference,
// on shapes that exercise every remainder: rows not a multiple of 6, columns not a multiple of 8 or
// 16 (the dot-product tail), strided operands, accumulation.
#include <gtest/gtest.h>

#include <random>

#include "ops/cpu/skinny_gemm.hpp"
#include "test_util.hpp"

namespace dfm {
namespace {

using test::rel_err;

// A row-major [rows, cols] block inside a wider buffer (row stride ld > cols), random normal.
struct Strided {
  Index rows, cols, ld;
  std::vector<float> buf;
  Strided(Index r, Index c, Index extra, std::mt19937_64& g) : rows(r), cols(c), ld(c + extra), buf(r * (c + extra)) {
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (auto& v : buf) v = d(g);
  }
  MatD dense() const {
    MatD m(rows, cols);
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) m(i, j) = buf[i * ld + j];
    return m;
  }
};

struct Shape {
  Index m, k, n;
};
const Shape kShapes[] = {{1, 1, 1},      {5, 3, 7},     {6, 64, 16},    {7, 64, 65},   {13, 65, 64},
                         {256, 64, 65},  {301, 129, 64}, {1354, 64, 65}, {97, 17, 33},  {40, 8, 24},
                         {2, 260, 260}, {129, 64, 1},   {300, 1, 64}};

TEST(SkinnyGemm, NnMatchesDoubleReference) {
  std::mt19937_64 g(1);
  for (const Shape& s : kShapes)
    for (bool accumulate : {false, true}) {
      Strided a(s.m, s.k, 3, g), b(s.k, s.n, 5, g), c(s.m, s.n, 2, g);
      const MatD expect = (accumulate ? c.dense() : MatD::Zero(s.m, s.n)) + a.dense() * b.dense();
      cpu::skinny::gemm_nn(s.m, s.n, s.k, a.buf.data(), a.ld, b.buf.data(), b.ld, c.buf.data(), c.ld, accumulate);
      EXPECT_LT(rel_err(c.dense(), expect), 1e-6) << s.m << "x" << s.k << "x" << s.n << " acc " << accumulate;
    }
}

TEST(SkinnyGemm, EmptyInnerDimensionGivesZeroOrLeavesC) {
  std::mt19937_64 g(4);
  Strided c(7, 9, 0, g);
  const MatD before = c.dense();
  cpu::skinny::gemm_nn(7, 9, 0, nullptr, 1, nullptr, 9, c.buf.data(), c.ld, true);
  EXPECT_EQ(c.dense(), before);
  cpu::skinny::gemm_nn(7, 9, 0, nullptr, 1, nullptr, 9, c.buf.data(), c.ld, false);
  EXPECT_EQ(c.dense(), MatD::Zero(7, 9));
}

}  // namespace
}  // namespace dfm
