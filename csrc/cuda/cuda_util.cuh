// Device-side helpers shared by the .cu files.
#pragma once
#include "common/dispatch.h"
#include <cuda_runtime.h>

#include "cuda/cuda_ops.h"
#include "kernels/launch.h"

namespace hm::gpu {

__device__ __forceinline__ LaunchCtx launch_ctx() {
  return LaunchCtx{blockIdx.x, blockIdx.y, gridDim.x, gridDim.y, static_cast<int>(threadIdx.x),
                   static_cast<int>(blockDim.x)};
}

inline dim3 grid_dim(const Grid& g) { return dim3(static_cast<unsigned>(g.grid_x), static_cast<unsigned>(g.grid_y)); }

}  // namespace hm::gpu
