// Emulated host fetch of a device index map (csrc/cuda/device.cu, fetch_index_map): the same
// StridedFetch plan, with cudaMemcpy2D's row-by-row copy done by memcpy and its pitch rule asserted.
#include <cstring>

#include "emulation/emulated.h"

namespace hm::emulated {

std::vector<int64_t> fetch_index_map(const TensorView& map) {
  const int64_t n = map.shape[0];
  std::vector<int64_t> host(static_cast<size_t>(n));
  const gpu::StridedFetch f = gpu::strided_fetch(n, map.strides[0]);
  // cudaMemcpy2D: spitch >= width (one int64) and rows * spitch within the source allocation.
  if (f.rows > 0 && f.pitch < 1) value_error("internal: fetch pitch ", f.pitch, " < 1 element");
  const int64_t* src = map.ptr<const int64_t>() + f.first;
  for (int64_t r = 0; r < f.rows; ++r) std::memcpy(&host[static_cast<size_t>(r)], src + r * f.pitch, sizeof(int64_t));
  gpu::strided_fetch_finish(f, n, host);
  return host;
}

}  // namespace hm::emulated
