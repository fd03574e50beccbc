"""``torchlns.telemetry``: what the datapath does inside a network, counted exactly.

# Note: telemetry counters
Per chip layer (LNS layers; FP8/INT comparison layers have no log datapath), over every call
on the data, and in total:

* ``act_values``: nonzero activations encoded (NaN aside); ``act_saturated``: those whose
  integer log lies above ``E_max + offset`` (clipped to E_max) or that are ±inf;
  ``act_flushed``: finite ones whose code would be below 1 (flushed to zero). Static and
  dynamic per-tensor or per-block activations of a linear layer count each element once;
  a convolution's dynamic blocks are encoded per receptive field (Note: dynamic blocks in
  ops/reference.py), so each receptive field's codes count there.
* Fixed accumulator only: ``products``, the products of two nonzero codes;
  ``prod_truncated``, those whose magnitude ``floor(C[r] 2^(q-Λ))`` is 0; ``prod_overflow``,
  those beyond the W1-bit range (saturated, or wrapped: a negative product of exactly
  ``-2^(W1-1)`` fits); ``chunks`` and ``chunk_overflow`` for two-stage MACs; ``totals`` and
  ``total_overflow``, the outputs' exact sums with the bias, before the final saturation
  or wrap, beyond W bits; ``max_total`` and ``headroom``, the largest |total| over
  ``2^(W-1) - 1`` (above 1: it overflowed).
* ``sqnr_db``: the layer's output against the float layer on the same input: the layer of
  the same name in the (batch-norm folded) ``reference`` model when one is given, otherwise
  the layer's own weights decoded, in float (so then weight rounding is not in it).

How it counts without a second MAC: a product's magnitude only grows with its log sum
``G = g_a + g_w`` (``C[r]`` is monotone), so "truncated to zero" is ``G < G0`` and
"overflows" is ``G >= G1`` for two thresholds found once per (table, Λ, W1). Per reduction
index k, a histogram of the activations' logs (by sign) over the rows, accumulated, gives
for each weight ``(n, k)`` the number of partners below or above its threshold by one
lookup: O(M·K + N·K) work instead of the MAC's O(M·N·K). Convolutions get their columns
from the reference's own geometry (``lns_conv_reference`` with this count in ``lns_mm``'s
place), so every layout, group, 3-D and transposed convolution and dynamic block counts as
the op computes it; 2-D convolutions with per-tensor codes take the histograms from one pass
over each stride phase of the input instead (``_code_hist``), and their dynamic blocks from
that plus the few codes a block can change, one receptive field at a time (``_blocks_hist``);
on the CPU both in C++ (Note: telemetry's tap histograms in csrc/conv_cpu.cpp). The totals
exist only inside the accumulator: the C++ epilogue reports them, and two-stage MACs their
chunk sums (Note: accumulator telemetry in csrc/common.h); without them (another device),
the reference runs the layer's MAC once more and its epilogue counts them. Nothing here
changes an output bit: the observers read operands (Note: MAC observers in functional.py)
and the layers run as they always do.
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .. import functional
from .._text import format_table
from ..core.fields import log_fields
from ..core.geometry import conv_output_size
from ..core.formats import LNSFormat, MACConfig
from ..nn.layers import _CodedLayer
from ..ops import backend, reference

__all__ = ["COUNTERS", "LayerTelemetry", "Telemetry", "TelemetryReport", "telemetry"]

# The heatmap's columns: each counter as a share of what it counts.
COUNTERS = {"act_saturated": "act_values", "act_flushed": "act_values", "prod_truncated": "products",
            "prod_overflow": "products", "chunk_overflow": "chunks", "total_overflow": "totals"}


@dataclass
class LayerTelemetry:
    """One layer's counters (see Note: telemetry counters)."""

    layer: str
    format: str = ""
    mac: str = ""
    acc_max: int = 0  # T = 2^(W-1) - 1; 0: float32 accumulator
    calls: int = 0
    act_values: int = 0
    act_saturated: int = 0
    act_flushed: int = 0
    products: int = 0
    prod_truncated: int = 0
    prod_overflow: int = 0
    chunks: int = 0
    chunk_overflow: int = 0
    totals: int = 0
    total_overflow: int = 0
    max_total: int = 0
    chunk_max: int = 0  # 2^(W1-1) - 1 of a chunked MAC; 0: no chunks
    max_chunk: int = 0
    signal: float = 0.0
    noise: float = 0.0

    @property
    def headroom(self) -> float:
        """The largest |total| as a share of the accumulator's range (nan: float32 accumulator)."""
        return self.max_total / self.acc_max if self.acc_max else math.nan

    @property
    def chunk_headroom(self) -> float:
        """The largest |chunk sum| as a share of the chunk's range (nan: no chunks)."""
        return self.max_chunk / self.chunk_max if self.chunk_max else math.nan

    @property
    def sqnr_db(self) -> float:
        if not self.signal:
            return math.nan
        return math.inf if not self.noise else 10 * math.log10(self.signal / self.noise)

    def share(self, counter: str) -> float:
        whole = getattr(self, COUNTERS[counter])
        return getattr(self, counter) / whole if whole else math.nan

    def add(self, counts: Dict[str, int]) -> None:
        for k, v in counts.items():
            setattr(self, k, max(getattr(self, k), int(v)) if k.startswith("max_") else getattr(self, k) + int(v))

    def to_dict(self) -> dict:
        return dict(asdict(self), headroom=self.headroom, chunk_headroom=self.chunk_headroom, sqnr_db=self.sqnr_db)


