"""Reference multiply-accumulate: lns_linear / lns_conv1d / lns_conv2d (chip-model.md 2-5).

Vectorized PyTorch, exact wherever the spec says exact, and the oracle for every kernel.

# Note: reference MAC arithmetic
* LNS products are formed per (row, column, k) from the log sum ``G = g_a + g_w`` and
  converted with ``C[r]`` (``_tables.conversion_table``). Every ``C[r]`` has at most 25
  significant bits and ``|q| < 800``, so ``C[r] * 2^q`` is an exact float64: both
  accumulators start from exact products.
* float32 accumulator: the exact products are summed in float64 and the sum is rounded once
  to float32. The error is at most ``2^-24 |y| + K 2^-53 sum|p|``, inside the spec's
  ``K 2^-24 sum|p|``, so the reference is the most accurate member of the allowed family.
  (A product outside the float32 range, which only absurd offsets can produce, is kept
  exact here; a float32 datapath would overflow or flush it.)
* fixed accumulator: ``p_int = ±min(floor(C[r] 2^(q-Λ)), 2^(W-1)-1)`` is computed as an
  exact float64 floor and summed in int64. ``K 2^(W-1) < 2^63`` is checked, so the sum
  cannot wrap. The bias ``rne(b / 2^Λ)`` is clamped to ``±(2^63 - 1024)``, which cannot
  change the saturated result (for ``K <= 1023`` the sum is < 2^57; otherwise
  ``(K+1) T + 1024 < 2^63``), and the addition detects int64 overflow explicitly instead of
  relying on wrap-around. ``acc * 2^Λ`` is exact in float64 and rounded once to float32.
  A ±inf bias saturates; a NaN bias has no integer value and makes its outputs NaN, as it
  does with the float32 accumulator.
* NaN dominates: any NaN operand in a dot product makes that output NaN, even when its
  partner is zero (as IEEE ``NaN * 0``). Zero codes give zero products; conv padding is the
  zero code.
* FP8/INT: the K axis is cut at every block boundary of either operand; inside a segment
  both scales are constant. The segment sum is exact (INT, as float64 of integers below
  2^53) or float64 of exact products (FP8), then ``y_seg = float32(sum) * (s_x * s_w)`` in
  float32, and segments are added in order in float32. With per-tensor or per-channel
  scales there is one segment and this is exactly ``y = float32(acc) * (s_x s_w)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _tables
from .autograd import needs_grad, ste_conv, ste_linear
from .codec import _as_float32, _fp8_table, decode, expand_param
from .formats import IDEAL_MAC, LNS8, FP8Format, Format, IntFormat, LNSFormat, MACConfig

__all__ = ["lns_linear", "lns_conv1d", "lns_conv2d"]

_ACC_LSB_RANGE = (-512, 512)
_BIAS_CLAMP = float(2**63 - 1024)
_I64_MAX = 2**63 - 1
_I64_MIN = -(2**63)
_CHUNK_ELEMENTS = 1 << 22  # rows*N*K per elementwise chunk: ~32 MB per float64 temporary


@dataclass
class _Matrix:
    """A 2-D operand of the MAC: rows x K codes and their compact parameters.

    ``param`` has shape (1 or rows, 1 or K or ceil(K/block)) (see Note: parameter layout in
    codec.py); ``block`` is the block size along K or None.
    """

    codes: torch.Tensor
    fmt: Format
    param: torch.Tensor
    block: Optional[int]

    def param_along_k(self) -> torch.Tensor:
        return expand_param(self.param, 1 if self.block else None, self.block, self.codes.shape[1])

    @property
    def k_block(self) -> Optional[int]:
        """Run length along K over which the parameter is constant (None: all of K)."""
        return self.block or (1 if self.param.shape[1] > 1 else None)


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------
def _check_mac(mac: MACConfig, acc_lsb: Optional[int], fmt: Format) -> None:
    if not isinstance(mac, MACConfig):
        raise TypeError(f"mac must be a MACConfig, got {type(mac).__name__}")
    if not isinstance(fmt, LNSFormat):
        if acc_lsb is not None:
            raise ValueError(f"acc_lsb applies to the LNS fixed accumulator; {fmt} accumulates as spec section 5 says")
        return
    if mac.accumulator == "fixed":
        if acc_lsb is None:
            raise ValueError("the fixed accumulator needs acc_lsb (the exponent of its LSB); a converted module calibrates it")
        if isinstance(acc_lsb, bool) or not isinstance(acc_lsb, int):
            raise TypeError(f"acc_lsb must be an int, got {type(acc_lsb).__name__}")
        lo, hi = _ACC_LSB_RANGE
        if not lo <= acc_lsb <= hi:
            raise ValueError(f"acc_lsb={acc_lsb} is out of range {lo}..{hi} (beyond it every output saturates or vanishes)")
    elif acc_lsb is not None:
        raise ValueError("acc_lsb is only used by the fixed accumulator; this MAC accumulates in float32")


def _check_pair(fx: Format, fw: Format) -> None:
    if type(fx) is not type(fw):
        raise TypeError(f"cannot multiply {fx} activations by {fw} weights: both operands must be LNS, FP8 or INT")
    if isinstance(fx, LNSFormat) and fx.frac_bits != fw.frac_bits:
        raise ValueError(
            f"LNS operands must share frac_bits so that log codes add: activations {fx}, weights {fw}"
        )


def _check_bias(bias, n_out: int, device) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    from .tensor import CodedTensor

    if isinstance(bias, CodedTensor):
        raise TypeError(f"bias is a {type(bias).__name__}; the chip adds a float32 bias, so pass a float tensor")
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be a float tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
    if bias.shape != (n_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n_out},)")
    return bias.detach().to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------
# LNS core
# ----------------------------------------------------------------------------------------
def _exp2_f64(e: torch.Tensor) -> torch.Tensor:
    """2^e as float64 for integer e in [-1022, 1023], built from the bit pattern (exact)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def _log_fields(codes: torch.Tensor, offset: torch.Tensor, bits: int):
    """(log value g, negative, zero, nan) per element; g is 0 where the code is zero/NaN."""
    e_max = (1 << (bits - 1)) - 1
    c = codes.to(torch.int32) & ((1 << bits) - 1)
    mag = c & e_max
    negative = c > e_max
    zero = mag == 0
    g = torch.where(zero, 0, mag + offset.to(torch.int32))
    return g, negative, zero, zero & negative


