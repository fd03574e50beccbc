// CPU kernels of the torchlns codec ops (encode/decode of LNS, FP8 and INT).
//
// The schemas are declared once, in torchlns/ops/library.py; this file only registers CPU
// kernels. Every kernel is the same bit manipulation as the pure-PyTorch reference
// (torchlns/ops/reference.py), so results are bit-identical; tests/ops/test_kernels.py
// checks that. The tables (encode buckets, decode bit patterns, FP8 values) come in as
// tensors from Python, where they are computed exactly once (see Note: exact tables in
// torchlns/core/tables.py).
//
// Broadcasting, strides and threading are TensorIterator's. Inner loops are plain
// element loops compiled for several ISAs (see Note: instruction sets in common.h): the
// package runs on any x86-64 and picks AVX2 or AVX-512 code at run time where the CPU has it.

#include <ATen/TensorIterator.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace torchlns {
namespace {

// Note: elementwise kernels
// Each op is a functor ``Op`` with types Out/In/Param/Params and a branch-free
// ``Op::apply(in, param, params)``. TORCHLNS_CONTIGUOUS_ENTRY compiles its loop over
// contiguous data once per ISA (TORCHLNS_ISA_CLONES); its pointers are __restrict
// function parameters (GCC ignores restrict on locals), which the vectorizer needs: a uint8
// store may otherwise alias the lookup tables and every other load. ``run_elementwise``
// sends TensorIterator's contiguous chunks there and anything strided to a plain loop.
template <typename Op>
using ContiguousFn = void (*)(typename Op::Out*, const typename Op::In*, const typename Op::Param*, bool, int64_t,
                              typename Op::Params);

#define TORCHLNS_CONTIGUOUS_ENTRY(NAME, OP)                                                                  \
  TORCHLNS_INLINE void NAME##_impl(OP::Out* __restrict out, const OP::In* __restrict in,                     \
                                   const OP::Param* __restrict param, bool param_is_scalar, int64_t n,       \
                                   const OP::Params p) {                                                      \
    if (param_is_scalar) {                                                                                   \
      const OP::Param q = *param;                                                                            \
      for (int64_t i = 0; i < n; ++i) out[i] = OP::apply(in[i], q, p);                                       \
    } else {                                                                                                 \
      for (int64_t i = 0; i < n; ++i) out[i] = OP::apply(in[i], param[i], p);                                \
    }                                                                                                        \
  }                                                                                                          \
  TORCHLNS_ISA_CLONES(void, NAME,                                                                            \
                      (OP::Out* __restrict out, const OP::In* __restrict in, const OP::Param* __restrict param, \
                       bool param_is_scalar, int64_t n, const OP::Params p),                                 \
                      (out, in, param, param_is_scalar, n, p))

template <typename Op>
void run_elementwise(at::TensorIterator& iter, const typename Op::Params& p, ContiguousFn<Op> contiguous) {
  using Out = typename Op::Out;
  using In = typename Op::In;
  using Param = typename Op::Param;
  iter.for_each([&](char** data, const int64_t* strides, int64_t n) {
    if (strides[0] == sizeof(Out) && strides[1] == sizeof(In) && (strides[2] == 0 || strides[2] == sizeof(Param))) {
      contiguous(reinterpret_cast<Out*>(data[0]), reinterpret_cast<const In*>(data[1]),
                 reinterpret_cast<const Param*>(data[2]), strides[2] == 0, n, p);
      return;
    }
    for (int64_t i = 0; i < n; ++i)
      *reinterpret_cast<Out*>(data[0] + i * strides[0]) = Op::apply(
          *reinterpret_cast<const In*>(data[1] + i * strides[1]), *reinterpret_cast<const Param*>(data[2] + i * strides[2]), p);
  });
}

at::TensorIterator elementwise_iter(const at::Tensor& out, const at::Tensor& in, const at::Tensor& param) {
  return at::TensorIteratorConfig()
      .add_output(out)
      .add_const_input(in)
      .add_const_input(param)
      .check_all_same_dtype(false)
      .build();
}

