// One flat parameter buffer and one flat gradient buffer with named views: the optimiser is one
// loop, zero-grad one fill, a checkpoint one write. Names follow the official PyTorch state_dict
// ("convs.0.Wq.weight", "fcs.1.bias", "bns.2.weight"), in its order.
#pragma once
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/tensor.hpp"

namespace dfm {

struct ParamSlot {
  std::string name;
  Index offset = 0, rows = 0, cols = 0;  // a vector has cols == 1
  Index size() const { return rows * cols; }
};

class ParamStore {
 public:
  // Registers a parameter; returns its slot index. Call allocate() once all are registered.
  int add(const std::string& name, Index rows, Index cols);
  void allocate();

  MatMap mat(int slot) { return MatMap(values.data() + slots[slot].offset, slots[slot].rows, slots[slot].cols); }
  ConstMatMap mat(int slot) const {
    return ConstMatMap(values.data() + slots[slot].offset, slots[slot].rows, slots[slot].cols);
  }
  MatMap grad_mat(int slot) { return MatMap(grads.data() + slots[slot].offset, slots[slot].rows, slots[slot].cols); }
  float* ptr(int slot) { return values.data() + slots[slot].offset; }
  const float* ptr(int slot) const { return values.data() + slots[slot].offset; }
  float* grad_ptr(int slot) { return grads.data() + slots[slot].offset; }
  int find(const std::string& name) const;  // -1 when absent
  void zero_grad();
  Index total() const { return static_cast<Index>(values.size()); }

  std::vector<ParamSlot> slots;
  FloatBuffer values, grads;  // aligned: results must not depend on where the heap puts them
};

}  // namespace dfm
