"""``torchlns.convert``: fold batch norm, optionally cluster, calibrate, swap in chip layers.

# Note: calibration pass
One pass of the (folded, clustered) float model over the calibration data, in eval mode
and without gradients, feeds an ``Observer`` per layer with the layer's float input (for
static activation parameters, see Note: calibrators) and its float output (for the fixed
accumulator's ``acc_lsb``, which must hold the largest output with ``acc_headroom_bits`` to
spare). Each layer is then replaced by its chip counterpart. Calibrating on the float
model's activations is the standard post-training recipe; the converted model's own
activations differ from them only by the error of the layers before.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Union

import torch
import torch.nn as nn

from .calibration import CALIBRATORS, Observer, acc_lsb_for, choose_param
from .cluster import ClusteredConv2d, _disabled, cluster_kernels
from .fold import fold_batchnorm
from .formats import IDEAL_MAC, LNS8, FP8Format, Format, IntFormat, LNSFormat, MACConfig
from .modules import LNSClusteredConv2d, LNSConv1d, LNSConv2d, LNSLinear, _CodedLayer

__all__ = ["ConvertConfig", "ClusterConfig", "convert", "enable_qat"]


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
      the converted layers train (see Note: QAT in converted layers).
    * ``module_filter_fn(module, fqn)``: which layers to convert (default: all Linear,
      Conv1d, Conv2d and ClusteredConv2d).
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
    module_filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
    overrides: Mapping[str, Optional[Mapping[str, Any]]] = field(default_factory=dict)
    progress: Optional[bool] = None

    def __post_init__(self):
        if not isinstance(self.fmt, (LNSFormat, FP8Format, IntFormat)):
            raise TypeError(f"ConvertConfig.fmt must be an LNSFormat, FP8Format or IntFormat, got {self.fmt!r}")
        if not isinstance(self.mac, MACConfig):
            raise TypeError(f"ConvertConfig.mac must be a MACConfig, got {self.mac!r}")
        if self.weight_granularity not in ("tensor", "channel", "block"):
            raise ValueError(f"ConvertConfig.weight_granularity must be 'tensor', 'channel' or 'block', "
                             f"got {self.weight_granularity!r}")
        if (self.weight_granularity == "block") != (self.weight_block_size is not None):
            raise ValueError("ConvertConfig.weight_block_size is required by, and only by, weight_granularity='block'")
        if self.activation not in ("static", "dynamic"):
            raise ValueError(f"ConvertConfig.activation must be 'static' or 'dynamic', got {self.activation!r}")
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

    def for_layer(self, fqn: str) -> Optional["ConvertConfig"]:
        """The config of one layer after overrides (exact names win over patterns); None: keep float."""
        overrides = dict(self.overrides)
        key = fqn if fqn in overrides else next((p for p in overrides if fnmatch.fnmatchcase(fqn, p)), None)
        if key is None:
            return self
        change = overrides[key]
        return None if change is None else dataclasses.replace(self, overrides={}, **change)


_SWAPS = {nn.Linear: LNSLinear, nn.Conv1d: LNSConv1d, nn.Conv2d: LNSConv2d, ClusteredConv2d: LNSClusteredConv2d}


def _inputs(batch):
    """The model's positional and keyword inputs from one calibration item."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}  # (inputs, targets) as DataLoaders yield them
    raise TypeError(f"calibration items must be tensors, (input, target) pairs or dicts of inputs, "
                    f"got {type(batch).__name__}")


