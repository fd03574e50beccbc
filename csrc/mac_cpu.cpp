// CPU kernel of torchlns::lns_mm, the core of lns_linear / lns_conv (spec section 2).
//
// Most calls run in the direct kernels (direct_mac.cpp; see Note: direct kernels in
// lns_direct.h). What they cannot run comes here: the float32 accumulator as 2^F matrix
// products of exactly representable operands (see Note: remainder classes in common.h),
// and otherwise, or for the fixed accumulator, the scalar form, which builds each product
// from its log sum
// G = g_x + g_w with the table C[r] (float64, exact; see Note: reference MAC arithmetic in
// torchlns/ops/reference.py); 2^q comes from its bit pattern, so C[r] * 2^q is an exact double.
//
// Determinism: every output is summed by one thread in a fixed order (direct form: LANES
// interleaved partial sums over k, then the lanes in order; class form: fixed row blocks),
// so the bits never depend on the thread count. The fixed accumulator is exact, so it
// matches the reference bit for bit; float32 results stay within the spec's bound.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <climits>
#include <cmath>
#include <limits>
#include <utility>

#include "common.h"

namespace torchlns {

// The log fields of a (rows, K) matrix of codes, with offsets broadcast against it (read
// through their strides, so a per-tensor or per-channel offset is never expanded).
LogFields log_fields(const at::Tensor& codes, const at::Tensor& offset, int64_t bits, int frac_bits) {
  const int64_t rows = codes.size(0), K = codes.size(1);
  const int32_t e_max = (1 << (bits - 1)) - 1, mask = (1 << bits) - 1;
  auto c32 = codes.to(at::kInt).contiguous();
  const auto off = offset.expand({rows, K});  // broadcast offsets are read through strides
  const int64_t so_r = off.stride(0), so_k = off.stride(1);
  LogFields out{at::empty({rows, K}, codes.options().dtype(at::kInt)),
                at::empty({rows, K}, codes.options().dtype(at::kFloat)),
                at::empty({rows, K}, codes.options().dtype(at::kBool))};
  const int32_t* c = c32.data_ptr<int32_t>();
  const int32_t* o = off.data_ptr<int32_t>();
  int32_t* g = out.g.data_ptr<int32_t>();
  float* s = out.sign.data_ptr<float>();
  bool* nan = out.nan.data_ptr<bool>();
  std::vector<int64_t> lo(rows, INT64_MAX), hi(rows, INT64_MIN);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      int32_t q_lo = INT32_MAX, q_hi = INT32_MIN;
      for (int64_t k = 0; k < K; ++k) {
        const auto [mag, neg] = code_fields(c[r * K + k], e_max, mask);
        const int32_t gk = mag == 0 ? 0 : mag + o[r * so_r + k * so_k];
        nan[r * K + k] = (mag == 0) & neg;
        g[r * K + k] = gk;
        s[r * K + k] = mag == 0 ? 0.0f : (neg ? -1.0f : 1.0f);
        q_lo = mag == 0 ? q_lo : std::min(q_lo, gk >> frac_bits);
        q_hi = mag == 0 ? q_hi : std::max(q_hi, gk >> frac_bits);
      }
      lo[r] = q_lo;
      hi[r] = q_hi;
    }
  });
  const int64_t all_lo = rows ? *std::min_element(lo.begin(), lo.end()) : INT32_MAX;
  const int64_t all_hi = rows ? *std::max_element(hi.begin(), hi.end()) : INT32_MIN;
  out.q_lo = all_lo > all_hi ? 0 : all_lo;  // no nonzero code at all: any range will do
  out.q_hi = all_lo > all_hi ? 0 : all_hi;
  return out;
}

std::vector<float> extended_table(const double* C, int frac_bits) {
  const int R = 1 << frac_bits;
  std::vector<float> C_ext(2 * R);
  for (int t = 0; t < 2 * R; ++t) C_ext[t] = float(t < R ? C[t] : 2.0 * C[t - R]);
  return C_ext;
}

