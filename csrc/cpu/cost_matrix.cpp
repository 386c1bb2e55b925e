// cost_matrix on the CPU: a BLIS-style blocked GEMM of our own whose packing routines do the mapped
// gather, so padded slots cost nothing and no gathered operand is ever materialized.
//
//   C[i, j] = sum_p A_cat[i, p] * B_cat[j, p],  p over the terms' compacted, concatenated inner axes
//
// Loop nest (Goto / BLIS): jc over NC-column blocks of C; then slabs of a few KC-blocks of the inner
// axis (all threads pack the slab of B together); then MC-row blocks of C in parallel, each task
// walking the slab's KC-blocks: pack its MC x KC block of A into thread-local memory, run the MR x NR
// microkernel over it and every B micro-panel of the slab.
//
// Accuracy: float32 inputs accumulate in float32 like BLAS sgemm (every product is an FMA, sums in
// KC-long chains); the error grows like K * eps * sum|A_ip B_jp|, the same order as torch.mm's.
// float64 accumulates in float64. float16 / bfloat16 inputs are upcast to float32 while packing the
// panels (each element once per pack, no upcast copy of the operands) and then run the float32 path.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "common/parallel.h"
#include "cpu/cpu_ops.h"
#include "kernels/cost_matrix.h"

namespace hm::cpu {

// Microkernel contract: C[0:mr, 0:nr] (row stride ldc) = (accumulate ? C : 0) + sum_{p < kc} ap[p*MR + i] * bp[p*NR + j].
// ap: one packed A micro-panel [kc, MR]; bp: one packed B micro-panel [kc, NR]; both 32-byte aligned and
// zero-padded past mr / nr rows. Defined in cost_matrix_avx2.cpp (MR x NR = 6 x 16 float32, 6 x 8 float64).
#if HETMERGE_X86_SIMD
namespace detail {
void cost_ukernel_f32_avx2(int64_t kc, const float* ap, const float* bp, float* c, int64_t ldc, int mr, int nr,
                           bool accumulate);
void cost_ukernel_f64_avx2(int64_t kc, const double* ap, const double* bp, double* c, int64_t ldc, int mr, int nr,
                           bool accumulate);
}  // namespace detail
#endif

namespace {

template <typename T>
using Ukernel = void (*)(int64_t, const T*, const T*, T*, int64_t, int, int, bool);

// Portable microkernel: MR x NR accumulators small enough for 16 SSE registers.
template <typename T, int MR, int NR>
void ukernel_generic(int64_t kc, const T* __restrict ap, const T* __restrict bp, T* __restrict c, int64_t ldc, int mr,
                     int nr, bool accumulate) {
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < kc; ++p, ap += MR, bp += NR)
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] += ap[i] * bp[j];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// A 64-byte aligned scratch buffer that only grows.
template <typename T>
class Scratch {
 public:
  T* get(size_t n) {
    if (n > size_) {
      const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
      ptr_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      if (!ptr_) throw std::bad_alloc();
      size_ = n;
    }
    return ptr_.get();
  }

