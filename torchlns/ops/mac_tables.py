"""The GPU MAC's operand algebra in plain PyTorch: bf16 pieces, the integer table, range rules.

The Triton MAC kernels (triton_mac.py) build their tensor-core operands from these tables,
and the tests check every rule here exactly, without Triton, on every code pair.

# Note: bf16 pieces of the remainder classes
For the float32 accumulator the MAC is a sum of 2^F matrix products of exactly
representable operands (see Note: remainder classes in csrc/common.h):
``y = sum_i A_i V_i^T`` with ``A_i[m,k] = s_x 2^qx [r_x = i]`` and
``V_i[n,k] = s_w 2^qw C_ext[i + r_w]``, where ``C_ext[t] = C[t]`` for ``t < 2^F`` and
``2 C[t - 2^F]`` above. A tensor core multiplies bf16 operands (8 significant bits) exactly
into a float32 accumulator. Every ``A_i`` entry is a signed power of two, one bf16 value.
Every ``C_ext`` entry is split into ``P`` bf16 pieces by truncation: the first piece is its
top 8 significant bits, the second the next 8 of what is left, and so on until nothing is
left, so ``C_ext[t] = sum_j piece_j[t]`` exactly, every piece has the sign of the entry, and
the magnitudes of the pieces add up to the magnitude of the entry. Then
``V_i = sum_j V_ij`` with ``V_ij[n,k] = s_w 2^qw piece_j[i + r_w]`` and
``y = sum_i sum_j A_i V_ij^T``: ``2^F P`` bf16 matrix products, each product exact.
``P`` is 1 for Mitchell (``F + 1 <= 8`` bits), 2 for an 8-bit LUT (9 bits) and 3 for the
exact table (24 bits): LNS8 costs 24 tensor-core products per output, the chip's LUT 16.

The pieces stay exact while every operand and every product is a normal float32, which
``class_terms_in_range`` checks on the ranges of the octaves ``q``: a piece is at least
``2^-23`` (``C_ext`` is a multiple of 2^-23) and at most 4 (a LUT entry may round up to 2).

How the float32 sum relates to the spec's bound ``K 2^-24 sum|p|``: the kernel keeps the
first pieces in one accumulator and the other pieces in a second, and adds the two once at
the end. Under round-to-nearest (the interpreter, and an IEEE float32 datapath) the first
accumulator's error is at most ``(K - 1) 2^-24 S_1``, the second's ``(K(P - 1) - 1) 2^-24 S_2``
and the final add's ``2^-24 sum|p|`` (first order), where ``S_1 + S_2 = sum|p|`` because the
pieces of a product share its sign. So ``P <= 2`` (Mitchell, LUT up to 15 bits) is inside
the spec's bound, and ``P = 3`` (the exact table) within ``K 2^-24 S_2 <= K 2^-31 sum|p|``
of it. NVIDIA's tensor cores do not round to nearest: they align the addends of one MMA
step to the largest and truncate (Fasi, Higham, Mikaitis, Pranesh, "Numerical behavior of
NVIDIA tensor cores", PeerJ CS 2021), so one step can lose up to one unit in the last place
instead of half of one, and the worst case there is about twice the spec's bound. Sums
of real data come nowhere near either figure; ``python -m torchlns gpu-check`` measures
the largest error on the GPU as a fraction of the spec's bound.

# Note: the fixed accumulator's integer table
``C[r] = L[r] / 2^S`` with integers ``L[r]`` (S = 23 for the exact table, ``lut_bits`` for
a LUT, ``F`` for Mitchell), so a product is ``floor(L[r] 2^e)`` with ``e = q - Λ - S``: a
left shift of ``L[r]`` by ``e`` when ``e >= 0``, a right shift (truncation toward zero of the
magnitude) when ``e < 0``, then the saturation to ``T = 2^(W-1) - 1``. Integers throughout,
no float64: every backend's bits.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["extended_table", "bf16_pieces", "integer_table", "packed_table", "class_terms_in_range", "octave_bounds",
           "class_operands", "MAX_CLASS_BITS", "PIECE_MIN_EXP"]

MAX_CLASS_BITS = 4  # tensor-core route for F <= 4 (at most 16 classes); wider F runs the direct kernel
PIECE_MIN_EXP = -23  # every nonzero piece is at least 2^-23 (C_ext is a multiple of 2^-23)
_TOP8 = -65536  # 0xFFFF0000 as int32: keeps a float32's sign, exponent and top 7 fraction bits


def extended_table(table: torch.Tensor) -> torch.Tensor:
    """``C_ext[t]`` for ``t < 2^(F+1)`` as float32 (exact): ``C[t]``, then ``2 C[t - 2^F]``.

    The last entry (``t = 2^(F+1) - 1``) cannot occur (``r_x + r_w <= 2^(F+1) - 2``) and is
    kept only to make the length a power of two.
    """
    c = table.to(torch.float64)
    ext = torch.cat([c, 2 * c])
    out = ext.to(torch.float32)
    if not torch.equal(out.to(torch.float64), ext):
        raise ValueError("conversion table entries must be exact float32 values")
    return out


def bf16_pieces(values: torch.Tensor) -> torch.Tensor:
    """Split float32 ``values`` into bf16 pieces by truncation: a (P, n) float32 tensor.

    ``sum_j pieces[j] == values`` exactly, every piece is a bf16 value with the sign of its
    entry (or zero), and ``P`` is the fewest that hold every entry (see Note: bf16 pieces of
    the remainder classes).
    """
    if values.dtype != torch.float32:
        raise TypeError(f"bf16_pieces takes float32 values, got {values.dtype}")
    if not torch.isfinite(values).all():
        raise ValueError("bf16_pieces takes finite values")
    rest = values.clone()
    pieces = []
    while bool((rest != 0).any()) or not pieces:
        head = (rest.view(torch.int32) & _TOP8).view(torch.float32)
        pieces.append(head)
        rest = rest - head  # exact: the low 16 bits of the significand
    return torch.stack(pieces)


def integer_table(table: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(L, S)`` with ``C[r] = L[r] / 2^S``, ``L`` as int32 (see Note: the fixed accumulator's integer table)."""
    c = table.detach().to("cpu", torch.float64)
    for S in range(0, 31):
        scaled = c * 2.0**S
        if torch.equal(scaled, scaled.floor()):
            if scaled.max() >= 2**30:
                break
            return scaled.to(torch.int32), S
    raise ValueError("conversion table entries are not integers over 2^S for any S <= 30")


