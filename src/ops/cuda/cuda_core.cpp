#include "ops/cuda/cuda_core.hpp"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>

#include "ops/cuda_backend.hpp"

namespace dfm::cuda {

void fail_call(const char* lib, const std::string& what, const char* call, const char* file, int line,
               const std::string& hint) {
  std::ostringstream os;
  os << lib << " error '" << what << "' in " << call << " at " << file << ":" << line;
  if (!hint.empty()) os << "\n  HINT: " << hint;
  throw Error(os.str());
}

void check_cuda(cudaError_t e, const char* call, const char* file, int line) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // clear a non-sticky error so that the process can go on
  std::string hint;
  switch (e) {
    case cudaErrorMemoryAllocation:
      hint = "the GPU is out of memory: use fewer nodes, a smaller --hidden, or mini-batches";
      break;
    case cudaErrorNoDevice:
    case cudaErrorInvalidDevice:
      hint = "no usable CUDA device: check nvidia-smi and CUDA_VISIBLE_DEVICES, or run with --device cpu";
      break;
    case cudaErrorInsufficientDriver:
      hint = "the NVIDIA driver is older than this CUDA runtime: update the driver or rebuild with an older toolkit";
      break;
    case cudaErrorNoKernelImageForDevice:
    case cudaErrorUnsupportedPtxVersion:
      hint = "the kernels were built for another GPU: reconfigure with -DCMAKE_CUDA_ARCHITECTURES=<this GPU's sm>";
      break;
    case cudaErrorStreamCaptureUnsupported:
    case cudaErrorStreamCaptureInvalidated:
      hint = "an operation is not allowed inside CUDA graph capture: set DIFFORMER_CUDA_GRAPH=0";
      break;
    default:
      hint = "errors of earlier asynchronous kernels surface here: rerun with CUDA_LAUNCH_BLOCKING=1 to locate it";
  }
  fail_call("CUDA", cudaGetErrorString(e), call, file, line, hint);
}

void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  std::string hint = "a dimension or leading dimension is out of range for this call";
  if (s == CUBLAS_STATUS_ALLOC_FAILED) hint = "the GPU is out of memory";
  if (s == CUBLAS_STATUS_NOT_INITIALIZED) hint = "cuBLAS could not start: check the driver and the GPU";
  if (s == CUBLAS_STATUS_EXECUTION_FAILED) hint = "a kernel failed: rerun with CUDA_LAUNCH_BLOCKING=1";
  fail_call("cuBLAS", cublasGetStatusString(s), call, file, line, hint);
}

void check_cusparse(cusparseStatus_t s, const char* call, const char* file, int line) {
  if (s == CUSPARSE_STATUS_SUCCESS) return;
  fail_call("cuSPARSE", cusparseGetErrorString(s), call, file, line,
            s == CUSPARSE_STATUS_ALLOC_FAILED ? "the GPU is out of memory" : "check the sparse matrix's shape and indices");
}

// ---- allocator -------------------------------------------------------------------------------
void* Allocator::allocate(std::size_t bytes) {
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    std::size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    std::ostringstream os;
    os << cudaGetErrorString(e) << ": cannot allocate " << bytes / 1048576.0 << " MiB ("
       << current_ / 1048576.0 << " MiB held by difformer, " << free_b / 1048576.0 << " MiB free of "
       << total_b / 1048576.0 << ")";
    fail_call("CUDA", os.str(), "cudaMalloc", __FILE__, __LINE__,
              "the problem does not fit in GPU memory: use fewer nodes, a smaller --hidden, or mini-batches");
  }
  sizes_[p] = bytes;
  current_ += static_cast<std::int64_t>(bytes);
  peak_ = std::max(peak_, current_);
  return p;
}

void Allocator::release(void* p) {
  if (!p) return;
  auto it = sizes_.find(p);
  DFM_ASSERT(it != sizes_.end());
  current_ -= static_cast<std::int64_t>(it->second);
  sizes_.erase(it);
  cudaFree(p);  // not checked: runs from destructors, possibly during error unwinding
}

Allocator::~Allocator() {
  for (auto& [p, n] : sizes_) cudaFree(p);
}

// ---- context ---------------------------------------------------------------------------------
namespace {
constexpr std::size_t kBlasWorkspace = 16u << 20;  // fixed, so that cuBLAS never allocates in capture
constexpr std::size_t kInitialScratch = 1u << 20;
}  // namespace