namespace {

constexpr int LANES = 8;

// One output of the float32 accumulator: sum of exact products, LANES-interleaved.
TORCHLNS_INLINE double dot_float_impl(const int32_t* gx, const float* sx, const int32_t* gw, const float* sw,
                                      int64_t K, const double* table, int frac_bits) {
  double acc[LANES] = {0};
  const int32_t r_mask = (1 << frac_bits) - 1;
  int64_t k = 0;
  for (; k + LANES <= K; k += LANES)
    for (int l = 0; l < LANES; ++l) {
      const int32_t G = gx[k + l] + gw[k + l];
      acc[l] += double(sx[k + l] * sw[k + l]) * (table[G & r_mask] * pow2(G >> frac_bits));
    }
  for (int l = 0; k < K; ++k, ++l) {
    const int32_t G = gx[k] + gw[k];
    acc[l] += double(sx[k] * sw[k]) * (table[G & r_mask] * pow2(G >> frac_bits));
  }
  double total = 0.0;
  for (int l = 0; l < LANES; ++l) total += acc[l];
  return total;
}
TORCHLNS_ISA_CLONES(double, dot_float,
                    (const int32_t* gx, const float* sx, const int32_t* gw, const float* sw, int64_t K,
                     const double* table, int frac_bits),
                    (gx, sx, gw, sw, K, table, frac_bits))

// One output of the fixed accumulator: exact int64 sum of truncated, saturated products.
TORCHLNS_INLINE int64_t dot_fixed_impl(const int32_t* gx, const float* sx, const int32_t* gw, const float* sw,
                                       int64_t K, const double* table, int frac_bits, int64_t acc_lsb, double T) {
  int64_t acc = 0;
  const int32_t r_mask = (1 << frac_bits) - 1;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t G = gx[k] + gw[k];
    // The magnitude is >= 0, so clamping to T (an integer) first and then truncating to int64
    // is exactly min(floor(v), T), and the conversion cannot overflow. GCC vectorizes this
    // form; it does not vectorize std::floor (which may raise FE_INEXACT) or a ?: clamp.
    const double v = std::min(table[G & r_mask] * pow2(int64_t(G >> frac_bits) - acc_lsb), T);
    acc += int64_t(sx[k] * sw[k]) * int64_t(v);
  }
  return acc;
}
TORCHLNS_ISA_CLONES(int64_t, dot_fixed,
                    (const int32_t* gx, const float* sx, const int32_t* gw, const float* sw, int64_t K,
                     const double* table, int frac_bits, int64_t acc_lsb, double T),
                    (gx, sx, gw, sw, K, table, frac_bits, acc_lsb, T))

// The products of k0 <= k < k1 at W1 bits, summed exactly (see Note: overflow and chunks in
// torchlns/ops/reference.py): each magnitude floor(C[r] 2^(q-Λ)) is saturated to 2^(W1-1) - 1
// and signed, or (wrap) signed and reduced modulo 2^W1, its residue taken exactly from the
// double (fmod). The caller keeps the run short enough for an exact int64 sum.
TORCHLNS_INLINE int64_t products_impl(const int32_t* gx, const float* sx, const int32_t* gw, const float* sw,
                                      int64_t k0, int64_t k1, const double* table, int frac_bits, int64_t acc_lsb,
                                      int W1, bool wrap) {
  const int32_t r_mask = (1 << frac_bits) - 1;
  const double T1 = double((int64_t(1) << (W1 - 1)) - 1), modulus = pow2(W1);
  int64_t sum = 0;
  if (wrap) {
    for (int64_t k = k0; k < k1; ++k) {
      const int32_t G = gx[k] + gw[k];
      const double v = std::floor(table[G & r_mask] * pow2(int64_t(G >> frac_bits) - acc_lsb));
      // Below 2^63 the integer itself is exact and its low bits are the residue; fmod only beyond.
      const int64_t mag = v < 0x1p63 ? int64_t(v) : int64_t(std::fmod(v, modulus));
      sum += wrap_to(int64_t(sx[k] * sw[k]) * mag, W1);
    }
  } else {
    for (int64_t k = k0; k < k1; ++k) {
      const int32_t G = gx[k] + gw[k];
      const double v = std::min(table[G & r_mask] * pow2(int64_t(G >> frac_bits) - acc_lsb), T1);
      sum += int64_t(sx[k] * sw[k]) * int64_t(v);
    }
  }
  return sum;
}
TORCHLNS_ISA_CLONES(int64_t, products,
                    (const int32_t* gx, const float* sx, const int32_t* gw, const float* sw, int64_t k0, int64_t k1,
                     const double* table, int frac_bits, int64_t acc_lsb, int W1, bool wrap),
                    (gx, sx, gw, sw, k0, k1, table, frac_bits, acc_lsb, W1, wrap))

