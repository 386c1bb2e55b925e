// A validated, non-owning view of a tensor that crossed the boundary through DLPack.
// Plain C++ (no pybind11, no CUDA) so that CPU loops and CUDA launchers take the same type.
#pragma once
#include <cstdint>
#include <string>

#include "common/errors.h"

namespace hm {

enum class DType : uint8_t { f32, f64, f16, bf16, i64, i32, other };

const char* dtype_name(DType dtype);
inline bool is_floating(DType d) { return d == DType::f32 || d == DType::f64 || d == DType::f16 || d == DType::bf16; }
int dtype_size(DType dtype);

enum class Device : int32_t { cpu = 1, cuda = 2 };

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;  // already offset by the producer's byte_offset
  DType dtype = DType::other;
  Device device = Device::cpu;
  int32_t device_id = 0;
  int32_t ndim = 0;
  bool read_only = false;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements, never null

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  bool is_contiguous() const;
  std::string shape_str() const;
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Checks shared by every entry point. `fn` is the public call, `arg` the argument's Python name.
void require_ndim(const TensorView& t, const char* fn, const char* arg, int ndim);
void require_min_ndim(const TensorView& t, const char* fn, const char* arg, int ndim);
void require_floating(const TensorView& t, const char* fn, const char* arg);
void require_dtype(const TensorView& t, const char* fn, const char* arg, DType dtype);
void require_same_dtype(const TensorView& t, const TensorView& ref, const char* fn, const char* arg, const char* ref_arg);
void require_same_device(const TensorView& t, const TensorView& ref, const char* fn, const char* arg, const char* ref_arg);
void require_writable_contiguous(const TensorView& t, const char* fn, const char* arg);
void require_shape(const TensorView& t, const char* fn, const char* arg, const int64_t* shape, int ndim);

// An index map (DESIGN.md "the index map"): 1-D int64, entries in [-1, n_source), non-negative
// entries distinct. Only CPU maps are scanned here; CUDA maps are checked by the caller on a copy.
void check_index_map(const TensorView& map, const char* fn, const char* arg, int64_t n_source, const char* source_desc);

}  // namespace hm
