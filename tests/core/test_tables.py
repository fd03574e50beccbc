"""The exact tables of chip-model.md sections 1 and 2, against independent computations.

Three independent references, none of which uses torchlns:

* rigorous integer interval arithmetic: 2^(1/2^(F+1)) is bracketed by repeated integer
  square roots (``math.isqrt``) on a 2^-160 fixed-point grid, its powers by bracketed
  products; a table entry is accepted only when both ends of the bracket round the same way;
* ``decimal`` at 50 digits: ``float32(c) >= c`` and the previous float32 ``< c`` (encode
  thresholds, rounded up), ``|D - 2^(r/2^F)| < half an ulp`` (decode table, nearest);
* for small F, pure integer arithmetic with no approximation at all:
  ``A/2^23 >= 2^(t/M)  <=>  A^M >= 2^(23*M + t)``.

Plus the float64 ``pow`` shortcut that the spec says is correct for F <= 10, and the spec's
literal LUT for F=3, P=8.
"""

import bisect
import functools
import math
import random
from decimal import Context, Decimal

import numpy as np
import pytest

from torchlns.core import tables

ALL_F = list(range(0, 15))
P = 160  # fixed-point fraction bits of the interval arithmetic
ONE = 1 << P


# ----------------------------------------------------------------------------------------
# rigorous brackets of 2^(t / 2^(F+1)), t = 0 .. 2^(F+2)-1, on the 2^-P grid
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _brackets(F: int):
    """Lists ``lo, hi`` with ``lo[t] <= 2^P * 2^(t/2^(F+1)) <= hi[t]`` for t < 2^(F+2)."""
    lo = hi = 2 << P  # 2^(1/1), exact
    for _ in range(F + 1):  # F+1 square roots: 2^(1/2^(F+1))
        lo = math.isqrt(lo << P)
        hi = math.isqrt(hi << P) + 1
    step_lo, step_hi = lo, hi
    los, his = [ONE], [ONE]
    for _ in range(1, 1 << (F + 2)):
        los.append((los[-1] * step_lo) >> P)
        his.append(-((-his[-1] * step_hi) >> P))
    return los, his


def _round_bracket(lo: int, hi: int, frac_bits: int, mode: str) -> int:
    """``round(v * 2^frac_bits)`` for v in [lo, hi]/2^P, asserting the bracket decides it."""

    def rnd(v):
        if mode == "up":
            return -((-v << frac_bits) >> P)
        return ((v << (frac_bits + 1)) + ONE) >> (P + 1)  # floor(v*2^b + 1/2); no ties (irrational)

    a, b = rnd(lo), rnd(hi)
    assert a == b, f"bracket too wide to decide rounding ({mode}, {frac_bits} bits)"
    return a


@functools.lru_cache(maxsize=None)
def ref_thresholds(F: int) -> tuple:
    """23-bit fraction fields of c_i = 2^((i+0.5)/2^F) rounded up to float32."""
    lo, hi = _brackets(F)
    return tuple(_round_bracket(lo[2 * i + 1], hi[2 * i + 1], 23, "up") - (1 << 23) for i in range(1 << F))


@functools.lru_cache(maxsize=None)
def ref_decode(F: int) -> tuple:
    """24-bit significands of D[r] = 2^(r/2^F) rounded to the nearest float32."""
    lo, hi = _brackets(F)
    return tuple(_round_bracket(lo[2 * r], hi[2 * r], 23, "nearest") for r in range(1 << F))


def ref_lut(F: int, lut_bits: int) -> tuple:
    lo, hi = _brackets(F)
    return tuple(_round_bracket(lo[2 * r], hi[2 * r], lut_bits, "nearest") for r in range(1 << F))


# ----------------------------------------------------------------------------------------
# encode thresholds c_i (rounded up)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("F", ALL_F)
def test_thresholds_shape_and_order(F):
    t = tables.encode_thresholds(F)
    assert len(t) == 1 << F
    assert all(isinstance(v, int) for v in t)
    assert all(0 < v < (1 << 23) for v in t)  # 1 < c_i < 2, representable as a fraction field
    assert all(a < b for a, b in zip(t, t[1:]))