// One output of a two-stage MAC before its bias: the W-bit products summed, or chunks of L of
// W1-bit products, each chunk sum saturated or wrapped to W1 bits, then summed.
int64_t dot_two_stage(const int32_t* gx, const float* sx, const int32_t* gw, const float* sw, int64_t K,
                      const double* table, int frac_bits, int64_t acc_lsb, int acc_bits, bool wrap, int64_t L,
                      int W1, TelemetryCounts* tally) {
  if (!L) return products(gx, sx, gw, sw, 0, K, table, frac_bits, acc_lsb, acc_bits, wrap);
  const int64_t T1 = (int64_t(1) << (W1 - 1)) - 1;
  int64_t total = 0;
  for (int64_t k0 = 0; k0 < K; k0 += L) {
    const int64_t c = products(gx, sx, gw, sw, k0, std::min(K, k0 + L), table, frac_bits, acc_lsb, W1, wrap);
    if (tally) tally->record(c, T1, wrap, true);
    total += wrap ? wrap_to(c, W1) : std::clamp(c, -T1, T1);
  }
  return total;
}

#ifdef TORCHLNS_X86_INTRINSICS
// dot_fixed with explicit AVX-512 for frac_bits <= 4: the 2^F-entry table lives in one or two
// registers and is read with a permute, where the compiled loop above reads it with eight
// scalar loads per vector; the sign is applied with masks instead of a 64-bit multiply. Same
// exact products (C[r] * 2^(q-Λ) as a double, clamped to T, truncated) and an exact int64
// sum, so the bits are those of dot_fixed. Chosen at run time by active_isa().
#define TORCHLNS_HAVE_AVX512_FIXED 1
TORCHLNS_AVX512 int64_t dot_fixed_avx512_intrin(
    const int32_t* gx, const float* sx, const int32_t* gw, const float* sw, int64_t K, const double* table,
    int frac_bits, int64_t acc_lsb, double T) {
  double padded[16];
  for (int i = 0; i < 16; ++i) padded[i] = table[i & ((1 << frac_bits) - 1)];
  const __m512d t0 = _mm512_loadu_pd(padded), t1 = _mm512_loadu_pd(padded + 8);
  const __m512i r_mask = _mm512_set1_epi64((1 << frac_bits) - 1);
  const __m512i bias = _mm512_set1_epi64(1023 - acc_lsb);
  const __m512d tmax = _mm512_set1_pd(T);
  const __m128i shift = _mm_cvtsi32_si128(frac_bits);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 8) {
    const __mmask8 live = K - k >= 8 ? __mmask8(0xFF) : __mmask8((1u << (K - k)) - 1);
    const __m256i g = _mm256_add_epi32(_mm256_maskz_loadu_epi32(live, gx + k), _mm256_maskz_loadu_epi32(live, gw + k));
    const __m512i G = _mm512_cvtepi32_epi64(g);
    const __m512d c = _mm512_permutex2var_pd(t0, _mm512_and_si512(G, r_mask), t1);
    const __m512i e = _mm512_add_epi64(_mm512_sra_epi64(G, shift), bias);  // q - Λ + 1023
    const __m512d v = _mm512_min_pd(_mm512_mul_pd(c, _mm512_castsi512_pd(_mm512_slli_epi64(e, 52))), tmax);
    __m512i p = _mm512_cvttpd_epi64(v);
    const __m256 s = _mm256_mul_ps(_mm256_maskz_loadu_ps(live, sx + k), _mm256_maskz_loadu_ps(live, sw + k));
    const __mmask8 neg = _mm256_cmp_ps_mask(s, _mm256_setzero_ps(), _CMP_LT_OQ);
    const __mmask8 nonzero = _mm256_cmp_ps_mask(s, _mm256_setzero_ps(), _CMP_NEQ_OQ) & live;
    p = _mm512_mask_sub_epi64(p, neg, _mm512_setzero_si512(), p);
    acc = _mm512_mask_add_epi64(acc, nonzero, acc, p);
  }
  return _mm512_reduce_add_epi64(acc);
}
#endif

