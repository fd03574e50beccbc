// The direct LNS MAC kernels (see Note: direct kernels in lns_direct.h): field packing,
// the AVX-512 and AVX2 builds of the kernels, and their parallel drivers.

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common.h"
#include "direct.h"

namespace torchlns {

// ---------------------------------------------------------------------------------------
// Tables and limits
// ---------------------------------------------------------------------------------------
DirectTables direct_tables(const double* C, int frac_bits, bool fixed, bool split) {
  DirectTables t;
  const int R = 1 << frac_bits;
  if (frac_bits > 4) return t;
  if (!fixed) {  // E[t] = bits(C_ext[t]) - (127 << 23) - t, C[r] in [1, 2) (see Note: direct kernels)
    for (int r = 0; r < R; ++r)
      if (!(C[r] >= 1.0 && C[r] < 2.0) || double(float(C[r])) != C[r]) return t;
    if (split) {
      for (int i = 0; i < 2 * R - 1; ++i) {
        const float c = float(C[i % R] * (i >= R ? 2.0 : 1.0));
        t.table[i] = int32_t(float_bits(c) - (127u << 23) - uint32_t(i));
      }
    } else {  // shifted fields: mantissas repeated every 2^F
      for (int i = 0; i < 16; ++i) t.table[i] = int32_t(float_bits(float(C[i % R])) & kMantMask);
    }
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
    if (split) {  // L''[t] = L_ext[t] << (29 - P)
      for (int i = 0; i < 2 * R - 1; ++i)
        t.table[i] = int32_t((int64_t(std::ldexp(C[i % R], P)) << (i >= R ? 1 : 0)) << (29 - P));
    } else {  // L'[r] = L[r] << (30 - P), indexed by 2^F - 1 - r (the ones' complement's low bits)
      for (int i = 0; i < 16; ++i) t.table[i] = int32_t(int64_t(std::ldexp(C[R - 1 - i % R], P)) << (30 - P));
    }
    t.P = P;
    t.L_max = L_max;
    t.ok = true;
    return t;
  }
  return t;
}

namespace {

// Whether the pair kernels' float32 steps give C_ext[rx + rw] for every pair of remainders,
// at octave 0 (see Note: product pairs): the steps are the kernels' own, in the same order,
// and IEEE float32 arithmetic (no contraction: -ffp-contract=off) rounds the same in a
// scalar register as in a vector lane. Sets emin to the lowest exponent met.
bool pairs_reproduce(const std::vector<float>& D, const std::vector<float>& tl, const std::vector<float>& C_ext,
                     float sigma, int& emin) {
  const int R = int(D.size());
  int lo = 0;
  const auto track = [&](float v) {
    if (v != 0.0f) lo = std::min(lo, std::ilogb(v));
  };
  for (int rx = 0; rx < R; ++rx)
    for (int rw = 0; rw < R; ++rw) {
      const float xh = D[rx], xl = tl[rx], wh = D[rw], wl = tl[rw];
      const float m = xl * wh;
      const float c = std::fma(xh, wl, m);
      float v = std::fma(xh, wh, c);
      track(xl), track(wl), track(m), track(c);
      if (sigma != 0.0f) {  // Veltkamp: v rounded to nearest with 24 - log2(sigma - 1) bits
        const float g = v * sigma;
        const float d = g - v;
        v = g - d;
      }
      if (v != C_ext[rx + rw]) return false;
    }
  emin = lo;
  return true;
}

PairTables build_pair_tables(const double* C, int F) {
  PairTables t;
  if (F < 0 || F > 10) return t;  // D[r] by float64 pow is correct for F <= 10 (spec section 1)
  const int R = 1 << F;
  std::vector<float> D(R), tl(R), C_ext(2 * R - 1);
  for (int r = 0; r < R; ++r) {
    if (!(C[r] >= 1.0 && C[r] <= 2.0) || double(float(C[r])) != C[r]) return t;
    D[r] = float(std::pow(2.0, double(r) / R));
    tl[r] = float(std::exp2(static_cast<long double>(r) / R) - static_cast<long double>(D[r]));
  }
  for (int i = 0; i < 2 * R - 1; ++i) C_ext[i] = float(C[i % R] * (i >= R ? 2.0 : 1.0));
  // Candidates: the float32 products themselves (the exact conversion), then rounding to P + 1
  // bits for each P that makes every C[r] 2^P an integer (a P-bit LUT).
  std::vector<float> sigmas{0.0f};
  for (int P = 0; P <= 22; ++P) {
    bool integral = true;
    for (int r = 0; r < R; ++r) integral &= std::ldexp(C[r], P) == std::floor(std::ldexp(C[r], P));
    if (integral) sigmas.push_back(float(std::ldexp(1.0, 23 - P) + 1.0));
  }
  for (const float sigma : sigmas) {
    int emin = 0;
    if (!pairs_reproduce(D, tl, C_ext, sigma, emin)) continue;
    t.ok = true;
    t.sigma = sigma;
    t.emin = emin;
    t.head.resize(R);
    t.tail.resize(R);
    for (int r = 0; r < R; ++r) t.head[r] = int32_t(float_bits(D[r])), t.tail[r] = int32_t(float_bits(tl[r]));
    return t;
  }
  return t;
}

}  // namespace

const PairTables& pair_tables(const double* C, int frac_bits) {
  // The proof runs over 4^F pairs (a million for F = 10): once per distinct table.
  static std::mutex mutex;
  static std::map<std::string, std::unique_ptr<PairTables>> tables;
  const int R = frac_bits >= 0 && frac_bits <= 10 ? 1 << frac_bits : 0;
  std::string key(reinterpret_cast<const char*>(C), sizeof(double) * size_t(R));
  key.push_back(char(frac_bits));
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = tables[key];
  if (!slot) slot = std::make_unique<PairTables>(build_pair_tables(C, frac_bits));
  return *slot;
}

// ---------------------------------------------------------------------------------------
// Field packing
// ---------------------------------------------------------------------------------------
struct FieldStats {
  int32_t q_lo, q_hi;
  int32_t any_nan;
};
// The loop body, with the layout's choices as template parameters and a contiguous output,
// so that GCC vectorizes it in each ISA clone (runtime flags or a strided store in the loop
// kept it scalar: 1.7 ns an element, a quarter of a depthwise layer's time).
template <typename Code, bool kScalarOff, bool kSplit, bool kNegate>
TORCHLNS_INLINE void pack_run(const Code* __restrict code, const int32_t* __restrict off, int64_t n, int32_t e_max,
                              int32_t code_mask, int frac_bits, uint32_t add, int shift, int sign_bit,
                              int32_t zero_field, int32_t* __restrict out, FieldStats& st) {
  const int32_t o0 = off[0], r_mask = (1 << frac_bits) - 1;
  int32_t lo = st.q_lo, hi = st.q_hi, nan = st.any_nan;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = int32_t(code[i]) & code_mask;
    const int32_t mag = c & e_max;
    const uint32_t neg = c > e_max;
    const int32_t g = mag + (kScalarOff ? o0 : off[i]);
    const int32_t q = g >> frac_bits;
    const uint32_t f = kSplit ? (((kNegate ? 0u - uint32_t(q) : uint32_t(q)) + add) << shift) + uint32_t(g & r_mask) +
                                    (neg << sign_bit)
                              : (((kNegate ? 0u - uint32_t(g) : uint32_t(g)) + add) << shift) + (neg << sign_bit);
    const int32_t z = -int32_t(mag == 0);  // masks, not branches: GCC if-converts these
    out[i] = (int32_t(f) & ~z) | (zero_field & z);
    const int32_t q_lo = (q & ~z) | (INT32_MAX & z), q_hi = (q & ~z) | (INT32_MIN & z);
    lo = q_lo < lo ? q_lo : lo;
    hi = q_hi > hi ? q_hi : hi;
    nan |= z & int32_t(neg);
  }
  st = {lo, hi, nan};
}

