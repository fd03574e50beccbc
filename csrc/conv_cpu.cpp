// CPU kernel of torchlns::lns_conv: (N, C, H, W) codes * (Cout, C/groups, kh, kw) codes.
//
// The direct kernels (direct_mac.cpp) run almost every call. Behind them, for the float32
// accumulator: the remainder classes (see Note: remainder classes in common.h) applied
// before im2col, y = sum_i conv2d(A_i, V_i), with oneDNN's direct convolution on
// exactly representable operands, in a fixed class order, so the bits do not depend on the
// thread count or the memory layout. Everything else (the fixed accumulator, asymmetric
// 'same' padding, exponents outside the class form's range, empty tensors): im2col of the
// codes and offsets, the padding being the zero code, then lns_mm per group, as the
// reference does (torchlns/ops/reference.py).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"
#include "direct.h"

namespace torchlns {
namespace {

using at::IntArrayRef;

// Flat input index (into H*W, plus one slot for padding) of each (tap, output position).
at::Tensor im2col_index(int64_t H, int64_t W, int64_t kh, int64_t kw, IntArrayRef stride, IntArrayRef pad_before,
                        IntArrayRef dilation, int64_t Ho, int64_t Wo) {
  auto idx = at::empty({kh * kw, Ho * Wo}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const int64_t ih = i * dilation[0] + oh * stride[0] - pad_before[0];
          const int64_t iw = j * dilation[1] + ow * stride[1] - pad_before[1];
          const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
          *p++ = inside ? ih * W + iw : H * W;
        }
  return idx;
}

// (N, C, H, W) -> (N*L, C*kh*kw) columns in PyTorch's (c, i, j) order; padding is 0.
at::Tensor im2col(const at::Tensor& t, const at::Tensor& idx) {
  const int64_t N = t.size(0), C = t.size(1), taps = idx.size(0), L = idx.size(1);
  auto flat = at::cat({t.reshape({N, C, t.size(2) * t.size(3)}), at::zeros({N, C, 1}, t.options())}, 2);
  auto cols = flat.index_select(2, idx.reshape(-1).to(t.device())).reshape({N, C, taps, L});
  return cols.permute({0, 3, 1, 2}).reshape({N * L, C * taps});
}

// lns_mm per group of (M, groups*Kg) columns against (Cout, Kg) weights -> (N, Cout, Ho, Wo).
at::Tensor grouped_mm(const at::Tensor& cols, const at::Tensor& col_off, const at::Tensor& w2, const at::Tensor& w_off,
                      const at::Tensor& table, const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                      int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb, int64_t N, int64_t Ho,
                      int64_t Wo, int64_t groups) {
  const int64_t Cout = w2.size(0), Kg = w2.size(1), Cout_g = Cout / groups;
  std::vector<at::Tensor> outs;
  for (int64_t gi = 0; gi < groups; ++gi) {
    const auto ks = at::indexing::Slice(gi * Kg, (gi + 1) * Kg);
    const auto os = at::indexing::Slice(gi * Cout_g, (gi + 1) * Cout_g);
    std::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->index({os});
    outs.push_back(lns_mm_cpu(cols.index({at::indexing::Slice(), ks}),
                              col_off.size(1) > 1 ? col_off.index({at::indexing::Slice(), ks}) : col_off,
                              w2.index({os}), w_off.size(0) > 1 ? w_off.index({os}) : w_off, table, b, x_bits, w_bits,
                              frac_bits, fixed, acc_bits, acc_lsb));
  }
  return at::cat(outs, 1).reshape({N, Ho * Wo, Cout}).permute({0, 2, 1}).reshape({N, Cout, Ho, Wo}).contiguous();
}

// (Cout, Kg) weight codes and their offsets, per tensor or channel kept (Cout or 1, 1).
std::pair<at::Tensor, at::Tensor> weight_rows(const at::Tensor& w, const at::Tensor& w_offset) {
  const int64_t Cout = w.size(0), Kg = w[0].numel();
  return {w.reshape({Cout, Kg}), w_offset[0].numel() == 1 ? w_offset.reshape({w_offset.size(0), 1})
                                                          : w_offset.expand(w.sizes()).reshape({Cout, Kg})};
}

at::Tensor conv_by_im2col(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                          const at::Tensor& w_offset, const at::Tensor& table, const std::optional<at::Tensor>& bias,
                          int64_t x_bits, int64_t w_bits, int64_t frac_bits, bool fixed, int64_t acc_bits,
                          int64_t acc_lsb, IntArrayRef stride, IntArrayRef pad_before, int64_t Ho, int64_t Wo,
                          IntArrayRef dilation, int64_t groups) {
  const auto idx = im2col_index(x.size(2), x.size(3), w.size(2), w.size(3), stride, pad_before, dilation, Ho, Wo);
  const auto cols = im2col(x, idx);
  const auto col_off = x_offset.numel() == 1 ? x_offset.reshape({1, 1}) : im2col(x_offset.expand(x.sizes()), idx);
  const auto [w2, w_off] = weight_rows(w, w_offset);
  return grouped_mm(cols, col_off, w2, w_off, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb,
                    x.size(0), Ho, Wo, groups);
}

// The rule of block_codes in torchlns/ops/reference.py (see Note: dynamic blocks there), in
// two steps shared by both layouts below: a block's offset from its largest finite wide
// magnitude (g is monotone in it; ±inf is E_max16), then each wide code re-encoded: the wide
// code of its kept log, zero, or NaN. bad collects kept values the wide codes cannot hold.
constexpr int32_t kWideMax = (1 << 15) - 1;

TORCHLNS_INLINE int32_t block_offset(int32_t top_mag, int32_t x_off, int32_t e_max, int32_t off_min,
                                     int32_t off_max) {
  const int32_t g_max = top_mag ? top_mag + x_off : 0;  // none: M = 0 puts 1.0 at E_max
  return std::min(std::max(g_max - e_max, off_min), off_max);
}

TORCHLNS_INLINE int16_t block_code(int32_t c, int32_t off, int32_t e_max, int32_t x_off, int32_t& bad) {
  const int32_t top = off + e_max, mag = c & kWideMax, neg = c >> 15;
  const int32_t g = mag == kWideMax ? top : std::min(mag + x_off, top);
  const int32_t keep = (mag != 0) & (g - off >= 1), wide = g - x_off;
  bad |= keep & ((wide < 1) | (wide > kWideMax));
  return int16_t(uint16_t(keep ? (wide | (neg << 15)) : ((mag == 0) & neg) << 15));  // NaN stays NaN
}

// One receptive field's wide codes (as uint16 values in int32) re-encoded per block: the rule
// of block_codes in torchlns/ops/reference.py. Branch-free, so that each ISA clone vectorizes
// it. Returns whether some kept value fell outside the wide codes (a bad offset).
TORCHLNS_INLINE bool row_blocks_impl(const int32_t* __restrict codes, int64_t K, int64_t Kg, int64_t x_block,
                                     int32_t x_off, int32_t e_max, int32_t off_min, int32_t off_max,
                                     int16_t* __restrict out) {
  int32_t bad = 0;
  for (int64_t g0 = 0; g0 < K; g0 += Kg)  // blocks restart in each group
    for (int64_t b0 = g0; b0 < g0 + Kg; b0 += x_block) {
      const int64_t b1 = std::min(g0 + Kg, b0 + x_block);
      int32_t top_mag = 0;
      for (int64_t e = b0; e < b1; ++e) {
        const int32_t mag = codes[e] & kWideMax;
        top_mag = std::max(top_mag, mag < kWideMax ? mag : 0);
      }
      const int32_t off = block_offset(top_mag, x_off, e_max, off_min, off_max);
      for (int64_t e = b0; e < b1; ++e) out[e] = block_code(codes[e], off, e_max, x_off, bad);
    }
  return bad != 0;
}
TORCHLNS_ISA_CLONES(bool, row_blocks,
                    (const int32_t* __restrict codes, int64_t K, int64_t Kg, int64_t x_block, int32_t x_off,
                     int32_t e_max, int32_t off_min, int32_t off_max, int16_t* __restrict out),
                    (codes, K, Kg, x_block, x_off, e_max, off_min, off_max, out))

// Where the taps of a narrow-group convolution's blocks lie, for the k-major builder and the
// repair below: the wide codes (uint16), the geometry, and the block rule's constants.
struct NarrowBlocks {
  const uint16_t* src;
  int64_t N, C, H, W, groups, kh, kw, taps, Kg, Ho, Wo, L, x_block, nb;
  int64_t stride[2], pad[2], dilation[2];
  int32_t x_off, e_max, off_min, off_max;

