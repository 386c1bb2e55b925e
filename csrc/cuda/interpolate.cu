// CUDA kernel of interpolate; per-element logic in kernels/interpolate.h (interpolate_thread).
// One pass: a thread reads a 16-byte chunk of a and of the gathered b once and writes that chunk of
// all K outputs (up to kMaxLambdasPerLaunch per launch). Compiled with --fmad=false (cmake/cuda.cmake)
// so (1 - l) * a + l * b rounds as in the CPU loop instead of being fused.
#include "cuda/cuda_util.cuh"

namespace hm::gpu {
namespace {

template <typename T>
__global__ void __launch_bounds__(256) interpolate_kernel(const __grid_constant__ InterpolateParams<T> p) {
  interpolate_thread(p, launch_ctx());
}

}  // namespace

void interpolate(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas, const TensorView* rows,
                 const TensorView* cols, bool fill_base, const TensorView& out, cudaStream_t stream) {
  const int64_t K = static_cast<int64_t>(lambdas.size());
  dispatch_floating(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t k0 = 0; k0 < K; k0 += kMaxLambdasPerLaunch) {
      const int64_t k1 = std::min<int64_t>(K, k0 + kMaxLambdasPerLaunch);
      const InterpolateParams<T> p = interpolate_params<T>(a, b, lambdas, rows, cols, fill_base, out, k0, k1);
      const Grid g = row_grid(p.n0, p.row_len, vec_width<T>());
      if (g.empty()) return;
      interpolate_kernel<T><<<grid_dim(g), g.threads, 0, stream>>>(p);
      check_cuda(cudaGetLastError(), "interpolate", "kernel launch");
    }
  });
}

}  // namespace hm::gpu
