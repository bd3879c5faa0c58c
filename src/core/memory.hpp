// Process memory figures for reports and benchmarks.
#pragma once
#include <cstdint>

namespace dfm {
std::int64_t peak_rss_bytes();     // high-water mark of the resident set (getrusage)
std::int64_t current_rss_bytes();  // resident set now (/proc/self/statm)
}  // namespace dfm
