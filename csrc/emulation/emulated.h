// The CUDA kernels' bodies run on the CPU under an emulated launch: every block and thread of the
// grid the real launcher would use is visited in turn; shared memory is a local array; a barrier is
// the boundary between two loops over the block's threads (valid because every kernel is race-free
// between barriers, so any serialization gives the device's result). Parameters come from the same
// host code as the real launches (csrc/cuda/params.h). Test-only: bound as hetmerge._C.emulated.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "cuda/params.h"

namespace hm::emulated {

// What a launch decided (vector paths, grid, number of launches), so tests can check that each
// path they mean to cover was really taken.
using Plan = std::map<std::string, int64_t>;

// grid_cap > 0 caps grid.x and grid.y, exercising the grid-stride loops on small inputs.
Plan permute_pad(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out,
                 int64_t grid_cap);
Plan interpolate(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas, const TensorView* rows,
                 const TensorView* cols, bool fill_base, const TensorView& out, int64_t grid_cap);
Plan weighted_sum(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                  const TensorView& out, int64_t grid_cap);
Plan cost_matrix(const std::vector<gpu::CostTermInput>& terms, const TensorView& out, CostPrecision precision);
// The host copy of a device index map, element i of the map at [i], for any stride.
std::vector<int64_t> fetch_index_map(const TensorView& map);

// Visits every thread of grid g (capped) as the GPU would launch it.
template <typename Fn>
void for_each_thread(gpu::Grid g, int64_t grid_cap, Fn&& fn) {
  if (grid_cap > 0) {
    g.grid_x = std::min(g.grid_x, grid_cap);
    g.grid_y = std::min(g.grid_y, grid_cap);
  }
  for (int64_t by = 0; by < g.grid_y; ++by)
    for (int64_t bx = 0; bx < g.grid_x; ++bx)
      for (int t = 0; t < g.threads; ++t) fn(LaunchCtx{bx, by, g.grid_x, g.grid_y, t, g.threads});
}

}  // namespace hm::emulated
