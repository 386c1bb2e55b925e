// CPU loop of weighted_sum; per-element logic in kernels/weighted_sum.h. One streaming pass: for each
// 64-byte step of the output, the step's elements of every input are loaded once into registers
// (L1 for the k > 0 rows) and the step of all K outputs is written.
//
// Why this shape (measured against one torch.mm of the stacked inputs, bench/bench_primitives.py):
// the operation is memory-bound, T·N read and K·N written, so the loop must not add per-element
// work or traffic. The previous loop staged each input block in the accumulator type, then built
// every output row in an L1 buffer tensor by tensor: K·(T + 2) load/store passes per element (perf:
// the buffer `+=` pass and the output stores were the hot spots), compute-bound at a third of the
// copy bandwidth. Here contiguous inputs are read in place, the K sums of a step live in
// registers, 16-bit inputs are widened once per step, and outputs of 4 MiB or more go out with
// non-temporal stores. With AVX2 (run-time check) the same loop runs on 32-byte vectors, which
// bfloat16 (widen, round, narrow) needs to keep up with memory.
#include <algorithm>
#include <cstdlib>
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

// Vectors of W bytes via the GCC/Clang vector extension: 16 (SSE2 on x86-64, NEON on aarch64) or
// 32 (AVX2, chosen at run time). The same IEEE multiplies and adds as the scalar
// weighted_sum_value, in the same order (no contraction: -ffp-contract=off on this file, and the
// AVX2 target does not enable FMA). Helpers are always inlined so that they compile for the
// target of the loop that calls them.
#define HM_WS_INLINE inline __attribute__((always_inline))
// 32-byte vectors only ever live inside AVX2 functions (GCC reports it at the end of the file).
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename E, int W>
struct VecOf;  // GCC needs the vector_size attribute on a non-dependent type: one specialization each
#define HM_WS_VEC(E, W)                                  \
  template <>                                            \
  struct VecOf<E, W> {                                   \
    typedef E type __attribute__((vector_size(W)));      \
  };
HM_WS_VEC(float, 16)
HM_WS_VEC(float, 32)
HM_WS_VEC(double, 16)
HM_WS_VEC(double, 32)
HM_WS_VEC(uint32_t, 16)
HM_WS_VEC(uint32_t, 32)
HM_WS_VEC(int32_t, 16)
HM_WS_VEC(int32_t, 32)
HM_WS_VEC(uint16_t, 8)
HM_WS_VEC(uint16_t, 16)
#undef HM_WS_VEC
template <typename E, int W>
using vec_t = typename VecOf<E, W>::type;

template <typename T, int W>
struct Lanes {
  using Acc = acc_t<T>;
  using V = vec_t<Acc, W>;
  using U32 = vec_t<uint32_t, W>;
  using I32 = vec_t<int32_t, W>;
  using U16 = vec_t<uint16_t, W / 2>;  // W/4 16-bit values: one float vector's worth
  static constexpr int lanes = W / static_cast<int>(sizeof(Acc));
  static constexpr int per_step = static_cast<int>(step_elems<T>()) / lanes;
};

// Loads `lanes` consecutive elements as accumulator values.
template <typename T, int W>
HM_WS_INLINE typename Lanes<T, W>::V load_lanes(const T* p) {
  using L = Lanes<T, W>;
  typename L::V v;
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    memcpy(&v, p, sizeof v);
  } else if constexpr (std::is_same_v<T, bfloat16_t>) {
    typename L::U16 h;
    memcpy(&h, p, sizeof h);
    const typename L::U32 bits = __builtin_convertvector(h, typename L::U32) << 16;  // bf16_to_float
    memcpy(&v, &bits, sizeof v);
  } else {
    float f[L::lanes];
    for (int i = 0; i < L::lanes; ++i) f[i] = load_as_acc(p + i);
    memcpy(&v, f, sizeof v);
  }
  return v;
}