  NarrowBlocks(const at::Tensor& xc, int32_t x_off_, int frac_bits, int64_t groups_, int64_t kh_, int64_t kw_,
               IntArrayRef stride_, IntArrayRef pad_before, IntArrayRef dilation_, int64_t Ho_, int64_t Wo_,
               int64_t x_block_, int64_t x_block_bits)
      : src(nullptr), N(xc.size(0)), C(xc.size(1)), H(xc.size(2)),
        W(xc.size(3)), groups(groups_), kh(kh_), kw(kw_), taps(kh_ * kw_), Kg(xc.size(1) * kh_ * kw_ / groups_),
        Ho(Ho_), Wo(Wo_), L(Ho_ * Wo_), x_block(x_block_), nb((Kg + x_block_ - 1) / x_block_), x_off(x_off_) {
    TORCH_CHECK(xc.scalar_type() == at::kShort, "lns_conv: dynamic blocks take 16-bit wide codes (int16)");
    TORCH_CHECK(x_block >= 1 && x_block_bits >= 4 && x_block_bits <= 16,
                "lns_conv: x_block must be positive and x_block_bits in 4..16");
    src = reinterpret_cast<const uint16_t*>(xc.data_ptr<int16_t>());
    for (int d = 0; d < 2; ++d) stride[d] = stride_[d], pad[d] = pad_before[d], dilation[d] = dilation_[d];
    const int32_t R = 1 << frac_bits;
    e_max = (1 << (x_block_bits - 1)) - 1, off_min = -126 * R - 1, off_max = 127 * R - e_max;
  }
  // rows[kk L + l] = the wide code of tap k0 + kk (k over (c, i, j)) at every position of image img.
  void gather(int64_t img, int64_t k0, int64_t n, int32_t* rows) const {
    for (int64_t kk = 0; kk < n; ++kk) {
      const int64_t k = k0 + kk, c = k / taps, i = (k % taps) / kw, j = k % kw;
      const uint16_t* plane = src + (img * C + c) * H * W;
      int32_t* r = rows + kk * L;
      for (int64_t oh = 0; oh < Ho; ++oh) {
        const int64_t ih = oh * stride[0] - pad[0] + i * dilation[0];
        int32_t* ro = r + oh * Wo;
        if (ih < 0 || ih >= H) {
          std::fill(ro, ro + Wo, 0);
          continue;
        }
        const uint16_t* in = plane + ih * W;
        for (int64_t ow = 0; ow < Wo; ++ow) {
          const int64_t iw = ow * stride[1] - pad[1] + j * dilation[1];
          ro[ow] = (iw >= 0 && iw < W) ? int32_t(in[iw]) : 0;
        }
      }
    }
  }
  // Every position's block offset, from n gathered rows.
  void offsets(const int32_t* rows, int64_t n, int32_t* top, int32_t* off) const {
    std::fill(top, top + L, 0);
    for (int64_t kk = 0; kk < n; ++kk) {
      const int32_t* r = rows + kk * L;
      for (int64_t l = 0; l < L; ++l) {
        const int32_t mag = r[l] & kWideMax;
        top[l] = std::max(top[l], mag < kWideMax ? mag : 0);
      }
    }
    for (int64_t l = 0; l < L; ++l) off[l] = block_offset(top[l], x_off, e_max, off_min, off_max);
  }
  // Block b of group gi: its first k and length.
  std::pair<int64_t, int64_t> block(int64_t gi, int64_t b) const {
    const int64_t k0 = gi * Kg + b * x_block;
    return {k0, std::min((gi + 1) * Kg, k0 + x_block) - k0};
  }
  // The receptive field of group gi at position r = img L + l, as wide codes in (c, i, j) order.
  void field(int64_t gi, int64_t r, int32_t* codes) const {
    const int64_t img = r / L, oh = (r % L) / Wo, ow = r % Wo, Cg = C / groups;
    for (int64_t i = 0, t = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j, ++t) {
        const int64_t ih = oh * stride[0] - pad[0] + i * dilation[0];
        const int64_t iw = ow * stride[1] - pad[1] + j * dilation[1];
        const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
        const uint16_t* plane = src + (img * C + gi * Cg) * H * W + (inside ? ih * W + iw : 0);
        for (int64_t c = 0; c < Cg; ++c) codes[c * taps + t] = inside ? int32_t(plane[c * H * W]) : 0;
      }
  }
};

// The same, k-major: columns (C*kh*kw, ld) with position n*L + l along each row (ld >= N*L;
// the rest zero), for the columns kernel (depthwise and other narrow groups). Work items are
// (image, block): the block's rows are gathered like unfold's, then every position's block
// maximum, offset and codes run along the rows, which vectorizes where the per-position form
// (a handful of taps per group) cannot.
at::Tensor block_columns_kmajor(const at::Tensor& x, int32_t x_off, int frac_bits, int64_t groups, int64_t kh,
                                int64_t kw, IntArrayRef stride, IntArrayRef pad_before, IntArrayRef dilation,
                                int64_t Ho, int64_t Wo, int64_t x_block, int64_t x_block_bits, int64_t ld) {
  const auto xc = x.contiguous();
  const NarrowBlocks nb(xc, x_off, frac_bits, groups, kh, kw, stride, pad_before, dilation, Ho, Wo, x_block,
                        x_block_bits);
  const int64_t L = nb.L;
  auto out = at::zeros({nb.C * nb.taps, ld}, x.options());
  int16_t* dst = out.data_ptr<int16_t>();
  std::atomic<bool> unfit{false};
  at::parallel_for(0, nb.N * groups * nb.nb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> rows(static_cast<size_t>(std::min(x_block, nb.Kg) * L)), off(static_cast<size_t>(L)),
        top(static_cast<size_t>(L));
    int32_t bad = 0;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t img = t / (groups * nb.nb);
      const auto [k0, n] = nb.block((t / nb.nb) % groups, t % nb.nb);
      nb.gather(img, k0, n, rows.data());
      nb.offsets(rows.data(), n, top.data(), off.data());
      for (int64_t kk = 0; kk < n; ++kk) {
        const int32_t* r = rows.data() + kk * L;
        int16_t* o = dst + (k0 + kk) * ld + img * L;
        for (int64_t l = 0; l < L; ++l) o[l] = block_code(r[l], off[l], nb.e_max, x_off, bad);
      }
    }
    if (bad) unfit = true;
  });
  TORCH_CHECK(!unfit, "lns_conv: dynamic blocks: a block's value does not fit the wide codes' offset ", x_off);
  return out;
}

