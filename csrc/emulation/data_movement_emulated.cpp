// Emulated launches of the permute_pad, interpolate and weighted_sum kernels (csrc/cuda/*.cu): the
// same parameter structs, grids and launch splits, the same per-thread bodies from csrc/kernels.
#include <algorithm>

#include "cpu/cpu_util.h"
#include "emulation/emulated.h"

namespace hm::emulated {
namespace {

template <typename Bits>
Plan permute_pad_typed(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out,
                       int64_t grid_cap) {
  const PermutePadParams<Bits> p = gpu::permute_pad_params<Bits>(w, rows, cols, out);
  const gpu::Grid g = gpu::row_grid(p.m0, p.row_len, vec_width<Bits>());
  if (!g.empty()) for_each_thread(g, grid_cap, [&](const LaunchCtx& c) { permute_pad_thread(p, c); });
  return {{"vec_load", p.vec_load}, {"vec_store", p.vec_store}, {"grid_x", g.grid_x}, {"grid_y", g.grid_y},
          {"threads", g.threads}, {"launches", g.empty() ? 0 : 1}};
}

}  // namespace

Plan permute_pad(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out,
                 int64_t grid_cap) {
  switch (dtype_size(w.dtype)) {
    case 2: return permute_pad_typed<uint16_t>(w, rows, cols, out, grid_cap);
    case 4: return permute_pad_typed<uint32_t>(w, rows, cols, out, grid_cap);
    case 8: return permute_pad_typed<uint64_t>(w, rows, cols, out, grid_cap);
    default: type_error("permute_pad: unsupported dtype ", dtype_name(w.dtype));
  }
}

Plan interpolate(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas, const TensorView* rows,
                 const TensorView* cols, bool fill_base, const TensorView& out, int64_t grid_cap) {
  Plan plan{{"launches", 0}};
  const int64_t K = static_cast<int64_t>(lambdas.size());
  cpu::dispatch_floating(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    for (int64_t k0 = 0; k0 < K; k0 += kMaxLambdasPerLaunch) {
      const int64_t k1 = std::min<int64_t>(K, k0 + kMaxLambdasPerLaunch);
      const InterpolateParams<T> p = gpu::interpolate_params<T>(a, b, lambdas, rows, cols, fill_base, out, k0, k1);
      const gpu::Grid g = gpu::row_grid(p.n0, p.row_len, vec_width<T>());
      plan = {{"vec_a", p.vec_a}, {"vec_b", p.vec_b}, {"vec_out", p.vec_out}, {"grid_x", g.grid_x},
              {"grid_y", g.grid_y}, {"threads", g.threads}, {"launches", plan["launches"]}};
      if (g.empty()) return;
      for_each_thread(g, grid_cap, [&](const LaunchCtx& c) { interpolate_thread(p, c); });
      ++plan["launches"];
    }
  });
  return plan;
}

namespace {

template <typename T>
Plan weighted_sum_typed(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                        const TensorView& out, int64_t grid_cap) {
  using Acc = acc_t<T>;
  const int64_t n_tensors = static_cast<int64_t>(tensors.size());
  const TensorView& ref = tensors[0];
  const int64_t numel = ref.numel(), inner = ref.ndim ? ref.shape[ref.ndim - 1] : 1;
  const gpu::Grid g = gpu::row_grid(inner ? numel / inner : 0, inner, vec_width<T>());
  Plan plan{{"launches", 0}, {"grid_x", g.grid_x}, {"grid_y", g.grid_y}, {"threads", g.threads}};
  if (g.empty() || K == 0) return plan;
  std::vector<Acc> acc(n_tensors > kMaxTensorsPerLaunch ? static_cast<size_t>(K * numel) : 0);
  for (int64_t t0 = 0; t0 < n_tensors; t0 += kMaxTensorsPerLaunch) {
    const int64_t t1 = std::min<int64_t>(n_tensors, t0 + kMaxTensorsPerLaunch);
    const int64_t k_step = gpu::weighted_sum_k_per_launch(t1 - t0);
    for (int64_t k0 = 0; k0 < K; k0 += k_step) {
      const int64_t k1 = std::min<int64_t>(K, k0 + k_step);
      const WeightedSumParams<T> p = gpu::weighted_sum_params<T>(tensors, coeffs, out, t0, t1, k0, k1,
                                                                 t0 > 0 ? acc.data() : nullptr,
                                                                 t1 < n_tensors ? acc.data() : nullptr);
      for_each_thread(g, grid_cap, [&](const LaunchCtx& c) { weighted_sum_thread(p, c); });
      plan["vec_in"] = p.vec_in;
      plan["vec_out"] = p.vec_out;
      ++plan["launches"];
    }
  }
  return plan;
}

}  // namespace

Plan weighted_sum(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                  const TensorView& out, int64_t grid_cap) {
  Plan plan;
  cpu::dispatch_floating(tensors[0].dtype, [&](auto tag) {
    plan = weighted_sum_typed<decltype(tag)>(tensors, coeffs, K, out, grid_cap);
  });
  return plan;
}

}  // namespace hm::emulated
