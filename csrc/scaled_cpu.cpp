// CPU kernels of torchlns::scaled_mm and torchlns::scaled_conv: the FP8/INT MAC (spec section 5).
//
// Note: the scaled MAC as one float32 product
// Spec section 5 multiplies the unscaled values exactly and scales the sum afterwards:
// y = float32(sum_k vx_k vw_k) * (s_x s_w). So the whole layer is one ordinary matrix
// product (or convolution, groups included) of the unscaled values, which MKL and oneDNN
// compute at full speed:
//   * FP8: every value has at most 4 significant bits and |v| is in [2^-16, 57344], so
//     every product is an exact, normal float32 and no partial sum can overflow; float32
//     accumulation in any order is what the spec asks for.
//   * INT: the sum must be the exact integer. A float32 sum of integers is exact while
//     every partial sum stays below 2^24, and every partial sum is bounded by
//     sum_k |vx_k| |vw_k| <= min(max|vw| * ||vx_row||_1, max|vx| * ||vw_row||_1). When that
//     bound is below 2^24 the float32 product is exact. Otherwise K (the input channels of a
//     convolution) is cut into chunks of at most (2^24 - 1) / (max|vx| max|vw|) terms, each an
//     exact float32 product, summed exactly in float64 (below 2^53: functional.py refuses
//     larger K). float32(exact sum) is then the spec's float32(acc), and adding +0.0 removes
//     the -0 that a float sum of integer products can give.
// With parameters per block along K (MX style) the sum is cut into segments at every block
// boundary, each scaled by its own s_x s_w and added in order in float32, as the reference
// does. Rows go in fixed blocks, each reduced by one thread, so the bits do not depend on
// the thread count. The unscaled weight values are prepared once per weight (see Note:
// prepared weights in weight_cache.h).

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

#include "common.h"
#include "weight_cache.h"

namespace torchlns {
namespace {

constexpr double kExactFloat32 = 16777216.0;  // 2^24: integer partial sums below it are exact

// float32 values of codes: a table lookup (FP8) or the integer itself (INT, where *max_abs,
// if given, receives the largest |code|).
at::Tensor code_values(const at::Tensor& codes, const std::optional<at::Tensor>& values, double* max_abs = nullptr) {
  auto c = codes.contiguous();
  auto out = at::empty(c.sizes(), c.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t n = c.numel();
  if (values.has_value()) {
    TORCH_CHECK(c.scalar_type() == at::kByte && values->numel() == 256, "scaled MAC: FP8 codes are uint8 with 256 values");
    const auto tab = values->to(at::kFloat).contiguous();
    const float* t = tab.data_ptr<float>();
    const uint8_t* p = c.data_ptr<uint8_t>();
    at::parallel_for(0, n, 1 << 16, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) o[i] = t[p[i]];
    });
    return out;
  }
  TORCH_CHECK(c.scalar_type() == at::kChar || c.scalar_type() == at::kShort, "scaled MAC: INT codes are int8 or int16");
  const int64_t chunk = 1 << 16, chunks = (n + chunk - 1) / chunk;
  std::vector<int32_t> peak(std::max<int64_t>(chunks, 1), 0);
  const auto run = [&](auto* p) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ci = c0; ci < c1; ++ci) {
        int32_t m = 0;
        for (int64_t i = ci * chunk; i < std::min(n, (ci + 1) * chunk); ++i) {
          o[i] = float(p[i]);
          m = std::max(m, std::abs(int32_t(p[i])));
        }
        peak[ci] = m;
      }
    });
  };
  c.scalar_type() == at::kChar ? run(c.data_ptr<int8_t>()) : run(c.data_ptr<int16_t>());
  if (max_abs) *max_abs = *std::max_element(peak.begin(), peak.end());
  return out;
}

