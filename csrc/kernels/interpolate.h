// interpolate, per element: out[k] = (1 - lambda_k) * a + lambda_k * b~, b~ = permute_pad(b, rows, cols).
// Shared by csrc/cpu/interpolate.cpp and csrc/cuda/interpolate.cu.
#pragma once
#include "kernels/launch.h"
#include "kernels/permute_pad.h"

namespace hm {

// The target value seen by base slot (i, j): b's element, 0 for padding (fill="zero"), or a's own
// value (fill="base": the base unit is kept rather than shrunk toward zero).
template <typename Acc>
HM_HD Acc interpolate_target_value(bool is_pad, Acc b_value, Acc a_value, bool fill_base) {
  return is_pad ? (fill_base ? a_value : Acc(0)) : b_value;
}

// (1 - lambda) * a + lambda * b, written as in DESIGN.md; lambda = 0 returns a exactly and
// lambda = 1 returns b exactly, which the invariance tests rely on.
template <typename Acc>
HM_HD Acc interpolate_value(Acc a, Acc b, Acc lambda) {
  return (Acc(1) - lambda) * a + lambda * b;
}

// One output element. A padded slot under fill="base" returns a itself, bit for bit: the base unit
// is left untouched, which (1 - λ)·a + λ·a would not guarantee after rounding.
template <typename Acc>
HM_HD Acc interpolate_element(Acc a, Acc b, Acc lambda, bool keep_base) {
  return keep_base ? a : interpolate_value(a, b, lambda);
}

// ---- CUDA kernel body (csrc/cuda/interpolate.cu; emulated in csrc/emulation) ---------------
// a and out are seen as [n0, row_len] (row_len = n1 * n_trailing); each thread reads a chunk of
// vec_width<T>() elements of a and of the gathered b once, then writes that chunk of all K outputs.
constexpr int kMaxLambdasPerLaunch = 64;  // more lambdas: one launch per 64 (a, b re-read each time)

template <typename T>
struct InterpolateParams {
  const T* a;
  const T* b;
  T* out;             // [K, n0, n1, *trailing] contiguous, already offset to this launch's first k
  Axes3 ga, gb;       // a and b as [n0, n1, n_trailing]
  Trailing ta, tb;    // their trailing strides
  const int64_t* rows;
  int64_t rows_stride;
  const int64_t* cols;
  int64_t cols_stride;
  int64_t n0, row_len, plane;  // plane = n0 * row_len
  int K;
  acc_t<T> lambdas[kMaxLambdasPerLaunch];
  bool fill_base;
  bool vec_a;    // rows of a contiguous and 16-byte aligned
  bool vec_b;    // no cols map, rows of b contiguous and 16-byte aligned
  bool vec_out;  // out rows 16-byte aligned
};

template <typename T>
HM_HD void interpolate_chunk(const InterpolateParams<T>& p, int64_t i, int64_t x0) {
  using Acc = acc_t<T>;
  constexpr int V = vec_width<T>();
  const int64_t n = min_i64(V, p.row_len - x0);
  const int64_t Tn = p.ga.n_trailing;
  Acc av[V], bv[V];
  T raw[V];
  if (p.vec_a && n == V) {
    load_vec(p.a + i * p.ga.stride0 + x0, raw);
    for (int v = 0; v < V; ++v) av[v] = load_as_acc(&raw[v]);
  } else {
    for (int v = 0; v < n; ++v) {
      const int64_t x = x0 + v, j = Tn == 1 ? x : x / Tn;
      av[v] = load_as_acc(p.a + i * p.ga.stride0 + j * p.ga.stride1 + trailing_offset(p.ta, x - j * Tn));
    }
  }
  bool keep[V];  // padded slot under fill="base": the base value, bit for bit
  const int64_t r = mapped_index(p.rows, p.rows_stride, i);
  if (r != kPad && p.vec_b && n == V) {
    load_vec(p.b + r * p.gb.stride0 + x0, raw);
    for (int v = 0; v < V; ++v) {
      bv[v] = interpolate_target_value(false, load_as_acc(&raw[v]), av[v], p.fill_base);
      keep[v] = false;
    }
  } else {
    for (int v = 0; v < n; ++v) {
      const int64_t x = x0 + v, j = Tn == 1 ? x : x / Tn;
      const int64_t c = mapped_index(p.cols, p.cols_stride, j);
      const bool pad = r == kPad || c == kPad;
      const Acc b_value =
          pad ? Acc(0) : load_as_acc(p.b + r * p.gb.stride0 + c * p.gb.stride1 + trailing_offset(p.tb, x - j * Tn));
      bv[v] = interpolate_target_value(pad, b_value, av[v], p.fill_base);
      keep[v] = pad && p.fill_base;
    }
  }
  T* dst = p.out + i * p.row_len + x0;
  for (int k = 0; k < p.K; ++k, dst += p.plane) {
    const Acc l = p.lambdas[k];
    if (p.vec_out && n == V) {
      for (int v = 0; v < V; ++v) store_from_acc(&raw[v], interpolate_element(av[v], bv[v], l, keep[v]));
      store_vec(dst, raw);
    } else {
      for (int v = 0; v < n; ++v) store_from_acc(dst + v, interpolate_element(av[v], bv[v], l, keep[v]));
    }
  }
}

template <typename T>
HM_HD void interpolate_thread(const InterpolateParams<T>& p, const LaunchCtx& c) {
  constexpr int64_t V = vec_width<T>();
  for (int64_t i = c.block_y; i < p.n0; i += c.grid_y)
    for (int64_t x0 = (c.block_x * c.threads + c.thread) * V; x0 < p.row_len; x0 += c.grid_x * c.threads * V)
      interpolate_chunk(p, i, x0);
}

}  // namespace hm
