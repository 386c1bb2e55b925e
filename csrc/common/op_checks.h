// Validation of each primitive's arguments, shared by the CPU and CUDA modules so that both reject
// exactly the same inputs with the same messages. Runs before any kernel sees a pointer.
#pragma once
#include <vector>

#include "common/tensor_view.h"

namespace hm {

void check_permute_pad(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out);
void check_interpolate(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas,
                       const TensorView* rows, const TensorView* cols, const TensorView& out);
void check_weighted_sum(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                        const TensorView& out);

struct CostTermViews {
  TensorView a, b, map;
  bool has_map;
  int64_t block;
};
// float16 / bfloat16 terms accumulate in float32 and give a float32 C; float64 stays float64.
DType cost_out_dtype(DType input);
void check_cost_matrix(const std::vector<CostTermViews>& terms, const TensorView& out);
void check_linear_assignment(const TensorView& cost, const TensorView& row_ind, const TensorView& col_ind);
void check_linear_assignment_batched(const TensorView& cost, const TensorView& row_ind, const TensorView& col_ind);

// Raises if the memory `out` may write overlaps the memory `input` reads (out= aliasing an input).
void check_no_overlap(const TensorView& out, const TensorView& input, const char* fn, const char* input_arg);

}  // namespace hm
