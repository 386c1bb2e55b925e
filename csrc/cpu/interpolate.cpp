// CPU loop of interpolate; per-element logic in kernels/interpolate.h. One pass: each (row, column
// block) of a and of the gathered b is read once into a small buffer, then all K outputs are written.
#include <algorithm>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common/parallel.h"
#include "cpu/cpu_ops.h"
#include "cpu/cpu_util.h"
#include "kernels/interpolate.h"

namespace hm::cpu {
namespace {

// Columns per work item: the two accumulator buffers stay in L1/L2 while K outputs are written.
constexpr int64_t kColumnBlock = 2048;

// Writes dst[e] = interpolate_value(as[e], bs[e], l) for e < len. The K output planes are written
// once and not read back, so float32 goes through non-temporal stores: no read-for-ownership of
// the destination lines and no eviction of the staged inputs.
template <typename T, typename Acc>
void write_plane_row(T* __restrict dst, const Acc* __restrict as, const Acc* __restrict bs, Acc l, int64_t len) {
  for (int64_t e = 0; e < len; ++e) store_from_acc(dst + e, interpolate_value(as[e], bs[e], l));
}

#if defined(__SSE2__)
template <>
void write_plane_row<float, float>(float* __restrict dst, const float* __restrict as, const float* __restrict bs,
                                   float l, int64_t len) {
  int64_t e = 0;
  for (; e < len && (reinterpret_cast<uintptr_t>(dst + e) & 15); ++e) dst[e] = interpolate_value(as[e], bs[e], l);
  const __m128 vl = _mm_set1_ps(l), vm = _mm_set1_ps(1.0f - l);
  for (; e + 4 <= len; e += 4) {
    const __m128 v = _mm_add_ps(_mm_mul_ps(vm, _mm_loadu_ps(as + e)), _mm_mul_ps(vl, _mm_loadu_ps(bs + e)));
    _mm_stream_ps(dst + e, v);
  }
  for (; e < len; ++e) dst[e] = interpolate_value(as[e], bs[e], l);
}
#endif

template <typename T>
void interpolate_loop(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas,
                      const TensorView* rows, const TensorView* cols, bool fill_base, const TensorView& out) {
  using Acc = acc_t<T>;
  // A 1-D a is a single row whose columns are mapped by `rows`.
  const bool one_d = a.ndim == 1;
  const Axes3 ga{one_d ? 1 : a.shape[0], one_d ? a.shape[0] : a.shape[1], 1, one_d ? 0 : a.strides[0],
                 one_d ? a.strides[0] : a.strides[1]};
  const Axes3 gb{one_d ? 1 : b.shape[0], one_d ? b.shape[0] : b.shape[1], 1, one_d ? 0 : b.strides[0],
                 one_d ? b.strides[0] : b.strides[1]};
  const TensorView* row_map = one_d ? nullptr : rows;
  const TensorView* col_map = one_d ? rows : cols;
  const std::vector<int64_t> a_toff = trailing_offsets(a, one_d ? 1 : 2);
  const std::vector<int64_t> b_toff = trailing_offsets(b, one_d ? 1 : 2);
  const int64_t n_trailing = static_cast<int64_t>(a_toff.size());
  const int64_t n0 = ga.n0, n1 = ga.n1, K = static_cast<int64_t>(lambdas.size());
  const int64_t plane = n0 * n1 * n_trailing;
  if (plane == 0 || K == 0) return;

  const int64_t* rmap = row_map ? row_map->ptr<const int64_t>() : nullptr;
  const int64_t* cmap = col_map ? col_map->ptr<const int64_t>() : nullptr;
  const int64_t rstride = row_map ? row_map->strides[0] : 0;
  const int64_t cstride = col_map ? col_map->strides[0] : 0;
  const T* pa = a.ptr<const T>();
  const T* pb = b.ptr<const T>();
  T* po = out.ptr<T>();
  std::vector<Acc> lam(lambdas.begin(), lambdas.end());

  const int64_t col_blocks = (n1 + kColumnBlock - 1) / kColumnBlock;
  const int64_t items = n0 * col_blocks;
  const int64_t item_elems = std::min(n1, kColumnBlock) * n_trailing;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(1, item_elems * K));
  parallel_for(items, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> abuf(static_cast<size_t>(item_elems)), bbuf(static_cast<size_t>(item_elems));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / col_blocks;
      const int64_t j0 = (item % col_blocks) * kColumnBlock;
      const int64_t j1 = std::min(n1, j0 + kColumnBlock);
      const int64_t r = mapped_index(rmap, rstride, i);
      const T* a_row = pa + i * ga.stride0;
      // Stage a and the gathered, padded b for this block in the accumulator type.
      if (n_trailing == 1) {
        // Matrices and biases: split loops so the a-copy vectorizes and the gather stays tight.
        const int64_t n = j1 - j0;
        const T* a_src = a_row + j0 * ga.stride1;
        if (ga.stride1 == 1) {
          for (int64_t e = 0; e < n; ++e) abuf[e] = load_as_acc(a_src + e);
        } else {
          for (int64_t e = 0; e < n; ++e) abuf[e] = load_as_acc(a_src + e * ga.stride1);
        }
        if (r == kPad) {
          for (int64_t e = 0; e < n; ++e) bbuf[e] = interpolate_target_value(true, Acc(0), abuf[e], fill_base);
        } else {
          const T* b_row = pb + r * gb.stride0;
          for (int64_t e = 0; e < n; ++e) {
            const int64_t c = mapped_index(cmap, cstride, j0 + e);
            bbuf[e] = c == kPad ? interpolate_target_value(true, Acc(0), abuf[e], fill_base)
                                : load_as_acc(b_row + c * gb.stride1);
          }
        }
      } else {
        for (int64_t j = j0, e = 0; j < j1; ++j) {
          const int64_t c = mapped_index(cmap, cstride, j);
          const bool pad = r == kPad || c == kPad;
          const T* b_cell = pad ? nullptr : pb + r * gb.stride0 + c * gb.stride1;
          const T* a_cell = a_row + j * ga.stride1;
          for (int64_t t = 0; t < n_trailing; ++t, ++e) {
            const Acc av = load_as_acc(a_cell + a_toff[t]);
            abuf[e] = av;
            bbuf[e] = interpolate_target_value(pad, pad ? Acc(0) : load_as_acc(b_cell + b_toff[t]), av, fill_base);
          }
        }
      }
      const int64_t len = (j1 - j0) * n_trailing;
      const int64_t out_offset = (i * n1 + j0) * n_trailing;
      const Acc* __restrict as = abuf.data();
      const Acc* __restrict bs = bbuf.data();
      for (int64_t k = 0; k < K; ++k) write_plane_row<T, Acc>(po + k * plane + out_offset, as, bs, lam[k], len);
      if (!fill_base) continue;
#if defined(__SSE2__)
      _mm_sfence();  // the streamed values must land before they are overwritten below
#endif
      // Padded slots under fill="base" keep a exactly (see interpolate_element); rewriting them
      // after the branch-free loop keeps that loop vectorized.
      for (int64_t j = j0; j < j1; ++j) {
        const bool pad = r == kPad || mapped_index(cmap, cstride, j) == kPad;
        if (!pad) continue;
        for (int64_t k = 0; k < K; ++k) {
          T* dst = po + k * plane + (i * n1 + j) * n_trailing;
          const Acc* src = as + (j - j0) * n_trailing;
          for (int64_t t = 0; t < n_trailing; ++t)
            store_from_acc(dst + t, interpolate_element(src[t], src[t], lam[k], true));
        }
      }
    }
#if defined(__SSE2__)
    _mm_sfence();  // order the non-temporal stores before the caller reads the output
#endif
  });
}

}  // namespace

void interpolate(const TensorView& a, const TensorView& b, const std::vector<double>& lambdas, const TensorView* rows,
                 const TensorView* cols, bool fill_base, const TensorView& out) {
  dispatch_floating(a.dtype, [&](auto tag) {
    interpolate_loop<decltype(tag)>(a, b, lambdas, rows, cols, fill_base, out);
  });
}

}  // namespace hm::cpu