// Note: dynamic blocks by repair
// Re-encoding a block (see Note: dynamic blocks in torchlns/ops/reference.py) leaves a wide
// code as it is unless the block flushes it (below the block's offset), caps it (an offset
// clamped at the top of the range) or it is ±inf. Where no code of a receptive field
// changes, the dynamic output is the static convolution of the wide codes: the same
// products, summed by the same columns kernel in the same k order. Narrow groups (depthwise)
// would otherwise need k-major columns, kh·kw copies of the input, 4-5x the static kernel.
// So, per (image, group): its planes' largest finite and smallest nonzero magnitudes, and
// ±inf, bound every block's offset; when nothing can change there (the common case: 2^F·15.9
// octaves of range in 8-bit codes) the group is done. In the other groups every position's
// blocks are checked with block_code itself. The static kernel runs on the wide codes, and
// the changed positions' re-encoded receptive fields go through the same columns kernel in
// per-group segments (lns_cols_segments) and overwrite theirs. When more than a quarter of
// the positions change, the k-major columns cost less, and run instead.
std::optional<at::Tensor> blocks_by_repair(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                                           const at::Tensor& w_offset, const at::Tensor& table,
                                           const std::optional<at::Tensor>& bias, int64_t x_bits, int64_t w_bits,
                                           int64_t frac_bits, bool fixed, int64_t acc_bits, int64_t acc_lsb,
                                           IntArrayRef stride, IntArrayRef pad_before, IntArrayRef dilation,
                                           int64_t Ho, int64_t Wo, int64_t groups, int64_t x_block,
                                           int64_t x_block_bits) {
  const auto xc = x.contiguous();
  const int32_t x_off = x_offset.reshape({-1})[0].item<int32_t>();
  const NarrowBlocks nb(xc, x_off, int(frac_bits), groups, w.size(2), w.size(3), stride, pad_before, dilation, Ho,
                        Wo, x_block, x_block_bits);
  const int64_t N = nb.N, G = groups, L = nb.L, Cg = nb.C / G, HW = nb.H * nb.W, Kg = nb.Kg, Ng = w.size(0) / G;
  // 1. Per (image, group): the wide magnitudes that some block could change: those below the
  // bound on every block's flush threshold, from the group's largest finite magnitude (a
  // block's offset grows with its maximum), those a clamped top offset caps, and ±inf.
  std::vector<int32_t> lo_ok(static_cast<size_t>(N * G));  // kept magnitudes are >= lo_ok[t] ...
  const int32_t hi_ok = std::min(nb.off_max + nb.e_max - x_off, kWideMax - 1);  // ... and <= hi_ok
  const auto changeable = [&](int32_t mag, int64_t t) {  // branch-free, so that the scans vectorize
    return ((mag != 0) & (mag < lo_ok[t])) | (mag > hi_ok);
  };
  at::parallel_for(0, N * G, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* p = nb.src + t * Cg * HW;
      int32_t top = 0;
      for (int64_t e = 0; e < Cg * HW; ++e) {
        const int32_t mag = p[e] & kWideMax;
        top = std::max(top, mag < kWideMax ? mag : 0);
      }
      const int32_t g_top = top + x_off - nb.e_max;
      lo_ok[t] = top ? std::max(g_top, nb.off_min) + 1 - x_off : 1;
    }
  });
  // 2. The positions whose receptive fields hold such a magnitude (a few, in most layers; a
  // position repaired that needed none gets the same value).
  std::vector<uint8_t> changed(static_cast<size_t>(N * G * L), 0);
  at::parallel_for(0, N * G, 1, [&](int64_t t0, int64_t t1) {
    constexpr int64_t kChunk = 256;
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* p = nb.src + t * Cg * HW;
      uint8_t* flag = changed.data() + t * L;
      for (int64_t e0 = 0; e0 < Cg * HW; e0 += kChunk) {
        const int64_t e1 = std::min(Cg * HW, e0 + kChunk);
        int32_t any = 0;  // chunks without one are skipped
        for (int64_t e = e0; e < e1; ++e) any |= changeable(p[e] & kWideMax, t);
        if (!any) continue;
        for (int64_t e = e0; e < e1; ++e) {
          if (!changeable(p[e] & kWideMax, t)) continue;
          const int64_t ih = (e % HW) / nb.W, iw = e % nb.W;
          for (int64_t i = 0; i < nb.kh; ++i) {
            const int64_t u = ih + nb.pad[0] - i * nb.dilation[0];
            if (u < 0 || u % nb.stride[0] || u / nb.stride[0] >= Ho) continue;
            for (int64_t j = 0; j < nb.kw; ++j) {
              const int64_t v = iw + nb.pad[1] - j * nb.dilation[1];
              if (v < 0 || v % nb.stride[1] || v / nb.stride[1] >= Wo) continue;
              flag[(u / nb.stride[0]) * Wo + v / nb.stride[1]] = 1;
            }
          }
        }
      }
    }
  });
  std::vector<int64_t> S(static_cast<size_t>(G), 0), changes(static_cast<size_t>(N * G));
  int64_t total = 0;
  for (int64_t t = 0; t < N * G; ++t) {
    changes[t] = std::count(changed.begin() + t * L, changed.begin() + (t + 1) * L, uint8_t(1));
    S[t % G] += changes[t], total += changes[t];
  }
  if (4 * total > N * G * L) return std::nullopt;
  // 3. The static kernel on the wide codes, those magnitudes zeroed: only the positions
  // repaired below see them, and ±inf or a flushed 2^-126 would keep the kernel from running.
  const TelemetryCounts counted = total && telemetry_on() ? telemetry_read() : TelemetryCounts{};
  at::Tensor xs = xc;
  if (total) {
    xs = xc.clone();
    int16_t* q = xs.data_ptr<int16_t>();
    at::parallel_for(0, N * G, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t e = t * Cg * HW; changes[t] && e < (t + 1) * Cg * HW; ++e)
          if (changeable(uint16_t(q[e]) & kWideMax, t)) q[e] = 0;
    });
  }
  auto y = lns_conv_direct(xs, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits,
                           acc_lsb, stride, pad_before, dilation, Ho, Wo, groups,
                           total ? changed.data() : nullptr);  // the repair below counts those (Note: accumulator telemetry)
  if (!y || !total) {
    if (y) count_blocks_path(BlocksPath::unchanged);
    return y;
  }
  // 4. The changed positions' columns, per group, re-encoded; their outputs overwrite the static ones.
  const int64_t run = direct_cols_run();
  std::vector<int64_t> seg(static_cast<size_t>(G)), ld(static_cast<size_t>(G)), first(static_cast<size_t>(G));
  int64_t size = 0;
  for (int64_t g = 0, j = 0; g < G; j += S[g], ++g) ld[g] = S[g] + run, seg[g] = size, size += Kg * ld[g], first[g] = j;
  auto codes = at::zeros({size}, x.options());
  auto where = at::empty({total}, x.options().dtype(at::kLong));  // img L + l of each changed column, group by group
  int16_t* dst = codes.data_ptr<int16_t>();
  int64_t* pos = where.data_ptr<int64_t>();
  std::atomic<bool> unfit{false};
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    std::vector<int32_t> field(static_cast<size_t>(Kg) + 1);
    std::vector<int16_t> coded(static_cast<size_t>(Kg) + 1);
    bool bad = false;
    for (int64_t g = g0; g < g1; ++g) {
      int64_t j = 0;
      for (int64_t img = 0; img < N; ++img) {
        const uint8_t* flag = changed.data() + (img * G + g) * L;
        for (int64_t l = 0; l < L; ++l) {
          if (!flag[l]) continue;
          nb.field(g, img * L + l, field.data());
          bad |= row_blocks(field.data(), Kg, Kg, x_block, x_off, nb.e_max, nb.off_min, nb.off_max, coded.data());
          for (int64_t k = 0; k < Kg; ++k) dst[seg[g] + k * ld[g] + j] = coded[k];
          pos[first[g] + j++] = img * L + l;
        }
      }
    }
    if (bad) unfit = true;
  });
  TORCH_CHECK(!unfit, "lns_conv: dynamic blocks: a block's value does not fit the wide codes' offset ", x_off);
  const auto [w2, w_off] = weight_rows(w, w_offset);
  const auto vals = lns_cols_segments(codes, x_offset, seg, ld, S, w2, w_off, table, bias, x_bits, w_bits, frac_bits,
                                      fixed, acc_bits, acc_lsb);
  if (!vals) {  // the caller's kernel finishes (and counts) every output
    if (telemetry_on()) telemetry_reset_to(counted);
    return std::nullopt;
  }
  const float* v = vals->data_ptr<float>();
  float* out = y->data_ptr<float>();
  const int64_t Cout = w.size(0);
  at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t j = 0; j < S[g]; ++j) {
        const int64_t img = pos[first[g] + j] / L, l = pos[first[g] + j] % L;
        for (int64_t n = 0; n < Ng; ++n) out[(img * Cout + g * Ng + n) * L + l] = v[Ng * first[g] + n * S[g] + j];
      }
    }
  });
  count_blocks_path(BlocksPath::repaired);
  return y;
}

