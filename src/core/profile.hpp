// Developer aid: DIFFORMER_PROFILE=1 in the environment sums the wall time of named sections over
// the process and prints them to stderr at exit. Off, a section costs one branch.
#pragma once
#include <chrono>

namespace dfm::prof {

bool enabled();
// Adds ms to section `name` (a string literal: compared by address, then by content).
void add(const char* name, double ms);

class Section {
 public:
  explicit Section(const char* name) : name_(enabled() ? name : nullptr) {
    if (name_) t0_ = std::chrono::steady_clock::now();
  }
  void stop() {
    if (!name_) return;
    add(name_, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0_).count());
    name_ = nullptr;
  }
  ~Section() { stop(); }
  Section(const Section&) = delete;
  Section& operator=(const Section&) = delete;

 private:
  const char* name_;
  std::chrono::steady_clock::time_point t0_;
};

}  // namespace dfm::prof
