// CPU loop of weighted_sum; per-element logic in kernels/weighted_sum.h. One streaming pass: for each
// 64-byte step of the output, the step's elements of every input are loaded once into registers
// (L1 for the k > 0 rows) and the step of all K outputs is written.
//
// Why this shape (measured against one torch.mm of the stacked inputs, bench/bench_primitives.py):
// the operation is memory-bound, T·N read and K·N written, so the loop must not add traffic or
// per-element work. Staging every input through a buffer in the accumulator type, then summing
// each output row over that buffer tensor by tensor, ran at a third of the copy bandwidth: the
// staging copy (strided, scalar), K·(T + 2) passes over L1 buffers per block and plain stores
// that read every output line before writing it. Here contiguous inputs are read in place, the
// sums live in registers, and large float outputs go out with non-temporal stores.
#include <algorithm>
#include <cstring>
#include <type_traits>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common/parallel.h"
#include "cpu/cpu_ops.h"
#include "cpu/cpu_util.h"
#include "kernels/weighted_sum.h"

namespace hm::cpu {
namespace {

// Elements of one step: 64 bytes of T, one cache line of every output plane, so that each
// non-temporal store sequence fills whole write-combining lines even when K planes interleave.
template <typename T>
constexpr int64_t step_elems() {
  return 64 / static_cast<int64_t>(sizeof(T));
}

// Elements per strided staging tile: T raw tiles of this size stay in L1/L2.
constexpr int64_t kTile = 1024;

// Outputs at least this large bypass the cache (non-temporal stores): they are written once and
// would otherwise evict the inputs and cost a read of every destination line. Smaller ones may
// still be cache resident for the caller, where plain stores are cheaper.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// 16-byte vectors (SSE2 on x86-64, NEON on aarch64) via the GCC/Clang vector extension; the same
// IEEE multiplies and adds as the scalar weighted_sum_value, in the same order (no contraction:
// -ffp-contract=off on this file).
template <typename Acc>
struct Simd {
  typedef Acc vec __attribute__((vector_size(16)));
  static constexpr int lanes = 16 / sizeof(Acc);
};
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));

template <typename T>
struct Lanes {
  using Acc = acc_t<T>;
  using V = typename Simd<Acc>::vec;
  static constexpr int lanes = Simd<Acc>::lanes;
  static constexpr int per_step = static_cast<int>(step_elems<T>()) / lanes;
};

// Loads `lanes` consecutive elements as accumulator values.
template <typename T>
inline typename Lanes<T>::V load_lanes(const T* p) {
  typename Lanes<T>::V v;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, bfloat16_t>) {
    u16x4 h;
    memcpy(&h, p, sizeof h);
    const u32x4 bits = __builtin_convertvector(h, u32x4) << 16;  // bf16_to_float, four at a time
    memcpy(&v, &bits, sizeof v);
  } else {
    float f[4];
    for (int i = 0; i < 4; ++i) f[i] = load_as_acc(p + i);
    memcpy(&v, f, sizeof v);
  }
  return v;
}

// float_to_bf16 on four values: round to nearest even, NaN kept quiet (same bits as the scalar).
inline u16x4 to_bf16_lanes(Simd<float>::vec v) {
  u32x4 u;
  memcpy(&u, &v, sizeof u);
  const u32x4 is_nan = (u32x4)((i32x4)(u & 0x7fffffffu) > 0x7f800000);  // all ones where NaN
  const u32x4 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const u32x4 quiet = (u >> 16) | 0x40u;
  return __builtin_convertvector((rounded & ~is_nan) | (quiet & is_nan), u16x4);
}

