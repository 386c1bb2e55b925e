#include "common/tensor_view.h"

#include <vector>

namespace hm {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "float32";
    case DType::f64: return "float64";
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::i64: return "int64";
    case DType::i32: return "int32";
    default: return "unsupported dtype";
  }
}

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: case DType::i32: return 4;
    case DType::f64: case DType::i64: return 8;
    case DType::f16: case DType::bf16: return 2;
    default: return 0;
  }
}

bool TensorView::is_contiguous() const {
  if (numel() == 0) return true;  // exporters report arbitrary strides for empty tensors
  int64_t expected = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorView::shape_str() const {
  std::string s = "(";
  for (int d = 0; d < ndim; ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
  s += ndim == 1 ? ",)" : ")";
  return s;
}

void require_ndim(const TensorView& t, const char* fn, const char* arg, int ndim) {
  if (t.ndim != ndim) value_error(fn, ": ", arg, " must be ", ndim, "-D, got shape ", t.shape_str());
}

void require_min_ndim(const TensorView& t, const char* fn, const char* arg, int ndim) {
  if (t.ndim < ndim) value_error(fn, ": ", arg, " must have at least ", ndim, " dimension(s), got shape ", t.shape_str());
}

void require_floating(const TensorView& t, const char* fn, const char* arg) {
  if (!is_floating(t.dtype))
    type_error(fn, ": ", arg, " must be float32, float64, float16 or bfloat16, got ", dtype_name(t.dtype));
}

void require_dtype(const TensorView& t, const char* fn, const char* arg, DType dtype) {
  if (t.dtype != dtype) type_error(fn, ": ", arg, " must be ", dtype_name(dtype), ", got ", dtype_name(t.dtype));
}

void require_same_dtype(const TensorView& t, const TensorView& ref, const char* fn, const char* arg, const char* ref_arg) {
  if (t.dtype != ref.dtype)
    type_error(fn, ": ", arg, " has dtype ", dtype_name(t.dtype), " but ", ref_arg, " has dtype ", dtype_name(ref.dtype));
}

static const char* device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

void require_same_device(const TensorView& t, const TensorView& ref, const char* fn, const char* arg, const char* ref_arg) {
  if (t.device != ref.device || t.device_id != ref.device_id)
    value_error(fn, ": ", arg, " is on ", device_name(t.device), ":", t.device_id, " but ", ref_arg, " is on ",
                device_name(ref.device), ":", ref.device_id);
}

void require_writable_contiguous(const TensorView& t, const char* fn, const char* arg) {
  if (t.read_only) value_error(fn, ": ", arg, " is read-only");
  if (!t.is_contiguous()) value_error(fn, ": ", arg, " must be contiguous");
}

void require_shape(const TensorView& t, const char* fn, const char* arg, const int64_t* shape, int ndim) {
  bool ok = t.ndim == ndim;
  for (int d = 0; ok && d < ndim; ++d) ok = t.shape[d] == shape[d];
  if (!ok) {
    TensorView want;
    want.ndim = ndim;
    for (int d = 0; d < ndim; ++d) want.shape[d] = shape[d];
    value_error(fn, ": ", arg, " must have shape ", want.shape_str(), ", got ", t.shape_str());
  }
}

void check_index_map(const TensorView& map, const char* fn, const char* arg, int64_t n_source, const char* source_desc) {
  require_ndim(map, fn, arg, 1);
  require_dtype(map, fn, arg, DType::i64);
  if (map.device != Device::cpu) return;
  const int64_t* idx = map.ptr<const int64_t>();
  const int64_t stride = map.strides[0];
  std::vector<int64_t> seen_at(static_cast<size_t>(n_source > 0 ? n_source : 0), -1);
  for (int64_t i = 0; i < map.shape[0]; ++i) {
    const int64_t v = idx[i * stride];
    if (v < -1 || v >= n_source)
      value_error(fn, ": ", arg, "[", i, "] = ", v, " is out of range for ", source_desc, " = ", n_source,
                  " (use -1 for padding)");
    if (v >= 0) {
      if (seen_at[v] >= 0) value_error(fn, ": ", arg, " repeats index ", v, " at positions ", seen_at[v], " and ", i);
      seen_at[v] = i;
    }
  }
}

}  // namespace hm
