#include "model/params.hpp"

#include <algorithm>

namespace dfm {

int ParamStore::add(const std::string& name, Index rows, Index cols) {
  DFM_ASSERT(values.empty());
  const Index offset = slots.empty() ? 0 : slots.back().offset + slots.back().size();
  slots.push_back(ParamSlot{name, offset, rows, cols});
  return static_cast<int>(slots.size()) - 1;
}

void ParamStore::allocate() {
  const Index n = slots.empty() ? 0 : slots.back().offset + slots.back().size();
  values.assign(static_cast<size_t>(n), 0.0f);
  grads.assign(static_cast<size_t>(n), 0.0f);
}

int ParamStore::find(const std::string& name) const {
  for (size_t i = 0; i < slots.size(); ++i)
    if (slots[i].name == name) return static_cast<int>(i);
  return -1;
}

void ParamStore::zero_grad() { std::fill(grads.begin(), grads.end(), 0.0f); }

}  // namespace dfm
