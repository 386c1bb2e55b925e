#include "common/op_checks.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace hm {
namespace {

void byte_range(const TensorView& t, uintptr_t& lo, uintptr_t& hi) {
  int64_t min_off = 0, max_off = 0;
  for (int d = 0; d < t.ndim; ++d) {
    if (t.shape[d] == 0) {
      lo = hi = 0;
      return;
    }
    const int64_t span = (t.shape[d] - 1) * t.strides[d];
    (span < 0 ? min_off : max_off) += span;
  }
  const int64_t size = dtype_size(t.dtype);
  lo = reinterpret_cast<uintptr_t>(t.data) + min_off * size;
  hi = reinterpret_cast<uintptr_t>(t.data) + (max_off + 1) * size;
}

void require_device_of(const TensorView& t, const TensorView& ref, const char* fn, const char* arg, const char* ref_arg) {
  require_same_device(t, ref, fn, arg, ref_arg);
}

// Checks an optional index map over an axis of `n_source` entries; its device must match `ref`'s.
void check_map(const TensorView* map, const TensorView& ref, const char* fn, const char* arg, const char* ref_arg,
               int64_t n_source, const std::string& source_desc) {
  if (!map) return;
  require_device_of(*map, ref, fn, arg, ref_arg);
  check_index_map(*map, fn, arg, n_source, source_desc.c_str());
}

std::string dim_desc(const char* arg, int dim) { return concat(arg, ".shape[", dim, "]"); }

void check_out_common(const TensorView& out, const TensorView& ref, DType dtype, const char* fn, const char* ref_arg) {
  require_same_device(out, ref, fn, "out", ref_arg);
  if (out.dtype != dtype) type_error(fn, ": out must be ", dtype_name(dtype), ", got ", dtype_name(out.dtype));
  require_writable_contiguous(out, fn, "out");
}

}  // namespace

void check_no_overlap(const TensorView& out, const TensorView& input, const char* fn, const char* input_arg) {
  uintptr_t olo, ohi, ilo, ihi;
  byte_range(out, olo, ohi);
  byte_range(input, ilo, ihi);
  if (olo < ohi && ilo < ihi && olo < ihi && ilo < ohi)
    value_error(fn, ": out overlaps the memory of ", input_arg, "; pass a separate buffer");
}

void check_permute_pad(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out) {
  const char* fn = "permute_pad";
  require_min_ndim(w, fn, "w", 1);
  require_floating(w, fn, "w");
  if (w.ndim == 1 && cols) value_error(fn, ": cols must be None for a 1-D w (shape ", w.shape_str(), ")");
  check_map(rows, w, fn, "rows", "w", w.shape[0], dim_desc("w", 0));
  if (w.ndim >= 2) check_map(cols, w, fn, "cols", "w", w.shape[1], dim_desc("w", 1));
  int64_t shape[kMaxDims];
  for (int d = 0; d < w.ndim; ++d) shape[d] = w.shape[d];
  if (rows) shape[0] = rows->shape[0];
  if (cols) shape[1] = cols->shape[0];
  check_out_common(out, w, w.dtype, fn, "w");
  require_shape(out, fn, "out", shape, w.ndim);
  check_no_overlap(out, w, fn, "w");
  // The maps are read while out is written: out over a map's memory gathers from garbage indices.
  if (rows) check_no_overlap(out, *rows, fn, "rows");
  if (cols) check_no_overlap(out, *cols, fn, "cols");
}

