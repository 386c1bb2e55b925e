// CUDA kernel of permute_pad; per-element logic in kernels/permute_pad.h (permute_pad_thread).
// Memory-bound: each thread moves 16-byte chunks of output rows (vector loads too when w's rows are
// copied unmapped), grid-stride over rows and chunks.
#include "cuda/cuda_util.cuh"

namespace hm::gpu {
namespace {

template <typename Bits>
__global__ void __launch_bounds__(256) permute_pad_kernel(const __grid_constant__ PermutePadParams<Bits> p) {
  permute_pad_thread(p, launch_ctx());
}

// Data movement only needs the element size: 0 bits are 0.0 in every dtype.
template <typename Bits>
void launch(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out,
            cudaStream_t stream) {
  const PermutePadParams<Bits> p = permute_pad_params<Bits>(w, rows, cols, out);
  const Grid g = row_grid(p.m0, p.row_len, vec_width<Bits>());
  if (g.empty()) return;
  permute_pad_kernel<Bits><<<grid_dim(g), g.threads, 0, stream>>>(p);
  check_cuda(cudaGetLastError(), "permute_pad", "kernel launch");
}

}  // namespace

void permute_pad(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out,
                 cudaStream_t stream) {
  switch (dtype_size(w.dtype)) {
    case 2: launch<uint16_t>(w, rows, cols, out, stream); break;
    case 4: launch<uint32_t>(w, rows, cols, out, stream); break;
    case 8: launch<uint64_t>(w, rows, cols, out, stream); break;
    default: type_error("permute_pad: unsupported dtype ", dtype_name(w.dtype));
  }
}

}  // namespace hm::gpu
