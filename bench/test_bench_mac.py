"""The MAC at the issue's benchmark shapes: native kernels against torch and the reference.

Groups (baseline = torch's float32 layer, measured in the same run):
  linear 512x1024x1024   lns_linear, operands already encoded
  conv2d 8x64x56x56      lns_conv2d 64->64, 3x3, padding 1
The reference rows run the same public call inside ``ops.reference_kernels()``, once (it
takes seconds): their ratio to the native rows is the kernel's speed-up.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import torchlns
from torchlns import CHIP_MAC, IDEAL_MAC, LNS8, MACConfig, ops

LUT_FLOAT = MACConfig(conversion="lut", lut_bits=8)


def _acc_lsb(y: torch.Tensor, mac: MACConfig):
    return math.floor(math.log2(y.abs().max().item())) - (mac.acc_bits - 3) if mac.accumulator == "fixed" else None


@pytest.fixture(scope="module")
def linear_operands():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(512, 1024, generator=g), torch.randn(1024, 1024, generator=g) / 32
    xq = torchlns.LNSTensor.from_float(x, LNS8)
    wq = torchlns.LNSTensor.from_float(w, LNS8, granularity="channel")
    return x, w, xq, wq, F.linear(x, w)


@pytest.mark.benchmark(group="linear 512x1024x1024")
def test_linear_torch_float32(benchmark, linear_operands):
    benchmark.extra_info["baseline"] = True
    x, w, *_ = linear_operands
    benchmark(F.linear, x, w)


@pytest.mark.benchmark(group="linear 512x1024x1024")
@pytest.mark.parametrize("mac", [IDEAL_MAC, LUT_FLOAT, CHIP_MAC], ids=repr)
def test_lns_linear(benchmark, linear_operands, mac):
    _, _, xq, wq, y = linear_operands
    benchmark(torchlns.lns_linear, xq, wq, None, mac, acc_lsb=_acc_lsb(y, mac))


@pytest.mark.benchmark(group="linear 512x1024x1024")
@pytest.mark.parametrize("mac", [IDEAL_MAC, CHIP_MAC], ids=repr)
def test_lns_linear_reference(benchmark, linear_operands, mac):
    _, _, xq, wq, y = linear_operands
    with ops.reference_kernels():
        benchmark.pedantic(torchlns.lns_linear, (xq, wq, None, mac), {"acc_lsb": _acc_lsb(y, mac)}, rounds=1)


@pytest.fixture(scope="module")
def conv_operands():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 64, 56, 56, generator=g).relu(), torch.randn(64, 64, 3, 3, generator=g) / 24
    xq = torchlns.LNSTensor.from_float(x, LNS8)
    wq = torchlns.LNSTensor.from_float(w, LNS8, granularity="channel")
    return x, w, xq, wq, F.conv2d(x, w, padding=1)


@pytest.mark.benchmark(group="conv2d 8x64x56x56")
def test_conv2d_torch_float32(benchmark, conv_operands):
    benchmark.extra_info["baseline"] = True
    x, w, *_ = conv_operands
    benchmark(F.conv2d, x, w, None, 1, 1)


@pytest.mark.benchmark(group="conv2d 8x64x56x56")
@pytest.mark.parametrize("mac", [IDEAL_MAC, CHIP_MAC], ids=repr)
def test_lns_conv2d(benchmark, conv_operands, mac):
    _, _, xq, wq, y = conv_operands
    benchmark.pedantic(torchlns.lns_conv2d, (xq, wq, None, 1, 1), {"mac": mac, "acc_lsb": _acc_lsb(y, mac)}, rounds=3)


@pytest.mark.benchmark(group="conv2d 8x64x56x56")
def test_lns_conv2d_reference(benchmark, conv_operands):
    _, _, xq, wq, _ = conv_operands
    with ops.reference_kernels():
        benchmark.pedantic(torchlns.lns_conv2d, (xq, wq, None, 1, 1), rounds=1)


# Wider formats and dynamic activations against LNS8 F=3 static on the same conv layer
# (issue 27's targets: F <= 6 and bits <= 12 within 2x, dynamic per-block within 1.5x).
WIDE = [torchlns.LNSFormat(8, 4), torchlns.LNSFormat(10, 5), torchlns.LNSFormat(12, 6)]


@pytest.mark.benchmark(group="conv2d 8x64x56x56 formats (baseline LNS8 F=3)")
@pytest.mark.parametrize("mac", [IDEAL_MAC, CHIP_MAC], ids=repr)
def test_conv2d_lns8_f3_baseline(benchmark, conv_operands, mac):
    _, _, xq, wq, y = conv_operands
    benchmark.extra_info["baseline"] = mac is IDEAL_MAC
    benchmark.pedantic(torchlns.lns_conv2d, (xq, wq, None, 1, 1), {"mac": mac, "acc_lsb": _acc_lsb(y, mac)}, rounds=3)


@pytest.mark.benchmark(group="conv2d 8x64x56x56 formats (baseline LNS8 F=3)")
@pytest.mark.parametrize("mac", [IDEAL_MAC, CHIP_MAC], ids=repr)
@pytest.mark.parametrize("fmt", WIDE, ids=str)
def test_conv2d_wide_format(benchmark, conv_operands, fmt, mac):
    x, w, _, _, y = conv_operands
    xq, wq = torchlns.LNSTensor.from_float(x, fmt), torchlns.LNSTensor.from_float(w, fmt, granularity="channel")
    benchmark.pedantic(torchlns.lns_conv2d, (xq, wq, None, 1, 1), {"mac": mac, "acc_lsb": _acc_lsb(y, mac)}, rounds=3)


@pytest.mark.benchmark(group="conv2d 8x64x56x56 activations (baseline static)")
@pytest.mark.parametrize("block", [None, 32], ids=["static", "dynamic32"])
def test_conv2d_dynamic_activations(benchmark, conv_operands, block):
    x, _, _, wq, _ = conv_operands
    benchmark.extra_info["baseline"] = block is None
    benchmark.pedantic(torchlns.lns_conv2d, (x, wq, None, 1, 1), {"x_block_size": block, "fmt": LNS8}, rounds=3)


@pytest.fixture(scope="module")
def depthwise_operands():
    """A MobileNetV2-like 3x3 depthwise layer on ReLU6 outputs (8x144x56x56)."""
    g = torch.Generator().manual_seed(1)
    x = (2 * torch.randn(8, 144, 56, 56, generator=g)).clamp(0, 6)
    return x, torchlns.LNSTensor.from_float(torch.randn(144, 1, 3, 3, generator=g) / 3, LNS8, granularity="channel")


@pytest.mark.benchmark(group="depthwise 8x144x56x56 activations (baseline static)")
@pytest.mark.parametrize("block", [None, 32], ids=["static", "dynamic32"])
def test_depthwise_dynamic_activations(benchmark, depthwise_operands, block):
    # Dynamic blocks of narrow groups run the static kernel and repair the positions a block
    # changes (see Note: dynamic blocks by repair in csrc/conv_cpu.cpp).
    x, wq = depthwise_operands
    benchmark.extra_info["baseline"] = block is None
    benchmark.pedantic(torchlns.lns_conv2d, (x, wq, None, 1, 1, 1, 144), {"x_block_size": block, "fmt": LNS8},
                       rounds=3)
