// AVX2 versions of the linear assignment inner loops (contracts in cpu/linear_assignment_kernels.h).
// Compiled with -mavx2 -mfma and called only after a runtime CPU check; this file uses no STL and
// shares no inline helpers with other files, so no AVX2 code can leak into the portable paths.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include "cpu/linear_assignment_kernels.h"

namespace hm::la {
namespace {

constexpr double kInf = __builtin_inf();

inline __m256d load4(const double* p) { return _mm256_loadu_pd(p); }
inline __m256d load4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }

// Lanes l < cnt loaded, the others 0; masked lanes are never touched (no fault past a row's end).
inline __m256d load4_part(const double* p, int64_t cnt) {
  const __m256i mask = _mm256_cmpgt_epi64(_mm256_set1_epi64x(cnt), _mm256_setr_epi64x(0, 1, 2, 3));
  return _mm256_maskload_pd(p, mask);
}
inline __m256d load4_part(const float* p, int64_t cnt) {
  const int c = cnt < 0 ? 0 : (cnt > 4 ? 4 : static_cast<int>(cnt));
  const __m128i mask = _mm_cmpgt_epi32(_mm_set1_epi32(c), _mm_setr_epi32(0, 1, 2, 3));
  return _mm256_cvtps_pd(_mm_maskload_ps(p, mask));
}
inline __m256d lanes_below(int64_t cnt) {
  return _mm256_castsi256_pd(_mm256_cmpgt_epi64(_mm256_set1_epi64x(cnt), _mm256_setr_epi64x(0, 1, 2, 3)));
}

inline __m256d gather4(const double* row, const int32_t* idx) {
  // The masked form with an explicit source: GCC 12 warns about the unmasked one's undefined source.
  return _mm256_mask_i32gather_pd(_mm256_setzero_pd(), row, _mm_load_si128(reinterpret_cast<const __m128i*>(idx)),
                                  _mm256_castsi256_pd(_mm256_set1_epi64x(-1)), 8);
}
inline __m256d gather4(const float* row, const int32_t* idx) {
  return _mm256_cvtps_pd(_mm_mask_i32gather_ps(_mm_setzero_ps(), row,
                                               _mm_load_si128(reinterpret_cast<const __m128i*>(idx)),
                                               _mm_castsi128_ps(_mm_set1_epi32(-1)), 4));
}

// Narrows a 4 x 64-bit compare mask to 4 x 32-bit lanes (for the int32 predecessor array).
inline __m128i narrow_mask(__m256d mk) {
  const __m128 lo = _mm256_castps256_ps128(_mm256_castpd_ps(mk));
  const __m128 hi = _mm256_extractf128_ps(_mm256_castpd_ps(mk), 1);
  return _mm_castps_si128(_mm_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)));
}

// NaN or -inf (the values the solver rejects): "not greater than -inf", true when unordered.
inline __m256d rejected(__m256d x) { return _mm256_cmp_pd(x, _mm256_set1_pd(-kInf), _CMP_NGT_UQ); }

// One Dijkstra relaxation step over 8 positions; returns the updated distances.
struct Relax {
  __m256d sv, hv;
  __m128i iv;
  __m256d low0, low1;
  const double* vv;
  double* dd;
  int32_t* pp;

  inline void step(int64_t k, __m256d c0, __m256d c1) {
    // sign * c - t in one FMA: the product is exact, so this rounds like a plain subtraction.
    const __m256d cand0 = _mm256_fmsub_pd(c0, sv, _mm256_add_pd(_mm256_load_pd(vv + k), hv));
    const __m256d cand1 = _mm256_fmsub_pd(c1, sv, _mm256_add_pd(_mm256_load_pd(vv + k + 4), hv));
    __m256d d0 = _mm256_load_pd(dd + k);
    __m256d d1 = _mm256_load_pd(dd + k + 4);
    const __m256d up0 = _mm256_cmp_pd(cand0, d0, _CMP_LT_OQ);
    const __m256d up1 = _mm256_cmp_pd(cand1, d1, _CMP_LT_OQ);
    // Late in a search most distances do not improve: skip the stores then.
    if (_mm256_movemask_pd(_mm256_or_pd(up0, up1))) {
      d0 = _mm256_min_pd(cand0, d0);
      d1 = _mm256_min_pd(cand1, d1);
      _mm256_store_pd(dd + k, d0);
      _mm256_store_pd(dd + k + 4, d1);
      __m128i* p0 = reinterpret_cast<__m128i*>(pp + k);
      __m128i* p1 = reinterpret_cast<__m128i*>(pp + k + 4);
      _mm_store_si128(p0, _mm_blendv_epi8(_mm_load_si128(p0), iv, narrow_mask(up0)));
      _mm_store_si128(p1, _mm_blendv_epi8(_mm_load_si128(p1), iv, narrow_mask(up1)));
    }
    low0 = _mm256_min_pd(d0, low0);
    low1 = _mm256_min_pd(d1, low1);
  }
};

