// Exact linear assignment (scipy.optimize.linear_sum_assignment's contract), Jonker–Volgenant family.
//
// The solver works on rows <= cols (a tall problem is solved transposed) and reads the cost rows in
// place when they are contiguous in memory (a C-ordered wide or an F-ordered tall matrix), else from
// a contiguous copy; float32 stays float32. Costs are multiplied by -1 on the fly for maximize and
// all arithmetic is double. Then:
//   square:      LAPJV column reduction; when rows stay free, reduction transfer and two passes of
//                augmenting row reduction;
//   rectangular: augmenting row reduction from v = 0. It only ever lowers v on columns it assigns,
//                so v <= 0 with v = 0 on free columns: the dual conditions of the rectangular
//                problem hold throughout and no padding with sentinel costs is needed;
//   both:        a shortest augmenting path (Dijkstra on reduced costs) from every remaining free row.
// Row duals are implicit (u[i] = c[i][x[i]] - v[x[i]]), as in LAPJV. +inf marks a forbidden pair.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <new>
#include <vector>

#include "common/errors.h"
#include "common/parallel.h"
#include "cpu/cpu_ops.h"
#include "cpu/linear_assignment_kernels.h"

namespace hm::la {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

template <typename T>
void scan_impl(const T* row, int64_t n_row, double sign, const int32_t* idx, const double* vv, double* dd,
               int32_t* pp, const double* fp, int64_t m, double h, int32_t i, ScanMin* out) {
  double low = kInf;
  int64_t pos = -1, pos_free = -1;
  for (int64_t k = 0; k < m; ++k) {
    const int64_t col = idx ? idx[k] : k;
    const double c = col < n_row ? sign * static_cast<double>(row[col]) : 0.0;  // padding: vv = -inf
    const double cand = c - (vv[k] + h);
    double d = dd[k];
    if (cand < d) {
      d = cand;
      dd[k] = cand;
      pp[k] = i;
    }
    if (d < low) {
      low = d;
      pos = k;
      pos_free = fp[k] == 0.0 ? k : -1;
    } else if (d == low && pos_free < 0 && d < kInf && fp[k] == 0.0) {
      pos_free = k;
    }
  }
  *out = ScanMin{low, pos, pos_free};
}

// The portable shortlist: the two smallest reduced costs, bounded by the third.
template <typename T>
bool cands_impl(const T* row, int64_t n, double sign, const double* v, bool check, Cands* out) {
  double b1 = kInf, b2 = kInf, b3 = kInf;
  int64_t p1 = -1, p2 = -1;
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) {
    const double c = sign * static_cast<double>(row[j]);
    bad |= !(c > -kInf);
    const double r = v ? c - v[j] : c;
    if (r < b1) {
      b3 = b2;
      b2 = b1;
      p2 = p1;
      b1 = r;
      p1 = j;
    } else if (r < b2) {
      b3 = b2;
      b2 = r;
      p2 = j;
    } else if (r < b3) {
      b3 = r;
    }
  }
  for (int l = 0; l < kLaCands; ++l) {
    out->j[l] = -1;
    out->r[l] = out->c[l] = kInf;
  }
  const int64_t p[2] = {p1, p2};
  const double b[2] = {b1, b2};
  for (int l = 0; l < 2; ++l) {
    if (p[l] < 0) continue;
    out->j[l] = static_cast<int32_t>(p[l]);
    out->r[l] = b[l];
    out->c[l] = sign * static_cast<double>(row[p[l]]);
  }
  out->bound = b3;
  return check && bad;
}

template <typename T>
bool col_min_impl(const T* row, int64_t n, double sign, int32_t r, double* colmin, int32_t* argrow) {
  bool bad = false;
  for (int64_t j = 0; j < n; ++j) {
    const double c = sign * static_cast<double>(row[j]);
    bad |= !(c > -kInf);
    if (c < colmin[j]) {
      colmin[j] = c;
      argrow[j] = r;
    }
  }
  return bad;
}

