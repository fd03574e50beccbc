"""Reference kernels of every ``torchlns::`` op: vectorized PyTorch, exact, the oracle.

Each function is registered as the op's ``CompositeExplicitAutograd`` kernel (see Note: op
registration in library.py), so it serves every device that has no kernel of its own, and
every native kernel is tested against it. The kernels take what the ops take: codes,
parameters already broadcast against them, the format as plain fields and its tables as
tensors. They check nothing; the public functions above validate first.

# Note: reference MAC arithmetic
* LNS products are formed per (row, column, k) from the log sum ``G = g_a + g_w`` and
  converted with ``C[r]`` (``core.tables.conversion_table``). Every ``C[r]`` has at most 25
  significant bits and ``|q| < 800``, so ``C[r] * 2^q`` is an exact float64: both
  accumulators start from exact products.
* float32 accumulator: the exact products are summed in float64 and the sum is rounded once
  to float32. The error is at most ``2^-24 |y| + K 2^-53 sum|p|``, inside the spec's
  ``K 2^-24 sum|p|``, so the reference is the most accurate member of the allowed family.
  (A product outside the float32 range, which only absurd offsets can produce, is kept
  exact here; a float32 datapath would overflow or flush it.)
* fixed accumulator: ``p_int = ±min(floor(C[r] 2^(q-Λ)), 2^(W-1)-1)`` is computed as an
  exact float64 floor and summed in int64. ``K 2^(W-1) < 2^63`` is checked before the op
  runs, so the sum cannot wrap. The bias ``rne(b / 2^Λ)`` is clamped to ``±(2^63 - 1024)``,
  which cannot change the saturated result (for ``K <= 1023`` the sum is < 2^57; otherwise
  ``(K+1) T + 1024 < 2^63``), and the addition detects int64 overflow explicitly instead of
  relying on wrap-around. ``acc * 2^Λ`` is exact in float64 and rounded once to float32.
  A ±inf bias saturates; a NaN bias has no integer value and makes its outputs NaN, as it
  does with the float32 accumulator.
* NaN dominates: any NaN operand in a dot product makes that output NaN, even when its
  partner is zero (as IEEE ``NaN * 0``). Zero codes give zero products; conv padding is the
  zero code.
* FP8/INT (``scaled_mm``): the K axis is cut at every block boundary of either operand;
  inside a segment both scales are constant. The segment sum is exact (INT, as float64 of
  integers below 2^53) or float64 of exact products (FP8), then
  ``y_seg = float32(sum) * (s_x * s_w)`` in float32, and segments are added in order in
  float32. With per-tensor or per-channel scales there is one segment and this is exactly
  ``y = float32(acc) * (s_x s_w)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional, Sequence

import torch

from ..core.fields import ABS_MASK, INF_BITS, MANT_BITS, exp2_f64, float32_fields, integer_log, log_fields
from ..core.geometry import cols_to_image, im2col, im2col_index, stack_depth

BIAS_CLAMP = float(2**63 - 1024)  # see Note: reference MAC arithmetic
_I64_MAX = 2**63 - 1
_I64_MIN = -(2**63)
_CHUNK_ELEMENTS = 1 << 22  # rows*N*K per elementwise chunk: ~32 MB per float64 temporary


# ----------------------------------------------------------------------------------------
# codecs
# ----------------------------------------------------------------------------------------
def lns_encode_reference(x: torch.Tensor, offset: torch.Tensor, buckets: torch.Tensor, bits: int, frac_bits: int,
                         mitchell: bool) -> torch.Tensor:
    e_max, nan_code = (1 << (bits - 1)) - 1, 1 << (bits - 1)
    sign, abs_bits, e, frac = float32_fields(x.contiguous())
    g = integer_log(e, frac, frac_bits, mitchell, buckets)
    mag = (g - offset).clamp(max=e_max)
    mag = torch.where(mag < 1, 0, mag)  # underflow flushes to zero
    mag = torch.where(abs_bits == INF_BITS, e_max, mag)  # ±inf saturates
    mag = torch.where(abs_bits == 0, 0, mag)
    code = torch.where(sign & (mag != 0), mag | nan_code, mag)  # zero drops the sign
    code = torch.where(abs_bits > INF_BITS, nan_code, code)
    if bits == 16:  # int16 holds the same bit pattern: reinterpret codes >= 2^15
        code = torch.where(code >= 1 << 15, code - (1 << 16), code)
    return code.to(torch.uint8 if bits <= 8 else torch.int16)


def lns_decode_reference(codes: torch.Tensor, offset: torch.Tensor, decode_bits: torch.Tensor, bits: int,
                         frac_bits: int) -> torch.Tensor:
    F = frac_bits
    g, negative, zero, _ = log_fields(codes, offset, bits)
    # D[r] has exponent field 127; adding q to the field scales by 2^q exactly. A valid
    # offset keeps q in [-126, 127], so the result is always a normal float32.
    value = (decode_bits[g & ((1 << F) - 1)] + ((g >> F) << MANT_BITS)).view(torch.float32)
    value = torch.where(negative, -value, value)
    return torch.where(zero, torch.where(negative, math.nan, 0.0), value)


def fp8_encode_reference(x: torch.Tensor, scale: torch.Tensor, man_bits: int, bias: int, max_code: int,
                         has_inf: bool) -> torch.Tensor:
    y = x / scale
    bits = y.view(torch.int32)
    sign = bits < 0
    abs_bits = bits & ABS_MASK
    M, B = man_bits, bias
    # Below the smallest normal the grid step is 2^(1-B-M); |y| / step is exact in float32
    # and torch.round is half-to-even. A result of 2^M lands exactly on the smallest normal
    # code, so subnormal and normal codes join without a special case.
    min_normal = 2.0 ** (1 - B)
    sub_code = torch.round(y.abs().clamp(max=min_normal) * 2.0 ** (B - 1 + M)).to(torch.int32)
    # Normal range: round the float32 fraction to M bits, half-to-even, on the bit pattern;
    # a carry out of the fraction bumps the exponent, as it should. Then rebias.
    shift = MANT_BITS - M
    finite_bits = abs_bits.clamp(max=INF_BITS)  # keeps the rounding add inside int32
    rounded = finite_bits + ((1 << (shift - 1)) - 1) + ((finite_bits >> shift) & 1)
    norm_code = (rounded >> shift) - ((127 - B) << M)
    code = torch.where(abs_bits < ((127 + 1 - B) << MANT_BITS), sub_code, norm_code)
    code = code.clamp(max=max_code)  # saturate finite overflow (and e4m3's inf)
    x_abs = x.view(torch.int32) & ABS_MASK
    if has_inf:  # only an infinite x; a finite x whose quotient overflows saturates
        code = torch.where(x_abs == INF_BITS, 0x7C, code)
    code = torch.where((abs_bits > INF_BITS) | (x_abs > INF_BITS), 0x7F, code)
    code = torch.where(sign, code | 0x80, code)
    return code.to(torch.uint8)


def fp8_decode_reference(codes: torch.Tensor, scale: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values[codes.to(torch.int64)] * scale


def int_encode_reference(x: torch.Tensor, scale: torch.Tensor, qmax: int, bits: int) -> torch.Tensor:
    q = torch.round(x / scale).clamp(-qmax, qmax)
    return q.to(torch.int8 if bits <= 8 else torch.int16)


def int_decode_reference(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float32) * scale


# ----------------------------------------------------------------------------------------
# LNS MAC
# ----------------------------------------------------------------------------------------
# The telemetry sink (see Note: accumulator telemetry in csrc/common.h): while torchlns.telemetry
# holds a dict here, the reference's fixed epilogue, its chunks and the dynamic blocks'
# re-encoding add their counts to it, as the C++ epilogue does to its slots.
TELEMETRY: Optional[dict] = None


@contextlib.contextmanager
def telemetry_sink(counts: Optional[dict]):
    """Count into ``counts`` (None: not at all) for the duration."""
    global TELEMETRY
    held, TELEMETRY = TELEMETRY, counts
    try:
        yield counts
    finally:
        TELEMETRY = held


def _tally(**counts) -> None:
    for k, v in counts.items():
        if k.startswith("max_"):
            TELEMETRY[k] = max(TELEMETRY.get(k, 0), int(v))
        else:
            TELEMETRY[k] = TELEMETRY.get(k, 0) + int(v)


def _overflowing(v: torch.Tensor, bits: int, wrap: bool) -> torch.Tensor:
    """Exact sums outside the range that saturation (±(2^(bits-1) - 1)) or wrap ([-2^(bits-1), 2^(bits-1))) keeps."""
    top = 2 ** (bits - 1) - 1
    return (v > top) | (v < (-top - 1 if wrap else -top))


# Note: overflow and chunks
# The fixed accumulator's other designs (spec section 2, "Overflow and two-stage
# accumulation"; ``MACConfig.overflow``, ``chunk``, ``chunk_bits``). A product's magnitude is
# truncated toward zero, then signed, then saturated to ±(2^(W1-1) - 1) or, with wrap,
# reduced modulo 2^W1 into [-2^(W1-1), 2^(W1-1)), W1 being chunk_bits with chunks and
# acc_bits without. With chunks, each run of ``chunk`` consecutive k (a conv's k: input
# channel slowest, then kernel row and column, as im2col orders it) is summed exactly and
# saturated or wrapped to W1 bits; the chunk sums are summed exactly; the bias joins that
# total, which is saturated or wrapped to acc_bits. Modular sums do not depend on order, and
# a magnitude's residue is taken exactly from its float64 value (fmod), so these need no
# int64 headroom beyond the chunks'. They are arguments of ``lns_mm`` only (see Note:
# two-stage MACs in functional.py).
def wrap_signed(v: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 values reduced modulo 2^bits into the two's-complement range."""
    half = 1 << (bits - 1)
    return torch.remainder(v + half, 1 << bits) - half


