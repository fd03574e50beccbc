"""Reference MAC: ``lns_linear`` at (M, K, N) = (256, 1024, 256) against float32 F.linear."""

import math

import pytest
import torch
import torch.nn.functional as F

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, IDEAL_MAC, INT8, LNS8

M, K, N = 256, 1024, 256


@pytest.fixture(scope="module")
def operands():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    b = torch.randn(N, generator=g)
    return x, w, b




@pytest.mark.benchmark(group="linear 256x1024x256")
def test_linear_torch_float32(benchmark, operands):
    benchmark.extra_info["baseline"] = True
    x, w, b = operands
    benchmark(F.linear, x, w, b)


@pytest.mark.benchmark(group="linear 256x1024x256")
@pytest.mark.parametrize(
    "fmt,mac",
    [(LNS8, IDEAL_MAC), (LNS8, CHIP_MAC), (FP8_E4M3, IDEAL_MAC), (INT8, IDEAL_MAC)],
    ids=["LNS8-ideal", "LNS8-chip", "FP8e4m3", "INT8"],
)
def test_lns_linear(benchmark, operands, fmt, mac):
    x, w, b = operands
    xq, wq = torchlns.CodedTensor.from_float(x, fmt), torchlns.CodedTensor.from_float(w, fmt)
    acc_lsb = None
    if fmt.kind == "lns" and mac.accumulator == "fixed":
        y_float = F.linear(x, w, b)
        acc_lsb = math.floor(math.log2(y_float.abs().max().item())) - (mac.acc_bits - 3)
    y = benchmark(torchlns.lns_linear, xq, wq, b, mac, acc_lsb=acc_lsb)
    assert y.shape == (M, N) and torch.isfinite(y).all()
