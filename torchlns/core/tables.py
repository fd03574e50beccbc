"""Exact lookup tables of the chip model, built once per parameter set and cached.

Every table any kernel uses is built here, in Python, and reaches the kernels as a tensor
argument of the op (see Note: op registration in ops/library.py): the C++ and Triton
kernels compute no table of their own.

# Note: exact tables
Every table entry is a correctly rounded function of an irrational number 2^(t/2^F)
(t not a multiple of 2^F), so there are no rounding ties and each entry has exactly one
right answer. The spec says float64 ``pow`` + one rounding is right for F <= 10; torchlns
allows F up to 14, so tables are computed with ``decimal`` at 60 significant digits, then
rounded on the 2^-23 (or 2^-P) grid of [1, 2). With 60 digits the error is ~1e-60, far
smaller than the distance of any 2^((2i+1)/2^(F+1)) from a 24-bit grid point, and
``tests/core/test_tables.py`` checks the float64 shortcut agrees for F <= 10.

Tables are returned as exact integers ``N`` with an implied scale ``2^-S`` (``value = N/2^S``)
so that callers can use them in integer arithmetic (the fixed accumulator) or as float64
(every entry has <= 25 significant bits, so float64 holds it exactly).
"""

from __future__ import annotations

import functools
import sys
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Context, Decimal

import torch

_CTX = Context(prec=60)
_LN2 = _CTX.ln(Decimal(2))
MANT_BITS = 23  # float32 fraction bits


def _pow2(numerator: int, denominator: int) -> Decimal:
    """2^(numerator/denominator) to 60 digits."""
    return _CTX.exp(_CTX.multiply(_LN2, _CTX.divide(Decimal(numerator), Decimal(denominator))))


def _round_on_grid(value: Decimal, frac_bits: int, rounding: str) -> int:
    """``value * 2^frac_bits`` rounded to an integer (half-even or ceiling)."""
    scaled = _CTX.multiply(value, Decimal(1 << frac_bits))
    return int(scaled.to_integral_value(rounding=rounding))