def _products_int(p: torch.Tensor, negative: torch.Tensor, bits: int, overflow: str) -> torch.Tensor:
    """Float64 magnitudes floor(C 2^(q-Λ)) as signed int64 products at ``bits`` bits."""
    if overflow == "wrap":
        v = torch.fmod(p, float(2**bits)).to(torch.int64)
        return wrap_signed(torch.where(negative, -v, v), bits)
    v = p.clamp(max=float(2 ** (bits - 1) - 1)).to(torch.int64)
    return torch.where(negative, -v, v)


def two_stage_sums(p: torch.Tensor, negative: torch.Tensor, overflow: str, chunk: int, chunk_bits: int,
                   acc_bits: int) -> torch.Tensor:
    """(..., K) magnitudes -> (...) exact totals before the bias (see Note: overflow and chunks)."""
    W1 = (chunk_bits or acc_bits) if chunk else acc_bits
    v = _products_int(p, negative, W1, overflow)
    if not chunk:
        return v.sum(-1)
    K = v.shape[-1]
    pad = (-K) % chunk
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    sums = v.reshape(*v.shape[:-1], -1, chunk).sum(-1)
    if TELEMETRY is not None:
        _tally(chunks=sums.numel(), chunk_overflow=_overflowing(sums, W1, overflow == "wrap").sum(),
               max_chunk=sums.abs().max() if sums.numel() else 0)
    sums = wrap_signed(sums, W1) if overflow == "wrap" else sums.clamp(-(2 ** (W1 - 1) - 1), 2 ** (W1 - 1) - 1)
    return sums.sum(-1)