// Eight float_to_bf16 results (two vectors) as 16 bytes. Arithmetic shifts keep every 16-bit
// result sign-extended, so SSE2's signed-saturating pack narrows without changing a bit.
inline void to_bf16_pair(Simd<float>::vec a, Simd<float>::vec b, void* dst16) {
#if defined(__SSE2__)
  auto sext = [](Simd<float>::vec v) {
    u32x4 u;
    memcpy(&u, &v, sizeof u);
    const i32x4 is_nan = (i32x4)(u & 0x7fffffffu) > 0x7f800000;  // all ones where NaN
    const i32x4 rounded = (i32x4)(u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const i32x4 quiet = (i32x4)u >> 16 | 0x40;
    __m128i r;
    const i32x4 v16 = (rounded & ~is_nan) | (quiet & is_nan);
    memcpy(&r, &v16, sizeof r);
    return r;
  };
  const __m128i packed = _mm_packs_epi32(sext(a), sext(b));
  memcpy(dst16, &packed, 16);
#else
  const u16x4 h[2] = {to_bf16_lanes(a), to_bf16_lanes(b)};
  memcpy(dst16, h, 16);
#endif
}

// Stores one 64-byte step of an output plane from U accumulator vectors; `stream` (16-byte aligned
// p): bypass the cache where the ISA can.
template <typename T>
inline void store_step(T* p, const typename Lanes<T>::V* v, bool stream) {
  constexpr int U = Lanes<T>::per_step;
  constexpr int lanes = Lanes<T>::lanes;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
#if defined(__SSE2__)
    if (stream) {
      for (int u = 0; u < U; ++u) {
        if constexpr (std::is_same_v<T, float>)
          _mm_stream_ps(p + lanes * u, reinterpret_cast<const __m128&>(v[u]));
        else
          _mm_stream_pd(p + lanes * u, reinterpret_cast<const __m128d&>(v[u]));
      }
      return;
    }
#endif
    memcpy(p, v, 64);
  } else if constexpr (std::is_same_v<T, bfloat16_t>) {
    alignas(16) unsigned char bytes[64];
    for (int u = 0; u < U; u += 2) to_bf16_pair(v[u], v[u + 1], bytes + 8 * u);
#if defined(__SSE2__)
    if (stream) {
      for (int i = 0; i < 4; ++i)
        _mm_stream_si128(reinterpret_cast<__m128i*>(p) + i, _mm_load_si128(reinterpret_cast<const __m128i*>(bytes) + i));
      return;
    }
#endif
    memcpy(p, bytes, 64);
  } else {
    float f[U * lanes];
    memcpy(f, v, sizeof f);
    for (int i = 0; i < U * lanes; ++i) store_from_acc(p + i, f[i]);
  }
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();  // order the non-temporal stores before anything the caller does next
#endif
}

// More than 64 inputs: the first 64 sum into a buffer, later groups continue from it in the same order
// (weighted_sum_value_from), so the rounding is that of one pass.
constexpr int64_t kMaxTensorsPerRun = 64;

struct Plan {
  int64_t n_tensors, K, plane;  // plane: numel, the distance between output planes
  const void* coeffs;            // [K, n_tensors] in acc_t<T>
  bool stream;                   // non-temporal stores where the step is 16-byte aligned
};

// out[k][e] = weighted_sum_value(x[.][e], coeffs[k]) for e < len, x: n_tensors contiguous runs.
template <typename T>
void combine_run(const Plan& plan, const T* const* x, T* out, int64_t len) {
  using L = Lanes<T>;
  using Acc = typename L::Acc;
  using V = typename L::V;
  constexpr int64_t S = step_elems<T>();
  constexpr int U = L::per_step;
  const int64_t n_tensors = plan.n_tensors, K = plan.K, plane = plan.plane;
  const Acc* coeffs = static_cast<const Acc*>(plan.coeffs);
  Acc values[kMaxTensorsPerRun];  // one element of every input (scalar peel and tail)

  auto scalar = [&](int64_t e) {
    for (int64_t t = 0; t < n_tensors; ++t) values[t] = load_as_acc(x[t] + e);
    for (int64_t k = 0; k < K; ++k)
      store_from_acc(out + k * plane + e, weighted_sum_value(values, coeffs + k * n_tensors, n_tensors));
  };
  // 16-bit inputs are widened once per step, not once per output row.
  constexpr bool kWiden = !std::is_same_v<T, Acc>;
  alignas(16) Acc wide[kWiden ? kMaxTensorsPerRun * S : 1];
  int64_t e = 0;
  // Streaming needs 16-byte aligned steps: peel to the first one (all planes share the alignment:
  // plan.stream is only set when plane * sizeof(T) is a multiple of 16).
  if (plan.stream)
    for (; e < len && (reinterpret_cast<uintptr_t>(out + e) & 15); ++e) scalar(e);
  for (; e + S <= len; e += S) {
    if constexpr (kWiden)
      for (int64_t t = 0; t < n_tensors; ++t)
        for (int u = 0; u < U; ++u) {
          const V w = load_lanes(x[t] + e + L::lanes * u);
          memcpy(wide + t * S + L::lanes * u, &w, sizeof w);
        }
    for (int64_t k = 0; k < K; ++k) {
      const Acc* ck = coeffs + k * n_tensors;
      V sum[U];
      for (int u = 0; u < U; ++u) sum[u] = V{};  // weighted_sum_value starts from +0
      for (int64_t t = 0; t < n_tensors; ++t) {
        const Acc c = ck[t];
        for (int u = 0; u < U; ++u) {
          V xv;
          if constexpr (kWiden)
            memcpy(&xv, wide + t * S + L::lanes * u, sizeof xv);
          else
            xv = load_lanes(x[t] + e + L::lanes * u);
          sum[u] += c * xv;
        }
      }
      store_step(out + k * plane + e, sum, plan.stream);
    }
  }
  for (; e < len; ++e) scalar(e);
}