template <typename T>
bool copy_row_impl(const T* s, int64_t b, T* d, int64_t n, double sign) {
  bool bad = false;
  for (int64_t k = 0; k < n; ++k) {
    d[k] = s[k * b];
    bad |= !(sign * static_cast<double>(d[k]) > -kInf);
  }
  return bad;
}

}  // namespace

#define HM_LA_DEFINE(T)                                                                                        \
  void scan_portable(const T* row, int64_t n_row, double sign, const int32_t* idx, const double* vv,          \
                     double* dd, int32_t* pp, const double* fp, int64_t m, double h, int32_t i, ScanMin* out) { \
    scan_impl(row, n_row, sign, idx, vv, dd, pp, fp, m, h, i, out);                                            \
  }                                                                                                            \
  bool cands_portable(const T* row, int64_t n, double sign, const double* v, bool check, Cands* out) {         \
    return cands_impl(row, n, sign, v, check, out);                                                            \
  }                                                                                                            \
  bool col_min_portable(const T* row, int64_t n, double sign, int32_t r, double* colmin, int32_t* argrow) {   \
    return col_min_impl(row, n, sign, r, colmin, argrow);                                                      \
  }                                                                                                            \
  bool copy_row_portable(const T* s, int64_t b, T* d, int64_t n, double sign) {                               \
    return copy_row_impl(s, b, d, n, sign);                                                                    \
  }

HM_LA_DEFINE(float)
HM_LA_DEFINE(double)
#undef HM_LA_DEFINE

}  // namespace hm::la

namespace hm::cpu {
namespace {

using la::kLaPad;
using la::ScanMin;
using la::Cands;

// Smallest and second smallest reduced cost of a row (j2 != j1; u2 may equal u1; -1 = none),
// smallest first by (value, column), as a sequential scan with strict comparisons finds them.
struct TwoMin {
  double u1 = std::numeric_limits<double>::infinity(), u2 = std::numeric_limits<double>::infinity();
  int64_t j1 = -1, j2 = -1;
  void push(double r, int64_t j) {
    if (r < u1 || (r == u1 && j < j1)) {
      u2 = u1;
      j2 = j1;
      u1 = r;
      j1 = j;
    } else if (r < u2 || (r == u2 && j < j2)) {
      u2 = r;
      j2 = j;
    }
  }
};
constexpr double kInf = std::numeric_limits<double>::infinity();

// Compact the Dijkstra work arrays once the live positions drop below this fraction of the list:
// gathered loads over the survivors then beat contiguous loads over mostly finished columns.
constexpr double kCompactFraction = 0.4;

[[noreturn]] void infeasible() { value_error("linear_assignment: cost matrix is infeasible"); }

template <typename T>
struct Kernels {
  void (*scan)(const T*, int64_t, double, const int32_t*, const double*, double*, int32_t*, const double*, int64_t,
               double, int32_t, ScanMin*);
  bool (*cands)(const T*, int64_t, double, const double*, bool, la::Cands*);
  bool (*col_min)(const T*, int64_t, double, int32_t, double*, int32_t*);
  bool (*copy_row)(const T*, int64_t, T*, int64_t, double);
};

// HETMERGE_NO_AVX2=1 forces the portable loops (read per call, so tests can cover both paths).
bool use_avx2() {
#if defined(HM_LA_HAVE_AVX2_KERNELS)
  static const bool cpu_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const char* off = std::getenv("HETMERGE_NO_AVX2");
  return cpu_ok && !(off && off[0] && off[0] != '0');
#else
  return false;
#endif
}

template <typename T>
Kernels<T> pick_kernels(bool avx2) {
#if defined(HM_LA_HAVE_AVX2_KERNELS)
  if (avx2) {
    return {static_cast<decltype(Kernels<T>::scan)>(la::scan_avx2),
            static_cast<decltype(Kernels<T>::cands)>(la::cands_avx2),
            static_cast<decltype(Kernels<T>::col_min)>(la::col_min_avx2),
            static_cast<decltype(Kernels<T>::copy_row)>(la::copy_row_avx2)};
  }
#endif
  return {static_cast<decltype(Kernels<T>::scan)>(la::scan_portable),
          static_cast<decltype(Kernels<T>::cands)>(la::cands_portable),
          static_cast<decltype(Kernels<T>::col_min)>(la::col_min_portable),
          static_cast<decltype(Kernels<T>::copy_row)>(la::copy_row_portable)};
}

// 64-byte aligned array (the kernels use aligned loads on the per-column work arrays).
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t n) { reset(n); }
  ~Buffer() { std::free(p_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void reset(int64_t n) {
    std::free(p_);
    const size_t bytes = (static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T) + 63) / 64 * 64;
    p_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p_) throw std::bad_alloc();
  }
  T* get() const { return p_; }
  T& operator[](int64_t k) const { return p_[k]; }