// float_to_bf16 on every lane: round to nearest even, NaN kept quiet, as 32-bit lanes holding the
// 16-bit result sign-extended (so that a signed-saturating pack narrows without changing a bit).
template <int W>
HM_WS_INLINE vec_t<int32_t, W> bf16_bits(vec_t<float, W> v) {
  using U32 = vec_t<uint32_t, W>;
  using I32 = vec_t<int32_t, W>;
  U32 u;
  memcpy(&u, &v, sizeof u);
  const I32 is_nan = (I32)(u & 0x7fffffffu) > 0x7f800000;  // all ones where NaN
  const I32 rounded = (I32)(u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const I32 quiet = (I32)u >> 16 | 0x40;
  return (rounded & ~is_nan) | (quiet & is_nan);
}

// 2·(W/4) bf16 results of two float vectors, in order, to dst (2·W/2 bytes).
template <int W>
HM_WS_INLINE void to_bf16_pair(vec_t<float, W> a, vec_t<float, W> b, unsigned char* dst) {
  const vec_t<int32_t, W> ra = bf16_bits<W>(a), rb = bf16_bits<W>(b);
#if defined(__SSE2__)
  if constexpr (W == 16) {
    __m128i x, y;
    memcpy(&x, &ra, 16);
    memcpy(&y, &rb, 16);
    const __m128i packed = _mm_packs_epi32(x, y);
    memcpy(dst, &packed, 16);
    return;
  }
#endif
  const vec_t<uint16_t, W / 2> ha = __builtin_convertvector(ra, vec_t<uint16_t, W / 2>);
  const vec_t<uint16_t, W / 2> hb = __builtin_convertvector(rb, vec_t<uint16_t, W / 2>);
  memcpy(dst, &ha, W / 2);
  memcpy(dst + W / 2, &hb, W / 2);
}

// Stores one 64-byte step of an output plane from U accumulator vectors; `stream` (16-byte aligned
// p): bypass the cache where the ISA can.
template <typename T, int W>
HM_WS_INLINE void store_step(T* p, const typename Lanes<T, W>::V* v, bool stream) {
  using L = Lanes<T, W>;
  constexpr int U = L::per_step;
  alignas(64) unsigned char bytes[64];
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    memcpy(bytes, v, 64);
  } else if constexpr (std::is_same_v<T, bfloat16_t>) {
    for (int u = 0; u < U; u += 2) to_bf16_pair<W>(v[u], v[u + 1], bytes + W * u / 2);
  } else {
    float f[U * L::lanes];
    memcpy(f, v, sizeof f);
    for (int i = 0; i < U * L::lanes; ++i) store_from_acc(p + i, f[i]);
    return;
  }
#if defined(__SSE2__)
  if (stream) {
    for (int i = 0; i < 4; ++i)
      _mm_stream_si128(reinterpret_cast<__m128i*>(p) + i, _mm_load_si128(reinterpret_cast<const __m128i*>(bytes) + i));
    return;
  }
#endif
  memcpy(p, bytes, 64);
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
  bool avx2;                     // run the 32-byte vector loop
};

// out[k][e] = weighted_sum_value(x[.][e], coeffs[k]) for e < len, x: n_tensors contiguous runs.
template <typename T, int W>
HM_WS_INLINE void combine_run_w(const Plan& plan, const T* const* x, T* out, int64_t len) {
  using L = Lanes<T, W>;
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
  alignas(32) Acc wide[kWiden ? kMaxTensorsPerRun * S : 1];
  int64_t e = 0;
  // Streaming needs 16-byte aligned steps: peel to the first one (all planes share the alignment:
  // plan.stream is only set when plane * sizeof(T) is a multiple of 16).
  if (plan.stream)
    for (; e < len && (reinterpret_cast<uintptr_t>(out + e) & 15); ++e) scalar(e);
  for (; e + S <= len; e += S) {
    if constexpr (kWiden)
      for (int64_t t = 0; t < n_tensors; ++t)
        for (int u = 0; u < U; ++u) {
          const V w = load_lanes<T, W>(x[t] + e + L::lanes * u);
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
            xv = load_lanes<T, W>(x[t] + e + L::lanes * u);
          sum[u] += c * xv;
        }
      }
      store_step<T, W>(out + k * plane + e, sum, plan.stream);
    }
  }
  for (; e < len; ++e) scalar(e);
}

#if HETMERGE_X86_SIMD && defined(__x86_64__)
// The same loop on 32-byte vectors: half the instructions per element, which the 16-bit formats
// (widen, round, narrow) and many inputs need to keep up with memory.
template <typename T>
__attribute__((target("avx2"))) void combine_run_avx2(const Plan& plan, const T* const* x, T* out, int64_t len) {
  combine_run_w<T, 32>(plan, x, out, len);
}

// HETMERGE_NO_AVX2=1 forces the portable loop (read per call, so tests can cover both paths).
bool use_avx2() {
  static const bool cpu_ok = __builtin_cpu_supports("avx2");
  const char* off = std::getenv("HETMERGE_NO_AVX2");
  return cpu_ok && !(off && off[0] && off[0] != '0');
}
#endif

template <typename T>
void combine_run(const Plan& plan, const T* const* x, T* out, int64_t len) {
#if HETMERGE_X86_SIMD && defined(__x86_64__)
  if (plan.avx2) return combine_run_avx2<T>(plan, x, out, len);
#endif
  combine_run_w<T, 16>(plan, x, out, len);
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
#if HETMERGE_X86_SIMD && defined(__x86_64__)
  const bool avx2 = use_avx2();
#else
  const bool avx2 = false;
#endif

  bool flat = true;
  for (const TensorView& x : tensors) flat = flat && x.is_contiguous();
  if (flat && n_tensors <= kMaxTensorsPerRun) {
    // Every input contiguous: one run of numel elements, split over threads in whole steps.
    const Plan plan{n_tensors, K, numel, c.data(), stream, avx2};
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
          const Plan plan{nt, K, numel, c.data(), row_stream, avx2};
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