@functools.lru_cache(maxsize=None)
def _encode_thresholds(frac_bits: int) -> tuple[int, ...]:
    """float32 fraction fields (23-bit ints) of ``c_i = 2^((i+0.5)/2^F)`` rounded up, i < 2^F.

    For a float32 mantissa ``m = 1 + frac/2^23``, ``m >= c_i`` iff ``frac >= threshold[i]``.
    Always < 2^23 for F <= 14 (c_i < 2 - 2^-23), so every threshold is a valid fraction.
    """
    n = 1 << frac_bits
    out = []
    for i in range(n):
        c = _pow2(2 * i + 1, 2 * n)
        out.append(_round_on_grid(c, MANT_BITS, ROUND_CEILING) - (1 << MANT_BITS))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _encode_buckets(frac_bits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The encode thresholds regrouped by the fraction's top F+1 bits: ``(base, inside)``.

    The fraction ``frac`` of a float32 falls in bucket ``b = frac >> (22 - F)``. ``base[b]``
    counts the thresholds below the bucket and ``inside[b]`` is the one threshold inside it
    (2^23, never reached, if none), so ``#{i : frac >= c_i} = base[b] + (frac >= inside[b])``:
    two lookups instead of 2^F compares. Consecutive thresholds are more than 2^-(F+1) apart
    (``c_{i+1}/c_i = 2^(2^-F)``), so a bucket never holds two; that is checked here.
    """
    thresholds = _encode_thresholds(frac_bits)
    width = 1 << (MANT_BITS - 1 - frac_bits)
    base, inside, i = [], [], 0
    for b in range(2 << frac_bits):
        lo, hi = b * width, (b + 1) * width
        while i < len(thresholds) and thresholds[i] < lo:
            i += 1
        base.append(i)
        here = [t for t in thresholds[i:i + 2] if t < hi]
        if len(here) > 1:
            raise AssertionError(f"two encode thresholds in bucket {b} for F={frac_bits}")
        inside.append(here[0] if here else 1 << MANT_BITS)
    return tuple(base), tuple(inside)


@functools.lru_cache(maxsize=None)
def _decode_mantissas(frac_bits: int) -> tuple[int, ...]:
    """``D[r] = 2^(r/2^F)`` rounded to nearest float32, as 24-bit significands (scale 2^-23)."""
    n = 1 << frac_bits
    return tuple(_round_on_grid(_pow2(r, n), MANT_BITS, ROUND_HALF_EVEN) for r in range(n))


@functools.lru_cache(maxsize=None)
def _conversion_table(frac_bits: int, conversion: str, lut_bits: int) -> tuple[tuple[int, ...], int]:
    """``C[r]`` of spec section 2 step 2 as ``(numerators, S)`` with ``C[r] = N[r] / 2^S``."""
    n = 1 << frac_bits
    if conversion == "exact":
        return _decode_mantissas(frac_bits), MANT_BITS
    if conversion == "lut":
        return tuple(_round_on_grid(_pow2(r, n), lut_bits, ROUND_HALF_EVEN) for r in range(n)), lut_bits
    if conversion == "mitchell":
        return tuple(n + r for r in range(n)), frac_bits
    raise ValueError(f"unknown conversion {conversion!r}")


def assume_constant_result(fn):
    """``torch.compiler.assume_constant_result``, without importing ``torch._dynamo`` (1.3 s) at import.

    torch's decorator imports Dynamo to set one marker on the function. When Dynamo is
    already loaded this defers to it; otherwise it sets the same marker
    (``tests/core/test_tables.py`` checks that the two agree), which Dynamo reads when it
    traces.
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


# The public table functions are constants of their arguments: torch.compile calls them at
# trace time (assume_constant_result) instead of tracing the decimal arithmetic. The marker
# sits on plain functions because Dynamo looks through lru_cache wrappers.
@assume_constant_result
def encode_thresholds(frac_bits: int) -> tuple[int, ...]:
    return _encode_thresholds(frac_bits)


encode_thresholds.__doc__ = _encode_thresholds.__doc__


@assume_constant_result
def encode_buckets(frac_bits: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return _encode_buckets(frac_bits)


encode_buckets.__doc__ = _encode_buckets.__doc__


@assume_constant_result
def decode_mantissas(frac_bits: int) -> tuple[int, ...]:
    return _decode_mantissas(frac_bits)


decode_mantissas.__doc__ = _decode_mantissas.__doc__


@assume_constant_result
def conversion_table(frac_bits: int, conversion: str, lut_bits: int) -> tuple[tuple[int, ...], int]:
    return _conversion_table(frac_bits, conversion, lut_bits)


conversion_table.__doc__ = _conversion_table.__doc__


# Device-resident tensors: cached per (parameters, device) in eager mode; built from the
# constant tuples inside a compiled graph.
def _buckets_values(frac_bits):
    return encode_buckets(frac_bits), torch.int32


def _decode_bits_values(frac_bits):
    return tuple((127 << MANT_BITS) | (m - (1 << MANT_BITS)) for m in decode_mantissas(frac_bits)), torch.int32


def _conversion_values(frac_bits, conversion, lut_bits):
    nums, shift = conversion_table(frac_bits, conversion, lut_bits)
    return tuple(v / (1 << shift) for v in nums), torch.float64


@functools.lru_cache(maxsize=None)
def _cached_tensor(kind, args, device: torch.device) -> torch.Tensor:
    values, dtype = kind(*args)
    return torch.tensor(values, dtype=dtype, device=device)


def _table_tensor(kind, args, device) -> torch.Tensor:
    if torch.compiler.is_compiling():
        values, dtype = kind(*args)
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_tensor(kind, args, torch.device(device))


def buckets_tensor(frac_bits: int, device) -> torch.Tensor:
    """``encode_buckets`` as a (2, 2^(F+1)) int32 tensor on ``device``: row 0 ``base``, row 1 ``inside``."""
    return _table_tensor(_buckets_values, (frac_bits,), device)


def decode_bits_tensor(frac_bits: int, device) -> torch.Tensor:
    """float32 bit patterns of ``D[r]`` (exponent field 127, i.e. values in [1, 2))."""
    return _table_tensor(_decode_bits_values, (frac_bits,), device)


def conversion_tensor_f64(frac_bits: int, conversion: str, lut_bits: int, device) -> torch.Tensor:
    """``C[r]`` as exact float64 values (every entry has <= 25 significant bits)."""
    return _table_tensor(_conversion_values, (frac_bits, conversion, lut_bits), device)


# FP8 values come from torch's own float8 dtypes, so they cannot disagree with torch's casts.
# NaN codes decode to the canonical quiet NaN (sign kept), not to the payload torch's cast
# carries over, so that a NaN output has one bit pattern on every backend.
@functools.lru_cache(maxsize=None)
def _fp8_values(variant: str) -> tuple[float, ...]:
    dtype = torch.float8_e4m3fn if variant == "e4m3" else torch.float8_e5m2
    v = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    return tuple(torch.where(v.isnan(), torch.full_like(v, float("nan")).copysign(v), v).tolist())


@assume_constant_result
def fp8_values(variant: str) -> tuple[float, ...]:
    """float32 value of each of the 256 codes of FP8 ``variant`` (``"e4m3"``/``"e5m2"``)."""
    return _fp8_values(variant)


def _fp8_entries(variant):
    return fp8_values(variant), torch.float32


def fp8_values_tensor(variant: str, device) -> torch.Tensor:
    """``fp8_values`` as a float32 tensor on ``device``."""
    return _table_tensor(_fp8_entries, (variant,), device)
