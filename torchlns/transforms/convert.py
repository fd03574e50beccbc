"""``torchlns.convert``: fold batch norm, optionally cluster, calibrate, swap in chip layers.

Which chip layer replaces which float layer is the swap registry's business (see Note: swap
registry in nn/swap.py): ``convert`` converts every module whose exact type has a swap.

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
from typing import Dict, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from ..config import ConvertConfig
from ..nn.clustered import LNSClusteredConv2d
from ..nn.layers import _CodedLayer
from ..nn.swap import swap_for
from .calibration import Observer, acc_lsb_for, choose_param
from .cluster import _disabled, cluster_kernels
from .fold import fold_batchnorm

__all__ = ["convert", "enable_qat"]


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
        swap = swap_for(m)
        cfg = None if swap is None else _selected(config, m, fqn)
        if cfg is not None:
            targets[fqn] = (m, cfg, swap)
    static = [f for f, (_, c, _) in targets.items() if c.activation == "static"]
    fixed = [f for f, (_, c, _) in targets.items() if c.fmt.needs_acc_lsb(c.mac)]
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
    memo: dict = {}  # shared by the swaps of one conversion (see Note: swap registry)
    for fqn, (m, cfg, swap) in targets.items():
        input_param = choose_param(inputs_seen[fqn], cfg.fmt, cfg.calibrator, cfg.percentile) \
            if fqn in inputs_seen else None
        acc_lsb = acc_lsb_for(outputs_seen[fqn].max, cfg.mac, cfg.acc_headroom_bits) if fqn in outputs_seen else None
        new = swap(m, cfg, input_param=input_param, acc_lsb=acc_lsb, qat=cfg.qat, memo=memo)
        if isinstance(new, _CodedLayer):
            new.set_train_forward(cfg.qat_forward)
        if not fqn:  # the model is itself the layer
            model = new
        else:
            model.set_submodule(fqn, new)
        report.append(dict(layer=fqn, kind=type(new).__name__, fmt=str(cfg.fmt),
                           mac=str(cfg.fmt.layer_mac(cfg.mac)) if cfg.fmt.mac_kind == "log" else "-",
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
    for fqn, (m, *_) in targets.items():
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


def enable_qat(model: nn.Module, train_forward: Optional[str] = None) -> nn.Module:
    """Give every converted layer a float master weight (in place), so ``train()`` fine-tunes it.

    ``train_forward``: ``"exact"`` or ``"fake"`` for every layer (see Note: fake-quantized
    training in nn/layers.py); None keeps each layer's. Clustered layers that share one
    centroid table also share its float master.
    """
    masters: Dict[int, nn.Parameter] = {}  # one float master per centroid table object
    for m in model.modules():
        if isinstance(m, _CodedLayer):
            m.enable_qat(train_forward)
        if isinstance(m, LNSClusteredConv2d):
            m.centroids_float = masters.setdefault(id(m.centroids), m.centroids_float)
    return model
