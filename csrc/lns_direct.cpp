// The direct LNS MAC kernels (see Note: direct kernels in lns_direct.h): field packing,
// the AVX-512 and AVX2 builds of the kernels, and their parallel drivers.

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

#include "common.h"
#include "direct.h"

namespace torchlns {

// ---------------------------------------------------------------------------------------
// Tables and limits
// ---------------------------------------------------------------------------------------
DirectTables direct_tables(const double* C, int frac_bits, bool fixed) {
  DirectTables t;
  const int R = 1 << frac_bits;
  if (frac_bits > 4) return t;
  if (!fixed) {  // mantissas of C[r] in [1, 2) (see Note: direct kernels)
    for (int r = 0; r < R; ++r)
      if (!(C[r] >= 1.0 && C[r] < 2.0) || double(float(C[r])) != C[r]) return t;
    for (int i = 0; i < 16; ++i) t.table[i] = int32_t(float_bits(float(C[i % R])) & kMantMask);
    t.ok = true;
    return t;
  }
  // The smallest P for which every C[r] 2^P is an integer: 23 for the exact table (float32
  // values in [1, 2)), lut_bits for a LUT, F for Mitchell's 1 + r/2^F.
  for (int P = 0; P <= 23; ++P) {
    bool integral = true;
    int64_t L_max = 0;
    for (int r = 0; r < R; ++r) {
      const double v = std::ldexp(C[r], P);
      integral &= v == std::floor(v);
      L_max = std::max<int64_t>(L_max, int64_t(v));
    }
    if (!integral) continue;
    if (L_max >= (int64_t(1) << (P + 1))) return t;  // an entry of 2.0 (see Note: direct kernels)
    // L'[r] = L[r] << (30 - P), indexed by 2^F - 1 - r (the ones' complement's low bits).
    for (int i = 0; i < 16; ++i) t.table[i] = int32_t(int64_t(std::ldexp(C[R - 1 - i % R], P)) << (30 - P));
    t.P = P;
    t.L_max = L_max;
    t.ok = true;
    return t;
  }
  return t;
}

// ---------------------------------------------------------------------------------------
// Field packing
// ---------------------------------------------------------------------------------------
// field = (uint32(negate ? -g : g) + add) << shift  +  sign << sign_bit; kZeroField for the
// zero and NaN codes (see Note: direct kernels). All arithmetic is mod 2^32.
TORCHLNS_INLINE void pack_fields_impl(const int32_t* __restrict code, const int32_t* __restrict off, bool off_scalar,
                                      int64_t n, int32_t e_max, int32_t code_mask, bool negate, uint32_t add, int shift,
                                      int sign_bit, int32_t* __restrict out, uint8_t* __restrict nan) {
  const int32_t o0 = off[0];
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = code[i] & code_mask;
    const int32_t mag = c & e_max;
    const uint32_t neg = c > e_max;
    const uint32_t g = uint32_t(mag + (off_scalar ? o0 : off[i]));
    const uint32_t f = (((negate ? 0u - g : g) + add) << shift) + (neg << sign_bit);
    out[i] = mag == 0 ? kZeroField : int32_t(f);
    nan[i] = (mag == 0) & (neg != 0);
  }
}
TORCHLNS_ISA_CLONES(void, pack_fields,
                    (const int32_t* __restrict code, const int32_t* __restrict off, bool off_scalar, int64_t n,
                     int32_t e_max, int32_t code_mask, bool negate, uint32_t add, int shift, int sign_bit,
                     int32_t* __restrict out, uint8_t* __restrict nan),
                    (code, off, off_scalar, n, e_max, code_mask, negate, add, shift, sign_bit, out, nan))

