// Output files are written to PATH.tmp and renamed into place, so a failure never leaves a
// half-written PATH behind.
#pragma once
#include <string>

namespace dfm {
void write_text_atomic(const std::string& path, const std::string& content);
}  // namespace dfm
