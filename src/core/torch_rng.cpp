#include "core/torch_rng.hpp"

#include <charconv>
#include <cmath>

namespace dfm {

TorchCpuGenerator::TorchCpuGenerator(std::uint64_t seed) : engine_(static_cast<std::uint32_t>(seed & 0xffffffffu)) {}

void TorchCpuGenerator::uniform(float* out, Index n, double from, double to) {
  // ATen casts the bounds to the tensor's type first, then works in double (its CPU
  // accumulation type for float); 24 random bits times a float difference is exact in double.
  const double lo = static_cast<float>(from), hi = static_cast<float>(to);
  for (Index i = 0; i < n; ++i) {
    const double x = static_cast<double>(random() & 0xFFFFFFu) * 0x1.0p-24;
    out[i] = static_cast<float>(x * (hi - lo) + lo);
  }
}

void TorchCpuGenerator::linear_init(float* weight, float* bias, Index out, Index in) {
  // torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5)) in Python doubles, as written there.
  const double a = std::sqrt(5.0);
  const double gain = std::sqrt(2.0 / (1.0 + a * a));
  const double bound_w = std::sqrt(3.0) * (gain / std::sqrt(static_cast<double>(in)));
  uniform(weight, out * in, -bound_w, bound_w);
  const double bound_b = 1.0 / std::sqrt(static_cast<double>(in));
  uniform(bias, out, -bound_b, bound_b);
}

void TorchCpuGenerator::dropout_keep(std::uint8_t* keep, Index n, float p) {
  char text[32];
  const auto end = std::to_chars(text, text + sizeof(text), p).ptr;  // the shortest round-trip form
  double p_decimal = p;
  std::from_chars(text, end, p_decimal);
  const double keep_prob = 1.0 - p_decimal;
  for (Index i = 0; i < n; ++i) {
    const double u = static_cast<double>(random64() & ((std::uint64_t{1} << 53) - 1)) * 0x1.0p-53;
    keep[i] = u < keep_prob ? 1 : 0;
  }
}

}  // namespace dfm
