// lns_mm and lns_conv through the direct kernels (see Note: direct kernels in lns_direct.h):
// operand packing, the choice of loop order, the exactness limits and the epilogues.

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <functional>
#include <limits>
#include <sstream>
#include <tuple>

#include "common.h"
#include "direct.h"
#include "weight_cache.h"

namespace torchlns {
namespace {

std::atomic<int64_t> counts_table{0}, counts_pairs{0}, counts_declined{0};
std::atomic<int64_t> counts_blocks[3] = {{0}, {0}, {0}};

struct Plan {
  bool fixed = false;
  int F = 0;
  DirectTables tabs;
  FieldLayout x_layout{}, w_layout{};
  int64_t T = 0, acc_lsb = 0, acc_bits = 0;
  const PairTables* pair = nullptr;  // product pairs (see Note: product pairs in lns_direct.h)
};

// Product pairs, where no table kernel runs this F or this table.
std::optional<Plan> pair_plan(const double* C, int F, bool fixed, int64_t acc_bits, int64_t acc_lsb) {
  if (!direct_pairs_supported()) return std::nullopt;
  const PairTables& pt = pair_tables(C, F);
  if (!pt.ok) return std::nullopt;
  Plan p;
  p.fixed = fixed;
  p.F = F;
  p.pair = &pt;
  p.T = fixed ? (int64_t(1) << (acc_bits - 1)) - 1 : 0;
  p.acc_lsb = fixed ? acc_lsb : 0;
  p.acc_bits = acc_bits;
  // The fixed accumulator's 2^-Λ joins the weights' octave.
  p.x_layout = {false, 0u, 23, 31, false, 0, 0, &pt};
  p.w_layout = {false, uint32_t(int32_t(fixed ? -acc_lsb : 0)), 23, 31, false, 0, 0, &pt};
  return p;
}

// Whether the direct kernels can run this MAC, and the field layouts (see Note: direct kernels).
std::optional<Plan> plan_for(const at::Tensor& table, int64_t frac_bits, bool fixed, int64_t acc_bits,
                             int64_t acc_lsb) {
  const int F = int(frac_bits);
  if (fixed && acc_bits > 32) return std::nullopt;
  const auto tab = table.contiguous();
  if (!direct_supported(F)) return pair_plan(tab.data_ptr<double>(), F, fixed, acc_bits, acc_lsb);
  Plan p;
  p.fixed = fixed;
  p.F = F;
  const bool split = !(direct_lanes() == 8 && F == 3);  // see Note: direct kernels
  p.tabs = direct_tables(tab.data_ptr<double>(), F, fixed, split);
  if (!p.tabs.ok) return pair_plan(tab.data_ptr<double>(), F, fixed, acc_bits, acc_lsb);
  const uint32_t R = 1u << F;
  if (fixed) {
    p.T = (int64_t(1) << (acc_bits - 1)) - 1;
    p.acc_lsb = acc_lsb;
    if (split) {
      p.x_layout = {true, 0u, 9, 5, true, kZeroFieldFixed, kZeroFlagsFixed};                             // -q_x
      p.w_layout = {true, uint32_t(int32_t(29 + acc_lsb)), 9, 5, true, kZeroFieldFixed, kZeroFlagsFixed};  // -q_w + 29 + Λ
    } else {
      p.x_layout = {true, 0xFFFFFFFFu, 8, 0, false, kZeroField};                   // ~g_x
      p.w_layout = {true, uint32_t(int32_t((31 + acc_lsb) * R)), 8, 0, false, kZeroField};  // -g_w + (31 + Λ) 2^F
    }
  } else if (split) {
    p.x_layout = {false, 127u, 23, 31, true, kZeroFieldSplit, kZeroFlagsSplit};
    p.w_layout = {false, 0u, 23, 31, true, kZeroFieldSplit, kZeroFlagsSplit};
  } else {
    p.x_layout = {false, 127u * R, 23 - F, 31, false, kZeroField};
    p.w_layout = {false, 0u, 23 - F, 31, false, kZeroField};
  }
  return p;
}

// How many fixed-point products of magnitude up to min(biggest, T) an int32 lane can sum.
int64_t int32_chunk(double biggest, int64_t T) {
  const double bound = std::max(1.0, std::min(biggest, double(T)));
  return std::max<int64_t>(1, int64_t(std::floor(2147483647.0 / bound)));
}

// Kernel arguments for operands whose octaves span [x_lo, x_hi] and [w_lo, w_hi]; nullopt
// when a float32 product could leave the normal range (the class form or the scalar kernel
// then runs).
std::optional<DirectArgs> args_for(const Plan& p, int32_t x_lo, int32_t x_hi, int32_t w_lo, int32_t w_hi, bool w_zeros) {
  DirectArgs a{p.fixed, p.F, int32_t(p.T), 1, false, false, w_zeros, p.x_layout.zero_field, p.x_layout.zero_flags,
               p.x_layout.split,
               int32_t(1u << p.x_layout.sign_bit), p.tabs.table};
  if (p.pair) {  // every intermediate a normal float32 (see Note: product pairs)
    a.pair = true;
    a.sigma = p.pair->sigma;
    a.zero_field = 0;
    const int64_t shift = p.fixed ? -p.acc_lsb : 0, emin = p.pair->emin;
    if (int64_t(x_lo) + emin < -126 || x_hi > 126 || w_lo + shift + emin < -126 || w_hi + shift > 126)
      return std::nullopt;
    // Products lie below 2^(q_hi + 1) (C may be 2.0, and q_hi holds the carry).
    const int64_t q_lo = int64_t(x_lo) + w_lo + shift, q_hi = int64_t(x_hi) + w_hi + shift + 1;
    if (q_hi + 1 > 127) return std::nullopt;
    if (!p.fixed) {  // and Veltkamp's v (2^(23-P) + 1) stays finite
      if (q_lo + emin < -126 || (a.sigma != 0.0f && q_hi + 2 + std::ilogb(a.sigma) > 127)) return std::nullopt;
      return a;
    }
    // Fixed: products below 2^-1 truncate to 0 however they round, so only octaves >= -2 need
    // normal intermediates.
    if (-2 + emin < -126) return std::nullopt;
    a.saturate = q_hi + 1 >= p.acc_bits - 1;
    a.sat_bound = float(std::ldexp(1.0, int(p.acc_bits - 1)));
    a.chunk = int32_chunk(std::ldexp(1.0, int(std::min<int64_t>(q_hi + 1, 62))), p.T);
    return a;
  }
  const int64_t q_lo = int64_t(x_lo) + w_lo, q_hi = int64_t(x_hi) + w_hi + 1;  // +1: the carry of r_x + r_w
  if (!p.fixed) {  // exponent fields 127 + q (+1 where C_ext >= 2) within 1..254
    if (q_lo < -126 || q_hi > 127) return std::nullopt;
    return a;
  }
  // The shift a = 30 + Λ - q (29 + Λ - q_x - q_w for split fields: the same) is negative,
  // and the product saturates, only above q = 30 + Λ. The largest product bounds the chunk.
  a.saturate = q_hi > 30 + p.acc_lsb;
  const double biggest = a.saturate ? double(p.T)
                                    : std::ldexp(double(p.tabs.L_max), int(q_hi - p.acc_lsb - p.tabs.P));
  a.clamp_T = biggest > double(p.T);
  a.chunk = int32_chunk(biggest, p.T);
  return a;
}

std::string weight_tag(const char* what, const Plan& p, int64_t bits, int64_t groups, int64_t NB) {
  std::ostringstream tag;
  tag << what << ":b" << bits << ":F" << p.F << ":fixed" << p.fixed << ":add" << p.w_layout.add << ":split"
      << p.w_layout.split << ":pair" << (p.pair != nullptr) << ":g" << groups << ":B" << NB << ":t";
  for (int i = 0; i < 32; ++i) tag << p.tabs.table[i] << ',';
  return tag.str();
}

// Weight fields for the direct kernels, prepared once per weight (see Note: prepared weights
// in weight_cache.h): [0] the rows layout [group][block][Kg][NB] (or plain (N, Kg) fields
// for the columns kernel), [1] int64 {q_lo, q_hi, has zero codes, has NaN}, [2] bool NaN per output.
// w2 is (N, Kg) codes in the kernel's k order.
// operands() gives w2 and its offsets; it runs only when the cache misses.
std::vector<at::Tensor> weight_fields(const std::function<std::pair<at::Tensor, at::Tensor>()>& operands, int64_t bits,
                                      const Plan& p, int64_t groups, int64_t NB, const at::Tensor& key,
                                      const at::Tensor& key_param) {
  return prepared_weight(key, key_param, weight_tag(NB ? "direct-rows" : "direct-cols", p, bits, groups, NB), [&] {
    const auto [w2, w_off2] = operands();
    const int64_t N = w2.size(0), Kg = w2.size(1), Ng = N / groups;
    const PackedFields f = packed_fields(w2, w_off2, bits, p.F, p.w_layout);
    const int32_t* src = f.fields.data_ptr<int32_t>();
    const int32_t zero = p.w_layout.zero_field;
    bool zeros = false;
    for (int64_t i = 0; i < N * Kg; ++i) zeros |= src[i] == zero;
    at::Tensor out = f.fields;
    if (p.pair) {  // heads then tails: rows [group][block][Kg][head NB | tail NB], columns (N, head Kg | tail Kg)
      const int64_t NK = N * Kg, nblocks = NB ? (Ng + NB - 1) / NB : 0;
      out = at::empty({NB ? groups * nblocks * Kg * 2 * NB : 2 * NK}, f.fields.options());
      int32_t* dst = out.data_ptr<int32_t>();
      if (NB) {
        at::parallel_for(0, groups * nblocks, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t g = t / nblocks, b = t % nblocks;
            for (int64_t k = 0; k < Kg; ++k)
              for (int64_t h = 0; h < 2; ++h)
                for (int64_t c = 0; c < NB; ++c) {
                  const int64_t n = b * NB + c;
                  dst[((t * Kg + k) * 2 + h) * NB + c] = n < Ng ? src[h * NK + (g * Ng + n) * Kg + k] : 0;
                }
          }
        });
      } else {
        for (int64_t n = 0; n < N; ++n)
          for (int64_t h = 0; h < 2; ++h) std::copy(src + h * NK + n * Kg, src + h * NK + (n + 1) * Kg, dst + (2 * n + h) * Kg);
      }
    } else if (NB) {
      const int64_t nblocks = (Ng + NB - 1) / NB;
      out = at::empty({groups * nblocks * Kg * NB}, f.fields.options());
      int32_t* dst = out.data_ptr<int32_t>();
      at::parallel_for(0, groups * nblocks, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t g = t / nblocks, b = t % nblocks;
          for (int64_t k = 0; k < Kg; ++k)
            for (int64_t c = 0; c < NB; ++c) {
              const int64_t n = b * NB + c;
              dst[(t * Kg + k) * NB + c] = n < Ng ? src[(g * Ng + n) * Kg + k] : zero;
            }
        }
      });
    }
    const auto nan_rows = f.any_nan ? f.nan.reshape({N, Kg}).any(1)
                                    : at::zeros({N}, w2.options().dtype(at::kBool));
    return std::vector<at::Tensor>{
        out, at::tensor({int64_t(f.q_lo), int64_t(f.q_hi), int64_t(zeros), int64_t(f.any_nan)}, at::kLong), nan_rows};
  });
}