def lns_mm_reference(x: torch.Tensor, x_offset: torch.Tensor, w: torch.Tensor, w_offset: torch.Tensor,
                     table: torch.Tensor, bias: Optional[torch.Tensor], x_bits: int, w_bits: int, frac_bits: int,
                     fixed: bool, acc_bits: int, acc_lsb: int) -> torch.Tensor:
    """Reference kernel of ``torchlns::lns_mm``: (M, K) x (N, K) codes -> (M, N) float32.

    Offsets broadcast against their codes; ``table`` is ``C[r]`` as exact float64.
    """
    F = frac_bits
    M, K = x.shape
    N = w.shape[0]
    gx, nx, zx, nanx = _log_fields(x, x_offset, x_bits)
    gw, nw, zw, nanw = _log_fields(w, w_offset, w_bits)
    T = 2 ** (acc_bits - 1) - 1
    shift = acc_lsb if fixed else 0
    out = torch.empty(M, N, dtype=torch.int64 if fixed else torch.float64, device=x.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, N * K))
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        G = gx[r0:r1, None, :] + gw[None, :, :]
        p = table[(G & ((1 << F) - 1)).long()] * _exp2_f64((G >> F) - shift)
        if fixed:
            p = p.floor_().clamp_(max=T)
        p = p.masked_fill_(zx[r0:r1, None, :] | zw[None, :, :], 0.0)
        p = torch.where(nx[r0:r1, None, :] ^ nw[None, :, :], -p, p)
        out[r0:r1] = p.to(torch.int64).sum(-1) if fixed else p.sum(-1)
    nan_out = nanx.any(1)[:, None] | nanw.any(1)[None, :]
    if not fixed:
        y = out.to(torch.float32)
        if bias is not None:
            y = y + bias
    else:
        y = _fixed_output(out, bias, T, acc_lsb)
    return y.masked_fill_(nan_out, math.nan)


