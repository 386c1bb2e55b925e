// linear_assignment on a CUDA cost matrix: the exact CPU solver on a host copy.
// Why not a GPU solver: shortest-augmenting-path (Jonker-Volgenant) is sequential per augmentation;
// GPU auction/Hungarian variants are either approximate (auction with finite epsilon) or slower than
// the CPU below ~20k units, and the O(n^2) copy is small next to the O(n^3) solve.
#include <vector>

#include "cpu/cpu_ops.h"
#include "cuda/cuda_ops.h"

namespace hm::gpu {

void linear_assignment(const TensorView& cost, bool maximize, const TensorView& row_ind, const TensorView& col_ind,
                       cudaStream_t stream) {
  const char* fn = "linear_assignment";
  const int64_t n_rows = cost.shape[0], n_cols = cost.shape[1], n = row_ind.shape[0];
  const size_t es = static_cast<size_t>(dtype_size(cost.dtype));
  std::vector<unsigned char> host(static_cast<size_t>(n_rows * n_cols) * es);
  TensorView h = cost;
  h.device = Device::cpu;
  h.device_id = 0;
  h.data = host.data();
  if (n_rows > 0 && n_cols > 0) {
    // cudaMemcpy2D takes a pitch >= the row width: overlapping or broadcast rows (stride 0, an
    // expanded cost) and negative strides go through the device gather below, as any other layout.
    if ((cost.strides[1] == 1 || n_cols == 1) && (n_rows == 1 || cost.strides[0] >= n_cols)) {  // pitched rows
      check_cuda(cudaMemcpy2DAsync(host.data(), n_cols * es, cost.data, (n_rows == 1 ? n_cols : cost.strides[0]) * es,
                                   n_cols * es, n_rows, cudaMemcpyDeviceToHost, stream),
                 fn, "copying cost to the host");
      h.strides[0] = n_cols;
      h.strides[1] = 1;
    } else if (cost.strides[0] == 1 && cost.strides[1] >= n_rows) {  // a transposed view: copy its columns
      check_cuda(cudaMemcpy2DAsync(host.data(), n_rows * es, cost.data, cost.strides[1] * es, n_rows * es, n_cols,
                                   cudaMemcpyDeviceToHost, stream),
                 fn, "copying cost to the host");
      h.strides[0] = 1;
      h.strides[1] = n_rows;
    } else {  // any other strides: gather on the device first (permute_pad without maps)
      void* tmp = nullptr;
      check_cuda(cudaMallocAsync(&tmp, host.size(), stream), fn, "allocating a staging buffer");
      TensorView dense = cost;
      dense.data = tmp;
      dense.strides[0] = n_cols;
      dense.strides[1] = 1;
      permute_pad(cost, nullptr, nullptr, dense, stream);
      check_cuda(cudaMemcpyAsync(host.data(), tmp, host.size(), cudaMemcpyDeviceToHost, stream), fn,
                 "copying cost to the host");
      check_cuda(cudaFreeAsync(tmp, stream), fn, "freeing a staging buffer");
      h.strides[0] = n_cols;
      h.strides[1] = 1;
    }
  }
  check_cuda(cudaStreamSynchronize(stream), fn, "synchronizing the stream");

  std::vector<int64_t> rows(static_cast<size_t>(n)), cols(static_cast<size_t>(n));
  TensorView hr = row_ind, hc = col_ind;
  for (TensorView* v : {&hr, &hc}) {
    v->device = Device::cpu;
    v->device_id = 0;
  }
  hr.data = rows.data();
  hc.data = cols.data();
  hm::cpu::linear_assignment(h, maximize, hr, hc);
  if (n > 0) {
    check_cuda(cudaMemcpyAsync(row_ind.data, rows.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice, stream), fn,
               "copying row_ind to the device");
    check_cuda(cudaMemcpyAsync(col_ind.data, cols.data(), n * sizeof(int64_t), cudaMemcpyHostToDevice, stream), fn,
               "copying col_ind to the device");
    // The host vectors die on return; pageable copies may still be reading them until the sync.
    check_cuda(cudaStreamSynchronize(stream), fn, "synchronizing the stream");
  }
}

}  // namespace hm::gpu
