// Emulated launches of the cost_matrix kernels (csrc/cuda/cost_matrix.cu), phase by phase:
// every thread of a block runs one phase before any runs the next, as the barriers order them.
// The SIMT path is the kernel's code throughout. For the tensor-core path, staging (gather, padding,
// rounding to tf32/bf16/fp16), tile bookkeeping and the epilogue are the kernel's code; the WMMA
// fragment product itself is replaced by an fp32 loop over the same staged operands (the hardware's
// summation order inside a fragment is only checked on a GPU, tests/test_cuda.py).
#include <vector>

#include "emulation/emulated.h"

namespace hm::emulated {
namespace {

template <typename T>
Plan cost_simt(const std::vector<gpu::CostTermInput>& terms, const TensorView& out) {
  using Cfg = SimtTile<T>;
  using Stage = CostStaging<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, T>;
  constexpr int kASize = Cfg::BK * (Cfg::BM + Cfg::PAD), kBSize = Cfg::BK * (Cfg::BN + Cfg::PAD);
  const gpu::Grid g = gpu::cost_grid(out.shape[0], out.shape[1], Cfg::BM, Cfg::BN, Cfg::THREADS);
  Plan plan{{"launches", 0}, {"grid_x", g.grid_x}, {"grid_y", g.grid_y}, {"bk", Cfg::BK}};
  if (g.empty()) return plan;
  struct Thread {
    Stage st;
    T acc[Cfg::TM][Cfg::TN];
    int term;
  };
  std::vector<T> As(2 * kASize), Bs(2 * kBSize);
  std::vector<Thread> th(Cfg::THREADS);
  for (const CostParams<T>& p : gpu::cost_params<T>(terms, out, Cfg::BK)) {
    for (int64_t by = 0; by < g.grid_y; ++by)
      for (int64_t bx = 0; bx < g.grid_x; ++bx) {
        const int64_t row0 = by * Cfg::BM, col0 = bx * Cfg::BN;
        for (int t = 0; t < Cfg::THREADS; ++t) {
          th[t] = Thread{};
          if (p.n_tiles > 0) {
            cost_load_tile<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, CostPrecision::exact>(p, 0, 0, row0, col0, t,
                                                                                          th[t].st);
            cost_store_tile<true, Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Cfg::PAD>(th[t].st, t, &As[0], &Bs[0]);
          }
        }
        // __syncthreads()
        for (int64_t s = 0; s < p.n_tiles; ++s) {
          const bool next = s + 1 < p.n_tiles;
          const int cur = static_cast<int>(s & 1), nxt = static_cast<int>((s + 1) & 1);
          for (int t = 0; t < Cfg::THREADS; ++t) {
            if (next) {
              th[t].term = cost_term_of_tile(p, s + 1, th[t].term);
              cost_load_tile<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, CostPrecision::exact>(p, th[t].term, s + 1, row0,
                                                                                            col0, t, th[t].st);
            }
            cost_simt_compute<Cfg>(&As[cur * kASize], &Bs[cur * kBSize], t, th[t].acc);
            if (next)
              cost_store_tile<true, Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Cfg::PAD>(th[t].st, t, &As[nxt * kASize],
                                                                                     &Bs[nxt * kBSize]);
          }
          // __syncthreads()
        }
        for (int t = 0; t < Cfg::THREADS; ++t) cost_simt_epilogue<Cfg>(p, row0, col0, t, th[t].acc);
      }
    ++plan["launches"];
  }
  return plan;
}

template <CostPrecision P>
Plan cost_mma(const std::vector<gpu::CostTermInput>& terms, const TensorView& out) {
  using Cfg = MmaTile<P>;
  using Op = cost_operand_t<P, float>;
  using Stage = CostStaging<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Op>;
  constexpr int LD = Cfg::BK + Cfg::PAD;
  constexpr int kASize = Cfg::BM * LD, kBSize = Cfg::BN * LD;
  constexpr int kWarps = Cfg::THREADS / 32;
  const gpu::Grid g = gpu::cost_grid(out.shape[0], out.shape[1], Cfg::BM, Cfg::BN, Cfg::THREADS);
  Plan plan{{"launches", 0}, {"grid_x", g.grid_x}, {"grid_y", g.grid_y}, {"bk", Cfg::BK}};
  if (g.empty()) return plan;
  std::vector<Op> As(2 * kASize), Bs(2 * kBSize);
  std::vector<Stage> st(Cfg::THREADS);
  std::vector<int> term(Cfg::THREADS);
  std::vector<float> acc(static_cast<size_t>(kWarps) * Cfg::WM * Cfg::WN);  // per warp, row-major WM x WN
  std::vector<float> scratch(256);
  for (const CostParams<float>& p : gpu::cost_params<float>(terms, out, Cfg::BK)) {
    for (int64_t by = 0; by < g.grid_y; ++by)
      for (int64_t bx = 0; bx < g.grid_x; ++bx) {
        const int64_t row0 = by * Cfg::BM, col0 = bx * Cfg::BN;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int t = 0; t < Cfg::THREADS; ++t) {
          term[t] = 0;
          if (p.n_tiles > 0) {
            cost_load_tile<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, P>(p, 0, 0, row0, col0, t, st[t]);
            cost_store_tile<false, Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Cfg::PAD>(st[t], t, &As[0], &Bs[0]);
          }
        }
        for (int64_t s = 0; s < p.n_tiles; ++s) {
          const bool next = s + 1 < p.n_tiles;
          const Op* a_tile = &As[(s & 1) * kASize];
          const Op* b_tile = &Bs[(s & 1) * kBSize];
          // Register prefetch of tile s+1 (per thread), then the warps' fragment products of tile s.
          if (next)
            for (int t = 0; t < Cfg::THREADS; ++t) {
              term[t] = cost_term_of_tile(p, s + 1, term[t]);
              cost_load_tile<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, P>(p, term[t], s + 1, row0, col0, t, st[t]);
            }
          for (int w = 0; w < kWarps; ++w) {
            const int wm = w / Cfg::WARPS_N, wn = w % Cfg::WARPS_N;
            float* wacc = &acc[static_cast<size_t>(w) * Cfg::WM * Cfg::WN];
            for (int r = 0; r < Cfg::WM; ++r)
              for (int c = 0; c < Cfg::WN; ++c) {
                float sum = wacc[r * Cfg::WN + c];
                const Op* ar = a_tile + (wm * Cfg::WM + r) * LD;
                const Op* bc = b_tile + (wn * Cfg::WN + c) * LD;
                for (int kk = 0; kk < Cfg::BK; ++kk) sum += operand_value(ar[kk]) * operand_value(bc[kk]);
                wacc[r * Cfg::WN + c] = sum;
              }
          }
          if (next)
            for (int t = 0; t < Cfg::THREADS; ++t)
              cost_store_tile<false, Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Cfg::PAD>(
                  st[t], t, &As[((s + 1) & 1) * kASize], &Bs[((s + 1) & 1) * kBSize]);
        }
        for (int w = 0; w < kWarps; ++w) {
          const int wm = w / Cfg::WARPS_N, wn = w % Cfg::WARPS_N;
          const float* wacc = &acc[static_cast<size_t>(w) * Cfg::WM * Cfg::WN];
          for (int m = 0; m < Cfg::WM / 16; ++m)
            for (int n = 0; n < Cfg::WN / 16; ++n) {
              for (int e = 0; e < 256; ++e) scratch[e] = wacc[(m * 16 + e / 16) * Cfg::WN + n * 16 + e % 16];
              for (int lane = 0; lane < 32; ++lane)
                cost_mma_fragment_epilogue(p, scratch.data(), row0 + wm * Cfg::WM + m * 16,
                                           col0 + wn * Cfg::WN + n * 16, lane);
            }
        }
      }
    ++plan["launches"];
  }
  return plan;
}

}  // namespace

Plan cost_matrix(const std::vector<gpu::CostTermInput>& terms, const TensorView& out, CostPrecision precision) {
  if (out.dtype == DType::f64) {
    if (precision != CostPrecision::exact)
      value_error("cost_matrix: precision='tf32'/'bf16'/'fp16' needs float32 inputs, got float64");
    return cost_simt<double>(terms, out);
  }
  switch (precision) {
    case CostPrecision::tf32: return cost_mma<CostPrecision::tf32>(terms, out);
    case CostPrecision::bf16: return cost_mma<CostPrecision::bf16>(terms, out);
    case CostPrecision::fp16: return cost_mma<CostPrecision::fp16>(terms, out);
    default: return cost_simt<float>(terms, out);
  }
}

}  // namespace hm::emulated