// Rows of a (M, K) field matrix, as (k, field) pairs of their non-zero fields.
struct MatrixRows : RowSource {
  const int32_t* fields;
  int64_t K, groups;
  int32_t zero;
  MatrixRows(const int32_t* f, int64_t k, int32_t z, int64_t g = 1) : fields(f), K(k), groups(g), zero(z) {}
  void build(int64_t m0, int64_t m1, int32_t* pairs, int32_t* counts) const override {
    const int S = entry();
    const int64_t Kg = K / groups;
    for (int64_t seg = m0 * groups; seg < m1 * groups; ++seg) {  // (row, group): its Kg fields
      const int32_t* f = fields + seg * Kg;
      int32_t* p = pairs + S * (seg - m0 * groups) * Kg;
      int32_t c = 0;
      if (tail_delta) {
        for (int64_t k = 0; k < Kg; ++k) {
          p[3 * c] = int32_t(k);
          p[3 * c + 1] = f[k];
          p[3 * c + 2] = f[k + tail_delta];
          c += f[k] != zero;
        }
      } else {
        for (int64_t k = 0; k < Kg; ++k) {  // branch-free compaction: half of a ReLU's outputs are zero
          p[2 * c] = int32_t(k);
          p[2 * c + 1] = f[k];
          c += f[k] != zero;
        }
      }
      counts[seg - m0 * groups] = c;
    }
  }
};

