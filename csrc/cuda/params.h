// Host side of the CUDA launches: validated TensorViews -> the kernels' parameter structs and grid
// shapes. Plain C++ (no CUDA headers), so the CPU emulation (csrc/emulation) builds the very same
// parameters, vector-path decisions and launch splits as the real launchers in csrc/cuda/*.cu.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "common/tensor_view.h"
#include "kernels/cost_matrix_tile.h"
#include "kernels/interpolate.h"
#include "kernels/permute_pad.h"
#include "kernels/weighted_sum.h"

namespace hm::gpu {

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Trailing dims [first_dim, ndim) of t, merged where one steps evenly into the next.
inline Trailing make_trailing(const TensorView& t, int first_dim) {
  Trailing tr;
  for (int d = first_dim; d < t.ndim; ++d) {
    if (t.shape[d] == 1) continue;  // size-1 dims move nothing, whatever their stride
    if (tr.nd > 0 && tr.stride[tr.nd - 1] == t.shape[d] * t.strides[d]) {
      tr.shape[tr.nd - 1] *= t.shape[d];
      tr.stride[tr.nd - 1] = t.strides[d];
    } else {
      if (tr.nd == kMaxTrailing) value_error("internal: too many trailing dims");
      tr.shape[tr.nd] = t.shape[d];
      tr.stride[tr.nd] = t.strides[d];
      ++tr.nd;
    }
  }
  return tr;
}

inline int64_t trailing_count(const Trailing& tr) {
  int64_t n = 1;
  for (int d = 0; d < tr.nd; ++d) n *= tr.shape[d];
  return n;
}

// True when element (j, t) of every row sits at row_start + j * n_trailing + t.
inline bool rows_contiguous(const Axes3& g, const Trailing& tr) {
  const bool trailing_unit = tr.nd == 0 || (tr.nd == 1 && tr.stride[0] == 1);
  return trailing_unit && (g.n1 <= 1 || g.stride1 == g.n_trailing);
}

// A 16-byte vector of row i starts aligned for every i.
inline bool rows_aligned(const void* base, int64_t row_stride_elems, int elem_size, int64_t n_rows) {
  return aligned16(base) && (n_rows <= 1 || (row_stride_elems * elem_size) % 16 == 0);
}

struct Grid {
  int64_t grid_x = 0, grid_y = 0;
  int threads = 0;
  bool empty() const { return grid_x == 0 || grid_y == 0; }
};
constexpr int64_t kMaxGridY = 65535;

// Rows over grid.y, each row's vec-chunks over grid.x * threads; short rows get smaller blocks.
inline Grid row_grid(int64_t n_rows, int64_t row_len, int vec) {
  Grid g;
  if (n_rows == 0 || row_len == 0) return g;
  const int64_t chunks = (row_len + vec - 1) / vec;
  int threads = 32;
  while (threads < 256 && threads < chunks) threads *= 2;
  g.threads = threads;
  g.grid_x = std::min<int64_t>((chunks + threads - 1) / threads, int64_t(1) << 30);
  g.grid_y = std::min<int64_t>(n_rows, kMaxGridY);
  return g;
}

// A 1-D tensor is a single row whose columns are mapped by `rows` (as in the CPU loops).
inline Axes3 axes_of(const TensorView& t) {
  const bool one_d = t.ndim == 1;
  return Axes3{one_d ? 1 : t.shape[0], one_d ? t.shape[0] : t.shape[1], 1, one_d ? 0 : t.strides[0],
               one_d ? t.strides[0] : t.strides[1]};
}

inline void map_args(const TensorView* map, const int64_t*& ptr, int64_t& stride) {
  ptr = map ? map->ptr<const int64_t>() : nullptr;
  stride = map ? map->strides[0] : 0;
}

// ---- Host copies of strided device vectors (index maps) ----------------------------------
// cudaMemcpy2D needs a pitch >= the row width and >= 0, so a vector of n elements `stride` apart
// is fetched as `rows` rows of one element, `pitch` elements apart, starting `first` elements from
// its data pointer; stride 0 (an expanded map) fetches its one element, a negative stride fetches
// the same memory upward and reverses it.
struct StridedFetch {
  int64_t first = 0, pitch = 1, rows = 0;
  bool reverse = false;
};
inline StridedFetch strided_fetch(int64_t n, int64_t stride) {
  StridedFetch f;
  if (n == 0) return f;
  if (stride == 0 || n == 1) {
    f.rows = 1;
    return f;
  }
  f.rows = n;
  f.pitch = stride < 0 ? -stride : stride;
  f.reverse = stride < 0;
  f.first = stride < 0 ? (n - 1) * stride : 0;
  return f;
}
// The fetched rows -> host[i] = element i of the vector.
template <typename T>
void strided_fetch_finish(const StridedFetch& f, int64_t n, std::vector<T>& host) {
  if (f.rows == 1 && n > 1) host.assign(static_cast<size_t>(n), host[0]);
  if (f.reverse) std::reverse(host.begin(), host.end());
}

// ---- permute_pad ---------------------------------------------------------------------------
template <typename Bits>
PermutePadParams<Bits> permute_pad_params(const TensorView& w, const TensorView* rows, const TensorView* cols,
                                          const TensorView& out) {
  const bool one_d = w.ndim == 1;
  PermutePadParams<Bits> p{};
  p.w = w.ptr<const Bits>();
  p.out = out.ptr<Bits>();
  p.geo = axes_of(w);
  p.trailing = make_trailing(w, one_d ? 1 : 2);
  p.geo.n_trailing = trailing_count(p.trailing);
  const TensorView* row_map = one_d ? nullptr : rows;
  const TensorView* col_map = one_d ? rows : cols;
  map_args(row_map, p.rows, p.rows_stride);
  map_args(col_map, p.cols, p.cols_stride);
  p.m0 = row_map ? row_map->shape[0] : p.geo.n0;
  const int64_t m1 = col_map ? col_map->shape[0] : p.geo.n1;
  p.row_len = m1 * p.geo.n_trailing;
  constexpr int V = vec_width<Bits>();
  p.vec_load = !col_map && rows_contiguous(p.geo, p.trailing) &&
               rows_aligned(p.w, p.geo.stride0, sizeof(Bits), p.geo.n0);
  p.vec_store = p.row_len % V == 0 && aligned16(p.out);
  return p;
}

// ---- interpolate ---------------------------------------------------------------------------
// One launch per kMaxLambdasPerLaunch lambdas: lambdas [k0, k1).
template <typename T>
InterpolateParams<T> interpolate_params(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas,
                                        const TensorView* rows, const TensorView* cols, bool fill_base,
                                        const TensorView& out, int64_t k0, int64_t k1) {
  const bool one_d = a.ndim == 1;
  InterpolateParams<T> p{};
  p.a = a.ptr<const T>();
  p.b = b.ptr<const T>();
  p.ga = axes_of(a);
  p.gb = axes_of(b);
  p.ta = make_trailing(a, one_d ? 1 : 2);
  p.tb = make_trailing(b, one_d ? 1 : 2);
  p.ga.n_trailing = trailing_count(p.ta);
  p.gb.n_trailing = p.ga.n_trailing;
  const TensorView* row_map = one_d ? nullptr : rows;
  const TensorView* col_map = one_d ? rows : cols;
  map_args(row_map, p.rows, p.rows_stride);
  map_args(col_map, p.cols, p.cols_stride);
  p.n0 = p.ga.n0;
  p.row_len = p.ga.n1 * p.ga.n_trailing;
  p.plane = p.n0 * p.row_len;
  p.out = out.ptr<T>() + k0 * p.plane;
  p.K = static_cast<int>(k1 - k0);
  for (int64_t k = k0; k < k1; ++k) p.lambdas[k - k0] = static_cast<acc_t<T>>(lambdas[k]);
  p.fill_base = fill_base;
  constexpr int V = vec_width<T>();
  p.vec_a = rows_contiguous(p.ga, p.ta) && rows_aligned(p.a, p.ga.stride0, sizeof(T), p.ga.n0);
  p.vec_b = !col_map && rows_contiguous(p.gb, p.tb) && rows_aligned(p.b, p.gb.stride0, sizeof(T), p.gb.n0);
  p.vec_out = p.row_len % V == 0 && aligned16(out.data);
  return p;
}

// ---- weighted_sum --------------------------------------------------------------------------
// One launch covers tensors [t0, t1) and coefficient rows [k0, k1); acc_in / acc_out chain the
// launches of a call with more than kMaxTensorsPerLaunch inputs.
template <typename T>
WeightedSumParams<T> weighted_sum_params(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs,
                                         const TensorView& out, int64_t t0, int64_t t1, int64_t k0, int64_t k1,
                                         const acc_t<T>* acc_in, acc_t<T>* acc_out) {
  const TensorView& ref = tensors[0];
  const int64_t n_all = static_cast<int64_t>(tensors.size());
  WeightedSumParams<T> p{};
  p.numel = ref.numel();
  p.inner = ref.ndim ? ref.shape[ref.ndim - 1] : 1;
  p.n_rows = p.inner ? p.numel / p.inner : 0;
  p.n_lead = ref.ndim ? ref.ndim - 1 : 0;
  for (int d = 0; d < p.n_lead; ++d) p.lead_shape[d] = ref.shape[d];
  p.n_tensors = static_cast<int>(t1 - t0);
  p.K = static_cast<int>(k1 - k0);
  constexpr int V = vec_width<T>();
  bool vec_in = true;
  for (int64_t t = t0; t < t1; ++t) {
    const TensorView& x = tensors[t];
    const int i = static_cast<int>(t - t0);
    p.x[i] = x.ptr<const T>();
    p.inner_stride[i] = x.ndim ? x.strides[x.ndim - 1] : 1;
    for (int d = 0; d < p.n_lead; ++d) p.lead_stride[i][d] = x.strides[d];
    // Rows start 16-byte aligned when every lead stride is a multiple of 16 bytes.
    bool ok = (p.inner_stride[i] == 1 || p.inner <= 1) && aligned16(x.data);
    for (int d = 0; d < p.n_lead; ++d) ok = ok && (ref.shape[d] <= 1 || (x.strides[d] * int64_t(sizeof(T))) % 16 == 0);
    vec_in = vec_in && ok;
  }
  p.vec_in = vec_in;
  for (int64_t k = k0; k < k1; ++k)
    for (int64_t t = t0; t < t1; ++t)
      p.coeffs[(k - k0) * p.n_tensors + (t - t0)] = static_cast<acc_t<T>>(coeffs[k * n_all + t]);
  p.acc_in = acc_in ? acc_in + k0 * p.numel : nullptr;
  p.acc_out = acc_out ? acc_out + k0 * p.numel : nullptr;
  p.out = out.ptr<T>() + k0 * p.numel;
  p.vec_out = p.inner % V == 0 && aligned16(out.data);
  return p;
}

// Rows of coefficients per launch for n tensors.
inline int64_t weighted_sum_k_per_launch(int64_t n_tensors) {
  return std::max<int64_t>(1, kMaxCoeffsPerLaunch / std::max<int64_t>(1, n_tensors));
}

// ---- cost_matrix ---------------------------------------------------------------------------
struct CostTermInput {
  TensorView a, b, map;
  bool has_map;
  int64_t block;
};

// Splits the terms into launches of at most kMaxCostTermsPerLaunch (later ones accumulate) and
// lays each launch's k-tiles end to end. bk: the kernel's k-tile depth. T: the output type (float
// for float32/float16/bfloat16 terms, double for float64).
template <typename T>
std::vector<CostParams<T>> cost_params(const std::vector<CostTermInput>& terms, const TensorView& out, int bk) {
  std::vector<CostParams<T>> launches;
  for (size_t first = 0; first < terms.size(); first += kMaxCostTermsPerLaunch) {
    CostParams<T> p{};
    p.n_a = out.shape[0];
    p.n_b = out.shape[1];
    p.out = out.ptr<T>();
    p.accumulate = first > 0;
    const size_t last = std::min(terms.size(), first + kMaxCostTermsPerLaunch);
    int64_t tiles = 0;
    for (size_t t = first; t < last; ++t) {
      const CostTermInput& in = terms[t];
      CostTermDesc& d = p.terms[p.n_terms++];
      d.a = in.a.data;
      d.b = in.b.data;
      d.storage = in.a.dtype == DType::f16    ? CostStorage::f16
                  : in.a.dtype == DType::bf16 ? CostStorage::bf16
                                              : CostStorage::native;
      d.sa0 = in.a.strides[0];
      d.sa1 = in.a.strides[1];
      d.sb0 = in.b.strides[0];
      d.sb1 = in.b.strides[1];
      d.map = in.has_map ? in.map.ptr<const int64_t>() : nullptr;
      d.map_stride = in.has_map ? in.map.strides[0] : 0;
      d.block = in.block;
      d.k = in.a.shape[1];
      d.tile_begin = tiles;
      // Coalescing: walk k across threads when k is the unit-stride axis (row-major operands).
      d.a_k_fast = d.sa1 == 1 || in.a.shape[0] <= 1;
      d.b_k_fast = d.sb1 == 1 || in.b.shape[0] <= 1;
      tiles += (d.k + bk - 1) / bk;
    }
    p.n_tiles = tiles;
    launches.push_back(p);
  }
  return launches;
}

// The `precision` option of cost_matrix on CUDA.
inline CostPrecision parse_cost_precision(const std::string& s) {
  if (s == "fp32") return CostPrecision::exact;
  if (s == "tf32") return CostPrecision::tf32;
  if (s == "bf16") return CostPrecision::bf16;
  if (s == "fp16") return CostPrecision::fp16;
  value_error("cost_matrix: precision must be 'fp32', 'tf32', 'bf16' or 'fp16', got '", s, "'");
}

// Column tiles over grid.x, row tiles over grid.y (n_a up to 65535 row tiles).
inline Grid cost_grid(int64_t n_a, int64_t n_b, int bm, int bn, int threads) {
  Grid g;
  if (n_a == 0 || n_b == 0) return g;
  g.threads = threads;
  g.grid_x = (n_b + bn - 1) / bn;
  g.grid_y = (n_a + bm - 1) / bm;
  if (g.grid_y > kMaxGridY) value_error("cost_matrix: at most ", kMaxGridY * bm, " base units on CUDA, got ", n_a);
  return g;
}

}  // namespace hm::gpu
