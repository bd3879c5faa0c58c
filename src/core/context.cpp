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

EigenSerialScope::EigenSerialScope() : saved_(Eigen::nbThreads()) { Eigen::setNbThreads(1); }
EigenSerialScope::~EigenSerialScope() { Eigen::setNbThreads(saved_); }

}  // namespace dfm
