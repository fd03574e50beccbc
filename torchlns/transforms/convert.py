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

import collections.abc
import copy
import inspect
import typing
import warnings
from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
import torch.nn as nn

from ..config import ConvertConfig
from ..nn.clustered import ClusteredConv2d, LNSClusteredConv2d
from ..nn.layers import _CodedLayer, atomic_load_pre_hook
from ..nn.swap import swap_for, swap_for_type, swappable_types
from .graph import PAD_BASES, base_layer, forward_matches, pad_then_base
from .calibration import Observer, acc_lsb_for, choose_param, chunk_amax
from .cluster import _disabled, cluster_kernels
from .fold import fold_batchnorm

__all__ = ["convert", "enable_qat", "Inputs", "call_model"]


class Inputs:
    """One calibration item of a model with several inputs: ``Inputs(left, right, K=calib)`` is fed as
    ``model(left, right, K=calib)``. (A plain tuple is read as ``(input, target)``, as DataLoaders yield.)"""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __repr__(self) -> str:
        parts = [_brief(a) for a in self.args] + [f"{k}={_brief(v)}" for k, v in self.kwargs.items()]
        return f"Inputs({', '.join(parts)})"


def _brief(v) -> str:
    return f"tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _takes_list(model: nn.Module) -> bool:
    """Whether the model's first input is a list of images: annotated as a list, or named ``images``
    (torchvision's detectors, some of which leave it unannotated)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    if not params:
        return False
    ann = params[0].annotation
    if params[0].name in ("images", "imgs"):
        return True
    if isinstance(ann, str):
        return ann.replace("typing.", "").startswith(("List", "list", "Sequence"))
    return typing.get_origin(ann) in (list, collections.abc.Sequence) or ann is list


def _inputs(batch, model: Optional[nn.Module] = None):
    """The model's positional and keyword inputs from one calibration item (see ``convert``)."""
    if isinstance(batch, Inputs):
        return tuple(batch.args), dict(batch.kwargs)
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and batch:
        if model is not None and _takes_list(model) and all(isinstance(t, torch.Tensor) for t in batch):
            return (list(batch),), {}  # a list of images, for a model that takes one
        return (batch[0],), {}  # (inputs, targets) as DataLoaders yield them
    raise TypeError(f"calibration items must be tensors, (input, target) pairs, dicts of keyword inputs or "
                    f"torchlns.Inputs(...), got {type(batch).__name__}")


