"""Encode one conv layer for the chip and compare the MAC configurations.

    python examples/encode_layer.py

Weights get per-channel offsets, activations a per-tensor offset calibrated from their own
maximum; the layer then runs with the ideal MAC (exact conversion, float32 accumulation)
and the chip preset (8-bit LUT, 32-bit fixed-point accumulator).
"""

import math

import torch
import torch.nn.functional as F

import torchlns


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    noise = (ref - got).double().pow(2).sum()
    return float("inf") if noise == 0 else 10 * math.log10(ref.double().pow(2).sum() / noise)


def main():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(4, 16, 20, 20).relu()
    y_float = conv(x).detach()

    w = torchlns.LNSTensor.from_float(conv.weight, torchlns.LNS8, granularity="channel")
    a = torchlns.LNSTensor.from_float(x, torchlns.LNS8)
    print(w)
    print(a)

    # The fixed accumulator needs the exponent of its LSB: leave one bit of headroom above
    # the largest output.
    acc_lsb = math.floor(math.log2(y_float.abs().max())) - (torchlns.CHIP_MAC.acc_bits - 3)
    for name, mac, lsb in [("ideal", torchlns.IDEAL_MAC, None), ("chip", torchlns.CHIP_MAC, acc_lsb)]:
        y = torchlns.lns_conv2d(a, w, conv.bias.detach(), padding=1, mac=mac, acc_lsb=lsb)
        print(f"{name:>5} {mac!r:<22} output SQNR vs float: {sqnr_db(y_float, y):5.1f} dB")

    # The ideal MAC converts each product from the sum of the logs, so it differs from a
    # float conv of the decoded operands only by the rounding of the decode table (2^-24).
    y_ideal = torchlns.lns_conv2d(a, w, conv.bias.detach(), padding=1)
    y_deq = F.conv2d(a.dequantize(), w.dequantize(), conv.bias.detach(), padding=1)
    print(f"ideal MAC vs float conv of the decoded operands: max |diff| = {(y_ideal - y_deq).abs().max():.2e}")


if __name__ == "__main__":
    main()
