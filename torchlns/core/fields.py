"""Bit fields of floats and codes, in vectorized PyTorch (chip-model.md section 1).

The Python statement of how a float32 splits into sign, exponent and fraction, how an LNS
code splits into sign and magnitude, and how the two meet in the integer log ``g``. The
reference kernels, calibration and the clustered layer all use these, so each rule exists
once in Python (the C++ kernels share ``csrc/common.h``, the Triton kernels one jit helper).
Everything works on bit patterns viewed as integers, so no step depends on a libm or on the
device.
"""

from __future__ import annotations

import torch

MANT_BITS = 23  # float32 fraction bits
MANT_MASK = (1 << MANT_BITS) - 1
ABS_MASK = 0x7FFFFFFF
INF_BITS = 0x7F800000


def float32_fields(x: torch.Tensor):
    """Split float32 ``x`` into (sign, |x| bits, e, frac) with ``|x| = (1 + frac/2^23) * 2^e``.

    Subnormals are normalised (scaling by 2^24 is exact), so ``e`` can go down to -149.
    ``e``/``frac`` are meaningless for zero, inf and NaN; callers mask those.
    """
    bits = x.view(torch.int32)
    sign = bits < 0
    abs_bits = bits & ABS_MASK
    subnormal = (abs_bits < (1 << MANT_BITS)) & (abs_bits != 0)
    normalised = torch.where(subnormal, x.abs() * 2.0**24, x.abs()).view(torch.int32)
    e = (normalised >> MANT_BITS) - 127 - torch.where(subnormal, 24, 0).to(torch.int32)
    frac = normalised & MANT_MASK
    return sign, abs_bits, e, frac


def integer_log(e: torch.Tensor, frac: torch.Tensor, frac_bits: int, mitchell: bool,
                buckets: torch.Tensor) -> torch.Tensor:
    """``g``: the integer log of ``(1 + frac/2^23) * 2^e`` in units of 2^-F (spec section 1).

    ``buckets`` is ``tables.buckets_tensor(F)``: nearest rounding counts the thresholds
    ``c_i`` at or below the fraction as the thresholds below its bucket plus the one inside.
    """
    F = frac_bits
    if not mitchell:
        b = (frac >> (MANT_BITS - 1 - F)).long()
        step = buckets[0][b] + (frac >= buckets[1][b]).to(torch.int32)
    else:  # rne(f * 2^F), with f = frac / 2^23; may carry into the next octave
        shift = MANT_BITS - F
        kept = frac >> shift
        rem = frac & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        step = kept + ((rem > half) | ((rem == half) & ((kept & 1) == 1))).to(torch.int32)
    return (e << F) + step


def code_fields(codes: torch.Tensor, bits: int):
    """(magnitude field ``E``, sign) of LNS codes as int32 and bool (int16 codes: same bit pattern)."""
    e_max = (1 << (bits - 1)) - 1
    c = codes.to(torch.int32) & ((1 << bits) - 1)
    return c & e_max, c > e_max


def log_fields(codes: torch.Tensor, offset: torch.Tensor, bits: int):
    """(log value ``g = E + offset``, negative, zero, NaN) per code; ``g`` is 0 for zero and NaN codes."""
    mag, negative = code_fields(codes, bits)
    zero = mag == 0
    g = torch.where(zero, 0, mag + offset.to(torch.int32))
    return g, negative, zero, zero & negative


def exp2_f64(e: torch.Tensor) -> torch.Tensor:
    """2^e as float64 for integer e in [-1022, 1023], built from the bit pattern (exact)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
