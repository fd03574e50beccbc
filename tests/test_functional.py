"""lns_linear / lns_conv1d / lns_conv2d against a slow scalar oracle (chip-model.md 2-5).

The oracle below is written from the spec alone, with Python integers and exact rationals
(``fractions.Fraction``). It reads only the integer codes and the per-element offsets
(or float32 scales) of the operands; it shares no code with torchlns: its conversion tables
come from ``decimal`` at 60 digits, its float32 rounding is its own.

How results are compared:

* Exact modes (LNS fixed accumulator, INT) are compared bit for bit, as float32 bit
  patterns, so that -0.0 differs from +0.0. NaN compares equal to NaN whatever its payload:
  the spec fixes *that* an output is NaN, not which of the 2^23 NaN patterns it is.
* float32-accumulation modes are checked twice:
  - against the spec's bound ``|y - y_exact| <= K 2^-24 sum|p_k|`` (plus one float32
    rounding for the bias add, and 2^-149 for results below the normal range, which the
    spec's relative bound does not cover);
  - against the much tighter bracket the reference documents (Note: reference MAC
    arithmetic in torchlns/ops/reference.py): the exact products are summed in float64 (error at most
    ``K 2^-53 sum|p|`` in any order) and rounded once to float32, then the bias is added in
    float32. Rounding is monotone, so ``y`` must lie in
    ``[rn32(y_exact - E) (+b), rn32(y_exact + E) (+b)]`` with ``E = K 2^-53 sum|p|``. When
    ``E`` is below half an ulp this pins ``y`` to ``rn32(y_exact)`` or a neighbour at a
    near-tie, i.e. "within 1 ulp" made precise.

Big random sweeps are marked ``slow`` and use ``sweep()`` (see Note: sweep size in
conftest.py); the default run covers every conversion x accumulator x granularity.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from decimal import Context, Decimal
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import sweep
from torchlns import ops  # noqa: E402
from torchlns import (
    LNS8,
    FP8Format,
    FP8Tensor,
    IntFormat,
    IntTensor,
    LNSFormat,
    LNSTensor,
    MACConfig,
    lns_conv1d,
    lns_conv2d,
    lns_linear,
)


# ========================================================================================
# Exact float32 arithmetic on rationals
# ========================================================================================
@lru_cache(maxsize=None)
def p2(e: int) -> Fraction:
    """2^e exactly."""
    return Fraction(1 << e) if e >= 0 else Fraction(1, 1 << -e)


# |v| at or above the midpoint between the largest float32 (2^128 - 2^104) and 2^128 rounds
# to inf: the tie goes to the "even" 2^128.
F32_OVERFLOW = p2(128) - p2(103)


def rn32(v: Fraction) -> float:
    """``v`` rounded to the nearest float32 (ties to even, subnormals, overflow to inf).

    Returned as a Python float holding that float32 value exactly; a negative ``v`` that
    rounds to zero gives -0.0, as IEEE rounding does.
    """
    if v == 0:
        return 0.0
    a = abs(v)
    if a >= F32_OVERFLOW:
        r = math.inf
    else:
        e = a.numerator.bit_length() - a.denominator.bit_length()
        if a < p2(e):
            e -= 1  # now 2^e <= a < 2^(e+1)
        ulp = max(e, -126) - 23  # float32 spacing in that binade (fixed below the normal range)
        r = math.ldexp(round(a * p2(-ulp)), ulp)  # round(Fraction) is half-to-even; exact in float64
    return -r if v < 0 else r


def add32(a: float, b: float) -> float:
    """IEEE float32 ``a + b`` of two float32 values."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return a + b
    s = Fraction(a) + Fraction(b)
    return a + b if s == 0 else rn32(s)  # an exact zero takes IEEE's sign rule, as float64 does


def mul32(a: float, b: float) -> float:
    """IEEE float32 ``a * b`` of two float32 values."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return a * b
    p = Fraction(a) * Fraction(b)
    return a * b if p == 0 else rn32(p)


NAN_BITS = 0x7FC00000


def f32_bits(v: float) -> int:
    """float32 bit pattern of a float32 value; every NaN maps to one canonical pattern."""
    if math.isnan(v):
        return NAN_BITS
    return int(np.array(v, dtype=np.float32).view(np.int32))


# ========================================================================================
# Conversion tables, computed independently (decimal at 60 digits)
# ========================================================================================
_CTX = Context(prec=60)


@lru_cache(maxsize=None)
def pow2_frac(r: int, F: int) -> Fraction:
    """2^(r / 2^F) to 60 significant digits, as an exact Fraction of that decimal."""
    return Fraction(_CTX.power(Decimal(2), _CTX.divide(Decimal(r), Decimal(1 << F))))


@lru_cache(maxsize=None)
def conv_table(F: int, conversion: str, lut_bits: int) -> tuple:
    """C[r] of spec section 2 step 2, as Fractions."""
    n = 1 << F
    if conversion == "exact":  # D[r]: 2^(r/2^F) rounded to the nearest float32
        return tuple(Fraction(rn32(pow2_frac(r, F))) for r in range(n))
    if conversion == "lut":
        return tuple(Fraction(round(pow2_frac(r, F) * (1 << lut_bits)), 1 << lut_bits) for r in range(n))
    if conversion == "mitchell":
        return tuple(1 + Fraction(r, n) for r in range(n))
    raise AssertionError(conversion)


def fp8_value(code: int, variant: str) -> float:
    """Exact value of an FP8 code (OCP e4m3 / e5m2), from the bit layout."""
    eb, mb, bias = (4, 3, 7) if variant == "e4m3" else (5, 2, 15)
    s, e, m = code >> 7, (code >> mb) & ((1 << eb) - 1), code & ((1 << mb) - 1)
    if variant == "e4m3" and e == 15 and m == 7:
        return math.nan
    if variant == "e5m2" and e == 31:
        v = math.inf if m == 0 else math.nan
    elif e == 0:
        v = math.ldexp(m, 1 - bias - mb)
    else:
        v = math.ldexp((1 << mb) + m, e - bias - mb)
    return -v if s else v


# ========================================================================================
# Expected results and the comparison
# ========================================================================================
# An expected output is ("bits", v): bit-exact float32 value v; or
# ("range", lo, hi, exact, tol): lo <= y <= hi, and |y - exact| <= tol when y is finite
# (exact is None for a NaN/inf result).


def _expect_str(e) -> str:
    if e[0] == "bits":
        return f"{e[1]!r} (bits {f32_bits(e[1]):#010x})"
    _, lo, hi, exact, tol = e
    ex = "special" if exact is None else f"{float(exact)!r}"
    return f"[{lo!r}, {hi!r}], exact {ex}, spec tol {float(tol) if tol is not None else None!r}"


# The tight float64 bracket is the reference's documented behaviour; the native kernels only
# promise the spec's bound (the CPU kernel's remainder-class GEMMs sum in float32). So the
# bracket is enforced inside ``on_reference()``, and the spec bound everywhere.
_TIGHT = False


@contextlib.contextmanager
def on_reference():
    """Run torchlns on its reference kernels and hold float32 results to the tight bracket."""
    global _TIGHT
    with ops.reference_kernels():
        _TIGHT = True
        try:
            yield
        finally:
            _TIGHT = False


def check(got: torch.Tensor, expect: np.ndarray, describe=lambda idx: "") -> None:
    assert isinstance(got, torch.Tensor) and type(got) is torch.Tensor, type(got)
    assert got.dtype == torch.float32, got.dtype
    assert tuple(got.shape) == expect.shape, (tuple(got.shape), expect.shape)
    values = got.detach().reshape(-1).tolist()
    bad = []
    for i, (y, e) in enumerate(zip(values, expect.reshape(-1))):
        if e[0] == "bits":
            ok = f32_bits(y) == f32_bits(e[1])
        else:
            _, lo, hi, exact, tol = e
            if math.isnan(lo) or math.isnan(hi):
                ok = math.isnan(y)
            else:
                ok = not math.isnan(y) and (lo <= y <= hi or not _TIGHT)
                if exact is None:  # a NaN/inf result: the bracket is all there is
                    ok = ok and lo <= y <= hi
                if ok and exact is not None and math.isfinite(y):
                    ok = abs(Fraction(y) - exact) <= tol
        if not ok:
            bad.append(i)
    if bad:
        i = bad[0]
        idx = tuple(int(j) for j in np.unravel_index(i, expect.shape))
        y = values[i]
        raise AssertionError(
            f"{len(bad)} of {len(values)} outputs are wrong; first at {idx}: expected "
            f"{_expect_str(expect.reshape(-1)[i])}, got {y!r} (bits {f32_bits(y):#010x})\n{describe(idx)}"
        )


def check_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality of two float32 tensors (NaN payloads canonicalised)."""
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    ab = torch.where(torch.isnan(a), torch.full_like(a, math.nan), a).view(torch.int32)
    bb = torch.where(torch.isnan(b), torch.full_like(b, math.nan), b).view(torch.int32)
    if not torch.equal(ab, bb):
        i = (ab != bb).nonzero()[0].tolist()
        raise AssertionError(f"differ at {i}: {a[tuple(i)].item()!r} vs {b[tuple(i)].item()!r}")


# ========================================================================================
# The LNS oracle: spec section 2, one dot product at a time
# ========================================================================================
def lns_fields(codes: np.ndarray, fmt: LNSFormat):
    """(negative, E) of every code (int16 storage is reinterpreted as the unsigned pattern)."""
    c = np.asarray(codes, dtype=np.int64) & ((1 << fmt.bits) - 1)
    return (c >> (fmt.bits - 1)).astype(bool), c & fmt.e_max