// ---------------------------------------------------------------------------------------
// LNS encode
// ---------------------------------------------------------------------------------------
constexpr int kMaxUnrolledF = 4;  // up to 16 thresholds are compared, not looked up

struct LnsEncodeParams {
  int frac_bits;
  int32_t e_max;
  int32_t nan_code;
  const int32_t* bucket_base;  // see encode_buckets in torchlns/core/tables.py
  const int32_t* bucket_thr;
  int32_t thresholds[1 << kMaxUnrolledF];  // the thresholds themselves, for F <= kMaxUnrolledF
};

// Branch-free, so that the element loop vectorizes. Spec section 1, exactly. kF >= 0 is the
// format's F known at compile time (the 2^F threshold compares unroll into vector compares);
// kF < 0 means "F at run time" and counts thresholds with two table lookups instead.
template <bool kMitchell, int kF>
TORCHLNS_INLINE int32_t lns_encode_one(float x, int32_t off, const LnsEncodeParams& p) {
  const uint32_t u = float_bits(x), a = u & kAbsMask;
  const bool sub = a < (1u << 23);  // subnormal (or zero): normalise, |x| * 2^24 is exact
  const uint32_t scaled = float_bits(bits_float(a) * 16777216.0f);
  const uint32_t nrm = sub ? scaled : a;
  const int32_t e = int32_t(nrm >> 23) - 127 - (sub ? 24 : 0);
  const int32_t frac = int32_t(nrm & kMantMask);
  int32_t step;
  if (kMitchell) {  // rne(f * 2^F); may carry into the next octave
    // Round half to even without comparisons (they stop GCC's vectorizer here): add half-1,
    // plus 1 when the kept part is odd, then shift.
    const int shift = 23 - p.frac_bits;
    step = (frac + ((1 << (shift - 1)) - 1) + ((frac >> shift) & 1)) >> shift;
  } else if (kF >= 0) {  // #{i : frac >= c_i}, counted directly
    step = 0;
    for (int i = 0; i < (1 << (kF < 0 ? 0 : kF)); ++i) step += int32_t(frac >= p.thresholds[i]);
  } else {
    // #{i : frac >= c_i}: the thresholds below the fraction's bucket, plus the one inside.
    const int32_t b = frac >> (22 - p.frac_bits);
    step = p.bucket_base[b] + int32_t(frac >= p.bucket_thr[b]);
  }
  int32_t mag = e * (1 << p.frac_bits) + step - off;
  // std::min/max rather than ?: clamps: GCC if-converts (and so vectorizes) only these.
  mag = std::max(std::min(mag, p.e_max), 0);  // saturate; E < 1 underflows to zero
  mag = a == kInfBits ? p.e_max : mag;        // ±inf saturates
  mag = a == 0 ? 0 : mag;
  const int32_t code = ((mag != 0) & ((u >> 31) != 0)) ? (mag | p.nan_code) : mag;  // zero drops the sign
  return a > kInfBits ? p.nan_code : code;
}

