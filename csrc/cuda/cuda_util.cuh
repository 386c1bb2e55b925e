// Device-side helpers shared by the .cu files.
#pragma once
#include <cuda_runtime.h>

#include "cuda/cuda_ops.h"
#include "kernels/launch.h"

namespace hm::gpu {

__device__ __forceinline__ LaunchCtx launch_ctx() {
  return LaunchCtx{blockIdx.x, blockIdx.y, gridDim.x, gridDim.y, static_cast<int>(threadIdx.x),
                   static_cast<int>(blockDim.x)};
}

inline dim3 grid_dim(const Grid& g) { return dim3(static_cast<unsigned>(g.grid_x), static_cast<unsigned>(g.grid_y)); }

// Calls fn(T{}) with the storage type of a floating dtype (as hm::cpu::dispatch_floating).
template <typename Fn>
void dispatch_floating(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: fn(float{}); break;
    case DType::f64: fn(double{}); break;
    case DType::f16: fn(half_t{}); break;
    case DType::bf16: fn(bfloat16_t{}); break;
    default: type_error("internal: unexpected dtype ", dtype_name(dtype));
  }
}

}  // namespace hm::gpu
