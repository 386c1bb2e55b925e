// CPU only (no __host__ __device__ body: the CUDA backend runs this solver on the host).
// Inner loops of the CPU linear assignment solver (csrc/cpu/linear_assignment.cpp), in a portable
// and an AVX2 flavour. Declarations only: the AVX2 file is compiled with -mavx2, so it must share no
// inline code with the portable file (the linker could keep the AVX2 copy of an inline function).
//
// Cost rows are read in place (contiguous, T = float or double, any alignment, no padding) and
// multiplied by `sign` (-1 for maximize; exact). Arithmetic is double. The per-column work arrays
// (v, vv, dd, pp, fp, idx) are 32-byte aligned and padded to a multiple of kLaPad positions.
#pragma once
#include <cstdint>

namespace hm::la {

constexpr int64_t kLaPad = 8;

// Where the smallest tentative distance of a Dijkstra step lies: its first position, and the
// first position of a free (unassigned) column with the same distance, -1 if none.
struct ScanMin {
  double low;
  int64_t pos;
  int64_t pos_free;
};

// A row scan's shortlist: columns j[l] (-1 = empty slot) with their costs c[l] = sign * row[j[l]]
// and reduced costs r[l] = c[l] - v[j[l]], containing the row's two smallest reduced costs; every
// other column has reduced cost >= bound.
constexpr int kLaCands = 24;
struct Cands {
  double r[kLaCands];
  double c[kLaCands];
  int32_t j[kLaCands];
  double bound;
};

// Signatures shared by the portable and AVX2 versions (T = float or double).
//
// scan: one Dijkstra step over positions k < m (m a multiple of kLaPad). The column of position k
//   is idx[k], or k itself when idx is null (then positions >= n_row are padding and row is read
//   only below n_row). With c = sign * row[col]:
//     cand = c - (vv[k] + h);  if cand < dd[k]: dd[k] = cand, pp[k] = i
//   then reports the minimum of dd. Finished and padding positions carry vv = -inf and dd = +inf,
//   so they never update or win. fp[k] is 0 for a free column, +inf otherwise.
// cands: the Cands of the reduced costs sign * row[j] - v[j] over columns j < n (v null: all 0). With check, also
//   reports whether some sign * row[j] is NaN or -inf (the return value; false without check).
// col_min: colmin[j] = min(colmin[j], sign * row[j]), argrow[j] = r where strictly smaller, j < n;
//   returns whether some sign * row[j] is NaN or -inf.
// copy_row: d[k] = s[k * b] for k < n (b in elements, any sign); returns whether some sign * d[k]
//   is NaN or -inf.
#define HM_LA_KERNELS(SUFFIX, T)                                                                          \
  void scan_##SUFFIX(const T* row, int64_t n_row, double sign, const int32_t* idx, const double* vv,    \
                     double* dd, int32_t* pp, const double* fp, int64_t m, double h, int32_t i,          \
                     ScanMin* out);                                                                      \
  bool cands_##SUFFIX(const T* row, int64_t n, double sign, const double* v, bool check, Cands* out);     \
  bool col_min_##SUFFIX(const T* row, int64_t n, double sign, int32_t r, double* colmin, int32_t* argrow); \
  bool copy_row_##SUFFIX(const T* s, int64_t b, T* d, int64_t n, double sign);

HM_LA_KERNELS(portable, float)
HM_LA_KERNELS(portable, double)
// HETMERGE_X86_SIMD: set by CMake when the *_avx2.cpp sources are compiled in (x86 only).
#if HETMERGE_X86_SIMD
#define HM_LA_HAVE_AVX2_KERNELS 1
HM_LA_KERNELS(avx2, float)
HM_LA_KERNELS(avx2, double)
#endif
#undef HM_LA_KERNELS

}  // namespace hm::la