template <typename Code, bool kMitchell, int kF>
struct LnsEncode {
  using Out = Code;
  using In = float;
  using Param = int32_t;
  using Params = LnsEncodeParams;
  static TORCHLNS_INLINE Code apply(float x, int32_t off, const LnsEncodeParams& p) {
    return Code(uint16_t(lns_encode_one<kMitchell, kF>(x, off, p)));
  }
};
// One entry per (code width, rounding, F <= 4 or any F): LNS8 with F=3 is the common case.
#define TORCHLNS_LNS_ENCODE(CODE, TAG)                                                     \
  using LnsEncode##TAG##F0 = LnsEncode<CODE, false, 0>;                                    \
  using LnsEncode##TAG##F1 = LnsEncode<CODE, false, 1>;                                    \
  using LnsEncode##TAG##F2 = LnsEncode<CODE, false, 2>;                                    \
  using LnsEncode##TAG##F3 = LnsEncode<CODE, false, 3>;                                    \
  using LnsEncode##TAG##F4 = LnsEncode<CODE, false, 4>;                                    \
  using LnsEncode##TAG##Any = LnsEncode<CODE, false, -1>;                                  \
  using LnsEncode##TAG##Mitchell = LnsEncode<CODE, true, -1>;                              \
  TORCHLNS_CONTIGUOUS_ENTRY(lns_encode_##TAG##_f0, LnsEncode##TAG##F0)                     \
  TORCHLNS_CONTIGUOUS_ENTRY(lns_encode_##TAG##_f1, LnsEncode##TAG##F1)                     \
  TORCHLNS_CONTIGUOUS_ENTRY(lns_encode_##TAG##_f2, LnsEncode##TAG##F2)                     \
  TORCHLNS_CONTIGUOUS_ENTRY(lns_encode_##TAG##_f3, LnsEncode##TAG##F3)                     \
  TORCHLNS_CONTIGUOUS_ENTRY(lns_encode_##TAG##_f4, LnsEncode##TAG##F4)                     \
  TORCHLNS_CONTIGUOUS_ENTRY(lns_encode_##TAG##_any, LnsEncode##TAG##Any)                   \
  TORCHLNS_CONTIGUOUS_ENTRY(lns_encode_##TAG##_mitchell, LnsEncode##TAG##Mitchell)         \
  void run_lns_encode_##TAG(at::TensorIterator& iter, const LnsEncodeParams& p, bool mitchell) { \
    if (mitchell) return run_elementwise<LnsEncode##TAG##Mitchell>(iter, p, lns_encode_##TAG##_mitchell); \
    switch (p.frac_bits) {                                                                 \
      case 0: return run_elementwise<LnsEncode##TAG##F0>(iter, p, lns_encode_##TAG##_f0);  \
      case 1: return run_elementwise<LnsEncode##TAG##F1>(iter, p, lns_encode_##TAG##_f1);  \
      case 2: return run_elementwise<LnsEncode##TAG##F2>(iter, p, lns_encode_##TAG##_f2);  \
      case 3: return run_elementwise<LnsEncode##TAG##F3>(iter, p, lns_encode_##TAG##_f3);  \
      case 4: return run_elementwise<LnsEncode##TAG##F4>(iter, p, lns_encode_##TAG##_f4);  \
      default: return run_elementwise<LnsEncode##TAG##Any>(iter, p, lns_encode_##TAG##_any); \
    }                                                                                      \
  }
TORCHLNS_LNS_ENCODE(uint8_t, u8)
TORCHLNS_LNS_ENCODE(int16_t, i16)
#undef TORCHLNS_LNS_ENCODE

#ifdef TORCHLNS_X86_INTRINSICS
#define TORCHLNS_HAVE_VECTOR_ENCODE 1
// Hand-written AVX-512 LNS encode (nearest, F <= 4), the hot path of every LNS8 layer. It is
// lns_encode_one with the threshold count done by two in-register table permutes
// (vpermi2d over the 2^(F+1) buckets) instead of 2^F compares; GCC does not find that
// itself. Chosen at run time by active_isa() (see Note: instruction sets in common.h).
template <typename Code>
TORCHLNS_AVX512 void lns_encode_avx512(
    Code* __restrict out, const float* __restrict in, const int32_t* __restrict off, bool off_is_scalar, int64_t n,
    const LnsEncodeParams p) {
  alignas(64) int32_t base[32], thr[32];
  for (int b = 0; b < 32; ++b) {
    base[b] = b < (2 << p.frac_bits) ? p.bucket_base[b] : 0;
    thr[b] = b < (2 << p.frac_bits) ? p.bucket_thr[b] : (1 << 23);
  }
  const __m512i base_lo = _mm512_load_si512(base), base_hi = _mm512_load_si512(base + 16);
  const __m512i thr_lo = _mm512_load_si512(thr), thr_hi = _mm512_load_si512(thr + 16);
  const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF), mant_mask = _mm512_set1_epi32(0x7FFFFF);
  const __m512i inf_bits = _mm512_set1_epi32(0x7F800000), min_normal = _mm512_set1_epi32(1 << 23);
  const __m512i e_max = _mm512_set1_epi32(p.e_max), nan_code = _mm512_set1_epi32(p.nan_code);
  const __m512i zero = _mm512_setzero_si512(), one = _mm512_set1_epi32(1);
  const __m512 two24 = _mm512_set1_ps(16777216.0f);
  const __m512i off_scalar = _mm512_set1_epi32(off_is_scalar ? off[0] : 0);
  const int F = p.frac_bits;
  // Full blocks use plain loads and stores (a masked vpmovdb store is microcoded and slow);
  // only the tail is masked.
  for (int64_t i = 0; i < n; i += 16) {
    const bool full = n - i >= 16;
    const __mmask16 live = full ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512i u = _mm512_castps_si512(full ? _mm512_loadu_ps(in + i) : _mm512_maskz_loadu_ps(live, in + i));
    const __m512i o = off_is_scalar ? off_scalar
                                    : (full ? _mm512_loadu_si512(off + i) : _mm512_maskz_loadu_epi32(live, off + i));
    const __m512i a = _mm512_and_si512(u, abs_mask);
    const __mmask16 sub = _mm512_cmplt_epi32_mask(a, min_normal);
    const __m512i scaled = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(a), two24));
    const __m512i nrm = _mm512_mask_blend_epi32(sub, a, scaled);
    __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(nrm, 23), _mm512_set1_epi32(127));
    e = _mm512_mask_sub_epi32(e, sub, e, _mm512_set1_epi32(24));
    const __m512i frac = _mm512_and_si512(nrm, mant_mask);
    const __m512i b = _mm512_srlv_epi32(frac, _mm512_set1_epi32(22 - F));
    const __m512i below = _mm512_permutex2var_epi32(base_lo, b, base_hi);
    const __m512i inside = _mm512_permutex2var_epi32(thr_lo, b, thr_hi);
    const __m512i step = _mm512_mask_add_epi32(below, _mm512_cmpge_epi32_mask(frac, inside), below, one);
    __m512i mag = _mm512_sub_epi32(_mm512_add_epi32(_mm512_sllv_epi32(e, _mm512_set1_epi32(F)), step), o);
    mag = _mm512_max_epi32(_mm512_min_epi32(mag, e_max), zero);
    mag = _mm512_mask_mov_epi32(mag, _mm512_cmpeq_epi32_mask(a, inf_bits), e_max);
    mag = _mm512_mask_mov_epi32(mag, _mm512_cmpeq_epi32_mask(a, zero), zero);
    const __mmask16 signed_nonzero = _mm512_cmpneq_epi32_mask(mag, zero) & _mm512_cmplt_epi32_mask(u, zero);
    __m512i code = _mm512_mask_or_epi32(mag, signed_nonzero, mag, nan_code);
    code = _mm512_mask_mov_epi32(code, _mm512_cmpgt_epi32_mask(a, inf_bits), nan_code);
    if constexpr (sizeof(Code) == 1) {
      if (full)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(code));
      else
        _mm512_mask_cvtepi32_storeu_epi8(out + i, live, code);
    } else {
      if (full)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm512_cvtepi32_epi16(code));
      else
        _mm512_mask_cvtepi32_storeu_epi16(out + i, live, code);
    }
  }
}