// The epilogue of one output: bias, and for the fixed accumulator its saturation and scaling.
// fb: fixed_bias(bias), made once per bias by the loop (fixed_biases).
TORCHLNS_INLINE float finish(const Plan& p, const float* sf, const int64_t* si, int64_t i, const float* bias,
                             const FixedBias& fb, Tally& tally, bool count = true) {
  return si ? fixed_epilogue(si[i], fb, p.T, p.acc_lsb, false, tally, count) : (bias ? sf[i] + *bias : sf[i]);
}

std::vector<FixedBias> fixed_biases(const float* b, int64_t n, int64_t acc_lsb) {
  std::vector<FixedBias> fbs(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) fbs[j] = fixed_bias(b ? b + j : nullptr, acc_lsb);
  return fbs;
}

// Sums of rows m into y[m * ld + n] (linear) or y[(img * N + n) * L + l] with m = img * L + l
// (a convolution's channels-first output).
// skip (a convolution's telemetry): per (img * groups + n / Ng) * L + l, nonzero where another
// pass reports the output's total (see Note: accumulator telemetry in common.h).
struct OutputSink : RowSink {
  const Plan& plan;
  const float* bias;
  float* y;
  int64_t N, L;
  bool channels_first;
  const uint8_t* skip = nullptr;
  int64_t Ng = 1, groups = 1;
  std::vector<FixedBias> fbs;  // per n
  OutputSink(const Plan& p, const float* b, float* out, int64_t n, int64_t l, bool cf)
      : plan(p), bias(b), y(out), N(n), L(l), channels_first(cf), fbs(fixed_biases(b, n, p.acc_lsb)) {}
  void store(int64_t m0, int64_t m1, int64_t n0, int64_t n1, const float* sf, const int64_t* si) const override {
    const int64_t width = n1 - n0;
    int64_t img = m0 / L, l = m0 % L;
    Tally tally;
    for (int64_t m = m0; m < m1; ++m) {
      float* row = channels_first ? y + img * N * L + l : y + m * N;
      const int64_t step = channels_first ? L : 1;
      for (int64_t n = n0; n < n1; ++n)
        row[n * step] = finish(plan, sf, si, (m - m0) * width + (n - n0), bias ? bias + n : nullptr, fbs[n], tally,
                               !(skip && skip[(img * groups + n / Ng) * L + l]));
      if (++l == L) l = 0, ++img;
    }
  }
};

