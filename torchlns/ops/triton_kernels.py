"""Triton kernels of the torchlns ops, registered for CUDA.

Design notes. Every kernel is the bit manipulation of the reference (reference.py),
written over flat blocks of ``BLOCK`` elements, so results are bit-identical wherever the
spec says exact. Parameters (offsets, scales) arrive either as one value (``PARAM_SCALAR``)
or expanded to the data's shape; tables arrive as small tensors, as in every backend (see
Note: op registration in library.py). CI runs these kernels on the CPU under
``TRITON_INTERPRET=1`` (set by tests/conftest.py before this module is imported); on a GPU
they run compiled.

The MAC kernels (``lns_mm``, ``lns_conv``) live in triton_mac.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_mac

BLOCK = 1024


def _elementwise(kernel, data: torch.Tensor, param: torch.Tensor, out_dtype: torch.dtype, *tables, **meta):
    """Launch an elementwise kernel ``(data, param, *tables, out, n, ..., PARAM_SCALAR, BLOCK)``.

    The parameter broadcasts against ``data``: passed as one value when it is one, else
    expanded to one per element.
    """
    out = torch.empty(data.shape, dtype=out_dtype, device=data.device)
    n = data.numel()
    if n:
        scalar = param.numel() == 1
        flat = param.reshape(1) if scalar else param.expand(data.shape).contiguous().reshape(-1)
        kernel[(triton.cdiv(n, BLOCK),)](data.contiguous().reshape(-1), flat.contiguous(), *tables, out.reshape(-1), n,
                                         PARAM_SCALAR=scalar, BLOCK=BLOCK, **meta)
    return out


@triton.jit
def _load_param(param_ptr, offs, mask, PARAM_SCALAR: tl.constexpr):
    if PARAM_SCALAR:
        return tl.load(param_ptr + offs * 0, mask=mask, other=0)
    return tl.load(param_ptr + offs, mask=mask, other=0)


# ----------------------------------------------------------------------------------------
# LNS encode / decode
# ----------------------------------------------------------------------------------------
@triton.jit
def _lns_encode_kernel(x_ptr, off_ptr, base_ptr, inside_ptr, out_ptr, n, F: tl.constexpr, E_MAX: tl.constexpr,
                       WIDE: tl.constexpr, MITCHELL: tl.constexpr, PARAM_SCALAR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    off = _load_param(off_ptr, offs, mask, PARAM_SCALAR)
    u = x.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    sub = a < (1 << 23)  # subnormal (or zero): normalise, |x| * 2^24 is exact
    scaled = (a.to(tl.float32, bitcast=True) * 16777216.0).to(tl.int32, bitcast=True)
    nrm = tl.where(sub, scaled, a)
    e = (nrm >> 23) - 127 - tl.where(sub, 24, 0)
    frac = nrm & 0x7FFFFF
    if MITCHELL:
        kept = frac >> (23 - F)
        rem = frac & ((1 << (23 - F)) - 1)
        half = 1 << (22 - F)
        step = kept + ((rem > half) | ((rem == half) & ((kept & 1) == 1))).to(tl.int32)
    else:  # bucket lookup (see encode_buckets in core/tables.py)
        b = frac >> (22 - F)
        step = tl.load(base_ptr + b, mask=mask, other=0) + (frac >= tl.load(inside_ptr + b, mask=mask, other=0)).to(tl.int32)
    mag = e * (1 << F) + step - off
    mag = tl.maximum(tl.minimum(mag, E_MAX), 0)
    mag = tl.where(a == 0x7F800000, E_MAX, mag)
    mag = tl.where(a == 0, 0, mag)
    nan_code = E_MAX + 1
    code = tl.where((mag != 0) & (u < 0), mag | nan_code, mag)
    code = tl.where(a > 0x7F800000, nan_code, code)
    if WIDE:
        code = tl.where(code >= 1 << 15, code - (1 << 16), code)
        tl.store(out_ptr + offs, code.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + offs, code.to(tl.uint8), mask=mask)


def lns_encode(x, offset, buckets, bits, frac_bits, mitchell):
    base, inside = buckets[0].contiguous(), buckets[1].contiguous()
    return _elementwise(_lns_encode_kernel, x, offset.to(torch.int32), torch.uint8 if bits <= 8 else torch.int16,
                        base, inside, F=frac_bits, E_MAX=(1 << (bits - 1)) - 1, WIDE=bits > 8, MITCHELL=mitchell)


@triton.jit
def _lns_decode_kernel(c_ptr, off_ptr, dbits_ptr, out_ptr, n, F: tl.constexpr, BITS: tl.constexpr,
                       PARAM_SCALAR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.int32) & ((1 << BITS) - 1)
    off = _load_param(off_ptr, offs, mask, PARAM_SCALAR)
    e_max = (1 << (BITS - 1)) - 1
    mag = c & e_max
    negative = c > e_max
    g = mag + off
    v = tl.load(dbits_ptr + (g & ((1 << F) - 1)), mask=mask, other=0) + ((g >> F) << 23)
    v = tl.where(negative, v | (-2147483647 - 1), v)
    v = tl.where(mag == 0, tl.where(negative, 0x7FC00000, 0), v)
    tl.store(out_ptr + offs, v.to(tl.float32, bitcast=True), mask=mask)


def lns_decode(codes, offset, decode_bits, bits, frac_bits):
    return _elementwise(_lns_decode_kernel, codes, offset.to(torch.int32), torch.float32, decode_bits, F=frac_bits,
                        BITS=bits)


# ----------------------------------------------------------------------------------------
# FP8 and INT
# ----------------------------------------------------------------------------------------
@triton.jit
def _rne(v):
    """Round a non-negative float32 below 2^23 to the nearest integer, ties to even."""
    # Adding and subtracting 2^23 rounds to an integer in the current (nearest-even) mode.
    return ((v + 8388608.0) - 8388608.0).to(tl.int32)


@triton.jit
def _fp8_encode_kernel(x_ptr, s_ptr, out_ptr, n, MAN: tl.constexpr, BIAS: tl.constexpr, MAX_CODE: tl.constexpr,
                       HAS_INF: tl.constexpr, PARAM_SCALAR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    s = _load_param(s_ptr, offs, mask, PARAM_SCALAR)
    xa = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    y = tl.fdiv(x, s, ieee_rounding=True)  # float32 division, correctly rounded, as the spec says
    u = y.to(tl.int32, bitcast=True)
    a = u & 0x7FFFFFFF
    min_normal_bits = (127 + 1 - BIAS) << 23
    ay = tl.minimum(a, min_normal_bits).to(tl.float32, bitcast=True)
    sub = _rne(ay * (2.0 ** (BIAS - 1 + MAN)))  # subnormal grid: the scaling is exact
    shift: tl.constexpr = 23 - MAN
    f = tl.minimum(a, 0x7F800000)
    rounded = f + ((1 << (shift - 1)) - 1) + ((f >> shift) & 1)
    code = tl.where(a < min_normal_bits, sub, (rounded >> shift) - ((127 - BIAS) << MAN))
    code = tl.minimum(code, MAX_CODE)
    if HAS_INF:
        code = tl.where(xa == 0x7F800000, 0x7C, code)
    code = tl.where(xa > 0x7F800000, 0x7F, code)
    code = tl.where(u < 0, code | 0x80, code)
    tl.store(out_ptr + offs, code.to(tl.uint8), mask=mask)


def fp8_encode(x, scale, man_bits, bias, max_code, has_inf):
    return _elementwise(_fp8_encode_kernel, x, scale.to(torch.float32), torch.uint8, MAN=man_bits, BIAS=bias,
                        MAX_CODE=max_code, HAS_INF=has_inf)


@triton.jit
def _table_decode_kernel(c_ptr, s_ptr, table_ptr, out_ptr, n, PARAM_SCALAR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.int32)
    s = _load_param(s_ptr, offs, mask, PARAM_SCALAR)
    tl.store(out_ptr + offs, tl.load(table_ptr + c, mask=mask, other=0.0) * s, mask=mask)


def fp8_decode(codes, scale, values):
    return _elementwise(_table_decode_kernel, codes, scale.to(torch.float32), torch.float32, values)


@triton.jit
def _int_encode_kernel(x_ptr, s_ptr, out_ptr, n, QMAX: tl.constexpr, WIDE: tl.constexpr, PARAM_SCALAR: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    s = _load_param(s_ptr, offs, mask, PARAM_SCALAR)
    y = tl.fdiv(x, s, ieee_rounding=True)
    q = tl.minimum(tl.maximum(y, -QMAX * 1.0), QMAX * 1.0)  # clamp first: |q| < 2^23 for _rne
    ay = tl.abs(q)
    r = _rne(ay)
    q = tl.where(q < 0, -r, r)
    if WIDE:
        tl.store(out_ptr + offs, q.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + offs, q.to(tl.int8), mask=mask)


def int_encode(x, scale, qmax, bits):
    return _elementwise(_int_encode_kernel, x, scale.to(torch.float32), torch.int8 if bits <= 8 else torch.int16,
                        QMAX=qmax, WIDE=bits > 8)


@triton.jit
def _int_decode_kernel(c_ptr, s_ptr, out_ptr, n, PARAM_SCALAR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.float32)
    s = _load_param(s_ptr, offs, mask, PARAM_SCALAR)
    tl.store(out_ptr + offs, c * s, mask=mask)


def int_decode(codes, scale):
    return _elementwise(_int_decode_kernel, codes, scale.to(torch.float32), torch.float32)


KERNELS = {
    "lns_encode": lns_encode,
    "lns_decode": lns_decode,
    "fp8_encode": fp8_encode,
    "fp8_decode": fp8_decode,
    "int_encode": int_encode,
    "int_decode": int_decode,
    **triton_mac.KERNELS,  # lns_mm, lns_conv
}
