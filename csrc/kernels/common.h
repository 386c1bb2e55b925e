// Shared by the CPU and CUDA backends: the HM_HD qualifier, 16-bit float storage types and the
// load/store conversions every kernel body uses (arithmetic is done in acc_t<T>, float32 or wider).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define HM_HD __host__ __device__ __forceinline__
#else
#define HM_HD inline
#endif

namespace hm {

struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

HM_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
HM_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

HM_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even, as torch does; NaN stays a (quiet) NaN.
HM_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

HM_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    // subnormal: value = mant * 2^-24
    float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round to nearest even, overflow to inf, gradual underflow, NaN preserved.
HM_HD uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;
  if (abs >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                          // below the smallest normal half (2^-14)
    if (abs < 0x33000000u) return sign;             // below half the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // value / 2^-24 = mant * 2^(exp - 126)
    const uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    uint32_t r = q + ((rem > halfway || (rem == halfway && (q & 1u))) ? 1u : 0u);
    return sign | static_cast<uint16_t>(r);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  r += 0xfffu + ((r >> 13) & 1u);
  return sign | static_cast<uint16_t>(r >> 13);
}

template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

HM_HD float load_as_acc(const float* p) { return *p; }
HM_HD double load_as_acc(const double* p) { return *p; }
HM_HD float load_as_acc(const half_t* p) { return half_to_float(p->bits); }
HM_HD float load_as_acc(const bfloat16_t* p) { return bf16_to_float(p->bits); }

HM_HD void store_from_acc(float* p, float v) { *p = v; }
HM_HD void store_from_acc(double* p, double v) { *p = v; }
HM_HD void store_from_acc(half_t* p, float v) { p->bits = float_to_half(v); }
HM_HD void store_from_acc(bfloat16_t* p, float v) { p->bits = float_to_bf16(v); }

// Padding marker of an index map (DESIGN.md: src[i] = -1 means slot i is zero padding).
constexpr int64_t kPad = -1;

// The source index of output slot i: the map's entry, or i itself when there is no map.
HM_HD int64_t mapped_index(const int64_t* map, int64_t map_stride, int64_t i) {
  return map ? map[i * map_stride] : i;
}

}  // namespace hm