// Columns of a transposed (K, ld) field matrix: runs of M positions; sums [n][m].
struct TransposedCols : ColSource {
  const int32_t* xt;
  int64_t K, M, ld;
  TransposedCols(const int32_t* x, int64_t k, int64_t m, int64_t l) : xt(x), K(k), M(m), ld(l) {}
  int64_t tasks() const override { return (M + direct_cols_run() - 1) / direct_cols_run(); }
  int x_at(int64_t task, int64_t g, const int32_t** xk) const override {  // K: per group
    const int64_t m0 = task * direct_cols_run();
    for (int64_t k = 0; k < K; ++k) xk[k] = xt + (g * K + k) * ld + m0;
    return int(std::min(direct_cols_run(), M - m0));
  }
  int64_t out_at(int64_t task, int64_t n) const override { return n * M + task * direct_cols_run(); }
};

// nullopt, counted as declined.
std::nullopt_t declined() {
  counts_declined.fetch_add(1, std::memory_order_relaxed);
  return std::nullopt;
}

void count_run(const Plan& p) { (p.pair ? counts_pairs : counts_table).fetch_add(1, std::memory_order_relaxed); }

// The columns kernel's sums of src, in a scratch buffer of `count` sums: float32, or int64
// for the fixed accumulator (the other pointer null); all zero when there is no k.
std::pair<float*, int64_t*> column_sums(const DirectArgs& a, const ColSource& src, int64_t groups, int64_t Kg,
                                        const int32_t* w, int64_t Ng, int64_t count) {
  int32_t* buf = scratch(2, a.fixed ? 2 * count : count);
  float* sf = a.fixed ? nullptr : reinterpret_cast<float*>(buf);
  int64_t* si = a.fixed ? reinterpret_cast<int64_t*>(buf) : nullptr;
  if (Kg) {
    direct_cols(a, src, groups, Kg, w, Ng, sf, si);
  } else if (a.fixed) {
    std::fill(si, si + count, 0);
  } else {
    std::fill(sf, sf + count, 0.0f);
  }
  return {sf, si};
}

}  // namespace

DirectCounts direct_counts() {
  return {counts_table.load(), counts_pairs.load(), counts_declined.load(), counts_blocks[0].load(),
          counts_blocks[1].load(), counts_blocks[2].load()};
}
void reset_direct_counts() {
  counts_table = 0, counts_pairs = 0, counts_declined = 0;
  for (auto& c : counts_blocks) c = 0;
}
void count_blocks_path(BlocksPath p) { counts_blocks[int(p)].fetch_add(1, std::memory_order_relaxed); }

std::optional<at::Tensor> lns_mm_direct(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                                        const at::Tensor& w_offset, const at::Tensor& table,
                                        const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                                        int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb,
                                        int64_t groups, int64_t L, int64_t kmajor_M) {
  const auto plan = plan_for(table, frac_bits, fixed, acc_bits, acc_lsb);
  if (!plan) return declined();
  // k-major x: (K, ld) with M columns in use and ld >= M + direct_cols_run() (the columns
  // kernel reads whole runs), for the columns kernel only.
  const bool kmajor = kmajor_M >= 0;
  const int64_t M = kmajor ? kmajor_M : x.size(0), K = x.size(kmajor ? 0 : 1), N = w.size(0), Kg = w.size(1),
                Ng = N / groups;
  TORCH_CHECK(K == groups * Kg && N == groups * Ng && (!L || M % L == 0), "lns_mm_direct: bad grouped shapes");
  TORCH_CHECK(!kmajor || x.size(1) >= M + direct_cols_run(), "lns_mm_direct: k-major x needs run padding");
  const bool by_rows = Ng >= direct_lanes() / 2 && !kmajor;
  const int64_t NB = by_rows ? direct_block(Ng) : 0;
  const auto wf = weight_fields([&] { return std::make_pair(w, w_offset.expand({N, Kg})); }, w_bits, *plan, groups,
                                NB, w, w_offset);
  const int64_t* wq = wf[1].data_ptr<int64_t>();
  const int pair = plan->pair ? 2 : 1;
  int32_t* fields = scratch(0, pair * x.numel());
  const PackedFields xf = packed_fields(x, x_offset.expand(x.sizes()), x_bits, plan->F, plan->x_layout, fields);
  const auto args = args_for(*plan, xf.q_lo, xf.q_hi, int32_t(wq[0]), int32_t(wq[1]), wq[2] != 0);
  if (!args) return declined();
  count_run(*plan);
  // (M, N), or channels first (M / L, N, L): the layout of a convolution's output.
  auto out = L ? at::empty({M / L, N, L}, x.options().dtype(at::kFloat)) : at::empty({M, N}, x.options().dtype(at::kFloat));
  std::optional<at::Tensor> b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  const float* b = b32 ? b32->data_ptr<float>() : nullptr;
  if (by_rows) {
    MatrixRows src(fields, K, plan->x_layout.zero_field, groups);
    if (plan->pair) src.tail_delta = M * K;
    const OutputSink sink(*plan, b, out.data_ptr<float>(), N, L ? L : 1, L != 0);
    if (M && N) direct_rows(*args, src, sink, M, groups, Kg, wf[0].data_ptr<int32_t>(), Ng, NB);
  } else if (M && N) {  // few outputs per group: positions along the lanes, sums [n][m]
    const int64_t ld = kmajor ? x.size(1) : M + direct_cols_run();
    int32_t* xt = fields;
    if (!kmajor) {  // transposed in tiles, so that both sides move along cache lines
      constexpr int64_t kTile = 32;
      xt = scratch(1, pair * K * ld);
      const int64_t ktiles = (K + kTile - 1) / kTile;
      at::parallel_for(0, pair * ktiles, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t h = t / ktiles, k0 = (t % ktiles) * kTile, k1 = std::min(K, k0 + kTile);
          const int32_t* f = fields + h * M * K;
          int32_t* o = xt + h * K * ld;
          for (int64_t m0 = 0; m0 < M; m0 += kTile)
            for (int64_t k = k0; k < k1; ++k)
              for (int64_t m = m0; m < std::min(M, m0 + kTile); ++m) o[k * ld + m] = f[m * K + k];
        }
      });
    }
    auto sums = at::zeros({N, M}, x.options().dtype(fixed ? at::kLong : at::kFloat));
    TransposedCols src(xt, Kg, M, ld);
    if (plan->pair) src.tail_delta = K * ld;
    if (Kg)
      direct_cols(*args, src, groups, Kg, wf[0].data_ptr<int32_t>(), Ng, fixed ? nullptr : sums.data_ptr<float>(),
                  fixed ? sums.data_ptr<int64_t>() : nullptr);
    const float* sf = fixed ? nullptr : sums.data_ptr<float>();
    const int64_t* si = fixed ? sums.data_ptr<int64_t>() : nullptr;
    float* y = out.data_ptr<float>();
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      Tally tally;
      for (int64_t n = n0; n < n1; ++n) {
        const float* bn = b ? b + n : nullptr;
        const FixedBias fb = fixed_bias(bn, plan->acc_lsb);
        for (int64_t m = 0; m < M; ++m)
          y[L ? ((m / L) * N + n) * L + m % L : m * N + n] = finish(*plan, sf, si, n * M + m, bn, fb, tally);
      }
    });
  }
  // NaN dominates its dot products (even against a zero partner), within its group.
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (xf.any_nan) {
    auto hit = kmajor ? xf.nan.reshape({groups, Kg, x.size(1)}).narrow(2, 0, M).any(1).t().unsqueeze(2)
                            .expand({M, groups, Ng}).reshape({M, N})
                      : xf.nan.reshape({M, groups, Kg}).any(2, true).expand({M, groups, Ng}).reshape({M, N});
    out.masked_fill_(L ? hit.reshape({M / L, L, N}).permute({0, 2, 1}) : hit, nan);
  }
  if (wq[3]) out.masked_fill_(L ? wf[2].reshape({1, N, 1}) : wf[2].reshape({1, N}), nan);
  return out;
}

