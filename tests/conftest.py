"""Shared test settings.

# Note: sweep size
Tests marked ``slow`` sweep a space exhaustively when ``TORCHLNS_FULL_SWEEP=1`` and a
deterministic, reduced slice of it otherwise (the default, and what CI runs). ``sweep()``
picks between the two, so a slow test is always exercised, never skipped.
"""

import os
import random

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads
# this when a kernel is decorated, so it must be set before torchlns.triton_kernels loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

FULL_SWEEP = os.environ.get("TORCHLNS_FULL_SWEEP") == "1"

settings.register_profile(
    "torchlns", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("torchlns")


def sweep(items, reduced: int, seed: int = 0):
    """All of ``items`` in a full sweep; else the first, the last and ``reduced`` seeded picks."""
    items = list(items)
    if FULL_SWEEP or len(items) <= reduced + 2:
        return items
    rng = random.Random(seed)
    middle = rng.sample(items[1:-1], reduced)
    return [items[0], *sorted(middle, key=items.index), items[-1]]


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
