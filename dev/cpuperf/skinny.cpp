// Micro-benchmark: the skinny products of the folded DIFFormer-s layer on one thread's share of
// Cora at 2 threads (1354 rows, D 64), OpenBLAS (blas::) against the register-blocked kernels
// (skinny::). Best of 400 repeats, GFLOP/s. Build (from the repository root):
//   g++ -O3 -march=native -DNDEBUG -std=c++20 -Isrc -I/usr/include/eigen3 dev/cpuperf/skinny.cpp \
//       src/ops/cpu/skinny_gemm.cpp src/ops/cpu/blas.cpp -lopenblas -o /tmp/skinny && /tmp/skinny
#include <cstdio>

#include "best_us.hpp"
#include "ops/cpu/blas.hpp"
#include "ops/cpu/skinny_gemm.hpp"

using namespace dfm;
using namespace dfm::cpu;

void row(const char* name, double mflop, double t_blas, double t_skinny) {
  std::printf("%-28s openblas %7.1f us %5.1f GF/s | skinny %7.1f us %5.1f GF/s | %.2fx\n", name, t_blas,
              mflop * 1e3 / t_blas, t_skinny, mflop * 1e3 / t_skinny, t_blas / t_skinny);
}
int main() {
  const Index n = 1354, d = 64;
  Mat h = Mat::Random(n, d), x = Mat::Random(n, d + 1), b = Mat::Random(d, d + 1), p = Mat::Random(d + 1, d),
      z = Mat::Random(d, d), g(d, d), s(d, d + 1), y(n, d + 1), out(n, d);
  const double f = 2.0 * n * d * d / 1e6;
  row("h B (B 64x65), 256-row tiles", f * 65 / 64, best_us([&] {
        for (Index r0 = 0; r0 < n; r0 += 256) {
          const Index m = std::min<Index>(256, n - r0);
          auto yb = y.middleRows(r0, m);
          blas::gemm(h.middleRows(r0, m), false, b, false, yb);
        }
      }),
      best_us([&] { skinny::gemm_nn(n, d + 1, d, h.data(), d, b.data(), d + 1, y.data(), d + 1, false); }));
  row("X P + h Z", f * 129 / 64, best_us([&] {
        blas::gemm(x, false, p, false, out);
        blas::gemm(h, false, z, false, out, 1.0f, 1.0f);
      }),
      best_us([&] {
        skinny::gemm_nn(n, d, d + 1, x.data(), d + 1, p.data(), d, out.data(), d, false);
        skinny::gemm_nn(n, d, d, h.data(), d, z.data(), d, out.data(), d, true);
      }));
}