@pytest.mark.parametrize("F", ALL_F)
def test_thresholds_match_interval_arithmetic(F):
    assert tables.encode_thresholds(F) == ref_thresholds(F)


@pytest.mark.parametrize("F", ALL_F)
def test_thresholds_decimal(F):
    """float32(c_i) >= c_i and the previous float32 < c_i, with c_i at 50 digits."""
    ctx = Context(prec=50)
    ln2 = ctx.ln(Decimal(2))
    n = 1 << F
    ulp = Decimal(2) ** -23
    for i, frac in enumerate(tables.encode_thresholds(F)):
        c = ctx.exp(ctx.multiply(ln2, ctx.divide(Decimal(2 * i + 1), Decimal(2 * n))))
        u = 1 + Decimal(frac) * ulp  # exact
        assert u >= c, (F, i)
        assert u - ulp < c, (F, i)
        assert u - c > Decimal(10) ** -40  # c is irrational: the decision is far from the noise


@pytest.mark.parametrize("F", range(0, 8))
def test_thresholds_exact_integer_check(F):
    """No approximation at all: A/2^23 >= 2^(t/M) <=> A^M >= 2^(23M + t), M = 2^(F+1)."""
    m = 2 << F
    for i, frac in enumerate(tables.encode_thresholds(F)):
        a, t = (1 << 23) + frac, 2 * i + 1
        assert a**m >= 1 << (23 * m + t), (F, i)
        assert (a - 1) ** m < 1 << (23 * m + t), (F, i)


# ----------------------------------------------------------------------------------------
# decode table D[r] (nearest)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("F", ALL_F)
def test_decode_shape(F):
    d = tables.decode_mantissas(F)
    assert len(d) == 1 << F
    assert d[0] == 1 << 23
    assert all((1 << 23) <= v < (1 << 24) for v in d)
    assert all(a < b for a, b in zip(d, d[1:]))


@pytest.mark.parametrize("F", ALL_F)
def test_decode_matches_interval_arithmetic(F):
    assert tables.decode_mantissas(F) == ref_decode(F)


@pytest.mark.parametrize("F", ALL_F)
def test_decode_decimal(F):
    """|D[r] - 2^(r/2^F)| < 2^-24 (half an ulp in [1, 2)): D[r] is the nearest float32."""
    ctx = Context(prec=50)
    ln2 = ctx.ln(Decimal(2))
    n = 1 << F
    half_ulp = Decimal(2) ** -24
    for r, mant in enumerate(tables.decode_mantissas(F)):
        v = ctx.exp(ctx.multiply(ln2, ctx.divide(Decimal(r), Decimal(n))))
        d = Decimal(mant) * Decimal(2) ** -23
        err = abs(d - v)
        assert err < half_ulp, (F, r)
        assert r == 0 or half_ulp - err > Decimal(10) ** -40


@pytest.mark.parametrize("F", range(0, 7))
def test_decode_exact_integer_check(F):
    """D = A/2^23 is nearest iff (A - 1/2)/2^23 < 2^(r/N) < (A + 1/2)/2^23, i.e. in integers
    (2A-1)^N < 2^(24N + r) < (2A+1)^N."""
    n = 1 << F
    for r, a in enumerate(tables.decode_mantissas(F)):
        assert (2 * a - 1) ** n < 1 << (24 * n + r) < (2 * a + 1) ** n, (F, r)


# ----------------------------------------------------------------------------------------
# the float64 shortcut of the spec (F <= 10)
# ----------------------------------------------------------------------------------------
def _f32_round_up(v: float) -> np.float32:
    f = np.float32(v)
    if float(f) < v:
        f = np.nextafter(f, np.float32(np.inf))
    return f


@pytest.mark.parametrize("F", range(0, 11))
def test_float64_pow_shortcut(F):
    n = 1 << F
    thr = [int(_f32_round_up(2.0 ** ((i + 0.5) / n)).view(np.uint32)) & 0x7FFFFF for i in range(n)]
    dec = [(int(np.float32(2.0 ** (r / n)).view(np.uint32)) & 0x7FFFFF) | (1 << 23) for r in range(n)]
    assert tuple(thr) == tables.encode_thresholds(F)
    assert tuple(dec) == tables.decode_mantissas(F)


