// CPU kernel of torchlns::lns_mm, the core of lns_linear / lns_conv (spec section 2).
//
// Direct form: each product is formed from its log sum G = g_x + g_w and converted with
// the table C[r] (float64, exact; see Note: reference MAC arithmetic in torchlns/mac.py).
// 2^q is built from its bit pattern, so C[r] * 2^q is an exact double for every q the
// valid offsets allow.
//
// Determinism: every output is summed by one thread, in a fixed order (LANES interleaved
// partial sums over k, then the lanes in order), so the bits never depend on the thread
// count. The float32 accumulator sums exact products in double and rounds once, which is
// well inside the spec bound; the fixed accumulator is exact, so it matches the
// reference bit for bit.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>

#include "multiversion.h"

namespace torchlns {
namespace {

constexpr int LANES = 8;

inline double pow2(int64_t e) {  // exact for e in [-1022, 1023]
  const uint64_t u = uint64_t(e + 1023) << 52;
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

struct LogRows {
  at::Tensor g;     // int32 log value, 0 where the code is zero
  at::Tensor sign;  // double: +1, -1, or 0 for the zero code (and NaN)
  at::Tensor nan;   // bool per row: the row holds a NaN code
};

LogRows log_rows(const at::Tensor& codes, const at::Tensor& offset, int64_t bits) {
  const int64_t rows = codes.size(0), K = codes.size(1);
  const int32_t e_max = (1 << (bits - 1)) - 1, mask = (1 << bits) - 1;
  auto c32 = codes.to(at::kInt).bitwise_and(mask).contiguous();
  auto off = offset.expand({rows, K}).contiguous();
  LogRows out{at::empty({rows, K}, codes.options().dtype(at::kInt)),
              at::empty({rows, K}, codes.options().dtype(at::kDouble)),
              at::zeros({rows}, codes.options().dtype(at::kBool))};
  const int32_t* c = c32.data_ptr<int32_t>();
  const int32_t* o = off.data_ptr<int32_t>();
  int32_t* g = out.g.data_ptr<int32_t>();
  double* s = out.sign.data_ptr<double>();
  bool* nan = out.nan.data_ptr<bool>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      bool any_nan = false;
      for (int64_t k = r * K; k < (r + 1) * K; ++k) {
        const int32_t mag = c[k] & e_max;
        const bool neg = c[k] > e_max;
        any_nan |= (mag == 0) & neg;
        g[k] = mag == 0 ? 0 : mag + o[k];
        s[k] = mag == 0 ? 0.0 : (neg ? -1.0 : 1.0);
      }
      nan[r] = any_nan;
    }
  });
  return out;
}

// One output of the float32 accumulator: sum of exact products, LANES-interleaved.
TORCHLNS_MULTIVERSION
double dot_float(const int32_t* gx, const double* sx, const int32_t* gw, const double* sw, int64_t K,
                 const double* table, int frac_bits) {
  double acc[LANES] = {0};
  const int32_t r_mask = (1 << frac_bits) - 1;
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES)
    for (int l = 0; l < LANES; ++l) {
      const int32_t G = gx[k + l] + gw[k + l];
      acc[l] += (sx[k + l] * sw[k + l]) * (table[G & r_mask] * pow2(G >> frac_bits));
    }
  for (int l = 0; k < K; ++k, ++l) {
    const int32_t G = gx[k] + gw[k];
    acc[l] += (sx[k] * sw[k]) * (table[G & r_mask] * pow2(G >> frac_bits));
  }
  double total = 0.0;
  for (int l = 0; l < LANES; ++l) total += acc[l];
  return total;
}

// One output of the fixed accumulator: exact int64 sum of truncated, saturated products.
TORCHLNS_MULTIVERSION
int64_t dot_fixed(const int32_t* gx, const double* sx, const int32_t* gw, const double* sw, int64_t K,
                  const double* table, int frac_bits, int64_t acc_lsb, double T) {
  int64_t acc = 0;
  const int32_t r_mask = (1 << frac_bits) - 1;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t G = gx[k] + gw[k];
    double p = std::floor(table[G & r_mask] * pow2(int64_t(G >> frac_bits) - acc_lsb));
    p = p < T ? p : T;
    acc += int64_t((sx[k] * sw[k]) * p);
  }
  return acc;
}

at::Tensor lns_mm_cpu(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                      const at::Tensor& w_offset, const at::Tensor& table, const std::optional<at::Tensor>& bias,
                      int64_t x_bits, int64_t w_bits, int64_t frac_bits, bool fixed, int64_t acc_bits,
                      int64_t acc_lsb) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "lns_mm: x (M, K) and w (N, K) codes");
  TORCH_CHECK(table.scalar_type() == at::kDouble && table.numel() == (int64_t(1) << frac_bits),
              "lns_mm: table must hold 2^frac_bits float64 values");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  const LogRows lx = log_rows(x, x_offset, x_bits), lw = log_rows(w, w_offset, w_bits);
  const auto tab = table.contiguous();
  const double* C = tab.data_ptr<double>();
  const int32_t* gx = lx.g.data_ptr<int32_t>();
  const int32_t* gw = lw.g.data_ptr<int32_t>();
  const double* sx = lx.sign.data_ptr<double>();
  const double* sw = lw.sign.data_ptr<double>();
  const bool* nx = lx.nan.data_ptr<bool>();
  const bool* nw = lw.nan.data_ptr<bool>();
  std::optional<at::Tensor> b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  const float* b = b32 ? b32->data_ptr<float>() : nullptr;
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  const int F = int(frac_bits);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (fixed) {
    TORCH_CHECK(acc_bits >= 8 && acc_bits <= 48, "lns_mm: acc_bits out of range");
    const int64_t T = (int64_t(1) << (acc_bits - 1)) - 1;
    const double bias_clamp = 9223372036854774784.0;  // 2^63 - 1024 (see the reference's Note)
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n) {
          int64_t acc = dot_fixed(gx + m * K, sx + m * K, gw + n * K, sw + n * K, K, C, F, acc_lsb, double(T));
          bool nan_out = nx[m] || nw[n];
          if (b) {
            if (std::isnan(b[n])) {
              nan_out = true;
            } else {
              double bd = std::nearbyint(double(b[n]) * pow2(-acc_lsb));
              bd = bd > bias_clamp ? bias_clamp : (bd < -bias_clamp ? -bias_clamp : bd);
              int64_t sum;
              if (__builtin_add_overflow(acc, int64_t(bd), &sum)) sum = bd > 0 ? T : -T;
              acc = sum;
            }
          }
          acc = acc > T ? T : (acc < -T ? -T : acc);
          y[m * N + n] = nan_out ? nan : float(double(acc) * pow2(acc_lsb));
        }
    });
  } else {
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n) {
          float v = float(dot_float(gx + m * K, sx + m * K, gw + n * K, sw + n * K, K, C, F));
          if (b) v = v + b[n];
          y[m * N + n] = (nx[m] || nw[n]) ? nan : v;
        }
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlns, CPU, m) { m.impl("lns_mm", &lns_mm_cpu); }

}  // namespace torchlns
