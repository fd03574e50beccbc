// Direct LNS MAC kernels: every product formed from its log sum in vector lanes.
//
// Note: direct kernels
// A product of two LNS codes depends on G = g_x + g_w only (spec section 2). Each operand is
// packed into one int32 field so that one integer add of an x field and a w field yields
// everything the product needs, and a handful of instructions finish it.
//
// float32 accumulator (SHIFT = 23 - F). Fields are
//     x: (g_x + 127 2^F) << SHIFT  +  sign_x << 31        w: g_w << SHIFT  +  sign_w << 31
// so their sum is sign << 31 | (127 + q) << 23 | r << SHIFT with q = G >> F and r = G mod
// 2^F: the carry out of r_x + r_w lands in the exponent, the two sign bits add to their
// XOR in bit 31 (mod 2^32), and while every product is a normal float32 (checked by the
// caller from the exponent ranges) the exponent field is exact. The product's float bits
// are then (sum & 0xFF800000) | mantissa(C[r]): one in-register permute reads the mantissa
// (F <= 4: 16 entries, repeated every 2^F so that the exponent bits in the index do not
// matter) and one ternary-logic instruction merges it (two on AVX2).
//
// Fixed accumulator (SHIFT = 8). p = min(floor(L[r] 2^e), T) with L[r] = C[r] 2^P and
// e = q - Λ - P. Fields hold the ones' complement of the log,
//     x: ~g_x << 8  +  flags        w: (-g_w + (31 + Λ) 2^F) << 8  +  flags
// so the sum holds ~G + (31 + Λ) 2^F, whose octave (an arithmetic shift) is directly
// a = 30 - P - e, and whose low F bits are 2^F - 1 - r. With L'[r] = L[r] << (30 - P) < 2^31
// the product magnitude is one variable right shift, L' >> a = floor(L 2^e): a >= 32 gives
// 0 as it must, and a < 0 (e > 30 - P, L 2^e >= 2^31 > T) saturates to T, a case the
// exponent ranges usually rule out (then the kernel skips the test). A LUT entry that
// rounds up to 2.0 would need L = 2^(P+1); such tables run in the scalar kernel. Flags:
// bit 0 of the sum is sign_x XOR sign_w, bits 2-3 are non-zero when an operand is the zero
// code. Products are summed exactly in int32 lanes for chunks short enough that no lane
// can overflow (again from the exponent ranges), then in int64: the reference's bits.
//
// Two loop orders share the lanes. "rows": for each output row, the non-zero x fields (a
// compressed list: the zero activations after a ReLU cost nothing) broadcast against
// vectors of weight fields, n along the lanes; for layers with many outputs per group.
// "columns": one weight field broadcast against vectors of x fields, output positions
// along the lanes; for depthwise and other narrow groups. Each output is summed by one lane
// in k order, so the float32 sums are within the spec's bound and independent of threads.
//
// This file is included once per instruction set (see Note: instruction sets in common.h)
// inside a namespace that defines the vector type V; it has no include guard on purpose.