// y = (v + 0) * scale[c] + bias[c] in place over (outer, C, inner) float32, each step rounded
// to float32 (no contraction: the build has -ffp-contract=off). The +0 (integer sums only)
// turns a -0 into +0.
TORCHLNS_INLINE void epilogue_impl(float* __restrict y, const float* __restrict scale, const float* __restrict bias,
                                   int64_t C, int64_t inner, int64_t c0, int64_t c1, bool integer) {
  for (int64_t oc = c0; oc < c1; ++oc) {
    const int64_t c = oc % C;
    const float s = scale[c], b = bias ? bias[c] : 0.0f;
    float* row = y + oc * inner;
    if (integer && bias) {
      for (int64_t i = 0; i < inner; ++i) row[i] = (row[i] + 0.0f) * s + b;
    } else if (integer) {
      for (int64_t i = 0; i < inner; ++i) row[i] = (row[i] + 0.0f) * s;
    } else if (bias) {
      for (int64_t i = 0; i < inner; ++i) row[i] = row[i] * s + b;
    } else {
      for (int64_t i = 0; i < inner; ++i) row[i] = row[i] * s;
    }
  }
}
TORCHLNS_ISA_CLONES(void, epilogue,
                    (float* __restrict y, const float* __restrict scale, const float* __restrict bias, int64_t C,
                     int64_t inner, int64_t c0, int64_t c1, bool integer),
                    (y, scale, bias, C, inner, c0, c1, integer))

// Scale and bias a contiguous (outer, C, inner) float32 tensor in place (see epilogue_impl).
void scale_and_bias(at::Tensor& y, const at::Tensor& scale, const std::optional<at::Tensor>& bias, bool integer) {
  const int64_t C = scale.numel(), inner = y.numel() / std::max<int64_t>(1, y.size(0) * C);
  const auto s = scale.contiguous();
  std::optional<at::Tensor> b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  float* p = y.data_ptr<float>();
  const float* sp = s.data_ptr<float>();
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  at::parallel_for(0, y.size(0) * C, std::max<int64_t>(1, 16384 / std::max<int64_t>(inner, 1)),
                   [&](int64_t a, int64_t e) { epilogue(p, sp, bp, C, inner, a, e, integer); });
}

// (largest |v|, largest L1 norm of a row of rows x K) of integer values, both exact in double.
std::pair<double, double> abs_stats(const at::Tensor& v, int64_t rows) {
  if (v.numel() == 0) return {0.0, 0.0};
  const auto a = v.reshape({rows, -1}).abs();
  return {a.max().item<double>(), a.sum(1, false, at::kDouble).max().item<double>()};
}

// The preparation's tag: the op and, for FP8, the value table itself (256 values).
std::string table_tag(const char* what, const std::optional<at::Tensor>& values) {
  std::ostringstream t;
  t << what;
  if (values.has_value()) {
    const auto v = values->to(at::kFloat).contiguous();
    const float* p = v.data_ptr<float>();
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the bit patterns
    for (int64_t i = 0; i < v.numel(); ++i) h = (h ^ float_bits(p[i])) * 1099511628211ull;
    t << ":fp8:" << h;
  }
  return t.str();
}

// The weight's unscaled values and, for INT, {max|v|, largest L1 norm of a row} (see Note:
// prepared weights in weight_cache.h).
std::vector<at::Tensor> weight_values(const at::Tensor& w, const at::Tensor& w_scale,
                                      const std::optional<at::Tensor>& w_values, int64_t rows, const char* what) {
  return prepared_weight(w, w_scale, table_tag(what, w_values), [&] {
    auto vw = code_values(w, w_values);
    std::vector<at::Tensor> out{vw};
    if (!w_values.has_value()) {
      const auto [w_max, w_l1] = abs_stats(vw, rows);
      out.push_back(at::tensor({w_max, w_l1}, at::kDouble));
    }
    return out;
  });
}

// Rows per block: a function of the shape only, so the bits never depend on the thread count.
int64_t row_block(int64_t M) { return std::clamp<int64_t>((M + 7) / 8, 32, 1024); }

// (M, K) x (N, K)^T in fixed row blocks (and column blocks when there are few rows), each
// block one single-threaded GEMM.
at::Tensor blocked_mm(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), N = b.size(0);
  auto out = at::empty({M, N}, a.options());
  if (!M || !N) return out;
  if (a.size(1) == 0) return out.zero_();
  const int64_t mb = row_block(M), rb = (M + mb - 1) / mb;
  const int64_t nb = rb >= 4 ? N : std::max<int64_t>(64, (N + 3) / 4), cb = (N + nb - 1) / nb;
  const auto bt = b.t();
  at::parallel_for(0, rb * cb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / cb) * mb, c0 = (t % cb) * nb;
      const int64_t rows = std::min(mb, M - r0), cols = std::min(nb, N - c0);
      auto dst = out.narrow(0, r0, rows).narrow(1, c0, cols);
      at::mm_out(dst, a.narrow(0, r0, rows), bt.narrow(1, c0, cols));
    }
  });
  return out;
}

