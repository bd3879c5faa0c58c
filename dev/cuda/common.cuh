// Shared helpers for the dev/cuda scratchpads (llm.c dev/cuda style).
// Header-only; each scratchpad .cu includes it and builds standalone.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

// ---------------------------------------------------------------------------------------------
// error checking: every CUDA call goes through this; prints file:line and aborts.
#define CUDA_CHECK(call)                                                                        \
    do {                                                                                        \
        cudaError_t err_ = (call);                                                              \
        if (err_ != cudaSuccess) {                                                              \
            fprintf(stderr, "[CUDA ERROR] %s at %s:%d: %s\n", cudaGetErrorString(err_),        \
                    __FILE__, __LINE__, #call);                                                 \
            exit(EXIT_FAILURE);                                                                 \
        }                                                                                       \
    } while (0)

// after every kernel launch
#define KERNEL_CHECK() CUDA_CHECK(cudaGetLastError())

__host__ __device__ inline int ceil_div(long long a, long long b) { return (int)((a + b - 1) / b); }

// ---------------------------------------------------------------------------------------------
// deterministic device-side random init (splitmix64 hash of the index), uniform in [lo, hi)
__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

__global__ void fill_uniform_kernel(float* p, size_t n, uint64_t seed, float lo, float hi) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t r = splitmix64(seed * 0x632BE59BD9B4E019ull + i);
        float u = (float)(r >> 40) * (1.0f / 16777216.0f);  // 24 random bits -> [0,1)
        p[i] = lo + (hi - lo) * u;
    }
}

inline void fill_uniform(float* d, size_t n, uint64_t seed, float lo, float hi, cudaStream_t s) {
    fill_uniform_kernel<<<1024, 256, 0, s>>>(d, n, seed, lo, hi);
    KERNEL_CHECK();
}

// ---------------------------------------------------------------------------------------------
// host helpers
inline std::vector<float> to_host(const float* d, size_t n) {
    std::vector<float> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
}

// normwise relative error: max|x - ref| / max|ref|  (robust to near-zero entries)
struct ErrStat {
    double rel = 0, maxabs = 0, maxref = 0;
    bool finite = true;
};
inline ErrStat compare(const std::vector<float>& x, const std::vector<double>& ref) {
    ErrStat e;
    for (size_t i = 0; i < ref.size(); i++) {
        if (!std::isfinite(x[i])) e.finite = false;
        e.maxabs = std::fmax(e.maxabs, std::fabs((double)x[i] - ref[i]));
        e.maxref = std::fmax(e.maxref, std::fabs(ref[i]));
    }
    e.rel = e.finite ? e.maxabs / (e.maxref > 0 ? e.maxref : 1.0) : INFINITY;
    return e;
}

// average time of fn() over iters launches on stream s (after `warmup` untimed launches)
template <class F>
float time_ms(F&& fn, int warmup, int iters, cudaStream_t s) {
    for (int i = 0; i < warmup; i++) fn();
    cudaEvent_t a, b;
    CUDA_CHECK(cudaEventCreate(&a));
    CUDA_CHECK(cudaEventCreate(&b));
    CUDA_CHECK(cudaEventRecord(a, s));
    for (int i = 0; i < iters; i++) fn();
    CUDA_CHECK(cudaEventRecord(b, s));
    CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    CUDA_CHECK(cudaEventDestroy(a));
    CUDA_CHECK(cudaEventDestroy(b));
    return ms / iters;
}

inline void print_device() {
    int dev = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp p;
    CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
    printf("device: %s, %d SMs, cc %d.%d, L2 %.0f MB, smem/block optin %zu KB\n", p.name,
           p.multiProcessorCount, p.major, p.minor, p.l2CacheSize / 1048576.0,
           p.sharedMemPerBlockOptin / 1024);
}

inline int num_sms() {
    int dev = 0, n = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n;
}