// The same kernel in AVX2, 8 lanes: the bucket tables are read with vpermd, 8 entries at a
// time, and the halves joined on the next index bit (2^(F+1) <= 32 buckets: up to 4 reads).
TORCHLNS_AVX2 TORCHLNS_INLINE __m256i lookup_avx2(const __m256i* table, int tables, __m256i idx) {
  __m256i r = _mm256_permutevar8x32_epi32(table[0], idx);
  for (int t = 1; t < tables; ++t) {  // entry 8t + (idx & 7) where idx >= 8t
    const __m256i hit = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(8 * t - 1));
    r = _mm256_blendv_epi8(r, _mm256_permutevar8x32_epi32(table[t], idx), hit);
  }
  return r;
}

template <typename Code>
TORCHLNS_AVX2 void lns_encode_avx2(Code* __restrict out, const float* __restrict in, const int32_t* __restrict off,
                                   bool off_is_scalar, int64_t n, const LnsEncodeParams p) {
  const int F = p.frac_bits, tables = std::max(1, (2 << F) / 8);
  alignas(32) int32_t base[32], thr[32];
  for (int b = 0; b < 32; ++b) {
    base[b] = b < (2 << F) ? p.bucket_base[b] : 0;
    thr[b] = (b < (2 << F) ? p.bucket_thr[b] : (1 << 23)) - 1;  // frac >= thr  <=>  frac > thr - 1
  }
  __m256i base_t[4], thr_t[4];
  for (int t = 0; t < 4; ++t) {
    base_t[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(base + 8 * t));
    thr_t[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(thr + 8 * t));
  }
  const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), mant_mask = _mm256_set1_epi32(0x7FFFFF);
  const __m256i inf_bits = _mm256_set1_epi32(0x7F800000), min_normal = _mm256_set1_epi32(1 << 23);
  const __m256i e_max = _mm256_set1_epi32(p.e_max), nan_code = _mm256_set1_epi32(p.nan_code);
  const __m256i zero = _mm256_setzero_si256(), bias = _mm256_set1_epi32(127), sub24 = _mm256_set1_epi32(24);
  const __m256 two24 = _mm256_set1_ps(16777216.0f);
  const __m256i off_scalar = _mm256_set1_epi32(off_is_scalar ? off[0] : 0);
  const __m128i bucket_shift = _mm_cvtsi32_si128(22 - F), f_shift = _mm_cvtsi32_si128(F);
  // Byte 0 (or bytes 0-1) of each 32-bit lane, gathered into the low half of each 128-bit lane.
  const __m256i narrow = sizeof(Code) == 1
                             ? _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12,
                                                -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1)
                             : _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8,
                                                9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i join = sizeof(Code) == 1 ? _mm256_setr_epi32(0, 4, 1, 2, 3, 5, 6, 7)
                                         : _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
    const __m256i o = off_is_scalar ? off_scalar : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + i));
    const __m256i a = _mm256_and_si256(u, abs_mask);
    const __m256i sub = _mm256_cmpgt_epi32(min_normal, a);
    const __m256i scaled = _mm256_castps_si256(_mm256_mul_ps(_mm256_castsi256_ps(a), two24));
    const __m256i nrm = _mm256_blendv_epi8(a, scaled, sub);
    const __m256i e = _mm256_sub_epi32(_mm256_sub_epi32(_mm256_srli_epi32(nrm, 23), bias), _mm256_and_si256(sub, sub24));
    const __m256i frac = _mm256_and_si256(nrm, mant_mask);
    const __m256i b = _mm256_srl_epi32(frac, bucket_shift);
    const __m256i below = lookup_avx2(base_t, tables, b);
    const __m256i inside = lookup_avx2(thr_t, tables, b);
    // frac >= threshold, as 0 / -1; subtracting it adds one.
    const __m256i step = _mm256_sub_epi32(below, _mm256_cmpgt_epi32(frac, inside));
    __m256i mag = _mm256_sub_epi32(_mm256_add_epi32(_mm256_sll_epi32(e, f_shift), step), o);
    mag = _mm256_max_epi32(_mm256_min_epi32(mag, e_max), zero);
    mag = _mm256_blendv_epi8(mag, e_max, _mm256_cmpeq_epi32(a, inf_bits));
    mag = _mm256_andnot_si256(_mm256_cmpeq_epi32(a, zero), mag);
    const __m256i neg_nonzero = _mm256_andnot_si256(_mm256_cmpeq_epi32(mag, zero), _mm256_cmpgt_epi32(zero, u));
    __m256i code = _mm256_or_si256(mag, _mm256_and_si256(neg_nonzero, nan_code));
    code = _mm256_blendv_epi8(code, nan_code, _mm256_cmpgt_epi32(a, inf_bits));
    const __m256i packed = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(code, narrow), join);
    if constexpr (sizeof(Code) == 1)
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(packed));
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) out[i] = Code(uint16_t(lns_encode_one<false, -1>(in[i], off[off_is_scalar ? 0 : i], p)));
}