// field = (uint32(negate ? -g : g) + add) << shift  +  sign << sign_bit (split: the octave q
// in place of g, plus r); kZeroField for the zero and NaN codes (see Note: direct kernels).
// All arithmetic is mod 2^32. The same pass reduces the octave range of the nonzero codes
// and whether any code is NaN. A strided output (NHWC) is packed a block at a time into a
// contiguous buffer, then scattered.
template <typename Code, bool kScalarOff, bool kSplit, bool kNegate>
TORCHLNS_INLINE FieldStats pack_layout(const Code* __restrict code, const int32_t* __restrict off, int64_t n,
                                       int32_t e_max, int32_t code_mask, int frac_bits, uint32_t add, int shift,
                                       int sign_bit, int32_t zero_field, int32_t* __restrict out, int64_t out_stride) {
  FieldStats st{INT32_MAX, INT32_MIN, 0};
  if (out_stride == 1) {
    pack_run<Code, kScalarOff, kSplit, kNegate>(code, off, n, e_max, code_mask, frac_bits, add, shift, sign_bit,
                                                zero_field, out, st);
    return st;
  }
  constexpr int64_t kBlock = 256;
  alignas(64) int32_t tmp[kBlock];
  for (int64_t a = 0; a < n; a += kBlock) {
    const int64_t m = std::min(kBlock, n - a);
    pack_run<Code, kScalarOff, kSplit, kNegate>(code + a, kScalarOff ? off : off + a, m, e_max, code_mask, frac_bits,
                                                add, shift, sign_bit, zero_field, tmp, st);
    int32_t* o = out + a * out_stride;
    for (int64_t i = 0; i < m; ++i) o[i * out_stride] = tmp[i];
  }
  return st;
}

