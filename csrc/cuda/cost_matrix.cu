// CUDA kernels of cost_matrix; per-tile logic (gathering loads, shared-memory layout, the SIMT
// product and the epilogues) in kernels/cost_matrix_tile.h. All terms of a call go through one
// launch (up to kMaxCostTermsPerLaunch): their k-tiles are laid end to end and accumulate in the same
// registers, so C is written once.
//  - exact: SIMT FMA in the input dtype (fp32: 128x128x8 tiles, fp64: 64x64x8).
//  - tf32 / bf16 / fp16: WMMA tensor cores on operands rounded while staging, fp32 accumulation.
// float16 / bfloat16 inputs run the float kernels: each load upcasts (CostTermDesc::storage).
// The k-tile walk is kernels/cost_matrix_tile.h's cost_tile_schedule, shared with the emulation.
#include <mma.h>

#include "cuda/cuda_util.cuh"

namespace hm::gpu {
namespace {

// One thread's steps of the shared k-tile schedule (kernels/cost_matrix_tile.h), SIMT product.
template <typename T>
struct SimtSteps {
  using Cfg = SimtTile<T>;
  static constexpr int kASize = Cfg::BK * (Cfg::BM + Cfg::PAD), kBSize = Cfg::BK * (Cfg::BN + Cfg::PAD);
  const CostParams<T>& p;
  T (*As)[kASize];
  T (*Bs)[kBSize];
  int64_t row0, col0;
  int thread;
  CostStaging<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, T> st;
  T acc[Cfg::TM][Cfg::TN];

  __device__ void load(int term, int64_t s) {
    cost_load_tile<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, CostPrecision::exact>(p, term, s, row0, col0, thread, st);
  }
  __device__ void store(int buf) {
    cost_store_tile<true, Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Cfg::PAD>(st, thread, As[buf], Bs[buf]);
  }
  __device__ void compute(int buf) { cost_simt_compute<Cfg>(As[buf], Bs[buf], thread, acc); }
  __device__ void barrier() { __syncthreads(); }
};

template <typename T>
__global__ void __launch_bounds__(256) cost_simt_kernel(const __grid_constant__ CostParams<T> p) {
  using S = SimtSteps<T>;
  __shared__ alignas(16) T As[2][S::kASize];
  __shared__ alignas(16) T Bs[2][S::kBSize];
  S steps{p, As, Bs, static_cast<int64_t>(blockIdx.y) * S::Cfg::BM, static_cast<int64_t>(blockIdx.x) * S::Cfg::BN,
          static_cast<int>(threadIdx.x)};
  for (int m = 0; m < S::Cfg::TM; ++m)
    for (int n = 0; n < S::Cfg::TN; ++n) steps.acc[m][n] = T(0);
  cost_tile_schedule(p, steps);
  cost_simt_epilogue<typename S::Cfg>(p, steps.row0, steps.col0, steps.thread, steps.acc);
}

template <CostPrecision P> struct WmmaType;
template <> struct WmmaType<CostPrecision::tf32> {
  using frag = nvcuda::wmma::precision::tf32;
  using ptr = float;
};
template <> struct WmmaType<CostPrecision::bf16> {
  using frag = __nv_bfloat16;
  using ptr = __nv_bfloat16;
};
template <> struct WmmaType<CostPrecision::fp16> {
  using frag = __half;
  using ptr = __half;
};

// One thread's steps of the shared k-tile schedule, tensor-core product (8 warps of WM x WN).
template <CostPrecision P>
struct MmaSteps {
  using Cfg = MmaTile<P>;
  using Op = cost_operand_t<P, float>;
  using W = WmmaType<P>;
  static constexpr int LD = Cfg::BK + Cfg::PAD;
  static constexpr int kASize = Cfg::BM * LD, kBSize = Cfg::BN * LD;
  static constexpr int kFragM = Cfg::WM / 16, kFragN = Cfg::WN / 16;
  // Buffer b of A at tiles + b * kASize, of B at tiles + 2 * kASize + b * kBSize (computed, not
  // indexed from a pointer array, which would live in local memory).
  const CostParams<float>& p;
  Op* tiles;
  int64_t row0, col0;
  int thread, wm, wn;
  CostStaging<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Op> st;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, Cfg::KSTEP, float> acc[kFragM][kFragN];