def offset_range(offset: torch.Tensor) -> Tuple[int, int]:
    """(min, max) of an offset tensor, with one device synchronisation for both."""
    lo, hi = torch.aminmax(offset.detach().reshape(-1).to(torch.int64))
    return int(lo), int(hi)


def octave_bounds(offset: torch.Tensor, bits: int, frac_bits: int, offsets: Tuple[int, int] = None) -> Tuple[int, int]:
    """The range of ``q = (E + offset) >> F`` over every nonzero code ``E`` in 1..E_max.

    ``offsets``: the offsets' (min, max) when already known (``offset`` is then not read).
    """
    lo, hi = offsets if offsets is not None else offset_range(offset)
    return (1 + lo) >> frac_bits, (((1 << (bits - 1)) - 1) + hi) >> frac_bits


def packed_table(L: torch.Tensor):
    """``(L[0], word0, word1)``: up to 8 entries within 255 of ``L[0]`` as bytes of two int32
    words, byte ``r & 3`` of word ``r >> 2`` holding ``L[r] - L[0]``; None if they do not fit."""
    values = [int(v) for v in L.tolist()]
    if len(values) > 8 or max(values) - values[0] > 255 or min(values) < values[0]:
        return None
    deltas = [v - values[0] for v in values] + [0] * (8 - len(values))
    words = [sum(d << (8 * i) for i, d in enumerate(deltas[j:j + 4])) for j in (0, 4)]
    return values[0], *(w - (1 << 32) if w >= 1 << 31 else w for w in words)


def class_terms_in_range(qx: Tuple[int, int], qw: Tuple[int, int]) -> bool:
    """Whether every ``A_i``, every ``V_ij`` and every product of the two is a normal float32.

    ``C_ext`` pieces lie in [2^-23, 4] (see Note: bf16 pieces of the remainder classes).
    """
    (x_lo, x_hi), (w_lo, w_hi) = qx, qw
    return (x_lo >= -126 and x_hi <= 127 and w_lo + PIECE_MIN_EXP >= -126 and w_hi + 2 <= 127
            and x_lo + w_lo + PIECE_MIN_EXP >= -126 and x_hi + w_hi + 2 <= 127)


def class_operands(x: torch.Tensor, x_offset: torch.Tensor, w: torch.Tensor, w_offset: torch.Tensor,
                   table: torch.Tensor, x_bits: int, w_bits: int, frac_bits: int):
    """The tensor-core operands, built in plain PyTorch as the kernel builds them.

    Returns ``(A, V)``: ``A`` is (2^F, M, K) and ``V`` is (2^F, P, N, K), bf16, such that
    ``y = sum_i sum_j A[i] @ V[i, j].T`` with every product exact. For tests and for reading:
    the kernel never materialises these planes.
    """
    from ..core.fields import log_fields

    R = 1 << frac_bits
    gx, nx, zx, _ = log_fields(x, x_offset.expand(x.shape), x_bits)
    gw, nw, zw, _ = log_fields(w, w_offset.expand(w.shape), w_bits)

    def signed_pow2(g, negative, zero):
        v = (((g >> frac_bits) + 127) << 23).view(torch.float32)
        return torch.where(zero, 0.0, torch.where(negative, -v, v))

    ax, bw = signed_pow2(gx, nx, zx), signed_pow2(gw, nw, zw)
    pieces = bf16_pieces(extended_table(table)).to(x.device)
    rx, rw = gx & (R - 1), gw & (R - 1)
    A = torch.stack([torch.where(rx == i, ax, 0.0) for i in range(R)])
    V = torch.stack([torch.stack([bw * piece[i + rw] for piece in pieces]) for i in range(R)])
    if not (torch.equal(A.to(torch.bfloat16).float(), A) and torch.equal(V.to(torch.bfloat16).float(), V)):
        raise AssertionError("a class operand is not a bf16 value")
    return A.to(torch.bfloat16), V.to(torch.bfloat16)
