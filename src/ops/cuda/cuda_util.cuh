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

// The hash of cpu::dropout_fwd (src/ops/cpu/ops_cpu.cpp), bit for bit.
__device__ __forceinline__ std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
// The per-layer seed of DIFFormer (src/model/difformer.cpp, mix_seed), bit for bit.
__device__ __forceinline__ std::uint64_t mix_seed_dev(std::uint64_t seed, std::uint64_t salt) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (salt + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
__device__ __forceinline__ bool dropout_keep(std::uint64_t seed, std::uint64_t index, std::uint32_t threshold) {
  const std::uint32_t r = static_cast<std::uint32_t>(splitmix64(seed ^ (index * 0xd1342543de82ef95ULL)) >> 40);
  return r >= threshold;
}

}  // namespace dfm::cuda