// The first position whose distance equals `low`, and the first such position of a free column
// (ties are common with integer costs; ending at a free column ends the search early).
inline void locate(const double* dd, const double* fp, int64_t m, double low, ScanMin* out) {
  out->low = low;
  out->pos = -1;
  out->pos_free = -1;
  if (!(low < kInf)) return;
  const __m256d lv = _mm256_set1_pd(low);
  for (int64_t k = 0; k < m; k += 4) {
    int bits = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_load_pd(dd + k), lv, _CMP_EQ_OQ));
    while (bits) {
      const int64_t p = k + __builtin_ctz(bits);
      bits &= bits - 1;
      if (out->pos < 0) out->pos = p;
      if (fp[p] == 0.0) {
        out->pos_free = p;
        return;
      }
    }
  }
}

template <typename T>
void scan_impl(const T* row, int64_t n_row, double sign, const int32_t* idx, const double* vv, double* dd,
               int32_t* pp, const double* fp, int64_t m, double h, int32_t i, ScanMin* out) {
  Relax r{_mm256_set1_pd(sign), _mm256_set1_pd(h), _mm_set1_epi32(i),
          _mm256_set1_pd(kInf), _mm256_set1_pd(kInf), vv, dd, pp};
  if (idx) {
    for (int64_t k = 0; k < m; k += 8) r.step(k, gather4(row, idx + k), gather4(row, idx + k + 4));
  } else {
    const int64_t full = (n_row < m ? n_row : m) / 8 * 8;
    int64_t k = 0;
    for (; k < full; k += 8) r.step(k, load4(row + k), load4(row + k + 4));
    for (; k < m; k += 8) r.step(k, load4_part(row + k, n_row - k), load4_part(row + k + 4, n_row - k - 4));
  }
  alignas(32) double val[4];
  _mm256_store_pd(val, _mm256_min_pd(r.low0, r.low1));
  double low = val[0];
  for (int l = 1; l < 4; ++l) low = val[l] < low ? val[l] : low;
  locate(dd, fp, m, low, out);
}

// Running three best per lane (strict <, so the earliest column wins ties).
struct Top3 {
  __m256d m1, m2, m3, i1, i2, i3;
  inline void push(__m256d r, __m256d kv) {
    const __m256d lt1 = _mm256_cmp_pd(r, m1, _CMP_LT_OQ);
    const __m256d lt2 = _mm256_cmp_pd(r, m2, _CMP_LT_OQ);
    const __m256d lt3 = _mm256_cmp_pd(r, m3, _CMP_LT_OQ);
    // Each rank takes the rank above it when r beats that one, else r when r beats it.
    i3 = _mm256_blendv_pd(_mm256_blendv_pd(i3, kv, lt3), i2, lt2);
    m3 = _mm256_blendv_pd(_mm256_blendv_pd(m3, r, lt3), m2, lt2);
    i2 = _mm256_blendv_pd(_mm256_blendv_pd(i2, kv, lt2), i1, lt1);
    m2 = _mm256_blendv_pd(_mm256_blendv_pd(m2, r, lt2), m1, lt1);
    i1 = _mm256_blendv_pd(i1, kv, lt1);
    m1 = _mm256_blendv_pd(m1, r, lt1);
  }
};