namespace direct {

using Args = ::torchlns::DirectArgs;

// float32 bits of one product, from a field sum (see the Note).
TORCHLNS_INLINE V::F product_float(V::I s, V::I mantissas, V::I exp_mask, int shift) {
  return V::as_float(V::and_or(s, exp_mask, V::perm16(mantissas, V::srl(s, shift))));
}

// The magnitude floor(L 2^e) of one fixed-point product, saturated where asked.
template <bool kSaturate, bool kClampT>
TORCHLNS_INLINE V::I magnitude_fixed(V::I s, V::I table, int F, V::I T) {
  const V::I a = V::sra(s, 8 + F);
  V::I mag = V::srlv(V::perm16(table, V::srl(s, 8)), a);
  if (kSaturate) mag = V::where_negative(a, T, mag);
  if (kClampT) mag = V::minu(mag, T);
  return mag;
}

// Accumulators of one tile: NV vectors of float32 sums or int32 partial sums.
template <int NV>
struct Acc {
  V::F f[NV];
  V::I i[NV];
};

// rows: for one output row, its (k, field) pairs from pairs[2 * e] with k < k_end, against a
// block of NV vectors of weight fields (wp: [k][NV * lanes]); the sums so far are in accf
// (float32) or total (int64), NV * lanes of them. Returns the cursor after the span. The
// caller walks K in short spans so that the weight rows they touch stay in L1 while every
// row of its chunk passes over them.
template <int NV, bool kZeros, bool kSaturate, bool kClampT>
TORCHLNS_INLINE int64_t rows_span(const Args& a, const int32_t* pairs, int64_t e, int64_t count, int32_t k_end,
                                  const int32_t* wp, float* accf, int64_t* total) {
  constexpr int W = V::lanes, NB = NV * W;
  const V::I table = V::load(a.table), flags = V::set1(12);
  if (!a.fixed) {
    const V::I exp_mask = V::set1(int32_t(0xFF800000u));
    const int shift = 23 - a.F;
    V::F acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::fload(accf + j * W);
    for (; e < count && pairs[2 * e] < k_end; ++e) {
      const int32_t* wk = wp + int64_t(pairs[2 * e]) * NB;
      const V::I xb = V::set1(pairs[2 * e + 1]);
      for (int j = 0; j < NV; ++j) {
        const V::I s = V::add(xb, V::load(wk + j * W));
        const V::F p = product_float(s, table, exp_mask, shift);
        acc[j] = kZeros ? V::fadd_nonzero(acc[j], p, s, flags) : V::fadd(acc[j], p);
      }
    }
    for (int j = 0; j < NV; ++j) V::fstore(accf + j * W, acc[j]);
    return e;
  }
  const V::I T = V::set1(a.T), one = V::set1(1);
  while (e < count && pairs[2 * e] < k_end) {
    const int64_t stop = std::min(count, e + a.chunk);  // no int32 lane can overflow within
    V::I acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::zero();
    for (; e < stop && pairs[2 * e] < k_end; ++e) {
      const int32_t* wk = wp + int64_t(pairs[2 * e]) * NB;
      const V::I xb = V::set1(pairs[2 * e + 1]);
      for (int j = 0; j < NV; ++j) {
        const V::I s = V::add(xb, V::load(wk + j * W));
        const V::I p = V::negate_where(magnitude_fixed<kSaturate, kClampT>(s, table, a.F, T), s, one);
        acc[j] = kZeros ? V::add_nonzero(acc[j], p, s, flags) : V::add(acc[j], p);
      }
    }
    for (int j = 0; j < NV; ++j) V::add_widen(total + j * W, acc[j]);
  }
  return e;
}

// columns: one weight row (n) against NV vectors of x fields along the output positions
// (xk[k]: where the x fields of reduction index k start for this run of positions); zero x
// lanes are masked, zero weights skipped.
template <int NV, bool kSaturate, bool kClampT>
TORCHLNS_INLINE void cols_tile(const Args& a, const int32_t* const* xk, int64_t K, const int32_t* w, int count,
                               float* yf, int64_t* yi) {
  constexpr int W = V::lanes, LB = NV * W;
  const V::I table = V::load(a.table), flags = V::set1(12);
  if (!a.fixed) {
    const V::I exp_mask = V::set1(int32_t(0xFF800000u));
    const int shift = 23 - a.F;
    V::F acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::fzero();
    for (int64_t k = 0; k < K; ++k) {
      if (w[k] == ::torchlns::kZeroField) continue;
      const V::I wb = V::set1(w[k]);
      for (int j = 0; j < NV; ++j) {
        const V::I s = V::add(V::loadu(xk[k] + j * W), wb);
        acc[j] = V::fadd_nonzero(acc[j], product_float(s, table, exp_mask, shift), s, flags);
      }
    }
    alignas(64) float tmp[LB];
    for (int j = 0; j < NV; ++j) V::fstore(tmp + j * W, acc[j]);
    for (int c = 0; c < count; ++c) yf[c] = tmp[c];
    return;
  }
  const V::I T = V::set1(a.T), one = V::set1(1);
  alignas(64) int64_t total[LB] = {};
  for (int64_t k0 = 0; k0 < K; k0 += a.chunk) {
    const int64_t k1 = std::min(K, k0 + a.chunk);
    V::I acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::zero();
    for (int64_t k = k0; k < k1; ++k) {
      if (w[k] == ::torchlns::kZeroField) continue;
      const V::I wb = V::set1(w[k]);
      for (int j = 0; j < NV; ++j) {
        const V::I s = V::add(V::loadu(xk[k] + j * W), wb);
        const V::I p = V::negate_where(magnitude_fixed<kSaturate, kClampT>(s, table, a.F, T), s, one);
        acc[j] = V::add_nonzero(acc[j], p, s, flags);
      }
    }
    for (int j = 0; j < NV; ++j) V::add_widen(total + j * W, acc[j]);
  }
  for (int c = 0; c < count; ++c) yi[c] = total[c];
}

}  // namespace direct