// Product pairs: head and tail float32 bits per code (see Note: product pairs), with the same
// statistics as pack_run.
template <typename Code, bool kScalarOff>
TORCHLNS_INLINE void pair_run(const Code* __restrict code, const int32_t* __restrict off, int64_t n, int32_t e_max,
                              int32_t code_mask, int frac_bits, uint32_t add, const int32_t* __restrict head,
                              const int32_t* __restrict tail, int32_t* __restrict out_h, int32_t* __restrict out_t,
                              FieldStats& st) {
  const int32_t o0 = off[0], r_mask = (1 << frac_bits) - 1;
  int32_t lo = st.q_lo, hi = st.q_hi, nan = st.any_nan;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t c = int32_t(code[i]) & code_mask;
    const int32_t mag = c & e_max;
    const uint32_t neg = uint32_t(c > e_max) << 31;
    const int32_t g = mag + (kScalarOff ? o0 : off[i]);
    const int32_t q = g >> frac_bits, r = g & r_mask;
    const uint32_t sh = (uint32_t(q) + add) << 23, tb = uint32_t(tail[r]);
    const int32_t z = -int32_t(mag == 0);
    out_h[i] = int32_t((uint32_t(head[r]) + sh) ^ neg) & ~z;
    out_t[i] = int32_t(tb ? (tb + sh) ^ neg : 0u) & ~z;
    const int32_t q_lo = (q & ~z) | (INT32_MAX & z), q_hi = (q & ~z) | (INT32_MIN & z);
    lo = q_lo < lo ? q_lo : lo;
    hi = q_hi > hi ? q_hi : hi;
    nan |= z & int32_t(neg >> 31);
  }
  st = {lo, hi, nan};
}