// K cut at every block boundary of either operand (block 0: constant over all of K).
std::vector<std::pair<int64_t, int64_t>> segments(int64_t K, int64_t xb, int64_t wb) {
  std::vector<int64_t> cuts{0, K};
  for (int64_t b : {xb, wb})
    if (b > 0)
      for (int64_t k = b; k < K; k += b) cuts.push_back(k);
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  std::vector<std::pair<int64_t, int64_t>> out;
  for (size_t i = 0; i + 1 < cuts.size(); ++i) out.emplace_back(cuts[i], cuts[i + 1]);
  return out;
}

at::Tensor scaled_mm_cpu(const at::Tensor& x, const at::Tensor& x_scale, const std::optional<at::Tensor>& x_values,
                         const at::Tensor& w, const at::Tensor& w_scale, const std::optional<at::Tensor>& w_values,
                         const std::optional<at::Tensor>& bias, int64_t x_block, int64_t w_block) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "scaled_mm: x (M, K) and w (N, K) codes");
  TORCH_CHECK(x_scale.dim() == 2 && w_scale.dim() == 2, "scaled_mm: scales are (1 or rows, 1 or K)");
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1);
  const bool integer = !x_values.has_value();
  double x_max = 0.0;
  const auto vx = code_values(x, x_values, &x_max);
  const auto prepared = weight_values(w, w_scale, w_values, N, "scaled_mm");
  const auto& vw = prepared[0];
  bool exact_in_float32 = true;
  int64_t chunk = K;  // terms per exact float32 product
  if (integer && M && N && K) {
    const double* wst = prepared[1].data_ptr<double>();  // max|vw|, largest L1 norm of a weight row
    exact_in_float32 = x_max * wst[1] < kExactFloat32 || wst[0] * abs_stats(vx, M).second < kExactFloat32;
    if (!exact_in_float32) chunk = std::max<int64_t>(1, int64_t((kExactFloat32 - 1) / std::max(1.0, x_max * wst[0])));
  }
  // The exact product of one K range: one float32 GEMM, or exact chunks summed in float64.
  const auto exact_mm = [&](const at::Tensor& a, const at::Tensor& b) {
    const int64_t k = a.size(1);
    if (k <= chunk) return blocked_mm(a, b);
    at::Tensor total;
    for (int64_t k0 = 0; k0 < k; k0 += chunk) {
      const auto part = blocked_mm(a.narrow(1, k0, std::min(chunk, k - k0)), b.narrow(1, k0, std::min(chunk, k - k0)));
      total = total.defined() ? total + part.to(at::kDouble) : part.to(at::kDouble);
    }
    return total.to(at::kFloat);
  };
  const auto xs = x_scale.to(at::kFloat), ws = w_scale.to(at::kFloat);
  if (x_block == 0 && w_block == 0 && xs.numel() == 1 && ws.size(1) == 1 && K) {
    // One segment, one input scale: y = part * (s_x s_w[n]) + b[n], fused.
    auto y = exact_mm(vx, vw).contiguous();
    const auto scale = (xs.reshape({1}) * ws.reshape({-1})).expand({N}).contiguous();
    auto y3 = y.view({M, N, 1});
    scale_and_bias(y3, scale, bias, integer);
    return y;
  }
  at::Tensor y;
  for (const auto& [k0, k1] : segments(K, x_block, w_block)) {
    const auto a = vx.narrow(1, k0, k1 - k0), b = vw.narrow(1, k0, k1 - k0);
    at::Tensor part = exact_mm(a, b);
    if (integer) part = part + 0.0f;  // an integer sum has no -0
    const auto scale = xs.select(1, std::min(k0, xs.size(1) - 1)).unsqueeze(1) *
                       ws.select(1, std::min(k0, ws.size(1) - 1)).unsqueeze(0);
    y = y.defined() ? y + part * scale : part * scale;
  }
  if (!y.defined()) y = at::zeros({M, N}, x.options().dtype(at::kFloat));  // K = 0: an empty sum
  if (bias.has_value()) y = y + bias->to(at::kFloat);
  return y.contiguous();
}