 private:
  T* p_ = nullptr;
};

// Splits [0, n) into `parts` near-equal ranges and runs fn(part, begin, end) on the pool.
template <typename Fn>
void for_parts(int64_t n, int64_t parts, const Fn& fn) {
  parallel_for(parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(p, n * p / parts, n * (p + 1) / parts);
  });
}

// Parts for a pass over rows x cols elements: one below ~1M elements (well under a millisecond, not
// worth waking the pool), else a few per thread: chunks are handed out dynamically, so a thread
// slowed by other load on the machine does not hold up the pass.
int64_t parts_for(int64_t rows, int64_t cols) {
  if (rows * cols < (int64_t{1} << 20)) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(4 * get_num_threads(), rows / 16));
}

// The cost matrix as the solver sees it: nr <= nc rows of nc contiguous elements, row i at
// base + i * rs, value sign * base[...].
template <typename T>
struct CostRows {
  const T* base;
  int64_t rs, nr, nc;
  double sign;
  const T* row(int64_t i) const { return base + i * rs; }
  double at(int64_t i, int64_t j) const { return sign * static_cast<double>(base[i * rs + j]); }
};

// Called when a pass flagged NaN or -inf: finds out which, NaN first (the error a user most needs).
template <typename T>
[[noreturn]] void reject(const CostRows<T>& c, bool maximize) {
  for (int64_t i = 0; i < c.nr; ++i)
    for (int64_t j = 0; j < c.nc; ++j)
      if (std::isnan(c.at(i, j)))
        value_error("linear_assignment: cost matrix contains invalid numeric entries (cost contains NaN)");
  // "contains invalid numeric entries" is scipy's wording, which callers of its contract match on.
  value_error("linear_assignment: cost matrix contains invalid numeric entries (cost contains ",
              maximize ? "+inf" : "-inf", "; forbidden pairs are ", maximize ? "-inf when maximize=True" : "+inf",
              ")");
}

template <typename T>
class Solver {
 public:
  // `checked`: the values were already screened for NaN and -inf (by the copy).
  Solver(const CostRows<T>& c, bool checked, bool maximize, const Kernels<T>& k)
      : c_(c), checked_(checked), maximize_(maximize), k_(k), nr_(c.nr), nc_(c.nc),
        stride_((c.nc + kLaPad - 1) / kLaPad * kLaPad), x_(nr_, -1), y_(stride_, -1), v_(stride_) {
    for (int64_t j = 0; j < stride_; ++j) v_[j] = 0.0;
  }

  void solve() {
    std::vector<int32_t> free_rows;
    if (nr_ == nc_) {
      column_reduction(free_rows);
      if (free_rows.empty()) return;  // every row sits on a column minimum: optimal with u = 0
      reduction_transfer();
    } else {
      row_minima();
      free_rows.resize(nr_);
      for (int64_t i = 0; i < nr_; ++i) free_rows[i] = static_cast<int32_t>(i);
    }
    augmenting_row_reduction(free_rows);
    shortest_augmenting_paths();
  }

  const std::vector<int32_t>& x() const { return x_; }
  const std::vector<int32_t>& y() const { return y_; }