template <typename Code>
TORCHLNS_INLINE FieldStats pack_pairs_impl(const Code* __restrict code, const int32_t* __restrict off, bool scalar,
                                           int64_t n, int32_t e_max, int32_t code_mask, int frac_bits, uint32_t add,
                                           const int32_t* head, const int32_t* tail, int32_t* __restrict out_h,
                                           int32_t* __restrict out_t, int64_t out_stride) {
  FieldStats st{INT32_MAX, INT32_MIN, 0};
  constexpr int64_t kBlock = 256;
  alignas(64) int32_t th[kBlock], tt[kBlock];
  for (int64_t a = 0; a < n; a += (out_stride == 1 ? n : kBlock)) {
    const int64_t m = out_stride == 1 ? n : std::min(kBlock, n - a);
    int32_t* h = out_stride == 1 ? out_h : th;
    int32_t* t = out_stride == 1 ? out_t : tt;
    if (scalar)
      pair_run<Code, true>(code + a, off, m, e_max, code_mask, frac_bits, add, head, tail, h, t, st);
    else
      pair_run<Code, false>(code + a, off + a, m, e_max, code_mask, frac_bits, add, head, tail, h, t, st);
    if (out_stride != 1)
      for (int64_t i = 0; i < m; ++i) out_h[(a + i) * out_stride] = th[i], out_t[(a + i) * out_stride] = tt[i];
  }
  return st;
}
#define TORCHLNS_PAIR_CLONES(NAME, CODE)                                                                           \
  TORCHLNS_INLINE FieldStats NAME##_impl(const CODE* __restrict code, const int32_t* __restrict off, bool scalar,  \
                                         int64_t n, int32_t e_max, int32_t mask, int F, uint32_t add,              \
                                         const int32_t* head, const int32_t* tail, int32_t* __restrict out_h,       \
                                         int32_t* __restrict out_t, int64_t stride) {                              \
    return pack_pairs_impl<CODE>(code, off, scalar, n, e_max, mask, F, add, head, tail, out_h, out_t, stride);     \
  }                                                                                                                \
  TORCHLNS_ISA_CLONES(FieldStats, NAME,                                                                            \
                      (const CODE* __restrict code, const int32_t* __restrict off, bool scalar, int64_t n,         \
                       int32_t e_max, int32_t mask, int F, uint32_t add, const int32_t* head, const int32_t* tail, \
                       int32_t* __restrict out_h, int32_t* __restrict out_t, int64_t stride),                      \
                      (code, off, scalar, n, e_max, mask, F, add, head, tail, out_h, out_t, stride))
TORCHLNS_PAIR_CLONES(pack_pairs_u8, uint8_t)
TORCHLNS_PAIR_CLONES(pack_pairs_i16, int16_t)
#undef TORCHLNS_PAIR_CLONES

template <typename Code>
TORCHLNS_INLINE FieldStats pack_fields_impl(const Code* __restrict code, const int32_t* __restrict off, bool off_scalar,
                                            int64_t n, int32_t e_max, int32_t code_mask, int frac_bits, bool negate,
                                            uint32_t add, int shift, int sign_bit, bool split, int32_t zero_field,
                                            int32_t* __restrict out, int64_t out_stride) {
#define TORCHLNS_PACK_LAYOUT(S, SP, NG)                                                                        \
  return pack_layout<Code, S, SP, NG>(code, off, n, e_max, code_mask, frac_bits, add, shift, sign_bit, zero_field, \
                                      out, out_stride)
  switch (int(off_scalar) * 4 + int(split) * 2 + int(negate)) {
    case 0: TORCHLNS_PACK_LAYOUT(false, false, false);
    case 1: TORCHLNS_PACK_LAYOUT(false, false, true);
    case 2: TORCHLNS_PACK_LAYOUT(false, true, false);
    case 3: TORCHLNS_PACK_LAYOUT(false, true, true);
    case 4: TORCHLNS_PACK_LAYOUT(true, false, false);
    case 5: TORCHLNS_PACK_LAYOUT(true, false, true);
    case 6: TORCHLNS_PACK_LAYOUT(true, true, false);
    default: TORCHLNS_PACK_LAYOUT(true, true, true);
  }
#undef TORCHLNS_PACK_LAYOUT
}
#define TORCHLNS_PACK_CLONES(NAME, CODE)                                                                          \
  TORCHLNS_INLINE FieldStats NAME##_impl(const CODE* __restrict code, const int32_t* __restrict off, bool scalar, \
                                         int64_t n, int32_t e_max, int32_t mask, int F, bool negate, uint32_t add, \
                                         int shift, int sign_bit, bool split, int32_t zero,                       \
                                         int32_t* __restrict out, int64_t stride) {                               \
    return pack_fields_impl<CODE>(code, off, scalar, n, e_max, mask, F, negate, add, shift, sign_bit, split, zero, \
                                  out, stride);                                                                   \
  }                                                                                                               \
  TORCHLNS_ISA_CLONES(FieldStats, NAME,                                                                           \
                      (const CODE* __restrict code, const int32_t* __restrict off, bool scalar, int64_t n,        \
                       int32_t e_max, int32_t mask, int F, bool negate, uint32_t add, int shift, int sign_bit,    \
                       bool split, int32_t zero, int32_t* __restrict out, int64_t stride),                        \
                      (code, off, scalar, n, e_max, mask, F, negate, add, shift, sign_bit, split, zero, out, stride))
