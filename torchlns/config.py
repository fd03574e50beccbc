"""Configuration of a conversion: ``ConvertConfig`` and ``ClusterConfig`` (frozen, validated).

The converted layers (``torchlns.nn``) read a ``ConvertConfig`` in ``from_float``, and the
conversion pipeline (``torchlns.transforms``) in ``convert``; it sits below both.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

import torch.nn as nn

from .core.formats import IDEAL_MAC, LNS8, Format, MACConfig
from .core.layout import GRANULARITIES

__all__ = ["ConvertConfig", "ClusterConfig", "CALIBRATORS"]

CALIBRATORS = ("max", "percentile", "mse")  # see Note: calibrators in transforms/calibration.py


@dataclass(frozen=True)
class ClusterConfig:
    """Kernel clustering before quantization (see ``torchlns.cluster_kernels``)."""

    num_clusters: Union[int, Mapping[str, int]] = 64
    scope: str = "layer"
    iterations: int = 50
    tol: float = 1e-4
    seed: int = 0


@dataclass(frozen=True)
class ConvertConfig:
    """How ``torchlns.convert`` quantizes a model.

    * ``fmt``: ``LNSFormat`` (default LNS8), or ``FP8Format``/``IntFormat`` for comparison;
      ``mac`` applies to LNS (``MACConfig.chip()`` is the chip preset).
    * ``weight_granularity``: ``"channel"`` (default), ``"tensor"`` or ``"block"``
      (``weight_block_size`` along the reduction axis).
    * ``activation``: ``"static"`` per-tensor parameters calibrated with ``calibrator``
      (``"max"``, ``"percentile"`` at ``percentile``, or ``"mse"``), or ``"dynamic"``:
      computed at run time per ``activation_block_size`` block (``None``: per tensor).
    * ``acc_headroom_bits``: the fixed accumulator holds the largest calibration output
      times ``2^acc_headroom_bits``.
    * ``fold_bn``; ``cluster`` (a ``ClusterConfig`` or None); ``qat``: keep float masters so
      the converted layers train (see Note: QAT in converted layers); ``qat_forward``: what
      a layer runs in ``train()`` mode, ``"exact"`` (the chip) or ``"fake"`` (the float layer
      on decoded operands, much faster; see Note: fake-quantized training). ``eval()`` is
      always exact.
    * ``module_filter_fn(module, fqn)``: which layers to convert (default: every layer whose
      type has a swap; see ``torchlns.register_swap``).
    * ``overrides``: layer name (or fnmatch pattern) -> ``None`` to keep the layer in float,
      or a dict of fields of this config to change for that layer, e.g.
      ``{"stem.0": None, "head": {"fmt": FP8_E4M3}}``.
    """

    fmt: Format = LNS8
    mac: MACConfig = IDEAL_MAC
    weight_granularity: str = "channel"
    weight_block_size: Optional[int] = None
    activation: str = "static"
    activation_block_size: Optional[int] = 32
    calibrator: str = "max"
    percentile: float = 99.99
    acc_headroom_bits: int = 1
    fold_bn: bool = True
    cluster: Optional[ClusterConfig] = None
    qat: bool = False
    qat_forward: str = "exact"
    module_filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
    overrides: Mapping[str, Optional[Mapping[str, Any]]] = field(default_factory=dict)
    progress: Optional[bool] = None

    def __post_init__(self):
        if not isinstance(self.fmt, Format):
            raise TypeError(f"ConvertConfig.fmt must be an LNSFormat, FP8Format or IntFormat, got {self.fmt!r}")
        if not isinstance(self.mac, MACConfig):
            raise TypeError(f"ConvertConfig.mac must be a MACConfig, got {self.mac!r}")
        if self.weight_granularity not in GRANULARITIES:
            raise ValueError(f"ConvertConfig.weight_granularity must be 'tensor', 'channel' or 'block', "
                             f"got {self.weight_granularity!r}")
        if (self.weight_granularity == "block") != (self.weight_block_size is not None):
            raise ValueError("ConvertConfig.weight_block_size is required by, and only by, weight_granularity='block'")
        if self.activation not in ("static", "dynamic"):
            raise ValueError(f"ConvertConfig.activation must be 'static' or 'dynamic', got {self.activation!r}")
        if self.qat_forward not in ("exact", "fake"):
            raise ValueError(f"ConvertConfig.qat_forward must be 'exact' or 'fake', got {self.qat_forward!r}")
        if self.calibrator not in CALIBRATORS:
            raise ValueError(f"ConvertConfig.calibrator must be one of {CALIBRATORS}, got {self.calibrator!r}")
        if not 0 < self.percentile <= 100:
            raise ValueError(f"ConvertConfig.percentile must be in (0, 100], got {self.percentile}")
        for name in ("weight_block_size", "activation_block_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"ConvertConfig.{name} must be a positive int or None, got {v!r}")
        if isinstance(self.acc_headroom_bits, bool) or not isinstance(self.acc_headroom_bits, int) \
                or not 0 <= self.acc_headroom_bits <= 16:
            raise ValueError(f"ConvertConfig.acc_headroom_bits must be an int in 0..16, got {self.acc_headroom_bits!r}")
        if self.cluster is not None and not isinstance(self.cluster, ClusterConfig):
            raise TypeError(f"ConvertConfig.cluster must be a ClusterConfig or None, got {self.cluster!r}")
        fields = {f.name for f in dataclasses.fields(self)} - {"overrides", "module_filter_fn", "cluster", "fold_bn"}
        for pattern, change in dict(self.overrides).items():
            if change is not None:
                bad = set(change) - fields
                if bad:
                    raise ValueError(f"ConvertConfig.overrides[{pattern!r}] sets unknown or pipeline-wide fields "
                                     f"{sorted(bad)}; per layer, set any of {sorted(fields)}")
        object.__setattr__(self, "overrides", types.MappingProxyType(dict(self.overrides)))

    def __reduce__(self):  # overrides is a read-only mapping, which does not pickle; a copy of it does
        return type(self), tuple(dict(self.overrides) if f.name == "overrides" else getattr(self, f.name)
                                 for f in dataclasses.fields(self))

    def for_layer(self, fqn: str) -> Optional["ConvertConfig"]:
        """The config of one layer after overrides (exact names win over patterns); None: keep float."""
        overrides = dict(self.overrides)
        key = fqn if fqn in overrides else next((p for p in overrides if fnmatch.fnmatchcase(fqn, p)), None)
        if key is None:
            return self
        change = overrides[key]
        return None if change is None else dataclasses.replace(self, overrides={}, **change)
