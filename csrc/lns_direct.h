// Direct LNS MAC kernels: every product formed from its log sum in vector lanes.
//
// Note: direct kernels
// A product of two LNS codes depends on G = g_x + g_w only (spec section 2). Each operand is
// packed into one int32 field so that one integer add of an x field and a w field yields
// everything the product needs, and a handful of instructions finish it.
//
// float32 accumulator. Fields split the log g = q 2^F + r:
//     x: (q_x + 127) << 23  +  r_x  +  sign_x << 31        w: q_w << 23  +  r_w  +  sign_w << 31
// so their sum holds sign << 31 | (127 + q_x + q_w) << 23 | t with t = r_x + r_w < 2^(F+1):
// the two sign bits add to their XOR in bit 31 (mod 2^32). A product is 2^(q_x+q_w) C_ext[t]
// with C_ext[t] = C[t mod 2^F] 2^(t >> F), whose float32 bits are C_ext[t]'s plus
// (q_x + q_w) << 23 while every product is a normal float32 (the caller checks the exponent
// ranges). One in-register permute indexed by the sum's low bits reads
// E[t] = bits(C_ext[t]) - (127 << 23) - t, and one integer add of the sum itself finishes
// the product: three integer instructions (a two-register permute for 2^(F+1) > 16
// entries on AVX-512). Zero codes carry a flag in bits 16-17, which the sum keeps apart
// from t and the exponent. AVX2 with F = 3 would need two permutes and a blend for the 15
// entries, so there the fields are (g_x + 127 2^F) << (23 - F) + sign << 31 and g_w << (23 - F)
// + sign << 31 instead: r sits just below the exponent (its carry lands in it), and the
// product is (sum & 0xFF800000) | mantissa(C[r]), one shift, one 8-entry permute (the table
// repeats every 2^F) and one and-or.
//
// Fixed accumulator. p = min(floor(L[t] 2^e), T) with L[r] = C[r] 2^P, e = q - Λ - P and
// L_ext[t] = L[t mod 2^F] << (t >> F). Fields split the log again, with the octave negated:
//     x: -q_x << 9  +  r_x  +  sign_x << 5        w: (-q_w + 29 + Λ) << 9  +  r_w  +  sign_w << 5
// so the sum holds a = 29 + Λ - q_x - q_w above bit 9 (an arithmetic shift gets it), t in
// bits 0-4 and sign_x XOR sign_w in bit 5. With L''[t] = L_ext[t] << (29 - P) < 2^31 in the
// table, the magnitude is one variable right shift, L'' >> a = floor(L_ext 2^e): a >= 32
// gives 0 as it must; a = -1 is L'' << 1 (below 2^32, then clamped to T), and a < -1
// saturates to T, cases the exponent ranges usually rule out (then the kernel skips them). A LUT entry that rounds up to
// 2.0 would need L = 2^(P+1); such tables run in the scalar kernel. Zero codes carry a flag
// in bits 7-8. AVX2 with F = 3 again avoids the two-permute table: there the fields hold the
// ones' complement of the whole log, x: ~g_x << 8 and w: (-g_w + (31 + Λ) 2^F) << 8 (sign in
// bit 0, zero flags in bits 2-3), whose sum's octave is a = 30 + Λ - q and whose low F bits
// are 2^F - 1 - r, read from an 8-entry table of L[r] << (30 - P). Products are summed
// exactly in int32 lanes for chunks short enough that no lane can overflow (again from the
// exponent ranges), then in int64: the reference's bits.
//
// Two loop orders share the lanes. "rows": for each output row, the non-zero x fields (a
// compressed list: the zero activations after a ReLU cost nothing) broadcast against
// vectors of weight fields, n along the lanes; for layers with many outputs per group.
// "columns": one weight field broadcast against vectors of x fields, output positions
// along the lanes; for depthwise and other narrow groups. Each output is summed by one lane
// in k order, so the float32 sums are within the spec's bound and independent of threads.
//
// Note: product pairs
// The table kernels above read 2^F (or 2^(F+1)) table entries per product in registers, which
// fits one permute only for F <= 3 (AVX2) or F <= 4 (AVX-512). Wider F would need permute
// trees or gathers, several times the cost. Product pairs need no table at all: an operand
// is packed as two float32s, its head h = ±D[r] 2^q and its tail l = ±(2^(r/2^F) - D[r]) 2^q,
// so that h + l is 2^(g/2^F) to about 48 bits. The product of two operands is then
//     v = fma(h_x, h_w, fma(h_x, l_w, l_x h_w)),
// one rounding of h_x h_w + (h_x l_w + l_x h_w), which lies within about 2^-46 (relative) of
// the real 2^(G/2^F). Rounding to float32 gives the exact conversion's C_ext[t] 2^q unless
// the real value lies within that distance of a rounding boundary; a P-bit LUT's entry is v
// rounded again to P + 1 significant bits (Veltkamp's split: s = v (2^(23-P) + 1),
// v' = s - (s - v)), which double rounding could spoil only as rarely. Neither is left to
// chance: the scaling by 2^q is exact while every step stays a normal float32, so the steps
// are run once per table over every pair of remainders at octave 0 (pair_tables), and a
// table they do not reproduce bit for bit (Mitchell's, a rare unlucky LUT) keeps the other
// kernels. The exponent ranges of the operands are then checked per call so that every
// intermediate is normal (emin is the lowest exponent met at octave 0). The float32
// accumulator adds v; the fixed one folds 2^-Λ into the weights' octave and truncates v
// toward zero (cvtt), which is ±floor(|p|) exactly, after clamping |v| to 2^(W-1) where the
// ranges allow saturation. The cost is a multiply and two FMAs per product, whatever F.
//
// This file is included once per instruction set (see Note: instruction sets in common.h)
// inside a namespace that defines the vector type V; it has no include guard on purpose.