def lns_mm_reference(x: torch.Tensor, x_offset: torch.Tensor, w: torch.Tensor, w_offset: torch.Tensor,
                     table: torch.Tensor, bias: Optional[torch.Tensor], x_bits: int, w_bits: int, frac_bits: int,
                     fixed: bool, acc_bits: int, acc_lsb: int, overflow: str = "saturate", chunk: int = 0,
                     chunk_bits: int = 0) -> torch.Tensor:
    """``torchlns::lns_mm``: (M, K) x (N, K) codes -> (M, N) float32 (see Note: reference MAC arithmetic).

    Offsets broadcast against their codes; ``table`` is ``C[r]`` as exact float64.
    ``overflow``, ``chunk``, ``chunk_bits``: see Note: overflow and chunks.
    """
    two_stage = fixed and (overflow == "wrap" or chunk > 0)
    F = frac_bits
    M, K = x.shape
    N = w.shape[0]
    gx, nx, zx, nanx = log_fields(x, x_offset, x_bits)
    gw, nw, zw, nanw = log_fields(w, w_offset, w_bits)
    T = 2 ** (acc_bits - 1) - 1
    shift = acc_lsb if fixed else 0
    out = torch.empty(M, N, dtype=torch.int64 if fixed else torch.float64, device=x.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, N * K))
    for r0 in range(0, M, rows):
        r1 = min(M, r0 + rows)
        G = gx[r0:r1, None, :] + gw[None, :, :]
        p = table[(G & ((1 << F) - 1)).long()] * exp2_f64((G >> F) - shift)
        if fixed:
            p = p.floor_() if two_stage else p.floor_().clamp_(max=T)
        p = p.masked_fill_(zx[r0:r1, None, :] | zw[None, :, :], 0.0)
        negative = nx[r0:r1, None, :] ^ nw[None, :, :]
        if two_stage:
            out[r0:r1] = two_stage_sums(p, negative, overflow, chunk, chunk_bits, acc_bits)
            continue
        p = torch.where(negative, -p, p)
        out[r0:r1] = p.to(torch.int64).sum(-1) if fixed else p.sum(-1)
    return mm_epilogue(out, nanx.any(1), nanw.any(1), bias, fixed, acc_bits, acc_lsb,
                       wrap_bits=acc_bits if two_stage and overflow == "wrap" else 0)