def lns_oracle(xc, xo, fx, wc, wo, fw, mac: MACConfig, acc_lsb=None, bias=None, stats=None) -> np.ndarray:
    """Expected y[m, n] for x codes/offsets (M, K) and w codes/offsets (N, K), all per element.

    ``bias`` is a list of float32 values (Python floats). ``stats`` (a dict) counts fixed
    accumulator events: truncated products, saturated products, saturated sums.
    """
    assert fx.frac_bits == fw.frac_bits
    F = fx.frac_bits
    table = conv_table(F, mac.conversion, mac.lut_bits)
    xneg, xE = lns_fields(xc, fx)
    wneg, wE = lns_fields(wc, fw)
    xnan = ((xE == 0) & xneg).any(1).tolist()
    wnan = ((wE == 0) & wneg).any(1).tolist()
    xneg, xE, xo = xneg.tolist(), xE.tolist(), np.asarray(xo).tolist()
    wneg, wE, wo = wneg.tolist(), wE.tolist(), np.asarray(wo).tolist()
    M, K = len(xE), (len(xE[0]) if len(xE) else 0)
    N = len(wE)
    fixed = mac.accumulator == "fixed"
    T = 2 ** (mac.acc_bits - 1) - 1
    out = np.empty((M, N), dtype=object)
    for m in range(M):
        for n in range(N):
            if xnan[m] or wnan[n]:  # NaN dominates, even against a zero partner
                out[m, n] = ("bits", math.nan)
                continue
            terms = []  # (negative, |product|) of the nonzero products
            for k in range(K):
                if xE[m][k] == 0 or wE[n][k] == 0:
                    continue
                G = (xE[m][k] + xo[m][k]) + (wE[n][k] + wo[n][k])
                q, r = divmod(G, 1 << F)  # floor division: 0 <= r < 2^F
                terms.append((xneg[m][k] != wneg[n][k], table[r] * p2(q)))
            b = None if bias is None else bias[n]
            if fixed:
                acc = 0
                for neg, mag in terms:
                    p = math.floor(mag * p2(-acc_lsb))
                    if stats is not None:
                        stats["trunc"] += p == 0
                        stats["sat"] += p > T
                    p = min(p, T)
                    acc += -p if neg else p
                if b is not None:
                    if math.isinf(b):
                        acc += int(math.copysign(1, b)) << 600  # rne(±inf) saturates
                    else:
                        acc += round(Fraction(b) * p2(-acc_lsb))  # half to even
                if stats is not None:
                    stats["sum_sat"] += abs(acc) > T
                acc = max(-T, min(T, acc))
                out[m, n] = ("bits", rn32(acc * p2(acc_lsb)))
            else:
                ye = sum((-mag if neg else mag for neg, mag in terms), Fraction(0))
                S = sum((mag for _, mag in terms), Fraction(0))
                E = K * p2(-53) * S
                lo, hi = rn32(ye - E), rn32(ye + E)
                if b is None:
                    exact, tol = ye, K * p2(-24) * S + p2(-149)
                else:
                    lo, hi = add32(lo, b), add32(hi, b)
                    exact = ye + Fraction(b)
                    tol = K * p2(-24) * S * (1 + p2(-24)) + p2(-24) * abs(exact) + p2(-149)
                out[m, n] = ("range", lo, hi, exact, tol)
    return out


# ========================================================================================
# The FP8 / INT oracle: spec section 5 and the documented segment rule
# ========================================================================================
def scaled_oracle(xv, xs, xblk, wv, ws, wblk, is_int: bool, bias=None) -> np.ndarray:
    """Expected y for unscaled values xv (M, K), wv (N, K) and per-element float32 scales.

    Segment rule (Note: reference MAC arithmetic): K is cut at every multiple of ``xblk``
    and of ``wblk`` (None: no blocks); in a segment, ``y_seg = float32(sum) * (s_x * s_w)``
    in float32 and the segments are added in order in float32, then the bias. With one
    segment this is spec section 5's ``y = float32(acc) * (s_x * s_w)``. INT sums are exact;
    FP8 sums are float64 sums of exact products, bracketed as for the LNS float32 MAC.
    """
    M, K = xv.shape
    N = wv.shape[0]
    cuts = {0, K}
    for blk in (xblk, wblk):
        if blk:
            cuts.update(range(0, K, blk))
    cuts = sorted(cuts)
    segs = list(zip(cuts[:-1], cuts[1:]))
    xv, xs, wv, ws = xv.tolist(), xs.tolist(), wv.tolist(), ws.tolist()
    out = np.empty((M, N), dtype=object)
    for m in range(M):
        for n in range(N):
            ylo = yhi = None
            exact, absum, special = Fraction(0), Fraction(0), False
            for k0, k1 in segs:
                prods = [xv[m][k] * wv[n][k] for k in range(k0, k1)]  # exact in float64
                s = mul32(xs[m][k0], ws[n][k0])
                if not all(math.isfinite(p) for p in prods):
                    special = True
                    if any(math.isnan(p) for p in prods) or (math.inf in prods and -math.inf in prods):
                        plo = phi = math.nan
                    else:
                        plo = phi = math.inf if math.inf in prods else -math.inf
                else:
                    S = sum((Fraction(p) for p in prods), Fraction(0))
                    A = sum((abs(Fraction(p)) for p in prods), Fraction(0))
                    if is_int:
                        plo = phi = rn32(S)
                    else:
                        E = (k1 - k0) * p2(-53) * A
                        plo, phi = rn32(S - E), rn32(S + E)
                    exact += S * Fraction(xs[m][k0]) * Fraction(ws[n][k0])
                    absum += A * Fraction(xs[m][k0]) * Fraction(ws[n][k0])
                tlo, thi = mul32(plo, s), mul32(phi, s)  # s > 0: monotone
                ylo = tlo if ylo is None else add32(ylo, tlo)
                yhi = thi if yhi is None else add32(yhi, thi)
            if ylo is None:  # K == 0
                ylo = yhi = 0.0
            if bias is not None:
                ylo, yhi = add32(ylo, bias[n]), add32(yhi, bias[n])
                exact += Fraction(bias[n]) if not special else 0
            if is_int:
                assert f32_bits(ylo) == f32_bits(yhi)
                out[m, n] = ("bits", ylo)
            else:
                tol = (K + 3) * p2(-24) * absum + p2(-24) * abs(exact) + (len(segs) + 2) * p2(-149)
                out[m, n] = ("range", ylo, yhi, None if special else exact, tol)
    return out


# ========================================================================================
# Building operands
# ========================================================================================
def torch_codes(codes: np.ndarray, fmt) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    if isinstance(fmt, LNSFormat) and fmt.bits == 16:  # int16 holds the same bit pattern
        t = torch.where(t >= 1 << 15, t - (1 << 16), t)
    return t.to(fmt.code_dtype)


