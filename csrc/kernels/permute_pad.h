// permute_pad, per element: out[i, j, t] = w[rows[i], cols[j], t], or 0 where either index is -1.
// Shared by csrc/cpu/permute_pad.cpp and csrc/cuda/permute_pad.cu.
#pragma once
#include "kernels/common.h"

namespace hm {

// Geometry of a [n0, n1, *trailing] operand seen as three axes; trailing dims are reached through
// `trailing_offsets` (one element offset per trailing position) so any strides work.
struct Axes3 {
  int64_t n0, n1, n_trailing;
  int64_t stride0, stride1;
};

// Offset of w's element feeding out[i, j, t] (before the trailing offset), or -1 for padding.
HM_HD int64_t permute_pad_source(const Axes3& w, const int64_t* rows, int64_t rows_stride, const int64_t* cols,
                                 int64_t cols_stride, int64_t i, int64_t j) {
  const int64_t r = mapped_index(rows, rows_stride, i);
  const int64_t c = mapped_index(cols, cols_stride, j);
  if (r == kPad || c == kPad) return -1;
  return r * w.stride0 + c * w.stride1;
}

}  // namespace hm