template <bool check, bool has_v, typename T>
bool cands_impl(const T* row, int64_t n, double sign, const double* v, Cands* out) {
  static_assert(kLaCands == 24, "two accumulator sets of 4 lanes x top 3");
  const __m256d sv = _mm256_set1_pd(sign);
  const __m256d inf = _mm256_set1_pd(kInf);
  const __m256d none = _mm256_set1_pd(-1.0);
  Top3 a{inf, inf, inf, none, none, none}, b = a;
  __m256d bad = _mm256_setzero_pd();
  __m256d k0 = _mm256_setr_pd(0, 1, 2, 3), k1 = _mm256_setr_pd(4, 5, 6, 7);
  const __m256d step = _mm256_set1_pd(8.0);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256d c0 = _mm256_mul_pd(load4(row + k), sv);
    const __m256d c1 = _mm256_mul_pd(load4(row + k + 4), sv);
    const __m256d r0 = has_v ? _mm256_sub_pd(c0, _mm256_loadu_pd(v + k)) : c0;
    const __m256d r1 = has_v ? _mm256_sub_pd(c1, _mm256_loadu_pd(v + k + 4)) : c1;
    // After the first few columns a value rarely enters a lane's top three: test before blending.
    // "Not >=" is also true for NaN, and -inf (v is finite) always enters, so the NaN/-inf
    // screen only needs to run on this rare path.
    if (_mm256_movemask_pd(_mm256_or_pd(_mm256_cmp_pd(r0, a.m3, _CMP_NGE_UQ), _mm256_cmp_pd(r1, b.m3, _CMP_NGE_UQ)))) {
      if constexpr (check) bad = _mm256_or_pd(bad, _mm256_or_pd(rejected(c0), rejected(c1)));
      a.push(r0, k0);
      b.push(r1, k1);
    }
    k0 = _mm256_add_pd(k0, step);
    k1 = _mm256_add_pd(k1, step);
  }
  for (; k < n; k += 8) {  // tail: lanes past n read nothing and count as +inf
    const __m256d c0 = _mm256_mul_pd(load4_part(row + k, n - k), sv);
    const __m256d c1 = _mm256_mul_pd(load4_part(row + k + 4, n - k - 4), sv);
    if constexpr (check) bad = _mm256_or_pd(bad, _mm256_or_pd(rejected(c0), rejected(c1)));
    a.push(_mm256_blendv_pd(inf, has_v ? _mm256_sub_pd(c0, _mm256_loadu_pd(v + k)) : c0, lanes_below(n - k)), k0);
    b.push(_mm256_blendv_pd(inf, has_v ? _mm256_sub_pd(c1, _mm256_loadu_pd(v + k + 4)) : c1, lanes_below(n - k - 4)), k1);
    k0 = _mm256_add_pd(k0, step);
    k1 = _mm256_add_pd(k1, step);
  }
  const __m256d vals[6] = {a.m1, a.m2, a.m3, b.m1, b.m2, b.m3};
  const __m256d idxs[6] = {a.i1, a.i2, a.i3, b.i1, b.i2, b.i3};
  alignas(32) double pos[24];
  for (int q = 0; q < 6; ++q) {
    _mm256_storeu_pd(out->r + 4 * q, vals[q]);
    _mm256_store_pd(pos + 4 * q, idxs[q]);
  }
  // Every column outside a lane's top three is at least that lane's third best.
  alignas(32) double lb[4];
  _mm256_store_pd(lb, _mm256_min_pd(a.m3, b.m3));
  double bound = lb[0];
  for (int l = 1; l < 4; ++l) bound = lb[l] < bound ? lb[l] : bound;
  out->bound = bound;
  for (int l = 0; l < kLaCands; ++l) {
    const int32_t j = static_cast<int32_t>(pos[l]);
    out->j[l] = j;
    out->c[l] = j >= 0 ? sign * static_cast<double>(row[j]) : kInf;  // the row is still in cache
  }
  return _mm256_movemask_pd(bad) != 0;
}

template <typename T>
bool col_min_impl(const T* row, int64_t n, double sign, int32_t r, double* colmin, int32_t* argrow) {
  const __m256d sv = _mm256_set1_pd(sign);
  const __m128i rv = _mm_set1_epi32(r);
  __m256d bad = _mm256_setzero_pd();
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    const __m256d x = _mm256_mul_pd(load4(row + k), sv);
    const __m256d cur = _mm256_load_pd(colmin + k);
    // Row r rarely sets a new column minimum once r is large. "Not >=" also catches NaN, and -inf
    // is always a new minimum, so the NaN/-inf screen runs only on this rare path.
    if (!_mm256_movemask_pd(_mm256_cmp_pd(x, cur, _CMP_NGE_UQ))) continue;
    bad = _mm256_or_pd(bad, rejected(x));
    const __m256d lt = _mm256_cmp_pd(x, cur, _CMP_LT_OQ);
    _mm256_store_pd(colmin + k, _mm256_blendv_pd(cur, x, lt));
    __m128i* a = reinterpret_cast<__m128i*>(argrow + k);
    _mm_store_si128(a, _mm_blendv_epi8(_mm_load_si128(a), rv, narrow_mask(lt)));
  }
  bool any = _mm256_movemask_pd(bad) != 0;
  for (; k < n; ++k) {
    const double x = sign * static_cast<double>(row[k]);
    any |= !(x > -kInf);
    if (x < colmin[k]) {
      colmin[k] = x;
      argrow[k] = r;
    }
  }
  return any;
}

