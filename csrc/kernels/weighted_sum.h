// weighted_sum, per element: out[k] = sum_t coeffs[k, t] * x_t.
// Shared by csrc/cpu/weighted_sum.cpp and csrc/cuda/weighted_sum.cu.
#pragma once
#include "kernels/common.h"
#include "kernels/launch.h"

namespace hm {

// values: the T inputs at one element, already in the accumulator type; coeffs_k: row k of coeffs.
template <typename Acc>
HM_HD Acc weighted_sum_value(const Acc* values, const Acc* coeffs_k, int64_t n_tensors) {
  Acc sum = Acc(0);
  for (int64_t t = 0; t < n_tensors; ++t) sum += coeffs_k[t] * values[t];
  return sum;
}

// Continues a partial sum (the CUDA backend sums more than kMaxTensorsPerLaunch inputs in several
// launches through an accumulator buffer): same order as weighted_sum_value, so the same rounding.
template <typename Acc>
HM_HD Acc weighted_sum_value_from(Acc sum, const Acc* values, const Acc* coeffs_k, int64_t n_tensors) {
  for (int64_t t = 0; t < n_tensors; ++t) sum += coeffs_k[t] * values[t];
  return sum;
}

// ---- CUDA kernel body (csrc/cuda/weighted_sum.cu; emulated in csrc/emulation) --------------
// The inputs are seen as [n_rows, inner] (inner = last dim), as in the CPU loop. Each thread stages
// a chunk of vec_width<T>() elements of every input once, then writes that chunk of all K outputs.
constexpr int kMaxTensorsPerLaunch = 16;
constexpr int kMaxLeadDims = 7;  // TensorView holds at most 8 dims
constexpr int kMaxCoeffsPerLaunch = 256;  // K * n_tensors per launch; more K: one launch per slice

template <typename T>
struct WeightedSumParams {
  using Acc = acc_t<T>;
  const T* x[kMaxTensorsPerLaunch];
  int64_t inner_stride[kMaxTensorsPerLaunch];
  int64_t lead_stride[kMaxTensorsPerLaunch][kMaxLeadDims];
  int64_t lead_shape[kMaxLeadDims];
  int n_lead;          // dims before the last one
  int n_tensors, K;
  int64_t n_rows, inner, numel;
  Acc coeffs[kMaxCoeffsPerLaunch];  // [K, n_tensors] of this launch
  const Acc* acc_in;   // [K, numel] partial sums to continue, or null
  Acc* acc_out;        // [K, numel]: write partial sums here instead of out, or null
  T* out;              // [K, *shape] contiguous, offset to this launch's first k
  bool vec_in;         // every input row contiguous and 16-byte aligned
  bool vec_out;        // out rows 16-byte aligned
};

template <typename T>
HM_HD int64_t weighted_sum_row_offset(const WeightedSumParams<T>& p, int t, int64_t row) {
  int64_t offset = 0;
  for (int d = p.n_lead - 1; d >= 0; --d) {
    const int64_t n = p.lead_shape[d];
    offset += (row % n) * p.lead_stride[t][d];
    row /= n;
  }
  return offset;
}

template <typename T>
HM_HD void weighted_sum_chunk(const WeightedSumParams<T>& p, int64_t row, int64_t e0) {
  using Acc = acc_t<T>;
  constexpr int V = vec_width<T>();
  const int64_t n = min_i64(V, p.inner - e0);
  Acc staged[kMaxTensorsPerLaunch][V];
  T raw[V];
  for (int t = 0; t < p.n_tensors; ++t) {
    const T* src = p.x[t] + weighted_sum_row_offset(p, t, row) + e0 * p.inner_stride[t];
    if (p.vec_in && n == V) {
      load_vec(src, raw);
      for (int v = 0; v < V; ++v) staged[t][v] = load_as_acc(&raw[v]);
    } else {
      for (int v = 0; v < n; ++v) staged[t][v] = load_as_acc(src + v * p.inner_stride[t]);
    }
  }
  const int64_t offset = row * p.inner + e0;
  Acc values[kMaxTensorsPerLaunch];
  for (int k = 0; k < p.K; ++k) {
    const Acc* ck = p.coeffs + k * p.n_tensors;
    Acc sums[V];
    for (int v = 0; v < n; ++v) {
      for (int t = 0; t < p.n_tensors; ++t) values[t] = staged[t][v];
      sums[v] = p.acc_in ? weighted_sum_value_from(p.acc_in[k * p.numel + offset + v], values, ck, p.n_tensors)
                         : weighted_sum_value(values, ck, p.n_tensors);
    }
    if (p.acc_out) {
      for (int v = 0; v < n; ++v) p.acc_out[k * p.numel + offset + v] = sums[v];
    } else if (p.vec_out && n == V) {
      for (int v = 0; v < V; ++v) store_from_acc(&raw[v], sums[v]);
      store_vec(p.out + k * p.numel + offset, raw);
    } else {
      for (int v = 0; v < n; ++v) store_from_acc(p.out + k * p.numel + offset + v, sums[v]);
    }
  }
}

template <typename T>
HM_HD void weighted_sum_thread(const WeightedSumParams<T>& p, const LaunchCtx& c) {
  constexpr int64_t V = vec_width<T>();
  for (int64_t row = c.block_y; row < p.n_rows; row += c.grid_y)
    for (int64_t e0 = (c.block_x * c.threads + c.thread) * V; e0 < p.inner; e0 += c.grid_x * c.threads * V)
      weighted_sum_chunk(p, row, e0);
}

}  // namespace hm