def mm_epilogue(sums: torch.Tensor, nan_rows_x: torch.Tensor, nan_rows_w: torch.Tensor, bias: Optional[torch.Tensor],
                fixed: bool, acc_bits: int, acc_lsb: int, wrap_bits: int = 0) -> torch.Tensor:
    """float32 outputs of ``lns_mm`` from its (M, N) sums: float64 (float32 accumulator) or exact int64."""
    if not fixed:
        y = sums.to(torch.float32)
        if bias is not None:
            y = y + bias
    else:
        if TELEMETRY is not None:
            _tally_totals(sums, bias, ~(nan_rows_x[:, None] | nan_rows_w[None, :]), acc_bits, acc_lsb, wrap_bits > 0)
        y = fixed_epilogue(sums, bias, 2 ** (acc_bits - 1) - 1, acc_lsb, wrap_bits)
    return y.masked_fill_(nan_rows_x[:, None] | nan_rows_w[None, :], math.nan)


def _tally_totals(sums: torch.Tensor, bias: Optional[torch.Tensor], keep: torch.Tensor, acc_bits: int, acc_lsb: int,
                  wrap: bool) -> None:
    """The telemetry of the fixed accumulator's totals (sum + bias, before the final saturation or
    wrap): how many, how many overflow, the largest magnitude (NaN outputs have no total)."""
    total = sums
    if bias is not None:
        b = bias_units(bias, acc_lsb)
        keep = keep & ~torch.isnan(b).expand_as(keep)
        b = torch.nan_to_num(b).to(torch.int64).expand_as(sums)
        beyond = ((b > 0) & (sums > _I64_MAX - b.clamp(min=0))) | ((b < 0) & (sums < _I64_MIN - b.clamp(max=0)))
        total = torch.where(beyond, torch.where(b > 0, _I64_MAX, -_I64_MAX), torch.where(beyond, 0, sums) + b)
    total = total[keep.expand_as(total)].clamp(min=-_I64_MAX)
    _tally(totals=total.numel(), total_overflow=_overflowing(total, acc_bits, wrap).sum(),
           max_total=total.abs().max() if total.numel() else 0)


def bias_units(bias: torch.Tensor, acc_lsb: int) -> torch.Tensor:
    """``rne(b / 2^Λ)`` as float64, clamped to ±(2^63 - 1024) (NaN stays NaN; see Note: reference MAC arithmetic)."""
    return torch.round(bias.to(torch.float64) * 2.0**-acc_lsb).clamp_(-BIAS_CLAMP, BIAS_CLAMP)