inline __m256d gather_strided(const double* s, __m256i off) {
  return _mm256_mask_i64gather_pd(_mm256_setzero_pd(), s, off, _mm256_castsi256_pd(_mm256_set1_epi64x(-1)), 8);
}
inline __m128 gather_strided(const float* s, __m256i off) {
  return _mm256_mask_i64gather_ps(_mm_setzero_ps(), s, off, _mm_castsi128_ps(_mm_set1_epi32(-1)), 4);
}
inline __m256d widen(__m256d x) { return x; }
inline __m256d widen(__m128 x) { return _mm256_cvtps_pd(x); }
inline void store4(double* d, __m256d x) { _mm256_storeu_pd(d, x); }
inline void store4(float* d, __m128 x) { _mm_storeu_ps(d, x); }

template <typename T>
bool copy_row_impl(const T* s, int64_t b, T* d, int64_t n, double sign) {
  const __m256d sv = _mm256_set1_pd(sign);
  __m256d bad = _mm256_setzero_pd();
  int64_t k = 0;
  if (b == 1) {
    for (; k + 4 <= n; k += 4) {
      const __m256d x = load4(s + k);
      bad = _mm256_or_pd(bad, rejected(_mm256_mul_pd(x, sv)));
      if constexpr (sizeof(T) == 8)
        _mm256_storeu_pd(reinterpret_cast<double*>(d + k), x);
      else
        _mm_storeu_ps(reinterpret_cast<float*>(d + k), _mm256_cvtpd_ps(x));  // exact: x came from float
    }
  } else {
    __m256i off = _mm256_setr_epi64x(0, b, 2 * b, 3 * b);
    const __m256i step = _mm256_set1_epi64x(4 * b);
    for (; k + 4 <= n; k += 4) {
      const auto x = gather_strided(s, off);
      bad = _mm256_or_pd(bad, rejected(_mm256_mul_pd(widen(x), sv)));
      store4(d + k, x);
      off = _mm256_add_epi64(off, step);
    }
  }
  bool any = _mm256_movemask_pd(bad) != 0;
  for (; k < n; ++k) {
    d[k] = s[k * b];
    any |= !(sign * static_cast<double>(d[k]) > -kInf);
  }
  return any;
}

}  // namespace

#define HM_LA_DEFINE(T)                                                                                        \
  void scan_avx2(const T* row, int64_t n_row, double sign, const int32_t* idx, const double* vv, double* dd,    \
                 int32_t* pp, const double* fp, int64_t m, double h, int32_t i, ScanMin* out) {                \
    scan_impl(row, n_row, sign, idx, vv, dd, pp, fp, m, h, i, out);                                            \
  }                                                                                                            \
  bool cands_avx2(const T* row, int64_t n, double sign, const double* v, bool check, Cands* out) {             \
    if (!v) return check ? cands_impl<true, false>(row, n, sign, v, out) : cands_impl<false, false>(row, n, sign, v, out); \
    return check ? cands_impl<true, true>(row, n, sign, v, out) : cands_impl<false, true>(row, n, sign, v, out); \
  }                                                                                                            \
  bool col_min_avx2(const T* row, int64_t n, double sign, int32_t r, double* colmin, int32_t* argrow) {       \
    return col_min_impl(row, n, sign, r, colmin, argrow);                                                      \
  }                                                                                                            \
  bool copy_row_avx2(const T* s, int64_t b, T* d, int64_t n, double sign) { return copy_row_impl(s, b, d, n, sign); }

HM_LA_DEFINE(float)
HM_LA_DEFINE(double)
#undef HM_LA_DEFINE

}  // namespace hm::la
#endif
