// permute_pad, per element: out[i, j, t] = w[rows[i], cols[j], t], or 0 where either index is -1.
// Shared by csrc/cpu/permute_pad.cpp and csrc/cuda/permute_pad.cu.
#pragma once
#include "kernels/common.h"
#include "kernels/launch.h"

namespace hm {

// Geometry of a [n0, n1, *trailing] operand seen as three axes; trailing dims are reached through
// `trailing_offsets` (one element offset per trailing position) so any strides work.
struct Axes3 {
  int64_t n0, n1, n_trailing;
  int64_t stride0, stride1;
};

// Marks padding in permute_pad_source. Not -1: with negative strides (numpy's reversed views) a
// real element's offset is negative too, and was taken for padding.
constexpr int64_t kPadSource = INT64_MIN;

// Offset of w's element feeding out[i, j, t] (before the trailing offset), or kPadSource.
HM_HD int64_t permute_pad_source(const Axes3& w, const int64_t* rows, int64_t rows_stride, const int64_t* cols,
                                 int64_t cols_stride, int64_t i, int64_t j) {
  const int64_t r = mapped_index(rows, rows_stride, i);
  const int64_t c = mapped_index(cols, cols_stride, j);
  if (r == kPad || c == kPad) return kPadSource;
  return r * w.stride0 + c * w.stride1;
}

// ---- CUDA kernel body (csrc/cuda/permute_pad.cu; emulated in csrc/emulation) ----------------
// The output is seen as [m0, row_len] with row_len = m1 * n_trailing; each thread writes chunks
// of vec_width<Bits>() consecutive elements of one row, so stores are 16-byte vectors when aligned.
template <typename Bits>
struct PermutePadParams {
  const Bits* w;
  Bits* out;         // [m0, m1, *trailing] contiguous
  Axes3 geo;         // w as [n0, n1, n_trailing]
  Trailing trailing; // w's trailing strides
  const int64_t* rows;
  int64_t rows_stride;
  const int64_t* cols;
  int64_t cols_stride;
  int64_t m0, row_len;
  bool vec_load;   // no cols map, each row of w contiguous and 16-byte aligned: copy rows as vectors
  bool vec_store;  // out rows 16-byte aligned
};

template <typename Bits>
HM_HD void permute_pad_chunk(const PermutePadParams<Bits>& p, int64_t i, int64_t x0) {
  constexpr int V = vec_width<Bits>();
  const int64_t n = min_i64(V, p.row_len - x0);
  Bits vals[V];
  const int64_t r = mapped_index(p.rows, p.rows_stride, i);
  if (r == kPad) {
    for (int v = 0; v < V; ++v) vals[v] = Bits(0);
  } else if (p.vec_load && n == V) {
    load_vec(p.w + r * p.geo.stride0 + x0, vals);
  } else {
    const int64_t T = p.geo.n_trailing;
    for (int v = 0; v < n; ++v) {
      const int64_t x = x0 + v;
      const int64_t j = T == 1 ? x : x / T;
      const int64_t source = permute_pad_source(p.geo, p.rows, p.rows_stride, p.cols, p.cols_stride, i, j);
      vals[v] = source == kPadSource ? Bits(0) : p.w[source + trailing_offset(p.trailing, x - j * T)];
    }
  }
  Bits* dst = p.out + i * p.row_len + x0;
  if (p.vec_store && n == V) {
    store_vec(dst, vals);
  } else {
    for (int v = 0; v < n; ++v) dst[v] = vals[v];
  }
}

// One thread's share: rows strided over grid.y, chunks of a row strided over grid.x * threads.
template <typename Bits>
HM_HD void permute_pad_thread(const PermutePadParams<Bits>& p, const LaunchCtx& c) {
  constexpr int64_t V = vec_width<Bits>();
  for (int64_t i = c.block_y; i < p.m0; i += c.grid_y)
    for (int64_t x0 = (c.block_x * c.threads + c.thread) * V; x0 < p.row_len; x0 += c.grid_x * c.threads * V)
      permute_pad_chunk(p, i, x0);
}

}  // namespace hm
