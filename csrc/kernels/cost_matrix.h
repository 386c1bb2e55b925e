// cost_matrix's inner-index logic, shared by the CPU and CUDA backends.
//
// C[i, j] = sum_terms sum_{q: map[q] >= 0} sum_{r < block} A[i, q*block + r] * B[j, map[q]*block + r]
//
// Padded slots (map[q] == -1) are dropped before any arithmetic: each term's inner axis is compacted
// to its valid slots, and the terms' compacted axes are concatenated into one inner axis of length
// sum_t block_t * n_valid_t. A backend walks that axis in K-blocks; for inner position p it asks
// cost_term_of which term p belongs to and cost_inner_cols which columns of that term's A and B it
// multiplies. Neither side ever materializes a padded or gathered operand.
#pragma once
#include <cstdint>

#include "kernels/common.h"

namespace hm {

// Whether slot q of a term's inner axis contributes (map: [k] int64 or null = identity).
HM_HD bool cost_slot_valid(const int64_t* map, int64_t map_stride, int64_t q) {
  return mapped_index(map, map_stride, q) != kPad;
}

// Columns of A and B that position p of one term's compacted inner axis refers to.
// valid: [n_valid] the slots q with map[q] >= 0, ascending (null: every slot, i.e. identity map).
HM_HD void cost_inner_cols(const int64_t* valid, const int64_t* map, int64_t map_stride, int64_t block, int64_t p,
                           int64_t* a_col, int64_t* b_col) {
  const int64_t s = p / block, r = p - s * block;
  const int64_t q = valid ? valid[s] : s;
  *a_col = q * block + r;
  *b_col = mapped_index(map, map_stride, q) * block + r;
}

// The term that position p of the concatenated inner axis belongs to.
// term_start: [n_terms + 1] prefix sums of the terms' compacted lengths; 0 <= p < term_start[n_terms].
// Linear scan: a cost matrix has a handful of terms (the parameters touching one permutation group).
HM_HD int cost_term_of(const int64_t* term_start, int n_terms, int64_t p) {
  int t = 0;
  while (t + 1 < n_terms && p >= term_start[t + 1]) ++t;
  return t;
}

}  // namespace hm