def _lns_mac(x: _Matrix, w: _Matrix, bias, mac: MACConfig, acc_lsb) -> torch.Tensor:
    _check_reduction(x.codes.shape[1], mac)
    fixed = mac.accumulator == "fixed"
    F = x.fmt.frac_bits
    table = _tables.conversion_tensor_f64(F, mac.conversion, mac.lut_bits, x.codes.device)
    return torch.ops.torchlns.lns_mm(
        x.codes, x.param_along_k().to(torch.int32), w.codes, w.param_along_k().to(torch.int32), table, bias,
        x.fmt.bits, w.fmt.bits, F, fixed, mac.acc_bits, acc_lsb if fixed else 0,
    )


def _fixed_output(acc: torch.Tensor, bias, T: int, acc_lsb: int) -> torch.Tensor:
    """Bias, final saturation and scaling of the fixed accumulator (see the Note above)."""
    if bias is not None:
        b = torch.round(bias.to(torch.float64) * 2.0**-acc_lsb).clamp_(-_BIAS_CLAMP, _BIAS_CLAMP).to(torch.int64)
        b = b.expand_as(acc)
        over = (b > 0) & (acc > _I64_MAX - b.clamp(min=0))
        under = (b < 0) & (acc < _I64_MIN - b.clamp(max=0))
        acc = torch.where(over | under, 0, acc) + torch.where(over | under, 0, b)
        acc = torch.where(over, T, torch.where(under, -T, acc))
    acc = acc.clamp(-T, T)
    y = (acc.to(torch.float64) * 2.0**acc_lsb).to(torch.float32)
    return y if bias is None else y.masked_fill_(torch.isnan(bias).expand_as(y), math.nan)


# ----------------------------------------------------------------------------------------
# FP8 / INT core
# ----------------------------------------------------------------------------------------
def _unscaled_values(m: _Matrix) -> torch.Tensor:
    if isinstance(m.fmt, FP8Format):
        return _fp8_table(m.fmt, m.codes.device)[m.codes.long()].to(torch.float64)
    return m.codes.to(torch.float64)


def _segments(K: int, *blocks: Optional[int]) -> list:
    cuts = {0, K}
    for b in blocks:
        if b:
            cuts.update(range(0, K, b))
    cuts = sorted(cuts)
    return list(zip(cuts[:-1], cuts[1:]))


def _scaled_mac(x: _Matrix, w: _Matrix, bias) -> torch.Tensor:
    M, K = x.codes.shape
    N = w.codes.shape[0]
    if isinstance(x.fmt, IntFormat) and K * x.fmt.qmax * w.fmt.qmax >= 2**53:
        raise ValueError(f"accumulator overflow: K={K} products of {x.fmt} x {w.fmt} exceed the 2^53 exact range")
    vx, vw = _unscaled_values(x), _unscaled_values(w)
    integer = isinstance(x.fmt, IntFormat)
    sx, sw = x.param_along_k(), w.param_along_k()
    # Scales per element of K, or a single column; both are constant inside a segment.
    y = None  # the first segment is not added to 0.0, which would turn -0.0 into +0.0
    for k0, k1 in _segments(K, x.k_block, w.k_block):
        part = (vx[:, k0:k1] @ vw[:, k0:k1].T).to(torch.float32)
        if integer:  # an integer sum has no -0, but float64's -5 * 0 does
            part = torch.where(part == 0, 0.0, part)
        scale = sx[:, min(k0, sx.shape[1] - 1), None] * sw[None, :, min(k0, sw.shape[1] - 1)]
        y = part * scale if y is None else y + part * scale
    if y is None:  # K = 0: an empty sum
        y = torch.zeros(M, N, dtype=torch.float32, device=x.codes.device)
    if bias is not None:
        y = y + bias
    return y


def _mac(x: _Matrix, w: _Matrix, bias, mac: MACConfig, acc_lsb) -> torch.Tensor:
    if x.codes.shape[1] != w.codes.shape[1]:
        raise ValueError(f"reduction sizes differ: activations have K={x.codes.shape[1]}, weights K={w.codes.shape[1]}")
    if x.codes.device != w.codes.device:
        raise ValueError(f"operands are on different devices: {x.codes.device} and {w.codes.device}")
    if isinstance(x.fmt, LNSFormat):
        return _lns_mac(x, w, bias, mac, acc_lsb)
    return _scaled_mac(x, w, bias)


