// Device helpers shared by the kernels of src/ops/cuda (included by .cu files only).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ops/cuda/cuda_ops.hpp"

namespace dfm::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

inline int blocks_for(Index work, int per_block, int max_blocks) {
  const Index b = (work + per_block - 1) / per_block;
  return static_cast<int>(std::max<Index>(1, std::min<Index>(b, max_blocks)));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

// The per-layer seed of DIFFormer (src/model/difformer.cpp, mix_seed), bit for bit.
__device__ __forceinline__ std::uint64_t mix_seed_dev(std::uint64_t seed, std::uint64_t salt) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (salt + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
// dropout_draw of src/ops/ops.hpp, bit for bit (32-bit multiplies only).
__device__ __forceinline__ bool dropout_keep(std::uint64_t seed, std::uint64_t index, std::uint32_t threshold) {
  const std::uint64_t key = seed ^ ((index >> 32) * 0xd1342543de82ef95ULL);
  std::uint32_t x = static_cast<std::uint32_t>(index) ^ static_cast<std::uint32_t>(key);
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x ^= static_cast<std::uint32_t>(key >> 32);
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return (x >> 8) >= threshold;
}

}  // namespace dfm::cuda
