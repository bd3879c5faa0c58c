// The CUDA backend's core: checked calls (file:line plus a hint), the GPU context (stream, cuBLAS
// and cuSPARSE handles, a tracked allocator with a high-water mark, a bump arena for small
// per-op temporaries) and RAII device buffers. Host code only; kernels live in the .cu files and
// are reached through the launchers declared in cuda_ops.hpp.
//
// Not here: any model logic (model_cuda.cpp) and any kernel.
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusparse.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/error.hpp"

namespace dfm::cuda {

enum class Precision { fp32, tf32 };

[[noreturn]] void fail_call(const char* lib, const std::string& what, const char* call, const char* file, int line,
                            const std::string& hint);
void check_cuda(cudaError_t e, const char* call, const char* file, int line);
void check_cublas(cublasStatus_t s, const char* call, const char* file, int line);
void check_cusparse(cusparseStatus_t s, const char* call, const char* file, int line);

}  // namespace dfm::cuda

#define DFM_CUDA_CHECK(call) ::dfm::cuda::check_cuda((call), #call, __FILE__, __LINE__)
#define DFM_CUBLAS_CHECK(call) ::dfm::cuda::check_cublas((call), #call, __FILE__, __LINE__)
#define DFM_CUSPARSE_CHECK(call) ::dfm::cuda::check_cusparse((call), #call, __FILE__, __LINE__)
// After every kernel launch: catches bad launch configurations at the launch site.
#define DFM_CUDA_LAUNCH_CHECK() ::dfm::cuda::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

namespace dfm::cuda {

// cudaMalloc/cudaFree with a running total and a high-water mark of the bytes handed out (the
// analogue of torch.cuda.max_memory_allocated: the CUDA context itself is not counted).
class Allocator {
 public:
  void* allocate(std::size_t bytes);
  void release(void* p);
  std::int64_t current_bytes() const { return current_; }
  std::int64_t peak_bytes() const { return peak_; }
  void reset_peak() { peak_ = current_; }
  ~Allocator();

 private:
  std::unordered_map<void*, std::size_t> sizes_;
  std::int64_t current_ = 0, peak_ = 0;
};

class GpuContext;

// Owning device array of T, freed through its context's allocator. Move-only.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(GpuContext& ctx, std::size_t n);
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ctx_(o.ctx_), p_(o.p_), n_(o.n_) { o.p_ = nullptr, o.n_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      ctx_ = o.ctx_, p_ = o.p_, n_ = o.n_;
      o.p_ = nullptr, o.n_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  void reset();
  // Copies on the context's stream; download waits for it.
  void upload(const T* host, std::size_t n);
  template <class Alloc>
  void upload(const std::vector<T, Alloc>& host) {
    upload(host.data(), host.size());
  }
  void download(T* host, std::size_t n) const;
  std::vector<T> to_host() const {
    std::vector<T> h(n_);
    download(h.data(), n_);
    return h;
  }
  void zero();

 private:
  GpuContext* ctx_ = nullptr;
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

// Everything a GPU computation needs besides its tensors; no hidden globals. One stream: all
// work (kernels, cuBLAS, copies) is ordered on it, so scratch memory can be reused freely.
class GpuContext {
 public:
  explicit GpuContext(Precision precision = Precision::fp32, int device = 0);
  ~GpuContext();
  GpuContext(const GpuContext&) = delete;
  GpuContext& operator=(const GpuContext&) = delete;

  cudaStream_t stream() const { return stream_; }
  cublasHandle_t blas() const { return blas_; }
  cusparseHandle_t sparse() const { return sparse_; }
  cublasLtHandle_t lt() const { return lt_; }
  void* blas_workspace() const { return blas_workspace_; }
  std::size_t blas_workspace_bytes() const;
  bool lt_disabled = false;  // DIFFORMER_NO_LT=1: plain cublasSgemm + a bias pass
  Precision precision() const { return precision_; }
  int sms() const { return sms_; }
  Allocator& allocator() { return alloc_; }
  void sync() const;
  bool capturing() const;

  // Device vector of at least n ones (reductions through gemv).
  const float* ones(std::size_t n);

  // Bump arena for small temporaries whose life is one op (reduction partials, per-block
  // records). An op first calls ensure_scratch(its whole need, nested ops included), then takes
  // memory inside a ScratchScope, handed back when the scope ends. The arena grows only outside
  // every scope and outside graph capture, so one eager run before a capture sizes it.
  void reserve_scratch(std::size_t bytes);
  void ensure_scratch(std::size_t bytes);
  void* scratch_take(std::size_t bytes);
  std::size_t scratch_mark() const { return scratch_used_; }
  void scratch_release(std::size_t mark) { scratch_used_ = mark; }
  int scratch_depth = 0;

 private:
  Precision precision_;
  int device_ = 0, sms_ = 0;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;
  cusparseHandle_t sparse_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  Allocator alloc_;
  void* blas_workspace_ = nullptr;
  float* ones_ = nullptr;
  std::size_t ones_n_ = 0;
  char* scratch_ = nullptr;
  std::size_t scratch_cap_ = 0, scratch_used_ = 0;
};

class ScratchScope {
 public:
  explicit ScratchScope(GpuContext& ctx) : ctx_(ctx), mark_(ctx.scratch_mark()) { ++ctx_.scratch_depth; }
  ~ScratchScope() {
    ctx_.scratch_release(mark_);
    --ctx_.scratch_depth;
  }
  template <typename T>
  T* take(std::size_t n) {
    return static_cast<T*>(ctx_.scratch_take(n * sizeof(T)));
  }

 private:
  GpuContext& ctx_;
  std::size_t mark_;
};

// ---- DeviceBuffer members ------------------------------------------------------------------
template <typename T>
DeviceBuffer<T>::DeviceBuffer(GpuContext& ctx, std::size_t n) : ctx_(&ctx), n_(n) {
  p_ = n ? static_cast<T*>(ctx.allocator().allocate(n * sizeof(T))) : nullptr;
}
template <typename T>
void DeviceBuffer<T>::reset() {
  if (p_) ctx_->allocator().release(p_);
  p_ = nullptr;
  n_ = 0;
}
template <typename T>
void DeviceBuffer<T>::upload(const T* host, std::size_t n) {
  DFM_ASSERT(n <= n_);
  if (n) DFM_CUDA_CHECK(cudaMemcpyAsync(p_, host, n * sizeof(T), cudaMemcpyHostToDevice, ctx_->stream()));
  ctx_->sync();  // the host array may go away right after
}
template <typename T>
void DeviceBuffer<T>::download(T* host, std::size_t n) const {
  DFM_ASSERT(n <= n_);
  if (n) DFM_CUDA_CHECK(cudaMemcpyAsync(host, p_, n * sizeof(T), cudaMemcpyDeviceToHost, ctx_->stream()));
  ctx_->sync();
}
template <typename T>
void DeviceBuffer<T>::zero() {
  if (n_) DFM_CUDA_CHECK(cudaMemsetAsync(p_, 0, n_ * sizeof(T), ctx_->stream()));
}

}  // namespace dfm::cuda
