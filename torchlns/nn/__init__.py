"""Chip layers: drop-in modules that compute what the chip computes.

* ``layers.py``: ``LNSLinear``, ``LNSConv1d/2d/3d``, ``LNSConvTranspose1d/2d/3d`` (any format: LNS, FP8 or INT);
* ``clustered.py``: ``ClusteredConv2d`` (float, fine-tunable centroids) and
  ``LNSClusteredConv2d`` (its chip form);
* ``swap.py``: the registry that tells ``torchlns.convert`` which chip layer replaces which
  float layer (``register_swap``).
"""

from .clustered import ClusteredConv2d, LNSClusteredConv2d  # noqa: F401
from .layers import (  # noqa: F401
    LNSConv1d,
    LNSConv2d,
    LNSConv3d,
    LNSConvTranspose1d,
    LNSConvTranspose2d,
    LNSConvTranspose3d,
    LNSLinear,
)
from .swap import register_swap, swap_for, swappable_types  # noqa: F401
