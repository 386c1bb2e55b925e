// CPU loop of permute_pad; per-element logic in kernels/permute_pad.h.
#include <cstring>

#include "common/parallel.h"
#include "cpu/cpu_ops.h"
#include "cpu/cpu_util.h"
#include "kernels/permute_pad.h"

namespace hm::cpu {
namespace {

// permute_pad moves bits, so it only needs the element size: 0 bits are 0.0 in every dtype.
template <typename Bits>
void permute_pad_loop(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out) {
  // A 1-D w is a single row whose columns are permuted by `rows`.
  const bool one_d = w.ndim == 1;
  Axes3 geo{one_d ? 1 : w.shape[0], one_d ? w.shape[0] : w.shape[1], 1, one_d ? 0 : w.strides[0],
            one_d ? w.strides[0] : w.strides[1]};
  const TensorView* row_map = one_d ? nullptr : rows;
  const TensorView* col_map = one_d ? rows : cols;
  const std::vector<int64_t> toff = trailing_offsets(w, one_d ? 1 : 2);
  geo.n_trailing = static_cast<int64_t>(toff.size());

  const int64_t m0 = row_map ? row_map->shape[0] : geo.n0;
  const int64_t m1 = col_map ? col_map->shape[0] : geo.n1;
  const int64_t T = geo.n_trailing;
  const int64_t* rmap = row_map ? row_map->ptr<const int64_t>() : nullptr;
  const int64_t* cmap = col_map ? col_map->ptr<const int64_t>() : nullptr;
  const int64_t rstride = row_map ? row_map->strides[0] : 0;
  const int64_t cstride = col_map ? col_map->strides[0] : 0;
  const Bits* src = w.ptr<const Bits>();
  Bits* dst = out.ptr<Bits>();
  const int64_t row_len = m1 * T;
  if (m0 == 0 || row_len == 0) return;

  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / row_len);
  parallel_for(m0, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Bits* out_row = dst + i * row_len;
      const int64_t r = mapped_index(rmap, rstride, i);
      if (r == kPad) {
        std::memset(out_row, 0, sizeof(Bits) * row_len);
        continue;
      }
      const Bits* src_row = src + r * geo.stride0;
      if (T == 1) {
        if (!cmap && geo.stride1 == 1) {
          std::memcpy(out_row, src_row, sizeof(Bits) * m1);
        } else {
          for (int64_t j = 0; j < m1; ++j) {
            const int64_t c = mapped_index(cmap, cstride, j);
            out_row[j] = c == kPad ? Bits(0) : src_row[c * geo.stride1];
          }
        }
      } else {
        for (int64_t j = 0; j < m1; ++j) {
          const int64_t source = permute_pad_source(geo, rmap, rstride, cmap, cstride, i, j);
          Bits* out_cell = out_row + j * T;
          if (source == kPadSource) {
            std::memset(out_cell, 0, sizeof(Bits) * T);
          } else {
            for (int64_t t = 0; t < T; ++t) out_cell[t] = src[source + toff[t]];
          }
        }
      }
    }
  });
}

}  // namespace

void permute_pad(const TensorView& w, const TensorView* rows, const TensorView* cols, const TensorView& out) {
  switch (dtype_size(w.dtype)) {
    case 2: permute_pad_loop<uint16_t>(w, rows, cols, out); break;
    case 4: permute_pad_loop<uint32_t>(w, rows, cols, out); break;
    case 8: permute_pad_loop<uint64_t>(w, rows, cols, out); break;
    default: type_error("permute_pad: unsupported dtype ", dtype_name(w.dtype));
  }
}

}  // namespace hm::cpu