PackedFields packed_fields(const at::Tensor& codes, const at::Tensor& offset, int64_t bits, int frac_bits,
                           const FieldLayout& layout) {
  const auto c32 = codes.to(at::kInt).contiguous();
  const bool scalar = offset.numel() == 1;
  const auto off = scalar ? offset.reshape({1}).contiguous() : offset.expand(codes.sizes()).contiguous();
  PackedFields p{at::empty(codes.sizes(), c32.options()), at::empty(codes.sizes(), c32.options().dtype(at::kByte)), 0, 0,
                 false};
  const int64_t n = codes.numel();
  const int32_t e_max = (1 << (bits - 1)) - 1, mask = (1 << bits) - 1;
  const int32_t* cp = c32.data_ptr<int32_t>();
  const int32_t* op = off.data_ptr<int32_t>();
  int32_t* fp = p.fields.data_ptr<int32_t>();
  uint8_t* np = p.nan.data_ptr<uint8_t>();
  const int64_t grain = 1 << 15, chunks = std::max<int64_t>(1, (n + grain - 1) / grain);
  std::vector<int32_t> lo(chunks, INT32_MAX), hi(chunks, INT32_MIN);
  std::vector<uint8_t> any_nan(chunks, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ci = c0; ci < c1; ++ci) {
      const int64_t a = ci * grain, b = std::min(n, a + grain);
      if (a >= b) continue;
      pack_fields(cp + a, scalar ? op : op + a, scalar, b - a, e_max, mask, layout.negate, layout.add, layout.shift,
                  layout.sign_bit, fp + a, np + a);
      int32_t l = INT32_MAX, h = INT32_MIN;
      uint8_t nn = 0;
      for (int64_t i = a; i < b; ++i) {
        const int32_t mag = cp[i] & e_max;
        const int32_t q = (mag + (scalar ? op[0] : op[i])) >> frac_bits;  // octave of the log
        l = mag ? std::min(l, q) : l;
        h = mag ? std::max(h, q) : h;
        nn |= np[i];
      }
      lo[ci] = l;
      hi[ci] = h;
      any_nan[ci] = nn;
    }
  });
  const int32_t l = *std::min_element(lo.begin(), lo.end()), h = *std::max_element(hi.begin(), hi.end());
  p.q_lo = l > h ? 0 : l;
  p.q_hi = l > h ? 0 : h;
  p.any_nan = *std::max_element(any_nan.begin(), any_nan.end()) != 0;
  return p;
}

