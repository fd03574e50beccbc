"""The GPU MAC at the issue-13 shapes (CUDA only; ``python -m torchlns gpu-check`` runs the
same measurements with the targets beside them).

Groups (baseline = torch's float32 product with TF32 off, measured in the same run):
  mm 4096^3        lns_linear, operands already encoded, against x @ w.T (and bf16)
  conv2d 64x64x56x56 3x3   lns_conv2d, against F.conv2d (and bf16)
Each call synchronises the device, so the medians are kernel times plus one launch.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import torchlns
from torchlns import CHIP_MAC, IDEAL_MAC, LNS8, MACConfig
from torchlns.ops.dense import _ieee_float32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks: run them on a CUDA machine")
LUT_FLOAT = MACConfig(conversion="lut", lut_bits=8)


def synced(fn):
    def call():
        fn()
        torch.cuda.synchronize()
    return call


@pytest.fixture(scope="module")
def mm_operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 4096, generator=g).cuda()
    w = (torch.randn(4096, 4096, generator=g) / 64).cuda()
    lsb = math.floor(math.log2(float((x @ w.T).abs().max()))) - (CHIP_MAC.acc_bits - 3)
    return x, w, torchlns.LNSTensor.from_float(x, LNS8), torchlns.LNSTensor.from_float(w, LNS8, granularity="channel"), lsb


@pytest.mark.benchmark(group="mm 4096^3")
def test_mm_torch_float32_ieee(benchmark, mm_operands):
    benchmark.extra_info["baseline"] = True
    x, w, *_ = mm_operands
    with _ieee_float32():
        benchmark(synced(lambda: x @ w.T))


@pytest.mark.benchmark(group="mm 4096^3")
def test_mm_torch_bf16(benchmark, mm_operands):
    x, w, *_ = mm_operands
    xb, wb = x.bfloat16(), w.bfloat16()
    benchmark(synced(lambda: xb @ wb.T))


@pytest.mark.parametrize("name,mac", [("ideal", IDEAL_MAC), ("lut8 float32", LUT_FLOAT), ("chip", CHIP_MAC)])
@pytest.mark.benchmark(group="mm 4096^3")
def test_mm_lns(benchmark, mm_operands, name, mac):
    *_, xq, wq, lsb = mm_operands
    benchmark(synced(lambda: torchlns.lns_linear(xq, wq, None, mac, acc_lsb=lsb if mac.fixed else None)))


@pytest.fixture(scope="module")
def conv_operands():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 64, 56, 56, generator=g).relu().cuda()
    w = (torch.randn(64, 64, 3, 3, generator=g) / 24).cuda()
    with _ieee_float32():
        lsb = math.floor(math.log2(float(F.conv2d(x, w, None, 1, 1).abs().max()))) - (CHIP_MAC.acc_bits - 3)
    return x, w, torchlns.LNSTensor.from_float(x, LNS8), torchlns.LNSTensor.from_float(w, LNS8, granularity="channel"), lsb


@pytest.mark.benchmark(group="conv2d 64x64x56x56 3x3")
def test_conv_torch_float32_ieee(benchmark, conv_operands):
    benchmark.extra_info["baseline"] = True
    x, w, *_ = conv_operands
    with _ieee_float32():
        benchmark(synced(lambda: F.conv2d(x, w, None, 1, 1)))


@pytest.mark.parametrize("name,mac", [("ideal", IDEAL_MAC), ("chip", CHIP_MAC)])
@pytest.mark.benchmark(group="conv2d 64x64x56x56 3x3")
def test_conv_lns(benchmark, conv_operands, name, mac):
    *_, xq, wq, lsb = conv_operands
    benchmark(synced(lambda: torchlns.lns_conv2d(xq, wq, None, 1, 1, mac=mac, acc_lsb=lsb if mac.fixed else None)))
