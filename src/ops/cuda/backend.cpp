// available() / describe() / require() when the CUDA backend is compiled in.
#include <cuda_runtime.h>

#include <cstdio>

#include "core/error.hpp"
#include "ops/cuda_backend.hpp"

namespace dfm::cuda {

namespace {
// Why no device is usable, or "" when device 0 is.
std::string probe() {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return std::string("no usable CUDA device (") + cudaGetErrorString(e) + ")";
  }
  if (count == 0) return "no CUDA device is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)";
  return "";
}
}  // namespace

bool available() {
  static const bool ok = probe().empty();
  return ok;
}

std::string describe() {
  const std::string why = probe();
  if (!why.empty()) return why;
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, 0) != cudaSuccess) return "CUDA device 0: properties unavailable";
  char buf[512];
  std::snprintf(buf, sizeof buf, "%s, %.1f GiB, %d SMs, compute capability %d.%d", p.name,
                p.totalGlobalMem / 1073741824.0, p.multiProcessorCount, p.major, p.minor);
  return buf;
}

void require() {
  if (!available()) fail("--device cuda: ", describe(), "; run with --device cpu");
}

}  // namespace dfm::cuda
