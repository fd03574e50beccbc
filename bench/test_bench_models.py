"""Converted networks against their float forward (the targets of issue 10).

One group per (network, batch); its baseline is the float model's forward measured in the
same run. The networks are ``torchlns.apps.bench_models`` (torchvision is not a
dependency), at 128x128 inputs, converted with two random calibration batches. The same
measurement without pytest: ``python -m torchlns bench``.

    python -m pytest bench/test_bench_models.py --benchmark-only -q
"""

import functools

import pytest
import torch

import torchlns
from torchlns.apps.bench import FORMATS, _formats, cpu_info
from torchlns.apps.bench_models import NETWORKS, build

IMAGE = 128
BATCHES = [8, 1]


@functools.lru_cache(maxsize=None)
def _converted(net: str):
    model = build(net)
    g = torch.Generator().manual_seed(0)
    calib = [torch.rand(4, 3, IMAGE, IMAGE, generator=g) for _ in range(2)]
    return model, {f: torchlns.convert(model, cfg, calib) for f, cfg in _formats().items()}


def _input(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def _run(benchmark, model, x):
    benchmark.extra_info["cpu"] = cpu_info()
    with torch.no_grad():
        benchmark.pedantic(model, (x,), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("net", list(NETWORKS))
def test_float_forward(benchmark, net, batch):
    benchmark.group = f"{net} batch {batch}"
    benchmark.extra_info["baseline"] = True
    _run(benchmark, _converted(net)[0], _input(batch))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("net", list(NETWORKS))
def test_converted_forward(benchmark, net, batch, fmt):
    benchmark.group = f"{net} batch {batch}"
    _run(benchmark, _converted(net)[1][fmt], _input(batch))