 private:
  // LAPJV: v = column minima (in parallel over row ranges, then merged in order so that the first
  // minimal row wins, as in a sequential scan); a row that is the minimum of one or more columns
  // takes the one with the smallest minimum; rows that are no column's minimum stay free.
  void column_reduction(std::vector<int32_t>& free_rows) {
    const int64_t parts = parts_for(nr_, nc_);
    std::vector<Buffer<double>> mins(parts);
    std::vector<Buffer<int32_t>> args(parts);
    for (int64_t p = 0; p < parts; ++p) {
      mins[p].reset(stride_);
      args[p].reset(stride_);
    }
    std::atomic<bool> bad{false};
    for_parts(nr_, parts, [&](int64_t p, int64_t r0, int64_t r1) {
      double* mn = mins[p].get();
      int32_t* ar = args[p].get();
      for (int64_t j = 0; j < stride_; ++j) {
        mn[j] = kInf;
        ar[j] = -1;
      }
      bool b = false;
      for (int64_t i = r0; i < r1; ++i) b |= k_.col_min(c_.row(i), nc_, c_.sign, static_cast<int32_t>(i), mn, ar);
      if (b) bad.store(true, std::memory_order_relaxed);
    });
    if (bad.load() && !checked_) reject(c_, maximize_);
    Buffer<int32_t> argrow(stride_);
    for (int64_t j = 0; j < nc_; ++j) {
      v_[j] = mins[0][j];
      argrow[j] = args[0][j];
      for (int64_t p = 1; p < parts; ++p) {
        if (mins[p][j] < v_[j]) {
          v_[j] = mins[p][j];
          argrow[j] = args[p][j];
        }
      }
      if (!(v_[j] < kInf)) infeasible();  // a column with no allowed row
    }
    // Ties go to the diagonal: where row j is among column j's minimal rows, it is the one chosen.
    // Any minimal row is correct; this one makes tied costs (a constant matrix, scipy's #11602)
    // come back as the identity, as scipy returns them, and costs nothing (one read per column).
    for (int64_t j = 0; j < std::min(nr_, nc_); ++j)
      if (c_.sign * static_cast<double>(c_.row(j)[j]) == v_[j]) argrow[j] = static_cast<int32_t>(j);
    matches_.assign(nr_, 0);
    for (int64_t j = nc_ - 1; j >= 0; --j) {
      const int32_t i = argrow[j];
      if (++matches_[i] == 1) {
        x_[i] = static_cast<int32_t>(j);
        y_[j] = i;
      } else if (v_[j] < v_[x_[i]]) {
        y_[x_[i]] = -1;
        x_[i] = static_cast<int32_t>(j);
        y_[j] = i;
      }
    }
    for (int64_t i = 0; i < nr_; ++i)
      if (matches_[i] == 0) free_rows.push_back(static_cast<int32_t>(i));
  }

