"""Codec throughput on 16M float32 elements, against torch's own float8 casts.

Groups ``encode`` and ``decode``; the baselines are ``x.to(torch.float8_e4m3fn)`` and
``codes.to(torch.float32)``, measured in the same run.
"""

import pytest
import torch

import torchlns
from torchlns import FP8_E4M3, INT8, LNS8, LNSFormat, ops

LNS8_MITCHELL = LNSFormat(8, 3, "mitchell")

N = 1 << 24


@pytest.fixture(scope="module")
def x():
    return torch.randn(N, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def params(x):
    return {fmt: torchlns.calibrate(x, fmt) for fmt in (LNS8, LNS8_MITCHELL, FP8_E4M3, INT8)}


# -- encode -------------------------------------------------------------------------------
@pytest.mark.benchmark(group="encode 16M")
def test_encode_torch_float8_e4m3fn(benchmark, x):
    benchmark.extra_info["baseline"] = True
    benchmark(x.to, torch.float8_e4m3fn)


@pytest.mark.benchmark(group="encode 16M")
@pytest.mark.parametrize("fmt", [LNS8, LNS8_MITCHELL, FP8_E4M3, INT8], ids=repr)
def test_encode(benchmark, x, params, fmt):
    codes = benchmark(torchlns.encode, x, fmt, params[fmt])
    assert codes.shape == x.shape and codes.dtype == fmt.code_dtype


@pytest.mark.benchmark(group="encode 16M")
def test_encode_reference(benchmark, x, params):
    with ops.reference_kernels():
        benchmark.pedantic(torchlns.encode, (x, LNS8, params[LNS8]), rounds=3)


# -- decode -------------------------------------------------------------------------------
@pytest.mark.benchmark(group="decode 16M")
def test_decode_torch_float8_e4m3fn(benchmark, x):
    benchmark.extra_info["baseline"] = True
    f8 = x.to(torch.float8_e4m3fn)
    benchmark(f8.to, torch.float32)


@pytest.mark.benchmark(group="decode 16M")
@pytest.mark.parametrize("fmt", [LNS8, FP8_E4M3, INT8], ids=repr)
def test_decode(benchmark, x, params, fmt):
    codes = torchlns.encode(x, fmt, params[fmt])
    y = benchmark(torchlns.decode, codes, fmt, params[fmt])
    assert y.dtype == torch.float32 and y.shape == x.shape


@pytest.mark.benchmark(group="decode 16M")
def test_decode_reference(benchmark, x, params):
    codes = torchlns.encode(x, LNS8, params[LNS8])
    with ops.reference_kernels():
        benchmark.pedantic(torchlns.decode, (codes, LNS8, params[LNS8]), rounds=3)
