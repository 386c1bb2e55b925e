// Turns Python objects that speak DLPack (torch tensors, numpy arrays, ...) into TensorViews,
// zero-copy. The capsules stay alive in a DLPackArgs until the call returns.
#pragma once
#include <pybind11/pybind11.h>

#include <vector>

#include "common/op_checks.h"
#include "common/tensor_view.h"

namespace hm {

class DLPackArgs {
 public:
  // fn / arg name the call and argument in error messages. Raises TypeError for non-DLPack objects.
  TensorView view(pybind11::handle obj, const char* fn, const char* arg);
  // None -> nullptr; otherwise a pointer into this object's storage, valid for its lifetime.
  const TensorView* optional_view(pybind11::handle obj, const char* fn, const char* arg);

 private:
  std::vector<pybind11::object> capsules_;
  std::vector<std::unique_ptr<TensorView>> optional_views_;
};

// Imports ops.cost_matrix's terms: a sequence of (A, B, map or None, block) tuples.
std::vector<CostTermViews> import_cost_terms(DLPackArgs& args, const pybind11::sequence& terms, const char* fn);

// Registers translators for hm::ValueError / hm::TypeError on a module.
void register_exceptions();

}  // namespace hm
