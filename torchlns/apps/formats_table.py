"""``python -m torchlns formats``: representation and layer errors of every format, in one table.

1. A heavy-tailed random tensor (N(0,1), with 1% of the values scaled up by a log-uniform
   factor of 1..64) is encoded and decoded in LNS8, LNS8 with Mitchell rounding, FP8 e4m3,
   FP8 e5m2 and INT8, each with its per-tensor default offset or scale.
2. A seeded ``nn.Linear(256, 128)`` and ``nn.Conv2d(16, 32, 3, padding=1)`` are run on random
   inputs through ``lns_linear`` / ``lns_conv2d``: the LNS formats under the ideal MAC
   (``IDEAL_MAC``) and the chip MAC (``CHIP_MAC``: 8-bit LUT, 32-bit fixed accumulator),
   FP8 and INT8 as spec section 5 defines their MACs. Operands are encoded per tensor.

Every error is measured against float32.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import List, Optional, TextIO

import torch
import torch.nn.functional as F
from torch import nn

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, FP8_E5M2, IDEAL_MAC, INT8, LNS8, LNSFormat, MACConfig

from .._text import format_table
from ..metrics import sqnr
from ..ops import backend_info
from ..transforms.calibration import acc_lsb_for

__all__ = ["DemoRow", "run_demo", "heavy_tailed"]

LNS8_MITCHELL = LNSFormat(8, 3, "mitchell")

# (label, format, [(MAC label, MACConfig), ...])
CASES = [
    ("LNS8", LNS8, [("ideal", IDEAL_MAC), ("chip", CHIP_MAC)]),
    ("LNS8 mitchell", LNS8_MITCHELL, [("ideal", IDEAL_MAC), ("chip", CHIP_MAC)]),
    ("FP8 e4m3", FP8_E4M3, [("fp32 acc", IDEAL_MAC)]),
    ("FP8 e5m2", FP8_E5M2, [("fp32 acc", IDEAL_MAC)]),
    ("INT8", INT8, [("int acc", IDEAL_MAC)]),
]


@dataclass
class DemoRow:
    format: str
    mac: str
    encode_sqnr_db: float
    max_rel_err: float
    flushed_pct: float
    linear_sqnr_db: float
    conv_sqnr_db: float


def heavy_tailed(n: int, generator: torch.Generator) -> torch.Tensor:
    """N(0,1) with 1% of the values multiplied by a log-uniform factor in [1, 64]."""
    x = torch.randn(n, generator=generator)
    tail = torch.rand(n, generator=generator) < 0.01
    boost = torch.exp2(6.0 * torch.rand(n, generator=generator))
    return torch.where(tail, x * boost, x)


def _all_codes(fmt) -> torch.Tensor:
    """Every valid code of an 8-bit format."""
    if fmt.integer:  # symmetric integers: -qmax..qmax
        return torch.arange(-fmt.qmax, fmt.qmax + 1, dtype=torch.int32).to(fmt.code_dtype)
    return torch.arange(1 << fmt.bits, dtype=torch.int32).to(fmt.code_dtype)


def _encode_errors(x: torch.Tensor, fmt) -> tuple:
    """(SQNR dB, max relative error of the values not flushed inside the representable range,
    % of nonzeros flushed to 0)."""
    param = torchlns.calibrate(x, fmt)
    xq = torchlns.decode(torchlns.encode(x, fmt, param), fmt, param)
    # The representable magnitudes at this offset/scale: smallest nonzero .. largest finite.
    mags = torchlns.decode(_all_codes(fmt), fmt, param.reshape(-1)[:1]).abs()
    mags = mags[torch.isfinite(mags) & (mags > 0)]
    lo, hi = mags.min(), mags.max()
    ax = x.abs()
    nonzero = ax > 0
    flushed = nonzero & (xq == 0)
    # Flushes (counted separately) are left out: a Mitchell encoder, whose log2(1+f) ~ f
    # underestimates, flushes some values just above the smallest magnitude.
    inside = (ax >= lo) & (ax <= hi) & ~flushed
    rel = ((xq - x).abs() / ax)[inside]
    flushed = flushed.sum().item() / max(1, nonzero.sum().item())
    return sqnr(xq, x), rel.max().item(), 100.0 * flushed




def _acc_lsb(y_float: torch.Tensor, fmt, mac: MACConfig) -> Optional[int]:
    """The fixed accumulator's LSB as torchlns.convert calibrates it: the largest output fits with one bit to spare."""
    if not fmt.needs_acc_lsb(mac):
        return None
    return acc_lsb_for(y_float.abs().max().item(), mac, headroom_bits=1)


