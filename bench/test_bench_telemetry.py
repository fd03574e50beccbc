"""A telemetry pass against a plain forward of the same converted network (issue 29's "no more
than 3x on the CPU kernels"): the group's baseline is the chip-preset model's forward, measured
in the same run; the telemetry row counts every layer (Note: telemetry counters).

    python -m pytest bench/test_bench_telemetry.py --benchmark-only -q
"""

import functools

import pytest
import torch

import torchlns
from torchlns.apps.bench import cpu_info
from torchlns.apps.bench_models import build

IMAGE, BATCH = 128, 8


@functools.lru_cache(maxsize=None)
def _converted(net: str, activation: str):
    model = build(net)
    g = torch.Generator().manual_seed(0)
    calib = [torch.rand(4, 3, IMAGE, IMAGE, generator=g) for _ in range(2)]
    cfg = torchlns.ConvertConfig(mac=torchlns.CHIP_MAC, activation=activation)
    return torchlns.convert(model, cfg, calib)


def _input() -> torch.Tensor:
    return torch.rand(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def _telemetry(q, x):
    with torchlns.telemetry(q):
        q(x)


@pytest.mark.parametrize("activation", ["static", "dynamic"])
@pytest.mark.parametrize("net", ["segnet", "resnet18", "mobilenetv2"])
def test_plain_forward(benchmark, net, activation):
    benchmark.group = f"telemetry {net} {activation} batch {BATCH}"
    benchmark.extra_info.update(baseline=True, cpu=cpu_info())
    q, x = _converted(net, activation), _input()
    with torch.no_grad():
        benchmark.pedantic(q, (x,), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("activation", ["static", "dynamic"])
@pytest.mark.parametrize("net", ["segnet", "resnet18", "mobilenetv2"])
def test_telemetry_pass(benchmark, net, activation):
    benchmark.group = f"telemetry {net} {activation} batch {BATCH}"
    benchmark.extra_info["cpu"] = cpu_info()
    q, x = _converted(net, activation), _input()
    with torch.no_grad():
        benchmark.pedantic(_telemetry, (q, x), rounds=3, warmup_rounds=1)
