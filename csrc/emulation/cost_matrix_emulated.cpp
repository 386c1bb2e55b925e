// Emulated launches of the cost_matrix kernels (csrc/cuda/cost_matrix.cu), phase by phase:
// every thread of a block runs one phase before any runs the next, as the barriers order them.
// The k-tile walk is the kernels' own (cost_tile_schedule): only the per-step bodies are here.
// The SIMT path is the kernel's code throughout. For the tensor-core path, staging (gather, padding,
// rounding to tf32/bf16/fp16), tile bookkeeping and the epilogue are the kernel's code; the WMMA
// fragment product itself is replaced by an fp32 loop over the same staged operands (the hardware's
// summation order inside a fragment is only checked on a GPU, tests/test_cuda.py).
#include <vector>

#include "emulation/emulated.h"

namespace hm::emulated {
namespace {

// The block's steps of the shared schedule (kernels/cost_matrix_tile.h, cost_tile_schedule), each
// run for every thread of the block in turn; the schedule's barriers separate the steps, and within
// a step no two threads touch the same shared element, so this serialization is the device's result.
template <typename T>
struct SimtBlock {
  using Cfg = SimtTile<T>;
  using Stage = CostStaging<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, T>;
  static constexpr int kASize = Cfg::BK * (Cfg::BM + Cfg::PAD), kBSize = Cfg::BK * (Cfg::BN + Cfg::PAD);
  struct Thread {
    Stage st;
    T acc[Cfg::TM][Cfg::TN];
  };
  const CostParams<T>& p;
  int64_t row0, col0;
  std::vector<T> As = std::vector<T>(2 * kASize), Bs = std::vector<T>(2 * kBSize);
  std::vector<Thread> th = std::vector<Thread>(Cfg::THREADS);

  void load(int term, int64_t s) {
    for (int t = 0; t < Cfg::THREADS; ++t)
      cost_load_tile<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, CostPrecision::exact>(p, term, s, row0, col0, t,
                                                                                    th[t].st);
  }
  void store(int buf) {
    for (int t = 0; t < Cfg::THREADS; ++t)
      cost_store_tile<true, Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Cfg::PAD>(th[t].st, t, &As[buf * kASize],
                                                                             &Bs[buf * kBSize]);
  }
  void compute(int buf) {
    for (int t = 0; t < Cfg::THREADS; ++t) cost_simt_compute<Cfg>(&As[buf * kASize], &Bs[buf * kBSize], t, th[t].acc);
  }
  void barrier() {}
};

template <typename T>
Plan cost_simt(const std::vector<gpu::CostTermInput>& terms, const TensorView& out) {
  using Cfg = SimtTile<T>;
  const gpu::Grid g = gpu::cost_grid(out.shape[0], out.shape[1], Cfg::BM, Cfg::BN, Cfg::THREADS);
  Plan plan{{"launches", 0}, {"grid_x", g.grid_x}, {"grid_y", g.grid_y}, {"bk", Cfg::BK}};
  if (g.empty()) return plan;
  for (const CostParams<T>& p : gpu::cost_params<T>(terms, out, Cfg::BK)) {
    for (int64_t by = 0; by < g.grid_y; ++by)
      for (int64_t bx = 0; bx < g.grid_x; ++bx) {
        SimtBlock<T> block{p, by * Cfg::BM, bx * Cfg::BN};  // value-initialized: accumulators start at 0
        cost_tile_schedule(p, block);
        for (int t = 0; t < Cfg::THREADS; ++t) cost_simt_epilogue<Cfg>(p, block.row0, block.col0, t, block.th[t].acc);
      }
    ++plan["launches"];
  }
  return plan;
}

// Tensor-core steps: staging and bookkeeping are the kernel's; the WMMA fragment product is an fp32
// loop over the same staged operands (per warp, WM x WN accumulators, row-major).
template <CostPrecision P>
struct MmaBlock {
  using Cfg = MmaTile<P>;
  using Op = cost_operand_t<P, float>;
  using Stage = CostStaging<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Op>;
  static constexpr int LD = Cfg::BK + Cfg::PAD;
  static constexpr int kASize = Cfg::BM * LD, kBSize = Cfg::BN * LD;
  static constexpr int kWarps = Cfg::THREADS / 32;
  const CostParams<float>& p;
  int64_t row0, col0;
  std::vector<Op> As = std::vector<Op>(2 * kASize), Bs = std::vector<Op>(2 * kBSize);
  std::vector<Stage> st = std::vector<Stage>(Cfg::THREADS);
  std::vector<float> acc = std::vector<float>(static_cast<size_t>(kWarps) * Cfg::WM * Cfg::WN);

  void load(int term, int64_t s) {
    for (int t = 0; t < Cfg::THREADS; ++t)
      cost_load_tile<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, P>(p, term, s, row0, col0, t, st[t]);
  }
  void store(int buf) {
    for (int t = 0; t < Cfg::THREADS; ++t)
      cost_store_tile<false, Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Cfg::PAD>(st[t], t, &As[buf * kASize],
                                                                              &Bs[buf * kBSize]);
  }
  void compute(int buf) {
    const Op* a_tile = &As[buf * kASize];
    const Op* b_tile = &Bs[buf * kBSize];
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
  }
  void barrier() {}
};

template <CostPrecision P>
Plan cost_mma(const std::vector<gpu::CostTermInput>& terms, const TensorView& out) {
  using Cfg = MmaTile<P>;
  using Block = MmaBlock<P>;
  const gpu::Grid g = gpu::cost_grid(out.shape[0], out.shape[1], Cfg::BM, Cfg::BN, Cfg::THREADS);
  Plan plan{{"launches", 0}, {"grid_x", g.grid_x}, {"grid_y", g.grid_y}, {"bk", Cfg::BK}};
  if (g.empty()) return plan;
  std::vector<float> scratch(256);
  for (const CostParams<float>& p : gpu::cost_params<float>(terms, out, Cfg::BK)) {
    for (int64_t by = 0; by < g.grid_y; ++by)
      for (int64_t bx = 0; bx < g.grid_x; ++bx) {
        Block block{p, by * Cfg::BM, bx * Cfg::BN};
        cost_tile_schedule(p, block);
        for (int w = 0; w < Block::kWarps; ++w) {
          const int wm = w / Cfg::WARPS_N, wn = w % Cfg::WARPS_N;
          const float* wacc = &block.acc[static_cast<size_t>(w) * Cfg::WM * Cfg::WN];
          for (int m = 0; m < Cfg::WM / 16; ++m)
            for (int n = 0; n < Cfg::WN / 16; ++n) {
              for (int e = 0; e < 256; ++e) scratch[e] = wacc[(m * 16 + e / 16) * Cfg::WN + n * 16 + e % 16];
              for (int lane = 0; lane < 32; ++lane)
                cost_mma_fragment_epilogue(p, scratch.data(), block.row0 + wm * Cfg::WM + m * 16,
                                           block.col0 + wn * Cfg::WN + n * 16, lane);
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
      value_error("cost_matrix: precision='tf32'/'bf16'/'fp16' needs float32, float16 or bfloat16 inputs, got float64");
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