# ----------------------------------------------------------------------------------------
# conversion tables of the MAC (section 2)
# ----------------------------------------------------------------------------------------
def test_spec_literal_lut_f3_p8():
    nums, shift = tables.conversion_table(3, "lut", 8)
    assert shift == 8
    assert nums == (256, 279, 304, 332, 362, 395, 431, 470)


@pytest.mark.parametrize("F,lut_bits", [(0, 1), (1, 1), (3, 4), (3, 23), (4, 8), (7, 10), (8, 8), (10, 16), (14, 23)])
def test_lut_matches_interval_arithmetic(F, lut_bits):
    nums, shift = tables.conversion_table(F, "lut", lut_bits)
    assert shift == lut_bits
    assert nums == ref_lut(F, lut_bits)


@pytest.mark.parametrize("F", [0, 3, 8, 14])
def test_exact_and_mitchell_conversion(F):
    n = 1 << F
    nums, shift = tables.conversion_table(F, "exact", 8)
    assert (nums, shift) == (ref_decode(F), 23)
    nums, shift = tables.conversion_table(F, "mitchell", 8)
    assert [v / (1 << shift) for v in nums] == [1 + r / n for r in range(n)]


@pytest.mark.parametrize("F", range(15))
def test_buckets_count_the_thresholds(F):
    """``base[b] + (frac >= inside[b])`` is ``#{i : frac >= c_i}`` for every fraction (sampled at every edge)."""
    thresholds = ref_thresholds(F)
    base, inside = tables.encode_buckets(F)
    width = 1 << (22 - F)
    assert len(base) == len(inside) == 2 << F
    assert sorted(t for t in inside if t != 1 << 23) == list(thresholds)  # each threshold sits in one bucket
    edges = {0, (1 << 23) - 1}
    for t in thresholds:
        edges.update((t - 1, t, t + 1))
    for b in range(2 << F):
        edges.update((b * width, b * width + width - 1))
    rng = random.Random(F)
    edges.update(rng.randrange(1 << 23) for _ in range(2000))
    for frac in sorted(e for e in edges if 0 <= e < 1 << 23):
        b = frac >> (22 - F)
        assert base[b] + (frac >= inside[b]) == bisect.bisect_right(thresholds, frac), (F, frac)


def test_unknown_conversion():
    with pytest.raises(ValueError):
        tables.conversion_table(3, "linear", 8)


@pytest.mark.parametrize("F", [0, 3, 10, 14])
def test_device_tensors(F):
    import torch

    buckets = tables.buckets_tensor(F, torch.device("cpu"))
    assert buckets.dtype == torch.int32 and buckets.shape == (2, 2 << F)
    assert buckets.tolist() == [list(row) for row in tables.encode_buckets(F)]
    bits = tables.decode_bits_tensor(F, torch.device("cpu"))
    vals = bits.view(torch.float32).double().tolist()
    assert vals == [m / 2**23 for m in ref_decode(F)]
    conv = tables.conversion_tensor_f64(F, "lut", 8, torch.device("cpu"))
    assert conv.dtype == torch.float64 and conv.tolist() == [v / 256 for v in ref_lut(F, 8)]


def test_import_does_not_load_dynamo():
    """torch.compiler.assume_constant_result imports torch._dynamo (over a second); the tables' own marker does not."""
    import subprocess
    import sys

    code = "import sys, torchlns; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_the_constant_marker_is_dynamos():
    import torch._dynamo

    from torchlns.core import tables

    def ours():
        return 1

    def theirs():
        return 1

    marked = vars(torch._dynamo.assume_constant_result(theirs))
    import sys

    saved = sys.modules.pop("torch._dynamo")  # the path taken when Dynamo is not loaded yet
    try:
        assert vars(tables.assume_constant_result(ours)) == marked
    finally:
        sys.modules["torch._dynamo"] = saved