namespace direct {

using Args = ::torchlns::DirectArgs;

// float32 bits of one product, from a field sum (see the Note). kMode 0: split fields, one
// permute; 1: split fields, a two-register permute; 2: shifted fields (AVX2 with F = 3).
template <int kMode>
TORCHLNS_INLINE V::F product_float(V::I s, V::I t0, V::I t1, int F) {
  if (kMode == 2) return V::as_float(V::and_or(s, V::set1(int32_t(0xFF800000u)), V::perm(t0, V::srl(s, 23 - F))));
  return V::as_float(V::add(kMode == 1 ? V::perm2(t0, t1, s) : V::perm(t0, s), s));
}

// The magnitude floor(L 2^e) of one fixed-point product, saturated where asked; kMode as
// for product_float (2: the ones'-complement fields).
template <bool kSaturate, bool kClampT, int kMode>
TORCHLNS_INLINE V::I magnitude_fixed(V::I s, V::I t0, V::I t1, int F, V::I T) {
  const V::I a = kMode == 2 ? V::sra(s, 8 + F) : V::sra(s, 9);
  const V::I L = kMode == 2 ? V::perm(t0, V::srl(s, 8)) : kMode == 1 ? V::perm2(t0, t1, s) : V::perm(t0, s);
  V::I mag = V::srlv(L, a);
  if (kSaturate) {
    if (kMode != 2) {  // L'' spans two octaves: a = -1 may still fit (L'' << 1 < 2^32), below saturates
      const V::I minus_one = V::set1(-1);
      mag = V::where_equal(a, minus_one, V::minu(V::sll(L, 1), T), mag);
      mag = V::where_negative(V::sub(a, minus_one), T, mag);
    } else {
      mag = V::where_negative(a, T, mag);
    }
  }
  if (kClampT) mag = V::minu(mag, T);
  return mag;
}

// The sign bit of a fixed-point field sum: bit 0 in the ones'-complement fields, bit 5 in
// split ones (AVX2's negate_where moves it to bit 31, so it must know which).
template <int kMode>
constexpr int kSignBit = kMode == 2 ? 0 : 5;

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
template <int NV, bool kZeros, bool kSaturate, bool kClampT, int kMode = 0>
TORCHLNS_INLINE int64_t rows_span(const Args& a, const int32_t* pairs, int64_t e, int64_t count, int32_t k_end,
                                  const int32_t* wp, float* accf, int64_t* total) {
  constexpr int W = V::lanes, NB = NV * W;
  const V::I table = V::load(a.table), flags = V::set1(a.zero_flags);
  if (!a.fixed) {
    const V::I table_hi = V::load(a.table + W);
    V::F acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::fload(accf + j * W);
    for (; e < count && pairs[2 * e] < k_end; ++e) {
      const int32_t* wk = wp + int64_t(pairs[2 * e]) * NB;
      const V::I xb = V::set1(pairs[2 * e + 1]);
      for (int j = 0; j < NV; ++j) {
        const V::I s = V::add(xb, V::load(wk + j * W));
        const V::F p = product_float<kMode>(s, table, table_hi, a.F);
        acc[j] = kZeros ? V::fadd_nonzero(acc[j], p, s, flags) : V::fadd(acc[j], p);
      }
    }
    for (int j = 0; j < NV; ++j) V::fstore(accf + j * W, acc[j]);
    return e;
  }
  const V::I T = V::set1(a.T), sign = V::set1(a.sign_mask), table_hi = V::load(a.table + W);
  while (e < count && pairs[2 * e] < k_end) {
    const int64_t stop = std::min(count, e + a.chunk);  // no int32 lane can overflow within
    V::I acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::zero();
    for (; e < stop && pairs[2 * e] < k_end; ++e) {
      const int32_t* wk = wp + int64_t(pairs[2 * e]) * NB;
      const V::I xb = V::set1(pairs[2 * e + 1]);
      for (int j = 0; j < NV; ++j) {
        const V::I s = V::add(xb, V::load(wk + j * W));
        const V::I p = V::template negate_where<kSignBit<kMode>>(magnitude_fixed<kSaturate, kClampT, kMode>(s, table, table_hi, a.F, T), s, sign);
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
template <int NV, bool kSaturate, bool kClampT, int kMode = 0>
TORCHLNS_INLINE void cols_tile(const Args& a, const int32_t* const* xk, int64_t K, const int32_t* w, int count,
                               float* yf, int64_t* yi) {
  constexpr int W = V::lanes, LB = NV * W;
  const V::I table = V::load(a.table), flags = V::set1(a.zero_flags);
  if (!a.fixed) {
    const V::I table_hi = V::load(a.table + W);
    V::F acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::fzero();
    for (int64_t k = 0; k < K; ++k) {
      if (w[k] == a.zero_field) continue;
      const V::I wb = V::set1(w[k]);
      for (int j = 0; j < NV; ++j) {
        const V::I s = V::add(V::loadu(xk[k] + j * W), wb);
        acc[j] = V::fadd_nonzero(acc[j], product_float<kMode>(s, table, table_hi, a.F), s, flags);
      }
    }
    alignas(64) float tmp[LB];
    for (int j = 0; j < NV; ++j) V::fstore(tmp + j * W, acc[j]);
    for (int c = 0; c < count; ++c) yf[c] = tmp[c];
    return;
  }
  const V::I T = V::set1(a.T), sign = V::set1(a.sign_mask), table_hi = V::load(a.table + W);
  alignas(64) int64_t total[LB] = {};
  for (int64_t k0 = 0; k0 < K; k0 += a.chunk) {
    const int64_t k1 = std::min(K, k0 + a.chunk);
    V::I acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::zero();
    for (int64_t k = k0; k < k1; ++k) {
      if (w[k] == a.zero_field) continue;
      const V::I wb = V::set1(w[k]);
      for (int j = 0; j < NV; ++j) {
        const V::I s = V::add(V::loadu(xk[k] + j * W), wb);
        const V::I p = V::template negate_where<kSignBit<kMode>>(magnitude_fixed<kSaturate, kClampT, kMode>(s, table, table_hi, a.F, T), s, sign);
        acc[j] = V::add_nonzero(acc[j], p, s, flags);
      }
    }
    for (int j = 0; j < NV; ++j) V::add_widen(total + j * W, acc[j]);
  }
  for (int c = 0; c < count; ++c) yi[c] = total[c];
}

// Product pairs (see Note: product pairs): the fixed-point product of a pair product v.
template <bool kRound>
TORCHLNS_INLINE V::F pair_round(V::F v, V::F sigma) {
  if (!kRound) return v;
  const V::F s = V::fmul(v, sigma);
  return V::fsub(s, V::fsub(s, v));
}

template <bool kSat, bool kRound>
TORCHLNS_INLINE V::I pair_fixed(V::F v, V::F sigma, V::F bound, V::I T) {
  if (kSat) {  // clamped first, so that rounding cannot overflow
    const V::I mag = V::minu(V::cvtt(pair_round<kRound>(V::fmin(V::fabs(v), bound), sigma)), T);  // 2^31: 0x80000000
    return V::with_sign_of(mag, v);
  }
  return V::cvtt(pair_round<kRound>(v, sigma));
}

TORCHLNS_INLINE V::F pair_product(V::F xh, V::F xl, V::F wh, V::F wl) {
  return V::fmadd(xh, wh, V::fmadd(xh, wl, V::fmul(xl, wh)));
}

// rows with product pairs: entries (k, head, tail); weights [k][head NB | tail NB].
template <int NV, bool kSat, bool kRound>
TORCHLNS_INLINE int64_t rows_span_pair(const Args& a, const int32_t* pairs, int64_t e, int64_t count, int32_t k_end,
                                       const int32_t* wp, float* accf, int64_t* total) {
  constexpr int W = V::lanes, NB = NV * W;
  const float* wf = reinterpret_cast<const float*>(wp);
  const auto bcast = [](int32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return V::fset1(f);
  };
  const V::F sigma = V::fset1(a.sigma), bound = V::fset1(a.sat_bound);
  if (!a.fixed) {
    V::F acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::fload(accf + j * W);
    for (; e < count && pairs[3 * e] < k_end; ++e) {
      const float* wk = wf + int64_t(pairs[3 * e]) * 2 * NB;
      const V::F xh = bcast(pairs[3 * e + 1]), xl = bcast(pairs[3 * e + 2]);
      for (int j = 0; j < NV; ++j)
        acc[j] = V::fadd(acc[j], pair_round<kRound>(pair_product(xh, xl, V::fload(wk + j * W), V::fload(wk + NB + j * W)), sigma));
    }
    for (int j = 0; j < NV; ++j) V::fstore(accf + j * W, acc[j]);
    return e;
  }
  const V::I T = V::set1(a.T);
  while (e < count && pairs[3 * e] < k_end) {
    const int64_t stop = std::min(count, e + a.chunk);  // no int32 lane can overflow within
    V::I acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::zero();
    for (; e < stop && pairs[3 * e] < k_end; ++e) {
      const float* wk = wf + int64_t(pairs[3 * e]) * 2 * NB;
      const V::F xh = bcast(pairs[3 * e + 1]), xl = bcast(pairs[3 * e + 2]);
      for (int j = 0; j < NV; ++j) {
        const V::F v = pair_product(xh, xl, V::fload(wk + j * W), V::fload(wk + NB + j * W));
        acc[j] = V::add(acc[j], pair_fixed<kSat, kRound>(v, sigma, bound, T));
      }
    }
    for (int j = 0; j < NV; ++j) V::add_widen(total + j * W, acc[j]);
  }
  return e;
}

// columns with product pairs: x tails at xk[k] + a tail_delta; w: Kg heads then Kg tails.
template <int NV, bool kSat, bool kRound>
TORCHLNS_INLINE void cols_tile_pair(const Args& a, const int32_t* const* xk, int64_t tail_delta, int64_t K,
                                    const int32_t* w, int count, float* yf, int64_t* yi) {
  constexpr int W = V::lanes, LB = NV * W;
  const float* wf = reinterpret_cast<const float*>(w);
  const V::F sigma = V::fset1(a.sigma), bound = V::fset1(a.sat_bound);
  if (!a.fixed) {
    V::F acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::fzero();
    for (int64_t k = 0; k < K; ++k) {
      if (w[k] == 0) continue;
      const V::F wh = V::fset1(wf[k]), wl = V::fset1(wf[K + k]);
      const float* xh = reinterpret_cast<const float*>(xk[k]);
      for (int j = 0; j < NV; ++j)
        acc[j] = V::fadd(acc[j], pair_round<kRound>(pair_product(V::floadu(xh + j * W), V::floadu(xh + tail_delta + j * W), wh, wl), sigma));
    }
    alignas(64) float tmp[LB];
    for (int j = 0; j < NV; ++j) V::fstore(tmp + j * W, acc[j]);
    for (int c = 0; c < count; ++c) yf[c] = tmp[c];
    return;
  }
  const V::I T = V::set1(a.T);
  alignas(64) int64_t total[LB] = {};
  for (int64_t k0 = 0; k0 < K; k0 += a.chunk) {
    const int64_t k1 = std::min(K, k0 + a.chunk);
    V::I acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = V::zero();
    for (int64_t k = k0; k < k1; ++k) {
      if (w[k] == 0) continue;
      const V::F wh = V::fset1(wf[k]), wl = V::fset1(wf[K + k]);
      const float* xh = reinterpret_cast<const float*>(xk[k]);
      for (int j = 0; j < NV; ++j) {
        const V::F v = pair_product(V::floadu(xh + j * W), V::floadu(xh + tail_delta + j * W), wh, wl);
        acc[j] = V::add(acc[j], pair_fixed<kSat, kRound>(v, sigma, bound, T));
      }
    }
    for (int j = 0; j < NV; ++j) V::add_widen(total + j * W, acc[j]);
  }
  for (int c = 0; c < count; ++c) yi[c] = total[c];
}

}  // namespace direct
