"""Chip layers: drop-in modules that compute what the chip computes.

* ``layers.py``: ``LNSLinear``, ``LNSConv1d``, ``LNSConv2d`` (any format: LNS, FP8 or INT);
* ``clustered.py``: ``ClusteredConv2d`` (float, fine-tunable centroids) and
  ``LNSClusteredConv2d`` (its chip form);
* ``swap.py``: the registry that tells ``torchlns.convert`` which chip layer replaces which
  float layer (``register_swap``).
"""

from .clustered import ClusteredConv2d, LNSClusteredConv2d  # noqa: F401
from .layers import LNSConv1d, LNSConv2d, LNSLinear  # noqa: F401
from .swap import register_swap, swap_for, swappable_types  # noqa: F401
