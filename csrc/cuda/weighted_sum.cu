// CUDA kernel of weighted_sum; per-element logic in kernels/weighted_sum.h (weighted_sum_thread).
// One pass over the inputs for up to kMaxTensorsPerLaunch tensors; beyond that, launches chain
// partial sums through an accumulator buffer in acc_t<T> (same summation order as the CPU loop).
// Compiled with --fmad=false (cmake/cuda.cmake) so sums round as in the CPU loop.
#include "cuda/cuda_util.cuh"

namespace hm::gpu {
namespace {

template <typename T>
__global__ void __launch_bounds__(256) weighted_sum_kernel(const __grid_constant__ WeightedSumParams<T> p) {
  weighted_sum_thread(p, launch_ctx());
}

template <typename T>
void launch_all(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                const TensorView& out, cudaStream_t stream) {
  using Acc = acc_t<T>;
  const char* fn = "weighted_sum";
  const int64_t n_tensors = static_cast<int64_t>(tensors.size());
  const TensorView& ref = tensors[0];
  const int64_t numel = ref.numel(), inner = ref.ndim ? ref.shape[ref.ndim - 1] : 1;
  const Grid g = row_grid(inner ? numel / inner : 0, inner, vec_width<T>());
  if (g.empty() || K == 0) return;
  Acc* acc = nullptr;  // partial sums when the inputs need several launches
  if (n_tensors > kMaxTensorsPerLaunch)
    check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&acc), sizeof(Acc) * K * numel, stream), fn,
               "allocating partial sums");
  for (int64_t t0 = 0; t0 < n_tensors; t0 += kMaxTensorsPerLaunch) {
    const int64_t t1 = std::min<int64_t>(n_tensors, t0 + kMaxTensorsPerLaunch);
    const int64_t k_step = weighted_sum_k_per_launch(t1 - t0);
    for (int64_t k0 = 0; k0 < K; k0 += k_step) {
      const int64_t k1 = std::min<int64_t>(K, k0 + k_step);
      const WeightedSumParams<T> p = weighted_sum_params<T>(tensors, coeffs, out, t0, t1, k0, k1,
                                                            t0 > 0 ? acc : nullptr, t1 < n_tensors ? acc : nullptr);
      weighted_sum_kernel<T><<<grid_dim(g), g.threads, 0, stream>>>(p);
      check_cuda(cudaGetLastError(), fn, "kernel launch");
    }
  }
  if (acc) check_cuda(cudaFreeAsync(acc, stream), fn, "freeing partial sums");
}

}  // namespace

void weighted_sum(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                  const TensorView& out, cudaStream_t stream) {
  dispatch_floating(tensors[0].dtype, [&](auto tag) { launch_all<decltype(tag)>(tensors, coeffs, K, out, stream); });
}

}  // namespace hm::gpu