  // LAPJV: a row that is the minimum of exactly one column hands that column its slack (the smallest
  // reduced cost elsewhere in the row). The slacks are computed in parallel against the v of the
  // column reduction; v only decreases here, so the true slacks can only be larger and lowering by
  // these keeps every reduced cost >= 0. The same pass fills every row's shortlist.
  void reduction_transfer() {
    cache_.resize(nr_);
    std::vector<double> mu(nr_, 0.0);
    for_parts(nr_, parts_for(nr_, nc_), [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const TwoMin t = scan_row(i, false, nullptr);
        if (matches_[i] == 1) mu[i] = t.j1 == x_[i] ? t.u2 : t.u1;  // inf: x[i] is the only allowed column
      }
    });
    for (int64_t i = 0; i < nr_; ++i)
      if (matches_[i] == 1 && mu[i] < kInf) v_[x_[i]] -= mu[i];
  }

  // Rectangular start (v = 0): every row's shortlist, in parallel, with the NaN/-inf screen.
  void row_minima() {
    cache_.resize(nr_);
    std::atomic<bool> bad{false};
    for_parts(nr_, parts_for(nr_, nc_), [&](int64_t, int64_t r0, int64_t r1) {
      bool b = false;
      for (int64_t i = r0; i < r1; ++i) scan_row(i, !checked_, &b, /*v_zero=*/true);
      if (b) bad.store(true, std::memory_order_relaxed);
    });
    if (bad.load()) reject(c_, maximize_);
  }

  // A fresh scan of row i; refreshes the row's shortlist.
  TwoMin scan_row(int64_t i, bool check, bool* bad, bool v_zero = false) {
    Cands cd;
    const bool b = k_.cands(c_.row(i), nc_, c_.sign, v_zero ? nullptr : v_.get(), check, &cd);
    if (bad) *bad |= b;
    TwoMin t;
    Shortlist& e = cache_[i];
    for (int l = 0; l < la::kLaCands; ++l) {
      if (cd.j[l] >= 0) t.push(cd.r[l], cd.j[l]);
      e.c[l] = cd.c[l];
      e.j[l] = cd.j[l];
    }
    e.bound = cd.bound;
    return t;
  }

  // The two smallest reduced costs of row i from its shortlist when that provably still holds
  // them, else from a fresh scan. v only decreases from the shortlist's scan to the end of the row
  // reduction, so a column outside it still has reduced cost >= bound; candidates are recomputed
  // exactly from their stored costs, so the answer equals a fresh scan's.
  TwoMin row_two_min(int32_t i) {
    const Shortlist& e = cache_[i];
    TwoMin t;
    for (int l = 0; l < la::kLaCands; ++l)
      if (e.j[l] >= 0) t.push(e.c[l] - v_[e.j[l]], e.j[l]);
    if (t.u2 < e.bound) return t;
    --scans_left_;
    return scan_row(i, false, nullptr);
  }

  // LAPJV's augmenting row reduction, two passes. A free row takes its cheapest column j1 and
  // lowers v[j1] by the gap to its second cheapest, evicting j1's owner. Lowering by less than the
  // gap (0 when the gap is infinite) stays dual feasible; the work cap stops long price wars.
  void augmenting_row_reduction(std::vector<int32_t>& free_rows) {
    int64_t numfree = static_cast<int64_t>(free_rows.size());
    // Work caps, past which the remaining free rows go to shortest paths: full row scans, and
    // shortlist hits (each ~0.2 us; they bound price wars). On uniform costs the reduction then
    // places nearly every row, cheaper than the shortest paths would.
    scans_left_ = 8 * nr_ + 64;
    int64_t budget = 128 * nr_ + 64;
    for (int pass = 0; pass < 2 && numfree > 0; ++pass) {
      int64_t k = 0;
      const int64_t prv = numfree;
      numfree = 0;
      while (k < prv) {
        if (--budget < 0 || scans_left_ < 0) return;  // leftovers (x < 0) go to the augmenting paths
        const int32_t i = free_rows[k++];
        const TwoMin t = row_two_min(i);
        if (!(t.u1 < kInf)) infeasible();  // a row with no allowed column
        int64_t j1 = t.j1;
        int32_t i0 = y_[j1];
        const bool gap = t.u1 < t.u2 && t.u2 < kInf;
        if (gap) {
          v_[j1] -= t.u2 - t.u1;
        } else if (t.u1 == t.u2 && i0 >= 0) {  // tie: take the second column, which may be free
          j1 = t.j2;
          i0 = y_[j1];
        }
        if (i0 >= 0) x_[i0] = -1;
        x_[i] = static_cast<int32_t>(j1);
        y_[j1] = i;
        if (i0 >= 0) {
          if (gap)
            free_rows[--k] = i0;  // reprocess the evicted row at once, as LAPJV does
          else
            free_rows[numfree++] = i0;
        }
      }
    }
  }

  void shortest_augmenting_paths() {
    const int64_t cap = stride_;
    Buffer<int32_t> idx(cap), pp(cap), dcol(cap);
    Buffer<double> vv(cap), dd(cap), fp(cap), dval(cap);
    std::vector<int32_t> pred(stride_, -1);
    for (int64_t f = 0; f < nr_; ++f) {
      if (x_[f] >= 0) continue;
      // Work arrays by position; position k is column k until the first compaction.
      for (int64_t k = 0; k < stride_; ++k) {
        const bool real = k < nc_;
        vv[k] = real ? v_[k] : -kInf;
        dd[k] = kInf;
        pp[k] = static_cast<int32_t>(f);
        fp[k] = real && y_[k] < 0 ? 0.0 : kInf;
      }
      int64_t m = stride_, live = nc_, ndone = 0;
      bool dense = true;
      int32_t i = static_cast<int32_t>(f);
      double h = 0.0;
      int32_t sink = -1;
      double min_d = 0.0;
      for (;;) {
        ScanMin r;
        k_.scan(c_.row(i), nc_, c_.sign, dense ? nullptr : idx.get(), vv.get(), dd.get(), pp.get(), fp.get(), m, h,
                i, &r);
        if (!(r.low < kInf)) infeasible();  // no free column reachable at finite cost
        const int64_t pos = r.pos_free >= 0 ? r.pos_free : r.pos;
        const int32_t j = dense ? static_cast<int32_t>(pos) : idx[pos];
        const double dj = dd[pos];
        pred[j] = pp[pos];
        if (r.pos_free >= 0) {
          sink = j;
          min_d = dj;
          break;
        }
        vv[pos] = -kInf;  // finished: never updated, never the minimum again
        dd[pos] = kInf;
        dcol[ndone] = j;
        dval[ndone] = dj;
        ++ndone;
        --live;
        i = y_[j];
        h = c_.at(i, j) - v_[j] - dj;  // so that cand = dj + reduced cost from row i
        if (m > 4 * kLaPad && live < kCompactFraction * m) {
          int64_t w = 0;
          for (int64_t k = 0; k < m; ++k) {
            if (vv[k] == -kInf) continue;
            idx[w] = dense ? static_cast<int32_t>(k) : idx[k];
            vv[w] = vv[k];
            dd[w] = dd[k];
            pp[w] = pp[k];
            fp[w] = fp[k];
            ++w;
          }
          for (; w % kLaPad; ++w) {
            idx[w] = 0;
            vv[w] = -kInf;
            dd[w] = kInf;
            pp[w] = 0;
            fp[w] = kInf;
          }
          m = w;
          dense = false;
        }
      }
      // Dual update on the finished columns keeps every reduced cost >= 0 and the path tight.
      for (int64_t t = 0; t < ndone; ++t) v_[dcol[t]] += dval[t] - min_d;
      int32_t j = sink;
      for (;;) {
        const int32_t pi = pred[j];
        y_[j] = pi;
        const int32_t next = x_[pi];
        x_[pi] = j;
        if (pi == f) break;
        j = next;
      }
    }
  }

  CostRows<T> c_;
  bool checked_, maximize_;
  Kernels<T> k_;
  int64_t nr_, nc_, stride_;
  std::vector<int32_t> x_, y_;
  Buffer<double> v_;
  std::vector<int32_t> matches_;
  struct Shortlist {
    double c[la::kLaCands];
    int32_t j[la::kLaCands];
    double bound;
  };
  std::vector<Shortlist> cache_;
  int64_t scans_left_ = 0;
};

