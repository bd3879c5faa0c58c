// The explicit execution context: thread count and the random stream. There are no hidden
// globals; whatever a computation needs besides its tensors comes through here.
#pragma once
#include <cstdint>
#include <random>

namespace dfm {

struct Context {
  int threads = 0;  // 0 = OpenMP default
  std::mt19937_64 rng{0};

  explicit Context(std::uint64_t seed = 0, int threads_ = 0);
  void seed(std::uint64_t s) { rng.seed(s); }
  // Applies `threads` to OpenMP (and Eigen, which uses OpenMP's pool).
  void apply_threads() const;
};

// Keeps Eigen single-threaded for its lifetime, then restores the previous count. For code that
// splits rows over OpenMP threads itself (Eigen's own GEMM teams would only add fork/join and
// busy-waiting there) and for the small D x D products, where fork/join costs more than it saves.
class EigenSerialScope {
 public:
  EigenSerialScope();
  ~EigenSerialScope();
  EigenSerialScope(const EigenSerialScope&) = delete;
  EigenSerialScope& operator=(const EigenSerialScope&) = delete;

 private:
  int saved_;
};

}  // namespace dfm
