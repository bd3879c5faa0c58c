#include "train/adam.hpp"

#include <cmath>

namespace dfm {

void Adam::step(ParamStore& params) {
  const Index n = params.total();
  if (m_.empty()) {
    m_.assign(static_cast<size_t>(n), 0.0f);
    v_.assign(static_cast<size_t>(n), 0.0f);
  }
  ++t_;
  // The same arithmetic as torch.optim.Adam (single-tensor path): the bias corrections are
  // applied to the step size and to the denominator, not to the moments.
  const double bc1 = 1.0 - std::pow(static_cast<double>(opt_.beta1), static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(static_cast<double>(opt_.beta2), static_cast<double>(t_));
  const float step_size = static_cast<float>(opt_.lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  float* p = params.values.data();
  const float* g = params.grads.data();
  const float b1 = opt_.beta1, b2 = opt_.beta2, wd = opt_.weight_decay, eps = opt_.eps;
#pragma omp parallel for simd schedule(static)
  for (Index i = 0; i < n; ++i) {
    const float gi = g[i] + wd * p[i];
    m_[i] = b1 * m_[i] + (1.0f - b1) * gi;
    v_[i] = b2 * v_[i] + (1.0f - b2) * gi * gi;
    p[i] -= step_size * m_[i] / (std::sqrt(v_[i]) / bc2_sqrt + eps);
  }
}

}  // namespace dfm