// The hand-written kernel for the active ISA (see Note: instruction sets), or false.
template <typename Code>
bool try_lns_encode_vector(at::TensorIterator& iter, const LnsEncodeParams& p) {
  const Isa isa = active_isa();
  if (p.frac_bits > kMaxUnrolledF || isa == Isa::baseline) return false;
  iter.for_each([&](char** data, const int64_t* strides, int64_t n) {
    if (strides[0] == sizeof(Code) && strides[1] == sizeof(float) && (strides[2] == 0 || strides[2] == 4)) {
      auto* out = reinterpret_cast<Code*>(data[0]);
      const auto* in = reinterpret_cast<const float*>(data[1]);
      const auto* off = reinterpret_cast<const int32_t*>(data[2]);
      if (isa == Isa::avx512)
        lns_encode_avx512<Code>(out, in, off, strides[2] == 0, n, p);
      else
        lns_encode_avx2<Code>(out, in, off, strides[2] == 0, n, p);
      return;
    }
    for (int64_t i = 0; i < n; ++i)
      *reinterpret_cast<Code*>(data[0] + i * strides[0]) = Code(uint16_t(lns_encode_one<false, -1>(
          *reinterpret_cast<const float*>(data[1] + i * strides[1]),
          *reinterpret_cast<const int32_t*>(data[2] + i * strides[2]), p)));
  });
  return true;
}
#endif