at::Tensor scaled_conv_cpu(const at::Tensor& x, const at::Tensor& x_scale, const std::optional<at::Tensor>& x_values,
                           const at::Tensor& w, const at::Tensor& w_scale, const std::optional<at::Tensor>& w_values,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef pad_before,
                           at::IntArrayRef pad_after, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "scaled_conv: (N, C, H, W) and (Cout, C/groups, kh, kw) codes");
  TORCH_CHECK(x_scale.numel() == 1, "scaled_conv: the input scale is per tensor");
  TORCH_CHECK(w_scale.numel() == 1 || w_scale.numel() == w.size(0), "scaled_conv: weight scales per tensor or channel");
  const int64_t Cout = w.size(0);
  const bool integer = !x_values.has_value();
  double x_max = 0.0;
  auto vx = code_values(x, x_values, &x_max);
  const auto prepared = weight_values(w, w_scale, w_values, Cout, "scaled_conv");
  const auto& vw = prepared[0];
  const bool symmetric = pad_before[0] == pad_after[0] && pad_before[1] == pad_after[1];
  std::vector<int64_t> padding(pad_before.begin(), pad_before.end());
  if (!symmetric) {  // padding is the zero code, whose value is 0
    vx = at::constant_pad_nd(vx, {pad_before[1], pad_after[1], pad_before[0], pad_after[0]}, 0.0);
    padding = {0, 0};
  }
  bool exact_in_float32 = true;
  const double* wst = integer ? prepared[1].data_ptr<double>() : nullptr;
  if (integer && vx.numel() && vw.numel()) {
    // max|vx| times the largest L1 norm of a filter; failing that, the largest sum of |vx|
    // over a receptive field (per group) times max|vw|. Both are sums of integers < 2^24.
    exact_in_float32 = x_max * wst[1] < kExactFloat32;
    if (!exact_in_float32) {
      const int64_t Nb = vx.size(0), C = vx.size(1);
      const auto field = vx.abs().reshape({Nb, groups, C / groups, vx.size(2), vx.size(3)}).sum(2);
      const auto box = at::ones({groups, 1, w.size(2), w.size(3)}, vx.options());
      const double x_field = at::conv2d(field, box, {}, stride, padding, dilation, groups).max().item<double>();
      exact_in_float32 = wst[0] * x_field < kExactFloat32;
    }
  }
  at::Tensor y;
  if (exact_in_float32) {
    y = at::conv2d(vx, vw, {}, stride, padding, dilation, groups);
  } else {  // chunks of input channels (in every group), each an exact float32 convolution
    const int64_t Nb = vx.size(0), Cg = w.size(1), taps = w.size(2) * w.size(3);
    const int64_t per = std::max<int64_t>(1, int64_t((kExactFloat32 - 1) / (std::max(1.0, x_max * wst[0]) * taps)));
    const auto xg = vx.view({Nb, groups, Cg, vx.size(2), vx.size(3)});
    const auto wg = vw.view({groups, Cout / groups, Cg, w.size(2), w.size(3)});
    at::Tensor total;
    for (int64_t c0 = 0; c0 < Cg; c0 += per) {
      const int64_t n = std::min(per, Cg - c0);
      const auto xs = xg.narrow(2, c0, n).reshape({Nb, groups * n, vx.size(2), vx.size(3)});
      const auto ws = wg.narrow(2, c0, n).reshape({Cout, n, w.size(2), w.size(3)});
      const auto part = at::conv2d(xs, ws, {}, stride, padding, dilation, groups).to(at::kDouble);
      total = total.defined() ? total + part : part;
    }
    y = total.to(at::kFloat);
  }
  y = y.contiguous();
  const auto scale = (x_scale.to(at::kFloat).reshape({1}) * w_scale.to(at::kFloat).reshape({-1})).expand({Cout});
  scale_and_bias(y, scale, bias, integer);
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchlns, CPU, m) {
  m.impl("scaled_mm", &scaled_mm_cpu);
  m.impl("scaled_conv", &scaled_conv_cpu);
}

}  // namespace torchlns