namespace {

// Columns of per-group segments of a flat k-major code buffer: group g's S[g] columns at
// seg[g] + k * ld[g] + j; sums at sums_at[g] + (n - g Ng) ld[g] + j. Groups with fewer runs
// than others have none left for the later tasks (count 0: the driver skips them).
struct SegmentCols : ColSource {
  const int32_t* xf;
  const std::vector<int64_t>&seg, &ld, &S, &sums_at;
  int64_t Kg, Ng, runs;
  SegmentCols(const int32_t* f, const std::vector<int64_t>& seg_, const std::vector<int64_t>& ld_,
              const std::vector<int64_t>& S_, const std::vector<int64_t>& sums_at_, int64_t kg, int64_t ng)
      : xf(f), seg(seg_), ld(ld_), S(S_), sums_at(sums_at_), Kg(kg), Ng(ng), runs(0) {
    for (const int64_t s : S) runs = std::max(runs, (s + direct_cols_run() - 1) / direct_cols_run());
  }
  int64_t tasks() const override { return runs; }
  int x_at(int64_t task, int64_t g, const int32_t** xk) const override {
    const int64_t m0 = task * direct_cols_run();
    if (m0 >= S[g]) return 0;
    for (int64_t k = 0; k < Kg; ++k) xk[k] = xf + seg[g] + k * ld[g] + m0;
    return int(std::min(direct_cols_run(), S[g] - m0));
  }
  int64_t out_at(int64_t task, int64_t n) const override {
    const int64_t g = n / Ng;
    return sums_at[g] + (n - g * Ng) * ld[g] + task * direct_cols_run();
  }
};

}  // namespace