at::Tensor lns_encode_cpu(const at::Tensor& x, const at::Tensor& offset, const at::Tensor& buckets, int64_t bits,
                          int64_t frac_bits, bool mitchell) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "lns_encode: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(offset.scalar_type() == at::kInt, "lns_encode: offset must be int32, got ", offset.scalar_type());
  const int F = int(frac_bits);
  TORCH_CHECK(buckets.scalar_type() == at::kInt && buckets.dim() == 2 && buckets.size(0) == 2 &&
                  buckets.size(1) == (int64_t(2) << F),
              "lns_encode: buckets must be a (2, 2^(frac_bits+1)) int32 table");
  const bool wide = bits > 8;
  auto out = at::empty(x.sizes(), x.options().dtype(wide ? at::kShort : at::kByte));
  const auto table = buckets.contiguous();
  const int32_t* base = table.data_ptr<int32_t>();
  const int32_t* inside = base + (int64_t(2) << F);
  LnsEncodeParams p{F, int32_t((1 << (bits - 1)) - 1), int32_t(1) << (bits - 1), base, inside, {}};
  if (F <= kMaxUnrolledF) {  // the thresholds themselves, in order: one per bucket that holds one
    int count = 0;
    for (int b = 0; b < (2 << F); ++b)
      if (inside[b] != (1 << 23)) p.thresholds[count++ & ((1 << kMaxUnrolledF) - 1)] = inside[b];
    TORCH_CHECK(count == (1 << F), "lns_encode: buckets hold ", count, " thresholds, expected 2^frac_bits");
  }
  auto iter = elementwise_iter(out, x, offset);
#ifdef TORCHLNS_HAVE_VECTOR_ENCODE
  if (!mitchell && (wide ? try_lns_encode_vector<int16_t>(iter, p) : try_lns_encode_vector<uint8_t>(iter, p)))
    return out;
#endif
  wide ? run_lns_encode_i16(iter, p, mitchell) : run_lns_encode_u8(iter, p, mitchell);
  return out;
}

// ---------------------------------------------------------------------------------------
// LNS decode
// ---------------------------------------------------------------------------------------
struct LnsDecodeParams {
  int frac_bits;
  int32_t e_max, code_mask;
  const int32_t* decode_bits;
};