// Wide codes re-encoded per block of each receptive field, as im2col columns (N*L, C*kh*kw)
// in PyTorch's (c, i, j) order (see Note: dynamic blocks in torchlns/ops/reference.py), built
// per output position straight from the image.
at::Tensor block_columns(const at::Tensor& x, int32_t x_off, int frac_bits, int64_t groups, int64_t kh, int64_t kw,
                         IntArrayRef stride, IntArrayRef pad_before, IntArrayRef dilation, int64_t Ho, int64_t Wo,
                         int64_t x_block, int64_t x_block_bits) {
  TORCH_CHECK(x.scalar_type() == at::kShort, "lns_conv: dynamic blocks take 16-bit wide codes (int16)");
  TORCH_CHECK(x_block >= 1 && x_block_bits >= 4 && x_block_bits <= 16,
              "lns_conv: x_block must be positive and x_block_bits in 4..16");
  const auto xc = x.contiguous();
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), taps = kh * kw, K = C * taps;
  const int64_t Kg = K / groups, L = Ho * Wo;
  auto out = at::empty({N * L, K}, x.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(xc.data_ptr<int16_t>());
  int16_t* dst = out.data_ptr<int16_t>();
  const int32_t e_max = (1 << (x_block_bits - 1)) - 1, R = 1 << frac_bits;
  const int32_t off_min = -126 * R - 1, off_max = 127 * R - e_max;
  std::atomic<bool> unfit{false};
  at::parallel_for(0, N * L, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> codes(size_t(K) + 1);
    std::vector<int64_t> tap_at(static_cast<size_t>(taps));
    std::vector<int32_t> valid(static_cast<size_t>(taps));
    bool bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t img = r / L, oh = (r % L) / Wo, ow = r % Wo;
      for (int64_t i = 0, t = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j, ++t) {
          const int64_t ih = oh * stride[0] - pad_before[0] + i * dilation[0];
          const int64_t iw = ow * stride[1] - pad_before[1] + j * dilation[1];
          valid[t] = ih >= 0 && ih < H && iw >= 0 && iw < W;
          tap_at[t] = valid[t] ? ih * W + iw : 0;
        }
      const uint16_t* plane = src + img * C * H * W;
      for (int64_t c = 0; c < C; ++c, plane += H * W)
        for (int64_t t = 0; t < taps; ++t) codes[c * taps + t] = valid[t] ? int32_t(plane[tap_at[t]]) : 0;
      bad |= row_blocks(codes.data(), K, Kg, x_block, x_off, e_max, off_min, off_max, dst + r * K);
    }
    if (bad) unfit = true;
  });
  TORCH_CHECK(!unfit, "lns_conv: dynamic blocks: a block's value does not fit the wide codes' offset ", x_off);
  return out;
}