template <typename T>
void solve_typed(const TensorView& cost, bool maximize, int64_t* ri, int64_t* ci) {
  const int64_t n_rows = cost.shape[0], n_cols = cost.shape[1];
  // The stride of a size-1 dimension is arbitrary: normalize so the contiguity tests below hold.
  const int64_t s0 = n_rows == 1 ? 1 : cost.strides[0];
  const int64_t s1 = n_cols == 1 ? 1 : cost.strides[1];
  // Rows <= cols: every row gets a column, and the solver scans rows.
  const bool transposed = n_rows > n_cols;
  const int64_t nr = transposed ? n_cols : n_rows;
  const int64_t nc = transposed ? n_rows : n_cols;
  const int64_t a = transposed ? s1 : s0;  // step between the solver's rows
  const int64_t b = transposed ? s0 : s1;  // step along a row
  const bool avx2 = use_avx2();
  const Kernels<T> k = pick_kernels<T>(avx2);
  const double sign = maximize ? -1.0 : 1.0;
  const T* src = cost.ptr<const T>();

  Buffer<T> copy;
  CostRows<T> rows{src, a, nr, nc, sign};
  bool checked = false;
  if (b != 1) {
    // Rows not contiguous: copy, tile by tile so that a transposed read stays in cache.
    const int64_t rs = (nc + kLaPad - 1) / kLaPad * kLaPad;
    copy.reset(nr * rs);
    T* dst = copy.get();
    std::atomic<bool> bad{false};
    const int64_t tile = 64;
    const int64_t nblocks = (nr + tile - 1) / tile;
    for_parts(nblocks, parts_for(nr, nc), [&](int64_t, int64_t b0, int64_t b1) {
      bool any = false;
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t r0 = blk * tile, r1 = std::min(nr, r0 + tile);
        for (int64_t c0 = 0; c0 < nc; c0 += tile) {
          const int64_t c1 = std::min(nc, c0 + tile);
          for (int64_t r = r0; r < r1; ++r) any |= k.copy_row(src + r * a + c0 * b, b, dst + r * rs + c0, c1 - c0, sign);
        }
      }
      if (any) bad.store(true, std::memory_order_relaxed);
    });
    rows = CostRows<T>{dst, rs, nr, nc, sign};
    if (bad.load()) reject(rows, maximize);
    checked = true;
  }

  Solver<T> solver(rows, checked, maximize, k);
  solver.solve();

  if (!transposed) {
    for (int64_t i = 0; i < nr; ++i) {
      ri[i] = i;
      ci[i] = solver.x()[i];
    }
  } else {
    int64_t n = 0;
    for (int64_t j = 0; j < nc; ++j) {
      if (solver.y()[j] < 0) continue;
      ri[n] = j;
      ci[n] = solver.y()[j];
      ++n;
    }
  }
}

}  // namespace