template <typename T>
void weighted_sum_loop(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                       const TensorView& out) {
  using Acc = acc_t<T>;
  const int64_t n_tensors = static_cast<int64_t>(tensors.size());
  const TensorView& ref = tensors[0];
  const int64_t numel = ref.numel();
  if (numel == 0 || K == 0) return;
  std::vector<Acc> c(coeffs.begin(), coeffs.end());
  T* po = out.ptr<T>();
  const bool stream = K * numel * static_cast<int64_t>(sizeof(T)) >= kStreamBytes &&
                      (numel * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  constexpr int64_t S = step_elems<T>();

  bool flat = true;
  for (const TensorView& x : tensors) flat = flat && x.is_contiguous();
  if (flat && n_tensors <= kMaxTensorsPerRun) {
    // Every input contiguous: one run of numel elements, split over threads in whole steps.
    const Plan plan{n_tensors, K, numel, c.data(), stream};
    std::vector<const T*> base(static_cast<size_t>(n_tensors));
    for (int64_t t = 0; t < n_tensors; ++t) base[t] = tensors[t].ptr<const T>();
    const int64_t steps = (numel + S - 1) / S;
    const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / (S * (K + n_tensors)));
    parallel_for(steps, grain, [&](int64_t begin, int64_t end) {
      const int64_t e0 = begin * S, e1 = std::min(numel, end * S);
      std::vector<const T*> x(base);
      for (auto& p : x) p += e0;
      combine_run<T>(plan, x.data(), po + e0, e1 - e0);
      if (stream) stream_fence();
    });
    return;
  }

  // General layout: seen as [rows, inner] (inner = the last dim; a 0-D tensor is one row of one
  // element). Each (row, tile) reads inputs with a unit inner stride in place and gathers the
  // others into a contiguous tile first.
  const int64_t inner = ref.ndim ? ref.shape[ref.ndim - 1] : 1;
  const int64_t n_rows = numel / inner;
  const int64_t tiles_per_row = (inner + kTile - 1) / kTile;
  const int64_t items = n_rows * tiles_per_row;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / (std::min(inner, kTile) * (K + n_tensors)));
  const bool row_stream = stream && (inner * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  parallel_for(items, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> gathered;
    std::vector<const T*> x(static_cast<size_t>(std::min(n_tensors, kMaxTensorsPerRun)));
    std::vector<Acc> partial;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / tiles_per_row;
      const int64_t e0 = (item % tiles_per_row) * kTile;
      const int64_t len = std::min(inner, e0 + kTile) - e0;
      T* dst = po + row * inner + e0;
      for (int64_t t0 = 0; t0 < n_tensors; t0 += kMaxTensorsPerRun) {
        const int64_t nt = std::min(kMaxTensorsPerRun, n_tensors - t0);
        for (int64_t t = 0; t < nt; ++t) {
          const TensorView& xv = tensors[t0 + t];
          const int64_t s = xv.ndim ? xv.strides[xv.ndim - 1] : 1;
          const T* src = xv.ptr<const T>() + row_offset(xv, row) + e0 * s;
          if (s == 1) {
            x[t] = src;
            continue;
          }
          if (gathered.empty()) gathered.resize(static_cast<size_t>(kMaxTensorsPerRun * kTile));
          T* g = gathered.data() + t * kTile;
          for (int64_t e = 0; e < len; ++e) g[e] = src[e * s];
          x[t] = g;
        }
        if (t0 == 0 && nt == n_tensors) {
          const Plan plan{nt, K, numel, c.data(), row_stream};
          combine_run<T>(plan, x.data(), dst, len);
          continue;
        }
        // Chained groups of inputs: the partial sums stay in the accumulator type.
        if (partial.empty()) partial.resize(static_cast<size_t>(K * kTile));
        Acc values[kMaxTensorsPerRun];
        for (int64_t k = 0; k < K; ++k) {
          const Acc* ck = c.data() + k * n_tensors + t0;
          Acc* pk = partial.data() + k * kTile;
          for (int64_t e = 0; e < len; ++e) {
            for (int64_t t = 0; t < nt; ++t) values[t] = load_as_acc(x[t] + e);
            pk[e] = t0 == 0 ? weighted_sum_value(values, ck, nt) : weighted_sum_value_from(pk[e], values, ck, nt);
          }
        }
        if (t0 + nt == n_tensors)
          for (int64_t k = 0; k < K; ++k)
            for (int64_t e = 0; e < len; ++e) store_from_acc(dst + k * numel + e, partial[k * kTile + e]);
      }
    }
    if (row_stream) stream_fence();
  });
}

}  // namespace

void weighted_sum(const std::vector<TensorView>& tensors, const std::vector<double>& coeffs, int64_t K,
                  const TensorView& out) {
  dispatch_floating(tensors[0].dtype, [&](auto tag) { weighted_sum_loop<decltype(tag)>(tensors, coeffs, K, out); });
}

}  // namespace hm::cpu
