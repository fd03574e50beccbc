// Pieces shared by the C++ CPU kernels of torchlns: each rule of the chip model that more
// than one kernel needs is written here once (the Python statement of the same rules is
// torchlns/core/fields.py and torchlns/ops/reference.py).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// Note: instruction sets
// The package is compiled without -march=native so that it runs on any x86-64. Hot loops
// exist in three builds from one source: AVX-512 (x86-64-v4: F/BW/DQ/VL), AVX2 (x86-64-v3:
// AVX2/FMA/BMI2) and the x86-64 baseline; hand-written vector kernels exist for AVX-512
// and AVX2. Which build runs is decided at run time by active_isa(): the best level the
// CPU supports, or a lower one forced by the environment variable TORCHLNS_ISA
// (avx512 | avx2 | baseline, read when the extension loads) or by set_isa() (the
// tests force each level in turn, so one machine checks every path). Forcing a level the
// CPU lacks is an error, not a silent downgrade. Every level gives the same bits.
//
// TORCHLNS_ISA_CLONES(RET, NAME, PARAMS, ARGS) defines NAME from an always-inline
// NAME##_impl: one clone per level (GCC inlines the generic body into each target and
// vectorizes it there) and a dispatcher. Off x86 there is just the one build.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(TORCHLNS_NO_MULTIVERSION)
#define TORCHLNS_X86_INTRINSICS 1
#define TORCHLNS_AVX512 __attribute__((target("arch=x86-64-v4")))
#define TORCHLNS_AVX2 __attribute__((target("arch=x86-64-v3")))
#include <immintrin.h>
#define TORCHLNS_ISA_CLONES(RET, NAME, PARAMS, ARGS)                      \
  TORCHLNS_AVX512 RET NAME##_avx512 PARAMS { return NAME##_impl ARGS; } \
  TORCHLNS_AVX2 RET NAME##_avx2 PARAMS { return NAME##_impl ARGS; }     \
  RET NAME##_baseline PARAMS { return NAME##_impl ARGS; }               \
  RET NAME PARAMS {                                                     \
    switch (::torchlns::active_isa()) {                                 \
      case ::torchlns::Isa::avx512:                                     \
        return NAME##_avx512 ARGS;                                      \
      case ::torchlns::Isa::avx2:                                       \
        return NAME##_avx2 ARGS;                                        \
      default:                                                          \
        return NAME##_baseline ARGS;                                    \
    }                                                                   \
  }
