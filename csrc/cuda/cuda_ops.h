// CUDA backend entry points: plain C++ launchers over validated TensorViews, one file per primitive
// (csrc/cuda/<name>.cu), every launch on the caller's stream. Bound in csrc/bindings/cuda_module.cpp.
#pragma once
#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "common/tensor_view.h"
#include "cuda/params.h"

namespace hm::gpu {

// "" when a CUDA device can be used, else why not (no driver, no device, ...).
std::string unavailable_reason();

// Makes `device` current for the launcher's lifetime (the runtime linked into _cuda keeps its own
// current device, independent of torch's), restoring the previous one afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Throws std::runtime_error naming the call when `err` is not cudaSuccess.
void check_cuda(cudaError_t err, const char* fn, const char* what);

// A CUDA index map checked like hm::check_index_map (same messages): copied to the host on
// `stream`, which is synchronized, so a bad map raises before any kernel reads it. Any stride
// (0: an expanded map, negative) is accepted, as on the CPU. The bindings call this once per map
// object (bindings/map_cache.h), not once per call.
std::vector<int64_t> fetch_index_map(const TensorView& map, const char* fn, cudaStream_t stream);
void check_device_index_map(const TensorView& map, const char* fn, const char* arg, int64_t n_source,
                            const char* source_desc, cudaStream_t stream);

// w: [n0, n1, *trailing] or [n0]; rows/cols: int64 maps or null; out: [m0, m1, *trailing] contiguous.
void permute_pad(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out,
                 cudaStream_t stream);

// a: [n0, n1, *trailing]; b: [m0, m1, *trailing]; out: [K, n0, n1, *trailing] contiguous.
void interpolate(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas, const TensorView* rows,
                 const TensorView* cols, bool fill_base, const TensorView& out, cudaStream_t stream);

// tensors: T views of one shape; coeffs: [K, T] row-major; out: [K, *shape] contiguous.
void weighted_sum(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                  const TensorView& out, cudaStream_t stream);

// out: [n_a, n_b] contiguous, overwritten. precision: exact (fp32 / fp64 FMA) or, for float32
// inputs, tf32 / bf16 / fp16 tensor cores with fp32 accumulation.
void cost_matrix(const std::vector<CostTermInput>& terms, const TensorView& out, CostPrecision precision,
                 cudaStream_t stream);

// The CPU solver (hm::cpu::linear_assignment) on a host copy of cost; indices copied back on `stream`.
void linear_assignment(const TensorView& cost, bool maximize, const TensorView& row_ind, const TensorView& col_ind,
                       cudaStream_t stream);

}  // namespace hm::gpu