void check_interpolate(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas,
                       const TensorView* rows, const TensorView* cols, const TensorView& out) {
  const char* fn = "interpolate";
  require_min_ndim(a, fn, "a", 1);
  require_floating(a, fn, "a");
  require_same_dtype(b, a, fn, "b", "a");
  require_same_device(b, a, fn, "b", "a");
  if (b.ndim != a.ndim)
    value_error(fn, ": b must have the same number of dimensions as a, got a ", a.shape_str(), " and b ", b.shape_str());
  if (a.ndim == 1 && cols) value_error(fn, ": cols must be None for 1-D a and b");
  for (int d = 2; d < a.ndim; ++d)
    if (a.shape[d] != b.shape[d])
      value_error(fn, ": trailing dims must agree, got a ", a.shape_str(), " and b ", b.shape_str(), " (dim ", d, ")");
  for (int d = 0; d < std::min(a.ndim, 2); ++d) {
    const TensorView* map = d == 0 ? rows : cols;
    const char* name = d == 0 ? "rows" : "cols";
    if (map) {
      check_map(map, a, fn, name, "a", b.shape[d], dim_desc("b", d));
      if (map->shape[0] != a.shape[d])
        value_error(fn, ": ", name, " has ", map->shape[0], " entries but a.shape[", d, "] = ", a.shape[d],
                    " (one entry per base slot)");
    } else if (a.shape[d] != b.shape[d]) {
      value_error(fn, ": a.shape[", d, "] = ", a.shape[d], " differs from b.shape[", d, "] = ", b.shape[d], "; pass ",
                  name, " to map b onto a");
    }
  }
  for (size_t k = 0; k < lambdas.size(); ++k)
    if (!std::isfinite(lambdas[k])) value_error(fn, ": lambdas[", k, "] = ", lambdas[k], " is not finite");
  int64_t shape[kMaxDims + 1];
  shape[0] = static_cast<int64_t>(lambdas.size());
  for (int d = 0; d < a.ndim; ++d) shape[d + 1] = a.shape[d];
  if (a.ndim + 1 > kMaxDims) value_error(fn, ": a has too many dimensions (", a.ndim, ")");
  check_out_common(out, a, a.dtype, fn, "a");
  require_shape(out, fn, "out", shape, a.ndim + 1);
  check_no_overlap(out, a, fn, "a");
  check_no_overlap(out, b, fn, "b");
  if (rows) check_no_overlap(out, *rows, fn, "rows");
  if (cols) check_no_overlap(out, *cols, fn, "cols");
}

void check_weighted_sum(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                        const TensorView& out) {
  const char* fn = "weighted_sum";
  if (tensors.empty()) value_error(fn, ": tensors must not be empty");
  const TensorView& ref = tensors[0];
  require_floating(ref, fn, "tensors[0]");
  for (size_t t = 1; t < tensors.size(); ++t) {
    const std::string name = concat("tensors[", t, "]");
    require_same_dtype(tensors[t], ref, fn, name.c_str(), "tensors[0]");
    require_same_device(tensors[t], ref, fn, name.c_str(), "tensors[0]");
    bool same = tensors[t].ndim == ref.ndim;
    for (int d = 0; same && d < ref.ndim; ++d) same = tensors[t].shape[d] == ref.shape[d];
    if (!same)
      value_error(fn, ": ", name, " has shape ", tensors[t].shape_str(), " but tensors[0] has shape ", ref.shape_str());
  }
  if (static_cast<int64_t>(coeffs.size()) != K * static_cast<int64_t>(tensors.size()))
    value_error(fn, ": coeffs must have shape (K, ", tensors.size(), ")");
  for (size_t i = 0; i < coeffs.size(); ++i)
    if (!std::isfinite(coeffs[i])) value_error(fn, ": coeffs contains a non-finite value (", coeffs[i], ")");
  if (ref.ndim + 1 > kMaxDims) value_error(fn, ": tensors have too many dimensions (", ref.ndim, ")");
  int64_t shape[kMaxDims + 1];
  shape[0] = K;
  for (int d = 0; d < ref.ndim; ++d) shape[d + 1] = ref.shape[d];
  check_out_common(out, ref, ref.dtype, fn, "tensors[0]");
  require_shape(out, fn, "out", shape, ref.ndim + 1);
  for (size_t t = 0; t < tensors.size(); ++t) check_no_overlap(out, tensors[t], fn, concat("tensors[", t, "]").c_str());
}

DType cost_out_dtype(DType input) { return input == DType::f64 ? DType::f64 : DType::f32; }