GpuContext::GpuContext(Precision precision, int device) : precision_(precision), device_(device) {
  require();
  DFM_CUDA_CHECK(cudaSetDevice(device_));
  DFM_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, device_));
  DFM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  DFM_CUBLAS_CHECK(cublasCreate(&blas_));
  DFM_CUBLAS_CHECK(cublasSetStream(blas_, stream_));
  // fp32: true single precision (no TF32). tf32: tensor cores with TF32 inputs in GEMMs.
  DFM_CUBLAS_CHECK(cublasSetMathMode(blas_, precision_ == Precision::tf32 ? CUBLAS_TF32_TENSOR_OP_MATH
                                                                          : CUBLAS_DEFAULT_MATH));
  blas_workspace_ = alloc_.allocate(kBlasWorkspace);
  DFM_CUBLAS_CHECK(cublasSetWorkspace(blas_, blas_workspace_, kBlasWorkspace));
  DFM_CUBLAS_CHECK(cublasLtCreate(&lt_));
  if (const char* e = std::getenv("DIFFORMER_NO_LT")) lt_disabled = std::string(e) == "1";
  DFM_CUSPARSE_CHECK(cusparseCreate(&sparse_));
  DFM_CUSPARSE_CHECK(cusparseSetStream(sparse_, stream_));
  reserve_scratch(kInitialScratch);
}

GpuContext::~GpuContext() {
  if (stream_) cudaStreamSynchronize(stream_);
  if (sparse_) cusparseDestroy(sparse_);
  if (lt_) cublasLtDestroy(lt_);
  if (blas_) cublasDestroy(blas_);
  alloc_.release(blas_workspace_);
  alloc_.release(ones_);
  alloc_.release(scratch_);
  if (stream_) cudaStreamDestroy(stream_);
}

std::size_t GpuContext::blas_workspace_bytes() const { return kBlasWorkspace; }

void GpuContext::sync() const { DFM_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

bool GpuContext::capturing() const {
  cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
  DFM_CUDA_CHECK(cudaStreamIsCapturing(stream_, &st));
  return st != cudaStreamCaptureStatusNone;
}

const float* GpuContext::ones(std::size_t n) {
  if (n > ones_n_) {
    DFM_ASSERT(!capturing());
    sync();
    alloc_.release(ones_);
    const std::size_t m = std::max<std::size_t>(n, 4096);
    ones_ = static_cast<float*>(alloc_.allocate(m * sizeof(float)));
    std::vector<float> h(m, 1.0f);
    DFM_CUDA_CHECK(cudaMemcpy(ones_, h.data(), m * sizeof(float), cudaMemcpyHostToDevice));
    ones_n_ = m;
  }
  return ones_;
}

void GpuContext::reserve_scratch(std::size_t bytes) {
  if (bytes <= scratch_cap_) return;
  DFM_ASSERT(scratch_depth == 0 && !capturing());
  sync();  // kernels still queued may use the old arena
  alloc_.release(scratch_);
  scratch_ = static_cast<char*>(alloc_.allocate(bytes));
  scratch_cap_ = bytes;
  scratch_used_ = 0;
}

void GpuContext::ensure_scratch(std::size_t bytes) {
  if (scratch_used_ + bytes <= scratch_cap_) return;
  if (scratch_depth != 0 || capturing())
    fail("internal: GPU scratch arena too small (", scratch_cap_, " bytes, ", scratch_used_, " used, ", bytes,
         " more needed) inside an op or a graph capture; run the computation once eagerly first");
  reserve_scratch(std::max(bytes, 2 * scratch_cap_));
}

void* GpuContext::scratch_take(std::size_t bytes) {
  const std::size_t aligned = (bytes + 255) & ~std::size_t{255};
  if (scratch_used_ + aligned > scratch_cap_)  // growing would move memory enclosing scopes still use
    fail("internal: GPU scratch arena too small (", scratch_cap_, " bytes, need ", scratch_used_ + aligned,
         "): the op must ensure_scratch() its whole need before opening its scope");
  void* p = scratch_ + scratch_used_;
  scratch_used_ += aligned;
  return p;
}

}  // namespace dfm::cuda