std::optional<at::Tensor> lns_cols_segments(const at::Tensor& codes, const at::Tensor& x_offset,
                                            const std::vector<int64_t>& seg, const std::vector<int64_t>& ld,
                                            const std::vector<int64_t>& S, const at::Tensor& w,
                                            const at::Tensor& w_offset, const at::Tensor& table,
                                            const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                                            int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb) {
  const auto plan = plan_for(table, frac_bits, fixed, acc_bits, acc_lsb);
  if (!plan) return declined();
  const int64_t groups = int64_t(S.size()), N = w.size(0), Kg = w.size(1), Ng = N / groups;
  TORCH_CHECK(N == groups * Ng && seg.size() == S.size() && ld.size() == S.size() && codes.dim() == 1,
              "lns_cols_segments: bad segments");
  for (int64_t g = 0; g < groups; ++g)
    TORCH_CHECK(ld[g] >= S[g] + direct_cols_run() && seg[g] + Kg * ld[g] <= codes.numel(),
                "lns_cols_segments: a segment needs run padding");
  const auto wf = weight_fields([&] { return std::make_pair(w, w_offset.expand({N, Kg})); }, w_bits, *plan, groups,
                                0, w, w_offset);
  const int64_t* wq = wf[1].data_ptr<int64_t>();
  const int pair = plan->pair ? 2 : 1;
  int32_t* fields = scratch(0, pair * codes.numel());
  const PackedFields xf = packed_fields(codes, x_offset.reshape({1}).expand(codes.sizes()), x_bits, plan->F,
                                        plan->x_layout, fields);
  const auto args = args_for(*plan, xf.q_lo, xf.q_hi, int32_t(wq[0]), int32_t(wq[1]), wq[2] != 0);
  if (!args) return declined();
  count_run(*plan);
  std::vector<int64_t> sums_at(static_cast<size_t>(groups)), out_at(static_cast<size_t>(groups));
  int64_t total = 0, outs = 0;
  for (int64_t g = 0; g < groups; ++g) sums_at[g] = total, total += Ng * ld[g], out_at[g] = outs, outs += Ng * S[g];
  SegmentCols src(fields, seg, ld, S, sums_at, Kg, Ng);
  if (plan->pair) src.tail_delta = codes.numel();
  float* sf;  // not a structured binding: the lambdas below capture them
  int64_t* si;
  std::tie(sf, si) = column_sums(*args, src, groups, Kg, wf[0].data_ptr<int32_t>(), Ng, total);
  std::optional<at::Tensor> b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  const float* b = b32 ? b32->data_ptr<float>() : nullptr;
  const std::vector<FixedBias> fbs = fixed_biases(b, N, plan->acc_lsb);
  auto out = at::empty({outs}, codes.options().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  const bool* x_nan = xf.any_nan ? xf.nan.data_ptr<bool>() : nullptr;
  const bool* w_nan = wq[3] ? wf[2].data_ptr<bool>() : nullptr;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    Tally tally;
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t j = 0; j < S[g]; ++j) {
        bool hit = false;  // NaN dominates its dot products (even against a zero partner)
        for (int64_t k = 0; x_nan && k < Kg; ++k) hit |= x_nan[seg[g] + k * ld[g] + j];
        for (int64_t n = g * Ng; n < (g + 1) * Ng; ++n)
          y[out_at[g] + (n - g * Ng) * S[g] + j] =
              hit || (w_nan && w_nan[n]) ? nan : finish(*plan, sf, si, sums_at[g] + (n - g * Ng) * ld[g] + j,
                                                        b ? b + n : nullptr, fbs[n], tally);
      }
  });
  return out;
}

namespace {

// Rows im2col of NHWC fields straight into (k, field) pairs per (output position, group),
// with k = tap * Cin_g + c (the weights are packed in that order too); padding and zero
// codes are skipped.
struct ConvRows : RowSource {
  const int32_t* nhwc;
  int32_t zero;
  int64_t H, W, C, groups, kh, kw, Ho, Wo;
  int64_t stride[2], pad[2], dilation[2];
  void build(int64_t m0, int64_t m1, int32_t* pairs, int32_t* counts) const override {
    const int64_t Cg = C / groups, Kg = Cg * kh * kw, L = Ho * Wo;
    const int S = entry();
    for (int64_t r = m0; r < m1; ++r) {
      const int64_t img = r / L, oh = (r % L) / Wo, ow = r % Wo;
      for (int64_t g = 0; g < groups; ++g) {
        int32_t* p = pairs + S * ((r - m0) * groups + g) * Kg;
        int32_t c_out = 0;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t ih = oh * stride[0] - pad[0] + i * dilation[0];
          if (ih < 0 || ih >= H) continue;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t iw = ow * stride[1] - pad[1] + j * dilation[1];
            if (iw < 0 || iw >= W) continue;
            const int32_t* src = nhwc + ((img * H + ih) * W + iw) * C + g * Cg;
            const int32_t k0 = int32_t((i * kw + j) * Cg);
            if (tail_delta) {
              for (int64_t c = 0; c < Cg; ++c) {
                p[3 * c_out] = k0 + int32_t(c);
                p[3 * c_out + 1] = src[c];
                p[3 * c_out + 2] = src[c + tail_delta];
                c_out += src[c] != zero;
              }
              continue;
            }
            for (int64_t c = 0; c < Cg; ++c) {  // branch-free compaction
              p[2 * c_out] = k0 + int32_t(c);
              p[2 * c_out + 1] = src[c];
              c_out += src[c] != zero;
            }
          }
        }
        counts[(r - m0) * groups + g] = c_out;
      }
    }
  }
};

// dst[j] = src[j * stride] for j < n; kStride 0: the stride is the run-time one.
template <int kStride>
inline void deinterleave(const int32_t* __restrict src, int32_t* __restrict dst, int64_t n, int64_t stride = kStride) {
  const int64_t s = kStride ? kStride : stride;
  for (int64_t j = 0; j < n; ++j) dst[j] = src[j * s];
}

