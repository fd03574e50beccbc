// Pieces shared by the C++ CPU kernels of torchlns: each rule of the chip model that more
// than one kernel needs is written here once (the Python statement of the same rules is
// torchlns/core/fields.py and torchlns/ops/reference.py).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

// Portable builds with fast paths.
//
// The package is compiled without -march=native, so that it runs on any x86-64. Hot
// loops are compiled several times instead (GCC/Clang target_clones) and the loader
// picks the best clone the CPU supports: x86-64-v4 (AVX-512 F/BW/DQ/VL), x86-64-v3
// (AVX2/FMA), or the x86-64 baseline. Hand-written AVX-512 paths are guarded by
// TORCHLNS_X86_INTRINSICS and chosen at run time with __builtin_cpu_supports.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(TORCHLNS_NO_MULTIVERSION)
#define TORCHLNS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define TORCHLNS_X86_INTRINSICS 1
#include <immintrin.h>
#else
#define TORCHLNS_MULTIVERSION
#endif

#define TORCHLNS_INLINE inline __attribute__((always_inline))

namespace torchlns {

constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kMantMask = (1u << 23) - 1;

TORCHLNS_INLINE uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

TORCHLNS_INLINE float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// 2^e as a double, exact for e in [-1022, 1023].
TORCHLNS_INLINE double pow2(int64_t e) {
  const uint64_t u = uint64_t(e + 1023) << 52;
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// sign * 2^q as a float32, q in [-126, 127].
TORCHLNS_INLINE float pow2f_signed(int32_t q, float sign) {
  return sign * bits_float(uint32_t(q + 127) << 23);
}

// An LNS code's fields (spec section 1): the magnitude field E (low bits-1 bits) and the sign
// (top bit). E = 0 is zero, or NaN when the sign is set. int16 codes hold the same bit pattern.
struct CodeFields {
  int32_t mag;
  bool negative;
};

TORCHLNS_INLINE CodeFields code_fields(int32_t code, int32_t e_max, int32_t code_mask) {
  const int32_t c = code & code_mask;
  return {c & e_max, c > e_max};
}

// The log fields of a (rows, K) matrix of codes (see log_fields in mac_cpu.cpp).
struct LogFields {
  at::Tensor g;      // int32 log value g = E + offset, 0 where the code is zero or NaN
  at::Tensor sign;   // float32: +1, -1, or 0 for the zero and NaN codes
  at::Tensor nan;    // bool: the code is NaN
  int64_t q_lo = 0;  // range of q = g >> F over the nonzero codes (0, 0 if there are none)
  int64_t q_hi = 0;
};

LogFields log_fields(const at::Tensor& codes, const at::Tensor& offset, int64_t bits, int frac_bits);

// Note: remainder classes
// For the float32 accumulator the MAC is a sum of 2^F ordinary matrix products (or
// convolutions). Split each log value as g = q 2^F + r. A product's conversion depends only
// on t = r_x + r_w (with a carry when t >= 2^F), so with C_ext[t] = C[t] for t < 2^F and
// 2 C[t - 2^F] above,
//   y = sum_i A_i V_i^T,  A_i[m,k] = s_x 2^qx [r_x = i],  V_i[n,k] = s_w 2^qw C_ext[i + r_w].
// Every entry and every product is an exact float32 as long as the exponents stay in the
// normal range, which class_terms_in_range checks (otherwise the direct kernel runs), so
// each product is exact and only the float32 summation rounds: the spec's float32
// accumulator. C_ext < 4, so V entries need qw + 2 <= 127 and products qx + qw + 2 <= 127;
// everything must stay >= -126.
TORCHLNS_INLINE bool class_terms_in_range(const LogFields& lx, const LogFields& lw) {
  return lx.q_lo >= -126 && lx.q_hi <= 127 && lw.q_lo >= -126 && lw.q_hi + 2 <= 127 && lx.q_lo + lw.q_lo >= -126 &&
         lx.q_hi + lw.q_hi + 2 <= 127;
}

// C_ext of the Note above, as float32. Every entry is exact: the exact table holds float32
// values, a LUT entry has at most lut_bits + 1 <= 24 significant bits, Mitchell's F + 1.
std::vector<float> extended_table(const double* C, int frac_bits);

// The fixed accumulator's epilogue (spec section 2, step 4): the bias as rne(b / 2^Λ) added
// to the exact sum (a NaN bias makes the output NaN; the addition saturates instead of
// wrapping), the final saturation to ±T, and acc * 2^Λ rounded once to float32. The bias is
// clamped to ±(2^63 - 1024), which cannot change the saturated result (see Note: reference
// MAC arithmetic in torchlns/ops/reference.py).
TORCHLNS_INLINE float fixed_epilogue(int64_t acc, const float* bias, int64_t T, int64_t acc_lsb, bool nan_out) {
  if (bias) {
    if (*bias != *bias) {
      nan_out = true;
    } else {
      constexpr double kBiasClamp = 9223372036854774784.0;  // 2^63 - 1024
      double bd = __builtin_nearbyint(double(*bias) * pow2(-acc_lsb));
      bd = bd > kBiasClamp ? kBiasClamp : (bd < -kBiasClamp ? -kBiasClamp : bd);
      int64_t sum;
      if (__builtin_add_overflow(acc, int64_t(bd), &sum)) sum = bd > 0 ? T : -T;
      acc = sum;
    }
  }
  acc = acc > T ? T : (acc < -T ? -T : acc);
  return nan_out ? __builtin_nanf("") : float(double(acc) * pow2(acc_lsb));
}

// torchlns::lns_mm on the CPU (mac_cpu.cpp); the convolution kernel calls it per group.
at::Tensor lns_mm_cpu(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w, const at::Tensor& w_offset,
                      const at::Tensor& table, const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                      int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb);

}  // namespace torchlns