 private:
  std::unique_ptr<T, FreeDeleter> ptr_;
  size_t size_ = 0;
};

// One side (A or B) of every term, seen through the concatenated compacted inner axis.
// S: the storage type (float, double, half_t, bfloat16_t).
template <typename S>
struct Side {
  std::vector<const S*> data;        // [n_terms]
  std::vector<int64_t> row_stride;   // [n_terms], elements
  std::vector<int64_t> off;          // [K]: element offset of inner position p within its term's row
};

template <typename S>
struct Problem {
  Side<S> a, b;
  std::vector<int64_t> term_start;  // [n_terms + 1] prefix sums of compacted inner lengths
  int n_terms = 0;
  int64_t k() const { return term_start.back(); }
};

template <typename S>
Problem<S> build_problem(const std::vector<CostTerm>& terms) {
  Problem<S> pb;
  pb.n_terms = static_cast<int>(terms.size());
  pb.term_start.assign(1, 0);
  std::vector<int64_t> valid;
  for (const CostTerm& t : terms) {
    const int64_t k = t.a.shape[1] / t.block;
    const int64_t* map = t.has_map ? t.map.ptr<const int64_t>() : nullptr;
    const int64_t ms = t.has_map ? t.map.strides[0] : 0;
    valid.clear();
    if (map)
      for (int64_t q = 0; q < k; ++q)
        if (cost_slot_valid(map, ms, q)) valid.push_back(q);
    const int64_t n_valid = map ? static_cast<int64_t>(valid.size()) : k;
    const int64_t len = n_valid * t.block;
    for (int64_t p = 0; p < len; ++p) {
      int64_t a_col, b_col;
      cost_inner_cols(map ? valid.data() : nullptr, map, ms, t.block, p, &a_col, &b_col);
      pb.a.off.push_back(a_col * t.a.strides[1]);
      pb.b.off.push_back(b_col * t.b.strides[1]);
    }
    pb.term_start.push_back(pb.term_start.back() + len);
    pb.a.data.push_back(t.a.ptr<const S>());
    pb.a.row_stride.push_back(t.a.strides[0]);
    pb.b.data.push_back(t.b.ptr<const S>());
    pb.b.row_stride.push_back(t.b.strides[0]);
  }
  return pb;
}

template <typename T, int R>
void zero_rows(T* d, int rows, int64_t n) {
  for (int r = rows; r < R; ++r)
    for (int64_t i = 0; i < n; ++i) d[i * R + r] = T(0);
}

// Packs micro-panels [q0, q1) of R rows each (rows beyond n_rows are zero) over inner positions
// [p0, p0 + kc): panel q goes to dst + (q - q0) * R * kc, dst[(p - p0) * R + r] = row q*R + r at p.
// The gather through `off` is where the index map acts; the upcast from S to T happens here too.
template <typename S, typename T, int R>
void pack_panels(const Side<S>& s, const int64_t* term_start, int n_terms, int64_t n_rows, int64_t q0, int64_t q1,
                 int64_t p0, int64_t kc, T* __restrict dst) {
  const int64_t p_end = p0 + kc, panel = R * kc;
  int t = cost_term_of(term_start, n_terms, p0);
  for (int64_t p = p0; p < p_end; ++t) {
    const int64_t run_end = std::min(p_end, term_start[t + 1]);
    if (run_end <= p) continue;  // a term with no valid slot
    const int64_t n = run_end - p, rs = s.row_stride[t];
    const int64_t* off = s.off.data() + p;
    T* d0 = dst + (p - p0) * R;
    if (rs == 1) {
      // Rows adjacent in memory (a transposed view, e.g. W_{l+1}.T): per position, one contiguous run
      // over all the panels' rows. Per panel instead, power-of-two row pitches would map every
      // position's line to one L1 set and the lines would be refetched for each panel.
      const int64_t full = std::min(q1, n_rows / R);
      for (int64_t i = 0; i < n; ++i) {
        const S* src = s.data[t] + off[i];
        for (int64_t q = q0; q < full; ++q)
          for (int r = 0; r < R; ++r) d0[(q - q0) * panel + i * R + r] = load_as_acc(src + q * R + r);
        for (int64_t q = std::max(full, q0); q < q1; ++q)
          for (int r = 0; r < R; ++r)
            d0[(q - q0) * panel + i * R + r] = q * R + r < n_rows ? load_as_acc(src + q * R + r) : T(0);
      }
    } else if (std::is_sorted(off, off + n)) {
      // Row-major rows, ascending positions (A's side: identity map, or padded slots skipped): 8
      // positions of every row at a time, so each row's cache lines are used while they are hot.
      for (int64_t q = q0; q < q1; ++q) {
        const int rows = static_cast<int>(std::min<int64_t>(R, n_rows - q * R));
        const S* base = s.data[t] + q * R * rs;
        T* d = d0 + (q - q0) * panel;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
          for (int r = 0; r < rows; ++r) {
            const S* src = base + r * rs;
            for (int u = 0; u < 8; ++u) d[(i + u) * R + r] = load_as_acc(src + off[i + u]);
          }
        for (; i < n; ++i)
          for (int r = 0; r < rows; ++r) d[i * R + r] = load_as_acc(base + r * rs + off[i]);
        zero_rows<T, R>(d, rows, n);
      }
    } else {
      // Row-major rows, gathered positions (the mapped side): random lines of each row, mostly cache
      // misses. Prefetch the next row's lines while gathering this one, to keep many misses in flight.
      for (int64_t q = q0; q < q1; ++q) {
        const int rows = static_cast<int>(std::min<int64_t>(R, n_rows - q * R));
        const S* base = s.data[t] + q * R * rs;
        T* d = d0 + (q - q0) * panel;
        for (int r = 0; r < rows; ++r) {
          const S* src = base + r * rs;
          const S* next = r + 1 < rows ? src + rs : src;
          for (int64_t i = 0; i < n; ++i) {
            __builtin_prefetch(next + off[i]);
            d[i * R + r] = load_as_acc(src + off[i]);
          }
        }
        zero_rows<T, R>(d, rows, n);
      }
    }
    p = run_end;
  }
}

struct Blocking {
  int64_t kc, mc, nc;
  int64_t kg;  // K-blocks packed into the B slab at once
};

// Splits [0, n_panels) into `parts` nearly equal ranges; part b is [split(b), split(b + 1)).
inline int64_t split(int64_t n_panels, int64_t parts, int64_t b) { return n_panels * b / parts; }

template <typename S, typename T, int MR, int NR>
void cost_gemm(const Problem<S>& pb, int64_t n_a, int64_t n_b, T* c, Ukernel<T> ukernel, Blocking blk) {
  const int64_t K = pb.k();
  const int threads = get_num_threads();
  const int64_t a_panels = (n_a + MR - 1) / MR, b_panels = (n_b + NR - 1) / NR;

  // Equal K-blocks (no short last block) ...
  const int64_t n_kb = (K + blk.kc - 1) / blk.kc;
  const int64_t kc_max = (K + n_kb - 1) / n_kb;
  // ... equal column blocks of whole micro-panels ...
  const int64_t n_jb = (b_panels * NR + blk.nc - 1) / blk.nc;
  const int64_t nc_panels_max = (b_panels + n_jb - 1) / n_jb;
  // ... and row blocks in a multiple of the thread count, so that no thread idles through a last wave.
  int64_t n_ib = (a_panels * MR + blk.mc - 1) / blk.mc;
  n_ib = std::min(a_panels, (n_ib + threads - 1) / threads * threads);
  const int64_t mc_panels_max = (a_panels + n_ib - 1) / n_ib;
  // Few row blocks (small n_a): also split the columns; each split repacks its (small) A block.
  const int64_t n_js = n_ib >= threads ? 1 : std::min(nc_panels_max, (2 * int64_t(threads) + n_ib - 1) / n_ib);

  // B is packed kg K-blocks at a time: a mapped row-major B is gathered from random cache lines of its
  // rows, and every pass over a row brings in nearly all its lines; packing kg blocks per pass divides
  // that traffic by kg. Panel jp of the slab holds the kg blocks one after another, each [kc, NR].
  const int64_t n_kg = (n_kb + blk.kg - 1) / blk.kg;
  const int64_t slab_k_max = split(K, n_kb, std::min(blk.kg, n_kb)) + 1;  // block sizes differ by <= 1
  // Kept across calls (per calling thread): a fresh multi-MiB buffer costs a page fault and a page clear
  // per 4 KiB on every call, several percent of a 1024-wide cost matrix.
  thread_local Scratch<T> b_scratch;
  T* bp = b_scratch.get(static_cast<size_t>(nc_panels_max) * NR * slab_k_max);

  for (int64_t jb = 0; jb < n_jb; ++jb) {
    const int64_t jp0 = split(b_panels, n_jb, jb), jp1 = split(b_panels, n_jb, jb + 1);
    for (int64_t g = 0; g < n_kg; ++g) {
      const int64_t kb0 = g * blk.kg, kb1 = std::min(n_kb, kb0 + blk.kg);
      const int64_t s0 = split(K, n_kb, kb0), slab_k = split(K, n_kb, kb1) - s0;
      parallel_for(jp1 - jp0, 8, [&](int64_t b0, int64_t b1) {
        pack_panels<S, T, NR>(pb.b, pb.term_start.data(), pb.n_terms, n_b, jp0 + b0, jp0 + b1, s0, slab_k,
                           bp + b0 * NR * slab_k);
      });
      // One task = one row block (or part of one) through every K-block of the slab: the threads meet
      // once per slab, not once per K-block.
      parallel_for(n_ib * n_js, 1, [&](int64_t t0, int64_t t1) {
        thread_local Scratch<T> a_scratch;
        T* ap = a_scratch.get(static_cast<size_t>(mc_panels_max) * MR * kc_max);
        for (int64_t task = t0; task < t1; ++task) {
          const int64_t ib = task / n_js, js = task % n_js;
          const int64_t ip0 = split(a_panels, n_ib, ib), ip1 = split(a_panels, n_ib, ib + 1);
          const int64_t jq0 = jp0 + split(jp1 - jp0, n_js, js), jq1 = jp0 + split(jp1 - jp0, n_js, js + 1);
          for (int64_t kb = kb0; kb < kb1; ++kb) {
            const int64_t p0 = split(K, n_kb, kb), kc = split(K, n_kb, kb + 1) - p0;
            const T* bk = bp + (p0 - s0) * NR;  // this block's [kc, NR] part of every slab panel
            pack_panels<S, T, MR>(pb.a, pb.term_start.data(), pb.n_terms, n_a, ip0, ip1, p0, kc, ap);
            // B micro-panel outer, A inner: the kc x NR B panel stays in L1 while A panels stream from L2.
            for (int64_t jp = jq0; jp < jq1; ++jp) {
              const int nr = static_cast<int>(std::min<int64_t>(NR, n_b - jp * NR));
              for (int64_t ip = ip0; ip < ip1; ++ip) {
                const int mr = static_cast<int>(std::min<int64_t>(MR, n_a - ip * MR));
                ukernel(kc, ap + (ip - ip0) * MR * kc, bk + (jp - jp0) * NR * slab_k, c + ip * MR * n_b + jp * NR,
                        n_b, mr, nr, kb > 0);
              }
            }
          }
        }
      });
    }
  }
}

#if HETMERGE_X86_SIMD
bool use_avx2() {
  // HETMERGE_NO_AVX2 (any value) forces the portable path, so that tests can cover it on AVX2 machines.
  static const bool cpu_ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu_ok && std::getenv("HETMERGE_NO_AVX2") == nullptr;
}
#endif  // without HETMERGE_X86_SIMD (aarch64, ...) only the portable microkernels exist

// Zen3 (per core: 32 KiB L1d, 512 KiB L2; L3 shared): the KC x NR B micro-panel (16 KiB) stays in L1
// and the MC x KC A block (~150 KiB) in L2. The B slab (4 K-blocks x NC rows, 16 MiB) needs no cache:
// each micro-panel is fetched once per row block, then serves MC / MR microkernel calls from L1.
// NC = 4096 splits the widths that matter (powers of two up to 8192) evenly. float64 keeps the byte
// footprints at half the element counts. S: storage of the inputs (float32, float16 or bfloat16
// all compute in float32).
template <typename S>
void run(const Problem<S>& pb, int64_t n_a, int64_t n_b, float* c) {
#if HETMERGE_X86_SIMD
  if (use_avx2()) {
    cost_gemm<S, float, 6, 16>(pb, n_a, n_b, c, detail::cost_ukernel_f32_avx2, {256, 144, 4096, 4});
    return;
  }
#endif
  cost_gemm<S, float, 4, 8>(pb, n_a, n_b, c, ukernel_generic<float, 4, 8>, {256, 128, 4096, 4});
}
void run(const Problem<double>& pb, int64_t n_a, int64_t n_b, double* c) {
#if HETMERGE_X86_SIMD
  if (use_avx2()) {
    cost_gemm<double, double, 6, 8>(pb, n_a, n_b, c, detail::cost_ukernel_f64_avx2, {256, 72, 2048, 4});
    return;
  }
#endif
  cost_gemm<double, double, 4, 4>(pb, n_a, n_b, c, ukernel_generic<double, 4, 4>, {256, 64, 2048, 4});
}

template <typename S, typename T>
void cost_matrix_typed(const std::vector<CostTerm>& terms, int64_t n_a, int64_t n_b, T* c) {
  const Problem<S> pb = build_problem<S>(terms);
  // No term, or every inner slot padded: C = 0 (cost_gemm needs a non-empty inner axis).
  if (pb.k() == 0) {
    std::fill(c, c + n_a * n_b, T(0));
    return;
  }
  run(pb, n_a, n_b, c);
}

}  // namespace

void cost_matrix(const std::vector<CostTerm>& terms, const TensorView& out) {
  const int64_t n_a = out.shape[0], n_b = out.shape[1];
  if (n_a == 0 || n_b == 0) return;
  switch (terms[0].a.dtype) {
    case DType::f64: cost_matrix_typed<double>(terms, n_a, n_b, out.ptr<double>()); break;
    case DType::f16: cost_matrix_typed<half_t>(terms, n_a, n_b, out.ptr<float>()); break;
    case DType::bf16: cost_matrix_typed<bfloat16_t>(terms, n_a, n_b, out.ptr<float>()); break;
    default: cost_matrix_typed<float>(terms, n_a, n_b, out.ptr<float>()); break;
  }
}

}  // namespace hm::cpu