def fixed_epilogue(acc: torch.Tensor, bias: Optional[torch.Tensor], T: int, acc_lsb: int,
                   wrap_bits: int = 0) -> torch.Tensor:
    """Bias, final saturation (or, with ``wrap_bits``, reduction modulo 2^wrap_bits) and scaling of
    the exact int64 sums of the fixed accumulator."""
    if wrap_bits:  # modular: the bias's residue joins the total's; no int64 headroom is needed
        acc = wrap_signed(acc, wrap_bits)
        if bias is not None:
            b = bias_units(bias, acc_lsb)
            acc = wrap_signed(acc + wrap_signed(b.to(torch.int64).expand_as(acc), wrap_bits), wrap_bits)
        y = (acc.to(torch.float64) * 2.0**acc_lsb).to(torch.float32)
        return y if bias is None else y.masked_fill_(torch.isnan(bias).expand_as(y), math.nan)
    if bias is not None:
        b = bias_units(bias, acc_lsb).to(torch.int64)
        b = b.expand_as(acc)
        over = (b > 0) & (acc > _I64_MAX - b.clamp(min=0))
        under = (b < 0) & (acc < _I64_MIN - b.clamp(max=0))
        acc = torch.where(over | under, 0, acc) + torch.where(over | under, 0, b)
        acc = torch.where(over, T, torch.where(under, -T, acc))
    acc = acc.clamp(-T, T)
    y = (acc.to(torch.float64) * 2.0**acc_lsb).to(torch.float32)
    return y if bias is None else y.masked_fill_(torch.isnan(bias).expand_as(y), math.nan)


def _conv_columns(x: torch.Tensor, w: torch.Tensor, stride, pad_before, pad_after, dilation):
    """(im2col columns of the codes with the zero code as padding, the index, Ho, Wo, Kg)."""
    idx, Ho, Wo = im2col_index(x.shape[2], x.shape[3], tuple(w.shape[2:]), stride, list(zip(pad_before, pad_after)),
                               dilation, x.device)
    return im2col(x, idx, 0), idx, Ho, Wo, w.shape[1] * idx.shape[0]