// Columns of a convolution without im2col. Every input plane is padded (kZeroField) and
// split into sh * sw polyphase planes by (row mod sh, column mod sw), each Rp x Cp with
// Rp = Ho + (kh - 1) dh / sh and Cp = Wo + (kw - 1) dw / sw, so that tap (i, j) of output
// (oh, ow) is element (oh + i dh / sh) Cp + ow + j dw / sw of phase ((i dh) % sh, (j dw) % sw):
// one constant offset per tap over the flat position p = oh Cp + ow. The lanes run over p,
// so one run spans several output rows when the rows are short (MobileNet's 8x8 and 4x4
// depthwise layers would leave 3/4 and 7/8 of the lanes idle with a run per row); the Cp - Wo
// positions past each row's end are summed too and dropped by the epilogue. Sums go to
// [img][n][Ho * Cp]. Tasks are (img, run of p).
struct ConvCols : ColSource {
  const int32_t* p = nullptr;
  int64_t Nb, C, Cg, kh, kw, Ho, Ncout, Rp, Cp, plane, runs, sh, sw, dh, dw;

  ConvCols(const int32_t* src, int64_t Nb_, int64_t C_, int64_t H, int64_t W, int64_t groups, int64_t kh_,
           int64_t kw_, at::IntArrayRef stride, at::IntArrayRef pad, at::IntArrayRef dilation, int64_t Ho_, int64_t Wo,
           int64_t Cout, int32_t zero, bool pairs)
      : Nb(Nb_), C(C_), Cg(C_ / groups), kh(kh_), kw(kw_), Ho(Ho_), Ncout(Cout), sh(stride[0]), sw(stride[1]),
        dh(dilation[0]), dw(dilation[1]) {
    const int64_t run = direct_cols_run();
    Rp = Ho + (kh - 1) * dh / sh;
    Cp = Wo + (kw - 1) * dw / sw;
    runs = (Ho * Cp + run - 1) / run;
    // The last run of the farthest tap reads up to Cp - Wo + run - 1 elements past Rp * Cp.
    const int64_t phase = Rp * Cp, stride_c = sh * sw * phase + Cp + run;
    plane = stride_c;
    // Product pairs: the tails follow the heads in src, so their planes follow too.
    const int64_t planes = Nb * C * (pairs ? 2 : 1);
    if (pairs) tail_delta = Nb * C * stride_c;
    int32_t* dst = scratch(1, planes * stride_c);
    const int64_t pt = pad[0], pl = pad[1];
    const int64_t rows = std::min(H, Rp * sh - pt), cols = std::min(W, Cp * sw - pl);
    at::parallel_for(0, planes, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int32_t* base = dst + t * stride_c;
        std::fill(base, base + stride_c, zero);
        for (int64_t ih = 0; ih < rows; ++ih) {
          const int32_t* in = src + (t * H + ih) * W;
          const int64_t u = ih + pt;  // padded row: phase u % sh, row u / sh
          int32_t* out = base + (u % sh) * sw * phase + (u / sh) * Cp;
          if (sw == 1) {
            std::copy(in, in + cols, out + pl);
            continue;
          }
          for (int64_t ph = 0; ph < sw; ++ph) {  // padded column v = iw + pl: phase v % sw, column v / sw
            const int64_t v0 = ph + ((pl - ph + sw - 1) / sw) * sw;
            if (v0 >= pl + cols) continue;
            // No division per element, and a constant stride for the common 2 (GCC vectorizes it).
            int32_t* o = out + ph * phase + v0 / sw;
            if (sw == 2)
              deinterleave<2>(in + (v0 - pl), o, (pl + cols - v0 + 1) / 2);
            else
              deinterleave<0>(in + (v0 - pl), o, (pl + cols - v0 + sw - 1) / sw, sw);
          }
        }
      }
    });
    p = dst;
  }
  int64_t tasks() const override { return Nb * runs; }
  int x_at(int64_t task, int64_t g, const int32_t** xk) const override {
    const int64_t img = task / runs, p0 = (task % runs) * direct_cols_run();
    const int64_t phase = Rp * Cp;
    int64_t k = 0;
    for (int64_t c = 0; c < Cg; ++c) {
      const int32_t* base = p + (img * C + g * Cg + c) * plane + p0;
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j)
          xk[k++] = base + (((i * dh) % sh) * sw + (j * dw) % sw) * phase + ((i * dh) / sh) * Cp + (j * dw) / sw;
    }
    return int(std::min(direct_cols_run(), Ho * Cp - p0));
  }
  int64_t out_at(int64_t task, int64_t n) const override {
    const int64_t img = task / runs, p0 = (task % runs) * direct_cols_run();
    return (img * Ncout + n) * Ho * Cp + p0;
  }
};

}  // namespace