def call_model(model: nn.Module, item, forward_fn: Optional[Callable] = None, device=None):
    """Run ``model`` on one calibration item: ``forward_fn(model, item)`` if given, else by ``_inputs``.

    A model that rejects the inputs gets an error that says how the item was read and how to
    feed it otherwise, instead of its own message from deep inside.
    """
    if forward_fn is not None:
        return forward_fn(model, item)
    args, kwargs = _inputs(item, model)
    if device is not None:
        args, kwargs = _to(args, kwargs, device)
    try:
        return model(*args, **kwargs)
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        how = ", ".join([_brief(a) for a in args] + [f"{k}={_brief(v)}" for k, v in kwargs.items()])
        note = ""
        if isinstance(item, (tuple, list)) and not isinstance(item, Inputs):
            note = (" (a tuple or list item is read as (input, target) and only its first element is fed; "
                    "wrap several inputs as torchlns.Inputs(a, b), a dict of keyword inputs, or pass "
                    "forward_fn=lambda model, item: model(*item))")
        msg = (f"{type(model).__name__} failed on a calibration item fed as model({how}){note}: "
               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
        try:
            err = type(e)(msg)
        except Exception:  # noqa: BLE001 - an exception type with another constructor
            err = RuntimeError(msg)
        raise err from e


def _to(args, kwargs, device):
    def move(t):  # float inputs in float32, as the converted (float32) model computes
        if isinstance(t, (list, tuple)):
            return type(t)(move(v) for v in t)
        if isinstance(t, dict):
            return {k: move(v) for k, v in t.items()}
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(device, torch.float32) if t.is_floating_point() else t.to(device)

    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def convert(model: nn.Module, config: Optional[ConvertConfig] = None,
            calibration_data: Optional[Iterable] = None, *, forward_fn: Optional[Callable] = None) -> nn.Module:
    """Fold BN, cluster (if ``config.cluster``), calibrate and swap in chip layers.

    ``calibration_data`` is a DataLoader or any iterable of inputs: tensors, ``(input,
    target)`` pairs (the first element is fed) or dicts of keyword inputs. A single tensor is
    taken as one batch (not iterated sample by sample). It is needed
    for static activations and for the fixed accumulator. Returns a new model in eval mode
    (the input is untouched; its float layers become float32, the chip's output dtype) with
    ``fold_report``, ``cluster_report`` and ``conversion_report`` attributes.
    """
    config = ConvertConfig() if config is None else config
    if isinstance(calibration_data, torch.Tensor):  # one batch, not an iterable of samples
        calibration_data = [calibration_data]
    if not isinstance(config, ConvertConfig):
        raise TypeError(f"config must be a ConvertConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs an nn.Module, got {type(model).__name__}")
    # The chip's layers output float32, so the layers kept in float run in float32 too.
    model = copy.deepcopy(model).eval().float()
    fold_report = None
    if config.fold_bn:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = fold_batchnorm(model, inplace=True)
        fold_report = model.fold_report
        for w in caught:  # a model without any BN is no news here; every other warning is passed on
            if not (str(w.message).startswith("fold_batchnorm folded nothing") and not fold_report.entries):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    cluster_report = None
    already = [n for n, m in model.named_modules() if isinstance(m, (ClusteredConv2d, LNSClusteredConv2d))]
    if config.cluster is not None and already:
        warnings.warn(f"the model is already clustered ({len(already)} clustered layers); config.cluster is not "
                      "applied again (k-means would re-cluster the remaining convs only)", stacklevel=2)
    elif config.cluster is not None:
        c = config.cluster
        model = cluster_kernels(model, c.num_clusters, scope=c.scope, iterations=c.iterations, tol=c.tol, seed=c.seed,
                                progress=config.progress, inplace=True,
                                filter_fn=lambda m, fqn: _selected(config, m, fqn) is not None)
        cluster_report = model.cluster_report

    targets: Dict[str, tuple] = {}
    why_float: Dict[str, str] = {}
    whole = []  # layers that stay float with everything inside them (attention)
    for fqn, m in model.named_modules():
        if any(fqn.startswith(t + ".") or not t for t in (*targets, *whole)):
            continue  # inside a layer that is converted, or stays float, whole
        swap, reason = resolve_swap(m)
        cfg = None if swap is None else _selected(config, m, fqn)
        if cfg is not None:
            targets[fqn] = (m, cfg, swap)
        elif swap is not None:
            why_float[fqn] = "kept float by module_filter_fn" if config.module_filter_fn is not None and \
                not config.module_filter_fn(m, fqn) else "kept float by overrides"
        elif reason is not None:
            why_float[fqn] = reason
            if isinstance(m, nn.MultiheadAttention):
                whole.append(fqn)
    static = [f for f, (_, c, _) in targets.items() if c.activation == "static"]
    fixed = [f for f, (_, c, _) in targets.items() if c.fmt.needs_acc_lsb(c.mac)]
    inputs_seen: Dict[str, Observer] = {f: Observer() for f in static}
    outputs_seen: Dict[str, Observer] = {f: Observer() for f in fixed}
    chunks_seen: Dict[str, list] = {f: [None] for f in fixed if targets[f][1].mac.chunk}
    if inputs_seen or outputs_seen:
        if calibration_data is None:
            need = "static activation parameters" if static else "the fixed accumulator's acc_lsb"
            raise ValueError(f"calibration_data is required to calibrate {need} (layers: "
                             f"{', '.join(static or fixed)}); pass a DataLoader or an iterable of inputs, or use "
                             "activation='dynamic' with a float32 accumulator")
        first = _calibrate(model, targets, inputs_seen, outputs_seen, calibration_data, config.progress, forward_fn,
                           chunks_seen)
    elif calibration_data is not None:
        first = _first(calibration_data)
    else:
        first = None
    macs = count_macs(model, first, forward_fn)

    report = ConversionReport()
    memo: dict = {}  # shared by the swaps of one conversion (see Note: swap registry)
    params = {}
    for fqn, (m, cfg, swap) in targets.items():
        input_param = choose_param(inputs_seen[fqn], cfg.fmt, cfg.calibrator, cfg.percentile) \
            if fqn in inputs_seen else None
        if input_param is not None:
            params[fqn] = (cfg.fmt, input_param)
        acc_lsb = acc_lsb_for(outputs_seen[fqn].max, cfg.mac, cfg.acc_headroom_bits,
                              chunks_seen.get(fqn, [None])[0]) if fqn in outputs_seen else None
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
    _warn_about_calibration(inputs_seen, params)
    report.finish(model, targets, why_float, macs)
    if not targets:  # no transform is a silent no-op
        why = "; ".join(f"{r['layer']}: {r['reason']}" for r in report.float_layers[:3]) or \
            "the model has no Linear or Conv layer"
        warnings.warn(f"convert put no layer on the chip ({why}); the model computes in float", stacklevel=2)
    model.fold_report, model.cluster_report, model.conversion_report = fold_report, cluster_report, report
    model.register_load_state_dict_pre_hook(atomic_load_pre_hook)  # Note: validated loading
    return model


def _first(data):
    for item in data:
        return item
    return None


def resolve_swap(m: nn.Module):
    """(swap, None) for a module that converts; (None, why not) for a layer that has MACs but no
    swap; (None, None) for anything else (see Note: subclasses of the float layers)."""
    swap = swap_for(m)
    if swap is not None:
        return swap, None
    base = base_layer(m, swappable_types())
    if base is not None:
        if forward_matches(m, base):
            return swap_for_type(base), None
        pad, why = pad_then_base(m, base)
        if why is None and base in PAD_BASES:
            return _padded_swap(swap_for_type(base), pad), None
        return None, (f"{type(m).__name__} subclasses {base.__name__} but {why or 'its forward computes something else'}"
                      f"; register a swap for it with torchlns.register_swap({type(m).__name__})")
    if isinstance(m, nn.MultiheadAttention):
        return None, ("attention: its in-projection is a raw parameter and its matmuls have no chip layer; "
                      "it stays float")
    return None, None


def _padded_swap(swap, pad):
    """The base layer's swap, for a subclass whose forward pads and then runs the base op (see Note:
    pad-then-conv subclasses in transforms/graph.py); ``pad`` None: it computes the base op alone."""
    if pad is None:
        return swap

    def padded(module, config, **kw):
        return swap(module, config, **kw).set_input_pad(pad)

    padded.__qualname__ = f"{swap.__qualname__} after {pad}"
    return padded


def count_macs(model: nn.Module, item, forward_fn=None) -> Optional[Dict[str, int]]:
    """Multiply-accumulates per module name on one input (torch's FlopCounterMode; ``""``: the whole
    model), each module counting what its own forward and its children's compute."""
    from torch.utils.flop_counter import FlopCounterMode

    if item is None:
        return None
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    extra: Dict[str, int] = {}  # attention's fused kernels have no flop formula: counted from the shapes

    def attention(fqn):
        def hook(mod, args, kwargs):
            q, k = (list(args) + [kwargs.get("query"), kwargs.get("key")])[:2]
            if q is None or k is None:
                return
            L, S = (q.shape[-2], k.shape[-2]) if mod.batch_first or q.dim() == 2 else (q.shape[0], k.shape[0])
            N = q.numel() // (L * mod.embed_dim)
            E = mod.embed_dim
            extra[fqn] = extra.get(fqn, 0) + N * (2 * L * E * E + S * (mod.kdim + mod.vdim) * E + 2 * L * S * E)
        return hook

    hooks = [m.register_forward_pre_hook(attention(f), with_kwargs=True) for f, m in model.named_modules()
             if isinstance(m, nn.MultiheadAttention)]
    try:
        with torch.no_grad(), counter:
            call_model(model, item, forward_fn, device)
    finally:
        for h in hooks:
            h.remove()
    root = type(model).__name__
    out: Dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == "Global":
            continue
        fqn = "" if name == root else name[len(root) + 1:] if name.startswith(root + ".") else None
        if fqn is not None:
            out[fqn] = sum(ops.values()) // 2
    for fqn, n in extra.items():
        counted = out.get(fqn, 0)
        for p in {fqn, *(".".join(fqn.split(".")[:i]) for i in range(len(fqn.split("."))))}:
            out[p] = out.get(p, 0) + max(n - counted, 0)
    return out


class ConversionReport(list):
    """The converted layers (one dict each, in model order) and the coverage of the conversion.

    * ``float_layers``: dicts ``layer, kind, macs, reason`` for every module whose own code
      computes multiply-accumulates that do not run on the chip; ``"(model code)"`` is MACs of
      functional calls outside any module;
    * ``total_macs``, ``chip_macs``, ``coverage`` (a fraction): counted on the first
      calibration item (None without calibration data).

    ``print(report)`` shows the coverage line and the float layers.
    """

    def __init__(self):
        super().__init__()
        self.float_layers: list = []
        self.total_macs: Optional[int] = None
        self.chip_macs: Optional[int] = None

    @property
    def coverage(self) -> Optional[float]:
        if not self.total_macs:
            return None
        return self.chip_macs / self.total_macs

    def finish(self, model, targets, why_float: Dict[str, str], macs: Optional[Dict[str, int]]) -> None:
        chip = set(targets)
        for row in self:
            row["macs"] = None if macs is None else macs.get(row["layer"], 0)
        rows = {}
        if macs is not None:
            self.total_macs = macs.get("", 0)
            self.chip_macs = sum(macs.get(f, 0) for f in chip)
            own = dict(macs)
            for fqn, total in macs.items():  # subtract each counted module from its nearest counted ancestor
                if fqn:
                    parts = fqn.split(".")
                    parent = next((p for p in (".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1))
                                   if p in macs), None)
                    if parent is not None:
                        own[parent] -= total
            for fqn, n in own.items():
                if n > 0 and not (fqn in chip or any(fqn.startswith(c + ".") for c in chip if c)):
                    rows[fqn] = n
        for fqn in why_float:
            rows.setdefault(fqn, None if macs is None else 0)
        kinds = dict(model.named_modules())
        for fqn, own in rows.items():
            reason = why_float.get(fqn)
            if reason is None:
                reason = ("functional calls in the model's own forward" if not fqn else
                          f"no chip layer for {type(kinds[fqn]).__name__}" if fqn in kinds else "")
            self.float_layers.append(dict(layer=fqn or "(model code)", kind=type(kinds.get(fqn, model)).__name__,
                                          macs=own, reason=reason))

    def __str__(self) -> str:
        from .._text import format_table

        if self.total_macs is None:
            head = f"{len(self)} layers on the chip (MACs not counted: no calibration data)"
        else:
            head = (f"{len(self)} layers on the chip: {_macs(self.chip_macs)} of {_macs(self.total_macs)} MACs "
                    f"({100 * (self.coverage or 0):.1f}%) on the first calibration item")
        if not self.float_layers:
            return head + "; nothing else computes MACs" if self.total_macs is not None else head
        rows = [(r["layer"], r["kind"], "-" if r["macs"] is None else _macs(r["macs"]), r["reason"])
                for r in self.float_layers]
        return head + "\nstayed float:\n" + format_table(("layer", "kind", "MACs", "why"), rows, right=(2,))


def _macs(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _selected(config: ConvertConfig, m: nn.Module, fqn: str) -> Optional[ConvertConfig]:
    if config.module_filter_fn is not None and not config.module_filter_fn(m, fqn):
        return None
    return config.for_layer(fqn)


# Note: calibration sanity
# Calibration cannot know the data a model will see later, but it can tell when its own data
# cannot be what the model expects, and ``convert`` warns then: a layer whose inputs were all
# zero (no signal: its parameter is a guess), a layer whose chosen parameter saturates more
# than half of what it saw (a clamped offset or scale), and inputs whose largest magnitude
# is beyond 2^50 (about 1e15; trained networks see nothing near it, so the data is almost
# certainly scaled wrongly, and ordinary inputs would then flush to zero).
SATURATED_SHARE = 0.5
IMPLAUSIBLE_AMAX = 2.0**50


def _warn_about_calibration(inputs_seen: Dict[str, Observer], params: dict) -> None:
    from ..codec import decode, encode

    silent = [f for f, o in inputs_seen.items() if o.count and o.max == 0]
    if silent:
        warnings.warn(f"calibration saw no signal at layers {silent}: every input value was 0, so their activation "
                      "parameters are a guess; calibrate on real data", stacklevel=3)
    huge = {f: o.max for f, o in inputs_seen.items() if o.max > IMPLAUSIBLE_AMAX}
    if huge:
        first = next(iter(huge))
        warnings.warn(f"calibration inputs peak at {huge[first]:.3g} at layer {first!r} ({len(huge)} layers beyond "
                      f"{IMPLAUSIBLE_AMAX:.0e}); is the calibration data scaled as the model expects? Inputs of an "
                      "ordinary size would flush to zero (Note: calibration sanity)", stacklevel=3)
    saturated = []
    for f, (fmt, param) in params.items():
        sample = inputs_seen[f].sample
        if sample.numel():
            top = decode(encode(torch.tensor(torch.finfo(torch.float32).max), fmt, param), fmt, param).item()
            share = (sample > top).float().mean().item()
            if share > SATURATED_SHARE:
                saturated.append(f"{f} ({share:.0%})")
    if saturated:
        warnings.warn(f"calibration saturates most values at layers {saturated}: their activation parameters were "
                      "clamped to the format's range", stacklevel=3)


def _calibrate(model, targets, inputs_seen, outputs_seen, data, progress, forward_fn=None, chunks_seen=None) -> None:
    from tqdm.auto import tqdm

    def see_chunks(mod, args, box, L):  # the first batch only (see Note: chunk calibration)
        if batches or not args:
            return
        v = chunk_amax(mod, args[0], L)
        if v is not None:
            box[0] = v if box[0] is None else max(box[0], v)

    hooks = []
    for fqn, box in (chunks_seen or {}).items():
        m, cfg = targets[fqn][0], targets[fqn][1]
        hooks.append(m.register_forward_pre_hook(lambda mod, args, b=box, L=cfg.mac.chunk: see_chunks(mod, args, b, L)))
    for fqn, (m, *_) in targets.items():
        if fqn in inputs_seen:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, o=inputs_seen[fqn]: o.update(args[0])))
        if fqn in outputs_seen:
            hooks.append(m.register_forward_hook(lambda mod, args, out, o=outputs_seen[fqn]: o.update(out)))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batches, first = 0, None
    try:
        with torch.no_grad():
            for batch in tqdm(data, desc="calibrating", disable=_disabled(progress)):
                call_model(model, batch, forward_fn, device)
                first = batch if batches == 0 else first
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
    return first


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
