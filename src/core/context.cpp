#include "core/context.hpp"

#include <Eigen/Core>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace dfm {

Context::Context(std::uint64_t seed_, int threads_) : threads(threads_), rng(seed_) { apply_threads(); }

void Context::apply_threads() const {
#ifdef _OPENMP
  if (threads > 0) omp_set_num_threads(threads);
#endif
  if (threads > 0) Eigen::setNbThreads(threads);
}

}  // namespace dfm