def _to(args, kwargs, device):
    def move(t):  # float inputs in float32, as the converted (float32) model computes
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device, torch.float32) if t.is_floating_point() else t.to(device)

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def convert(model: nn.Module, config: Optional[ConvertConfig] = None,
            calibration_data: Optional[Iterable] = None) -> nn.Module:
    """Fold BN, cluster (if ``config.cluster``), calibrate and swap in chip layers.

    ``calibration_data`` is a DataLoader or any iterable of inputs: tensors, ``(input,
    target)`` pairs (the first element is fed) or dicts of keyword inputs. It is needed
    for static activations and for the fixed accumulator. Returns a new model in eval mode
    (the input is untouched; its float layers become float32, the chip's output dtype) with
    ``fold_report``, ``cluster_report`` and ``conversion_report`` attributes.
    """
    config = ConvertConfig() if config is None else config
    if not isinstance(config, ConvertConfig):
        raise TypeError(f"config must be a ConvertConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(model).__name__}")
    # The chip's layers output float32, so the layers kept in float run in float32 too.
    model = copy.deepcopy(model).eval().float()
    fold_report = None
    if config.fold_bn:
        model = fold_batchnorm(model, inplace=True)
        fold_report = model.fold_report
    cluster_report = None
    if config.cluster is not None:
        c = config.cluster
        model = cluster_kernels(model, c.num_clusters, scope=c.scope, iterations=c.iterations, tol=c.tol, seed=c.seed,
                                progress=config.progress, inplace=True,
                                filter_fn=lambda m, fqn: _selected(config, m, fqn) is not None)
        cluster_report = model.cluster_report

    targets: Dict[str, tuple] = {}
    for fqn, m in model.named_modules():
        if type(m) in _SWAPS:
            cfg = _selected(config, m, fqn)
            if cfg is not None:
                targets[fqn] = (m, cfg)
    static = [f for f, (_, c) in targets.items() if c.activation == "static"]
    fixed = [f for f, (_, c) in targets.items() if isinstance(c.fmt, LNSFormat) and c.mac.accumulator == "fixed"]
    inputs_seen: Dict[str, Observer] = {f: Observer() for f in static}
    outputs_seen: Dict[str, Observer] = {f: Observer() for f in fixed}
    if inputs_seen or outputs_seen:
        if calibration_data is None:
            need = "static activation parameters" if static else "the fixed accumulator's acc_lsb"
            raise ValueError(f"calibration_data is required to calibrate {need} (layers: "
                             f"{', '.join(static or fixed)}); pass a DataLoader or an iterable of inputs, or use "
                             "activation='dynamic' with a float32 accumulator")
        _calibrate(model, targets, inputs_seen, outputs_seen, calibration_data, config.progress)

    report = []
    shared: Dict[int, LNSClusteredConv2d] = {}  # network-scope centroids -> the first layer converted
    for fqn, (m, cfg) in targets.items():
        input_param = choose_param(inputs_seen[fqn], cfg.fmt, cfg.calibrator, cfg.percentile) \
            if fqn in inputs_seen else None
        acc_lsb = acc_lsb_for(outputs_seen[fqn].max, cfg.mac, cfg.acc_headroom_bits) if fqn in outputs_seen else None
        cls = _SWAPS[type(m)]
        source = m
        if cls is LNSClusteredConv2d and not isinstance(cfg.fmt, LNSFormat):
            cls, source = LNSConv2d, _dense_conv(m)  # FP8/INT have no per-kernel log offsets
        new = cls.from_float(source, cfg, input_param=input_param, acc_lsb=acc_lsb, qat=cfg.qat)
        if isinstance(new, LNSClusteredConv2d):
            first = shared.setdefault(id(m.centroids), new)
            if first is not new and first.fmt == new.fmt:
                new.share_centroids(first)
        model = _set(model, fqn, new)
        report.append(dict(layer=fqn, kind=type(new).__name__, fmt=str(cfg.fmt),
                           mac=str(new.mac) if isinstance(cfg.fmt, LNSFormat) else "-",
                           input=None if input_param is None else input_param.item(), acc_lsb=acc_lsb))
    model.fold_report, model.cluster_report, model.conversion_report = fold_report, cluster_report, report
    return model


def _selected(config: ConvertConfig, m: nn.Module, fqn: str) -> Optional[ConvertConfig]:
    if config.module_filter_fn is not None and not config.module_filter_fn(m, fqn):
        return None
    return config.for_layer(fqn)


def _calibrate(model, targets, inputs_seen, outputs_seen, data, progress) -> None:
    from tqdm.auto import tqdm

    hooks = []
    for fqn, (m, _) in targets.items():
        if fqn in inputs_seen:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, o=inputs_seen[fqn]: o.update(args[0])))
        if fqn in outputs_seen:
            hooks.append(m.register_forward_hook(lambda mod, args, out, o=outputs_seen[fqn]: o.update(out)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = 0
    try:
        with torch.no_grad():
            for batch in tqdm(data, desc="calibrating", disable=_disabled(progress)):
                args, kwargs = _to(*_inputs(batch), device)
                model(*args, **kwargs)
                batches += 1
    finally:
        for h in hooks:
            h.remove()
    if batches == 0:
        raise ValueError("calibration_data yielded no batches")
    unseen = [f for f, o in {**inputs_seen, **outputs_seen}.items() if o.count == 0]
    if unseen:
        raise ValueError(f"calibration never reached (or saw only NaN/inf at) layers {sorted(set(unseen))}; "
                         "keep them in float with overrides={name: None} or use dynamic activations")


def _dense_conv(m: ClusteredConv2d) -> nn.Conv2d:
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                     bias=m.bias is not None).to(m.centroids.device)
    with torch.no_grad():
        conv.weight.copy_(m.weight)
        if m.bias is not None:
            conv.bias.copy_(m.bias)
    return conv


def _set(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    if not fqn:  # the model is itself the layer
        return new
    parent_name, _, attr = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


def enable_qat(model: nn.Module) -> nn.Module:
    """Give every converted layer a float master weight (in place), so ``train()`` fine-tunes it.

    Clustered layers that share one centroid table also share its float master.
    """
    masters: Dict[int, nn.Parameter] = {}  # one float master per centroid table object
    for m in model.modules():
        if isinstance(m, _CodedLayer):
            m.enable_qat()
        if isinstance(m, LNSClusteredConv2d):
            m.centroids_float = masters.setdefault(id(m.centroids), m.centroids_float)
    return model