int64_t dot_fixed_dispatch(const int32_t* gx, const float* sx, const int32_t* gw, const float* sw, int64_t K,
                           const double* table, int frac_bits, int64_t acc_lsb, double T) {
#ifdef TORCHLNS_HAVE_AVX512_FIXED
  if (active_isa() == Isa::avx512 && frac_bits <= 4) return dot_fixed_avx512_intrin(gx, sx, gw, sw, K, table, frac_bits, acc_lsb, T);
#endif
  return dot_fixed(gx, sx, gw, sw, K, table, frac_bits, acc_lsb, T);
}

// float32 accumulator, remainder-class form (see Note: remainder classes in common.h). For
// the same bits at any thread count, rows go in fixed blocks, each summed by one thread
// with single-threaded GEMMs in a fixed class order.
// Rows per block: a function of M only (never of the thread count), large enough for
// efficient GEMMs and small enough to give both cores work.
inline int64_t class_block_rows(int64_t M) { return std::clamp<int64_t>((M + 7) / 8, 64, 1024); }

TORCHLNS_INLINE void fill_class_plane_impl(float* __restrict plane, const int32_t* __restrict g,
                                           const float* __restrict sign, int64_t n, int cls, int frac_bits) {
  const int32_t mask = (1 << frac_bits) - 1;
  for (int64_t e = 0; e < n; ++e)
    plane[e] = (g[e] & mask) == cls ? pow2f_signed(g[e] >> frac_bits, sign[e]) : 0.0f;
}
TORCHLNS_ISA_CLONES(void, fill_class_plane,
                    (float* __restrict plane, const int32_t* __restrict g, const float* __restrict sign, int64_t n,
                     int cls, int frac_bits),
                    (plane, g, sign, n, cls, frac_bits))

at::Tensor lns_mm_float_classes(const LogFields& lx, const LogFields& lw, const double* C, int frac_bits) {
  const int64_t M = lx.g.size(0), K = lx.g.size(1), N = lw.g.size(0);
  const int R = 1 << frac_bits;
  const auto f32 = lx.g.options().dtype(at::kFloat);
  const std::vector<float> C_ext = extended_table(C, frac_bits);
  // V[i] is (N, K), written contiguously; the GEMMs take its transpose.
  auto V = at::empty({R, N, K}, f32);
  {
    float* v = V.data_ptr<float>();
    const int32_t* g = lw.g.data_ptr<int32_t>();
    const float* sg = lw.sign.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = 0; k < K; ++k) {
          const int32_t gv = g[n * K + k];
          const float base = pow2f_signed(gv >> frac_bits, sg[n * K + k]);
          const int32_t r = gv & (R - 1);
          for (int i = 0; i < R; ++i) v[(int64_t(i) * N + n) * K + k] = base * C_ext[i + r];
        }
    });
  }
  auto out = at::empty({M, N}, f32);
  const int64_t block_rows = class_block_rows(M), blocks = (M + block_rows - 1) / block_rows;
  const int32_t* gx = lx.g.data_ptr<int32_t>();
  const float* sx = lx.sign.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block_rows, rows = std::min(block_rows, M - r0);
      // A_i: x's entries whose remainder is i, zero elsewhere. One sequential pass per plane
      // (no separate zero fill: the planes are (2^F - 1)/2^F zeros).
      auto A = at::empty({R, rows, K}, f32);
      float* a = A.data_ptr<float>();
      const int32_t* gb = gx + r0 * K;
      const float* sb = sx + r0 * K;
      for (int i = 0; i < R; ++i) fill_class_plane(a + int64_t(i) * rows * K, gb, sb, rows * K, i, frac_bits);
      auto acc = out.narrow(0, r0, rows);
      for (int i = 0; i < R; ++i) {
        if (i == 0)
          at::mm_out(acc, A[i], V[i].t());
        else
          acc.addmm_(A[i], V[i].t());
      }
    }
  });
  return out;
}

}  // namespace

