// Micro-benchmark of the N x 64 x 64 products of the folded DIFFormer-s layer (one thread's
// share of Cora at 2 threads), single-threaded Eigen: best of many repeats, GFLOP/s.
#include <Eigen/Dense>
#include <cstdio>

#include "best_us.hpp"
using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
int main() {
  Eigen::setNbThreads(1);
  const int n = 1354, d = 64;
  Mat h = Mat::Random(n, d), x = Mat::Random(n, d + 1), p = Mat::Random(d + 1, d), z = Mat::Random(d, d);
  Mat b = Mat::Random(d, d + 1), g(d, d), s(d, d + 1), out(n, d), y(256, d + 1);
  const double u = 2.0 * n * d * d / 1e3;  // MFLOP*1e3 -> GFLOP/s with us
  double t;
  t = best_us([&] { g.noalias() = h.transpose() * h; });
  std::printf("gram full      %7.1f us %6.1f GFLOP/s\n", t, u / t);
  t = best_us([&] { g.setZero(); g.selfadjointView<Eigen::Lower>().rankUpdate(h.transpose()); });
  std::printf("gram rankUpd   %7.1f us %6.1f GFLOP/s(eff)\n", t, u / t);
  t = best_us([&] { for (int r0 = 0; r0 < n; r0 += 256) { int m = std::min(256, n - r0); y.topRows(m).noalias() = h.middleRows(r0, m) * b; } });
  std::printf("h*B blocks     %7.1f us %6.1f GFLOP/s\n", t, u * 65 / 64 / t);
  t = best_us([&] { s.noalias() = h.transpose() * x; });
  std::printf("h^T X          %7.1f us %6.1f GFLOP/s\n", t, u * 65 / 64 / t);
  t = best_us([&] { out.noalias() = x * p; out.noalias() += h * z; });
  std::printf("XP + hZ        %7.1f us %6.1f GFLOP/s\n", t, u * 129 / 64 / t);
}
