// weighted_sum, per element: out[k] = sum_t coeffs[k, t] * x_t.
// Shared by csrc/cpu/weighted_sum.cpp and csrc/cuda/weighted_sum.cu.
#pragma once
#include "kernels/common.h"

namespace hm {

// values: the T inputs at one element, already in the accumulator type; coeffs_k: row k of coeffs.
template <typename Acc>
HM_HD Acc weighted_sum_value(const Acc* values, const Acc* coeffs_k, int64_t n_tensors) {
  Acc sum = Acc(0);
  for (int64_t t = 0; t < n_tensors; ++t) sum += coeffs_k[t] * values[t];
  return sum;
}

}  // namespace hm