std::optional<at::Tensor> lns_conv_direct(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                                          const at::Tensor& w_offset, const at::Tensor& table,
                                          const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                                          int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb,
                                          at::IntArrayRef stride, at::IntArrayRef pad_before, at::IntArrayRef dilation,
                                          int64_t Ho, int64_t Wo, int64_t groups, const uint8_t* telemetry_skip) {
  const auto plan = plan_for(table, frac_bits, fixed, acc_bits, acc_lsb);
  if (!plan) return declined();
  const int64_t Nb = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = w.size(0), Cg = w.size(1), kh = w.size(2), kw = w.size(3);
  const int64_t Kg = Cg * kh * kw, Ng = Cout / groups, L = Ho * Wo;
  const bool by_rows = Ng >= direct_lanes() / 2;
  const int64_t NB = by_rows ? direct_block(Ng) : 0;
  const auto wf = weight_fields(
      [&] {  // rows: k = tap * Cin_g + c; columns: PyTorch's (c, tap) order
        const auto w_off = w_offset.expand(w.sizes());
        return by_rows ? std::make_pair(w.permute({0, 2, 3, 1}).reshape({Cout, Kg}),
                                        w_off.permute({0, 2, 3, 1}).reshape({Cout, Kg}))
                       : std::make_pair(w.reshape({Cout, Kg}), w_off.reshape({Cout, Kg}));
      },
      w_bits, *plan, groups, NB, w, w_offset);
  const int64_t* wq = wf[1].data_ptr<int64_t>();
  const bool by_rows_ = by_rows;
  int32_t* fields = scratch(0, x.numel() * (plan->pair ? 2 : 1));
  const PackedFields xf = packed_fields(x, x_offset.expand(x.sizes()), x_bits, plan->F, plan->x_layout, fields, by_rows_);
  const auto args = args_for(*plan, xf.q_lo, xf.q_hi, int32_t(wq[0]), int32_t(wq[1]), wq[2] != 0);
  if (!args) return declined();
  count_run(*plan);
  auto out = at::empty({Nb, Cout, Ho, Wo}, x.options().dtype(at::kFloat));
  std::optional<at::Tensor> b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();
  const float* b = b32 ? b32->data_ptr<float>() : nullptr;
  if (by_rows) {
    ConvRows src;
    src.nhwc = fields;
    src.zero = plan->x_layout.zero_field;
    if (plan->pair) src.tail_delta = x.numel();
    src.H = H, src.W = W, src.C = C, src.groups = groups, src.kh = kh, src.kw = kw, src.Ho = Ho, src.Wo = Wo;
    for (int d = 0; d < 2; ++d) src.stride[d] = stride[d], src.pad[d] = pad_before[d], src.dilation[d] = dilation[d];
    OutputSink sink(*plan, b, out.data_ptr<float>(), Cout, L, true);
    sink.skip = telemetry_skip, sink.Ng = Ng, sink.groups = groups;
    if (out.numel()) direct_rows(*args, src, sink, Nb * L, groups, Kg, wf[0].data_ptr<int32_t>(), Ng, NB);
  } else if (out.numel()) {  // float sums straight into the output; fixed sums [img][n][L] first
    ConvCols src(fields, Nb, C, H, W, groups, kh, kw, stride, pad_before, dilation, Ho, Wo, Cout,
                 plan->x_layout.zero_field, plan->pair != nullptr);
    // Sums [img][n][Ho * Cp] (float32, or int64 for the fixed accumulator); the epilogue
    // drops the Cp - Wo positions past each row and writes (img, n, oh, ow).
    const int64_t wide = Ho * src.Cp, sums = Nb * Cout * wide;
    float* sf;  // not a structured binding: the lambdas below capture them
    int64_t* si;
    std::tie(sf, si) = column_sums(*args, src, groups, Kg, wf[0].data_ptr<int32_t>(), Ng, sums);
    float* y = out.data_ptr<float>();
    const int64_t Cp = src.Cp;
    at::parallel_for(0, Nb * Cout, std::max<int64_t>(1, 4096 / std::max<int64_t>(L, 1)), [&](int64_t r0, int64_t r1) {
      Tally tally;
      for (int64_t r = r0; r < r1; ++r) {
        const float* bn = b ? b + r % Cout : nullptr;
        const FixedBias fb = fixed_bias(bn, plan->acc_lsb);
        const uint8_t* skip = telemetry_skip ? telemetry_skip + ((r / Cout) * groups + (r % Cout) / Ng) * L : nullptr;
        for (int64_t oh = 0; oh < Ho; ++oh) {
          float* yr = y + r * L + oh * Wo;
          const int64_t i0 = r * wide + oh * Cp;
          for (int64_t ow = 0; ow < Wo; ++ow)
            yr[ow] = finish(*plan, sf, si, i0 + ow, bn, fb, tally, !(skip && skip[oh * Wo + ow]));
        }
      }
    });
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (xf.any_nan) {  // every output whose receptive field holds a NaN input
    const int64_t pa0 = std::max<int64_t>(0, (Ho - 1) * stride[0] + (kh - 1) * dilation[0] + 1 - (H + pad_before[0]));
    const int64_t pa1 = std::max<int64_t>(0, (Wo - 1) * stride[1] + (kw - 1) * dilation[1] + 1 - (W + pad_before[1]));
    const auto nan_x = at::constant_pad_nd(xf.nan.to(at::kFloat), {pad_before[1], pa1, pad_before[0], pa0}, 0);
    const auto ones = at::ones({Cout, Cg, kh, kw}, nan_x.options());
    const auto hit = at::conv2d(nan_x, ones, {}, stride, at::IntArrayRef({0, 0}), dilation, groups);
    out.masked_fill_(hit.narrow(2, 0, Ho).narrow(3, 0, Wo) > 0, nan);
  }
  if (wq[3]) out.masked_fill_(wf[2].reshape({1, Cout, 1, 1}), nan);
  return out;
}

}  // namespace torchlns