void linear_assignment(const TensorView& cost, bool maximize, const TensorView& row_ind, const TensorView& col_ind) {
  const int64_t n_rows = cost.shape[0], n_cols = cost.shape[1];
  if (n_rows == 0 || n_cols == 0) return;
  if (std::max(n_rows, n_cols) > std::numeric_limits<int32_t>::max() - 2 * kLaPad)
    value_error("linear_assignment: cost has 2^31 or more rows or columns");
  int64_t* ri = row_ind.ptr<int64_t>();
  int64_t* ci = col_ind.ptr<int64_t>();
  if (cost.dtype == DType::f64)
    solve_typed<double>(cost, maximize, ri, ci);
  else if (cost.dtype == DType::f32)
    solve_typed<float>(cost, maximize, ri, ci);
  else
    type_error("linear_assignment: cost must be float32 or float64, got ", dtype_name(cost.dtype));
}

namespace {

// Matrix b of a batch: the view with its leading axis dropped.
TensorView batch_item(const TensorView& t, int64_t b) {
  TensorView v = t;
  v.ndim = t.ndim - 1;
  v.data = static_cast<char*>(t.data) + b * t.strides[0] * dtype_size(t.dtype);
  for (int d = 0; d < v.ndim; ++d) {
    v.shape[d] = t.shape[d + 1];
    v.strides[d] = t.strides[d + 1];
  }
  return v;
}

}  // namespace

void linear_assignment_batched(const TensorView& cost, bool maximize, const TensorView& row_ind,
                               const TensorView& col_ind) {
  // Many small matrices (the blocks of attention heads): one matrix per task across the pool; the
  // solver's own parallel parts run inline inside it.
  parallel_for(cost.shape[0], 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      linear_assignment(batch_item(cost, b), maximize, batch_item(row_ind, b), batch_item(col_ind, b));
  });
}

}  // namespace hm::cpu
