// CPU backend entry points. Arguments arrive validated by the bindings (shapes, dtypes, devices,
// index maps), so these functions only loop. One file per primitive: csrc/cpu/<name>.cpp.
#pragma once
#include <cstdint>
#include <vector>

#include "common/tensor_view.h"

namespace hm::cpu {

// w: [n0, n1, *trailing] (or [n0]); rows: [m0] int64 or null; cols: [m1] int64 or null;
// out: [m0, m1, *trailing] contiguous. out[i, j, ...] = w[rows[i], cols[j], ...], 0 where -1.
void permute_pad(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out);

// a: [n0, n1, *trailing]; b: [m0, m1, *trailing]; out: [K, n0, n1, *trailing] contiguous.
// out[k] = (1 - lambdas[k]) * a + lambdas[k] * permute_pad(b, rows, cols); fill_base: padding takes a.
void interpolate(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas,
                 const TensorView* rows, const TensorView* cols, bool fill_base, const TensorView& out);

// tensors: T views of one shape; coeffs: [K, T] row-major; out: [K, *shape] contiguous.
void weighted_sum(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                  const TensorView& out);

// One term of a cost matrix: C[i, j] += sum_{q: map[q] >= 0} sum_{r < block} a[i, q*block + r] * b[j, map[q]*block + r].
struct CostTerm {
  TensorView a;                // [n_a, k * block], float32 or float64, any strides
  TensorView b;                // [n_b, k' * block], same dtype as a
  TensorView map;              // [k] int64, entries in [-1, k'); ignored unless has_map
  bool has_map = false;        // false: identity map (k == k')
  int64_t block;               // >= 1
};
// out: [n_a, n_b] contiguous, dtype of the terms; overwritten (not accumulated into).
void cost_matrix(const std::vector<CostTerm>& terms, const TensorView& out);

// cost: [n_rows, n_cols] float32/float64, any strides, no NaN (checked by the solver, which throws
// hm::ValueError naming `cost`). row_ind, col_ind: [min(n_rows, n_cols)] int64 contiguous outputs,
// rows sorted ascending (scipy.optimize.linear_sum_assignment's contract). Throws hm::ValueError
// "linear_assignment: cost matrix is infeasible" when no finite assignment exists.
void linear_assignment(const TensorView& cost, bool maximize, const TensorView& row_ind, const TensorView& col_ind);
// One linear_assignment per matrix of cost [B, n_rows, n_cols] into row_ind/col_ind [B, min(n_rows, n_cols)],
// the matrices spread over the thread pool.
void linear_assignment_batched(const TensorView& cost, bool maximize, const TensorView& row_ind,
                               const TensorView& col_ind);

}  // namespace hm::cpu