// sign * 2^q of each code, as float32 (0 for the zero and NaN codes): the A_i / V_i bases.
at::Tensor signed_powers(const LogFields& f, int frac_bits) {
  auto out = at::empty_like(f.sign);
  const int32_t* g = f.g.data_ptr<int32_t>();
  const float* s = f.sign.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = out.numel();
  at::parallel_for(0, n, 1 << 14, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) o[e] = pow2f_signed(g[e] >> frac_bits, s[e]);
  });
  return out;
}

// (N, C, D, H, W) -> (N*Do, C*kd, H, W): each output depth's kd taps as channels, in the weight's
// (c, a) order, so that a Conv3d is a 2-D convolution with the same products (the rule of
// stack_depth in torchlns/core/geometry.py). Depth padding is the zero code.
at::Tensor stack_depth(const at::Tensor& t, int64_t kd, int64_t p0, int64_t p1, int64_t stride, int64_t dilation,
                       int64_t* Do) {
  const auto u = (p0 || p1) ? at::constant_pad_nd(t, {0, 0, 0, 0, p0, p1}, 0) : t;
  const int64_t span = dilation * (kd - 1) + 1;
  TORCH_CHECK(u.size(2) >= span, "lns_conv: the input depth is smaller than the dilated kernel after padding");
  const auto taps = u.unfold(2, span, stride).slice(-1, 0, span, dilation);  // (N, C, Do, H, W, kd)
  *Do = taps.size(2);
  return taps.permute({0, 2, 1, 5, 3, 4}).reshape({taps.size(0) * taps.size(2), taps.size(1) * kd, taps.size(3),
                                                   taps.size(4)});
}

at::Tensor lns_conv_cpu(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                        const at::Tensor& w_offset, const at::Tensor& table, const std::optional<at::Tensor>& bias,
                        int64_t x_bits, int64_t w_bits, int64_t frac_bits, bool fixed, int64_t acc_bits,
                        int64_t acc_lsb, IntArrayRef stride, IntArrayRef pad_before, IntArrayRef pad_after,
                        IntArrayRef dilation, int64_t groups, int64_t x_block, int64_t x_block_bits) {
  if (x.dim() == 5) {  // Conv3d: the depth taps stacked as channels (see stack_depth)
    TORCH_CHECK(w.dim() == 5 && stride.size() == 3 && pad_before.size() == 3 && pad_after.size() == 3 &&
                    dilation.size() == 3,
                "lns_conv: 3-D codes take a 5-D weight and three strides, paddings and dilations");
    const int64_t N = x.size(0), Cout = w.size(0), kd = w.size(2);
    int64_t Do = 0, unused = 0;
    const auto xs = stack_depth(x, kd, pad_before[0], pad_after[0], stride[0], dilation[0], &Do);
    const auto xo = x_offset.numel() == 1 ? x_offset.reshape({1, 1, 1, 1})
                                          : stack_depth(x_offset.expand(x.sizes()), kd, pad_before[0], pad_after[0],
                                                        stride[0], dilation[0], &unused);
    const auto ws = w.reshape({Cout, -1, w.size(3), w.size(4)});
    const bool per_channel = w_offset.dim() == 0 || w_offset.numel() == w_offset.size(0);
    const auto wo = per_channel ? w_offset.reshape({-1, 1, 1, 1}) : w_offset.expand(w.sizes()).reshape(ws.sizes());
    const auto y = lns_conv_cpu(xs, xo, ws, wo, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb,
                                stride.slice(1), pad_before.slice(1), pad_after.slice(1), dilation.slice(1), groups,
                                x_block, x_block_bits);
    return y.reshape({N, Do, Cout, y.size(2), y.size(3)}).transpose(1, 2).contiguous();
  }
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "lns_conv: (N, C, H, W) and (Cout, C/groups, kh, kw) codes");
  TORCH_CHECK(stride.size() == 2 && pad_before.size() == 2 && pad_after.size() == 2 && dilation.size() == 2,
              "lns_conv: stride, padding and dilation take two values");
  TORCH_CHECK(table.scalar_type() == at::kDouble && table.numel() == (int64_t(1) << frac_bits),
              "lns_conv: table must hold 2^frac_bits float64 values");
  int64_t out_size[2];
  for (int d = 0; d < 2; ++d)
    out_size[d] = (x.size(2 + d) + pad_before[d] + pad_after[d] - dilation[d] * (w.size(2 + d) - 1) - 1) / stride[d] + 1;
  const int64_t Ho = out_size[0], Wo = out_size[1];
  if (x_block > 0) {  // dynamic per-block activations (see Note: dynamic blocks in torchlns/ops/reference.py)
    TORCH_CHECK(x_offset.numel() == 1, "lns_conv: dynamic blocks take one offset for the wide codes");
    const int32_t off = x_offset.reshape({-1})[0].item<int32_t>();
    const auto col_off = x_offset.reshape({1, 1});
    const auto [w2, w_off] = weight_rows(w, w_offset);
    const int64_t M = x.size(0) * Ho * Wo;
    if (try_direct(mac_path()) && direct_lanes() && w.size(0) / groups < direct_lanes() / 2 && M && w.numel()) {
      // narrow groups: the static columns kernel with changed positions repaired, else on k-major columns
      if (auto y = blocks_by_repair(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits,
                                    acc_lsb, stride, pad_before, dilation, Ho, Wo, groups, x_block, x_block_bits))
        return *y;
      count_blocks_path(BlocksPath::columns);
      const auto cols_t = block_columns_kmajor(x, off, int(frac_bits), groups, w.size(2), w.size(3), stride,
                                               pad_before, dilation, Ho, Wo, x_block, x_block_bits,
                                               M + direct_cols_run());
      if (auto y = lns_mm_direct(cols_t, col_off, w2, w_off, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits,
                                 acc_lsb, groups, Ho * Wo, M))
        return y->reshape({x.size(0), w.size(0), Ho, Wo});
      return grouped_mm(cols_t.narrow(1, 0, M).t(), col_off, w2, w_off, table, bias, x_bits, w_bits, frac_bits, fixed,
                        acc_bits, acc_lsb, x.size(0), Ho, Wo, groups);
    }
    const auto cols = block_columns(x, off, int(frac_bits), groups, w.size(2), w.size(3), stride, pad_before,
                                    dilation, Ho, Wo, x_block, x_block_bits);
    if (try_direct(mac_path()) && cols.numel() && w.numel())
      if (auto y = lns_mm_direct(cols, col_off, w2, w_off, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits,
                                 acc_lsb, groups, Ho * Wo))
        return y->reshape({x.size(0), w.size(0), Ho, Wo});
    return grouped_mm(cols, col_off, w2, w_off, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb,
                      x.size(0), Ho, Wo, groups);
  }
  const bool symmetric = pad_before[0] == pad_after[0] && pad_before[1] == pad_after[1];
  const auto by_im2col = [&] {
    return conv_by_im2col(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb,
                          stride, pad_before, Ho, Wo, dilation, groups);
  };
  const MacPath path = mac_path();  // see try_direct in common.h
  if (try_direct(path) && x.numel() && w.numel())
    if (auto y = lns_conv_direct(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits,
                                 acc_lsb, stride, pad_before, dilation, Ho, Wo, groups))
      return *y;
  if (fixed || !symmetric || !x.numel() || !w.numel() || !try_classes(path, frac_bits)) return by_im2col();

  const int F = int(frac_bits), R = 1 << F;
  const int64_t N = x.size(0), C = x.size(1), Cout = w.size(0);
  // Log fields of x as (N*C, H*W) rows and of w as (Cout, C/groups*kh*kw) rows.
  const auto x_off = x_offset.numel() == 1 ? x_offset.reshape({1, 1})
                                           : x_offset.expand(x.sizes()).contiguous().reshape({N * C, -1});
  const LogFields lx = log_fields(x.reshape({N * C, -1}), x_off, x_bits, F);
  const auto w_off = w_offset.numel() == 1 ? w_offset.reshape({1, 1})
                                           : w_offset.expand(w.sizes()).contiguous().reshape({Cout, -1});
  const LogFields lw = log_fields(w.reshape({Cout, -1}), w_off, w_bits, F);
  if (!class_terms_in_range(lx, lw)) return by_im2col();

  const auto tab = table.contiguous();
  const std::vector<float> C_ext = extended_table(tab.data_ptr<double>(), F);
  const auto px = signed_powers(lx, F).reshape(x.sizes());
  const auto pw = signed_powers(lw, F).reshape(w.sizes());
  const auto rx = at::bitwise_and(lx.g, R - 1).reshape(x.sizes());
  const auto rw = at::bitwise_and(lw.g, R - 1).reshape(w.sizes()).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  const IntArrayRef padding = pad_before;
  at::Tensor y;
  for (int i = 0; i < R; ++i) {  // a fixed class order and layout: the same bits at any thread count or layout
    const auto plane = at::where(rx == i, px, at::zeros({}, f32)).contiguous();
    auto v = at::empty(w.sizes(), f32);
    {
      const float* p = pw.data_ptr<float>();
      const int32_t* r = rw.data_ptr<int32_t>();
      float* o = v.data_ptr<float>();
      for (int64_t e = 0; e < v.numel(); ++e) o[e] = p[e] * C_ext[i + r[e]];
    }
    const auto part = at::conv2d(plane, v, {}, stride, padding, dilation, groups);
    y = i == 0 ? part : y + part;
  }
  if (bias.has_value()) y = y + bias->to(at::kFloat).reshape({1, Cout, 1, 1});
  // NaN dominates its dot products: every output whose field holds a NaN input, and every
  // output channel whose weights hold one.
  if (lx.nan.any().item<bool>()) {
    const auto nan_x = lx.nan.reshape(x.sizes()).to(at::kFloat);
    const auto hit = at::conv2d(nan_x, at::ones(w.sizes(), f32), {}, stride, padding, dilation, groups) > 0;
    y = y.masked_fill(hit, std::numeric_limits<float>::quiet_NaN());
  }
  y = y.masked_fill(lw.nan.any(1).reshape({1, Cout, 1, 1}), std::numeric_limits<float>::quiet_NaN());
  return y.contiguous();
}

}  // namespace