#else
#define TORCHLNS_ISA_CLONES(RET, NAME, PARAMS, ARGS) \
  RET NAME PARAMS { return NAME##_impl ARGS; }
#endif

#define TORCHLNS_INLINE inline __attribute__((always_inline))

namespace torchlns {

// See Note: instruction sets. Ordered: a level includes the ones below it.
enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };

Isa cpu_isa();     // the best level this CPU supports
Isa active_isa();  // the level the kernels use now
void set_isa(Isa isa);  // raises if the CPU lacks it
const char* isa_name(Isa isa);
bool set_isa_by_name(const std::string& name);  // false for an unknown name
std::string isa_env_error();  // why TORCHLNS_ISA was refused ("" if it was not)

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
// Note: accumulator telemetry
// torchlns.telemetry counts, per chip layer, the fixed accumulator's totals that overflow and
// the largest |total| (spec section 2, before the final saturation). The totals exist only
// here, in the epilogue, so the epilogue counts them while telemetry_on(): the loop that finishes a stretch of
// outputs holds a Tally (nothing while telemetry is off) and passes it to each epilogue; the
// Tally keeps its counts in registers and adds them to its thread's counters when the
// stretch ends, and those are summed when read.
// Each output must reach the epilogue once: the dynamic blocks' repair finishes changed
// positions twice, so the static pass leaves them out of its counts (telemetry_skip in
// lns_conv_direct), and torchlns.telemetry checks the count of outputs against the layer's. The product and
// activation counts come from the codes (torchlns/deploy/telemetry.py).
// One thread's counts over a stretch of outputs, kept in registers by the loop that finishes
// them and added to the thread's counters once (a call per output cost more than the MAC of a
// depthwise layer). A total (or a chunk sum, chunk = true) overflows above T, or below -T
// (saturate) or -T - 1 (wrap).
struct TelemetryCounts {
  int64_t outputs = 0, overflow = 0, max_abs = 0, chunks = 0, chunk_overflow = 0, max_chunk = 0;
  TORCHLNS_INLINE void record(int64_t total, int64_t T, bool wrap, bool chunk) {
    const int64_t mag = total < 0 ? (total == INT64_MIN ? INT64_MAX : -total) : total;
    const int64_t over = total > T || total < (wrap ? -T - 1 : -T);
    if (chunk) {
      ++chunks, chunk_overflow += over, max_chunk = std::max(max_chunk, mag);
    } else {
      ++outputs, overflow += over, max_abs = std::max(max_abs, mag);
    }
  }
};
extern std::atomic<bool> telemetry_flag;
TORCHLNS_INLINE bool telemetry_on() { return telemetry_flag.load(std::memory_order_relaxed); }
void telemetry_add(const TelemetryCounts& counts);  // into this thread's counters
void telemetry_start();
TelemetryCounts telemetry_stop();
// The counts so far, and putting them back (a kernel that counted some outputs, then declined
// the call to another that counts them all).
TelemetryCounts telemetry_read();
void telemetry_reset_to(const TelemetryCounts& counts);
// Of float32 activations x: how many have |x| > 0, |x| >= sat, and 0 < |x| < flush (NaN: none).
std::array<int64_t, 3> act_counts(const at::Tensor& x, double flush, double sat);
// A 2-D convolution's activations per (channel, tap), for telemetry (Note: telemetry's tap histograms in
// conv_cpu.cpp): per-tensor codes (C*kh*kw, 2^bits), and the logs of dynamic blocks.
at::Tensor code_hist(const at::Tensor& x, int64_t bits, int64_t kh, int64_t kw, at::IntArrayRef stride,
                     at::IntArrayRef pad_before, at::IntArrayRef dilation, int64_t Ho, int64_t Wo);
std::tuple<at::Tensor, int64_t, int64_t, int64_t, int64_t> blocks_tap_hist(
    const at::Tensor& x, int64_t x_off, int64_t frac_bits, int64_t groups, int64_t kh, int64_t kw,
    at::IntArrayRef stride, at::IntArrayRef pad_before, at::IntArrayRef dilation, int64_t Ho, int64_t Wo,
    int64_t x_block, int64_t x_block_bits);

// A loop's TelemetryCounts while telemetry is on, added to the thread's counters when it ends.
// The epilogues take the Tally itself and record() is inline, and the destructor hands
// telemetry_add a copy: no pointer to counts_ escapes, so the compiler keeps the counts in
// registers (counters in memory cost a store-to-load chain per output, +80% on the direct
// kernels' epilogue). get() is for a callee that is not inlined (the two-stage chunks).
class Tally {
 public:
  Tally() : on_(telemetry_on()) {}
  ~Tally() {
    if (on_) telemetry_add(TelemetryCounts(counts_));
  }
  Tally(const Tally&) = delete;
  Tally& operator=(const Tally&) = delete;
  bool on() const { return on_; }
  TORCHLNS_INLINE void record(int64_t total, int64_t T, bool wrap) { counts_.record(total, T, wrap, false); }
  TelemetryCounts* get() { return on_ ? &counts_ : nullptr; }

 private:
  bool on_;
  TelemetryCounts counts_;
};

// A finite bias as rne(b / 2^Λ), clamped to ±(2^63 - 1024), which cannot change a saturated
// result (Note: reference MAC arithmetic in torchlns/ops/reference.py).
TORCHLNS_INLINE int64_t bias_units(float bias, int64_t acc_lsb) {
  constexpr double kBiasClamp = 9223372036854774784.0;  // 2^63 - 1024
  const double bd = __builtin_nearbyint(double(bias) * pow2(-acc_lsb));
  return int64_t(bd > kBiasClamp ? kBiasClamp : (bd < -kBiasClamp ? -kBiasClamp : bd));
}

// A bias as the fixed epilogue adds it: bias_units (none: 0), or NaN. Loops make it once per
// bias, not per output: the conversion calls nearbyint.
struct FixedBias {
  int64_t units = 0;
  bool nan = false;
};
TORCHLNS_INLINE FixedBias fixed_bias(const float* bias, int64_t acc_lsb) {
  if (!bias) return {};
  if (*bias != *bias) return {0, true};
  return {bias_units(*bias, acc_lsb), false};
}

// count: false where another pass reports this output's total (Note: accumulator telemetry).
TORCHLNS_INLINE float fixed_epilogue(int64_t acc, const FixedBias& b, int64_t T, int64_t acc_lsb, bool nan_out,
                                     Tally& tally, bool count = true) {
  nan_out |= b.nan;  // a sum beyond int64 is far beyond the rails: ±(2^63 - 1) saturates the same
  if (__builtin_add_overflow(acc, b.units, &acc)) acc = b.units > 0 ? INT64_MAX : -INT64_MAX;
  if (tally.on() && count && !nan_out) tally.record(acc, T, false);
  acc = acc > T ? T : (acc < -T ? -T : acc);
  return nan_out ? __builtin_nanf("") : float(double(acc) * pow2(acc_lsb));
}
TORCHLNS_INLINE float fixed_epilogue(int64_t acc, const float* bias, int64_t T, int64_t acc_lsb, bool nan_out,
                                     Tally& tally) {
  return fixed_epilogue(acc, fixed_bias(bias, acc_lsb), T, acc_lsb, nan_out, tally);
}

// x reduced modulo 2^bits into [-2^(bits-1), 2^(bits-1)) (bits <= 48).
TORCHLNS_INLINE int64_t wrap_to(int64_t x, int bits) {
  const uint64_t half = uint64_t(1) << (bits - 1);
  return int64_t((uint64_t(x) + half) & (2 * half - 1)) - int64_t(half);
}

// fixed_epilogue with overflow="wrap" (see Note: overflow and chunks in torchlns/ops/reference.py):
// the total and the bias's rne(b / 2^Λ), each reduced modulo 2^W, then their sum.
TORCHLNS_INLINE float fixed_epilogue_wrap(int64_t acc, const float* bias, int acc_bits, int64_t acc_lsb, bool nan_out,
                                          Tally& tally) {
  int64_t total = acc;  // for telemetry: the sum before the wrap (beyond int64: ±(2^63 - 1))
  if (bias) {
    if (*bias != *bias) {
      nan_out = true;
    } else {
      const int64_t b = bias_units(*bias, acc_lsb);
      if (__builtin_add_overflow(acc, b, &total)) total = b > 0 ? INT64_MAX : -INT64_MAX;
      acc = wrap_to(wrap_to(acc, acc_bits) + wrap_to(b, acc_bits), acc_bits);
    }
  }
  const int64_t T = (int64_t(1) << (acc_bits - 1)) - 1;
  if (tally.on() && !nan_out) tally.record(total, T, true);
  acc = wrap_to(acc, acc_bits);
  return nan_out ? __builtin_nanf("") : float(double(acc) * pow2(acc_lsb));
}

// Which LNS MAC kernel runs: chosen per call from the shape (automatic), or forced, so that
// the tests check every kernel on the same inputs. A forced kernel that cannot run a case
// (the direct kernels need AVX2 and F <= 3, or AVX-512 and F <= 4; the class form needs
// the float32 accumulator and an exponent range) falls back as automatic would.
enum class MacPath : int { automatic = 0, direct = 1, classes = 2, scalar = 3 };
MacPath mac_path();
void set_mac_path(MacPath path);

// The order the CPU kernels are tried in: the direct kernels first (automatic or forced),
// then the float32 accumulator's remainder classes (forced, or automatic up to F = 5:
// beyond it 2^F class products cost more than the scalar kernel), then the scalar kernel.
// How often the direct kernels ran with tables, with product pairs, or declined a call
// (another kernel then ran): the tests check which kernel a case reaches, the bench reports it.
// Dynamic blocks of narrow groups (see Note: dynamic blocks by repair in conv_cpu.cpp): the
// static kernel alone, the static kernel with repaired positions, or the k-major columns.
enum class BlocksPath { unchanged = 0, repaired = 1, columns = 2 };
struct DirectCounts {
  int64_t table, pairs, declined, blocks_unchanged, blocks_repaired, blocks_columns;
};
void count_blocks_path(BlocksPath p);
DirectCounts direct_counts();
void reset_direct_counts();
TORCHLNS_INLINE bool try_direct(MacPath p) { return p == MacPath::automatic || p == MacPath::direct; }
TORCHLNS_INLINE bool try_classes(MacPath p, int64_t frac_bits) {
  return p == MacPath::classes || (p == MacPath::automatic && frac_bits <= 5);
}

// The direct kernels (direct_mac.cpp); nullopt where they cannot run the case. lns_mm_direct's
// groups: x (M, groups*Kg) against w (N, Kg), group g of the outputs reading x's g-th Kg
// columns; L > 0: the output is channels first, (M / L, N, L); kmajor_M >= 0: x is k-major,
// (K, ld) with kmajor_M columns in use and ld >= kmajor_M + direct_cols_run().
std::optional<at::Tensor> lns_mm_direct(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                                        const at::Tensor& w_offset, const at::Tensor& table,
                                        const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                                        int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb,
                                        int64_t groups = 1, int64_t L = 0, int64_t kmajor_M = -1);
std::optional<at::Tensor> lns_conv_direct(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                                          const at::Tensor& w_offset, const at::Tensor& table,
                                          const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                                          int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb,
                                          at::IntArrayRef stride, at::IntArrayRef pad_before, at::IntArrayRef dilation,
                                          int64_t Ho, int64_t Wo, int64_t groups,
                                          const uint8_t* telemetry_skip = nullptr);

// The columns kernel over per-group segments of a flat k-major code buffer (the repair of
// dynamic blocks in conv_cpu.cpp): group g (w's rows g Ng..) has S[g] columns, its k-th row
// at codes[seg[g] + k ld[g] ..] with ld[g] >= S[g] + direct_cols_run(). Returns the finished
// outputs (bias, epilogue, NaN), group g's at [sum of Ng S[g'] for g' < g] + (n - g Ng) S[g] + j.
std::optional<at::Tensor> lns_cols_segments(const at::Tensor& codes, const at::Tensor& x_offset,
                                            const std::vector<int64_t>& seg, const std::vector<int64_t>& ld,
                                            const std::vector<int64_t>& S, const at::Tensor& w,
                                            const at::Tensor& w_offset, const at::Tensor& table,
                                            const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                                            int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb);

// torchlns::lns_mm on the CPU (mac_cpu.cpp); the convolution kernel calls it per group.
at::Tensor lns_mm_cpu(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w, const at::Tensor& w_offset,
                      const at::Tensor& table, const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                      int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb,
                      c10::string_view overflow = "saturate", int64_t chunk = 0, int64_t chunk_bits = 0);

}  // namespace torchlns