# ----------------------------------------------------------------------------------------
# operands
# ----------------------------------------------------------------------------------------
class CodedParts(NamedTuple):
    """A coded operand as plain parts: what a ``CodedTensor`` holds, without the subclass.

    Layers pass these instead of building a tensor subclass inside ``forward``:
    torch.compile cannot trace the construction of a subclass whose metadata (the format)
    is created in the graph.
    """

    codes: torch.Tensor
    fmt: Format
    param: torch.Tensor
    block_axis: Optional[int] = None
    block_size: Optional[int] = None


def _coded_parts(t):
    """(codes, fmt, compact param, block axis, block size) of a coded tensor."""
    from .tensor import CodedTensor

    if isinstance(t, CodedParts):
        return t
    if isinstance(t, CodedTensor):
        axis, size = t.block if t.block else (None, None)
        return CodedParts(t.codes, t.fmt, t.param, axis, size)
    return None


def _encode_operand(t, fmt: Format, what: str, block_size: Optional[int] = None) -> CodedParts:
    """Float operand -> its coded parts; per tensor, or per block along K when ``block_size``."""
    from .tensor import encode_compact

    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a tensor or an LNSTensor, got {type(t).__name__}")
    t = t.detach()  # codes carry no gradient; the straight-through estimator supplies it
    granularity = "tensor" if block_size is None else "block"
    codes, param, block = encode_compact(t, fmt, granularity, -1 if block_size else None, block_size)
    return CodedParts(codes, fmt, param, *(block or (None, None)))


def _resolve_formats(x, w, fmt: Optional[Format] = None):
    """Coded parts of each operand, and the format that float operands are encoded in."""
    px, pw = _coded_parts(x), _coded_parts(w)
    coded = px[1] if px else pw[1] if pw else None
    if fmt is not None and coded is not None and type(fmt) is not type(coded):
        raise TypeError(f"fmt={fmt} conflicts with an operand already encoded as {coded}")
    return px, pw, fmt or coded or LNS8


def _rows_param(param: torch.Tensor, block_axis, lead_shape: torch.Size) -> torch.Tensor:
    """Compact param of an (..., K) operand -> (1 or rows, kdim) with rows = prod(leading)."""
    if block_axis is not None and block_axis != len(lead_shape):
        raise ValueError("per-block parameters of a linear operand must run along its last (reduction) axis")
    if all(s == 1 for s in param.shape[:-1]):
        return param.reshape(1, param.shape[-1])
    return param.expand(*lead_shape, param.shape[-1]).reshape(lead_shape.numel(), param.shape[-1])


# ----------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------
def lns_linear(x, w, bias: Optional[torch.Tensor] = None, mac: MACConfig = IDEAL_MAC, *,
               acc_lsb: Optional[int] = None, x_block_size: Optional[int] = None,
               fmt: Optional[Format] = None) -> torch.Tensor:
    """``y[..., n] = MAC_k(x[..., k], w[n, k]) + bias[n]`` as the chip computes it.

    ``x`` and ``w`` are coded tensors (LNS, FP8 or INT; both of one kind) or float tensors,
    which are encoded per tensor in ``fmt`` (default: the other operand's format, else LNS8).
    Float operands that require grad get straight-through gradients (QAT).
    ``x_block_size`` encodes a float ``x`` with dynamic per-block offsets/scales along K, as
    MX formats do. ``acc_lsb`` is required by, and only by, the LNS fixed accumulator.
    """
    px, pw, fmt = _resolve_formats(x, w, fmt)
    if x_block_size is not None and px is not None:
        raise ValueError("x_block_size encodes a float x dynamically; x is already encoded")
    px = px or _encode_operand(x, fmt, "x", x_block_size)
    pw = pw or _encode_operand(w, fmt, "w")
    xc, fx, xp, xax, xbs = px
    wc, fw, wp, wax, wbs = pw
    _check_pair(fx, fw)
    _check_mac(mac, acc_lsb, fx)
    if wc.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(wc.shape)}")
    if xc.dim() < 1:
        raise ValueError("x must have at least one dim (..., in_features)")
    if wax == 0:
        raise ValueError("per-block weight parameters must run along the reduction axis (dim 1)")
    lead = xc.shape[:-1]
    K = xc.shape[-1]
    xm = _Matrix(xc.reshape(lead.numel(), K), fx, _rows_param(xp, xax, lead), xbs)
    wm = _Matrix(wc, fw, wp, wbs)
    y = _mac(xm, wm, _check_bias(bias, wc.shape[0], xc.device), mac, acc_lsb)
    y = y.reshape(*lead, wc.shape[0])
    if needs_grad(x, w, bias):  # see Note: straight-through estimator in autograd.py
        x_deq, w_deq = _dequantize(px), _dequantize(pw)
        y = ste_linear(y, x_deq, w_deq, _grad_source(x, x_deq), _grad_source(w, w_deq), bias)
    return y