@dataclass
class TelemetryReport:
    """Per-layer ``rows`` in first-call order; ``print`` it for a table, ``plot`` it for a heatmap."""

    rows: List[LayerTelemetry]

    @property
    def total(self) -> LayerTelemetry:
        t = LayerTelemetry("total")
        for r in self.rows:
            for f in fields(LayerTelemetry):
                if f.type in ("int", "float") and f.name not in ("acc_max", "max_total", "chunk_max", "max_chunk"):
                    setattr(t, f.name, getattr(t, f.name) + getattr(r, f.name))
        worst = max((r for r in self.rows if r.acc_max), key=lambda r: r.headroom, default=None)
        if worst is not None:  # the network's headroom is its tightest layer's
            t.acc_max, t.max_total = worst.acc_max, worst.max_total
        worst = max((r for r in self.rows if r.chunk_max), key=lambda r: r.chunk_headroom, default=None)
        if worst is not None:
            t.chunk_max, t.max_chunk = worst.chunk_max, worst.max_chunk
        t.calls = max((r.calls for r in self.rows), default=0)
        return t

    def __getitem__(self, layer: str) -> LayerTelemetry:
        for r in self.rows:
            if r.layer == layer:
                return r
        raise KeyError(layer)

    def to_dicts(self) -> List[dict]:
        return [r.to_dict() for r in (*self.rows, self.total)]

    def __str__(self) -> str:
        head = ("layer", "format / MAC", "act sat", "act flush", "prod trunc", "prod ovf", "chunk ovf", "total ovf",
                "chunk room", "headroom", "SQNR dB")

        def pct(r, c):
            s = r.share(c)
            return "-" if math.isnan(s) else f"{100 * s:.3g}%"

        def room(v):
            return "-" if math.isnan(v) else f"{100 * v:.3g}%"

        body = [(r.layer or "(root)", f"{r.format} {r.mac}".strip(), *(pct(r, c) for c in COUNTERS),
                 room(r.chunk_headroom), room(r.headroom), f"{r.sqnr_db:.1f}")
                for r in (*self.rows, self.total)]
        return (format_table(head, body, right=tuple(range(2, len(head)))) +
                "\nshares: of nonzero activations, of products of nonzero codes, of chunk sums, of outputs; headroom: "
                "largest |total| over the accumulator's range, chunk room the same for chunk sums (the total row: the "
                "tightest layer's)")

    def plot(self, path) -> Path:
        """A PNG heatmap: layers (rows) by counter (columns), each cell its share on a log scale, white
        where nothing happened, grey where the counter does not apply; headroom in the last column."""
        from PIL import Image, ImageDraw

        path = Path(path)
        cols = [*COUNTERS, "headroom"]
        cw, ch, left, top = 84, 16, 12 + 7 * max([len(r.layer) for r in self.rows] + [6]), 64
        img = Image.new("RGB", (left + cw * len(cols) + 16, top + ch * len(self.rows) + 40), "white")
        d = ImageDraw.Draw(img)
        for j, c in enumerate(cols):
            d.text((left + j * cw + 4, top - 40 + 12 * (j % 2)), c.replace("_", " "), fill="black")
        for i, r in enumerate(self.rows):
            y = top + i * ch
            d.text((4, y + 2), r.layer or "(root)", fill="black")
            for j, c in enumerate(cols):
                v = r.headroom if c == "headroom" else r.share(c)
                if math.isnan(v):
                    color = (225, 225, 225)
                elif c == "headroom":  # blue while it fits, red beyond the range
                    t = min(v, 1.0)
                    color = (200, 40, 40) if v > 1 else (int(255 - 200 * t), int(255 - 140 * t), 255)
                elif v == 0:
                    color = (255, 255, 255)
                else:  # 1e-6 .. 1 on a log scale, yellow to red
                    t = min(1.0, max(0.0, (math.log10(v) + 6) / 6))
                    color = (255, int(230 - 200 * t), int(120 - 120 * t))
                d.rectangle([left + j * cw, y, left + (j + 1) * cw - 2, y + ch - 2], fill=color)
                if not math.isnan(v) and v:
                    d.text((left + j * cw + 4, y + 2), f"{100 * v:.2g}%", fill="black")
        d.text((4, top + ch * len(self.rows) + 12), "share of what each counter counts (log colour, 1e-6 .. 1); "
               "headroom: largest |total| / range", fill="black")
        img.save(path)
        return path


# ----------------------------------------------------------------------------------------
# counting from codes
# ----------------------------------------------------------------------------------------
def _first_log(table: torch.Tensor, frac_bits: int, acc_lsb: int, t: int) -> int:
    """The smallest log sum G whose product magnitude C[r] 2^(q-Λ) reaches the integer t >= 1."""
    C = table.detach().cpu().tolist()  # exact float64 values in [1, 2)
    R = 1 << frac_bits
    e = t.bit_length() - 2  # 2^(e+1) <= t: the search starts below the answer
    while True:
        for r in range(R):
            if math.ldexp(C[r], e) >= t:
                return (e + acc_lsb) * R + r
        e += 1