// ---------------------------------------------------------------------------------------
// The kernels, once per ISA
// ---------------------------------------------------------------------------------------
#ifdef TORCHLNS_X86_INTRINSICS

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace isa_avx512 {
struct V {
  static constexpr int lanes = 16;
  using I = __m512i;
  using F = __m512;
  static TORCHLNS_INLINE I load(const int32_t* p) { return _mm512_load_si512(p); }
  static TORCHLNS_INLINE I loadu(const int32_t* p) { return _mm512_loadu_si512(p); }
  static TORCHLNS_INLINE void store(int32_t* p, I v) { _mm512_store_si512(p, v); }
  static TORCHLNS_INLINE void fstore(float* p, F v) { _mm512_store_ps(p, v); }
  static TORCHLNS_INLINE I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static TORCHLNS_INLINE I zero() { return _mm512_setzero_si512(); }
  static TORCHLNS_INLINE F fzero() { return _mm512_setzero_ps(); }
  static TORCHLNS_INLINE I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static TORCHLNS_INLINE I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static TORCHLNS_INLINE I neg(I a) { return _mm512_sub_epi32(_mm512_setzero_si512(), a); }
  static TORCHLNS_INLINE I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static TORCHLNS_INLINE I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static TORCHLNS_INLINE I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static TORCHLNS_INLINE I srl(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sra(I a, int n) { return _mm512_sra_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sll(I a, int n) { return _mm512_sll_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sllv(I a, I n) { return _mm512_sllv_epi32(a, n); }
  static TORCHLNS_INLINE I srlv(I a, I n) { return _mm512_srlv_epi32(a, n); }
  static TORCHLNS_INLINE I min_(I a, I b) { return _mm512_min_epi32(a, b); }
  static TORCHLNS_INLINE I minu(I a, I b) { return _mm512_min_epu32(a, b); }
  static TORCHLNS_INLINE I perm16(I table, I idx) { return _mm512_permutexvar_epi32(idx, table); }
  static TORCHLNS_INLINE F as_float(I a) { return _mm512_castsi512_ps(a); }
  static TORCHLNS_INLINE F fadd_nonzero(F acc, F p, I s, I flags) {
    return _mm512_mask_add_ps(acc, _mm512_testn_epi32_mask(s, flags), acc, p);
  }
  static TORCHLNS_INLINE I add_nonzero(I acc, I p, I s, I flags) {
    return _mm512_mask_add_epi32(acc, _mm512_testn_epi32_mask(s, flags), acc, p);
  }
  static TORCHLNS_INLINE F fadd(F a, F b) { return _mm512_add_ps(a, b); }
  static TORCHLNS_INLINE I and_or(I s, I mask, I m) { return _mm512_ternarylogic_epi32(s, mask, m, 0xEA); }
  static TORCHLNS_INLINE I where_negative(I a, I t, I v) { return _mm512_mask_mov_epi32(v, _mm512_movepi32_mask(a), t); }
  static TORCHLNS_INLINE I negate_where(I p, I s, I one) {
    return _mm512_mask_sub_epi32(p, _mm512_test_epi32_mask(s, one), _mm512_setzero_si512(), p);
  }
  static TORCHLNS_INLINE void add_widen(int64_t* t, I v) {
    __m512i* q = reinterpret_cast<__m512i*>(t);
    q[0] = _mm512_add_epi64(q[0], _mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)));
    q[1] = _mm512_add_epi64(q[1], _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1)));
  }
};
#include "lns_direct.h"
#include "direct_drivers.h"
}  // namespace isa_avx512
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_avx2 {
struct V {
  static constexpr int lanes = 8;
  using I = __m256i;
  using F = __m256;
  static TORCHLNS_INLINE I load(const int32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static TORCHLNS_INLINE I loadu(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static TORCHLNS_INLINE void store(int32_t* p, I v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
  static TORCHLNS_INLINE void fstore(float* p, F v) { _mm256_store_ps(p, v); }
  static TORCHLNS_INLINE I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static TORCHLNS_INLINE I zero() { return _mm256_setzero_si256(); }
  static TORCHLNS_INLINE F fzero() { return _mm256_setzero_ps(); }
  static TORCHLNS_INLINE I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static TORCHLNS_INLINE I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static TORCHLNS_INLINE I neg(I a) { return _mm256_sub_epi32(_mm256_setzero_si256(), a); }
  static TORCHLNS_INLINE I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static TORCHLNS_INLINE I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static TORCHLNS_INLINE I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static TORCHLNS_INLINE I srl(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sra(I a, int n) { return _mm256_sra_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sll(I a, int n) { return _mm256_sll_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sllv(I a, I n) { return _mm256_sllv_epi32(a, n); }
  static TORCHLNS_INLINE I srlv(I a, I n) { return _mm256_srlv_epi32(a, n); }
  static TORCHLNS_INLINE I min_(I a, I b) { return _mm256_min_epi32(a, b); }
  static TORCHLNS_INLINE I minu(I a, I b) { return _mm256_min_epu32(a, b); }
  // 8 entries: the tables repeat with period 2^F <= 8 (AVX2 runs F <= 3; see direct_supported).
  static TORCHLNS_INLINE I perm16(I table, I idx) { return _mm256_permutevar8x32_epi32(table, idx); }
  static TORCHLNS_INLINE F as_float(I a) { return _mm256_castsi256_ps(a); }
  static TORCHLNS_INLINE I nonzero(I s, I flags) { return _mm256_cmpeq_epi32(_mm256_and_si256(s, flags), zero()); }
  static TORCHLNS_INLINE F fadd_nonzero(F acc, F p, I s, I flags) {
    return _mm256_add_ps(acc, _mm256_and_ps(p, _mm256_castsi256_ps(nonzero(s, flags))));
  }
  static TORCHLNS_INLINE I add_nonzero(I acc, I p, I s, I flags) {
    return _mm256_add_epi32(acc, _mm256_and_si256(p, nonzero(s, flags)));
  }
  static TORCHLNS_INLINE F fadd(F a, F b) { return _mm256_add_ps(a, b); }
  static TORCHLNS_INLINE I and_or(I s, I mask, I m) { return _mm256_or_si256(_mm256_and_si256(s, mask), m); }
  static TORCHLNS_INLINE I where_negative(I a, I t, I v) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(v), _mm256_castsi256_ps(t), _mm256_castsi256_ps(a)));
  }
  static TORCHLNS_INLINE I negate_where(I p, I s, I one) {  // sign_epi32 negates where its argument is negative
    return _mm256_sign_epi32(p, _mm256_or_si256(_mm256_slli_epi32(s, 31), one));
  }
  static TORCHLNS_INLINE void add_widen(int64_t* t, I v) {
    __m256i* q = reinterpret_cast<__m256i*>(t);
    q[0] = _mm256_add_epi64(q[0], _mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)));
    q[1] = _mm256_add_epi64(q[1], _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  }
};
#include "lns_direct.h"
#include "direct_drivers.h"
}  // namespace isa_avx2
#pragma GCC pop_options

#endif  // TORCHLNS_X86_INTRINSICS

int direct_lanes() {
#ifdef TORCHLNS_X86_INTRINSICS
  switch (active_isa()) {
    case Isa::avx512:
      return 16;
    case Isa::avx2:
      return 8;
    default:
      return 0;
  }
#else
  return 0;
#endif
}

bool direct_supported(int frac_bits) {
  const int lanes = direct_lanes();
  return lanes == 16 ? frac_bits <= 4 : lanes == 8 ? frac_bits <= 3 : false;
}

int64_t direct_block(int64_t Ng) {
  const int lanes = direct_lanes(), max_nv = lanes == 16 ? 8 : 4;
  int nv = 1;
  while (nv < max_nv && int64_t(nv) * lanes < Ng) nv *= 2;
  return int64_t(nv) * lanes;
}

void direct_rows(const DirectArgs& a, const RowSource& src, const RowSink& sink, int64_t M, int64_t groups, int64_t Kg,
                 const int32_t* wpack, int64_t Ng, int64_t NB) {
#ifdef TORCHLNS_X86_INTRINSICS
  if (active_isa() == Isa::avx512) return isa_avx512::rows(a, src, sink, M, groups, Kg, wpack, Ng, NB);
  if (active_isa() == Isa::avx2) return isa_avx2::rows(a, src, sink, M, groups, Kg, wpack, Ng, NB);
#endif
  TORCH_CHECK(false, "torchlns: the direct LNS kernels need AVX2 or AVX-512");
}

void direct_cols(const DirectArgs& a, const int32_t* xt, int64_t imgs, int64_t L, int64_t groups, int64_t Kg,
                 const int32_t* w, int64_t Ng, float* yf, int64_t* yi) {
#ifdef TORCHLNS_X86_INTRINSICS
  if (active_isa() == Isa::avx512) return isa_avx512::cols(a, xt, imgs, L, groups, Kg, w, Ng, yf, yi);
  if (active_isa() == Isa::avx2) return isa_avx2::cols(a, xt, imgs, L, groups, Kg, w, Ng, yf, yi);
#endif
  TORCH_CHECK(false, "torchlns: the direct LNS kernels need AVX2 or AVX-512");
}

int64_t direct_cols_slack() { return 64; }

}  // namespace torchlns