template <typename Code>
struct LnsDecode {
  using Out = float;
  using In = Code;
  using Param = int32_t;
  using Params = LnsDecodeParams;
  static TORCHLNS_INLINE float apply(Code code, int32_t off, const LnsDecodeParams& p) {
    const auto [mag, negative] = code_fields(int32_t(code), p.e_max, p.code_mask);
    const uint32_t sign = uint32_t(negative) << 31;
    // D[r] has exponent field 127; adding q to the field scales by 2^q exactly. For the
    // zero/NaN code the value is replaced below; g stays in range for a valid offset.
    const int32_t g = mag + off;
    const uint32_t v = uint32_t(p.decode_bits[g & ((1 << p.frac_bits) - 1)] + ((g >> p.frac_bits) << 23));
    return bits_float(mag == 0 ? (sign ? 0x7FC00000u : 0u) : (v | sign));
  }
};
using LnsDecodeU8 = LnsDecode<uint8_t>;
using LnsDecodeI16 = LnsDecode<int16_t>;
TORCHLNS_CONTIGUOUS_ENTRY(lns_decode_u8, LnsDecodeU8)
TORCHLNS_CONTIGUOUS_ENTRY(lns_decode_i16, LnsDecodeI16)

at::Tensor lns_decode_cpu(const at::Tensor& codes, const at::Tensor& offset, const at::Tensor& decode_bits,
                          int64_t bits, int64_t frac_bits) {
  const bool wide = bits > 8;
  TORCH_CHECK(codes.scalar_type() == (wide ? at::kShort : at::kByte), "lns_decode: codes of a ", bits,
              "-bit format must be ", wide ? "int16" : "uint8", ", got ", codes.scalar_type());
  TORCH_CHECK(offset.scalar_type() == at::kInt, "lns_decode: offset must be int32");
  auto out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const auto table = decode_bits.contiguous();
  const LnsDecodeParams p{int(frac_bits), int32_t((1 << (bits - 1)) - 1), int32_t((1 << bits) - 1),
                          table.data_ptr<int32_t>()};
  auto iter = elementwise_iter(out, codes, offset);
  wide ? run_elementwise<LnsDecodeI16>(iter, p, lns_decode_i16) : run_elementwise<LnsDecodeU8>(iter, p, lns_decode_u8);
  return out;
}

// ---------------------------------------------------------------------------------------
// FP8 encode / decode (same bit manipulation as reference.fp8_encode_reference)
// ---------------------------------------------------------------------------------------
struct Fp8Params {
  int man_bits, bias, max_code;
  bool has_inf;
};

struct Fp8Encode {
  using Out = uint8_t;
  using In = float;
  using Param = float;
  using Params = Fp8Params;
  static TORCHLNS_INLINE uint8_t apply(float x, float s, const Fp8Params& p) {
    const uint32_t xa = float_bits(x) & kAbsMask;
    const float y = x / s;  // float32 division, as the spec says
    const uint32_t u = float_bits(y), a = u & kAbsMask;
    const uint32_t min_normal_bits = uint32_t(127 + 1 - p.bias) << 23;
    // Subnormal grid: |y| * 2^(B-1+M) is exact; nearbyint rounds half to even.
    const float ay = bits_float(a < min_normal_bits ? a : min_normal_bits);
    const int32_t sub = int32_t(__builtin_nearbyintf(ay * bits_float(uint32_t(127 + p.bias - 1 + p.man_bits) << 23)));
    const int shift = 23 - p.man_bits;
    const uint32_t f = a < kInfBits ? a : kInfBits;
    const uint32_t rounded = f + ((1u << (shift - 1)) - 1) + ((f >> shift) & 1);
    int32_t code = a < min_normal_bits ? sub : int32_t(rounded >> shift) - ((127 - p.bias) << p.man_bits);
    code = std::min(code, p.max_code);
    code = (p.has_inf && xa == kInfBits) ? 0x7C : code;
    code = (xa > kInfBits) ? 0x7F : code;
    return uint8_t(code | int32_t((u >> 31) << 7));
  }
};
TORCHLNS_CONTIGUOUS_ENTRY(fp8_encode_contiguous, Fp8Encode)