def _dequantize(parts) -> torch.Tensor:
    codes, fmt, param, axis, size = parts
    return decode(codes, fmt, expand_param(param, axis, size, codes.shape[axis] if axis is not None else 0))


def _grad_source(operand, dequantized: torch.Tensor) -> torch.Tensor:
    """The tensor that receives the operand's gradient: itself if float, else its values."""
    return dequantized if _coded_parts(operand) is not None else operand


def _pair(v, n: int, what: str) -> tuple:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    if isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) for i in v):
        return tuple(v)
    raise ValueError(f"{what} must be an int or a tuple of {n} ints, got {v!r}")


def _conv_padding(padding, kernel, dilation, stride, n: int):
    """(before, after) padding per spatial dim; 'same' pads the extra element after, as torch."""
    if padding == "valid":
        return [(0, 0)] * n
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in _pair(padding, n, "padding")]


def _im2col_index(H, W, kernel, stride, padding, dilation, device):
    """Flat input index of each (tap, output position), or H*W for padding (the zero code)."""
    (ph0, _), (pw0, _) = padding
    Ho = (H + sum(padding[0]) - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    Wo = (W + sum(padding[1]) - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"input {H}x{W} is smaller than the dilated kernel after padding")
    ih = torch.arange(kernel[0], device=device)[:, None] * dilation[0] + torch.arange(Ho, device=device)[None, :] * stride[0] - ph0
    iw = torch.arange(kernel[1], device=device)[:, None] * dilation[1] + torch.arange(Wo, device=device)[None, :] * stride[1] - pw0
    valid = ((ih >= 0) & (ih < H))[:, None, :, None] & ((iw >= 0) & (iw < W))[None, :, None, :]
    flat = ih[:, None, :, None] * W + iw[None, :, None, :]
    idx = torch.where(valid, flat, H * W)  # (kh, kw, Ho, Wo)
    return idx.reshape(kernel[0] * kernel[1], Ho * Wo), Ho, Wo


def _im2col(t: torch.Tensor, idx: torch.Tensor, pad_value) -> torch.Tensor:
    """(N, C, H, W) -> (N*L, C*kh*kw) columns in PyTorch's (c, i, j) order."""
    N, C, H, W = t.shape
    flat = torch.cat([t.reshape(N, C, H * W), t.new_full((N, C, 1), pad_value)], dim=2)
    cols = flat[:, :, idx]  # (N, C, taps, L)
    return cols.permute(0, 3, 1, 2).reshape(N * idx.shape[1], C * idx.shape[0])


def lns_conv_reference(x: torch.Tensor, x_offset: torch.Tensor, w: torch.Tensor, w_offset: torch.Tensor,
                       table: torch.Tensor, bias: Optional[torch.Tensor], x_bits: int, w_bits: int, frac_bits: int,
                       fixed: bool, acc_bits: int, acc_lsb: int, stride: Sequence[int], pad_before: Sequence[int],
                       pad_after: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``torchlns::lns_conv``: (N, C, H, W) codes * (Cout, C/groups, kh, kw) codes -> float32.

    im2col of the codes (padding is the zero code) and of the offsets, then ``lns_mm`` per
    group, so every backend's MAC kernel does the arithmetic. Offsets broadcast against their
    codes.
    """
    N, C, H, W = x.shape
    Cout, Cin_g, kh, kw = w.shape
    idx, Ho, Wo = _im2col_index(H, W, (kh, kw), stride, list(zip(pad_before, pad_after)), dilation, x.device)
    Kg = Cin_g * idx.shape[0]
    cols = _im2col(x, idx, 0)
    col_off = x_offset.reshape(1, 1) if x_offset.numel() == 1 else _im2col(x_offset.expand(x.shape), idx, 0)
    w2 = w.reshape(Cout, Kg)
    if w_offset[0].numel() == 1:  # per tensor or per output channel
        w_off = w_offset.reshape(w_offset.shape[0], 1)
    else:
        w_off = w_offset.expand(w.shape).reshape(Cout, Kg)
    outs = []
    Cout_g = Cout // groups
    for gi in range(groups):
        ks, os_ = slice(gi * Kg, (gi + 1) * Kg), slice(gi * Cout_g, (gi + 1) * Cout_g)
        outs.append(torch.ops.torchlns.lns_mm(
            cols[:, ks], col_off[:, ks] if col_off.shape[1] > 1 else col_off, w2[os_],
            w_off[os_] if w_off.shape[0] > 1 else w_off, table, None if bias is None else bias[os_],
            x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb))
    # Contiguous, as the fake kernel promises (strides are part of an op's contract).
    return torch.cat(outs, dim=1).reshape(N, Ho * Wo, Cout).permute(0, 2, 1).reshape(N, Cout, Ho, Wo).contiguous()


def lns_conv_cpu(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb, stride,
                 pad_before, pad_after, dilation, groups):
    """CPU kernel of ``torchlns::lns_conv``: for the float32 accumulator, the remainder
    classes (see Note: remainder classes in csrc/mac_cpu.cpp) applied before im2col,
    ``y = sum_i conv2d(A_i, V_i)``, with oneDNN's direct convolution on exactly representable
    operands; otherwise im2col and the lns_mm kernel (lns_conv_reference).
    """
    args = (x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb, stride,
            pad_before, pad_after, dilation, groups)
    if fixed or list(pad_before) != list(pad_after) or not x.numel() or not w.numel():
        return lns_conv_reference(*args)
    R = 1 << frac_bits
    gx, nx, zx, nanx = _log_fields(x, x_offset, x_bits)
    gw, nw, zw, nanw = _log_fields(w, w_offset, w_bits)
    qx, qw = gx >> frac_bits, gw >> frac_bits
    # Range of q over the nonzero codes (zero codes count as q = 0, which is always in range).
    x_lo, x_hi = torch.where(zx, 0, qx).aminmax()
    w_lo, w_hi = torch.where(zw, 0, qw).aminmax()
    x_lo, x_hi, w_lo, w_hi = x_lo.item(), x_hi.item(), w_lo.item(), w_hi.item()
    # C_ext < 4: V entries need qw + 2 <= 127, products qx + qw + 2 <= 127; all >= -126.
    if not (x_lo >= -126 and x_hi <= 127 and w_lo >= -126 and w_hi + 2 <= 127 and x_lo + w_lo >= -126
            and x_hi + w_hi + 2 <= 127):
        return lns_conv_reference(*args)
    f32 = torch.float32
    c_ext = torch.cat([table, 2 * table]).to(f32)
    px = torch.where(zx, 0.0, torch.where(nx, -1.0, 1.0)).to(f32) * _exp2_f64(qx).to(f32)
    pw = torch.where(zw, 0.0, torch.where(nw, -1.0, 1.0)).to(f32) * _exp2_f64(qw).to(f32)
    rx, rw = gx & (R - 1), (gw & (R - 1)).long()
    y = None
    for i in range(R):  # a fixed class order and layout: the same bits at any thread count or layout
        plane = torch.where(rx == i, px, 0.0).contiguous()
        part = F.conv2d(plane, (pw * c_ext[rw + i]).contiguous(), None, stride, list(pad_before), dilation, groups)
        y = part if y is None else y + part
    if bias is not None:
        y = y + bias.to(f32)[None, :, None, None]
    # NaN dominates its dot products: every output whose field holds a NaN input, and every
    # output channel whose weights hold one.
    if bool(nanx.any()):
        ones = torch.ones(w.shape[0], w.shape[1], *w.shape[2:], dtype=f32, device=x.device)
        hit = F.conv2d(nanx.to(f32), ones, None, stride, list(pad_before), dilation, groups) > 0
        y = y.masked_fill(hit, math.nan)
    nan_w = nanw.reshape(w.shape[0], -1).any(1)
    return y.masked_fill(nan_w[None, :, None, None], math.nan).contiguous()


def _check_reduction(K: int, mac: MACConfig) -> None:
    if mac.accumulator == "fixed" and K * 2 ** (mac.acc_bits - 1) >= 2**63:
        raise ValueError(
            f"accumulator overflow: K={K} products of up to 2^{mac.acc_bits - 1} need K*2^{mac.acc_bits - 1} < 2^63 "
            f"for an exact int64 sum; split the reduction or use fewer acc_bits"
        )


def _conv(x, w, bias, stride, padding, dilation, groups, mac, acc_lsb, x_block_size, fmt, n: int, name: str):
    px, pw, fmt = _resolve_formats(x, w, fmt)
    if pw is None:
        pw = _encode_operand(w, fmt, "w")
    wc, fw, wp, wax, wbs = pw
    if wc.dim() != n + 2:
        raise ValueError(f"{name} weight must be {n + 2}-D (out, in/groups, *kernel), got shape {tuple(wc.shape)}")
    if px is not None and x_block_size is not None:
        raise ValueError("x_block_size encodes a float x dynamically; x is already encoded")
    if px is None and x_block_size is None:
        px = _encode_operand(x, fmt, "x")  # per tensor, before im2col
    xt = px[0] if px else _as_float32(x)
    if not isinstance(xt, torch.Tensor) or xt.dim() not in (n + 1, n + 2):
        raise ValueError(f"{name} input must be {n + 1}-D or {n + 2}-D, got {getattr(xt, 'shape', type(xt).__name__)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    unbatched = xt.dim() == n + 1
    stride_, dilation_ = _pair(stride, n, "stride"), _pair(dilation, n, "dilation")
    kernel = tuple(wc.shape[2:])
    pads = _conv_padding(padding, kernel, dilation_, stride_, n)
    layer_geometry = (stride_, pads, dilation_)  # before conv1d is recast as conv2d
    if n == 1:  # conv1d is conv2d with a height-1 kernel
        stride_, dilation_, kernel, pads = (1, *stride_), (1, *dilation_), (1, *kernel), [(0, 0), *pads]
    Cout, Cin_g = wc.shape[0], wc.shape[1]

    def as4d(t):
        t = t.unsqueeze(0) if unbatched else t
        return t.unsqueeze(2) if n == 1 else t

    xt4 = as4d(xt)
    Nb, C, H, W = xt4.shape
    if C != Cin_g * groups or Cout % groups:
        raise ValueError(f"{name}: input has {C} channels, weight expects {Cin_g}x{groups} groups and {Cout} outputs")
    idx, Ho, Wo = _im2col_index(H, W, kernel, stride_, pads, dilation_, xt.device)
    taps = idx.shape[0]
    Kg = Cin_g * taps
    if px is not None and isinstance(px[1], LNSFormat):
        y = _lns_conv_op(px, pw, xt4, as4d, bias, mac, acc_lsb, stride_, pads, dilation_, groups, Kg, n)
    else:
        y = _scaled_or_dynamic_conv(px, pw, fmt, xt4, idx, bias, mac, acc_lsb, x_block_size, groups, Kg, taps, Ho, Wo)
    if n == 1:
        y = y.squeeze(2)
    if needs_grad(x, w, bias):  # see Note: straight-through estimator in autograd.py
        # Dynamic per-block activations are encoded per receptive field, so an input element
        # has no single dequantized value: the backward then uses the float input.
        x_deq = _dequantize(px) if px is not None else _as_float32(x).detach()
        w_deq = _dequantize(pw)
        batch = (lambda t: t.unsqueeze(0)) if unbatched else (lambda t: t)  # noqa: E731
        y = ste_conv(y, batch(x_deq), w_deq, batch(_grad_source(x, x_deq)), _grad_source(w, w_deq), bias,
                     layer_geometry[0], layer_geometry[1], layer_geometry[2], groups)
    return y.squeeze(0) if unbatched else y


def _lns_conv_op(px, pw, xt4, as4d, bias, mac, acc_lsb, stride, pads, dilation, groups, Kg, n):
    """Coded LNS input: one torchlns::lns_conv call (see lns_conv_reference)."""
    xc, fx, xp, xax, xbs = px
    wc, fw, wp, wax, wbs = pw
    _check_pair(fx, fw)
    _check_mac(mac, acc_lsb, fx)
    _check_reduction(Kg, mac)
    b = _check_bias(bias, wc.shape[0], xc.device)
    x_off = as4d(expand_param(xp, xax, xbs, xc.shape[xax] if xax is not None else 0)).to(torch.int32)
    w_off = expand_param(wp, wax, wbs, wc.shape[wax] if wax is not None else 0).to(torch.int32)
    w4 = wc.unsqueeze(2) if n == 1 else wc
    w_off = w_off.unsqueeze(2) if n == 1 else w_off
    fixed = mac.accumulator == "fixed"
    table = _tables.conversion_tensor_f64(fx.frac_bits, mac.conversion, mac.lut_bits, xc.device)
    return torch.ops.torchlns.lns_conv(
        xt4, x_off, w4, w_off, table, b, fx.bits, fw.bits, fx.frac_bits, fixed, mac.acc_bits,
        acc_lsb if fixed else 0, list(stride), [p[0] for p in pads], [p[1] for p in pads], list(dilation), groups)


def _scaled_or_dynamic_conv(px, pw, fmt, xt4, idx, bias, mac, acc_lsb, x_block_size, groups, Kg, taps, Ho, Wo):
    """FP8/INT convolutions, and LNS with dynamic per-block activations (encoded per field)."""
    wc, fw, wp, wax, wbs = pw
    Cout, Nb = wc.shape[0], xt4.shape[0]
    if px is not None:
        fx, xp = px[1], px[2]
        if xp.numel() != 1:
            raise ValueError(f"{fx} activations of a convolution take a per-tensor scale, or x_block_size for dynamic blocks")
        cols_codes, cols_param = _im2col(xt4, idx, 0), xp.reshape(1, 1)
    else:
        fx, cols_float = fmt, _im2col(xt4, idx, 0.0)
    _check_pair(fx, fw)
    _check_mac(mac, acc_lsb, fx)
    b = _check_bias(bias, Cout, xt4.device)
    wflat_codes = wc.reshape(Cout, Kg)
    wparam = expand_param(wp, wax, wbs, wc.shape[wax] if wax is not None else 0)
    w_block = None
    if not isinstance(fw, LNSFormat) and wax == 1 and wp.shape[2:].numel() == 1:
        wparam, w_block = wp.reshape(wp.shape[0], -1), wbs * taps  # blocks of channels: runs of wbs*taps
    elif not isinstance(fw, LNSFormat) and wax is None and wp.shape[1:].numel() == 1:
        wparam = wp.reshape(wp.shape[0], 1)  # per tensor or per output channel
    else:  # any other layout: one parameter per weight element
        wparam = wparam.expand(wc.shape).reshape(Cout, Kg)
    outs = []
    Cout_g = Cout // groups
    for gi in range(groups):
        ks, os_ = slice(gi * Kg, (gi + 1) * Kg), slice(gi * Cout_g, (gi + 1) * Cout_g)
        if px is not None:
            xm = _Matrix(cols_codes[:, ks], fx, cols_param, None)
        else:
            codes, _, p, _, bs = _encode_operand(cols_float[:, ks], fmt, "x", x_block_size)
            xm = _Matrix(codes, fmt, p, bs)
        wm_param = wparam[os_] if wparam.shape[0] > 1 else wparam
        wm = _Matrix(wflat_codes[os_], fw, wm_param, w_block)
        outs.append(_mac(xm, wm, b[os_] if b is not None else None, mac, acc_lsb))
    return torch.cat(outs, dim=1).reshape(Nb, Ho * Wo, Cout).permute(0, 2, 1).reshape(Nb, Cout, Ho, Wo)


def lns_conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, mac: MACConfig = IDEAL_MAC, *,
               acc_lsb: Optional[int] = None, x_block_size: Optional[int] = None,
               fmt: Optional[Format] = None) -> torch.Tensor:
    """2-D convolution as the chip computes it: the MAC over each receptive field.

    Arguments follow ``F.conv2d`` (padding may be an int, a pair, 'valid' or 'same');
    padding is the zero code. See ``lns_linear`` for operands, ``acc_lsb`` and ``x_block_size``
    (blocks run along each group's ``Cin/groups * kh * kw`` reduction axis).
    """
    return _conv(x, w, bias, stride, padding, dilation, groups, mac, acc_lsb, x_block_size, fmt, 2, "lns_conv2d")


def lns_conv1d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, mac: MACConfig = IDEAL_MAC, *,
               acc_lsb: Optional[int] = None, x_block_size: Optional[int] = None,
               fmt: Optional[Format] = None) -> torch.Tensor:
    """1-D convolution as the chip computes it; see ``lns_conv2d``."""
    return _conv(x, w, bias, stride, padding, dilation, groups, mac, acc_lsb, x_block_size, fmt, 1, "lns_conv1d")