// Note: telemetry's tap histograms
// torchlns.telemetry counts a 2-D convolution's products from, per (channel, tap), a
// histogram of the activations its outputs read there (Note: telemetry counters in
// torchlns/deploy/telemetry.py). The outputs that tap (i, j) serves read one stride phase of
// the input, a rectangle of it: that phase's histogram less the border strips outside the
// rectangle (a few rows and columns) costs about one pass over the input instead of kh*kw.
//
// code_hist: per-tensor codes keep their log E + x_off wherever they are read, so the
// histograms count raw codes (what _code_hist there computes in torch operations, its
// fallback and oracle). One pass per channel fills every phase it needs; on large planes four
// interleaved copies of each histogram keep runs of one code (a ReLU's zeros) from
// serializing on the same counter.
//
// blocks_tap_hist: dynamic blocks (x 16-bit wide codes) re-encode each receptive field, and
// _blocks_hist there states the rule (and is the fallback): (1) per (image, group) the bound
// below which some block could flush a magnitude (as the repair's step 1: a block's offset
// grows with its maximum), (2) the normal magnitudes' range and the odd ones (below that
// bound, capped by a clamped top offset, ±inf: few), (3) each odd code once per receptive
// field that reads it, with its own block's offset, (4) the normal logs by phases and strips.
// Returns (hist (C*kh*kw, 2, span) of logs lo.. by sign, lo, the reads of nonzero codes,
// those saturated, those flushed).
namespace {

// The window of tap offset r0 (= i*dilation - pad) along one axis: the stride phase ph it
// reads, the phase lattice's size, and the lattice indices [a0, a1] that its outputs read.
struct TapWindow {
  int64_t ph, size, a0, a1;
  TapWindow(int64_t r0, int64_t s, int64_t n_in, int64_t n_out) {
    ph = ((r0 % s) + s) % s;
    size = ph < n_in ? (n_in - ph + s - 1) / s : 0;
    const int64_t first = (r0 - ph) / s;
    a0 = std::max<int64_t>(0, first), a1 = std::min(size - 1, first + n_out - 1);
  }
};

template <typename T>
void code_hist_channels(const T* src, int64_t* out, int64_t N, int64_t C, int64_t H, int64_t W, int64_t kh,
                        int64_t kw, const int64_t* stride, const int64_t* pad, const int64_t* dil, int64_t Ho,
                        int64_t Wo, int64_t V) {
  const int64_t taps = kh * kw, s0 = stride[0], s1 = stride[1], phases = s0 * s1, HW = H * W;
  const uint32_t mask = uint32_t(V - 1);
  std::vector<TapWindow> rows, cols;
  for (int64_t i = 0; i < kh; ++i) rows.emplace_back(i * dil[0] - pad[0], s0, H, Ho);
  for (int64_t j = 0; j < kw; ++j) cols.emplace_back(j * dil[1] - pad[1], s1, W, Wo);
  std::vector<char> wanted(static_cast<size_t>(phases), 0);
  for (const auto& r : rows)
    for (const auto& c : cols) wanted[r.ph * s1 + c.ph] = 1;
  // Interleaved int32 copies pay a fold of 4 V counts per image: worth it on large planes only
  // (and a large V would spill the cache instead).
  constexpr int kCopies = 4;
  const bool interleave = V <= 4096 && HW >= 8 * V;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int64_t> full(static_cast<size_t>(phases * V));
    std::vector<int32_t> part(interleave ? static_cast<size_t>(kCopies * V) : 0);  // an image's counts fit int32
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(full.begin(), full.end(), 0);
      for (int64_t img = 0; img < N; ++img) {
        const T* plane = src + (img * C + c) * HW;
        for (int64_t p = 0; p < phases; ++p) {
          if (!wanted[p]) continue;
          const int64_t ph = p / s1, pw = p % s1;
          int64_t* f = full.data() + p * V;
          if (!interleave) {
            for (int64_t y = ph; y < H; y += s0)
              for (int64_t x = pw; x < W; x += s1) ++f[plane[y * W + x] & mask];
            continue;
          }
          std::fill(part.begin(), part.end(), 0);
          for (int64_t y = ph; y < H; y += s0) {
            const T* row = plane + y * W;
            int64_t x = pw;
            for (; x + 3 * s1 < W; x += 4 * s1) {
              ++part[0 * V + (row[x] & mask)];
              ++part[1 * V + (row[x + s1] & mask)];
              ++part[2 * V + (row[x + 2 * s1] & mask)];
              ++part[3 * V + (row[x + 3 * s1] & mask)];
            }
            for (; x < W; x += s1) ++part[row[x] & mask];
          }
          for (int k = 0; k < kCopies; ++k)
            for (int64_t v = 0; v < V; ++v) f[v] += part[k * V + v];
        }
      }
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) {
          const TapWindow &r = rows[i], &q = cols[j];
          int64_t* o = out + (c * taps + i * kw + j) * V;
          if (r.a0 > r.a1 || q.a0 > q.a1) {  // the tap reads only padding
            std::fill(o, o + V, 0);
            continue;
          }
          const int64_t* f = full.data() + (r.ph * s1 + q.ph) * V;
          std::copy(f, f + V, o);
          // less the strips outside the rectangle: lattice rows [u0, u1] x columns [v0, v1]
          const auto less = [&](int64_t u0, int64_t u1, int64_t v0, int64_t v1) {
            for (int64_t img = 0; img < N; ++img)
              for (int64_t u = u0; u <= u1; ++u) {
                const T* row = src + (img * C + c) * HW + (r.ph + u * s0) * W + q.ph;
                for (int64_t v = v0; v <= v1; ++v) --o[row[v * s1] & mask];
              }
          };
          less(0, r.a0 - 1, 0, q.size - 1);
          less(r.a1 + 1, r.size - 1, 0, q.size - 1);
          less(r.a0, r.a1, 0, q.a0 - 1);
          less(r.a0, r.a1, q.a1 + 1, q.size - 1);
        }
    }
  });
}

}  // namespace

