#include "core/profile.hpp"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace dfm::prof {
namespace {
struct Entry {
  const char* name;
  double ms;
  long calls;
};
struct Table {
  std::mutex mu;
  std::vector<Entry> entries;
  ~Table() {
    for (const auto& e : entries) std::fprintf(stderr, "profile %-22s %10.2f ms %8ld calls\n", e.name, e.ms, e.calls);
  }
};
Table& table() {
  static Table t;
  return t;
}
}  // namespace

bool enabled() {
  static const bool on = std::getenv("DIFFORMER_PROFILE") != nullptr;
  return on;
}

void add(const char* name, double ms) {
  Table& t = table();
  std::lock_guard<std::mutex> lock(t.mu);
  for (auto& e : t.entries)
    if (e.name == name || std::strcmp(e.name, name) == 0) {
      e.ms += ms;
      ++e.calls;
      return;
    }
  t.entries.push_back({name, ms, 1});
}

}  // namespace dfm::prof
