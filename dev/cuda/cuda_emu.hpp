// A tiny CPU stand-in for the subset of CUDA the v6 scratchpad's kernels use, so that their
// indexing, masking and barriers can be checked on a machine without a GPU:
//   g++ -std=c++20 -O1 -pthread -DSIG_EMU -x c++ dev/cuda/attn_sigmoid_v6.cu -o /tmp/v6emu
// Every block runs as blockDim.x std::threads joined by a std::barrier (__syncthreads); blocks run
// one after another; cp.async copies at once; shared memory starts as NaN (reads of what nothing
// wrote show up in the results). Warp shuffles are not emulated (the v6 kernels use none).
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }
inline float2 make_float2(float a, float b) { return float2{a, b}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)

namespace emu {
inline thread_local dim3 tidx, bidx;
inline dim3 gdim, bdim;
inline std::barrier<>* bar = nullptr;
inline std::vector<float4> smem;
inline std::mutex atomic_mu;

template <class F>
void launch(dim3 grid, dim3 block, std::size_t smem_bytes, F f) {
  gdim = grid, bdim = block;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      smem.assign(smem_bytes / 16 + 1, float4{nan, nan, nan, nan});
      std::barrier<> b(static_cast<std::ptrdiff_t>(block.x));
      bar = &b;
      std::vector<std::thread> th;
      for (unsigned t = 0; t < block.x; ++t)
        th.emplace_back([&, t] {
          tidx = dim3(t), bidx = dim3(bx, by);
          f();
        });
      for (auto& x : th) x.join();
    }
}
}  // namespace emu

#define threadIdx (emu::tidx)
#define blockIdx (emu::bidx)
#define gridDim (emu::gdim)
#define blockDim (emu::bdim)
inline void __syncthreads() { emu::bar->arrive_and_wait(); }
inline float __expf(float x) { return std::exp(x); }
inline void atomicAdd(float* p, float v) {
  std::lock_guard<std::mutex> l(emu::atomic_mu);
  *p += v;
}
inline void atomicAdd(float2* p, float2 v) {
  std::lock_guard<std::mutex> l(emu::atomic_mu);
  p->x += v.x, p->y += v.y;
}
inline void atomicAdd(float4* p, float4 v) {
  std::lock_guard<std::mutex> l(emu::atomic_mu);
  p->x += v.x, p->y += v.y, p->z += v.z, p->w += v.w;
}
