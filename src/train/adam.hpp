// Adam with COUPLED L2 weight decay (grad += wd * param, as torch.optim.Adam's weight_decay),
// applied to every parameter of the flat buffer in one loop.
#pragma once
#include <vector>

#include "model/params.hpp"

namespace dfm {

struct AdamOptions {
  float lr = 1e-3f;
  float weight_decay = 0.0f;
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
};

class Adam {
 public:
  explicit Adam(const AdamOptions& opt) : opt_(opt) {}
  void step(ParamStore& params);
  long steps() const { return t_; }

 private:
  AdamOptions opt_;
  std::vector<float> m_, v_;
  long t_ = 0;
};

}  // namespace dfm