at::Tensor fp8_encode_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t man_bits, int64_t bias, int64_t max_code,
                          bool has_inf) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat, "fp8_encode: float32 x and scale");
  auto out = at::empty(x.sizes(), x.options().dtype(at::kByte));
  auto iter = elementwise_iter(out, x, scale);
  run_elementwise<Fp8Encode>(iter, Fp8Params{int(man_bits), int(bias), int(max_code), has_inf}, fp8_encode_contiguous);
  return out;
}

struct TableDecode {
  using Out = float;
  using In = uint8_t;
  using Param = float;
  using Params = const float*;
  static TORCHLNS_INLINE float apply(uint8_t c, float s, const float* values) { return values[c] * s; }
};
TORCHLNS_CONTIGUOUS_ENTRY(table_decode_contiguous, TableDecode)

at::Tensor fp8_decode_cpu(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& values) {
  TORCH_CHECK(codes.scalar_type() == at::kByte, "fp8_decode: codes must be uint8");
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.numel() == 256, "fp8_decode: 256 float32 values");
  auto out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const auto table = values.contiguous();
  auto iter = elementwise_iter(out, codes, scale);
  run_elementwise<TableDecode>(iter, table.data_ptr<float>(), table_decode_contiguous);
  return out;
}

// ---------------------------------------------------------------------------------------
// INT encode / decode (NaN is rejected by the Python wrapper before this runs)
// ---------------------------------------------------------------------------------------
template <typename Code>
struct IntEncode {
  using Out = Code;
  using In = float;
  using Param = float;
  using Params = float;  // qmax
  static TORCHLNS_INLINE Code apply(float x, float s, float qmax) {
    return Code(std::max(std::min(__builtin_nearbyintf(x / s), qmax), -qmax));
  }
};
using IntEncodeI8 = IntEncode<int8_t>;
using IntEncodeI16 = IntEncode<int16_t>;
TORCHLNS_CONTIGUOUS_ENTRY(int_encode_i8, IntEncodeI8)
TORCHLNS_CONTIGUOUS_ENTRY(int_encode_i16, IntEncodeI16)

at::Tensor int_encode_cpu(const at::Tensor& x, const at::Tensor& scale, int64_t qmax, int64_t bits) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && scale.scalar_type() == at::kFloat, "int_encode: float32 x and scale");
  const bool wide = bits > 8;
  auto out = at::empty(x.sizes(), x.options().dtype(wide ? at::kShort : at::kChar));
  auto iter = elementwise_iter(out, x, scale);
  wide ? run_elementwise<IntEncodeI16>(iter, float(qmax), int_encode_i16)
       : run_elementwise<IntEncodeI8>(iter, float(qmax), int_encode_i8);
  return out;
}

template <typename Code>
struct IntDecode {
  using Out = float;
  using In = Code;
  using Param = float;
  using Params = int;  // unused
  static TORCHLNS_INLINE float apply(Code c, float s, int) { return float(c) * s; }
};
using IntDecodeI8 = IntDecode<int8_t>;
using IntDecodeI16 = IntDecode<int16_t>;
TORCHLNS_CONTIGUOUS_ENTRY(int_decode_i8, IntDecodeI8)
TORCHLNS_CONTIGUOUS_ENTRY(int_decode_i16, IntDecodeI16)

at::Tensor int_decode_cpu(const at::Tensor& codes, const at::Tensor& scale) {
  const bool wide = codes.scalar_type() == at::kShort;
  TORCH_CHECK(wide || codes.scalar_type() == at::kChar, "int_decode: codes must be int8 or int16");
  auto out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  auto iter = elementwise_iter(out, codes, scale);
  wide ? run_elementwise<IntDecodeI16>(iter, 0, int_decode_i16) : run_elementwise<IntDecodeI8>(iter, 0, int_decode_i8);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlns, CPU, m) {
  m.impl("lns_encode", &lns_encode_cpu);
  m.impl("lns_decode", &lns_decode_cpu);
  m.impl("fp8_encode", &fp8_encode_cpu);
  m.impl("fp8_decode", &fp8_decode_cpu);
  m.impl("int_encode", &int_encode_cpu);
  m.impl("int_decode", &int_decode_cpu);
}

}  // namespace torchlns