def expand_full(param: np.ndarray, shape, block) -> np.ndarray:
    """Compact parameter -> one per element (my own expansion, not torchlns')."""
    p = np.asarray(param)
    if block is not None:
        axis, bs = block
        p = np.take(p, np.arange(shape[axis]) // bs, axis=axis)
    return np.broadcast_to(p, tuple(shape)).copy()


def param_shape(gran: str, rows: int, K: int, bs: int):
    nb = -(-K // bs)
    return {"tensor": (1, 1), "channel": (rows, 1), "block": (rows, nb), "block-shared": (1, nb)}[gran]


def rand_lns_codes(rng, shape, fmt: LNSFormat, p_zero=0.15, p_nan=0.0) -> np.ndarray:
    c = rng.integers(1, 1 << fmt.bits, size=shape)
    c[c == fmt.nan_code] = 1
    u = rng.random(shape)
    c[u < p_zero] = 0
    c[(u >= p_zero) & (u < p_zero + p_nan)] = fmt.nan_code
    return c


def rand_offsets(rng, fmt: LNSFormat, shape, octaves=2) -> np.ndarray:
    spread = octaves << fmt.frac_bits
    off = -fmt.e_max + rng.integers(-spread, spread + 1, size=shape)
    return np.clip(off, fmt.offset_min, fmt.offset_max)


class Operand:
    """A coded 2-D operand plus what the oracle needs: codes and per-element parameters."""

    def __init__(self, tensor, codes, full):
        self.tensor, self.codes, self.full = tensor, codes, full


def make_lns(codes: np.ndarray, fmt: LNSFormat, param: np.ndarray, block=None) -> Operand:
    t = LNSTensor(torch_codes(codes, fmt), torch.tensor(np.asarray(param), dtype=torch.int32), fmt, block)
    return Operand(t, np.asarray(codes), expand_full(param, codes.shape, block))


def rand_lns_operand(rng, fmt, gran, rows, K, bs, p_nan=0.0, octaves=2) -> Operand:
    codes = rand_lns_codes(rng, (rows, K), fmt, p_nan=p_nan)
    param = rand_offsets(rng, fmt, param_shape(gran, rows, K, bs), octaves)
    return make_lns(codes, fmt, param, (1, bs) if gran.startswith("block") else None)


def product_q_range(x: Operand, fx, w: Operand, fw):
    """(min q, max q) over the nonzero products, or None."""
    _, xE = lns_fields(x.codes, fx)
    _, wE = lns_fields(w.codes, fw)
    G = (xE + x.full)[:, None, :] + (wE + w.full)[None, :, :]
    nz = (xE != 0)[:, None, :] & (wE != 0)[None, :, :]
    if not nz.any():
        return None
    q = G[nz] >> fx.frac_bits  # arithmetic shift: floor
    return int(q.min()), int(q.max())


def choose_acc_lsb(rng, qr, W: int, regime: str) -> int:
    """An acc_lsb that makes products saturate ("sat"), truncate to 0 ("trunc"), or either."""
    if qr is None:
        return int(rng.integers(-40, 40))
    qmin, qmax = qr
    if regime == "sat":  # the largest product is >= 2^qmax >= 2^(lsb + W - 1) > T 2^lsb
        lsb = qmax - (W - 1) - int(rng.integers(0, 3))
    elif regime == "trunc":  # the smallest product is < 2^(qmin + 1) <= 2^lsb
        lsb = qmin + int(rng.integers(1, 4))
    else:
        lsb = int(rng.integers(qmin - W, qmax + 2))
    return max(-512, min(512, lsb))


def rand_bias(rng, N, fixed: bool, lsb: int, W: int, scale: float) -> torch.Tensor:
    if fixed:
        b = rng.standard_normal(N) * 2.0 ** (lsb + int(rng.integers(0, W + 2)))
        kind = rng.integers(0, 6, size=N)
        ties = (rng.integers(-9, 9, size=N) + 0.5) * 2.0**lsb  # rne ties: half to even
        b = np.where(kind == 0, ties, b)
        b = np.where(kind == 1, rng.choice([3e38, -3e38], size=N), b)  # saturates
        b = np.where(kind == 2, -np.abs(b), b)
    else:
        b = rng.standard_normal(N) * scale
    return torch.tensor(b, dtype=torch.float32)


def describe_lns(x: Operand, w: Operand, mac, acc_lsb, bias):
    def describe(idx):
        m, n = idx[-2], idx[-1]
        return (
            f"mac={mac!r} acc_lsb={acc_lsb} bias={None if bias is None else bias[n]!r}\n"
            f"x row {m}: codes {x.codes[m].tolist()} offsets {x.full[m].tolist()} ({x.tensor!r})\n"
            f"w row {n}: codes {w.codes[n].tolist()} offsets {w.full[n].tolist()} ({w.tensor!r})"
        )

    return describe


# ========================================================================================
# Sweep space
# ========================================================================================
LNS_FORMAT_PAIRS = {
    "lns8": (LNS8, LNS8),
    "lns6f2": (LNSFormat(6, 2), LNSFormat(6, 2)),
    "lns12f6": (LNSFormat(12, 6), LNSFormat(12, 6)),
    "lns16f10": (LNSFormat(16, 10), LNSFormat(16, 10)),
    "lns10f3xlns8": (LNSFormat(10, 3), LNS8),
    "lns8mitchell_x_lns6f3": (LNSFormat(8, 3, "mitchell"), LNSFormat(6, 3)),
}
CONVERSIONS = [("exact", 8), ("lut", 1), ("lut", 5), ("lut", 8), ("lut", 23), ("mitchell", 8)]
ACCUMULATORS = [("float32", 32), ("fixed", 8), ("fixed", 16), ("fixed", 32), ("fixed", 48)]
X_GRANS = ["tensor", "channel", "block", "block-shared"]  # channel = one offset per row of x
W_GRANS = ["tensor", "channel", "block"]
REGIMES = ["sat", "trunc", "mid"]


def mac_of(conv, acc) -> MACConfig:
    return MACConfig(conversion=conv[0], lut_bits=conv[1], accumulator=acc[0], acc_bits=acc[1])


def run_lns_linear_case(seed, fx, fw, mac: MACConfig, xgran, wgran, regime="mid", p_nan=None, stats=None,
                        octaves=2, max_shape=(5, 4, 13)):
    rng = np.random.default_rng(seed)
    M, N = int(rng.integers(1, max_shape[0] + 1)), int(rng.integers(1, max_shape[1] + 1))
    K = 1 if rng.random() < 0.15 else int(rng.integers(1, max_shape[2] + 1))
    bx, bw = int(rng.integers(1, K + 3)), int(rng.integers(1, K + 3))
    if p_nan is None:
        p_nan = 0.04 if rng.random() < 0.3 else 0.0
    x = rand_lns_operand(rng, fx, xgran, M, K, bx, p_nan, octaves)
    w = rand_lns_operand(rng, fw, wgran, N, K, bw, p_nan, octaves)
    fixed = mac.accumulator == "fixed"
    acc_lsb = choose_acc_lsb(rng, product_q_range(x, fx, w, fw), mac.acc_bits, regime) if fixed else None
    bias = rand_bias(rng, N, fixed, acc_lsb or 0, mac.acc_bits, 4.0) if rng.random() < 0.5 else None
    y = lns_linear(x.tensor, w.tensor, bias, mac, acc_lsb=acc_lsb)
    blist = None if bias is None else bias.tolist()
    expect = lns_oracle(x.codes, x.full, fx, w.codes, w.full, fw, mac, acc_lsb, blist, stats)
    check(y, expect, describe_lns(x, w, mac, acc_lsb, blist))
    return x, w, bias, acc_lsb, y


# ========================================================================================
# The oracle's own building blocks
# ========================================================================================
def test_oracle_rn32_matches_ieee_float64_to_float32():
    rng = np.random.default_rng(1)
    vals = np.concatenate([
        rng.standard_normal(3000) * 2.0 ** rng.integers(-160, 130, size=3000),
        (rng.integers(0, 1 << 24, size=500) * 2 + 1) * 2.0 ** rng.integers(-175, 104, size=500),  # exact ties
        [2.0**128 - 2.0**103, -(2.0**128 - 2.0**103), 2.0**128 - 2.0**103 - 2.0**75, 2.0**-150, -2.0**-150,
         3 * 2.0**-151, 2.0**-149, 1.5 * 2.0**-149, 0.0, 1e300, -1e300],
    ])
    with np.errstate(over="ignore"):
        ref = vals.astype(np.float32)
    for v, r in zip(vals.tolist(), ref.tolist()):
        assert f32_bits(rn32(Fraction(v))) == f32_bits(r), (v, rn32(Fraction(v)), r)


def test_oracle_tables_match_the_spec():
    # Spec section 2: "For F=3 and P=8 it is {256, 279, 304, 332, 362, 395, 431, 470}/256."
    assert [c * 256 for c in conv_table(3, "lut", 8)] == [256, 279, 304, 332, 362, 395, 431, 470]
    assert conv_table(3, "mitchell", 8) == tuple(Fraction(8 + r, 8) for r in range(8))
    for F_ in (0, 2, 3, 6, 10):  # spec: float64 pow then one rounding is right for F <= 10
        d = [float(np.float32(2.0 ** (r / 2**F_))) for r in range(1 << F_)]
        assert [float(c) for c in conv_table(F_, "exact", 8)] == d
    assert conv_table(10, "lut", 1)[-1] == 2  # rne(2^(1023/1024) * 2) / 2: C[r] may reach 2


def test_oracle_fp8_values_match_torch():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    for variant, dt in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        ref = codes.view(dt).to(torch.float32).tolist()
        mine = [fp8_value(c, variant) for c in range(256)]
        assert [f32_bits(v) for v in mine] == [f32_bits(v) for v in ref]


# ========================================================================================
# LNS linear against the oracle
# ========================================================================================
@pytest.mark.parametrize("acc", ACCUMULATORS, ids=lambda a: f"{a[0]}{a[1]}")
@pytest.mark.parametrize("conv", CONVERSIONS, ids=lambda c: c[0] if c[0] != "lut" else f"lut{c[1]}")
def test_lns_linear_every_conversion_accumulator_granularity(conv, acc):
    """Every conversion x accumulator x (x, w) granularity; formats and regimes rotate."""
    mac = mac_of(conv, acc)
    pairs = list(LNS_FORMAT_PAIRS.values())
    for i, (xg, wg) in enumerate(itertools.product(X_GRANS, W_GRANS)):
        fx, fw = pairs[i % len(pairs)]
        seed = 1000 * i + 17 * CONVERSIONS.index(conv) + ACCUMULATORS.index(acc)
        run_lns_linear_case(seed, fx, fw, mac, xg, wg, REGIMES[i % 3])


@pytest.mark.parametrize("acc", [a for a in ACCUMULATORS if a[0] == "float32"], ids=lambda a: f"{a[0]}")
@pytest.mark.parametrize("conv", CONVERSIONS, ids=lambda c: c[0] if c[0] != "lut" else f"lut{c[1]}")
def test_reference_float32_accumulator_tight_bracket(conv, acc):
    """The reference keeps its documented promise: float64 sums of exact products, rounded once."""
    with on_reference():
        test_lns_linear_every_conversion_accumulator_granularity(conv, acc)


LNS_LINEAR_SPACE = list(itertools.product(LNS_FORMAT_PAIRS, range(len(CONVERSIONS)), range(len(ACCUMULATORS)),
                                          X_GRANS, W_GRANS))


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep(LNS_LINEAR_SPACE, 200, seed=1),
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def test_lns_linear_sweep(case):
    fname, ci, ai, xg, wg = case
    fx, fw = LNS_FORMAT_PAIRS[fname]
    mac = mac_of(CONVERSIONS[ci], ACCUMULATORS[ai])
    base = LNS_LINEAR_SPACE.index(case) * 10
    for j, regime in enumerate(REGIMES):
        run_lns_linear_case(base + j, fx, fw, mac, xg, wg, regime)


def test_fixed_accumulator_regimes_are_reached():
    """The random cases do truncate products to 0, saturate products and saturate sums."""
    stats = {"trunc": 0, "sat": 0, "sum_sat": 0}
    for i, (ai, regime) in enumerate(itertools.product(range(1, len(ACCUMULATORS)), REGIMES)):
        fx, fw = list(LNS_FORMAT_PAIRS.values())[i % len(LNS_FORMAT_PAIRS)]
        mac = mac_of(("lut", 8), ACCUMULATORS[ai])
        run_lns_linear_case(5000 + i, fx, fw, mac, "block", "channel", regime, p_nan=0.0, stats=stats)
    assert stats["trunc"] > 0 and stats["sat"] > 0 and stats["sum_sat"] > 0, stats


@pytest.mark.slow
@pytest.mark.parametrize("seed", sweep(range(120), 20, seed=2))
def test_lns_linear_extreme_offsets(seed):
    """Offsets anywhere in the valid range: products beyond float32's range, tiny outputs,
    acc_lsb up to +-512, outputs that overflow to inf or round into the subnormals."""
    rng = np.random.default_rng(seed)
    fx, fw = list(LNS_FORMAT_PAIRS.values())[seed % len(LNS_FORMAT_PAIRS)]
    M, N, K = (int(v) for v in rng.integers(1, [4, 4, 8]))

    def operand(fmt, rows):
        codes = rand_lns_codes(rng, (rows, K), fmt)
        param = rng.integers(fmt.offset_min, fmt.offset_max + 1, size=(rows, K))
        return make_lns(codes, fmt, param, (1, 1))

    x, w = operand(fx, M), operand(fw, N)
    for mac in (MACConfig(), MACConfig(conversion="lut", lut_bits=3), MACConfig(accumulator="fixed", acc_bits=48),
                MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=8)):
        fixed = mac.accumulator == "fixed"
        lsbs = [int(v) for v in rng.integers(-512, 513, size=2)] + [-170, -150, 100] if fixed else [None]
        qr = product_q_range(x, fx, w, fw)
        if fixed and qr:
            lsbs.append(max(-512, min(512, qr[1] - mac.acc_bits + 3)))
        for lsb in lsbs:
            bias = rand_bias(rng, N, fixed, lsb or 0, mac.acc_bits, 1e30) if rng.random() < 0.5 else None
            blist = None if bias is None else bias.tolist()
            y = lns_linear(x.tensor, w.tensor, bias, mac, acc_lsb=lsb)
            check(y, lns_oracle(x.codes, x.full, fx, w.codes, w.full, fw, mac, lsb, blist),
                  describe_lns(x, w, mac, lsb, blist))


def test_lns_linear_leading_dims_and_1d():
    """x of shape (..., K): the leading dims are rows; per-block offsets per leading index."""
    rng = np.random.default_rng(7)
    fmt, K, N, bs = LNSFormat(12, 6), 7, 3, 3
    codes = rand_lns_codes(rng, (2, 3, K), fmt, p_nan=0.02)
    param = rand_offsets(rng, fmt, (2, 3, 3))
    x = LNSTensor(torch_codes(codes, fmt), torch.tensor(param, dtype=torch.int32), fmt, (2, bs))
    w = rand_lns_operand(rng, fmt, "block", N, K, 2)
    for mac, lsb in ((MACConfig(), None), (MACConfig.chip(), -20)):
        y = lns_linear(x, w.tensor, None, mac, acc_lsb=lsb)
        xf = expand_full(param, codes.shape, (2, bs)).reshape(6, K)
        expect = lns_oracle(codes.reshape(6, K), xf, fmt, w.codes, w.full, fmt, mac, lsb).reshape(2, 3, N)
        check(y, expect)
        # 1-D x: one row
        x1 = LNSTensor(torch_codes(codes[1, 2], fmt), torch.tensor(param[1, 2], dtype=torch.int32), fmt, (0, bs))
        y1 = lns_linear(x1, w.tensor, None, mac, acc_lsb=lsb)
        check(y1, expect[1, 2])


# ----------------------------------------------------------------------------------------
# Hand-computed fixed-accumulator cases (spec section 2 steps 3-4, literally)
# ----------------------------------------------------------------------------------------
def from_logs(G, negative=None, fmt=LNS8):
    """x, w (1 x K) whose k-th product has log sum G[k] (blocks of one offset per element).

    Each log value v = E + offset is split with E = E_max (v > 0) or 1, which keeps every
    offset valid for |v| up to the format's range.
    """
    K = len(G)
    negative = negative or [False] * K

    def split(v):
        E = fmt.e_max if v > 0 else 1
        assert fmt.offset_min <= v - E <= fmt.offset_max
        return E, v - E

    xs = [split(g // 2) for g in G]
    ws = [split(g - g // 2) for g in G]
    xc = [[(fmt.nan_code if s else 0) | E for s, (E, _) in zip(negative, xs)]]
    wc = [[E for E, _ in ws]]
    x = LNSTensor(torch_codes(np.array(xc), fmt), torch.tensor([[o for _, o in xs]], dtype=torch.int32), fmt, (1, 1))
    w = LNSTensor(torch_codes(np.array(wc), fmt), torch.tensor([[o for _, o in ws]], dtype=torch.int32), fmt, (1, 1))
    return x, w


def fixed(W=32, conversion="lut", lut_bits=8):
    return MACConfig(conversion=conversion, lut_bits=lut_bits, accumulator="fixed", acc_bits=W)


def one(y) -> float:
    return y.reshape(-1)[0].item()


@pytest.mark.parametrize("G, neg, mac, lsb, bias, expected", [
    # three products of 1.0 into an 8-bit accumulator with LSB 2^-7: each saturates to 127,
    # the sum 381 saturates to 127
    ([0, 0, 0], None, fixed(8), -7, None, 127 / 128),
    ([0, 0, 0], [True] * 3, fixed(8), -7, None, -127 / 128),
    ([0, 0], [False, True], fixed(8), -7, None, 0.0),
    # the bias is added before the final saturation: 381 - 100 -> 281 -> 127 (not 127 - 100)
    ([0, 0, 0], None, fixed(8), -7, -100 / 128, 127 / 128),
    # ... and after the products saturate: 127 + 127 - 200 = 54
    ([0, 0], None, fixed(8), -7, -200 / 128, 54 / 128),
    # a product of 2^-8 truncates to 0 at LSB 2^-7; at 2^-8 it is 1
    ([-64], None, fixed(8), -7, None, 0.0),
    ([-64], None, fixed(8), -8, None, 1 / 256),
    # truncation is toward zero for negative products too
    ([-64, -64, 0], [True, True, False], fixed(16), -7, None, 1.0),
    # LUT F=3, P=8: C[1] = 279/256; G = -1 is q = -1, r = 7: C[7] / 2 = 470/512
    ([1], None, fixed(16), -8, None, 279 / 256),
    ([-1], None, fixed(16), -9, None, 470 / 512),
    ([-1], None, fixed(16), -7, None, 117 / 128),  # floor(117.5)
    # mitchell: C[1] = 9/8; at LSB 2^-2 it truncates to 4/4
    ([1], None, fixed(16, "mitchell"), -3, None, 9 / 8),
    ([1], None, fixed(16, "mitchell"), -2, None, 1.0),
    # exact: C[1] = D[1] = float32(2^(1/8)) with 24 significant bits
    ([1], None, fixed(32, "exact"), -23, None, float(np.float32(2 ** 0.125))),
    ([1], None, fixed(32, "exact"), -20, None, math.floor(float(np.float32(2 ** 0.125)) * 2**20) / 2**20),
    # bias rne(b / 2^lsb): ties to even
    ([0], None, fixed(16), 0, 0.5, 1.0),
    ([0], None, fixed(16), 0, 1.5, 3.0),
    ([0], None, fixed(16), 0, 2.5, 3.0),
    ([0], None, fixed(16), 0, -0.5, 1.0),
    ([0], None, fixed(16), 0, -1.5, -1.0),
    # huge biases saturate, both ways
    ([0], None, fixed(16), -4, 3e38, 32767 / 16),
    ([0], None, fixed(16), -4, -3e38, -32767 / 16),
    ([0], None, fixed(48), -4, math.inf, (2**47 - 1) / 16),
    # acc * 2^lsb rounded to nearest float32: 2^24 + 1 is a tie -> 2^24; 2^24 + 3 -> 2^24 + 4
    ([192, 0], None, fixed(48), 0, None, 2.0**24),
    ([192, 8, 0], None, fixed(48), 0, None, 2.0**24 + 4),
    ([320, 0], None, fixed(48), 0, None, 2.0**40),
    # tiny outputs: 3 * 2^-160 underflows to +-0; 2^-150 is a tie -> 0; 3 * 2^-150 -> 2^-148
    ([-1267], None, fixed(8), -160, None, 0.0),
    ([-1267], [True], fixed(8), -160, None, -0.0),
    ([-1200], None, fixed(8), -150, None, 0.0),
    ([-1187], None, fixed(8), -150, None, 2.0**-148),
    ([-1177], None, fixed(8), -149, None, 3 * 2.0**-149),  # floor(C[7] * 2) = 3: a subnormal
    # outputs beyond float32: 2 * 2^127 = 2^128 -> inf
    ([1024], None, fixed(8), 127, None, math.inf),
    ([1024], [True], fixed(8), 127, None, -math.inf),
    ([1023], None, fixed(8), 127, None, 2.0**127),
])
def test_fixed_accumulator_hand_computed(G, neg, mac, lsb, bias, expected):
    x, w = from_logs(G, neg)
    b = None if bias is None else torch.tensor([bias], dtype=torch.float32)
    y = lns_linear(x, w, b, mac, acc_lsb=lsb)
    assert f32_bits(one(y)) == f32_bits(expected), (one(y), expected)
    # and the oracle agrees with the hand computation
    xo = expand_full(x.offset.numpy(), (1, len(G)), (1, 1))
    wo = expand_full(w.offset.numpy(), (1, len(G)), (1, 1))
    e = lns_oracle(x.codes.numpy(), xo, LNS8, w.codes.numpy(), wo, LNS8, mac, lsb, None if b is None else b.tolist())
    assert f32_bits(e[0, 0][1]) == f32_bits(expected)


def test_float32_accumulator_beyond_float32_range():
    x, w = from_logs([2032, 2032], [False, False])  # 2 * 2^254
    assert one(lns_linear(x, w)) == math.inf
    x, w = from_logs([2032], [True])
    assert one(lns_linear(x, w)) == -math.inf
    x, w = from_logs([-2016, -2016])  # 2 * 2^-252
    assert one(lns_linear(x, w)) == 0.0
    x, w = from_logs([-1192, -1192])  # 2 * 2^-149 = 2^-148, a subnormal
    assert one(lns_linear(x, w)) == 2.0**-148


@pytest.mark.parametrize("mac, lsb", [(MACConfig(), None), (MACConfig.chip(), -12),
                                      (MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=8), -3)])
def test_nan_dominates(mac, lsb):
    """Any NaN operand in a dot product makes it NaN, even against a zero partner, with or
    without bias; other outputs are unaffected."""
    fmt = LNS8
    xc = np.array([[fmt.nan_code, 127, 100], [127, 0, 120], [127, 127, 127]])
    wc = np.array([[0, 127, 127], [127, 127, 127], [127, 127, fmt.nan_code], [0, 0, 0]])
    x = make_lns(xc, fmt, np.array([[-127]]))
    w = make_lns(wc, fmt, np.array([[-120]]))
    bias = torch.tensor([1.0, -2.0, 3.0, 0.5])
    for b in (None, bias):
        y = lns_linear(x.tensor, w.tensor, b, mac, acc_lsb=lsb)
        assert torch.isnan(y[0]).all() and torch.isnan(y[:, 2]).all()
        assert not torch.isnan(y[1:, [0, 1, 3]]).any()
        check(y, lns_oracle(xc, x.full, fmt, wc, w.full, fmt, mac, lsb, None if b is None else b.tolist()))


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------
def _lns(shape, fmt=LNS8, **kw):
    return LNSTensor.from_float(torch.randn(shape), fmt, **kw)


def test_fixed_accumulator_k_limit():
    # acc_bits=48: K * 2^47 < 2^63 holds up to K = 2^16 - 1
    fmt = LNS8
    mac = MACConfig(accumulator="fixed", acc_bits=48)

    def ones(K):
        return LNSTensor(torch.full((1, K), 127, dtype=torch.uint8), torch.tensor([[-127]], dtype=torch.int32), fmt)

    K = 2**16 - 1
    y = lns_linear(ones(K), ones(K), None, mac, acc_lsb=0)
    assert one(y) == K  # 1.0 per product, exact
    with pytest.raises(ValueError, match="accumulator overflow"):
        lns_linear(ones(2**16), ones(2**16), None, mac, acc_lsb=0)
    # conv: the reduction is Cin/groups * kh * kw
    codes, off = torch.full((1, 2**14, 2, 2), 127, dtype=torch.uint8), torch.full((1, 1, 1, 1), -127, dtype=torch.int32)
    xc, wc = LNSTensor(codes, off, fmt), LNSTensor(codes.clone(), off.clone(), fmt)
    with pytest.raises(ValueError, match="accumulator overflow"):
        lns_conv2d(xc, wc, mac=mac, acc_lsb=0)
    assert one(lns_conv2d(xc, wc, mac=MACConfig(accumulator="fixed", acc_bits=47), acc_lsb=0)) == 2**16


def test_argument_errors():
    x, w = _lns((3, 5)), _lns((2, 5))
    with pytest.raises(ValueError, match="acc_lsb"):
        lns_linear(x, w, mac=MACConfig.chip())  # fixed needs acc_lsb
    with pytest.raises(ValueError, match="acc_lsb"):
        lns_linear(x, w, mac=MACConfig(), acc_lsb=-8)  # float32 takes none
    with pytest.raises(ValueError, match="acc_lsb"):
        lns_linear(x, w, mac=MACConfig.chip(), acc_lsb=513)
    for bad in (1.0, True):
        with pytest.raises(TypeError):
            lns_linear(x, w, mac=MACConfig.chip(), acc_lsb=bad)
    with pytest.raises(ValueError, match="frac_bits"):
        lns_linear(x, _lns((2, 5), LNSFormat(8, 4)))
    with pytest.raises(ValueError):
        lns_linear(x, w, torch.zeros(3))  # bias of the wrong length
    with pytest.raises(ValueError):
        lns_linear(x, w, torch.zeros(1, 2))
    with pytest.raises(ValueError):
        lns_linear(x, _lns((2, 4)))  # K differs
    fp8 = FP8Tensor.from_float(torch.randn(2, 5), FP8Format("e4m3"))
    int8 = IntTensor.from_float(torch.randn(2, 5), IntFormat(8))
    for a, b in ((x, fp8), (FP8Tensor.from_float(torch.randn(3, 5), FP8Format("e5m2")), w),
                 (x, int8), (IntTensor.from_float(torch.randn(3, 5), IntFormat(8)), fp8)):
        with pytest.raises(TypeError):
            lns_linear(a, b)
    with pytest.raises(ValueError, match="acc_lsb"):
        lns_linear(FP8Tensor.from_float(torch.randn(3, 5), FP8Format("e4m3")), fp8, acc_lsb=0)
    with pytest.raises(ValueError, match="acc_lsb"):
        lns_linear(IntTensor.from_float(torch.randn(3, 5), IntFormat(8)), int8, mac=MACConfig.chip(), acc_lsb=0)
    with pytest.raises(ValueError):
        lns_linear(x, w, x_block_size=2)  # x is already encoded
    # the same checks through a convolution
    xc, wc = _lns((1, 2, 5, 5)), _lns((3, 2, 3, 3))
    with pytest.raises(ValueError, match="acc_lsb"):
        lns_conv2d(xc, wc, mac=MACConfig.chip())
    with pytest.raises(ValueError, match="acc_lsb"):
        lns_conv2d(xc, wc, acc_lsb=0)
    with pytest.raises(ValueError, match="frac_bits"):
        lns_conv2d(xc, _lns((3, 2, 3, 3), LNSFormat(10, 5)))
    with pytest.raises(ValueError):
        lns_conv2d(xc, wc, torch.zeros(2))
    with pytest.raises(TypeError):
        lns_conv2d(xc, FP8Tensor.from_float(torch.randn(3, 2, 3, 3), FP8Format("e4m3")))
    with pytest.raises(ValueError, match="acc_lsb"):
        lns_conv1d(_lns((1, 2, 5)), _lns((3, 2, 3)), mac=MACConfig.chip())


# ----------------------------------------------------------------------------------------
# Float operands
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mac, lsb", [(MACConfig(), None), (MACConfig.chip(), -16)])
def test_float_operands_are_encoded_per_tensor_in_the_other_format(mac, lsb):
    torch.manual_seed(3)
    xf, wf = torch.randn(4, 9) * 3, torch.randn(5, 9)
    b = torch.randn(5)
    for fmt in (LNSFormat(12, 6), LNSFormat(6, 2, "mitchell")):
        x = LNSTensor.from_float(xf, fmt)
        w = LNSTensor.from_float(wf, fmt, granularity="channel")
        ref = lns_linear(x, LNSTensor.from_float(wf, fmt), b, mac, acc_lsb=lsb)
        check_same_bits(lns_linear(x, wf, b, mac, acc_lsb=lsb), ref)
        check_same_bits(lns_linear(xf, w, b, mac, acc_lsb=lsb),
                        lns_linear(LNSTensor.from_float(xf, fmt), w, b, mac, acc_lsb=lsb))
        check_same_bits(lns_linear(xf.double(), w, b, mac, acc_lsb=lsb),
                        lns_linear(LNSTensor.from_float(xf, fmt), w, b, mac, acc_lsb=lsb))
    check_same_bits(lns_linear(xf, wf, b, mac, acc_lsb=lsb),
                    lns_linear(LNSTensor.from_float(xf, LNS8), LNSTensor.from_float(wf, LNS8), b, mac, acc_lsb=lsb))
    # convolutions: the whole input tensor is encoded per tensor (not per group / receptive field)
    xc = torch.randn(2, 4, 7, 7)
    xc[:, 2:] *= 50  # the groups have different ranges
    xc[0, 0, 1, 1] = 1e3  # skipped by the stride-3 window below, still sets the tensor's offset
    wc = torch.randn(6, 2, 2, 2)
    for kw in (dict(groups=2), dict(groups=2, stride=3, padding=1)):
        w = LNSTensor.from_float(wc, LNS8, granularity="channel")
        check_same_bits(lns_conv2d(xc, w, b[:5].repeat(2)[:6], mac=mac, acc_lsb=lsb, **kw),
                        lns_conv2d(LNSTensor.from_float(xc, LNS8), w, b[:5].repeat(2)[:6], mac=mac, acc_lsb=lsb, **kw))
        x = LNSTensor.from_float(xc, LNS8)
        check_same_bits(lns_conv2d(x, wc, None, mac=mac, acc_lsb=lsb, **kw),
                        lns_conv2d(x, LNSTensor.from_float(wc, LNS8), None, mac=mac, acc_lsb=lsb, **kw))
        check_same_bits(lns_conv2d(xc, wc, None, mac=mac, acc_lsb=lsb, **kw),
                        lns_conv2d(x, LNSTensor.from_float(wc, LNS8), None, mac=mac, acc_lsb=lsb, **kw))
    x1 = torch.randn(2, 4, 9)
    x1[:, :2] *= 100
    w1 = LNSTensor.from_float(torch.randn(4, 2, 3), LNS8)
    check_same_bits(lns_conv1d(x1, w1, None, 1, 1, 1, 2, mac, acc_lsb=lsb),
                    lns_conv1d(LNSTensor.from_float(x1, LNS8), w1, None, 1, 1, 1, 2, mac, acc_lsb=lsb))


def test_float_operands_fp8_and_int():
    torch.manual_seed(4)
    xf, wf = torch.randn(3, 10), torch.randn(4, 10)
    for fmt in (FP8Format("e4m3"), FP8Format("e5m2"), IntFormat(8), IntFormat(4)):
        cls = FP8Tensor if isinstance(fmt, FP8Format) else IntTensor
        w = cls.from_float(wf, fmt, granularity="channel")
        check_same_bits(lns_linear(xf, w), lns_linear(cls.from_float(xf, fmt), w))
        x = cls.from_float(xf, fmt)
        check_same_bits(lns_linear(x, wf), lns_linear(x, cls.from_float(wf, fmt)))


@pytest.mark.parametrize("mac, lsb", [(MACConfig(), None), (MACConfig.chip(), -18)])
def test_dynamic_block_activations_linear(mac, lsb):
    torch.manual_seed(5)
    # a narrow format (LNS6, F=2: 7.75 octaves) and data spanning ~26 octaves, so that the
    # choice of offsets matters
    xf = torch.randn(2, 3, 11) * torch.logspace(-4, 4, 11)
    w = LNSTensor.from_float(torch.randn(4, 11), LNSFormat(6, 2), granularity="block", block_size=4)
    b = torch.randn(4)
    for bs in (1, 3, 4, 11, 16):
        ref = lns_linear(LNSTensor.from_float(xf, w.fmt, granularity="block", block_size=bs), w, b, mac, acc_lsb=lsb)
        check_same_bits(lns_linear(xf, w, b, mac, acc_lsb=lsb, x_block_size=bs), ref)
    for fmt in (FP8Format("e4m3"), IntFormat(8)):
        cls = FP8Tensor if isinstance(fmt, FP8Format) else IntTensor
        wq = cls.from_float(torch.randn(4, 11), fmt, granularity="block", block_size=3)
        for bs in (2, 5):
            check_same_bits(lns_linear(xf, wq, b, x_block_size=bs),
                            lns_linear(cls.from_float(xf, fmt, granularity="block", block_size=bs), wq, b))


# ----------------------------------------------------------------------------------------
# F.linear / torch.matmul / F.conv* on LNSTensors use the default MAC
# ----------------------------------------------------------------------------------------
def test_torch_functions_dispatch_to_the_default_mac():
    torch.manual_seed(6)
    fmt = LNSFormat(12, 6)
    x = LNSTensor.from_float(torch.randn(2, 3, 8), fmt)
    w = LNSTensor.from_float(torch.randn(5, 8), fmt, granularity="channel")
    b = torch.randn(5)
    check_same_bits(F.linear(x, w, b), lns_linear(x, w, b))
    check_same_bits(F.linear(x, w), lns_linear(x, w))
    check_same_bits(F.linear(x, weight=w, bias=b), lns_linear(x, w, b))
    # matmul(a, B) with B of shape (K, N) is linear with weight B^T
    wt = LNSTensor(w.codes.t().contiguous(), w.offset.t().contiguous(), fmt)
    x2 = LNSTensor.from_float(torch.randn(4, 8), fmt, granularity="block", block_size=3)
    for a in (x, x2):
        check_same_bits(torch.matmul(a, wt), lns_linear(a, w))
        check_same_bits(a @ wt, lns_linear(a, w))
        check_same_bits(a.matmul(wt), lns_linear(a, w))
    x1 = LNSTensor.from_float(torch.randn(8), fmt)
    check_same_bits(torch.matmul(x1, wt), lns_linear(x1, w))
    # a float right operand is encoded in the LNS operand's format
    wf = torch.randn(8, 5)
    check_same_bits(torch.matmul(x2, wf), lns_linear(x2, LNSTensor.from_float(wf.t().contiguous(), fmt)))
    # convolutions
    xc = LNSTensor.from_float(torch.randn(2, 4, 6, 5), fmt, granularity="channel", axis=1)
    wc = LNSTensor.from_float(torch.randn(6, 2, 3, 2), fmt, granularity="channel")
    bc = torch.randn(6)
    kw = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    check_same_bits(F.conv2d(xc, wc, bc, **kw), lns_conv2d(xc, wc, bc, **kw))
    check_same_bits(F.conv2d(xc, wc, bc, (2, 1), 1, (1, 2), 2), lns_conv2d(xc, wc, bc, **kw))
    check_same_bits(F.conv2d(xc, wc, padding="same", groups=2), lns_conv2d(xc, wc, padding="same", groups=2))
    xcl = xc.contiguous(memory_format=torch.channels_last)
    assert not xcl.codes.is_contiguous()
    check_same_bits(F.conv2d(xcl, wc, bc, **kw), lns_conv2d(xc, wc, bc, **kw))
    x1d = LNSTensor.from_float(torch.randn(2, 4, 9), fmt)
    w1d = LNSTensor.from_float(torch.randn(4, 4, 3), fmt, granularity="channel")
    check_same_bits(F.conv1d(x1d, w1d, bc[:4], stride=2, padding=2, dilation=2),
                    lns_conv1d(x1d, w1d, bc[:4], stride=2, padding=2, dilation=2))
    check_same_bits(F.conv1d(x1d, w1d), lns_conv1d(x1d, w1d))


def test_reference_speed_chip_mac():
    """Performance sanity (no timing assertion): M, K, N = 64, 256, 64 with the chip MAC."""
    torch.manual_seed(8)
    x = LNSTensor.from_float(torch.randn(64, 256), LNS8, granularity="block", block_size=32)
    w = LNSTensor.from_float(torch.randn(64, 256), LNS8, granularity="channel")
    t0 = time.perf_counter()
    y = lns_linear(x, w, torch.randn(64), MACConfig.chip(), acc_lsb=-16)
    elapsed = time.perf_counter() - t0
    assert y.shape == (64, 64) and torch.isfinite(y).all()
    print(f"lns_linear 64x256x64 chip MAC: {elapsed * 1e3:.1f} ms")
    # spot-check two rows against the oracle
    xo = expand_full(x.offset.numpy(), (64, 256), (1, 32))
    wo = expand_full(w.offset.numpy(), (64, 256), None)
    e = lns_oracle(x.codes.numpy()[:2], xo[:2], LNS8, w.codes.numpy()[:8], wo[:8], LNS8, MACConfig.chip(), -16)
    check(lns_linear(x, w, None, MACConfig.chip(), acc_lsb=-16)[:2, :8].contiguous(), e)


# ========================================================================================
# FP8 and INT
# ========================================================================================
SCALED_FORMAT_PAIRS = {
    "e4m3": (FP8Format("e4m3"), FP8Format("e4m3")),
    "e5m2": (FP8Format("e5m2"), FP8Format("e5m2")),
    "e4m3xe5m2": (FP8Format("e4m3"), FP8Format("e5m2")),
    "e5m2xe4m3": (FP8Format("e5m2"), FP8Format("e4m3")),
    "int8": (IntFormat(8), IntFormat(8)),
    "int4": (IntFormat(4), IntFormat(4)),
    "int8xint4": (IntFormat(8), IntFormat(4)),
}


def is_special_fp8(code: int, variant: str) -> bool:
    return not math.isfinite(fp8_value(code, variant))


def rand_scaled_codes(rng, shape, fmt, p_special=0.0) -> np.ndarray:
    if isinstance(fmt, IntFormat):
        return rng.integers(-fmt.qmax, fmt.qmax + 1, size=shape)
    c = rng.integers(0, 256, size=shape)
    special = np.vectorize(lambda v: is_special_fp8(int(v), fmt.variant))(c)
    c[special] = c[special] & 0x87  # a finite code of the same sign
    u = rng.random(shape)
    c[u < 0.1] = 0
    if p_special:
        specials = [0x7F, 0xFF] + ([0x7C, 0xFC, 0x7D] if fmt.variant == "e5m2" else [])
        pick = u > 1 - p_special
        c[pick] = rng.choice(specials, size=int(pick.sum()))
    return c


def rand_scales(rng, shape) -> np.ndarray:
    s = rng.uniform(1, 2, size=shape) * 2.0 ** rng.integers(-8, 9, size=shape)
    return s.astype(np.float32)


def scaled_values(codes: np.ndarray, fmt) -> np.ndarray:
    if isinstance(fmt, IntFormat):
        return np.asarray(codes, dtype=np.float64)
    return np.vectorize(lambda c: fmt_value_cached(int(c) & 0xFF, fmt.variant), otypes=[np.float64])(codes)


@lru_cache(maxsize=None)
def fmt_value_cached(code, variant):
    return fp8_value(code, variant)


def make_scaled(codes, fmt, scale, block=None):
    cls = FP8Tensor if isinstance(fmt, FP8Format) else IntTensor
    t = cls(torch.tensor(np.asarray(codes)).to(fmt.code_dtype), torch.tensor(np.asarray(scale), dtype=torch.float32),
            fmt, block)
    return Operand(t, np.asarray(codes), expand_full(scale, codes.shape, block))


def run_scaled_linear_case(seed, fx, fw, xgran, wgran, p_special=0.0):
    rng = np.random.default_rng(seed)
    M, N = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    K = 1 if rng.random() < 0.15 else int(rng.integers(1, 14))
    bx, bw = int(rng.integers(1, K + 3)), int(rng.integers(1, K + 3))
    xb = (1, bx) if xgran.startswith("block") else None
    wb = (1, bw) if wgran.startswith("block") else None
    x = make_scaled(rand_scaled_codes(rng, (M, K), fx, p_special), fx,
                    rand_scales(rng, param_shape(xgran, M, K, bx)), xb)
    w = make_scaled(rand_scaled_codes(rng, (N, K), fw, p_special), fw,
                    rand_scales(rng, param_shape(wgran, N, K, bw)), wb)
    bias = torch.tensor(rng.standard_normal(N) * 100, dtype=torch.float32) if rng.random() < 0.5 else None
    y = lns_linear(x.tensor, w.tensor, bias)
    expect = scaled_oracle(scaled_values(x.codes, fx), x.full, bx if xb else None,
                           scaled_values(w.codes, fw), w.full, bw if wb else None,
                           isinstance(fx, IntFormat), None if bias is None else bias.tolist())

    def describe(idx):
        m, n = idx
        return (f"x row {m}: codes {x.codes[m].tolist()} scales {x.full[m].tolist()} ({x.tensor!r})\n"
                f"w row {n}: codes {w.codes[n].tolist()} scales {w.full[n].tolist()} ({w.tensor!r})\n"
                f"bias {None if bias is None else bias[n].item()!r}")

    check(y, expect, describe)


@pytest.mark.parametrize("wgran", W_GRANS)
@pytest.mark.parametrize("xgran", X_GRANS)
@pytest.mark.parametrize("pair", list(SCALED_FORMAT_PAIRS))
def test_fp8_int_linear(pair, xgran, wgran):
    fx, fw = SCALED_FORMAT_PAIRS[pair]
    base = 100 * (list(SCALED_FORMAT_PAIRS).index(pair) * 12 + X_GRANS.index(xgran) * 3 + W_GRANS.index(wgran))
    for j in range(3):
        run_scaled_linear_case(base + j, fx, fw, xgran, wgran, p_special=0.05 if j == 2 else 0.0)


SCALED_SPACE = list(itertools.product(SCALED_FORMAT_PAIRS, X_GRANS, W_GRANS, range(8)))


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep(SCALED_SPACE, 120, seed=3), ids=lambda c: "-".join(map(str, c)))
def test_fp8_int_linear_sweep(case):
    pair, xg, wg, j = case
    fx, fw = SCALED_FORMAT_PAIRS[pair]
    run_scaled_linear_case(10**6 + SCALED_SPACE.index(case), fx, fw, xg, wg, p_special=0.05 * (j % 2))


def test_int_exact_formula_hand_computed():
    """INT: y = float32(float32(acc) * float32(s_x * s_w)) + b, with acc beyond 2^24."""
    fmt = IntFormat(16)
    sx, sw = np.float32(0.1), np.float32(0.3)
    x = IntTensor(torch.tensor([[32767, 1, -5]], dtype=torch.int16), torch.tensor([[sx]]), fmt)
    w = IntTensor(torch.tensor([[32767, 1, 7]], dtype=torch.int16), torch.tensor([[sw]]), fmt)
    acc = 32767 * 32767 + 1 - 35
    b = np.float32(-1e8)
    expected = np.float32(np.float32(acc) * np.float32(sx * sw)) + b
    y = lns_linear(x, w, torch.tensor([b]))
    assert f32_bits(one(y)) == f32_bits(float(expected))
    assert float(np.float32(acc)) != acc  # float32(acc) really rounds here


def test_int_output_sign_of_zero():
    """y = float32(acc) * (s_x * s_w): when s_x * s_w underflows to 0 in float32, a negative
    acc gives -0.0 (spec section 5 read literally, IEEE multiplication)."""
    fmt = IntFormat(8)
    x = IntTensor(torch.tensor([[-3, 1]], dtype=torch.int8), torch.tensor([[2.0**-80]]), fmt)
    w = IntTensor(torch.tensor([[1, 1], [-1, 0]], dtype=torch.int8), torch.tensor([[2.0**-80]]), fmt)
    expected = [float(np.float32(-2.0) * np.float32(0.0)), float(np.float32(3.0) * np.float32(0.0))]
    assert [f32_bits(v) for v in expected] == [-(2**31), 0]  # -0.0, +0.0
    y = lns_linear(x, w)
    assert [f32_bits(v) for v in y.reshape(-1).tolist()] == [f32_bits(v) for v in expected], y


def test_int_k_limit():
    fmt = IntFormat(16)  # K * 32767^2 >= 2^53: the float64 sum might not be exact
    K = math.ceil(2**53 / 32767**2)
    x = IntTensor(torch.zeros(1, K, dtype=torch.int16), torch.tensor([[1.0]]), fmt)
    with pytest.raises(ValueError, match="accumulator overflow"):
        lns_linear(x, x)


# ========================================================================================
# Convolutions
# ========================================================================================
def conv_geometry(nd, kernel, stride, padding, dilation):
    """PyTorch's conv arguments -> 2-D (stride, [(before, after)] * 2, dilation, kernel)."""
    def tup(v):
        return (v,) * nd if isinstance(v, int) else tuple(v)

    stride, dilation = tup(stride), tup(dilation)
    if padding == "valid":
        pads = [(0, 0)] * nd
    elif padding == "same":  # the odd element of padding goes after, as PyTorch does
        pads = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k, d in zip(kernel, dilation)]
    else:
        pads = [(p, p) for p in tup(padding)]
    if nd == 1:
        return (1, *stride), [(0, 0), *pads], (1, *dilation), (1, *kernel)
    return stride, pads, dilation, tuple(kernel)


def receptive_fields(C, H, W, kernel, stride, pads, dilation, groups):
    """Naive im2col: fields[g][(oh, ow)] = [(c, ih, iw) or None (padding)] in (c, i, j) order."""
    kh, kw = kernel
    Ho = (H + sum(pads[0]) - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + sum(pads[1]) - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    Cg = C // groups
    fields = []
    for g in range(groups):
        fg = {}
        for oh in range(Ho):
            for ow in range(Wo):
                f = []
                for c in range(g * Cg, (g + 1) * Cg):
                    for i in range(kh):
                        for j in range(kw):
                            ih = oh * stride[0] - pads[0][0] + i * dilation[0]
                            iw = ow * stride[1] - pads[1][0] + j * dilation[1]
                            f.append((c, ih, iw) if 0 <= ih < H and 0 <= iw < W else None)
                fg[oh, ow] = f
        fields.append(fg)
    return Ho, Wo, fields


def gather_rows(arr4, fields_g, Nb, Ho, Wo, pad):
    """(Nb*Ho*Wo, Kg) matrix of arr4 (Nb, C, H, W) over the receptive fields of one group."""
    rows = []
    for b in range(Nb):
        for oh in range(Ho):
            for ow in range(Wo):
                row = []
                for f in fields_g[oh, ow]:
                    row.append(pad if f is None else arr4[b, f[0], f[1], f[2]])
                rows.append(row)
    return np.array(rows, dtype=arr4.dtype).reshape(len(rows), -1)


def conv_oracle(x4, xp4, w4, wp4, geometry, groups, bias, oracle_fn):
    """Generic conv oracle: the linear oracle on each group's explicit receptive fields.

    x4/xp4: codes and per-element parameters (Nb, C, H, W); w4/wp4: (Cout, Cin_g, kh, kw).
    ``oracle_fn(xr, xpr, wr, wpr, bias_g)`` is the linear oracle for one group.
    """
    stride, pads, dilation, kernel = geometry
    Nb, C, H, W = x4.shape
    Cout = w4.shape[0]
    Ho, Wo, fields = receptive_fields(C, H, W, kernel, stride, pads, dilation, groups)
    out = np.empty((Nb, Cout, Ho, Wo), dtype=object)
    Cg = Cout // groups
    mats = []
    for g in range(groups):
        xr = gather_rows(x4, fields[g], Nb, Ho, Wo, 0)
        # padding is the zero code (value 0); its parameter is irrelevant to the product but
        # must not split an FP8/INT segment, so it repeats the first (per-tensor) one
        xpr = gather_rows(xp4, fields[g], Nb, Ho, Wo, xp4.reshape(-1)[0])
        wr = w4[g * Cg:(g + 1) * Cg].reshape(Cg, -1)
        wpr = wp4[g * Cg:(g + 1) * Cg].reshape(Cg, -1)
        e = oracle_fn(xr, xpr, wr, wpr, None if bias is None else bias[g * Cg:(g + 1) * Cg])
        out[:, g * Cg:(g + 1) * Cg] = e.reshape(Nb, Ho, Wo, Cg).transpose(0, 3, 1, 2)
        mats.append((xr, xpr, wr, wpr))

    def describe(idx):
        b, oc, oh, ow = idx
        g = oc // Cg
        row = (b * Ho + oh) * Wo + ow
        xr, xpr, wr, wpr = mats[g]
        return (f"group {g}: x field codes {xr[row].tolist()} params {xpr[row].tolist()}\n"
                f"w[{oc}] codes {wr[oc - g * Cg].tolist()} params {wpr[oc - g * Cg].tolist()}")

    return out, describe


CONV_CONFIGS = [
    # (nd, x shape, w shape, stride, padding, dilation, groups)
    (2, (2, 3, 5, 6), (4, 3, 3, 3), 1, 0, 1, 1),
    (2, (1, 4, 6, 5), (4, 2, 3, 2), (2, 1), (1, 2), 1, 2),
    (2, (2, 4, 5, 5), (4, 1, 3, 3), 1, "same", (2, 1), 4),  # depthwise
    (2, (1, 2, 7, 7), (3, 2, 2, 3), 3, 1, 2, 1),  # stride > kernel: skipped inputs
    (2, (3, 4, 4), (6, 3, 1, 1), 1, "valid", 1, 1),  # unbatched
    (2, (1, 2, 4, 4), (2, 2, 2, 2), 1, "same", 1, 1),  # even kernel: asymmetric 'same'
    (2, (1, 3, 5, 4), (6, 1, 3, 3), 1, 1, 1, 3),  # depthwise with multiplier 2
    (1, (2, 3, 9), (4, 3, 3), 2, 1, 1, 1),
    (1, (4, 8), (4, 2, 2), 1, "same", 3, 2),  # unbatched
    (1, (1, 4, 7), (4, 1, 3), 1, "valid", 2, 4),  # depthwise
    (1, (2, 2, 6), (2, 2, 4), 1, (2,), 1, 1),
]
CONV_MACS = [
    (MACConfig(), None),
    (MACConfig.chip(), "mid"),
    (MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=16), "sat"),
    (MACConfig(conversion="lut", lut_bits=4), None),
    (MACConfig(accumulator="fixed", acc_bits=48), "trunc"),
]
X_CONV_LAYOUTS = ["contiguous", "channels_last", "permuted", "sliced"]
X_CONV_GRANS = ["tensor", "channel", "block-channels", "block-last", "element"]
W_CONV_GRANS = ["tensor", "channel", "block-in", "block-last"]


def as4d(a, nd, unbatched):
    if unbatched:
        a = a[None]
    return a[:, :, None] if nd == 1 else a


def idx4(idx, nd, unbatched):
    """An output index of the op -> the (b, oc, oh, ow) index of the oracle."""
    idx = tuple(idx)
    if unbatched:
        idx = (0, *idx)
    return (*idx[:2], 0, *idx[2:]) if nd == 1 else idx


def lns_conv_param(rng, fmt, shape, gran, channel_axis, block_axis):
    """(compact param, block) for an LNS conv operand of ``shape``."""
    nd = len(shape)
    one = [1] * nd
    if gran == "tensor":
        ps, block = one, None
    elif gran == "channel":
        ps, block = [shape[d] if d == channel_axis else 1 for d in range(nd)], None
    elif gran == "element":
        ps, block = list(shape), None
    else:
        axis = block_axis if gran in ("block-channels", "block-in") else nd - 1
        bs = int(rng.integers(1, shape[axis] + 2))
        ps = [-(-shape[d] // bs) if d == axis else (shape[d] if rng.random() < 0.5 else 1) for d in range(nd)]
        block = (axis, bs)
    return rand_offsets(rng, fmt, tuple(ps), 1), block


def lay_out(codes: torch.Tensor, layout: str, rng) -> torch.Tensor:
    """The same logical codes in another memory layout (non-contiguous where possible)."""
    if layout == "contiguous":
        return codes
    if layout == "channels_last":
        if codes.dim() == 4:
            return codes.contiguous(memory_format=torch.channels_last)
        return codes.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "permuted":
        perm = list(range(codes.dim()))[::-1]
        inv = list(np.argsort(perm))
        return codes.permute(perm).contiguous().permute(inv)
    # sliced: a strided view into a bigger buffer
    big = torch.zeros([2 * s for s in codes.shape], dtype=codes.dtype)
    view = big[tuple(slice(None, None, 2) for _ in codes.shape)]
    view.copy_(codes)
    return view


def run_lns_conv_case(seed, cfg, mac, regime, xlayout, xgran, wgran, fx=LNS8, fw=LNS8):
    rng = np.random.default_rng(seed)
    nd, xshape, wshape, stride, padding, dilation, groups = cfg
    unbatched = len(xshape) == nd + 1
    xc = rand_lns_codes(rng, xshape, fx, p_nan=0.01 if rng.random() < 0.3 else 0.0)
    wc = rand_lns_codes(rng, wshape, fw)
    xp, xb = lns_conv_param(rng, fx, xshape, xgran, 0 if unbatched else 1, 0 if unbatched else 1)
    wp, wb = lns_conv_param(rng, fw, wshape, wgran, 0, 1)
    x = LNSTensor(lay_out(torch_codes(xc, fx), xlayout, rng), torch.tensor(xp, dtype=torch.int32), fx, xb)
    w = LNSTensor(torch_codes(wc, fw), torch.tensor(wp, dtype=torch.int32), fw, wb)
    xfull, wfull = expand_full(xp, xshape, xb), expand_full(wp, wshape, wb)
    geometry = conv_geometry(nd, wshape[2:], stride, padding, dilation)
    x4, xp4 = as4d(xc, nd, unbatched), as4d(xfull, nd, unbatched)
    w4, wp4 = as4d(wc, nd, False), as4d(wfull, nd, False)
    acc_lsb = None
    if regime is not None:  # acc_lsb from the range of the log values of the whole problem
        _, xE = lns_fields(x4, fx)
        _, wE = lns_fields(w4, fw)
        if (xE != 0).any() and (wE != 0).any():
            gx, gw = (xE + xp4)[xE != 0], (wE + wp4)[wE != 0]
            qr = (int(gx.min() + gw.min()) >> fx.frac_bits, int(gx.max() + gw.max()) >> fx.frac_bits)
        else:
            qr = None
        acc_lsb = choose_acc_lsb(rng, qr, mac.acc_bits, regime)
    fixed = mac.accumulator == "fixed"
    bias = rand_bias(rng, wshape[0], fixed, acc_lsb or 0, mac.acc_bits, 2.0) if rng.random() < 0.6 else None
    op = lns_conv2d if nd == 2 else lns_conv1d
    y = op(x, w, bias, stride, padding, dilation, groups, mac, acc_lsb=acc_lsb)

    def lin(xr, xpr, wr, wpr, b):
        return lns_oracle(xr, xpr, fx, wr, wpr, fw, mac, acc_lsb, None if b is None else list(b))

    expect, describe = conv_oracle(x4, xp4, w4, wp4, geometry, groups, None if bias is None else bias.tolist(), lin)
    if nd == 1:
        expect = expect[:, :, 0]
    if unbatched:
        expect = expect[0]
    # the geometry of the oracle is PyTorch's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'same' with an even kernel
        ref_shape = (F.conv2d if nd == 2 else F.conv1d)(torch.zeros(xshape), torch.zeros(wshape), None, stride,
                                                         padding, dilation, groups).shape
    assert expect.shape == tuple(ref_shape)
    check(y, expect,
          lambda idx: f"mac={mac!r} acc_lsb={acc_lsb} x={x!r} w={w!r}\n" + describe(idx4(idx, nd, unbatched)))


@pytest.mark.parametrize("ci", range(len(CONV_CONFIGS)))
def test_lns_conv(ci):
    """Every conv config with rotating MAC, input layout and offset granularities."""
    cfg = CONV_CONFIGS[ci]
    for j in range(2):
        mac, regime = CONV_MACS[(ci + j) % len(CONV_MACS)]
        run_lns_conv_case(ci * 10 + j, cfg, mac, regime, X_CONV_LAYOUTS[(ci + j) % 4],
                          X_CONV_GRANS[(ci + 2 * j) % 5], W_CONV_GRANS[(ci + 3 * j) % 4])


CONV_SPACE = list(itertools.product(range(len(CONV_CONFIGS)), range(len(CONV_MACS)), X_CONV_GRANS, W_CONV_GRANS))


@pytest.mark.slow
@pytest.mark.parametrize("case", sweep(CONV_SPACE, 60, seed=4), ids=lambda c: f"cfg{c[0]}-mac{c[1]}-{c[2]}-{c[3]}")
def test_lns_conv_sweep(case):
    ci, mi, xg, wg = case
    i = CONV_SPACE.index(case)
    mac, regime = CONV_MACS[mi]
    fmts = [(LNS8, LNS8), (LNSFormat(12, 6), LNSFormat(12, 6)), (LNSFormat(6, 2), LNSFormat(6, 2)),
            (LNSFormat(10, 3), LNS8), (LNSFormat(16, 10), LNSFormat(16, 10))]
    fx, fw = fmts[i % len(fmts)]
    run_lns_conv_case(10**5 + i, CONV_CONFIGS[ci], mac, regime, X_CONV_LAYOUTS[i % 4], xg, wg, fx, fw)


@pytest.mark.parametrize("mac, lsb", [(MACConfig(), None), (MACConfig.chip(), -14),
                                      (MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=16), -6)])
@pytest.mark.parametrize("nd", [1, 2])
def test_conv_dynamic_block_activations(nd, mac, lsb):
    """x_block_size with a float x: each receptive field (per group, padding included as 0)
    is encoded per block along its Cin/groups * kernel reduction axis."""
    torch.manual_seed(10 + nd)
    fmt = LNSFormat(6, 2)  # narrow (7.75 octaves), so that per-block offsets matter
    if nd == 2:
        xf = torch.randn(2, 4, 5, 5) * torch.logspace(-4, 4, 5)
        wf, kw = torch.randn(6, 2, 3, 2), dict(stride=(1, 2), padding=1, dilation=1, groups=2)
    else:
        xf = torch.randn(2, 4, 9) * torch.logspace(-4, 4, 9)
        wf, kw = torch.randn(4, 4, 3), dict(stride=2, padding=2, dilation=2, groups=1)
    w = LNSTensor.from_float(wf, fmt, granularity="channel")
    bias = torch.randn(wf.shape[0])
    op = lns_conv2d if nd == 2 else lns_conv1d
    for bs in (1, 4, 5, 100):
        y = op(xf, w, bias, mac=mac, acc_lsb=lsb, x_block_size=bs, **kw)

        def lin(xr, xpr, wr, wpr, b):
            # xr holds float32 receptive fields: encode each row per block myself
            xt = LNSTensor.from_float(torch.tensor(xr, dtype=torch.float32), fmt, granularity="block", block_size=bs)
            xo = expand_full(xt.offset.numpy(), xr.shape, (1, bs))
            return lns_oracle(xt.codes.numpy(), xo, fmt, wr, wpr, fmt, mac, lsb, None if b is None else list(b))

        geometry = conv_geometry(nd, wf.shape[2:], kw["stride"], kw["padding"], kw["dilation"])
        x4 = as4d(xf.numpy().astype(np.float32), nd, False)
        w4 = as4d(w.codes.numpy(), nd, False)
        wp4 = as4d(expand_full(w.offset.numpy(), wf.shape, None), nd, False)
        expect, describe = conv_oracle(x4, np.zeros(x4.shape, np.int64), w4, wp4, geometry, kw["groups"],
                                       bias.tolist(), lin)
        check(y, expect[:, :, 0] if nd == 1 else expect, lambda idx: describe(idx4(idx, nd, False)))


@pytest.mark.parametrize("fmt_pair", ["e4m3", "e4m3xe5m2", "int8", "int8xint4"])
def test_fp8_int_conv(fmt_pair):
    """FP8/INT convolutions: per-tensor x (or dynamic blocks), per-tensor/channel/block w;
    blocks of weight channels are runs of wbs * kh * kw along K (the segment rule)."""
    fx, fw = SCALED_FORMAT_PAIRS[fmt_pair]
    is_int = isinstance(fx, IntFormat)
    rng = np.random.default_rng(11)
    cls_x = FP8Tensor if isinstance(fx, FP8Format) else IntTensor
    fdyn = fw  # a float x is encoded in the weight's format
    xshape, wshape, kw = (2, 4, 5, 5), (6, 2, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=1, groups=2)
    geometry = conv_geometry(2, wshape[2:], kw["stride"], kw["padding"], kw["dilation"])
    for case, (wgran, xdyn) in enumerate(itertools.product(["tensor", "channel", "block-in"], [None, 3])):
        wc = rand_scaled_codes(rng, wshape, fw)
        if wgran == "tensor":
            wsc, wb, kblk = rand_scales(rng, (1, 1, 1, 1)), None, None
        elif wgran == "channel":
            wsc, wb, kblk = rand_scales(rng, (6, 1, 1, 1)), None, None
        else:
            wsc, wb, kblk = rand_scales(rng, (6, 2, 1, 1)), (1, 1), 1 * 3 * 2  # one channel per block
        w = make_scaled(wc, fw, wsc, wb)
        bias = torch.tensor(rng.standard_normal(6) * 10, dtype=torch.float32)
        xf = torch.tensor(rng.standard_normal(xshape) * 4, dtype=torch.float32)
        if xdyn is None:
            x = cls_x.from_float(xf, fx)
            y = lns_conv2d(x, w.tensor, bias, **kw)
            xv4 = scaled_values(x.codes.numpy(), fx)
            xs4 = np.broadcast_to(x.scale.numpy(), xshape)
        else:
            y = lns_conv2d(xf, w.tensor, bias, x_block_size=xdyn, **kw)
            xv4, xs4 = xf.numpy(), np.zeros(xshape, np.float32)

        def lin(xr, xsr, wr, wsr, b):
            if xdyn is not None:  # dynamic blocks: encode each receptive field per block
                xt = cls_x.from_float(torch.tensor(xr, dtype=torch.float32), fdyn, granularity="block", block_size=xdyn)
                xr = scaled_values(xt.codes.numpy(), fdyn)
                xsr = expand_full(xt.scale.numpy(), xr.shape, (1, xdyn))
            return scaled_oracle(xr, xsr, xdyn, scaled_values(wr, fw), wsr, kblk, is_int, list(b))

        wfull = expand_full(wsc, wshape, wb)
        expect, describe = conv_oracle(xv4, xs4, wc, wfull, geometry, kw["groups"], bias.tolist(), lin)
        check(y, expect, describe)


def test_large_conv_and_linear_against_torch_on_dequantized():
    """Ideal MAC, exact conversion: F.conv2d / F.linear on the decoded operands agree within
    the float32 bound (the product 2^q D[r] differs from D[r_a] D[r_w] 2^(q_a+q_w) only by
    the float32 rounding of the table, a relative 2^-23)."""
    torch.manual_seed(12)
    fmt = LNSFormat(12, 6)
    x = LNSTensor.from_float(torch.randn(2, 8, 14, 13), fmt, granularity="channel", axis=1)
    w = LNSTensor.from_float(torch.randn(16, 4, 3, 3), fmt, granularity="channel")
    b = torch.randn(16)
    kw = dict(stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2)
    y = lns_conv2d(x, w, b, **kw)
    xd, wd = x.dequantize().double(), w.dequantize().double()
    ref = F.conv2d(xd, wd, b.double(), **kw)
    S = F.conv2d(xd.abs(), wd.abs(), None, **kw)
    K = 4 * 9
    tol = (K + 4) * 2.0**-23 * S + 2.0**-24 * ref.abs()
    assert ((y.double() - ref).abs() <= tol).all()
    # FP8 likewise (products exact, scale per tensor)
    xq = FP8Tensor.from_float(torch.randn(2, 8, 14, 13), FP8Format("e4m3"))
    wq = FP8Tensor.from_float(torch.randn(16, 4, 3, 3), FP8Format("e4m3"), granularity="channel")
    yq = lns_conv2d(xq, wq, b, **kw)
    xd, wd = xq.dequantize().double(), wq.dequantize().double()
    ref = F.conv2d(xd, wd, b.double(), **kw)
    S = F.conv2d(xd.abs(), wd.abs(), None, **kw)
    assert ((yq.double() - ref).abs() <= (K + 4) * 2.0**-23 * S + 2.0**-24 * ref.abs()).all()
    # linear, per-block offsets
    xl = LNSTensor.from_float(torch.randn(16, 200), fmt, granularity="block", block_size=32)
    wl = LNSTensor.from_float(torch.randn(24, 200), fmt, granularity="block", block_size=48)
    yl = lns_linear(xl, wl, b[:8].repeat(3))
    xd, wd = xl.dequantize().double(), wl.dequantize().double()
    ref = F.linear(xd, wd, b[:8].repeat(3).double())
    S = F.linear(xd.abs(), wd.abs())
    assert ((yl.double() - ref).abs() <= (200 + 4) * 2.0**-23 * S + 2.0**-24 * ref.abs()).all()


def test_linear_empty_reduction():
    """K = 0: an empty dot product is 0, so y is the bias (as F.linear)."""
    x = LNSTensor(torch.zeros(3, 0, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.int32), LNS8)
    w = LNSTensor(torch.zeros(2, 0, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.int32), LNS8)
    b = torch.tensor([1.5, -2.0])
    assert torch.equal(lns_linear(x, w, b), b.expand(3, 2))
    assert torch.equal(lns_linear(x, w, b, MACConfig.chip(), acc_lsb=-4), b.expand(3, 2))


def test_fixed_accumulator_nan_bias_gives_nan_and_inf_bias_saturates():
    # A NaN bias has no integer value: its outputs are NaN, as with the float32 accumulator.
    x = LNSTensor.from_float(torch.randn(3, 8), LNS8)
    w = LNSTensor.from_float(torch.randn(4, 8), LNS8)
    bias = torch.tensor([0.5, math.nan, math.inf, -math.inf])
    y = lns_linear(x, w, bias, MACConfig.chip(), acc_lsb=-8)
    T = 2.0**31 - 1
    assert torch.isnan(y[:, 1]).all() and not torch.isnan(y[:, [0, 2, 3]]).any()
    assert (y[:, 2] == T * 2.0**-8).all() and (y[:, 3] == -T * 2.0**-8).all()
    assert torch.isnan(lns_linear(x, w, bias)[:, 1]).all()
