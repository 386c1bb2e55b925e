// AVX2/FMA microkernels of cost_matrix, called only when the CPU reports avx2 and fma
// (dispatch in cost_matrix.cpp). This file is compiled with -mavx2 -mfma, so it includes no
// header with inline functions or templates that the portable files also instantiate: the linker
// keeps one copy of such a function and could hand AVX2 code to a machine without it.
#include <immintrin.h>

#include <cstdint>

namespace hm::cpu::detail {
namespace {

template <typename T> struct Vec;
template <> struct Vec<float> {
  using V = __m256;
  static constexpr int L = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
};
template <> struct Vec<double> {
  using V = __m256d;
  static constexpr int L = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V load(const double* p) { return _mm256_load_pd(p); }
  static V loadu(const double* p) { return _mm256_loadu_pd(p); }
  static void storeu(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V bcast(const double* p) { return _mm256_broadcast_sd(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V add(V a, V b) { return _mm256_add_pd(a, b); }
};

// MR x NR = 6 x (2 vectors): 12 accumulators + 2 B vectors + 1 broadcast fit the 16 ymm registers,
// and 12 independent FMA chains cover Zen3's 2 FMA pipes x 4-cycle latency. One step does 12 FMAs
// for 2 loads + 6 broadcasts, under the 3 loads/cycle the core sustains.
constexpr int kMR = 6;

template <typename T>
inline void ukernel(int64_t kc, const T* __restrict a, const T* __restrict b, T* __restrict c, int64_t ldc,
                    int mr, int nr, bool accumulate) {
  using S = Vec<T>;
  using V = typename S::V;
  constexpr int L = S::L, NR = 2 * L;
  // Named accumulators, not arrays: GCC otherwise keeps an array on the stack and stores it every step.
  V c00 = S::zero(), c01 = S::zero(), c10 = S::zero(), c11 = S::zero(), c20 = S::zero(), c21 = S::zero();
  V c30 = S::zero(), c31 = S::zero(), c40 = S::zero(), c41 = S::zero(), c50 = S::zero(), c51 = S::zero();
  // The C tile is read (or written) right after the loop; ask for its rows early.
  for (int i = 0; i < mr; ++i) _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);

#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    const V b0 = S::load(b), b1 = S::load(b + L);
    V ai;
    ai = S::bcast(a + 0); c00 = S::fma(ai, b0, c00); c01 = S::fma(ai, b1, c01);
    ai = S::bcast(a + 1); c10 = S::fma(ai, b0, c10); c11 = S::fma(ai, b1, c11);
    ai = S::bcast(a + 2); c20 = S::fma(ai, b0, c20); c21 = S::fma(ai, b1, c21);
    ai = S::bcast(a + 3); c30 = S::fma(ai, b0, c30); c31 = S::fma(ai, b1, c31);
    ai = S::bcast(a + 4); c40 = S::fma(ai, b0, c40); c41 = S::fma(ai, b1, c41);
    ai = S::bcast(a + 5); c50 = S::fma(ai, b0, c50); c51 = S::fma(ai, b1, c51);
    a += kMR;
    b += NR;
  }

  if (mr == kMR && nr == NR) {
    const auto put = [&](T* ci, V v0, V v1) {
      if (accumulate) {
        v0 = S::add(v0, S::loadu(ci));
        v1 = S::add(v1, S::loadu(ci + L));
      }
      S::storeu(ci, v0);
      S::storeu(ci + L, v1);
    };
    put(c, c00, c01);
    put(c + ldc, c10, c11);
    put(c + 2 * ldc, c20, c21);
    put(c + 3 * ldc, c30, c31);
    put(c + 4 * ldc, c40, c41);
    put(c + 5 * ldc, c50, c51);
    return;
  }
  // Edge tile: the packed panels are zero-padded, so compute the full tile and keep its corner.
  alignas(32) T tmp[kMR * NR];
  S::storeu(tmp + 0 * NR, c00), S::storeu(tmp + 0 * NR + L, c01);
  S::storeu(tmp + 1 * NR, c10), S::storeu(tmp + 1 * NR + L, c11);
  S::storeu(tmp + 2 * NR, c20), S::storeu(tmp + 2 * NR + L, c21);
  S::storeu(tmp + 3 * NR, c30), S::storeu(tmp + 3 * NR + L, c31);
  S::storeu(tmp + 4 * NR, c40), S::storeu(tmp + 4 * NR + L, c41);
  S::storeu(tmp + 5 * NR, c50), S::storeu(tmp + 5 * NR + L, c51);
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + tmp[i * NR + j] : tmp[i * NR + j];
}

}  // namespace

// float32 6 x 16; float64 6 x 8. Contract in cost_matrix.cpp.
void cost_ukernel_f32_avx2(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, int mr, int nr,
                           bool accumulate) {
  ukernel<float>(kc, ap, bp, c, ldc, mr, nr, accumulate);
}
void cost_ukernel_f64_avx2(int64_t kc, const double* ap, const double* bp, double* c, int64_t ldc, int mr, int nr,
                           bool accumulate) {
  ukernel<double>(kc, ap, bp, c, ldc, mr, nr, accumulate);
}

}  // namespace hm::cpu::detail
