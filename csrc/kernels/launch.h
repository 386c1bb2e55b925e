// Pieces of a CUDA launch that the kernel bodies see, written so that the same bodies also run on
// the CPU under an emulated launch (csrc/emulation): block/thread coordinates as plain integers,
// 16-byte vector loads/stores, and strided trailing dimensions.
#pragma once
#include "kernels/common.h"

namespace hm {

// Where one thread sits in a launch: a 2-D grid of 1-D blocks. The CUDA kernels fill it from
// blockIdx/threadIdx; the emulation loops over every value.
struct LaunchCtx {
  int64_t block_x, block_y;  // blockIdx.x, blockIdx.y
  int64_t grid_x, grid_y;    // gridDim.x, gridDim.y
  int thread, threads;       // threadIdx.x, blockDim.x
};

// Elements per 16-byte vector: the widest single load/store a thread can issue.
template <typename T>
HM_HD constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T, int N>
struct alignas(16) VecN {
  T v[N];
};

// p must be 16-byte aligned (the launchers check before enabling the vector paths).
template <typename T, int N>
HM_HD void load_vec(const T* p, T (&out)[N]) {
#if defined(__CUDA_ARCH__)
  const VecN<T, N> v = *reinterpret_cast<const VecN<T, N>*>(p);
  for (int i = 0; i < N; ++i) out[i] = v.v[i];
#else
  memcpy(out, p, sizeof(T) * N);
#endif
}

template <typename T, int N>
HM_HD void store_vec(T* p, const T (&in)[N]) {
#if defined(__CUDA_ARCH__)
  VecN<T, N> v;
  for (int i = 0; i < N; ++i) v.v[i] = in[i];
  *reinterpret_cast<VecN<T, N>*>(p) = v;
#else
  memcpy(p, in, sizeof(T) * N);
#endif
}

// Trailing dims (conv kernel positions, ...) of an operand, collapsed where contiguous, so the
// common cases are nd = 0 (none) or nd = 1 with stride 1.
constexpr int kMaxTrailing = 6;
struct Trailing {
  int nd = 0;
  int64_t shape[kMaxTrailing] = {};
  int64_t stride[kMaxTrailing] = {};
};

// Element offset of trailing position t (row-major over the trailing shape).
HM_HD int64_t trailing_offset(const Trailing& tr, int64_t t) {
  if (tr.nd == 1) return t * tr.stride[0];
  int64_t off = 0;
  for (int d = tr.nd - 1; d >= 0; --d) {
    const int64_t n = tr.shape[d];
    off += (t % n) * tr.stride[d];
    t /= n;
  }
  return off;
}

HM_HD int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

}  // namespace hm
