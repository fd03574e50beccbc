"""Reference encode/decode for every format (chip-model.md sections 1, 3 and 5).

Pure vectorized PyTorch, exact, and the oracle for every kernel. All work happens on
float32 bit patterns viewed as int32, so no step depends on a libm or on the device.

# Note: parameter layout
An offset (LNS) or scale (FP8/INT) tensor belonging to a tensor of shape ``S`` has the same
number of dims as ``S``. Each dim is 1 (shared), ``S[d]`` (one per index, e.g. per channel),
or, on at most one ``block_axis``, ``ceil(S[d] / block_size)`` (one per block; the last block
may be shorter). ``expand_param`` turns that compact form into one that broadcasts against
``S``; ``encode``/``decode`` take the broadcastable form.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch

from . import _tables
from .formats import F32_MIN_EXP, FP8Format, Format, IntFormat, LNSFormat

__all__ = ["encode", "decode", "calibrate", "default_offset", "default_scale", "expand_param", "amax"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MANT_MASK = (1 << 23) - 1
_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_F32_MIN_NORMAL = 2.0**F32_MIN_EXP

ParamLike = Union[int, float, torch.Tensor]


# ----------------------------------------------------------------------------------------
# argument checking
#
# Checks that read tensor values (offset ranges, code ranges, NaN in INT input) run in eager
# mode only: under torch.compile they would break the graph. Compiled code therefore has to
# be validated by running it eagerly once, which every model conversion does.
# ----------------------------------------------------------------------------------------
def _check_values() -> bool:
    return not torch.compiler.is_compiling()


def _check_format(fmt) -> None:
    if not isinstance(fmt, (LNSFormat, FP8Format, IntFormat)):
        raise TypeError(f"fmt must be an LNSFormat, FP8Format or IntFormat, got {type(fmt).__name__}")


def _as_float32(x, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if hasattr(x, "codes") and type(x) is not torch.Tensor:
        raise TypeError(f"{what} is already encoded ({type(x).__name__}); call .dequantize() first")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{what} has dtype {x.dtype}; torchlns encodes float16, bfloat16, float32 or float64 "
            "(converted to float32 first)"
        )
    return x.to(torch.float32)


def _check_broadcast(param: torch.Tensor, shape: torch.Size, what: str) -> None:
    try:
        out = torch.broadcast_shapes(param.shape, shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise ValueError(f"{what} of shape {tuple(param.shape)} does not broadcast against the data shape {tuple(shape)}")


def _as_offset(offset: ParamLike, fmt: LNSFormat, shape: torch.Size, device) -> torch.Tensor:
    if isinstance(offset, torch.Tensor):
        if offset.dtype.is_floating_point or offset.dtype.is_complex or offset.dtype == torch.bool:
            raise TypeError(f"an LNS offset must be an integer tensor, got dtype {offset.dtype}")
        _check_broadcast(offset, shape, "offset")
        if not _check_values():
            return offset.to(device=device, dtype=torch.int32)
        lo, hi = (int(offset.min()), int(offset.max())) if offset.numel() else (0, 0)
        off = offset.to(device=device, dtype=torch.int32) if lo >= -(2**31) and hi < 2**31 else None
    elif isinstance(offset, int) and not isinstance(offset, bool):
        lo = hi = offset
        off = None
    else:
        raise TypeError(f"an LNS offset must be an int or an integer tensor, got {type(offset).__name__}")
    if lo < fmt.offset_min or hi > fmt.offset_max:
        bad = lo if lo < fmt.offset_min else hi
        raise ValueError(
            f"offset {bad} is out of range for {fmt}: valid offsets are {fmt.offset_min}..{fmt.offset_max}, "
            f"which keep every value a normal float32 ((1 + offset)/2^F >= -126 and (E_max + offset)/2^F <= 127)"
        )
    if off is None:  # an int (range-checked above, so it fits int32)
        off = torch.tensor(offset, dtype=torch.int32, device=device)
    return off


def _as_scale(scale: ParamLike, shape: torch.Size, device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if not scale.dtype.is_floating_point:
            raise TypeError(f"a scale must be a floating-point tensor, got dtype {scale.dtype}")
        _check_broadcast(scale, shape, "scale")
        s = scale.to(device=device, dtype=torch.float32)
    elif isinstance(scale, (int, float)) and not isinstance(scale, bool):
        s = torch.tensor(float(scale), dtype=torch.float32, device=device)
    else:
        raise TypeError(f"a scale must be a float or a float tensor, got {type(scale).__name__}")
    if _check_values() and s.numel() and not bool(((s >= _F32_MIN_NORMAL) & torch.isfinite(s)).all()):
        bad = s[~((s >= _F32_MIN_NORMAL) & torch.isfinite(s))].flatten()[0].item()
        raise ValueError(f"scale {bad!r} is invalid: a scale must be a positive, finite, normal float32")
    return s


def _check_codes(codes, fmt: Format) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype != fmt.code_dtype:
        raise TypeError(f"codes of {fmt} must have dtype {fmt.code_dtype}, got {codes.dtype}")
    if codes.numel() == 0 or not _check_values():
        return codes
    if isinstance(fmt, LNSFormat) and fmt.bits not in (8, 16):
        c = codes.to(torch.int32)
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= 1 << fmt.bits:
            raise ValueError(f"code {lo if lo < 0 else hi} is out of range for {fmt}: codes are 0..{(1 << fmt.bits) - 1}")
    elif isinstance(fmt, IntFormat):
        c = codes.to(torch.int32)
        lo, hi = int(c.min()), int(c.max())
        if lo < -fmt.qmax or hi > fmt.qmax:
            raise ValueError(f"code {lo if lo < -fmt.qmax else hi} is out of range for {fmt}: codes are ±{fmt.qmax}")
    return codes


# ----------------------------------------------------------------------------------------
# float32 fields
# ----------------------------------------------------------------------------------------
def _float32_fields(x: torch.Tensor):
    """Split float32 ``x`` into (sign, |x| bits, e, frac) with ``|x| = (1 + frac/2^23) * 2^e``.

    Subnormals are normalised (scaling by 2^24 is exact), so ``e`` can go down to -149.
    ``e``/``frac`` are meaningless for zero, inf and NaN; callers mask those.
    """
    bits = x.view(torch.int32)
    sign = bits < 0
    abs_bits = bits & _ABS_MASK
    subnormal = (abs_bits < (1 << 23)) & (abs_bits != 0)
    normalised = torch.where(subnormal, x.abs() * 2.0**24, x.abs()).view(torch.int32)
    e = (normalised >> 23) - 127 - torch.where(subnormal, 24, 0).to(torch.int32)
    frac = normalised & _MANT_MASK
    return sign, abs_bits, e, frac


def _integer_log(e: torch.Tensor, frac: torch.Tensor, frac_bits: int, mitchell: bool, thresholds: torch.Tensor) -> torch.Tensor:
    """``g``: the integer log of ``(1 + frac/2^23) * 2^e`` in units of 2^-F (spec section 1)."""
    F = frac_bits
    if not mitchell:
        step = torch.searchsorted(thresholds, frac, right=True).to(torch.int32)
    else:  # mitchell: rne(f * 2^F), with f = frac / 2^23; may carry into the next octave
        shift = 23 - F
        kept = frac >> shift
        rem = frac & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        step = kept + ((rem > half) | ((rem == half) & ((kept & 1) == 1))).to(torch.int32)
    return (e << F) + step


# ----------------------------------------------------------------------------------------
# LNS
# ----------------------------------------------------------------------------------------
# Reference kernels of the torchlns:: ops (torchlns/ops.py). They take the format as plain
# fields and the tables as tensors, exactly as the C++ and Triton kernels do.
def lns_encode_reference(x: torch.Tensor, offset: torch.Tensor, thresholds: torch.Tensor, bits: int,
                         frac_bits: int, mitchell: bool) -> torch.Tensor:
    e_max, nan_code = (1 << (bits - 1)) - 1, 1 << (bits - 1)
    sign, abs_bits, e, frac = _float32_fields(x.contiguous())
    g = _integer_log(e, frac, frac_bits, mitchell, thresholds)
    mag = (g - offset).clamp(max=e_max)
    mag = torch.where(mag < 1, 0, mag)  # underflow flushes to zero
    mag = torch.where(abs_bits == _INF_BITS, e_max, mag)  # ±inf saturates
    mag = torch.where(abs_bits == 0, 0, mag)
    code = torch.where(sign & (mag != 0), mag | nan_code, mag)  # zero drops the sign
    code = torch.where(abs_bits > _INF_BITS, nan_code, code)
    if bits == 16:  # int16 holds the same bit pattern: reinterpret codes >= 2^15
        code = torch.where(code >= 1 << 15, code - (1 << 16), code)
    return code.to(torch.uint8 if bits <= 8 else torch.int16)


def lns_decode_reference(codes: torch.Tensor, offset: torch.Tensor, decode_bits: torch.Tensor, bits: int,
                         frac_bits: int) -> torch.Tensor:
    F, e_max = frac_bits, (1 << (bits - 1)) - 1
    c = codes.to(torch.int32) & ((1 << bits) - 1)
    negative = c > e_max
    mag = c & e_max
    g = mag + offset
    # D[r] has exponent field 127; adding q to the field scales by 2^q exactly. A valid
    # offset keeps q in [-126, 127], so the result is always a normal float32.
    value = (decode_bits[g & ((1 << F) - 1)] + ((g >> F) << 23)).view(torch.float32)
    value = torch.where(negative, -value, value)
    return torch.where(mag == 0, torch.where(negative, math.nan, 0.0), value)


def _lns_tables(fmt: LNSFormat, device):
    return _tables.thresholds_tensor(fmt.frac_bits, device), _tables.decode_bits_tensor(fmt.frac_bits, device)


# ----------------------------------------------------------------------------------------
# FP8
# ----------------------------------------------------------------------------------------
def fp8_encode_reference(x: torch.Tensor, scale: torch.Tensor, exp_bits: int, man_bits: int, bias: int,
                         max_code: int, has_inf: bool) -> torch.Tensor:
    y = x / scale
    bits = y.view(torch.int32)
    sign = bits < 0
    abs_bits = bits & _ABS_MASK
    M, B = man_bits, bias
    # Below the smallest normal the grid step is 2^(1-B-M); |y| / step is exact in float32
    # and torch.round is half-to-even. A result of 2^M lands exactly on the smallest normal
    # code, so subnormal and normal codes join without a special case.
    min_normal = 2.0 ** (1 - B)
    sub_code = torch.round(y.abs().clamp(max=min_normal) * 2.0 ** (B - 1 + M)).to(torch.int32)
    # Normal range: round the float32 fraction to M bits, half-to-even, on the bit pattern;
    # a carry out of the fraction bumps the exponent, as it should. Then rebias.
    shift = 23 - M
    finite_bits = abs_bits.clamp(max=_INF_BITS)  # keeps the rounding add inside int32
    rounded = finite_bits + ((1 << (shift - 1)) - 1) + ((finite_bits >> shift) & 1)
    norm_code = (rounded >> shift) - ((127 - B) << M)
    code = torch.where(abs_bits < ((127 + 1 - B) << 23), sub_code, norm_code)
    code = code.clamp(max=max_code)  # saturate finite overflow (and e4m3's inf)
    if has_inf:  # only an infinite x; a finite x whose quotient overflows saturates
        code = torch.where((x.view(torch.int32) & _ABS_MASK) == _INF_BITS, 0x7C, code)
    code = torch.where((abs_bits > _INF_BITS) | ((x.view(torch.int32) & _ABS_MASK) > _INF_BITS), 0x7F, code)
    code = torch.where(sign, code | 0x80, code)
    return code.to(torch.uint8)


def _fp8_fields(fmt: FP8Format) -> tuple:
    """(exp_bits, man_bits, bias, largest finite code, has_inf) of the fp8_encode op."""
    return fmt.exp_bits, fmt.man_bits, fmt.bias, 0x7E if fmt.variant == "e4m3" else 0x7B, fmt.has_inf


def fp8_value_table(fmt: FP8Format, device=None) -> torch.Tensor:
    """float32 value of each of the 256 FP8 codes (NaN and ±inf where the format has them)."""
    return _fp8_table(fmt, torch.device(device) if device is not None else torch.device("cpu"))


def _fp8_table_values(fmt: FP8Format) -> list:
    M, B = fmt.man_bits, fmt.bias
    out = []
    for code in range(256):
        s, e, m = code >> 7, (code >> M) & ((1 << fmt.exp_bits) - 1), code & ((1 << M) - 1)
        if fmt.variant == "e4m3" and (code & 0x7F) == 0x7F or fmt.variant == "e5m2" and e == 31 and m:
            v = math.nan
        elif fmt.variant == "e5m2" and e == 31:
            v = math.inf
        elif e == 0:
            v = math.ldexp(m, 1 - B - M)
        else:
            v = math.ldexp((1 << M) + m, e - B - M)
        out.append(-v if s else v)
    return out



@torch.compiler.assume_constant_result
def _fp8_values(fmt: FP8Format) -> tuple:  # a constant: see Note in _tables.py
    return tuple(_fp8_table_values(fmt))


@functools.lru_cache(maxsize=None)
def _fp8_table_cached(fmt: FP8Format, device: torch.device) -> torch.Tensor:
    return torch.tensor(_fp8_values(fmt), dtype=torch.float32, device=device)


def _fp8_table(fmt: FP8Format, device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.tensor(_fp8_values(fmt), dtype=torch.float32, device=device)
    return _fp8_table_cached(fmt, torch.device(device))


def fp8_decode_reference(codes: torch.Tensor, scale: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values[codes.to(torch.int64)] * scale


# ----------------------------------------------------------------------------------------
# INT
# ----------------------------------------------------------------------------------------
def int_encode_reference(x: torch.Tensor, scale: torch.Tensor, qmax: int, bits: int) -> torch.Tensor:
    q = torch.round(x / scale).clamp(-qmax, qmax)
    return q.to(torch.int8 if bits <= 8 else torch.int16)


def int_decode_reference(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.float32) * scale


# ----------------------------------------------------------------------------------------
# public encode / decode
# ----------------------------------------------------------------------------------------
def encode(x: torch.Tensor, fmt: Format, offset_or_scale: ParamLike) -> torch.Tensor:
    """Encode ``x`` to codes of ``fmt`` (exact, spec sections 1 and 5).

    ``offset_or_scale`` is an int offset (LNS) or a float scale (FP8/INT), or a tensor of
    them that broadcasts against ``x``. Inputs of any float dtype are rounded to float32 first.
    """
    _check_format(fmt)
    x = _as_float32(x)
    ops = torch.ops.torchlns
    if isinstance(fmt, LNSFormat):
        offset = _as_offset(offset_or_scale, fmt, x.shape, x.device)
        thresholds, _ = _lns_tables(fmt, x.device)
        return ops.lns_encode(x, offset, thresholds, fmt.bits, fmt.frac_bits, fmt.rounding == "mitchell")
    scale = _as_scale(offset_or_scale, x.shape, x.device)
    if isinstance(fmt, FP8Format):
        return ops.fp8_encode(x, scale, *_fp8_fields(fmt))
    if _check_values() and x.numel() and bool(torch.isnan(x).any()):
        raise ValueError(f"{fmt} has no code for NaN, and the input contains NaN")
    return ops.int_encode(x, scale, fmt.qmax, fmt.bits)


def decode(codes: torch.Tensor, fmt: Format, offset_or_scale: ParamLike) -> torch.Tensor:
    """Decode codes of ``fmt`` to float32 (exact, spec sections 1 and 5)."""
    _check_format(fmt)
    codes = _check_codes(codes, fmt)
    ops = torch.ops.torchlns
    if isinstance(fmt, LNSFormat):
        offset = _as_offset(offset_or_scale, fmt, codes.shape, codes.device)
        _, decode_bits = _lns_tables(fmt, codes.device)
        return ops.lns_decode(codes, offset, decode_bits, fmt.bits, fmt.frac_bits)
    scale = _as_scale(offset_or_scale, codes.shape, codes.device)
    if isinstance(fmt, FP8Format):
        return ops.fp8_decode(codes, scale, _fp8_table(fmt, codes.device))
    return ops.int_decode(codes, scale)


# ----------------------------------------------------------------------------------------
# granularity and calibration (see Note: parameter layout)
# ----------------------------------------------------------------------------------------
def expand_param(param: torch.Tensor, block_axis: Optional[int], block_size: Optional[int], length: int) -> torch.Tensor:
    """Compact per-block parameters -> broadcastable ones (repeat each block, cut to length)."""
    if block_axis is None:
        return param
    return param.repeat_interleave(block_size, dim=block_axis).narrow(block_axis, 0, length)


def amax(x: torch.Tensor, granularity: str = "tensor", axis: Optional[int] = None, block_size: Optional[int] = None) -> torch.Tensor:
    """max|x| in the compact layout of the granularity, ignoring NaN and ±inf.

    ±inf is ignored as well as NaN: it saturates whatever the offset, and counting it would
    push every finite value of the group into underflow.
    """
    x = _as_float32(x)
    a = x.abs()
    a = torch.where(torch.isfinite(a), a, 0.0)
    nd = x.dim()
    if granularity == "tensor":
        return (a.amax() if a.numel() else a.new_zeros(())).reshape([1] * nd)
    if nd == 0:
        raise ValueError(f"granularity={granularity!r} needs a tensor with at least one dim")
    if granularity == "channel":
        ax = _norm_axis(0 if axis is None else axis, nd)
        others = [d for d in range(nd) if d != ax]
        return a.amax(dim=others, keepdim=True) if others else a.clone()
    if granularity == "block":
        ax = _norm_axis(-1 if axis is None else axis, nd)
        bs = _check_block_size(block_size)
        n = a.shape[ax]
        nb = -(-n // bs)
        a = a.movedim(ax, -1)
        a = torch.nn.functional.pad(a, (0, nb * bs - n))
        return a.reshape(*a.shape[:-1], nb, bs).amax(-1).movedim(-1, ax)
    raise ValueError(f"unknown granularity {granularity!r}; expected 'tensor', 'channel' or 'block'")


def _norm_axis(axis: int, nd: int) -> int:
    if not -nd <= axis < nd:
        raise ValueError(f"axis {axis} is out of range for a tensor with {nd} dims")
    return axis % nd


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"granularity='block' needs a positive int block_size, got {block_size!r}")
    return block_size


def offset_for_amax(m: torch.Tensor, fmt: LNSFormat) -> torch.Tensor:
    """``g(M) - E_max`` so that ``M`` encodes to ``E_max``, clamped to the valid range.

    ``M = 0`` (an all-zero or all-NaN group) takes the offset that puts 1.0 at ``E_max``.
    """
    m = torch.where(m > 0, m, 1.0).to(torch.float32).contiguous()
    _, _, e, frac = _float32_fields(m)
    g = _integer_log(e, frac, fmt.frac_bits, fmt.rounding == "mitchell", _lns_tables(fmt, m.device)[0])
    return (g - fmt.e_max).clamp(fmt.offset_min, fmt.offset_max)


def scale_for_amax(m: torch.Tensor, fmt: Union[FP8Format, IntFormat]) -> torch.Tensor:
    """``M / max`` in float32 (1.0 for ``M = 0``), kept a normal float32."""
    s = m.to(torch.float32) / fmt.max
    return torch.where(m > 0, s, 1.0).clamp(min=_F32_MIN_NORMAL)


def calibrate(x: torch.Tensor, fmt: Format, granularity: str = "tensor", axis: Optional[int] = None,
              block_size: Optional[int] = None) -> torch.Tensor:
    """Default offset (LNS, int32) or scale (FP8/INT, float32) from max|x|, ignoring NaN.

    Returned in the compact layout (see Note: parameter layout): same dims as ``x``.
    """
    _check_format(fmt)
    m = amax(x, granularity, axis, block_size)
    if isinstance(fmt, LNSFormat):
        return offset_for_amax(m, fmt)
    return scale_for_amax(m, fmt)


def default_offset(x: torch.Tensor, fmt: LNSFormat) -> int:
    """Per-tensor default offset as a Python int (``g(max|x|) - E_max``)."""
    if not isinstance(fmt, LNSFormat):
        raise TypeError(f"default_offset needs an LNSFormat, got {fmt!r}; use default_scale for FP8/INT")
    return int(calibrate(x, fmt).reshape(()))


def default_scale(x: torch.Tensor, fmt: Union[FP8Format, IntFormat]) -> float:
    """Per-tensor default scale as a Python float (``max|x| / max code value``)."""
    if not isinstance(fmt, (FP8Format, IntFormat)):
        raise TypeError(f"default_scale needs an FP8Format or IntFormat, got {fmt!r}; use default_offset for LNS")
    return float(calibrate(x, fmt).reshape(()))
