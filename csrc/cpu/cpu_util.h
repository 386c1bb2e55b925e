// Small helpers shared by the CPU loops: dtype dispatch and strided-row addressing.
#pragma once
#include <cstdint>
#include <vector>

#include "common/dispatch.h"
#include "common/tensor_view.h"
#include "kernels/common.h"

namespace hm::cpu {

// Element offsets of every position of dims [first_dim, ndim) of t, in row-major order, so loops
// can address arbitrary trailing strides with one lookup (conv kernels have 1–49 positions).
inline std::vector<int64_t> trailing_offsets(const TensorView& t, int first_dim) {
  std::vector<int64_t> offsets{0};
  for (int d = first_dim; d < t.ndim; ++d) {
    std::vector<int64_t> next;
    next.reserve(offsets.size() * static_cast<size_t>(t.shape[d]));
    for (int64_t base : offsets)
      for (int64_t k = 0; k < t.shape[d]; ++k) next.push_back(base + k * t.strides[d]);
    offsets.swap(next);
  }
  return offsets;
}

// Offset of the start of row `row` when t is seen as [prod(shape[:-1]), shape[-1]].
inline int64_t row_offset(const TensorView& t, int64_t row) {
  int64_t offset = 0;
  for (int d = t.ndim - 2; d >= 0; --d) {
    const int64_t n = t.shape[d];
    offset += (row % n) * t.strides[d];
    row /= n;
  }
  return offset;
}

// How many output elements a parallel chunk should cover at least: below this, threads cost more
// than they save.
constexpr int64_t kMinElementsPerTask = 1 << 15;

}  // namespace hm::cpu
