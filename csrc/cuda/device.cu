// Runtime plumbing of the CUDA backend: availability, the current device, errors, index-map checks.
#include <stdexcept>
#include <vector>

#include "cuda/cuda_ops.h"

namespace hm::gpu {

std::string unavailable_reason() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorInsufficientDriver)
    return "no usable NVIDIA driver (cudaGetDeviceCount: driver missing or older than this CUDA runtime)";
  if (err == cudaErrorNoDevice || (err == cudaSuccess && count == 0)) return "no CUDA device is visible";
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls are not poisoned
    return concat("the CUDA runtime failed to start (", cudaGetErrorName(err), ": ", cudaGetErrorString(err), ")");
  }
  // The module holds sm_80 / sm_90 code and sm_90 PTX: older GPUs cannot run any of it.
  for (int d = 0; d < count; ++d) {
    int major = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d) == cudaSuccess && major >= 8) return "";
  }
  return "no CUDA device of compute capability 8.0 or newer (this build holds sm_80 and sm_90 code)";
}

DeviceGuard::DeviceGuard(int device) {
  check_cuda(cudaGetDevice(&previous_), "hetmerge", "cudaGetDevice");
  if (previous_ != device) check_cuda(cudaSetDevice(device), "hetmerge", "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
}

void check_cuda(cudaError_t err, const char* fn, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(concat(fn, ": CUDA error in ", what, ": ", cudaGetErrorName(err), " (",
                                    cudaGetErrorString(err), ")"));
}

std::vector<int64_t> fetch_index_map(const TensorView& map, const char* fn, cudaStream_t stream) {
  const int64_t n = map.shape[0];
  std::vector<int64_t> host(static_cast<size_t>(n));
  const StridedFetch f = strided_fetch(n, map.strides[0]);
  if (f.rows > 0) {
    check_cuda(cudaMemcpy2DAsync(host.data(), sizeof(int64_t), map.ptr<const int64_t>() + f.first,
                                 static_cast<size_t>(f.pitch) * sizeof(int64_t), sizeof(int64_t),
                                 static_cast<size_t>(f.rows), cudaMemcpyDeviceToHost, stream),
               fn, "copying an index map to the host");
    check_cuda(cudaStreamSynchronize(stream), fn, "synchronizing the stream");
  }
  strided_fetch_finish(f, n, host);
  return host;
}

void check_device_index_map(const TensorView& map, const char* fn, const char* arg, int64_t n_source,
                            const char* source_desc, cudaStream_t stream) {
  require_ndim(map, fn, arg, 1);
  require_dtype(map, fn, arg, DType::i64);
  std::vector<int64_t> host = fetch_index_map(map, fn, stream);
  TensorView h = map;
  h.device = Device::cpu;
  h.device_id = 0;
  h.data = host.data();
  h.strides[0] = 1;
  check_index_map(h, fn, arg, n_source, source_desc);
}

}  // namespace hm::gpu
