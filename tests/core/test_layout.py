"""core/layout.py: block maxima, on the fast min/max path and on the masking path."""

import math

import torch

from torchlns.core import layout


def _masked_block_amax(x, axis, bs):
    a = torch.where(torch.isfinite(x), x.abs(), 0.0).movedim(axis, -1)
    n = a.shape[-1]
    nb = -(-n // bs)
    a = torch.nn.functional.pad(a, (0, nb * bs - n))
    return a.reshape(*a.shape[:-1], nb, bs).amax(-1).movedim(-1, axis)


def test_block_amax_fast_path_matches_the_masked_one_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    for shape, axis, bs in [((7, 576), -1, 32), ((5, 70), 1, 32), ((3, 9, 4), 1, 4), ((6, 33), 0, 5)]:
        x = torch.randn(shape, generator=g) * 2.0 ** torch.randint(-20, 20, shape, generator=g).float()
        x = torch.where(torch.rand(shape, generator=g) < 0.2, -0.0, x)
        assert layout._block_amax_finite(x, axis, bs) is not None
        assert torch.equal(layout.amax(x, "block", axis, bs), _masked_block_amax(x, axis, bs))


def test_block_amax_ignores_nan_and_inf_through_the_masked_path():
    x = torch.tensor([[1.0, -math.inf, 3.0, 0.5], [math.nan, -2.0, 0.25, 0.0]])
    assert layout._block_amax_finite(x, -1, 2) is None
    assert torch.equal(layout.amax(x, "block", -1, 2), torch.tensor([[1.0, 3.0], [2.0, 0.25]]))
