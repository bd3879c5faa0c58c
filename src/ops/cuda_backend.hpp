// Entry points of the optional CUDA backend that the rest of the library may call whether or not
// it was compiled in (src/ops/cuda_stub.cpp answers when it was not).
#pragma once
#include <string>

namespace dfm::cuda {
bool available();        // compiled in AND a device is present
std::string describe();  // one line: device name and memory, or why there is none
void require();          // throws dfm::Error naming the reason when !available()
}  // namespace dfm::cuda
