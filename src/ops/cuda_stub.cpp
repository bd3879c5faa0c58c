// Built when DIFFORMER_CUDA is off: the library still links, and asking for the GPU says why not.
#include "ops/cuda_backend.hpp"

#include "core/error.hpp"

namespace dfm::cuda {

bool available() { return false; }
std::string describe() { return "built without CUDA (configure with -DDIFFORMER_CUDA=ON)"; }
void require() { fail("--device cuda: this difformer was ", describe()); }

}  // namespace dfm::cuda