void check_cost_matrix(const std::vector<CostTermViews>& terms, const TensorView& out) {
  const char* fn = "cost_matrix";
  if (terms.empty()) value_error(fn, ": terms must not be empty");
  const TensorView& ref = terms[0].a;
  for (size_t t = 0; t < terms.size(); ++t) {
    const CostTermViews& term = terms[t];
    const std::string a = concat("terms[", t, "].A"), b = concat("terms[", t, "].B"), m = concat("terms[", t, "].map");
    require_ndim(term.a, fn, a.c_str(), 2);
    require_ndim(term.b, fn, b.c_str(), 2);
    require_floating(term.a, fn, a.c_str());
    require_same_dtype(term.a, ref, fn, a.c_str(), "terms[0].A");
    require_same_dtype(term.b, ref, fn, b.c_str(), "terms[0].A");
    require_same_device(term.a, ref, fn, a.c_str(), "terms[0].A");
    require_same_device(term.b, ref, fn, b.c_str(), "terms[0].A");
    if (term.a.shape[0] != ref.shape[0])
      value_error(fn, ": ", a, " has ", term.a.shape[0], " rows but terms[0].A has ", ref.shape[0], " (rows are base units)");
    if (term.b.shape[0] != terms[0].b.shape[0])
      value_error(fn, ": ", b, " has ", term.b.shape[0], " rows but terms[0].B has ", terms[0].b.shape[0],
                  " (rows are target units)");
    if (term.block < 1) value_error(fn, ": terms[", t, "].block must be >= 1, got ", term.block);
    if (term.a.shape[1] % term.block)
      value_error(fn, ": ", a, ".shape[1] = ", term.a.shape[1], " is not a multiple of block = ", term.block);
    if (term.b.shape[1] % term.block)
      value_error(fn, ": ", b, ".shape[1] = ", term.b.shape[1], " is not a multiple of block = ", term.block);
    const int64_t k = term.a.shape[1] / term.block, k_target = term.b.shape[1] / term.block;
    if (term.has_map) {
      require_same_device(term.map, ref, fn, m.c_str(), "terms[0].A");
      check_index_map(term.map, fn, m.c_str(), k_target, concat(b, ".shape[1] / block").c_str());
      if (term.map.shape[0] != k)
        value_error(fn, ": ", m, " has ", term.map.shape[0], " entries but ", a, " has ", k, " inner groups (shape[1] / block)");
    } else if (k != k_target) {
      value_error(fn, ": ", a, ".shape[1] = ", term.a.shape[1], " differs from ", b, ".shape[1] = ", term.b.shape[1],
                  "; pass a map to align the inner axes");
    }
  }
  const int64_t shape[2] = {ref.shape[0], terms[0].b.shape[0]};
  check_out_common(out, ref, cost_out_dtype(ref.dtype), fn, "terms[0].A");
  require_shape(out, fn, "out", shape, 2);
  for (size_t t = 0; t < terms.size(); ++t) {
    check_no_overlap(out, terms[t].a, fn, concat("terms[", t, "].A").c_str());
    check_no_overlap(out, terms[t].b, fn, concat("terms[", t, "].B").c_str());
    if (terms[t].has_map) check_no_overlap(out, terms[t].map, fn, concat("terms[", t, "].map").c_str());
  }
}

void check_linear_assignment(const TensorView& cost, const TensorView& row_ind, const TensorView& col_ind) {
  const char* fn = "linear_assignment";
  require_ndim(cost, fn, "cost", 2);
  if (cost.dtype != DType::f32 && cost.dtype != DType::f64)
    type_error(fn, ": cost must be float32 or float64, got ", dtype_name(cost.dtype));
  const int64_t n = std::min(cost.shape[0], cost.shape[1]);
  for (const TensorView* out : {&row_ind, &col_ind}) {
    const char* arg = out == &row_ind ? "row_ind" : "col_ind";
    require_dtype(*out, fn, arg, DType::i64);
    require_writable_contiguous(*out, fn, arg);
    require_shape(*out, fn, arg, &n, 1);
  }
}

void check_linear_assignment_batched(const TensorView& cost, const TensorView& row_ind, const TensorView& col_ind) {
  const char* fn = "linear_assignment_batched";
  require_ndim(cost, fn, "cost", 3);
  if (cost.dtype != DType::f32 && cost.dtype != DType::f64)
    type_error(fn, ": cost must be float32 or float64, got ", dtype_name(cost.dtype));
  const int64_t shape[2] = {cost.shape[0], std::min(cost.shape[1], cost.shape[2])};
  for (const TensorView* out : {&row_ind, &col_ind}) {
    const char* arg = out == &row_ind ? "row_ind" : "col_ind";
    require_dtype(*out, fn, arg, DType::i64);
    require_writable_contiguous(*out, fn, arg);
    require_shape(*out, fn, arg, shape, 2);
  }
  if (std::max(cost.shape[1], cost.shape[2]) > std::numeric_limits<int32_t>::max() / 2)
    value_error(fn, ": cost has 2^30 or more rows or columns");
}

}  // namespace hm