  __device__ void load(int term, int64_t s) {
    cost_load_tile<Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, P>(p, term, s, row0, col0, thread, st);
  }
  __device__ void store(int buf) {
    cost_store_tile<false, Cfg::BM, Cfg::BN, Cfg::BK, Cfg::THREADS, Cfg::PAD>(st, thread, tiles + buf * kASize,
                                                                             tiles + 2 * kASize + buf * kBSize);
  }
  __device__ void compute(int buf) {
    namespace wmma = nvcuda::wmma;
    const typename W::ptr* a_tile = reinterpret_cast<const typename W::ptr*>(tiles + buf * kASize);
    const typename W::ptr* b_tile = reinterpret_cast<const typename W::ptr*>(tiles + 2 * kASize + buf * kBSize);
#pragma unroll
    for (int kk = 0; kk < Cfg::BK; kk += Cfg::KSTEP) {
      // Operands were rounded to the tensor-core format while staging (cost_load_tile), so the
      // fragments need no __float_to_tf32 pass.
      wmma::fragment<wmma::matrix_a, 16, 16, Cfg::KSTEP, typename W::frag, wmma::row_major> fa[kFragM];
      wmma::fragment<wmma::matrix_b, 16, 16, Cfg::KSTEP, typename W::frag, wmma::col_major> fb[kFragN];
#pragma unroll
      for (int m = 0; m < kFragM; ++m) wmma::load_matrix_sync(fa[m], a_tile + (wm * Cfg::WM + m * 16) * LD + kk, LD);
      // B is staged [BN][BK]: element (k, n) at n * LD + k, i.e. column-major B^T.
#pragma unroll
      for (int n = 0; n < kFragN; ++n) wmma::load_matrix_sync(fb[n], b_tile + (wn * Cfg::WN + n * 16) * LD + kk, LD);
#pragma unroll
      for (int m = 0; m < kFragM; ++m)
#pragma unroll
        for (int n = 0; n < kFragN; ++n) wmma::mma_sync(acc[m][n], fa[m], fb[n], acc[m][n]);
    }
  }
  __device__ void barrier() { __syncthreads(); }
};

template <CostPrecision P>
__global__ void __launch_bounds__(256) cost_mma_kernel(const __grid_constant__ CostParams<float> p) {
  namespace wmma = nvcuda::wmma;
  using S = MmaSteps<P>;
  using Cfg = typename S::Cfg;
  constexpr int kWarps = Cfg::THREADS / 32;
  // Operand tiles during the k-loop, per-warp 16x16 fp32 scratch in the epilogue.
  constexpr int kTileBytes = 2 * (S::kASize + S::kBSize) * static_cast<int>(sizeof(typename S::Op));
  constexpr int kScratchBytes = kWarps * 256 * static_cast<int>(sizeof(float));
  __shared__ alignas(128) unsigned char smem[kTileBytes > kScratchBytes ? kTileBytes : kScratchBytes];

  const int thread = threadIdx.x, warp = thread / 32, lane = thread % 32;
  S steps{p, reinterpret_cast<typename S::Op*>(smem), static_cast<int64_t>(blockIdx.y) * Cfg::BM,
          static_cast<int64_t>(blockIdx.x) * Cfg::BN, thread, warp / Cfg::WARPS_N, warp % Cfg::WARPS_N};
#pragma unroll
  for (int m = 0; m < S::kFragM; ++m)
#pragma unroll
    for (int n = 0; n < S::kFragN; ++n) wmma::fill_fragment(steps.acc[m][n], 0.0f);
  cost_tile_schedule(p, steps);
  // The schedule ended on a barrier, so the operand tiles are free to hold the epilogue scratch.
  float* scratch = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
  for (int m = 0; m < S::kFragM; ++m)
#pragma unroll
    for (int n = 0; n < S::kFragN; ++n) {
      wmma::store_matrix_sync(scratch, steps.acc[m][n], 16, wmma::mem_row_major);
      __syncwarp();
      cost_mma_fragment_epilogue(p, scratch, steps.row0 + steps.wm * Cfg::WM + m * 16,
                                 steps.col0 + steps.wn * Cfg::WN + n * 16, lane);
      __syncwarp();
    }
}

template <typename T>
void launch_simt(const std::vector<CostTermInput>& terms, const TensorView& out, cudaStream_t stream) {
  using Cfg = SimtTile<T>;
  const Grid g = cost_grid(out.shape[0], out.shape[1], Cfg::BM, Cfg::BN, Cfg::THREADS);
  if (g.empty()) return;
  for (const CostParams<T>& p : cost_params<T>(terms, out, Cfg::BK)) {
    cost_simt_kernel<T><<<grid_dim(g), g.threads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "cost_matrix", "kernel launch");
  }
}

template <CostPrecision P>
void launch_mma(const std::vector<CostTermInput>& terms, const TensorView& out, cudaStream_t stream) {
  using Cfg = MmaTile<P>;
  const Grid g = cost_grid(out.shape[0], out.shape[1], Cfg::BM, Cfg::BN, Cfg::THREADS);
  if (g.empty()) return;
  for (const CostParams<float>& p : cost_params<float>(terms, out, Cfg::BK)) {
    cost_mma_kernel<P><<<grid_dim(g), g.threads, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "cost_matrix", "kernel launch");
  }
}

}  // namespace

void cost_matrix(const std::vector<CostTermInput>& terms, const TensorView& out, CostPrecision precision,
                 cudaStream_t stream) {
  if (out.dtype == DType::f64) {
    if (precision != CostPrecision::exact)
      value_error("cost_matrix: precision='tf32'/'bf16'/'fp16' needs float32, float16 or bfloat16 inputs, got float64");
    launch_simt<double>(terms, out, stream);
    return;
  }
  switch (precision) {
    case CostPrecision::exact: launch_simt<float>(terms, out, stream); break;
    case CostPrecision::tf32: launch_mma<CostPrecision::tf32>(terms, out, stream); break;
    case CostPrecision::bf16: launch_mma<CostPrecision::bf16>(terms, out, stream); break;
    case CostPrecision::fp16: launch_mma<CostPrecision::fp16>(terms, out, stream); break;
  }
}

}  // namespace hm::gpu
