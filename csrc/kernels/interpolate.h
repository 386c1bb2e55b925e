// interpolate, per element: out[k] = (1 - lambda_k) * a + lambda_k * b~, b~ = permute_pad(b, rows, cols).
// Shared by csrc/cpu/interpolate.cpp and csrc/cuda/interpolate.cu.
#pragma once
#include "kernels/permute_pad.h"

namespace hm {

// The target value seen by base slot (i, j): b's element, 0 for padding (fill="zero"), or a's own
// value (fill="base": the base unit is kept rather than shrunk toward zero).
template <typename Acc>
HM_HD Acc interpolate_target_value(bool is_pad, Acc b_value, Acc a_value, bool fill_base) {
  return is_pad ? (fill_base ? a_value : Acc(0)) : b_value;
}

// (1 - lambda) * a + lambda * b, written as in DESIGN.md; lambda = 0 returns a exactly and
// lambda = 1 returns b exactly, which the invariance tests rely on.
template <typename Acc>
HM_HD Acc interpolate_value(Acc a, Acc b, Acc lambda) {
  return (Acc(1) - lambda) * a + lambda * b;
}

// One output element. A padded slot under fill="base" returns a itself, bit for bit: the base unit
// is left untouched, which (1 - λ)·a + λ·a would not guarantee after rounding.
template <typename Acc>
HM_HD Acc interpolate_element(Acc a, Acc b, Acc lambda, bool keep_base) {
  return keep_base ? a : interpolate_value(a, b, lambda);
}

}  // namespace hm
