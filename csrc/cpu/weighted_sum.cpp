// CPU loop of weighted_sum; per-element logic in kernels/weighted_sum.h. One pass: a block of every
// input is staged once in the accumulator type, then all K outputs of that block are written.
#include <algorithm>

#include "common/parallel.h"
#include "cpu/cpu_ops.h"
#include "cpu/cpu_util.h"
#include "kernels/weighted_sum.h"

namespace hm::cpu {
namespace {

constexpr int64_t kBlock = 1024;

template <typename T>
void weighted_sum_loop(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                       const TensorView& out) {
  using Acc = acc_t<T>;
  const int64_t n_tensors = static_cast<int64_t>(tensors.size());
  const TensorView& ref = tensors[0];
  const int64_t numel = ref.numel();
  if (numel == 0 || K == 0) return;
  // Seen as [rows, inner] with inner = the last dim (a 0-D tensor is one row of one element).
  const int64_t inner = ref.ndim ? ref.shape[ref.ndim - 1] : 1;
  const int64_t n_rows = numel / inner;
  const int64_t blocks_per_row = (inner + kBlock - 1) / kBlock;
  std::vector<Acc> c(coeffs.begin(), coeffs.end());
  T* po = out.ptr<T>();

  const int64_t items = n_rows * blocks_per_row;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / (std::min(inner, kBlock) * (K + n_tensors)));
  parallel_for(items, grain, [&](int64_t begin, int64_t end) {
    std::vector<Acc> staged(static_cast<size_t>(n_tensors * kBlock));
    std::vector<Acc> sums(static_cast<size_t>(kBlock));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / blocks_per_row;
      const int64_t e0 = (item % blocks_per_row) * kBlock;
      const int64_t len = std::min(inner, e0 + kBlock) - e0;
      for (int64_t t = 0; t < n_tensors; ++t) {
        const TensorView& x = tensors[t];
        const int64_t s = x.ndim ? x.strides[x.ndim - 1] : 1;
        const T* src = x.ptr<const T>() + row_offset(x, row) + e0 * s;
        Acc* dst = staged.data() + t * kBlock;
        for (int64_t e = 0; e < len; ++e) dst[e] = load_as_acc(src + e * s);
      }
      const int64_t out_offset = row * inner + e0;
      // Same sum as weighted_sum_value (0 + c_0·x_0 + c_1·x_1 + ...), tensor by tensor so the
      // element loops vectorize.
      for (int64_t k = 0; k < K; ++k) {
        const Acc* ck = c.data() + k * n_tensors;
        for (int64_t e = 0; e < len; ++e) sums[e] = Acc(0);
        for (int64_t t = 0; t < n_tensors; ++t) {
          const Acc ct = ck[t];
          const Acc* x = staged.data() + t * kBlock;
          for (int64_t e = 0; e < len; ++e) sums[e] += ct * x[e];
        }
        T* dst = po + k * numel + out_offset;
        for (int64_t e = 0; e < len; ++e) store_from_acc(dst + e, sums[e]);
      }
    }
  });
}

}  // namespace

void weighted_sum(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                  const TensorView& out) {
  dispatch_floating(tensors[0].dtype, [&](auto tag) { weighted_sum_loop<decltype(tag)>(tensors, coeffs, K, out); });
}

}  // namespace hm::cpu