TORCHLNS_PACK_CLONES(pack_fields_u8, uint8_t)
TORCHLNS_PACK_CLONES(pack_fields_i16, int16_t)
#undef TORCHLNS_PACK_CLONES

PackedFields packed_fields(const at::Tensor& codes, const at::Tensor& offset, int64_t bits, int frac_bits,
                           const FieldLayout& layout, int32_t* dst, bool nhwc) {
  const auto cc = codes.contiguous();
  const bool wide = cc.scalar_type() == at::kShort;
  TORCH_CHECK(wide || cc.scalar_type() == at::kByte, "direct LNS kernels: codes must be uint8 or int16");
  // A broadcast offset (every stride 0, as callers pass a per-tensor one expanded) is one
  // value: materializing it would cost a full int32 tensor per call.
  bool broadcast = true;
  for (int64_t d = 0; d < offset.dim(); ++d) broadcast &= offset.stride(d) == 0 || offset.size(d) == 1;
  const bool scalar = offset.numel() == 1 || (broadcast && offset.numel() > 0);
  const auto off = scalar ? offset.reshape({-1}).narrow(0, 0, 1).to(at::kInt).contiguous()
                          : offset.expand(codes.sizes()).to(at::kInt).contiguous();
  PackedFields p{at::Tensor(), at::Tensor(), 0, 0, false};
  const int64_t n = codes.numel();
  const PairTables* pair = layout.pair;
  if (!dst) {
    p.fields = pair ? at::empty({2 * n}, cc.options().dtype(at::kInt)) : at::empty(codes.sizes(), cc.options().dtype(at::kInt));
    dst = p.fields.data_ptr<int32_t>();
  }
  const int32_t e_max = (1 << (bits - 1)) - 1, mask = (1 << bits) - 1;
  const int32_t* op = off.data_ptr<int32_t>();
  // Work items: planes of H*W elements (written with stride C for NHWC), else flat chunks.
  TORCH_CHECK(!nhwc || codes.dim() == 4, "direct LNS kernels: NHWC packing needs (N, C, H, W) codes");
  const int64_t C = nhwc ? codes.size(1) : 1, HW = nhwc ? codes.size(2) * codes.size(3) : 0;
  const int64_t grain = nhwc ? HW : int64_t(1) << 15;
  const int64_t items = std::max<int64_t>(1, grain ? (n + grain - 1) / grain : 1);
  std::vector<FieldStats> stats(items, FieldStats{INT32_MAX, INT32_MIN, 0});
  at::parallel_for(0, items, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ci = c0; ci < c1; ++ci) {
      const int64_t a = ci * grain, b = std::min(n, a + grain);
      if (a >= b) continue;
      int32_t* out = nhwc ? dst + (ci / C) * HW * C + ci % C : dst + a;
      const int64_t stride = nhwc ? C : 1;
      if (pair) {
        const int32_t *hd = pair->head.data(), *tl = pair->tail.data();
        stats[ci] = wide ? pack_pairs_i16(cc.data_ptr<int16_t>() + a, scalar ? op : op + a, scalar, b - a, e_max, mask,
                                          frac_bits, layout.add, hd, tl, out, out + n, stride)
                         : pack_pairs_u8(cc.data_ptr<uint8_t>() + a, scalar ? op : op + a, scalar, b - a, e_max, mask,
                                         frac_bits, layout.add, hd, tl, out, out + n, stride);
        continue;
      }
      stats[ci] = wide ? pack_fields_i16(cc.data_ptr<int16_t>() + a, scalar ? op : op + a, scalar, b - a, e_max, mask,
                                         frac_bits, layout.negate, layout.add, layout.shift, layout.sign_bit,
                                         layout.split, layout.zero_field, out, stride)
                       : pack_fields_u8(cc.data_ptr<uint8_t>() + a, scalar ? op : op + a, scalar, b - a, e_max, mask,
                                        frac_bits, layout.negate, layout.add, layout.shift, layout.sign_bit,
                                        layout.split, layout.zero_field, out, stride);
    }
  });
  int32_t l = INT32_MAX, h = INT32_MIN;
  for (const auto& st : stats) {
    l = std::min(l, st.q_lo);
    h = std::max(h, st.q_hi);
    p.any_nan |= st.any_nan != 0;
  }
  p.q_lo = l > h ? 0 : l;
  p.q_hi = l > h ? 0 : h;
  if (p.any_nan) {  // rare: the NaN map, from the codes
    const auto c32 = cc.to(at::kInt);
    p.nan = at::logical_and(at::bitwise_and(c32, e_max) == 0, at::bitwise_and(c32, mask) > e_max);
  }
  return p;
}