at::Tensor lns_mm_cpu(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                      const at::Tensor& w_offset, const at::Tensor& table, const std::optional<at::Tensor>& bias,
                      int64_t x_bits, int64_t w_bits, int64_t frac_bits, bool fixed, int64_t acc_bits,
                      int64_t acc_lsb, c10::string_view overflow, int64_t chunk, int64_t chunk_bits) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "lns_mm: x (M, K) and w (N, K) codes");
  TORCH_CHECK(overflow == "saturate" || overflow == "wrap", "lns_mm: overflow must be 'saturate' or 'wrap'");
  const bool wrap = overflow == "wrap", two_stage = fixed && (wrap || chunk > 0);
  TORCH_CHECK(chunk >= 0 && (chunk_bits == 0 || (chunk_bits >= 8 && chunk_bits <= 48)), "lns_mm: bad chunk arguments");
  TORCH_CHECK(table.scalar_type() == at::kDouble && table.numel() == (int64_t(1) << frac_bits),
              "lns_mm: table must hold 2^frac_bits float64 values");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  const MacPath path = mac_path();  // see try_direct in common.h
  if (try_direct(path) && !two_stage)
    if (auto y = lns_mm_direct(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb))
      return *y;
  const LogFields lx = log_fields(x, x_offset, x_bits, int(frac_bits)), lw = log_fields(w, w_offset, w_bits, int(frac_bits));
  const auto tab = table.contiguous();
  const double* C = tab.data_ptr<double>();
  const int32_t* gx = lx.g.data_ptr<int32_t>();
  const int32_t* gw = lw.g.data_ptr<int32_t>();
  const float* sx = lx.sign.data_ptr<float>();
  const float* sw = lw.sign.data_ptr<float>();
  const auto nan_rows_x = lx.nan.any(1), nan_rows_w = lw.nan.any(1);  // NaN dominates its dot products
  const bool* nx = nan_rows_x.data_ptr<bool>();
  const bool* nw = nan_rows_w.data_ptr<bool>();
  std::optional<at::Tensor> b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  const float* b = b32 ? b32->data_ptr<float>() : nullptr;
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  const int F = int(frac_bits);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (two_stage) {  // see Note: two-stage MACs in torchlns/functional.py
    TORCH_CHECK(acc_bits >= 8 && acc_bits <= 48, "lns_mm: acc_bits out of range");
    const int W = int(acc_bits), W1 = int(chunk ? (chunk_bits ? chunk_bits : acc_bits) : acc_bits);
    const int64_t T = (int64_t(1) << (W - 1)) - 1;
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      Tally tally;
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n) {
          const bool nan_out = nx[m] || nw[n];
          const int64_t acc = dot_two_stage(gx + m * K, sx + m * K, gw + n * K, sw + n * K, K, C, F, acc_lsb, W, wrap,
                                            chunk, W1, tally.get());
          y[m * N + n] = wrap ? fixed_epilogue_wrap(acc, b ? b + n : nullptr, W, acc_lsb, nan_out, tally)
                              : fixed_epilogue(acc, b ? b + n : nullptr, T, acc_lsb, nan_out, tally);
        }
    });
  } else if (fixed) {
    TORCH_CHECK(acc_bits >= 8 && acc_bits <= 48, "lns_mm: acc_bits out of range");
    const int64_t T = (int64_t(1) << (acc_bits - 1)) - 1;
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      Tally tally;
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n) {
          const int64_t acc = dot_fixed_dispatch(gx + m * K, sx + m * K, gw + n * K, sw + n * K, K, C, F, acc_lsb,
                                                 double(T));
          y[m * N + n] = fixed_epilogue(acc, b ? b + n : nullptr, T, acc_lsb, nx[m] || nw[n], tally);
        }
    });
  } else if (try_classes(path, frac_bits) && M && N && K && class_terms_in_range(lx, lw)) {  // Note: remainder classes
    const auto sums = lns_mm_float_classes(lx, lw, C, F);
    const float* s = sums.data_ptr<float>();
    at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = 0; n < N; ++n) {
          float v = s[m * N + n];
          if (b) v = v + b[n];
          y[m * N + n] = (nx[m] || nw[n]) ? nan : v;
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

TORCH_LIBRARY_IMPL(torchlns, CPU, m) { m.impl("lns_mm", &lns_mm_cpu); }

}  // namespace torchlns
