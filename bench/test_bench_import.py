"""Start-up: ``import torchlns`` and ``torchlns --help`` against ``import torch`` (each a fresh process).

torch's own import is the floor (about 1.3 s on the 2-core machines); the ratio is what
torchlns adds on top. Group baseline: ``python -c "import torch"``.
"""

import subprocess
import sys

import pytest


def run(*args):
    subprocess.run([sys.executable, *args], check=True, capture_output=True)


@pytest.mark.benchmark(group="start-up")
def test_import_torch(benchmark):
    benchmark.extra_info["baseline"] = True
    benchmark.pedantic(run, args=("-c", "import torch"), rounds=5, iterations=1)


@pytest.mark.benchmark(group="start-up")
def test_import_torchlns(benchmark):
    benchmark.pedantic(run, args=("-c", "import torchlns"), rounds=5, iterations=1)


@pytest.mark.benchmark(group="start-up")
def test_torchlns_help(benchmark):
    benchmark.pedantic(run, args=("-m", "torchlns", "--help"), rounds=5, iterations=1)