int32_t* scratch(int slot, int64_t elements) {
  thread_local std::vector<int32_t> buffers[4];
  auto& b = buffers[slot];
  if (int64_t(b.size()) < elements) b.resize(size_t(elements));
  return b.data();
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
  static TORCHLNS_INLINE void fstore(float* p, F v) { _mm512_store_ps(p, v); }
  static TORCHLNS_INLINE F fload(const float* p) { return _mm512_load_ps(p); }
  static TORCHLNS_INLINE I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static TORCHLNS_INLINE I zero() { return _mm512_setzero_si512(); }
  static TORCHLNS_INLINE F fzero() { return _mm512_setzero_ps(); }
  static TORCHLNS_INLINE I add(I a, I b) { return _mm512_add_epi32(a, b); }
  static TORCHLNS_INLINE I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static TORCHLNS_INLINE I srl(I a, int n) { return _mm512_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sra(I a, int n) { return _mm512_sra_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sll(I a, int n) { return _mm512_sll_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I srlv(I a, I n) { return _mm512_srlv_epi32(a, n); }
  static TORCHLNS_INLINE I minu(I a, I b) { return _mm512_min_epu32(a, b); }
  static TORCHLNS_INLINE I perm(I table, I idx) { return _mm512_permutexvar_epi32(idx, table); }  // low 4 bits
  static TORCHLNS_INLINE I perm2(I t0, I t1, I idx) { return _mm512_permutex2var_epi32(t0, idx, t1); }  // low 5
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
  static TORCHLNS_INLINE I where_equal(I a, I b, I t, I v) { return _mm512_mask_mov_epi32(v, _mm512_cmpeq_epi32_mask(a, b), t); }
  template <int kBit>
  static TORCHLNS_INLINE I negate_where(I p, I s, I one) {
    return _mm512_mask_sub_epi32(p, _mm512_test_epi32_mask(s, one), _mm512_setzero_si512(), p);
  }
  static TORCHLNS_INLINE F fset1(float v) { return _mm512_set1_ps(v); }
  static TORCHLNS_INLINE F floadu(const float* p) { return _mm512_loadu_ps(p); }
  static TORCHLNS_INLINE F fmul(F a, F b) { return _mm512_mul_ps(a, b); }
  static TORCHLNS_INLINE F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static TORCHLNS_INLINE F fsub(F a, F b) { return _mm512_sub_ps(a, b); }
  static TORCHLNS_INLINE F fmin(F a, F b) { return _mm512_min_ps(a, b); }
  static TORCHLNS_INLINE F fabs(F a) { return _mm512_abs_ps(a); }
  static TORCHLNS_INLINE I cvtt(F a) { return _mm512_cvttps_epi32(a); }
  static TORCHLNS_INLINE I as_int(F a) { return _mm512_castps_si512(a); }
  static TORCHLNS_INLINE I with_sign_of(I p, F v) {  // -p where v is negative
    return _mm512_mask_sub_epi32(p, _mm512_movepi32_mask(_mm512_castps_si512(v)), _mm512_setzero_si512(), p);
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
  static TORCHLNS_INLINE void fstore(float* p, F v) { _mm256_store_ps(p, v); }
  static TORCHLNS_INLINE F fload(const float* p) { return _mm256_load_ps(p); }
  static TORCHLNS_INLINE I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static TORCHLNS_INLINE I zero() { return _mm256_setzero_si256(); }
  static TORCHLNS_INLINE F fzero() { return _mm256_setzero_ps(); }
  static TORCHLNS_INLINE I add(I a, I b) { return _mm256_add_epi32(a, b); }
  static TORCHLNS_INLINE I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static TORCHLNS_INLINE I srl(I a, int n) { return _mm256_srl_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sra(I a, int n) { return _mm256_sra_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I sll(I a, int n) { return _mm256_sll_epi32(a, _mm_cvtsi32_si128(n)); }
  static TORCHLNS_INLINE I srlv(I a, I n) { return _mm256_srlv_epi32(a, n); }
  static TORCHLNS_INLINE I minu(I a, I b) { return _mm256_min_epu32(a, b); }
  // 8 entries (low 3 bits); perm2 reads 16, choosing the half on bit 3 (AVX2 runs F <= 3).
  static TORCHLNS_INLINE I perm(I table, I idx) { return _mm256_permutevar8x32_epi32(table, idx); }
  static TORCHLNS_INLINE I perm2(I t0, I t1, I idx) {
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(perm(t0, idx)), _mm256_castsi256_ps(perm(t1, idx)),
                                                _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))));
  }
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
  static TORCHLNS_INLINE I where_equal(I a, I b, I t, I v) { return _mm256_blendv_epi8(v, t, _mm256_cmpeq_epi32(a, b)); }
  // sign_epi32 negates where its argument is negative: the sign bit shifted to bit 31, or'd
  // with `one` so that a positive argument is never 0 (which would zero p).
  template <int kBit>
  static TORCHLNS_INLINE I negate_where(I p, I s, I one) {
    return _mm256_sign_epi32(p, _mm256_or_si256(_mm256_slli_epi32(s, 31 - kBit), one));
  }
  static TORCHLNS_INLINE F fset1(float v) { return _mm256_set1_ps(v); }
  static TORCHLNS_INLINE F floadu(const float* p) { return _mm256_loadu_ps(p); }
  static TORCHLNS_INLINE F fmul(F a, F b) { return _mm256_mul_ps(a, b); }
  static TORCHLNS_INLINE F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static TORCHLNS_INLINE F fsub(F a, F b) { return _mm256_sub_ps(a, b); }
  static TORCHLNS_INLINE F fmin(F a, F b) { return _mm256_min_ps(a, b); }
  static TORCHLNS_INLINE F fabs(F a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
  static TORCHLNS_INLINE I cvtt(F a) { return _mm256_cvttps_epi32(a); }
  static TORCHLNS_INLINE I as_int(F a) { return _mm256_castps_si256(a); }
  static TORCHLNS_INLINE I with_sign_of(I p, F v) {  // -p where v is negative (| 1: never 0)
    return _mm256_sign_epi32(p, _mm256_or_si256(_mm256_castps_si256(v), _mm256_set1_epi32(1)));
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

bool direct_pairs_supported() { return direct_lanes() > 0; }

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

void direct_cols(const DirectArgs& a, const ColSource& src, int64_t groups, int64_t Kg, const int32_t* w, int64_t Ng,
                 float* yf, int64_t* yi) {
#ifdef TORCHLNS_X86_INTRINSICS
  if (active_isa() == Isa::avx512) return isa_avx512::cols(a, src, groups, Kg, w, Ng, yf, yi);
  if (active_isa() == Isa::avx2) return isa_avx2::cols(a, src, groups, Kg, w, Ng, yf, yi);
#endif
  TORCH_CHECK(false, "torchlns: the direct LNS kernels need AVX2 or AVX-512");
}

int64_t direct_cols_run() { return 32; }  // kColsNV * lanes on both ISAs


}  // namespace torchlns