at::Tensor code_hist(const at::Tensor& x, int64_t bits, int64_t kh, int64_t kw, IntArrayRef stride,
                     IntArrayRef pad_before, IntArrayRef dilation, int64_t Ho, int64_t Wo) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && (x.scalar_type() == at::kByte || x.scalar_type() == at::kShort),
              "code_hist: x must be (N, C, H, W) uint8 or int16 codes on the CPU");
  TORCH_CHECK(bits >= 1 && bits <= (x.scalar_type() == at::kByte ? 8 : 16), "code_hist: bits out of range: ", bits);
  TORCH_CHECK(kh >= 1 && kw >= 1 && stride.size() == 2 && pad_before.size() == 2 && dilation.size() == 2 &&
                  stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 && Ho >= 0 && Wo >= 0,
              "code_hist: bad convolution geometry");
  const auto xc = x.contiguous();
  const int64_t C = x.size(1), V = int64_t(1) << bits;
  auto out = at::empty({C * kh * kw, V}, x.options().dtype(at::kLong));
  const int64_t s[2] = {stride[0], stride[1]}, p[2] = {pad_before[0], pad_before[1]}, d[2] = {dilation[0], dilation[1]};
  if (x.scalar_type() == at::kByte)
    code_hist_channels(xc.data_ptr<uint8_t>(), out.data_ptr<int64_t>(), x.size(0), C, x.size(2), x.size(3), kh, kw, s,
                       p, d, Ho, Wo, V);
  else
    code_hist_channels(reinterpret_cast<const uint16_t*>(xc.data_ptr<int16_t>()), out.data_ptr<int64_t>(), x.size(0),
                       C, x.size(2), x.size(3), kh, kw, s, p, d, Ho, Wo, V);
  return out;
}

