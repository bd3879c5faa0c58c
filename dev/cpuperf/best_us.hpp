// The micro-benchmarks' timer: the best of 400 runs of f, in microseconds.
#pragma once
#include <algorithm>
#include <chrono>

template <typename F>
double best_us(F&& f) {
  double b = 1e18;
  for (int r = 0; r < 400; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    b = std::min(b, std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
  }
  return b;
}
