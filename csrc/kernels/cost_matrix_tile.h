// cost_matrix on the GPU, per tile: C[i, j] = sum_terms sum_{q: map[q] >= 0} sum_{r < block}
// A[i, q*block + r] * B[j, map[q]*block + r], computed as a tiled product whose operand loads apply
// the index map and the padding while staging tiles into shared memory (the gathered B and the
// padded columns are never materialized). Used by csrc/cuda/cost_matrix.cu and, under an emulated
// launch, by csrc/emulation/cost_matrix_emulated.cpp.
//
// Phases of one block (the kernels and the emulation run exactly this sequence):
//   load_tile(0) -> store_tile(buf 0) -> barrier
//   for s: [load_tile(s+1) into registers] -> compute(buf s%2) -> [store_tile(buf (s+1)%2)] -> barrier
//   epilogue
// Two shared buffers let tile s+1 be written while tile s is read, so one barrier per k-tile.
#pragma once
#include "kernels/common.h"
#include "kernels/launch.h"

namespace hm {

// ---- Terms and the inner-index mapping -----------------------------------------------------
// Storage of a term's A and B: the launch's T, or float16 / bfloat16 upcast to float while staging
// (a runtime switch, uniform across the block, instead of one kernel per storage type).
enum class CostStorage : int { native = 0, f16 = 1, bf16 = 2 };

struct CostTermDesc {
  const void* a;  // [n_a, k] of the storage type, strides (sa0, sa1) in elements
  const void* b;  // [n_b, k' * block], strides (sb0, sb1)
  CostStorage storage;
  int64_t sa0, sa1, sb0, sb1;
  const int64_t* map;  // [k / block] int64 (stride map_stride), -1 = padding; null = identity
  int64_t map_stride;
  int64_t block;       // >= 1
  int64_t k;           // A's inner length (a.shape[1])
  int64_t tile_begin;  // index of this term's first k-tile in the launch's tile sequence
  bool a_k_fast;       // A's inner axis has stride 1: threads walk it fastest when loading
  bool b_k_fast;       // same for B
};
constexpr int kMaxCostTermsPerLaunch = 16;  // more terms: further launches accumulate into C

template <typename T>  // T: float (float32/float16/bfloat16 inputs) or double; the output and accumulator type
struct CostParams {
  CostTermDesc terms[kMaxCostTermsPerLaunch];
  int n_terms;
  int64_t n_tiles;  // k-tiles of all terms together
  int64_t n_a, n_b;
  T* out;           // [n_a, n_b] contiguous
  bool accumulate;  // out += product (a later launch of a call with many terms)
};

// The column of B paired with column p of A, or -1 where p's group is padding.
HM_HD int64_t cost_b_column(const CostTermDesc& d, int64_t p) {
  if (!d.map) return p;
  int64_t q = p;
  if (d.block != 1) {
    // 32-bit division where it fits: 64-bit division is a long software sequence on the GPU.
    q = d.k <= 0x7fffffff ? static_cast<int64_t>(static_cast<uint32_t>(p) / static_cast<uint32_t>(d.block))
                          : p / d.block;
  }
  const int64_t m = d.map[q * d.map_stride];
  return m < 0 ? -1 : m * d.block + (p - q * d.block);
}

// ---- Operand precision ---------------------------------------------------------------------
// exact: the input dtype (fp32 FMA, or fp64); tf32/bf16/fp16: tensor cores, fp32 accumulation.
enum class CostPrecision : int { exact = 0, tf32 = 1, bf16 = 2, fp16 = 3 };

// Round to TF32 (10 mantissa bits), nearest with ties away from zero like cvt.rna.tf32.f32. Done
// while staging, so the tensor cores see exactly the values the emulation multiplies.
HM_HD float round_to_tf32(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf / nan unchanged
  u = (u + 0x1000u) & 0xffffe000u;
  return bits_to_float(u);
}

template <CostPrecision P, typename T> struct cost_operand { using type = T; };
template <> struct cost_operand<CostPrecision::tf32, float> { using type = float; };
template <> struct cost_operand<CostPrecision::bf16, float> { using type = bfloat16_t; };
template <> struct cost_operand<CostPrecision::fp16, float> { using type = half_t; };
template <CostPrecision P, typename T> using cost_operand_t = typename cost_operand<P, T>::type;

template <CostPrecision P> struct operand_convert {
  template <typename T> HM_HD static T apply(T x) { return x; }
};
template <> struct operand_convert<CostPrecision::tf32> {
  HM_HD static float apply(float x) { return round_to_tf32(x); }
};
template <> struct operand_convert<CostPrecision::bf16> {
  HM_HD static bfloat16_t apply(float x) { return bfloat16_t{float_to_bf16(x)}; }
};
template <> struct operand_convert<CostPrecision::fp16> {
  HM_HD static half_t apply(float x) { return half_t{float_to_half(x)}; }
};

HM_HD float operand_value(float x) { return x; }
HM_HD double operand_value(double x) { return x; }
HM_HD float operand_value(bfloat16_t x) { return bf16_to_float(x.bits); }
HM_HD float operand_value(half_t x) { return half_to_float(x.bits); }

// ---- Tile shapes ---------------------------------------------------------------------------
// SIMT (exact): 256 threads, each owning a TM x TN block of C split in two halves per axis, so a
// warp's shared-memory reads of B are contiguous and its stores coalesce. fp32: 128x128x8 tiles
// (8x8 per thread: 64 FMAs per 16 shared loads); fp64: 64x64x8 (double registers are twice as big).
template <typename T> struct SimtTile;
template <> struct SimtTile<float> {
  static constexpr int BM = 128, BN = 128, BK = 8, TM = 8, TN = 8, THREADS = 256, PAD = 4;
};
template <> struct SimtTile<double> {
  static constexpr int BM = 64, BN = 64, BK = 8, TM = 4, TN = 4, THREADS = 256, PAD = 2;
};

// Tensor cores (WMMA 16x16xKSTEP): 8 warps in a 2 x 4 grid, 64 x 32 of C per warp. Shared tiles
// are [rows][BK + PAD] so a fragment reads 16 rows at a 32-byte aligned stride. BK holds 32 bytes
// of k per row for every operand width.
template <CostPrecision P> struct MmaTile {
  static constexpr int BM = 128, BN = 128, THREADS = 256, WARPS_N = 4, WM = 64, WN = 32;
  static constexpr int BK = P == CostPrecision::tf32 ? 16 : 32;
  static constexpr int KSTEP = P == CostPrecision::tf32 ? 8 : 16;
  static constexpr int PAD = P == CostPrecision::tf32 ? 4 : 8;
};

// Where operand element e of a tile (e in [0, rows * BK)) sits: consecutive threads walk the
// axis with stride 1 in global memory, so loads coalesce for row- and column-major operands.
template <int ROWS, int BK>
HM_HD void cost_tile_coords(int e, bool k_fast, int& row, int& kk) {
  if (k_fast) {
    row = e / BK;
    kk = e % BK;
  } else {
    row = e % ROWS;
    kk = e / ROWS;
  }
}

// Shared-memory offset of (row, kk): k-major [BK][ROWS + PAD] for the SIMT product (a thread reads
// TM consecutive rows at one kk), row-major [ROWS][BK + PAD] for WMMA fragments.
template <bool K_MAJOR, int ROWS, int BK, int PAD>
HM_HD int cost_smem_index(int row, int kk) {
  return K_MAJOR ? kk * (ROWS + PAD) + row : row * (BK + PAD) + kk;
}

// ---- Staging: global -> registers -> shared ------------------------------------------------
template <int BM, int BN, int BK, int THREADS, typename Op>
struct CostStaging {
  static constexpr int kLoadsA = BM * BK / THREADS, kLoadsB = BN * BK / THREADS;
  Op a[kLoadsA];
  Op b[kLoadsB];
  bool a_k_fast, b_k_fast;
};

// Finds the term holding k-tile s, starting from the term of an earlier tile (or 0). Terms with
// no tile (k = 0) share their tile_begin with the next term and are stepped over.
template <typename T>
HM_HD int cost_term_of_tile(const CostParams<T>& p, int64_t s, int hint) {
  while (hint + 1 < p.n_terms && p.terms[hint + 1].tile_begin <= s) ++hint;
  return hint;
}

// Element `off` of operand `base` of term d, in the launch's type T (float16/bfloat16 upcast).
template <typename T> HM_HD T cost_load_as(const CostTermDesc& d, const void* base, int64_t off);
template <> HM_HD double cost_load_as<double>(const CostTermDesc&, const void* base, int64_t off) {
  return static_cast<const double*>(base)[off];
}
template <> HM_HD float cost_load_as<float>(const CostTermDesc& d, const void* base, int64_t off) {
  switch (d.storage) {
    case CostStorage::f16: return half_to_float(static_cast<const uint16_t*>(base)[off]);
    case CostStorage::bf16: return bf16_to_float(static_cast<const uint16_t*>(base)[off]);
    default: return static_cast<const float*>(base)[off];
  }
}

// Loads this thread's share of k-tile s of A (rows row0..) and B (rows col0..) into registers,
// gathered through the map, zero outside the matrices and on padding (both operands are zeroed on
// padding, so an inf in a dropped column of A never meets the 0 of B: the CPU skips those columns).
template <int BM, int BN, int BK, int THREADS, CostPrecision P, typename T, typename Op>
HM_HD void cost_load_tile(const CostParams<T>& p, int term, int64_t s, int64_t row0, int64_t col0, int thread,
                          CostStaging<BM, BN, BK, THREADS, Op>& st) {
  using Stage = CostStaging<BM, BN, BK, THREADS, Op>;
  const CostTermDesc& d = p.terms[term];
  const int64_t k0 = (s - d.tile_begin) * BK;
  st.a_k_fast = d.a_k_fast;
  st.b_k_fast = d.b_k_fast;
  for (int n = 0; n < Stage::kLoadsA; ++n) {
    int row, kk;
    cost_tile_coords<BM, BK>(thread + n * THREADS, d.a_k_fast, row, kk);
    const int64_t i = row0 + row, q = k0 + kk;
    T v = T(0);
    if (i < p.n_a && q < d.k && cost_b_column(d, q) >= 0) v = cost_load_as<T>(d, d.a, i * d.sa0 + q * d.sa1);
    st.a[n] = operand_convert<P>::apply(v);
  }
  for (int n = 0; n < Stage::kLoadsB; ++n) {
    int row, kk;
    cost_tile_coords<BN, BK>(thread + n * THREADS, d.b_k_fast, row, kk);
    const int64_t j = col0 + row, q = k0 + kk;
    T v = T(0);
    if (j < p.n_b && q < d.k) {
      const int64_t c = cost_b_column(d, q);
      if (c >= 0) v = cost_load_as<T>(d, d.b, j * d.sb0 + c * d.sb1);
    }
    st.b[n] = operand_convert<P>::apply(v);
  }
}

template <bool K_MAJOR, int BM, int BN, int BK, int THREADS, int PAD, typename Op>
HM_HD void cost_store_tile(const CostStaging<BM, BN, BK, THREADS, Op>& st, int thread, Op* As, Op* Bs) {
  using Stage = CostStaging<BM, BN, BK, THREADS, Op>;
  for (int n = 0; n < Stage::kLoadsA; ++n) {
    int row, kk;
    cost_tile_coords<BM, BK>(thread + n * THREADS, st.a_k_fast, row, kk);
    As[cost_smem_index<K_MAJOR, BM, BK, PAD>(row, kk)] = st.a[n];
  }
  for (int n = 0; n < Stage::kLoadsB; ++n) {
    int row, kk;
    cost_tile_coords<BN, BK>(thread + n * THREADS, st.b_k_fast, row, kk);
    Bs[cost_smem_index<K_MAJOR, BN, BK, PAD>(row, kk)] = st.b[n];
  }
}

// ---- The k-tile schedule of one block (shared by the kernels and the emulation) -----------
// Runs the phase sequence of the file header over every k-tile of the launch; `steps` supplies
// what differs between backends: load(term, s) stages k-tile s of `term` into registers,
// store(buf) writes the staged registers to shared buffer buf, compute(buf) multiplies buffer buf,
// barrier() is __syncthreads() (the emulation runs each step for every thread of the block, so
// its barrier is a no-op). The term of every tile, the first included, comes from
// cost_term_of_tile: a launch whose first terms have no tile (k = 0) starts at a later term.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename T, class Steps>
HM_HD void cost_tile_schedule(const CostParams<T>& p, Steps& steps) {
  int term = 0;
  if (p.n_tiles > 0) {
    term = cost_term_of_tile(p, 0, term);
    steps.load(term, int64_t(0));
    steps.store(0);
  }
  steps.barrier();
  for (int64_t s = 0; s < p.n_tiles; ++s) {
    const bool next = s + 1 < p.n_tiles;
    if (next) {  // global loads of tile s+1 are in flight while tile s is multiplied
      term = cost_term_of_tile(p, s + 1, term);
      steps.load(term, s + 1);
    }
    steps.compute(static_cast<int>(s & 1));
    if (next) steps.store(static_cast<int>((s + 1) & 1));
    steps.barrier();
  }
}

// ---- SIMT product (exact path) -------------------------------------------------------------
template <class Cfg>
HM_HD int simt_row(int ty, int m) {
  constexpr int H = Cfg::TM / 2;
  return (m / H) * (Cfg::BM / 2) + ty * H + m % H;
}
template <class Cfg>
HM_HD int simt_col(int tx, int n) {
  constexpr int H = Cfg::TN / 2;
  return (n / H) * (Cfg::BN / 2) + tx * H + n % H;
}

template <class Cfg, typename Acc>
HM_HD void cost_simt_compute(const Acc* As, const Acc* Bs, int thread, Acc (&acc)[Cfg::TM][Cfg::TN]) {
  const int tx = thread % (Cfg::BN / Cfg::TN), ty = thread / (Cfg::BN / Cfg::TN);
  for (int kk = 0; kk < Cfg::BK; ++kk) {
    Acc a[Cfg::TM], b[Cfg::TN];
    for (int m = 0; m < Cfg::TM; ++m) a[m] = As[kk * (Cfg::BM + Cfg::PAD) + simt_row<Cfg>(ty, m)];
    for (int n = 0; n < Cfg::TN; ++n) b[n] = Bs[kk * (Cfg::BN + Cfg::PAD) + simt_col<Cfg>(tx, n)];
    for (int m = 0; m < Cfg::TM; ++m)
      for (int n = 0; n < Cfg::TN; ++n) acc[m][n] += a[m] * b[n];
  }
}

template <class Cfg, typename T>
HM_HD void cost_simt_epilogue(const CostParams<T>& p, int64_t row0, int64_t col0, int thread,
                              const T (&acc)[Cfg::TM][Cfg::TN]) {
  const int tx = thread % (Cfg::BN / Cfg::TN), ty = thread / (Cfg::BN / Cfg::TN);
  for (int m = 0; m < Cfg::TM; ++m) {
    const int64_t i = row0 + simt_row<Cfg>(ty, m);
    if (i >= p.n_a) continue;
    for (int n = 0; n < Cfg::TN; ++n) {
      const int64_t j = col0 + simt_col<Cfg>(tx, n);
      if (j >= p.n_b) continue;
      T* o = p.out + i * p.n_b + j;
      *o = p.accumulate ? *o + acc[m][n] : acc[m][n];
    }
  }
}

// ---- Tensor-core product: epilogue shared with the emulation -------------------------------
// A warp stores one 16x16 accumulator fragment into `scratch` (row-major, ld 16); each lane then
// writes its 8 elements to C with bounds checks (ragged edges) and the accumulate flag.
template <typename T>
HM_HD void cost_mma_fragment_epilogue(const CostParams<T>& p, const float* scratch, int64_t i0, int64_t j0, int lane) {
  for (int u = 0; u < 8; ++u) {
    const int e = lane + 32 * u, r = e / 16, c = e % 16;
    const int64_t i = i0 + r, j = j0 + c;
    if (i >= p.n_a || j >= p.n_b) continue;
    T* o = p.out + i * p.n_b + j;
    *o = p.accumulate ? *o + scratch[e] : scratch[e];
  }
}

}  // namespace hm