std::tuple<at::Tensor, int64_t, int64_t, int64_t, int64_t> blocks_tap_hist(
    const at::Tensor& x, int64_t x_off64, int64_t frac_bits, int64_t groups, int64_t kh, int64_t kw,
    IntArrayRef stride, IntArrayRef pad_before, IntArrayRef dilation, int64_t Ho, int64_t Wo, int64_t x_block,
    int64_t x_block_bits) {
  TORCH_CHECK(x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kShort && x_block > 0,
              "blocks_tap_hist: x must be (N, C, H, W) 16-bit wide codes (int16) on the CPU, with x_block > 0");
  const auto xc = x.contiguous();
  const int32_t x_off = int32_t(x_off64);
  const NarrowBlocks nb(xc, x_off, int(frac_bits), groups, kh, kw, stride, pad_before, dilation, Ho, Wo, x_block,
                        x_block_bits);
  const int64_t N = nb.N, C = nb.C, H = nb.H, W = nb.W, G = groups, Cg = C / G, HW = H * W, taps = nb.taps;
  const int64_t Kg = nb.Kg;
  const uint16_t* src = nb.src;
  // 1.
  std::vector<int32_t> lo_ok(static_cast<size_t>(N * G));  // normal magnitudes are >= lo_ok[t] ...
  const int32_t hi_ok = std::min(nb.off_max + nb.e_max - x_off, kWideMax - 1);  // ... and <= hi_ok
  at::parallel_for(0, N * G, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* p = src + t * Cg * HW;
      int32_t top = 0;
      for (int64_t e = 0; e < Cg * HW; ++e) {
        const int32_t mag = p[e] & kWideMax;
        top = std::max(top, mag < kWideMax ? mag : 0);
      }
      lo_ok[t] = top ? std::max(top + x_off - nb.e_max, nb.off_min) + 1 - x_off : 1;
    }
  });
  // 2. Per (image, channel) plane.
  const int64_t planes = N * C;
  std::vector<int32_t> lo_mag(static_cast<size_t>(planes), kWideMax), hi_mag(static_cast<size_t>(planes), 0);
  std::vector<std::vector<int64_t>> odd(static_cast<size_t>(planes));
  at::parallel_for(0, planes, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const uint16_t* p = src + q * HW;
      const int32_t lo = lo_ok[(q / C) * G + (q % C) / Cg];
      int32_t a = kWideMax, b = 0;
      for (int64_t e = 0; e < HW; ++e) {
        const int32_t mag = p[e] & kWideMax;
        if (!mag) continue;
        if (mag >= lo && mag <= hi_ok) {
          a = std::min(a, mag), b = std::max(b, mag);
        } else {
          odd[q].push_back(e);
        }
      }
      lo_mag[q] = a, hi_mag[q] = b;
    }
  });
  // 3. Each read of an odd code: (row c*taps + t, sign, log) when kept.
  struct Kept {
    int64_t row;
    int32_t neg, g;
  };
  std::vector<std::vector<Kept>> kept(static_cast<size_t>(planes));
  std::vector<std::array<int64_t, 3>> odd_counts(static_cast<size_t>(planes), {0, 0, 0});
  at::parallel_for(0, planes, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t img = q / C, c = q % C, gi = c / Cg;
      const uint16_t* p = src + q * HW;
      for (const int64_t e : odd[q]) {
        const int64_t ih = e / W, iw = e % W;
        const int32_t mag = p[e] & kWideMax, neg = p[e] >> 15;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t u = ih + nb.pad[0] - i * nb.dilation[0];
          if (u < 0 || u % nb.stride[0] || u / nb.stride[0] >= Ho) continue;
          for (int64_t j = 0; j < kw; ++j) {
            const int64_t v = iw + nb.pad[1] - j * nb.dilation[1];
            if (v < 0 || v % nb.stride[1] || v / nb.stride[1] >= Wo) continue;
            const int64_t oh = u / nb.stride[0], ow = v / nb.stride[1], t = i * kw + j;
            const int64_t k = (c % Cg) * taps + t, k0 = (k / x_block) * x_block, k1 = std::min(Kg, k0 + x_block);
            int32_t top = 0;  // the block's largest finite magnitude at this position
            for (int64_t kk = k0; kk < k1; ++kk) {
              const int64_t c2 = gi * Cg + kk / taps, i2 = (kk % taps) / kw, j2 = kk % kw;
              const int64_t y2 = oh * nb.stride[0] - nb.pad[0] + i2 * nb.dilation[0];
              const int64_t x2 = ow * nb.stride[1] - nb.pad[1] + j2 * nb.dilation[1];
              if (y2 < 0 || y2 >= H || x2 < 0 || x2 >= W) continue;
              const int32_t m2 = src[(img * C + c2) * HW + y2 * W + x2] & kWideMax;
              top = std::max(top, m2 < kWideMax ? m2 : 0);
            }
            const int32_t off = block_offset(top, x_off, nb.e_max, nb.off_min, nb.off_max);
            const int32_t cap = off + nb.e_max;
            const bool inf = mag == kWideMax;
            const int32_t g = inf ? cap : std::min(mag + x_off, cap);
            const bool keep = g - off >= 1;
            auto& n3 = odd_counts[q];
            ++n3[0];
            n3[1] += inf || mag + x_off > cap;
            n3[2] += !inf && !keep;
            if (keep) kept[q].push_back({c * taps + t, neg, g});
          }
        }
      }
    }
  });
  // 4. The logs' range, then the histograms.
  int32_t lo = std::numeric_limits<int32_t>::max(), hi = std::numeric_limits<int32_t>::min();
  for (int64_t q = 0; q < planes; ++q) {
    if (lo_mag[q] <= hi_mag[q]) lo = std::min(lo, lo_mag[q] + x_off), hi = std::max(hi, hi_mag[q] + x_off);
    for (const Kept& r : kept[q]) lo = std::min(lo, r.g), hi = std::max(hi, r.g);
  }
  if (hi < lo) lo = hi = 0;  // nothing kept
  const int64_t span = int64_t(hi) - lo + 1;
  auto hist = at::zeros({C * taps, 2, span}, x.options().dtype(at::kLong));
  int64_t* h = hist.data_ptr<int64_t>();
  int64_t normal_reads = 0;
  std::vector<int64_t> reads(static_cast<size_t>(C), 0);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    const int64_t phases = nb.stride[0] * nb.stride[1];
    std::vector<std::vector<int64_t>> phase(static_cast<size_t>(phases));  // 2 * span counts each, of channel c
    for (int64_t c = c0; c < c1; ++c) {
      for (auto& ph : phase) ph.clear();
      for (int64_t t = 0; t < taps; ++t) {
        const TapWindow r(t / kw * nb.dilation[0] - nb.pad[0], nb.stride[0], H, Ho);
        const TapWindow q(t % kw * nb.dilation[1] - nb.pad[1], nb.stride[1], W, Wo);
        // count(d = ±1) of the normal codes of this phase at lattice rows [u0, u1] x cols [v0, v1]
        const auto visit = [&](int64_t* into, int64_t u0, int64_t u1, int64_t v0, int64_t v1, int64_t d) {
          for (int64_t img = 0; img < N; ++img) {
            const uint16_t* plane = src + (img * C + c) * HW;
            const int32_t lo_q = lo_ok[img * G + c / Cg];
            for (int64_t u = u0; u <= u1; ++u) {
              const uint16_t* row = plane + (r.ph + u * nb.stride[0]) * W + q.ph;
              for (int64_t v = v0; v <= v1; ++v) {
                const int32_t code = row[v * nb.stride[1]], mag = code & kWideMax;
                if (mag < lo_q || mag > hi_ok) continue;  // zero, odd
                into[(code >> 15) * span + (mag + x_off - lo)] += d;
              }
            }
          }
        };
        int64_t* out = h + (c * taps + t) * 2 * span;
        if (r.a0 > r.a1 || q.a0 > q.a1) continue;  // the tap reads only padding
        auto& full = phase[r.ph * nb.stride[1] + q.ph];
        if (full.empty()) {
          full.assign(static_cast<size_t>(2 * span), 0);
          visit(full.data(), 0, r.size - 1, 0, q.size - 1, 1);
        }
        std::copy(full.begin(), full.end(), out);
        // less the strips outside the rectangle
        visit(out, 0, r.a0 - 1, 0, q.size - 1, -1);
        visit(out, r.a1 + 1, r.size - 1, 0, q.size - 1, -1);
        visit(out, r.a0, r.a1, 0, q.a0 - 1, -1);
        visit(out, r.a0, r.a1, q.a1 + 1, q.size - 1, -1);
        int64_t n_read = 0;
        for (int64_t e = 0; e < 2 * span; ++e) n_read += out[e];
        reads[c] += n_read;
      }
    }
  });
  for (const int64_t r : reads) normal_reads += r;
  int64_t values = normal_reads, saturated = 0, flushed = 0;
  for (int64_t q = 0; q < planes; ++q) {
    for (const Kept& r : kept[q]) ++h[(r.row * 2 + r.neg) * span + (r.g - lo)];
    values += odd_counts[q][0], saturated += odd_counts[q][1], flushed += odd_counts[q][2];
  }
  return {hist, lo, values, saturated, flushed};
}

TORCH_LIBRARY_IMPL(torchlns, CPU, m) { m.impl("lns_conv", &lns_conv_cpu); }

}  // namespace torchlns
