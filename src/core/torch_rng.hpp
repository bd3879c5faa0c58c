// PyTorch's CPU random stream, reproduced bit for bit, so that `train --rng torch --seed S`
// starts from the weights and drops the units that the PyTorch reference run after
// torch.manual_seed(S) does (../shared/peer/reference_targets.py). Checked against torch 1.13
// (Debian, no MKL) and torch 2.11 (pip, MKL): dev/torch_rng/check_torch_rng.py, and the fixture
// tests/fixtures/torch_rng.npz that tests/test_torch_rng.cpp compares with.
//
// What PyTorch does (ATen's CPUGeneratorImpl and its CPU distribution kernels):
//   * torch.manual_seed(s) seeds one MT19937 with the low 32 bits of s (init_genrand);
//   * random() is one 32-bit output, random64() two, the first the high word;
//   * float32 uniform_(from, to): per element in memory order, one random();
//     x = (r & 0xFFFFFF) * 2^-24, value = x * (to - from) + from in double, rounded to float;
//   * nn.Linear(in, out) at construction: weight [out, in] kaiming_uniform_(a = sqrt(5)), i.e.
//     bound = sqrt(3) * sqrt(2 / (1 + a^2)) / sqrt(in), then bias U(-1/sqrt(in), 1/sqrt(in));
//   * F.dropout(x, p, training=True): noise.bernoulli_(1 - p), per element in memory order one
//     random64(); u = (r & (2^53 - 1)) * 2^-53, kept when u < 1 - p; then x * (1 / (1 - p)).
//     (torch 2.x draws this way with MKL too: its MKL Bernoulli path is gone.)
#pragma once
#include <cstdint>
#include <random>

#include "core/tensor.hpp"

namespace dfm {

class TorchCpuGenerator {
 public:
  explicit TorchCpuGenerator(std::uint64_t seed);  // torch.manual_seed(seed)
  std::uint32_t random() { return static_cast<std::uint32_t>(engine_()); }
  std::uint64_t random64() {
    const std::uint64_t hi = random();
    return (hi << 32) | random();
  }
  // tensor.uniform_(from, to) on a float32 tensor of n elements.
  void uniform(float* out, Index n, double from, double to);
  // nn.Linear(in, out)'s initialisation: weight [out, in] row-major, then bias [out].
  void linear_init(float* weight, float* bias, Index out, Index in);
  // F.dropout's mask for n elements (1 = kept), drop probability p. p is compared as the decimal
  // a user writes (the shortest one that rounds to the float: 0.2f -> 0.2), which is what the
  // Python side holds; (double)0.2f would keep a draw in [0.7999999970, 0.8) that torch drops.
  void dropout_keep(std::uint8_t* keep, Index n, float p);

 private:
  std::mt19937 engine_;  // std::mt19937's seeding and tempering are MT19937's, as torch's
};

}  // namespace dfm