# Note: dynamic blocks
# Dynamic per-block activations (spec section 3) give each run of x_block consecutive
# elements of a receptive field (per group, in the weight's (c, [depth,] i, j) order) the
# offset of its own maximum: off_b = clamp(g(M_b) - E_max, offset_min, offset_max) for the
# x_block_bits format, M_b the largest finite |x| of the block (NaN and ±inf ignored). A code
# is then E = g - off_b (E < 1 flushes to zero, E > E_max and ±inf saturate to E_max), so its
# product uses the log g_eff = min(g, off_b + E_max), or none. Since g (the integer log of
# |x|, rounded once) does not depend on the offset, and rounding is monotone, g(M_b) is the
# largest g of the block: the whole encoding follows from the integer logs of the input,
# taken once per element rather than once per receptive field. So the conv receives x
# encoded once per tensor in a wide format (16 bits, the same F) with an offset that keeps
# every finite value below E_max16 (±inf saturates to E_max16 and is told apart by it), and
# each backend re-encodes the blocks of each receptive field from those integer logs: codes
# of the same wide format holding g_eff, or zero, so that the MAC itself is the ordinary
# one. The reference does it on im2col columns; the CPU kernel while it builds them, or, for
# depthwise and other narrow groups, only where a block changes a code (see Note: dynamic
# blocks by repair in csrc/conv_cpu.cpp).
def block_codes(cols: torch.Tensor, x_offset: int, x_bits: int, frac_bits: int, groups: int, x_block: int,
                x_block_bits: int) -> torch.Tensor:
    """Wide codes of im2col columns (M, groups*Kg) re-encoded per block (see Note: dynamic blocks)."""
    M, K = cols.shape
    Kg = K // groups
    mask, e_wide = (1 << x_bits) - 1, (1 << (x_bits - 1)) - 1
    e_max = (1 << (x_block_bits - 1)) - 1
    R = 1 << frac_bits
    off_min, off_max = -126 * R - 1, 127 * R - e_max
    c = cols.to(torch.int32) & mask
    mag, neg = c & e_wide, c > e_wide
    g = mag + x_offset
    inf = mag == e_wide
    finite = (mag > 0) & ~inf
    nb = -(-Kg // x_block)
    low = torch.iinfo(torch.int32).min
    gb = torch.where(finite, g, low).reshape(M, groups, Kg)
    gb = torch.nn.functional.pad(gb, (0, nb * x_block - Kg), value=low).reshape(M, groups, nb, x_block).amax(-1)
    g_max = torch.where(gb == low, 0, gb)  # a block without a finite nonzero value: M = 0 puts 1.0 at E_max
    off = (g_max - e_max).clamp(off_min, off_max)
    off = off.repeat_interleave(x_block, dim=2)[:, :, :Kg].reshape(M, K)
    g_eff = torch.where(inf, off + e_max, torch.minimum(g, off + e_max))
    keep = (mag > 0) & (g_eff - off >= 1)
    if TELEMETRY is not None:  # each receptive field's codes, as the chip encodes them
        _tally(act_values=(mag > 0).sum(), act_saturated=(inf | (finite & (g > off + e_max))).sum(),
               act_flushed=(finite & ~keep).sum())
    out = torch.where(keep, (g_eff - x_offset) | (neg.to(torch.int32) << (x_bits - 1)), 0)
    out = torch.where((mag == 0) & neg, 1 << (x_bits - 1), out)  # NaN stays NaN
    if x_bits == 16:
        out = torch.where(out >= 1 << 15, out - (1 << 16), out)
    return out.to(cols.dtype)


def lns_conv_reference(x: torch.Tensor, x_offset: torch.Tensor, w: torch.Tensor, w_offset: torch.Tensor,
                       table: torch.Tensor, bias: Optional[torch.Tensor], x_bits: int, w_bits: int, frac_bits: int,
                       fixed: bool, acc_bits: int, acc_lsb: int, stride: Sequence[int], pad_before: Sequence[int],
                       pad_after: Sequence[int], dilation: Sequence[int], groups: int, x_block: int = 0,
                       x_block_bits: int = 0, mm=None) -> torch.Tensor:
    """``torchlns::lns_conv``: (N, C, H, W) codes * (Cout, C/groups, kh, kw) codes -> float32.

    im2col of the codes (padding is the zero code) and of the offsets, then ``lns_mm`` per
    group, so every backend's MAC kernel does the arithmetic. Offsets broadcast against their
    codes. 5-D codes (a Conv3d) stack each output depth's taps as channels first
    (``core.geometry.stack_depth``): the same products, as a 2-D convolution. ``mm``: what
    runs each group's columns in ``lns_mm``'s place (telemetry counts products that way).
    """
    if x.dim() == 5:
        return _conv3d_by_stacking(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits,
                                   acc_lsb, stride, pad_before, pad_after, dilation, groups, x_block, x_block_bits, mm)
    mm = torch.ops.torchlns.lns_mm if mm is None else mm
    N, Cout = x.shape[0], w.shape[0]
    cols, idx, Ho, Wo, Kg = _conv_columns(x, w, stride, pad_before, pad_after, dilation)
    if x_block:
        cols = block_codes(cols, int(x_offset.reshape(-1)[0]), x_bits, frac_bits, groups, x_block, x_block_bits)
    col_off = x_offset.reshape(1, 1) if x_offset.numel() == 1 else im2col(x_offset.expand(x.shape), idx, 0)
    w2 = w.reshape(Cout, Kg)
    if w_offset[0].numel() == 1:  # per tensor or per output channel
        w_off = w_offset.reshape(w_offset.shape[0], 1)
    else:
        w_off = w_offset.expand(w.shape).reshape(Cout, Kg)
    outs = []
    Cout_g = Cout // groups
    for gi in range(groups):
        ks, os_ = slice(gi * Kg, (gi + 1) * Kg), slice(gi * Cout_g, (gi + 1) * Cout_g)
        outs.append(mm(
            cols[:, ks], col_off[:, ks] if col_off.shape[1] > 1 else col_off, w2[os_],
            w_off[os_] if w_off.shape[0] > 1 else w_off, table, None if bias is None else bias[os_],
            x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb))
    # Contiguous, as the fake kernel promises (strides are part of an op's contract).
    return cols_to_image(torch.cat(outs, dim=1), N, Ho, Wo)


def _conv3d_by_stacking(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb,
                        stride, pad_before, pad_after, dilation, groups, x_block=0, x_block_bits=0, mm=None):
    N, Cout, kd = x.shape[0], w.shape[0], w.shape[2]
    depth = ((pad_before[0], pad_after[0]), stride[0], dilation[0])
    xs, Do = stack_depth(x, kd, *depth, 0)
    if x_offset.numel() == 1:
        xo = x_offset.reshape(1, 1, 1, 1)
    else:  # one offset per element, stacked like the codes (padding never reads it)
        xo, _ = stack_depth(x_offset.expand(x.shape), kd, *depth, 0)
    ws = w.reshape(Cout, -1, *w.shape[3:])
    per_channel = w_offset.dim() == 0 or w_offset.numel() == w_offset.shape[0]
    wo = w_offset.reshape(-1, 1, 1, 1) if per_channel else w_offset.expand(w.shape).reshape(ws.shape)
    conv = torch.ops.torchlns.lns_conv if mm is None else functools.partial(lns_conv_reference, mm=mm)
    y = conv(xs, xo, ws, wo, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb, list(stride[1:]),
             list(pad_before[1:]), list(pad_after[1:]), list(dilation[1:]), groups, x_block, x_block_bits)
    return y.reshape(N, Do, *y.shape[1:]).transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------
# FP8 / INT MAC
# ----------------------------------------------------------------------------------------
def _segments(K: int, *blocks: int) -> list:
    cuts = {0, K}
    for b in blocks:
        if b:
            cuts.update(range(0, K, b))
    cuts = sorted(cuts)
    return list(zip(cuts[:-1], cuts[1:]))


def scaled_mm_reference(x: torch.Tensor, x_scale: torch.Tensor, x_values: Optional[torch.Tensor], w: torch.Tensor,
                        w_scale: torch.Tensor, w_values: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        x_block: int, w_block: int) -> torch.Tensor:
    """``torchlns::scaled_mm``: (M, K) x (N, K) FP8 or INT codes -> (M, N) float32 (spec section 5).

    ``x_values``/``w_values`` are the FP8 value tables, or None for INT codes (the code is
    its value). Scales are (1 or rows, 1 or K), constant along K in runs of ``x_block`` /
    ``w_block`` (0: all of K); see Note: reference MAC arithmetic.
    """
    M, K = x.shape
    N = w.shape[0]
    integer = x_values is None
    vx, vw = ((c.to(torch.float64) if v is None else v[c.long()].to(torch.float64)) for c, v in ((x, x_values),
                                                                                                  (w, w_values)))
    y = None  # the first segment is not added to 0.0, which would turn -0.0 into +0.0
    for k0, k1 in _segments(K, x_block, w_block):
        part = (vx[:, k0:k1] @ vw[:, k0:k1].T).to(torch.float32)
        if integer:  # an integer sum has no -0, but float64's -5 * 0 does
            part = torch.where(part == 0, 0.0, part)
        scale = x_scale[:, min(k0, x_scale.shape[1] - 1), None] * w_scale[None, :, min(k0, w_scale.shape[1] - 1)]
        y = part * scale if y is None else y + part * scale
    if y is None:  # K = 0: an empty sum
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    if bias is not None:
        y = y + bias
    return y


def scaled_conv_reference(x: torch.Tensor, x_scale: torch.Tensor, x_values: Optional[torch.Tensor], w: torch.Tensor,
                          w_scale: torch.Tensor, w_values: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          stride: Sequence[int], pad_before: Sequence[int], pad_after: Sequence[int],
                          dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``torchlns::scaled_conv``: (N, C, H, W) FP8/INT codes * (Cout, C/groups, kh, kw) codes -> float32.

    im2col of the codes (padding is the zero code, whose value is 0), then ``scaled_mm`` per
    group. ``x_scale`` is one value; ``w_scale`` one value or one per output channel.
    """
    N, Cout = x.shape[0], w.shape[0]
    cols, _, Ho, Wo, Kg = _conv_columns(x, w, stride, pad_before, pad_after, dilation)
    w2 = w.reshape(Cout, Kg)
    xs = x_scale.reshape(1, 1)
    ws = w_scale.reshape(-1, 1)
    outs = []
    Cout_g = Cout // groups
    for gi in range(groups):
        ks, os_ = slice(gi * Kg, (gi + 1) * Kg), slice(gi * Cout_g, (gi + 1) * Cout_g)
        outs.append(torch.ops.torchlns.scaled_mm(cols[:, ks], xs, x_values, w2[os_], ws[os_] if ws.shape[0] > 1 else ws,
                                                 w_values, None if bias is None else bias[os_], 0, 0))
    return cols_to_image(torch.cat(outs, dim=1), N, Ho, Wo)
