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

#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

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

at::Tensor conv_by_im2col(const at::Tensor& x, const at::Tensor& x_offset, const at::Tensor& w,
                          const at::Tensor& w_offset, const at::Tensor& table, const std::optional<at::Tensor>& bias,
                          int64_t x_bits, int64_t w_bits, int64_t frac_bits, bool fixed, int64_t acc_bits,
                          int64_t acc_lsb, IntArrayRef stride, IntArrayRef pad_before, int64_t Ho, int64_t Wo,
                          IntArrayRef dilation, int64_t groups) {
  const int64_t N = x.size(0), Cout = w.size(0), Cin_g = w.size(1);
  const auto idx = im2col_index(x.size(2), x.size(3), w.size(2), w.size(3), stride, pad_before, dilation, Ho, Wo);
  const int64_t Kg = Cin_g * idx.size(0);
  const auto cols = im2col(x, idx);
  const auto col_off = x_offset.numel() == 1 ? x_offset.reshape({1, 1}) : im2col(x_offset.expand(x.sizes()), idx);
  const auto w2 = w.reshape({Cout, Kg});
  const auto w_off = w_offset[0].numel() == 1 ? w_offset.reshape({w_offset.size(0), 1})  // per tensor or channel
                                              : w_offset.expand(w.sizes()).reshape({Cout, Kg});
  const int64_t Cout_g = Cout / groups;
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
                        IntArrayRef dilation, int64_t groups) {
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
                                stride.slice(1), pad_before.slice(1), pad_after.slice(1), dilation.slice(1), groups);
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

TORCH_LIBRARY_IMPL(torchlns, CPU, m) { m.impl("lns_conv", &lns_conv_cpu); }

}  // namespace torchlns