class _ProductCounter:
    """``lns_mm``'s stand-in that counts a fixed MAC's truncated and overflowing products (see Note:
    telemetry counters) into ``counts`` and returns zeros of the output's shape (or, with
    ``then``, what ``then`` returns for the same arguments)."""

    layout: Optional[str] = None  # the weights' layout for counting, "dense" or "sparse" (None: the smaller; tests)

    def __init__(self, counts: dict, mac: MACConfig, then: Optional[Callable] = None, cache: Optional[dict] = None):
        self.counts, self.mac, self.then = counts, mac, then
        self._thresholds: Dict[tuple, tuple] = {}
        self.cache = {} if cache is None else cache  # weight histograms (see weight_hist)

    def thresholds(self, table, F, acc_lsb) -> tuple:
        key = (F, acc_lsb, table.data_ptr())
        if key not in self._thresholds:
            W1 = self.mac.chunk_width
            wrap = self.mac.overflow == "wrap"
            top = 2 ** (W1 - 1)  # a magnitude at or above overflows a positive product ...
            self._thresholds[key] = (_first_log(table, F, acc_lsb, 1), _first_log(table, F, acc_lsb, top),
                                     _first_log(table, F, acc_lsb, top + 1 if wrap else top))  # ... and a negative one
        return self._thresholds[key]

    def __call__(self, x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits, acc_lsb):
        if fixed and x.shape[0] and x.shape[1] and w.shape[0]:
            if x_offset.numel() == 1 and x_bits <= 12:  # per tensor: a histogram of the codes themselves
                hist = _code_hist(x.reshape(x.shape[0], 1, 1, x.shape[1]).permute(0, 3, 1, 2), x_bits,
                                  (1, 1), (1, 1), (0, 0), (1, 1), 1, 1)
                self.tally(hist, int(x_offset.reshape(-1)[0]), x_bits, w, w_offset, w_bits, table, frac_bits,
                           acc_lsb)
            else:
                self.tally(*_log_hist(x, x_offset, x_bits), w, w_offset, w_bits, table, frac_bits, acc_lsb,
                           logs=True)
        if self.then is not None:
            return self.then(x, x_offset, w, w_offset, table, bias, x_bits, w_bits, frac_bits, fixed, acc_bits,
                             acc_lsb)
        return torch.zeros(x.shape[0], w.shape[0], dtype=torch.float32, device=x.device)

    def tally(self, hist, lo, x_bits, w, w_offset, w_bits, table, F, acc_lsb, groups: int = 1,
              logs: bool = False) -> None:
        """Count from ``hist``: (K, 2^x_bits) code counts per reduction index (logs=False; log = E + lo),
        or (K, 2, span) counts of logs lo.. by sign (logs=True); ``w`` (N, K / groups) codes."""
        if hist is None:
            return
        if logs:  # a first, empty column, so that both kinds share the convention below
            hist, lo = torch.nn.functional.pad(hist, (1, 0)), lo - 1
        else:  # codes -> (K, sign, E); E = 0 (zero, NaN) has no product. ``hist`` is ours to change.
            hist = hist.view(hist.shape[0], 2, 1 << (x_bits - 1))
            hist[:, :, 0] = 0
        K, _, span = hist.shape
        G0, Gp, Gn = self.thresholds(table, F, acc_lsb)
        kind, *weights = self.weight_hist(w, w_offset, w_bits, groups)
        if kind is None:
            return
        # at_most[k, s, j]: partners of sign s at k whose log is <= lo + j; column 0 is empty, so
        # "log < L" is at_most[..., clamp(L - lo - 1, 0, span - 1)] for every L.
        at_most = hist.cumsum_(-1)
        every = at_most[..., -1]  # (K, 2)
        if kind == "dense":  # per k, a histogram of the weights' logs lo_w + j by sign
            hw, lo_w = weights
            j = torch.arange(hw.shape[-1], device=hw.device)

            def below(G):  # (K, 2, span_w): partners (by their sign) of a weight log lo_w + j whose sum is < G
                return at_most[:, :, (G - lo_w - j - lo - 1).clamp(0, span - 1)]

            t0, tp, tn = below(G0), below(Gp), below(Gn)
            flip = hw.flip(1)  # hw[k, 1 - s, j]: the weights of the other sign
            products = (hw.sum((1, 2)) * every.sum(1)).sum()
            truncated = (hw * (t0[:, :1] + t0[:, 1:])).sum()
            over = (hw * (every[..., None] - tp)).sum() + (flip * (every[..., None] - tn)).sum()
        else:  # few weights per k (depthwise): each nonzero weight looks its partners up
            k, same, b = weights
            flat, every = at_most.flatten(), every.flatten()
            row_same, row_other = (k * 2 + same) * span, (k * 2 + 1 - same) * span

            def below(row, G):
                return flat.take(row + (G - b - lo - 1).clamp(0, span - 1))

            products = every.view(-1, 2).sum(1).take(k).sum()
            truncated = (below(row_same, G0) + below(row_other, G0)).sum()
            over = ((every.take(k * 2 + same) - below(row_same, Gp)).sum() +
                    (every.take(k * 2 + 1 - same) - below(row_other, Gn)).sum())
        for name, v in (("products", products), ("prod_truncated", truncated), ("prod_overflow", over)):
            self.counts[name] = self.counts.get(name, 0) + int(v)

    def weight_hist(self, w, w_offset, w_bits, groups) -> tuple:
        """The weights' logs as the counting wants them, kept while the weight is unchanged:
        ("dense", (K, 2, span_w) counts by sign of logs lo_w.. per reduction index, lo_w), or
        ("sparse", k, sign, log) of each nonzero weight when that is smaller, or (None,)."""
        key = (w.data_ptr(), w._version, w_offset.data_ptr(), w_offset._version, tuple(w.shape), groups)
        if key not in self.cache:
            N, Kg = w.shape
            w_off = w_offset.expand(w.shape) if w_offset.dim() == 2 else w_offset.reshape(-1, 1).expand(w.shape)
            g, neg, z, _ = log_fields(w, w_off, w_bits)
            keep = ~z
            if not bool(keep.any()):
                self.cache[key] = (None,)
                return self.cache[key]
            lo_w, hi_w = int(g[keep].min()), int(g[keep].max())
            span_w = hi_w - lo_w + 1
            ks = (torch.arange(N, device=w.device) // (N // groups))[:, None] * Kg + torch.arange(Kg, device=w.device)
            sparse = int(keep.sum()) < groups * Kg * 2 * span_w if self.layout is None else self.layout == "sparse"
            if sparse:
                self.cache[key] = ("sparse", ks.expand(w.shape)[keep], neg[keep].to(torch.int64),
                                   g[keep].to(torch.int64))
            else:
                idx = (ks * 2 + neg.to(torch.int64)) * span_w + (g.to(torch.int64) - lo_w)
                hw = torch.bincount(idx[keep], minlength=groups * Kg * 2 * span_w).view(groups * Kg, 2, span_w)
                self.cache[key] = ("dense", hw, lo_w)
        return self.cache[key]


def _log_hist(x: torch.Tensor, x_offset: torch.Tensor, x_bits: int):
    """(K, 2, span) counts of (M, K) operands' logs by sign, and the lowest log (None: all zero)."""
    M, K = x.shape
    rows = max(1, (1 << 22) // K)
    lo = hi = None
    for r0 in range(0, M, rows):  # the logs' range, for the histogram's width
        g, _, z, _ = log_fields(x[r0:r0 + rows], _rows_of(x_offset, r0, rows), x_bits)
        if bool((~z).any()):
            a = g[~z]
            lo = int(a.min()) if lo is None else min(lo, int(a.min()))
            hi = int(a.max()) if hi is None else max(hi, int(a.max()))
    if lo is None:
        return None, 0, x_bits
    span = hi - lo + 1
    hist = torch.zeros(K * 2 * span, dtype=torch.int64, device=x.device)
    ks = torch.arange(K, device=x.device)
    for r0 in range(0, M, rows):
        g, neg, z, _ = log_fields(x[r0:r0 + rows], _rows_of(x_offset, r0, rows), x_bits)
        idx = (ks * 2 + neg.to(torch.int64)) * span + (g.to(torch.int64) - lo)
        hist += torch.bincount(idx[~z], minlength=hist.numel())
    return hist.view(K, 2, span), lo, x_bits


def _energies(y: torch.Tensor, r: torch.Tensor) -> tuple:
    """(sum r^2, sum (y - r)^2) over the positions where both are finite."""
    d = y - r
    signal, noise = float(torch.dot(r, r)), float(torch.dot(d, d))
    if math.isfinite(signal) and math.isfinite(noise):
        return signal, noise
    ok = torch.isfinite(y) & torch.isfinite(r)
    return float(r[ok].double().square().sum()), float(d[ok].double().square().sum())


@functools.lru_cache(maxsize=4096)
def _threshold(fmt: LNSFormat, g: int) -> float:
    """The smallest float32 magnitude whose integer log reaches ``g`` (inf: no finite one does);
    encoding is monotone, so a per-tensor offset's saturation and flushes are comparisons."""
    lo, hi = 0, 0x7F800000  # float32 bit patterns: 0 .. inf
    while hi - lo > 1:  # invariant: g(lo) < g <= g(hi), g(0) and g(inf) taken as -inf and +inf
        mid = (lo + hi) // 2
        v = torch.tensor([mid], dtype=torch.int32).view(torch.float32)
        if int(fmt.integer_log(v)) >= g:
            hi = mid
        else:
            lo = mid
    return float(torch.tensor([hi], dtype=torch.int32).view(torch.float32))


def _rows_of(param: torch.Tensor, r0: int, rows: int) -> torch.Tensor:
    return param[r0:r0 + rows] if param.dim() == 2 and param.shape[0] > 1 else param


def _code_hist(codes: torch.Tensor, bits: int, kernel, stride, pad_before, dilation, Ho: int, Wo: int,
               values: Optional[int] = None) -> torch.Tensor:
    """(C·kh·kw, 2^bits): for each (channel, tap) of a 2-D convolution over (N, C, H, W) codes,
    how many outputs read each code there (padding reads none). ``values``: the codes are
    labels in [0, values) instead (int32), counted the same way. The C++ form on the CPU
    (Note: telemetry's tap histograms in csrc/conv_cpu.cpp), else ``_code_hist_torch``."""
    if (values is None and codes.device.type == "cpu" and codes.dtype in (torch.uint8, torch.int16)
            and backend.has_native()):
        return backend.native().code_hist(codes, bits, kernel[0], kernel[1], list(stride), list(pad_before),
                                          list(dilation), Ho, Wo)
    return _code_hist_torch(codes, bits, kernel, stride, pad_before, dilation, Ho, Wo, values)


def _code_hist_torch(codes: torch.Tensor, bits: int, kernel, stride, pad_before, dilation, Ho: int, Wo: int,
                     values: Optional[int] = None) -> torch.Tensor:
    """``_code_hist`` in torch operations (any device, labels; the C++ form's oracle in the tests).

    The outputs that tap (i, j) serves read one stride phase of the input, a rectangle of it:
    the phase's histogram, less the strips outside the rectangle (a few rows and columns at
    the borders), costs about one pass over the input instead of kh·kw.
    """
    N, C, H, W = codes.shape
    V = (1 << bits) if values is None else values
    base = (torch.arange(C, device=codes.device, dtype=torch.int32) * V).view(1, C, 1, 1)

    def hist(part):
        if part.numel() == 0:
            return torch.zeros(C, V, dtype=torch.int64, device=codes.device)
        idx = part.to(torch.int32)
        if codes.dtype == torch.int16:  # int16 holds codes >= 2^15 as negative numbers
            idx = idx & (V - 1)
        return torch.bincount((idx + base).flatten(), minlength=C * V).view(C, V)

    phases: Dict[tuple, tuple] = {}
    taps = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            window = []
            for r0, s, n_in, n_out in ((i * dilation[0] - pad_before[0], stride[0], H, Ho),
                                       (j * dilation[1] - pad_before[1], stride[1], W, Wo)):
                ph = r0 % s
                size = len(range(ph, n_in, s))
                first = (r0 - ph) // s
                window.append((ph, size, max(0, first), min(size - 1, first + n_out - 1)))
            (ph, hs, u0, u1), (pw, ws, v0, v1) = window
            if (ph, pw) not in phases:
                part = codes[:, :, ph::stride[0], pw::stride[1]]
                phases[(ph, pw)] = (part, hist(part))
            part, full = phases[(ph, pw)]
            if u0 > u1 or v0 > v1:
                taps.append(torch.zeros_like(full))
                continue
            inner = part[:, :, u0:u1 + 1]
            strips = [st for st in (part[:, :, :u0], part[:, :, u1 + 1:], inner[..., :v0], inner[..., v1 + 1:])
                      if st.numel()]
            tap = full.clone() if strips else full
            for st in strips:
                tap -= hist(st)
            taps.append(tap)
    if len(taps) == 1:
        return taps[0]
    return torch.stack(taps, 1).reshape(C * len(taps), V)


def _blocks_hist(args: tuple, Ho: int, Wo: int, counts: dict) -> tuple:
    """A convolution's dynamic per-block activations (Note: dynamic blocks in ops/reference.py),
    counted without its im2col columns: ((K, 2, span) counts of the kept logs by sign, lowest log),
    the activation counters added to ``counts``. The C++ form on the CPU (Note: telemetry's tap
    histograms in csrc/conv_cpu.cpp), else ``_blocks_hist_torch``."""
    x = args[0]
    if not (x.device.type == "cpu" and backend.has_native()):
        return _blocks_hist_torch(args, Ho, Wo, counts)
    x_offset, w, F = args[1], args[2], args[8]
    stride, pad_before, _, dilation, groups, x_block, x_block_bits = args[12:19]
    hist, lo, values, saturated, flushed = backend.native().blocks_tap_hist(
        x, int(x_offset.reshape(-1)[0]), F, groups, w.shape[2], w.shape[3], list(stride), list(pad_before),
        list(dilation), Ho, Wo, x_block, x_block_bits)
    for name, v in (("act_values", values), ("act_saturated", saturated), ("act_flushed", flushed)):
        counts[name] = counts.get(name, 0) + v
    return hist, lo


def _blocks_hist_torch(args: tuple, Ho: int, Wo: int, counts: dict) -> tuple:
    """``_blocks_hist`` in torch operations (any device; the C++ form's oracle in the tests).

    A block's offset comes from its largest finite log, which is at most its (image, group)'s
    largest, g_top; so a finite code above g_top - E_max (and within the top offset's cap) keeps
    its log in every receptive field, as a static code does, and the window histograms count
    those. The rest (below that bound, capped, ±inf: few) are counted one receptive field at a
    time, each from its own block's maximum, gathered, as the reference computes it.
    """
    x, x_offset, w = args[0], args[1], args[2]
    stride, pad_before, _, dilation, groups, x_block, x_block_bits = args[12:19]
    F = args[8]
    N, C, H, W = x.shape
    kh, kw = w.shape[2:]
    Cg, taps = C // groups, kh * kw
    Kg = Cg * taps
    e_wide = (1 << 15) - 1
    e_max = (1 << (x_block_bits - 1)) - 1
    R = 1 << F
    off_min, off_max = -126 * R - 1, 127 * R - e_max
    x_off = int(x_offset.reshape(-1)[0])
    c = x.to(torch.int32) & 0xFFFF
    mag, neg = c & e_wide, c > e_wide
    g = mag + x_off
    inf = mag == e_wide
    finite = (mag > 0) & ~inf
    low = torch.iinfo(torch.int32).min
    top = torch.where(finite, g, low).view(N, groups, -1).amax(-1)  # g_top per (image, group)
    top = torch.where(top == low, 0, top)
    lo_ok = torch.maximum(top - e_max, torch.full_like(top, off_min)) + 1  # kept everywhere at or above ...
    hi_ok = off_max + e_max  # ... and at or below
    bound = lo_ok.repeat_interleave(Cg, 1).view(N, C, 1, 1)
    odd = inf | (finite & ((g < bound) | (g > hi_ok)))
    normal = finite & ~odd
    lo = int(torch.where(normal, g, torch.iinfo(torch.int32).max).amin())
    hi = int(torch.where(normal, g, low).amax())
    if hi < lo:  # nothing normal
        lo = hi = 0
    span = hi - lo + 1
    labels = torch.where(normal, g - lo + 1 + neg.to(torch.int32) * (span + 1), 0)  # 0: no product here
    hist = _code_hist(labels, 0, (kh, kw), stride, pad_before, dilation, Ho, Wo, values=2 * (span + 1))
    hist = hist.view(C * taps, 2, span + 1)[:, :, 1:].clone()
    counts["act_values"] = counts.get("act_values", 0) + int(hist.sum())
    where = odd.nonzero()
    if where.shape[0]:  # each receptive field that reads an odd code: its block, as the reference encodes it
        n, ch, y, xx = where.unbind(1)
        for t in range(taps):
            i, j = divmod(t, kw)
            oy, ox = y + pad_before[0] - i * dilation[0], xx + pad_before[1] - j * dilation[1]
            ok = (oy % stride[0] == 0) & (ox % stride[1] == 0)
            oy, ox = oy // stride[0], ox // stride[1]
            ok &= (oy >= 0) & (oy < Ho) & (ox >= 0) & (ox < Wo)
            if not bool(ok.any()):
                continue
            nn_, cc, py, px = n[ok], ch[ok], oy[ok], ox[ok]
            grp, k = cc // Cg, (cc % Cg) * taps + t
            first = (k // x_block) * x_block
            ks = first[:, None] + torch.arange(x_block, device=x.device)  # the block's k
            inside = ks < Kg
            ks = ks.clamp(max=Kg - 1)
            c2 = grp[:, None] * Cg + ks // taps
            i2, j2 = (ks % taps) // kw, (ks % taps) % kw
            yy = py[:, None] * stride[0] - pad_before[0] + i2 * dilation[0]
            xw = px[:, None] * stride[1] - pad_before[1] + j2 * dilation[1]
            inside &= (yy >= 0) & (yy < H) & (xw >= 0) & (xw < W)
            m2 = mag[nn_[:, None].expand_as(c2), c2, yy.clamp(0, H - 1), xw.clamp(0, W - 1)]
            fin2 = inside & (m2 > 0) & (m2 != e_wide)
            gmax = torch.where(fin2, m2 + x_off, low).amax(1)
            gmax = torch.where(gmax == low, 0, gmax)
            off_b = (gmax - e_max).clamp(off_min, off_max)
            gi = g[nn_, cc, y[ok], xx[ok]]
            is_inf = inf[nn_, cc, y[ok], xx[ok]]
            g_eff = torch.where(is_inf, off_b + e_max, torch.minimum(gi, off_b + e_max))
            keep = g_eff - off_b >= 1
            sat = is_inf | (gi > off_b + e_max)
            counts["act_values"] += int(ok.sum())
            counts["act_saturated"] = counts.get("act_saturated", 0) + int(sat.sum())
            counts["act_flushed"] = counts.get("act_flushed", 0) + int((~is_inf & ~keep).sum())
            if bool(keep.any()):  # add the kept ones to the histogram (widened to take them)
                gk, sk, kk = g_eff[keep], neg[nn_, cc, y[ok], xx[ok]][keep].to(torch.int64), (grp * Kg + k)[keep]
                new_lo, new_hi = min(lo, int(gk.min())), max(hi, int(gk.max()))
                if new_lo < lo or new_hi > hi:
                    hist = torch.nn.functional.pad(hist, (lo - new_lo, new_hi - hi))
                    lo, hi = new_lo, new_hi
                    span = hi - lo + 1
                flat = hist.view(-1)
                flat.index_add_(0, (kk * 2 + sk) * span + (gk.to(torch.int64) - lo),
                                torch.ones_like(kk))
    counts.setdefault("act_saturated", 0)
    counts.setdefault("act_flushed", 0)
    return hist, lo


# ----------------------------------------------------------------------------------------
# the observer and the context manager
# ----------------------------------------------------------------------------------------
class Telemetry:
    """Counts what ``qmodel``'s chip layers do while it is entered (see Note: telemetry counters).

    ``with torchlns.telemetry(qmodel) as t: qmodel(x)`` then ``t.report()``. ``reference``:
    the float model, for each layer's SQNR against its float layer.
    """

    def __init__(self, qmodel: nn.Module, reference: Optional[nn.Module] = None):
        if not isinstance(qmodel, nn.Module):
            raise TypeError(f"telemetry needs an nn.Module, got {type(qmodel).__name__}")
        self.qmodel = qmodel
        self.layers = {fqn: m for fqn, m in qmodel.named_modules()
                       if isinstance(m, _CodedLayer) and isinstance(m.fmt, LNSFormat)}
        if not self.layers:
            raise ValueError("telemetry: the model has no LNS chip layers (convert it with torchlns.convert)")
        self.floats: Dict[str, nn.Module] = {}
        if reference is not None:
            from ..transforms.fold import fold_batchnorm

            with warnings.catch_warnings():  # a reference without batch norm is no news here
                warnings.simplefilter("ignore")
                self.floats = dict(fold_batchnorm(reference).named_modules())
        self.rows: Dict[str, LayerTelemetry] = {}
        self._current: List[tuple] = []  # (fqn, layer, counts of this call, whether the C++ epilogue counts)
        self._handles: list = []
        self._held = None

    # -- entering ---------------------------------------------------------------------------
    def __enter__(self) -> "Telemetry":
        if self._handles:
            raise RuntimeError("this telemetry is already counting")
        for fqn, m in self.layers.items():
            self._handles.append(m.register_forward_pre_hook(self._before(fqn, m), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._after(fqn, m), with_kwargs=True))
        self._held = functional.set_observer(self)
        return self

    def __exit__(self, *exc) -> None:
        while self._current:  # a forward that raised left its layer open
            if self._current.pop()[3]:
                backend.native().telemetry_stop()
        functional.set_observer(self._held)
        for h in self._handles:
            h.remove()
        self._handles = []

    def report(self) -> TelemetryReport:
        return TelemetryReport(list(self.rows.values()))

    # -- per layer call ---------------------------------------------------------------------
    def _row(self, fqn: str, m: _CodedLayer) -> LayerTelemetry:
        if fqn not in self.rows:
            mac = m.mac
            self.rows[fqn] = LayerTelemetry(fqn, str(m.fmt), repr(mac), mac.acc_max if mac.fixed else 0,
                                            chunk_max=2 ** (mac.chunk_width - 1) - 1 if mac.fixed and mac.chunk else 0)
        return self.rows[fqn]

    def _native_totals(self, m: _CodedLayer, device) -> bool:
        return m.mac.fixed and device.type == "cpu" and backend.has_native()

    def _before(self, fqn, m):
        def hook(module, args, kwargs):
            counts: dict = {}
            x = args[0] if args else next(iter(kwargs.values()))
            native = self._native_totals(m, x.device)
            if native:
                backend.native().telemetry_start()
            self._current.append((fqn, m, counts, native))
        return hook

    def _after(self, fqn, m):
        def hook(module, args, kwargs, out):
            _, _, counts, native = self._current.pop()
            if native:
                c = backend.native().telemetry_stop()
                finite = out.numel() - int(torch.isnan(out).sum())
                if not finite <= c["outputs"] <= out.numel():
                    raise RuntimeError(f"telemetry: {fqn}: the accumulator reported {c['outputs']} totals for "
                                       f"{out.numel()} outputs (a kernel finished some outputs twice)")
                counts.update(totals=c["outputs"], total_overflow=c["overflow"], max_total=c["max_abs"])
                if m.mac.chunk:
                    counts.update(chunks=c["chunks"], chunk_overflow=c["chunk_overflow"], max_chunk=c["max_chunk"])
            row = self._row(fqn, m)
            row.calls += 1
            row.add(counts)
            ref = self._float_layer(fqn, m, args, kwargs, out)
            signal, noise = _energies(out.detach().float().flatten(), ref.detach().float().flatten())
            row.signal += signal
            row.noise += noise
        return hook

    def _float_layer(self, fqn, m, args, kwargs, out) -> torch.Tensor:
        held = functional.set_observer(None)
        try:
            with torch.no_grad():
                f = self.floats.get(fqn)
                if f is not None:
                    y = f(*args, **kwargs)
                    if isinstance(y, torch.Tensor) and y.shape == out.shape:
                        return y
                return m.fake_forward(*args, quantize_input=False, **kwargs)
        finally:
            functional.set_observer(held)

    def _counts(self) -> Optional[tuple]:
        return self._current[-1] if self._current else None

    # -- the observer (Note: MAC observers in functional.py) --------------------------------
    def encoded(self, x: torch.Tensor, coded) -> None:
        cur = self._counts()
        fmt = coded.fmt
        if cur is None or not isinstance(fmt, LNSFormat):
            return
        c = cur[2]
        if coded.param.numel() == 1:  # one offset: two thresholds on |x|, found once
            off = int(coded.param.reshape(-1)[0])
            sat, flush = _threshold(fmt, off + fmt.e_max + 1), _threshold(fmt, off + 1)
            x32 = x.detach().to(torch.float32)
            if x32.device.type == "cpu" and backend.has_native():  # one pass
                counts = backend.native().act_counts(x32, flush, sat)
            else:  # NaN > 0, NaN >= t and NaN < t are all false
                a = x32.abs()
                counts = [int(torch.count_nonzero(v)) for v in (a > 0, a >= sat, (a > 0) & (a < flush))]
            for name, v in zip(("act_values", "act_saturated", "act_flushed"), counts):
                c[name] = c.get(name, 0) + v
            return
        off = coded.expanded_param().to(torch.int64)
        xf = x.to(torch.float32)
        nonzero = (xf != 0) & ~torch.isnan(xf)
        inf = torch.isinf(xf)
        finite = nonzero & ~inf
        e = fmt.integer_log(xf.abs()).to(torch.int64) - off
        for name, v in (("act_values", nonzero), ("act_saturated", inf | (finite & (e > fmt.e_max))),
                        ("act_flushed", finite & (e < 1))):
            c[name] = c.get(name, 0) + int(v.sum())

    def mm(self, x, w, bias, mac: MACConfig, acc_lsb) -> None:
        cur = self._counts()
        if cur is None or not mac.fixed:
            return
        fqn, m, counts, native = cur
        F = x.fmt.frac_bits
        args = (x.codes, x.expanded_param().to(torch.int32), w.codes, w.expanded_param().to(torch.int32),
                mac.table(F, x.codes.device), bias, x.fmt.bits, w.fmt.bits, F, True, mac.acc_bits, acc_lsb)
        _ProductCounter(counts, mac, cache=_weight_cache(m))(*args)
        if not native:  # no epilogue that counts sees the totals (another device): the reference counts them
            two = (mac.overflow, mac.chunk, mac.chunk_bits) if mac.two_stage else ()
            with reference.telemetry_sink(counts):
                reference.lns_mm_reference(*args, *two)

    def conv(self, args: tuple, mac: MACConfig, fmt) -> None:
        cur = self._counts()
        if cur is None:
            return
        fqn, m, counts, native = cur
        blocks = len(args) > 17 and args[17] > 0
        if not (mac.fixed or blocks):
            return
        then = reference.lns_mm_reference if mac.fixed and not native else None
        counter = _ProductCounter(counts if mac.fixed else {}, mac, then, _weight_cache(m))
        x, x_off, w, w_off, table, _, x_bits, w_bits, F = args[:9]
        if x.dim() == 4 and then is None and (blocks or x_off.numel() == 1):  # 2-D, by windows (no columns)
            stride, pad_before, pad_after, dilation, groups = args[12:17]
            Ho, Wo = (conv_output_size(x.shape[2 + d], w.shape[2 + d], stride[d], pad_before[d], pad_after[d],
                                       dilation[d]) for d in range(2))
            if blocks:
                (hist, lo), logs = _blocks_hist(args, Ho, Wo, counts), True
            else:
                hist, lo, logs = _code_hist(x, x_bits, w.shape[2:], stride, pad_before, dilation, Ho, Wo), \
                    int(x_off.reshape(-1)[0]), False
            if mac.fixed:
                per_element = w_off.numel() == w.numel()
                counter.tally(hist, lo, x_bits, w.reshape(w.shape[0], -1),
                              w_off.reshape(w.shape[0], -1) if per_element else w_off.reshape(-1, 1), w_bits, table, F,
                              args[11], groups=groups, logs=logs)
            return
        with reference.telemetry_sink(counts):  # the blocks' codes and, without C++, the totals
            reference.lns_conv_reference(*args, mm=counter)


_WEIGHTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _weight_cache(layer: Optional[nn.Module]) -> dict:
    """A chip layer's weight histograms (see _ProductCounter.weight_hist), kept across telemetry
    passes while the layer holds the same weight object (held here, so that its storage, which
    keys the entries with its version, cannot be reused by another tensor). A layer that
    re-encodes a float master on every call (training) gets none."""
    weight = getattr(layer, "weight", None)
    if layer is None or weight is None or (layer.training and layer._master() is not None):
        return {}
    held = _WEIGHTS.get(layer)
    if held is None or held[0] is not weight:
        held = _WEIGHTS[layer] = (weight, {})
    return held[1]


def telemetry(qmodel: nn.Module, data=None, *, reference: Optional[nn.Module] = None, forward_fn=None):
    """The datapath's counters of ``qmodel`` over ``data`` (see Note: telemetry counters).

    ``data``: items as ``torchlns.convert`` takes them; the model runs each once, in eval mode
    and without gradients, and a ``TelemetryReport`` comes back. Without ``data``, a
    ``Telemetry`` context manager: ``with torchlns.telemetry(qmodel) as t: ...; t.report()``.
    """
    t = Telemetry(qmodel, reference)
    if data is None:
        return t
    from ..transforms.convert import call_model

    modes = {mod: mod.training for mod in qmodel.modules()}
    try:
        qmodel.eval()
        with torch.no_grad(), t:
            for item in data:
                call_model(qmodel, item, forward_fn)
    finally:
        for mod, mode in modes.items():
            mod.training = mode
    return t.report()
