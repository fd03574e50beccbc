"""Triton kernels of the LNS MAC (``torchlns::lns_mm`` and ``torchlns::lns_conv``) for CUDA.

Design notes. One GEMM view serves both ops: output rows ``m`` are matrix rows, or the
output positions ``(n, oh, ow)`` of a convolution, columns are output channels of one group
(``program_id(1)``), and the reduction index ``k`` runs over ``(c, i, j)`` in the weight's
own order. A convolution is an implicit GEMM: each program computes the input address and
the padding mask of every ``(m, k)`` from the geometry, loads the codes directly from the
NCHW input (a position outside it is the zero code) and writes NCHW output, so there is no
im2col buffer and no output permute. Offsets arrive broadcast to their codes' shape as
views, with stride 0 along every broadcast axis, so per-tensor, per-channel and per-block
offsets are one code path and nothing is expanded in memory. Every kernel takes codes, not
log values: the fields (sign, magnitude, log, octave, remainder) are computed in registers.

Two kernels, chosen per call:

* ``_lns_mac_classes_kernel``, the float32 accumulator on tensor cores. It forms the
  remainder-class operands of Note: bf16 pieces of the remainder classes (mac_tables.py)
  in registers from each tile of codes, ``2^F`` one-hot-by-class ``A_i`` tiles and ``P``
  piece tiles ``V_ij`` per class, and accumulates ``tl.dot(A_i, V_ij)`` in float32: every
  product exact, 24 bf16 tensor-core products per LNS8 output (16 for the chip's LUT). The
  one-hot planes never exist in memory. It runs when ``F <= 4`` and every operand and
  product is a normal float32 (``class_terms_in_range``, from the offsets).
* ``_lns_mac_direct_kernel``, every product from its log sum, one reduction index at a
  time as an outer product over a 2-D output tile. With the fixed accumulator it is all
  integer (Note: the fixed accumulator's integer table): a shift of ``L[r]`` by
  ``q - Λ - S``, the saturation, int64 sums, and an in-kernel epilogue (bias as
  ``rne(b / 2^Λ)`` with overflow-checked addition, final saturation, ``acc 2^Λ`` rounded once
  to float32), so its bits are the reference's; wrap-around and chunked accumulators
  (``TWO_STAGE``) fit products and chunk sums in registers as it goes. With the float32 accumulator it is the
  fallback for wide ``F`` and extreme offsets: exact float64 products, summed in float64 and
  rounded once, like the reference.

NaN dominates each dot product and is tracked per row and column in the main loop. Tile
configurations come from ``_classes_configs()``/``_direct_configs()``; CUDA autotunes over
them (``TORCHLNS_TRITON_AUTOTUNE=0`` pins the first, so that float32 bits do not depend on
timing), the interpreter runs the first, and the tests sweep every one. The classes
kernel's ``BLOCK_K`` is the same in every configuration, so the order of its float32 sums
does not depend on the tile shape.

Under ``TRITON_INTERPRET=1`` (CI) the class operands go to ``tl.dot`` as float32, which the
interpreter multiplies in numpy float32: the interpreter of Triton 3.x passes bf16 tensors
to numpy as their raw uint16 bits. The operands are bf16 values either way, so every
product is the same exact float32; only the tensor core's summation differs.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from ..core.geometry import conv_output_size
from . import mac_tables

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CLASSES_BLOCK_K = 32


def _autotune_enabled() -> bool:
    return os.environ.get("TORCHLNS_TRITON_AUTOTUNE", "1") != "0"


# ----------------------------------------------------------------------------------------
# tile configurations
# ----------------------------------------------------------------------------------------
def _classes_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": CLASSES_BLOCK_K, "GROUP_M": 8}, num_warps=w,
                          num_stages=s)
            for bm, bn, w, s in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 2), (16, 32, 2, 2)]]


def _direct_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w)
            for bm, bn, w in [(64, 64, 4), (128, 64, 8), (32, 32, 2), (16, 16, 1)]]


# ----------------------------------------------------------------------------------------
# shared pieces of both kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) in grouped order: GROUP_M row tiles share the weight tiles in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % size_m, (pid % in_group) // size_m


@triton.jit
def _tile(M, N, g, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output rows and columns, their masks, and its weight rows (group g)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N, g * N + offs_n


@triton.jit
def _rows(offs_m, M, sx0, sx2, sx3, sx4, so0, so2, so3, so4, Do, Ho, Wo, STD, STH, STW, PD, PH, PW,
          CONV: tl.constexpr):
    """Per output row: code and offset address parts, and the receptive field's corner (d, h, w)."""
    if CONV:
        n = offs_m // (Do * Ho * Wo)
        rem = offs_m % (Do * Ho * Wo)
        id0 = (rem // (Ho * Wo)) * STD - PD
        rem = rem % (Ho * Wo)
        ih0 = (rem // Wo) * STH - PH
        iw0 = (rem % Wo) * STW - PW
        n = n.to(tl.int64)
        row_x = n * sx0 + id0 * sx2 + ih0 * sx3 + iw0 * sx4
        row_o = n * so0 + id0 * so2 + ih0 * so3 + iw0 * so4
    else:
        id0 = offs_m * 0
        ih0 = id0
        iw0 = id0
        row_x = offs_m.to(tl.int64) * sx0
        row_o = offs_m.to(tl.int64) * so0
    return row_x, row_o, id0, ih0, iw0


@triton.jit
def _x_tile(x_ptr, xo_ptr, row_x, row_o, id0, ih0, iw0, m_ok, offs_k, K, c0, sx1, sx2, sx3, sx4, so1, so2, so3, so4,
            D, H, W, KD, KH, KW, DD, DH, DW, CONV: tl.constexpr):
    """Codes and offsets of x at rows x reduction indices (int32); outside the input: the zero code."""
    k_ok = offs_k < K
    if CONV:  # k = ((c * KD + a) * KH + i) * KW + j, the weight's own order
        c = c0 + offs_k // (KD * KH * KW)
        tap = offs_k % (KD * KH * KW)
        dd = (tap // (KH * KW)) * DD
        tap = tap % (KH * KW)
        dh = (tap // KW) * DH
        dw = (tap % KW) * DW
        col_x = c * sx1 + dd * sx2 + dh * sx3 + dw * sx4
        col_o = c * so1 + dd * so2 + dh * so3 + dw * so4
        id_ = id0[:, None] + dd[None, :]
        ih = ih0[:, None] + dh[None, :]
        iw = iw0[:, None] + dw[None, :]
        mask = (m_ok[:, None] & k_ok[None, :] & (id_ >= 0) & (id_ < D) & (ih >= 0) & (ih < H) & (iw >= 0)
                & (iw < W))
    else:
        col_x = offs_k * sx1
        col_o = offs_k * so1
        mask = m_ok[:, None] & k_ok[None, :]
    codes = tl.load(x_ptr + row_x[:, None] + col_x[None, :], mask=mask, other=0).to(tl.int32)
    offs = tl.load(xo_ptr + row_o[:, None] + col_o[None, :], mask=mask, other=0)
    return codes, offs


@triton.jit
def _w_tile(w_ptr, wo_ptr, w_rows, n_ok, offs_k, K, swn, swk, son, sok):
    """Codes and offsets of the weight, as a (k, n) tile."""
    mask = (offs_k < K)[:, None] & n_ok[None, :]
    rows = w_rows.to(tl.int64)
    codes = tl.load(w_ptr + rows[None, :] * swn + offs_k[:, None] * swk, mask=mask, other=0).to(tl.int32)
    offs = tl.load(wo_ptr + rows[None, :] * son + offs_k[:, None] * sok, mask=mask, other=0)
    return codes, offs


@triton.jit
def _fields(codes, offs, BITS: tl.constexpr):
    """(log g, negative, zero) of int32 codes; g is 0 for the zero and NaN codes."""
    E_MAX: tl.constexpr = (1 << (BITS - 1)) - 1
    c = codes & ((1 << BITS) - 1)  # int16 codes of 16 bits arrive sign-extended
    mag = c & E_MAX
    zero = mag == 0
    return tl.where(zero, 0, mag + offs), c > E_MAX, zero


@triton.jit
def _signed_pow2(g, negative, zero, F: tl.constexpr):
    """+-2^(g >> F) as float32 (0 for a zero code), built from the bits."""
    bits = (((g >> F) + 127) << 23) | (negative.to(tl.int32) << 31)
    return tl.where(zero, 0, bits).to(tl.float32, bitcast=True)


@triton.jit
def _store(y_ptr, y, offs_m, offs_n, n0, m_ok, n_ok, sy0, sy1, sy2, sy3, sy4, Do, Ho, Wo, CONV: tl.constexpr):
    """Write an output tile: (M, N) rows, or NC(D)HW for a convolution (channel n0 + n)."""
    if CONV:
        n = (offs_m // (Do * Ho * Wo)).to(tl.int64)
        rem = offs_m % (Do * Ho * Wo)
        row = n * sy0 + (rem // (Ho * Wo)) * sy2
        rem = rem % (Ho * Wo)
        row += (rem // Wo) * sy3 + (rem % Wo) * sy4
    else:
        row = offs_m.to(tl.int64) * sy0
    col = (n0 + offs_n).to(tl.int64) * sy1
    tl.store(y_ptr + row[:, None] + col[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _pow2_f64(e):
    """2^e as float64 for an integer e in [-1022, 1023] (exact)."""
    return ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


# ----------------------------------------------------------------------------------------
# the float32 accumulator on tensor cores
# ----------------------------------------------------------------------------------------
@triton.jit
def _class_dot(a, v, acc, BF16_DOT: tl.constexpr):
    if BF16_DOT:
        return tl.dot(a.to(tl.bfloat16), v.to(tl.bfloat16), acc)
    return tl.dot(a, v, acc, input_precision="ieee")  # the interpreter: numpy float32 (see the module docstring)


@triton.jit
def _lns_mac_classes_kernel(
        x_ptr, xo_ptr, w_ptr, wo_ptr, pieces_ptr, bias_ptr, y_ptr, M, N, K,
        sx0, sx1, sx2, sx3, sx4, so0, so1, so2, so3, so4, swn, swk, son, sok, sy0, sy1, sy2, sy3, sy4,
        D, H, W, Do, Ho, Wo, KD, KH, KW, STD, STH, STW, PD, PH, PW, DD, DH, DW, C_G,
        X_BITS: tl.constexpr, W_BITS: tl.constexpr, F: tl.constexpr, P: tl.constexpr, HAS_BIAS: tl.constexpr,
        CONV: tl.constexpr, BF16_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    R: tl.constexpr = 1 << F
    g = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok, w_rows = _tile(M, N, g, BLOCK_M, BLOCK_N, GROUP_M)
    row_x, row_o, id0, ih0, iw0 = _rows(offs_m, M, sx0, sx2, sx3, sx4, so0, so2, so3, so4, Do, Ho, Wo, STD, STH, STW,
                                        PD, PH, PW, CONV)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # first pieces
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # the other pieces (see Note: bf16 pieces)
    nan_m = tl.zeros((BLOCK_M,), dtype=tl.int32)
    nan_n = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xc, xo = _x_tile(x_ptr, xo_ptr, row_x, row_o, id0, ih0, iw0, m_ok, offs_k, K, g * C_G, sx1, sx2, sx3, sx4,
                         so1, so2, so3, so4, D, H, W, KD, KH, KW, DD, DH, DW, CONV)
        gx, nx, zx = _fields(xc, xo, X_BITS)
        nan_m |= tl.max((nx & zx).to(tl.int32), axis=1)
        ax = _signed_pow2(gx, nx, zx, F)
        rx = gx & (R - 1)
        wc, wo = _w_tile(w_ptr, wo_ptr, w_rows, n_ok, offs_k, K, swn, swk, son, sok)
        gw, nw, zw = _fields(wc, wo, W_BITS)
        nan_n |= tl.max((nw & zw).to(tl.int32), axis=0)
        bw = _signed_pow2(gw, nw, zw, F)
        rw = gw & (R - 1)
        for i in tl.static_range(R):
            a_i = tl.where(rx == i, ax, 0.0)
            for j in tl.static_range(P):
                v = tl.load(pieces_ptr + j * 2 * R + i + rw) * bw  # piece_j[i + r_w] 2^qw: exact
                if j == 0:
                    acc = _class_dot(a_i, v, acc, BF16_DOT)
                else:
                    acc_lo = _class_dot(a_i, v, acc_lo, BF16_DOT)
    if P > 1:
        y = acc + acc_lo
    else:
        y = acc
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + w_rows, mask=n_ok, other=0.0)[None, :]
    y = tl.where((nan_m[:, None] | nan_n[None, :]) != 0, float("nan"), y)
    _store(y_ptr, y, offs_m, offs_n, g * N, m_ok, n_ok, sy0, sy1, sy2, sy3, sy4, Do, Ho, Wo, CONV)


# ----------------------------------------------------------------------------------------
# every product from its log sum: the fixed accumulator, and the float64 fallback
# ----------------------------------------------------------------------------------------
@triton.jit
def _lut(tab_ptr, r, L0, W0, W1, PACKED: tl.constexpr):
    """L[r]. PACKED: at most 8 entries within 255 of L[0], held as bytes of two int32 words in
    registers (the chip's LUT8: {256..470}); else a gather from the table."""
    if PACKED:
        word = tl.where(r < 4, W0, W1)
        return L0 + ((word >> ((r & 3) * 8)) & 255)
    return tl.load(tab_ptr + r)


# Scalars that meet .to() or a bit operation stay runtime values (Triton would make a 1 a constant).
@triton.jit(do_not_specialize=["T", "LSB", "W_SHIFT", "L0", "W0", "W1", "T1", "MASK1", "HALF1", "CHUNK", "MASKW",
                               "HALFW"])
def _lns_mac_direct_kernel(
        x_ptr, xo_ptr, w_ptr, wo_ptr, tab_ptr, bias_ptr, y_ptr, M, N, K,
        sx0, sx1, sx2, sx3, sx4, so0, so1, so2, so3, so4, swn, swk, son, sok, sy0, sy1, sy2, sy3, sy4,
        D, H, W, Do, Ho, Wo, KD, KH, KW, STD, STH, STW, PD, PH, PW, DD, DH, DW, C_G, T, LSB, W_SHIFT, L0, W0, W1,
        T1, MASK1, HALF1, CHUNK, MASKW, HALFW,
        X_BITS: tl.constexpr, W_BITS: tl.constexpr, F: tl.constexpr, FIXED: tl.constexpr, B: tl.constexpr,
        PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, CONV: tl.constexpr, TWO_STAGE: tl.constexpr,
        WRAP: tl.constexpr, HAS_CHUNK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # TWO_STAGE (Note: overflow and chunks in reference.py): products at W1 bits (T1 = 2^(W1-1) - 1,
    # MASK1 = 2^W1 - 1, HALF1 = 2^(W1-1)), saturated or (WRAP) reduced modulo 2^W1; with HAS_CHUNK,
    # summed in runs of CHUNK reduction indices, each run's sum saturated or wrapped at W1 bits
    # before it joins the total; with WRAP the total and the bias are reduced modulo 2^W
    # (MASKW, HALFW) instead of saturated.
    R: tl.constexpr = 1 << F
    g = tl.program_id(1)
    offs_m, offs_n, m_ok, n_ok, w_rows = _tile(M, N, g, BLOCK_M, BLOCK_N, GROUP_M)
    row_x, row_o, id0, ih0, iw0 = _rows(offs_m, M, sx0, sx2, sx3, sx4, so0, so2, so3, so4, Do, Ho, Wo, STD, STH, STW,
                                        PD, PH, PW, CONV)
    if FIXED:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int64)
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    nan_m = tl.zeros((BLOCK_M, 1), dtype=tl.int32)
    nan_n = tl.zeros((1, BLOCK_N), dtype=tl.int32)
    for k in range(0, K):
        offs_k = k + tl.arange(0, 1)
        xc, xo = _x_tile(x_ptr, xo_ptr, row_x, row_o, id0, ih0, iw0, m_ok, offs_k, K, g * C_G, sx1, sx2, sx3, sx4,
                         so1, so2, so3, so4, D, H, W, KD, KH, KW, DD, DH, DW, CONV)  # (BLOCK_M, 1)
        gx, nx, zx = _fields(xc, xo, X_BITS)
        wc, wo = _w_tile(w_ptr, wo_ptr, w_rows, n_ok, offs_k, K, swn, swk, son, sok)  # (1, BLOCK_N)
        gw, nw, zw = _fields(wc, wo, W_BITS)
        nan_m |= (nx & zx).to(tl.int32)
        nan_n |= (nw & zw).to(tl.int32)
        sign = tl.where(zx, 0, tl.where(nx, -1, 1)) * tl.where(zw, 0, tl.where(nw, -1, 1))
        if FIXED:
            # W_SHIFT = (Λ + S) 2^F, so e = G >> F = q - Λ - S and r = G mod 2^F. With
            # L[r] < 2^(62 - B), floor(L 2^e) = (L 2^B) >> (B - e) for e <= B (an arithmetic
            # shift of a positive value floors), and for e > B the product is >= 2^61 > T.
            G = gx + (gw - W_SHIFT)
            e = G >> F
            Lr = _lut(tab_ptr, G & (R - 1), L0, W0, W1, PACKED).to(tl.int64)
            p = (Lr << B) >> tl.minimum(tl.maximum(B - e, 0), 63).to(tl.int64)
            if TWO_STAGE:
                if WRAP:  # the magnitude's residue: for e > B the product L 2^e keeps L's low W1 - e bits
                    sh = tl.minimum(tl.maximum(e, 0), 63).to(tl.int64)
                    mag = tl.where(e > B, (Lr & (MASK1 >> sh)) << sh, p & MASK1)
                    v = ((mag * sign.to(tl.int64) + HALF1) & MASK1) - HALF1
                else:
                    v = tl.where(e > B, T1, tl.minimum(p, T1)) * sign.to(tl.int64)
                if HAS_CHUNK:
                    part += v
                    end = ((k + 1) % CHUNK == 0) | (k == K - 1)
                    if WRAP:
                        fitted = ((part + HALF1) & MASK1) - HALF1
                    else:
                        fitted = tl.minimum(tl.maximum(part, -T1), T1)
                    acc += tl.where(end, fitted, 0)
                    part = tl.where(end, 0, part)
                else:
                    acc += v
            else:
                acc += tl.where(e > B, T, tl.minimum(p, T)) * sign.to(tl.int64)
        else:
            G = gx + gw
            p = tl.load(tab_ptr + (G & (R - 1))) * _pow2_f64(G >> F)  # exact: C[r] has <= 25 bits
            acc += p * sign.to(tl.float64)
    if FIXED:
        if HAS_BIAS:
            b = tl.load(bias_ptr + w_rows, mask=n_ok, other=0.0).to(tl.float64)
            bs = b * _pow2_f64(-LSB)
            ab = tl.abs(bs)
            two52 = tl.full((), 4503599627370496.0, tl.float64)
            r = tl.where(ab < two52, (ab + two52) - two52, ab)  # rne for |v| < 2^52; above, v is an integer
            r = tl.where(bs < 0, -r, r)
            clamp = tl.full((), 0x43DFFFFFFFFFFFFF, tl.int64).to(tl.float64, bitcast=True)  # 2^63 - 1024
            r = tl.minimum(tl.maximum(r, -clamp), clamp)
            bi = tl.where(b != b, 0, r.to(tl.int64))[None, :]
            if WRAP:  # modular: the bias's residue joins the total's
                acc = ((acc + HALFW) & MASKW) - HALFW
                acc = ((acc + (((bi + HALFW) & MASKW) - HALFW) + HALFW) & MASKW) - HALFW
            else:
                s = acc + bi
                over = ((acc ^ s) & (bi ^ s)) < 0  # the addition wrapped: the true sum is beyond +-2^63
                acc = tl.where(over, tl.where(bi > 0, T, -T), s)
            nan_n |= (b != b).to(tl.int32)[None, :]
        if WRAP:
            acc = ((acc + HALFW) & MASKW) - HALFW
        else:
            acc = tl.minimum(tl.maximum(acc, -T), T)
        y = (acc.to(tl.float64) * _pow2_f64(LSB)).to(tl.float32)
    else:
        y = acc.to(tl.float32)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + w_rows, mask=n_ok, other=0.0)[None, :]
    y = tl.where((nan_m | nan_n) != 0, float("nan"), y)
    _store(y_ptr, y, offs_m, offs_n, g * N, m_ok, n_ok, sy0, sy1, sy2, sy3, sy4, Do, Ho, Wo, CONV)


_classes_autotuned = triton.autotune(configs=_classes_configs(), key=["M", "N", "K", "F", "P", "CONV"])(
    _lns_mac_classes_kernel)
_direct_autotuned = triton.autotune(configs=_direct_configs(), key=["M", "N", "K", "F", "FIXED", "CONV"])(
    _lns_mac_direct_kernel)


# ----------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------
class _Geometry(NamedTuple):
    """A convolution's geometry for the kernels, depth first (2-D: depth 1; a matrix product: all ones)."""
    D: int = 1
    H: int = 1
    W: int = 1
    Do: int = 1
    Ho: int = 1
    Wo: int = 1
    KD: int = 1
    KH: int = 1
    KW: int = 1
    STD: int = 1
    STH: int = 1
    STW: int = 1
    PD: int = 0
    PH: int = 0
    PW: int = 0
    DD: int = 1
    DH: int = 1
    DW: int = 1


_pieces_cache: "WeakIdKeyDictionary" = WeakIdKeyDictionary()
_integer_cache: "WeakIdKeyDictionary" = WeakIdKeyDictionary()
_bounds_cache: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _version(t: torch.Tensor) -> int:
    """The in-place version counter; inference tensors have none (-1: never invalidated)."""
    return -1 if t.is_inference() else t._version


def _cached(cache, table: torch.Tensor, make):
    hit = cache.get(table)
    if hit is None or hit[0] != _version(table):
        hit = (_version(table), make(table))
        cache[table] = hit
    return hit[1]


def class_pieces(table: torch.Tensor) -> torch.Tensor:
    """The (P, 2^(F+1)) float32 piece table of a conversion table, cached per table tensor."""
    return _cached(_pieces_cache, table,
                   lambda t: mac_tables.bf16_pieces(mac_tables.extended_table(t.cpu())).to(t.device).contiguous())


def _integer(table: torch.Tensor):
    """(L on the device, S, bit length of max L, the packed form (L[0], word0, word1) or None)."""
    def make(t):
        L, S = mac_tables.integer_table(t)
        return L.to(t.device).contiguous(), S, int(L.max()).bit_length(), mac_tables.packed_table(L)
    return _cached(_integer_cache, table, make)


def _octaves(offset: torch.Tensor, bits: int, frac_bits: int):
    """``octave_bounds`` of an offset tensor, cached on the tensor that owns the memory.

    Converted layers pass views of their offset buffers, so the cache spares a device
    synchronisation per call; dynamic per-block offsets are new tensors and pay it.
    """
    base = offset._base if offset._base is not None else offset
    if base.is_inference():
        return mac_tables.octave_bounds(offset, bits, frac_bits)
    hit = _bounds_cache.get(base)
    if hit is None or hit[0] != base._version:
        hit = (base._version, mac_tables.offset_range(base))
        _bounds_cache[base] = hit
    return mac_tables.octave_bounds(offset, bits, frac_bits, offsets=hit[1])


def _pick(config, tuned, plain, args, meta, grid, device):
    if config is None and device.type == "cuda" and _autotune_enabled():
        tuned[grid](*args, **meta)
        return
    config = config or (tuned.configs[0])
    plain[grid](*args, **meta, num_warps=config.num_warps, num_stages=config.num_stages, **config.kwargs)


def _mac(x, xo, x_strides, w2, wo2, table, bias, y, y_strides, M, N, K, groups, C_G, geo: _Geometry, x_bits, w_bits,
         frac_bits, fixed, acc_bits, acc_lsb, conv: bool, config, route: Optional[str], two_stage=None):
    """Launch one MAC kernel over ``groups`` GEMMs of (M, K) x (N, K)."""
    if M == 0 or N == 0 or groups == 0:
        return y
    sx, so = x_strides
    common = (M, N, K, *sx, *so, w2.stride(0), w2.stride(1), wo2.stride(0), wo2.stride(1), *y_strides, *geo, C_G)
    has_bias = bias is not None
    b = bias.to(torch.float32).contiguous() if has_bias else y
    if route is None:
        route = "direct"
        if not fixed and frac_bits <= mac_tables.MAX_CLASS_BITS and K:
            qx, qw = _octaves(xo, x_bits, frac_bits), _octaves(wo2, w_bits, frac_bits)
            if mac_tables.class_terms_in_range(qx, qw):
                route = "classes"
    if route == "classes":
        pieces = class_pieces(table)
        meta = dict(X_BITS=x_bits, W_BITS=w_bits, F=frac_bits, P=pieces.shape[0], HAS_BIAS=has_bias, CONV=conv,
                    BF16_DOT=not INTERPRET)
        grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]), groups)  # noqa: E731
        _pick(config, _classes_autotuned, _lns_mac_classes_kernel, (x, xo, w2, wo2, pieces, b, y, *common), meta, grid,
              y.device)
        return y
    packed = None
    if fixed:
        tab, S, lbits, packed = _integer(table)
        T, lsb, w_shift, shift_base = 2 ** (acc_bits - 1) - 1, acc_lsb, (acc_lsb + S) << frac_bits, 62 - lbits
    else:
        tab, T, lsb, w_shift, shift_base = table.to(torch.float64).contiguous(), 0, 0, 0, 0
    wrap, chunk, W1 = two_stage or (False, 0, acc_bits)
    stage = (2 ** (W1 - 1) - 1, 2**W1 - 1, 2 ** (W1 - 1), max(chunk, 1), 2**acc_bits - 1, 2 ** (acc_bits - 1))
    meta = dict(X_BITS=x_bits, W_BITS=w_bits, F=frac_bits, FIXED=fixed, B=shift_base, PACKED=packed is not None,
                HAS_BIAS=has_bias, CONV=conv, TWO_STAGE=two_stage is not None, WRAP=wrap, HAS_CHUNK=chunk > 0)
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]), groups)  # noqa: E731
    _pick(config, _direct_autotuned, _lns_mac_direct_kernel,
          (x, xo, w2, wo2, tab, b, y, *common, T, lsb, w_shift, *(packed or (0, 0, 0)), *stage), meta, grid,
          y.device)
    return y


def _int32(offset: torch.Tensor) -> torch.Tensor:
    return offset if offset.dtype == torch.int32 else offset.to(torch.int32)


def lns_mm(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb,
           overflow="saturate", chunk=0, chunk_bits=0, config=None, route=None):
    """``torchlns::lns_mm`` on the GPU. ``config`` pins one tile configuration and ``route``
    one kernel ("classes" or "direct"; tests sweep both), else they are chosen per call.
    Wrap-around and chunked accumulators run the direct kernel (TWO_STAGE)."""
    two_stage = None
    if fixed and (overflow != "saturate" or chunk):
        two_stage, route = (overflow == "wrap", chunk, (chunk_bits or acc_bits) if chunk else acc_bits), "direct"
    M, K = x.shape
    N = w.shape[0]
    xo = _int32(x_offset).expand(M, K)
    wo = _int32(w_offset).expand(N, K)
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    return _mac(x, xo, ((x.stride(0), x.stride(1), 0, 0, 0), (xo.stride(0), xo.stride(1), 0, 0, 0)), w, wo, table,
                bias, y, (y.stride(0), y.stride(1), 0, 0, 0), M, N, K, 1, 0, _Geometry(), x_bits, w_bits, frac_bits,
                fixed, acc_bits, acc_lsb, False, config, route, two_stage)


def _strides5(t: torch.Tensor) -> tuple:
    """(n, c, d, h, w) strides of a 4-D (depth 1) or 5-D tensor."""
    st = t.stride()
    return st if t.dim() == 5 else (st[0], st[1], 0, st[2], st[3])


def lns_conv(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb,
             stride: Sequence[int], pad_before: Sequence[int], pad_after: Sequence[int], dilation: Sequence[int],
             groups: int, x_block: int = 0, x_block_bits: int = 0, config=None, route=None):
    """``torchlns::lns_conv`` on the GPU, 2-D or 3-D: an implicit GEMM (see the module docstring).

    Dynamic per-block activations (``x_block``) re-encode each receptive field's blocks on
    im2col columns (see Note: dynamic blocks in reference.py), whose ``lns_mm`` runs here."""
    if x_block:
        from . import reference

        return reference.lns_conv_reference(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed,
                                            acc_bits, acc_lsb, stride, pad_before, pad_after, dilation, groups,
                                            x_block, x_block_bits)
    n = x.dim() - 2
    Nb, C = x.shape[:2]
    Cout, C_G = w.shape[:2]
    out = [max(conv_output_size(s, k, st, pb, pa, d), 0)
           for s, k, st, pb, pa, d in zip(x.shape[2:], w.shape[2:], stride, pad_before, pad_after, dilation)]
    y = torch.empty(Nb, Cout, *out, dtype=torch.float32, device=x.device)
    K = w[0].numel()
    xo = _int32(x_offset).expand(x.shape)
    w2 = w.reshape(Cout, K)
    wo2 = _int32(w_offset).expand(w.shape).reshape(Cout, K)
    pad3 = lambda v, one: ([one] if n == 2 else []) + list(v)  # noqa: E731  (depth first, 1 for 2-D)
    geo = _Geometry(*pad3(x.shape[2:], 1), *pad3(out, 1), *pad3(w.shape[2:], 1), *pad3(stride, 1),
                    *pad3(pad_before, 0), *pad3(dilation, 1))
    return _mac(x, xo, (_strides5(x), _strides5(xo)), w2, wo2, table, bias, y, _strides5(y),
                Nb * geo.Do * geo.Ho * geo.Wo, Cout // groups, K, groups, C_G, geo, x_bits, w_bits, frac_bits, fixed,
                acc_bits, acc_lsb, True, config, route)


KERNELS = {"lns_mm": lns_mm, "lns_conv": lns_conv}