def _format_table(rows: List[DemoRow]) -> str:
    header = ["format", "MAC", "enc SQNR dB", "max rel err", "flushed %", "linear SQNR dB", "conv2d SQNR dB"]
    body = [[r.format, r.mac, f"{r.encode_sqnr_db:.2f}", f"{r.max_rel_err:.4f}", f"{r.flushed_pct:.3f}",
             f"{r.linear_sqnr_db:.2f}", f"{r.conv_sqnr_db:.2f}"] for r in rows]
    return format_table(header, body, right=range(2, len(header)))


def run_demo(n: int = 1 << 20, seed: int = 0, file: TextIO = None) -> List[DemoRow]:
    """Run the demo, print its table to ``file`` (stdout by default) and return the rows."""
    out = file if file is not None else sys.stdout
    t0 = time.perf_counter()
    info = backend_info()
    print(
        f"torchlns {torchlns.__version__} | torch {info['torch_version']} | "
        f"cpu backend: {info['cpu']} | {torch.get_num_threads()} threads",
        file=out,
    )

    g = torch.Generator().manual_seed(seed)
    x = heavy_tailed(n, g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(256, 128)
        conv = nn.Conv2d(16, 32, 3, padding=1)
    x_lin = torch.randn(64, 256, generator=g)
    x_conv = torch.randn(2, 16, 32, 32, generator=g)
    with torch.no_grad():
        w_lin, b_lin = linear.weight.detach(), linear.bias.detach()
        w_conv, b_conv = conv.weight.detach(), conv.bias.detach()
        y_lin = F.linear(x_lin, w_lin, b_lin)
        y_conv = F.conv2d(x_conv, w_conv, b_conv, padding=1)

    rows = []
    for label, fmt, macs in CASES:
        enc_sqnr, max_rel, flushed = _encode_errors(x, fmt)
        xl = torchlns.CodedTensor.from_float(x_lin, fmt)
        wl = torchlns.CodedTensor.from_float(w_lin, fmt)
        xc = torchlns.CodedTensor.from_float(x_conv, fmt)
        wc = torchlns.CodedTensor.from_float(w_conv, fmt)
        for mac_label, mac in macs:
            yl = torchlns.lns_linear(xl, wl, b_lin, mac, acc_lsb=_acc_lsb(y_lin, fmt, mac))
            yc = torchlns.lns_conv2d(xc, wc, b_conv, padding=1, mac=mac, acc_lsb=_acc_lsb(y_conv, fmt, mac))
            rows.append(
                DemoRow(label, mac_label, enc_sqnr, max_rel, flushed, sqnr(yl, y_lin), sqnr(yc, y_conv))
            )

    print(
        f"\nencode: {n} values, N(0,1) with a 1% tail up to 64x, per-tensor offset/scale from max|x|\n"
        "layers: Linear(256->128) on 64x256, Conv2d(16->32, 3x3, pad 1) on 2x16x32x32, "
        "operands encoded per tensor\n"
        "MAC ideal = MAC(exact, float32); chip = MAC(lut8, fixed32), acc_lsb calibrated as torchlns.convert does "
        "(the largest output fits with one bit to spare)\n"
        "max rel err: over |x| inside the representable range, flushes excluded; flushed %: nonzeros encoded as 0\n",
        file=out,
    )
    print(_format_table(rows), file=out)
    print(f"\n({time.perf_counter() - t0:.1f} s)", file=out)
    return rows
