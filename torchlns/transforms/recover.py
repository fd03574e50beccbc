"""Accuracy recovery from a small unlabelled set (chip-model.md section 6): ``recover`` and its methods.

# Note: accuracy recovery
A converted model loses accuracy to the rounding of every weight and activation; on a real
network with LNS8's 3 fraction bits (steps of 2^(1/8)) the errors compound over dozens of
layers. Three methods win it back from unlabelled inputs, each a public function, and
``recover`` runs them in order. Each changes only what the chip stores: weight codes (or
cluster centroid and kernel-scale codes) at their own width and offsets, and float32 biases.
Nothing else is added; the float masters that distillation trains are removed at the end.

* ``bias_correction``: per output channel, the mean error of each chip layer's output
  against the float model's same layer, with the layers before it converted, is subtracted
  from its bias. One pass measures every layer at once (the spec's definition: the layers
  before are converted, not yet corrected); each further pass measures again with the
  corrections in place, which removes what the earlier corrections changed downstream.
* ``adaptive_rounding``: every weight's code is the rung of the magnitude ladder just below
  or just above the float weight (Note: the magnitude ladder in core/formats.py; in LNS, the
  neighbouring log steps), chosen block by block so that the block's output, computed by
  the fake-quantized chip on the converted model's own inputs (the exact forward of the
  blocks before, already rounded), reconstructs the float model's output of that block.
  The choice is AdaRound's (Nagel et al., 2020): a soft choice ``h`` in [0, 1] per weight,
  a rectified sigmoid, optimised with Adam together with the block's biases, and pushed to
  0 or 1 by an annealed regulariser; blocks are BRECQ's (Li et al., 2021): the largest
  submodules, called once, with few chip layers each. A block whose rounded output
  reconstructs worse than nearest rounding keeps nearest rounding.
* ``distill``: fine-tuning against the float model's outputs (KL of the softmax over dim 1
  for logits and dense class maps, or normalised MSE, plus optional intermediate features),
  on the fake-quantized forward with straight-through gradients into float masters and the
  biases. Adam's steps are scaled per layer by the layer's weight RMS, since folding BN
  leaves layers whose weights differ by orders of magnitude. A fifth of the data is held
  out: the state with the lowest held-out loss, measured on the exact chip, is kept, so
  distillation never leaves the model worse on data it did not train on.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._text import format_table
from ..functional import transpose_weight_as_conv
from ..nn.clustered import LNSClusteredConv2d
from ..nn.layers import _CodedLayer, _LNSConvTransposeNd
from ..tensor import Coded
from .cluster import _disabled
from .convert import call_model
from .fold import fold_batchnorm

__all__ = ["recover", "bias_correction", "adaptive_rounding", "distill", "error_split", "ErrorSplit", "RecoveryReport",
           "METHODS"]

METHODS = ("bias", "rounding", "distill")


# ----------------------------------------------------------------------------------------
# shared: checks, data, the float twin
# ----------------------------------------------------------------------------------------
@dataclass
class RecoveryReport:
    """One row per method run: fidelity against the float model on the calibration data before and after."""

    rows: List[dict] = field(default_factory=list)

    def add(self, method: str, before: dict, after: dict, seconds: float, note: str = "") -> None:
        self.rows.append(dict(method=method, before=before, after=after, seconds=seconds, note=note))

    def __str__(self) -> str:
        rows = [(r["method"], f"{r['before']['agreement']:.1%} -> {r['after']['agreement']:.1%}",
                 f"{r['before']['sqnr']:.1f} -> {r['after']['sqnr']:.1f}", f"{r['seconds']:.0f}", r["note"])
                for r in self.rows]
        return "recovery (on the calibration data):\n" + format_table(
            ("method", "agreement", "SQNR dB", "s", "note"), rows, right=(3,))


def _chip_layers(model: nn.Module) -> Dict[str, _CodedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _CodedLayer)}


def _items(data) -> list:
    if data is None:
        raise ValueError("recovery needs calibration data: an iterable of inputs as convert takes them")
    if isinstance(data, torch.Tensor):
        data = [data]
    items = list(data)
    if not items:
        raise ValueError("the calibration data is empty: recovery needs at least one batch of inputs")
    return items


def _float_twin(qmodel: nn.Module, reference: nn.Module) -> nn.Module:
    """The reference with its BNs folded, as convert folds them, in float32 eval mode; checked
    against ``qmodel`` layer by layer, so a reference it was not converted from is refused."""
    if not isinstance(reference, nn.Module):
        raise TypeError(f"reference must be the float nn.Module qmodel was converted from, got "
                        f"{type(reference).__name__}")
    chips = _chip_layers(qmodel)
    if not chips:
        raise ValueError("qmodel has no chip layers: recover takes a model made by torchlns.convert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = fold_batchnorm(copy.deepcopy(reference).float().eval(), inplace=True)
    mods = dict(twin.named_modules())
    for fqn, chip in chips.items():
        ref = mods.get(fqn)
        if ref is None:
            raise ValueError(f"reference is not the model qmodel came from: it has no module {fqn!r} (qmodel's "
                             f"{type(chip).__name__})")
        w = _reference_weight(ref, chip)
        mine = chip.weight.dequantize().float()
        if w is None or w.shape != mine.shape:
            raise ValueError(f"reference is not the model qmodel came from: {fqn!r} is a {type(ref).__name__}"
                             f"{'' if w is None else ' with weight shape ' + str(tuple(w.shape))}, qmodel's "
                             f"{type(chip).__name__} has weight shape {tuple(mine.shape)}")
        if not isinstance(chip, LNSClusteredConv2d):
            cos = F.cosine_similarity(w.flatten().double(), mine.flatten().double(), dim=0).item()
            if cos < 0.8:
                raise ValueError(f"reference is not the model qmodel came from: the weights of {fqn!r} do not "
                                 f"match qmodel's (cosine similarity {cos:.2f})")
    return twin


def _reference_weight(ref: nn.Module, chip: _CodedLayer) -> Optional[torch.Tensor]:
    w = getattr(ref, "weight", None)
    if not isinstance(w, torch.Tensor) or isinstance(w, nn.UninitializedParameter):
        return None
    w = w.detach().float()
    if isinstance(chip, _LNSConvTransposeNd):
        return transpose_weight_as_conv(w, chip.groups) if w.dim() == chip.weight.dim() else None
    return w


def _check_runs(model: nn.Module, item, forward_fn, what: str):
    try:
        with torch.no_grad():
            return call_model(model, item, forward_fn, _device(model))
    except Exception as e:  # noqa: BLE001 - one clear line for data the model cannot run on
        raise ValueError(f"the calibration data does not run through the {what}: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _output(y, output_fn):
    if output_fn is not None:
        return output_fn(y)
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, dict):
        return torch.cat([v.flatten(1) for v in y.values() if isinstance(v, torch.Tensor)], 1)
    if isinstance(y, (tuple, list)):
        return torch.cat([v.flatten(1) for v in y if isinstance(v, torch.Tensor)], 1)
    raise TypeError(f"cannot read a tensor from a model output of type {type(y).__name__}; pass output_fn")


class FidelityMeter:
    """Agreement of the arg-max over dim 1, SQNR (dB) and KL(float || converted) of output pairs,
    accumulated over batches (``add``), read with ``result()``."""

    def __init__(self):
        self.agree, self.n, self.sig, self.err, self.kl, self.samples = 0, 0, 0.0, 0.0, 0.0, 0

    @torch.no_grad()
    def add(self, yq: torch.Tensor, yf: torch.Tensor) -> None:
        yq, yf = yq.float(), yf.float()
        if yf.dim() >= 2:
            self.agree += (yf.argmax(1) == yq.argmax(1)).sum().item()
            self.n += yf.argmax(1).numel()
            self.kl += _kl(yq, yf).item() * yf.shape[0]
            self.samples += yf.shape[0]
        self.sig += yf.double().pow(2).sum().item()
        self.err += (yf.double() - yq.double()).pow(2).sum().item()

    def result(self) -> dict:
        return dict(agreement=self.agree / max(self.n, 1),
                    sqnr=10 * math.log10(self.sig / self.err) if self.err > 0 else float("inf"),
                    kl=self.kl / max(self.samples, 1))


@torch.no_grad()
def fidelity(qmodel: nn.Module, twin: nn.Module, items: list, forward_fn=None, output_fn=None) -> dict:
    """Agreement of the arg-max over dim 1, SQNR (dB) and KL(float || converted) of the outputs on ``items``."""
    meter = FidelityMeter()
    for item in items:
        meter.add(_output(call_model(qmodel, item, forward_fn, _device(qmodel)), output_fn),
                  _output(call_model(twin, item, forward_fn, _device(twin)), output_fn))
    return meter.result()


def _kl(yq: torch.Tensor, yf: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(float || converted) of the softmax over dim 1, summed over classes, averaged over the rest."""
    return F.kl_div((yq / temperature).log_softmax(1), (yf / temperature).log_softmax(1), log_target=True,
                    reduction="none").sum(1).mean()


def _prepare(qmodel, reference, data, forward_fn, inplace):
    items = _items(data)
    twin = _float_twin(qmodel, reference)
    _check_runs(twin, items[0], forward_fn, "reference model")
    model = qmodel if inplace else copy.deepcopy(qmodel)
    _check_runs(model, items[0], forward_fn, "converted model")
    return model, twin, items


def channel_rows(out: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A layer's output as (positions, channels) rows: channels are the last dim of a linear layer's
    output and dim 1 of a conv's."""
    if not hasattr(module, "kernel_size"):
        return out.reshape(-1, out.shape[-1])
    return out.transpose(1, -1).reshape(-1, out.shape[1])


# ----------------------------------------------------------------------------------------
# bias correction
# ----------------------------------------------------------------------------------------
def _channel_means(model: nn.Module, fqns: Sequence[str], items: list, forward_fn) -> Dict[str, torch.Tensor]:
    """Mean output per channel (dim 1; the last dim of a linear layer's output) of each named module."""
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    mods = dict(model.named_modules())
    hooks = []

    def hook(fqn):
        def fn(mod, args, out):
            y = channel_rows(out.detach().double(), mod)
            sums[fqn] = sums.get(fqn, 0) + y.sum(0)
            counts[fqn] = counts.get(fqn, 0) + y.shape[0]
        return fn

    for f in fqns:
        hooks.append(mods[f].register_forward_hook(hook(f)))
    try:
        with torch.no_grad():
            for item in items:
                call_model(model, item, forward_fn, _device(model))
    finally:
        for h in hooks:
            h.remove()
    return {f: sums[f] / counts[f] for f in sums}


def bias_correction(qmodel: nn.Module, reference: nn.Module, data: Iterable, *, passes: int = 2,
                    add_missing: bool = False, forward_fn: Optional[Callable] = None, inplace: bool = False,
                    progress=None) -> nn.Module:
    """Subtract each chip layer's mean output error per channel from its bias (see Note: accuracy recovery).

    ``reference`` is the float model ``qmodel`` was converted from and ``data`` calibration
    items as ``convert`` takes them. A layer without a bias is left alone unless
    ``add_missing`` (a bias is a stored field of 32 bits per channel). Returns the corrected
    model (a copy unless ``inplace``).
    """
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive int, got {passes!r}")
    model, twin, items = _prepare(qmodel, reference, data, forward_fn, inplace)
    return _bias_correction(model, twin, items, passes, forward_fn, progress, add_missing)


def _bias_correction(model, twin, items, passes, forward_fn, progress, add_missing=False):
    from tqdm.auto import tqdm

    chips = {f: m for f, m in _chip_layers(model).items() if m.bias is not None or add_missing}
    want = _channel_means(twin, list(chips), items, forward_fn)
    batch = _one_batch(items) if forward_fn is None else None
    for _ in tqdm(range(passes), desc="bias correction", disable=_disabled(progress)):
        if batch is not None:
            _correct_in_one_pass(model, chips, want, batch)
            continue
        for fqn, m in chips.items():  # in module order, each measured with the ones before corrected
            got = _channel_means(model, [fqn], items, forward_fn)
            if fqn in got and fqn in want:
                _shift_bias(m, (got[fqn] - want[fqn]).float())
    return model


def _one_batch(items: list):
    """All tensor items (or (input, target) pairs) as one input batch; None if they are anything else."""
    xs = [it if isinstance(it, torch.Tensor) else it[0] if isinstance(it, (tuple, list)) and it and
          isinstance(it[0], torch.Tensor) else None for it in items]
    if any(x is None or x.dim() == 0 or x.shape[1:] != xs[0].shape[1:] for x in xs):
        return None
    return torch.cat(xs) if len(xs) > 1 else xs[0]


def _shift_bias(m: nn.Module, delta: torch.Tensor) -> None:
    with torch.no_grad():
        delta = delta.to(_device(m))
        if m.bias is None:
            m.bias = nn.Parameter(torch.zeros(delta.shape[0], device=delta.device))
        m.bias -= delta


def _correct_in_one_pass(model, chips, want, batch) -> None:
    """Sequential correction in one forward of the whole data as one batch: each layer's hook measures its
    mean error with the layers before already corrected, corrects its bias, and passes the corrected output on."""
    done = set()

    def hook(fqn, m):
        def fn(mod, args, out):
            channel = 1 if hasattr(mod, "kernel_size") else out.dim() - 1
            shape = [1] * out.dim()
            shape[channel] = -1
            if fqn not in done and fqn in want:
                delta = (channel_rows(out.detach().double(), mod).mean(0) - want[fqn]).float()
                _shift_bias(m, delta)
                done.add(fqn)
                m._bias_shift = delta
            shift = getattr(m, "_bias_shift", None)
            return out if shift is None else out - shift.reshape(shape).to(out.dtype)
        return fn

    hooks = [m.register_forward_hook(hook(f, m)) for f, m in chips.items()]
    try:
        with torch.no_grad():
            call_model(model, batch, None, _device(model))
    finally:
        for h in hooks:
            h.remove()
        for m in chips.values():
            m.__dict__.pop("_bias_shift", None)


# ----------------------------------------------------------------------------------------
# adaptive rounding
# ----------------------------------------------------------------------------------------
_ZETA, _GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


def _h(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0, 1)


def _h_inverse(h: torch.Tensor) -> torch.Tensor:
    p = ((h - _GAMMA) / (_ZETA - _GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


class _Rung:
    """The two rungs of the magnitude ladder around each value of one stored coded field."""

    def __init__(self, coded: Coded, target: torch.Tensor):
        fmt = coded.fmt
        self.coded = coded
        target = target.detach().float().to(coded.codes.device)
        negative, index = fmt.magnitude(coded.codes)
        value = coded.dequantize().abs()
        below = value <= target.abs()
        self.lo = torch.where(below, index, (index - 1).clamp_min(0))
        self.hi = torch.where(below, (index + 1).clamp_max(fmt.max_index), index)
        self.negative = torch.where(index == 0, target < 0, negative)
        self.v_lo = self._value(self.lo)
        self.v_hi = self._value(self.hi)
        gap = self.v_hi - self.v_lo
        frac = torch.where(gap > 0, (target.abs() - self.v_lo) / torch.where(gap > 0, gap, 1), 0.0).clamp(0, 1)
        self.v = nn.Parameter(_h_inverse(frac))
        self.sign = torch.where(self.negative, -1.0, 1.0)

    def _value(self, index):
        c = Coded(self.coded.fmt.from_magnitude(torch.zeros_like(self.negative), index), self.coded.param,
                  self.coded.fmt, self.coded.block)
        return c.dequantize().abs()

    def soft(self) -> torch.Tensor:
        return self.sign * (self.v_lo + _h(self.v) * (self.v_hi - self.v_lo))

    def hard(self, nearest: bool = False) -> Coded:
        if nearest:
            return self.coded
        up = _h(self.v.detach()) >= 0.5
        codes = self.coded.fmt.from_magnitude(self.negative, torch.where(up, self.hi, self.lo))
        return Coded(codes, self.coded.param, self.coded.fmt, self.coded.block)


class _Shim:
    """What a chip layer's fake forward reads as its weight: ``dequantize()`` gives the soft weight."""

    def __init__(self, fn):
        self.fn = fn

    def dequantize(self):
        return self.fn()


class _LayerRounding:
    """The stored fields of one chip layer that rounding chooses, and how its weight is made of them."""

    def __init__(self, layer: _CodedLayer, reference_weight: Optional[torch.Tensor]):
        self.layer = layer
        if isinstance(layer, LNSClusteredConv2d):  # centroids and kernel scales: the chip's stored fields
            c, s = layer.centroids.coded, layer.kernel_scales.coded
            self.rungs = {"centroids": _Rung(c, c.dequantize()), "kernel_scales": _Rung(s, s.dequantize())}
        else:
            w = layer.weight.coded
            self.rungs = {"weight": _Rung(w, reference_weight if reference_weight is not None else w.dequantize())}

    def parameters(self) -> List[nn.Parameter]:
        return [r.v for r in self.rungs.values()]

    def soft_weight(self) -> torch.Tensor:
        if "weight" in self.rungs:
            return self.rungs["weight"].soft()
        return self.rungs["kernel_scales"].soft()[..., None, None] * self.rungs["centroids"].soft()[self.layer.indices]

    def regulariser(self, beta: float) -> torch.Tensor:
        return sum((1 - (2 * _h(r.v) - 1).abs().pow(beta)).mean() for r in self.rungs.values()) / len(self.rungs)

    def store(self, nearest: bool) -> None:
        fields = {k: r.hard(nearest).tensor() for k, r in self.rungs.items()}
        for k, t in fields.items():
            setattr(self.layer, k, t)


class _SoftForward:
    """Inside the block, every chip layer runs its fake-quantized forward on soft weights."""

    def __init__(self, roundings: List[_LayerRounding]):
        self.roundings = roundings

    def __enter__(self):
        self._saved = []
        for r in self.roundings:
            m = r.layer
            self._saved.append((m, m.training, m.train_forward, m._warned_frozen))
            m._coded_weight = (lambda r=r: _Shim(r.soft_weight))
            m.training, m.train_forward, m._warned_frozen = True, "fake", True
        return self

    def __exit__(self, *exc):
        for m, training, mode, warned in self._saved:
            del m._coded_weight
            m.training, m.train_forward, m._warned_frozen = training, mode, warned
        return False


def _blocks(model: nn.Module, item, forward_fn, max_layers: int) -> List[Tuple[str, List[str], dict]]:
    """(block fqn, its chip layers, its keyword arguments) in call order: the largest modules called once, with
    one tensor in and out (and keyword arguments that are not tensors) and at most ``max_layers`` chip layers;
    each chip layer outside such a module is a block of its own."""
    chips = _chip_layers(model)
    calls: Dict[str, int] = {}
    ok: Dict[str, bool] = {}
    kwargs_of: Dict[str, dict] = {}
    order: List[str] = []
    hooks = []
    for fqn, m in model.named_modules():
        if not fqn:
            continue

        def fn(mod, args, kwargs, out, fqn=fqn):
            calls[fqn] = calls.get(fqn, 0) + 1
            ok[fqn] = ok.get(fqn, True) and len(args) == 1 and isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor) and not any(isinstance(v, torch.Tensor) for v in kwargs.values())
            kwargs_of[fqn] = dict(kwargs)
            if fqn not in order:
                order.append(fqn)
        hooks.append(m.register_forward_hook(fn, with_kwargs=True))
    try:
        with torch.no_grad():
            call_model(model, item, forward_fn, _device(model))
    finally:
        for h in hooks:
            h.remove()

    def inside(fqn):
        return [c for c in chips if not fqn or c == fqn or c.startswith(fqn + ".")]

    blocks: Dict[str, List[str]] = {}

    def visit(fqn, mod):
        layers = inside(fqn)
        if not layers:
            return
        if fqn and calls.get(fqn) == 1 and ok.get(fqn) and len(layers) <= max_layers and \
                all(calls.get(c) == 1 for c in layers):
            blocks[fqn] = layers
            return
        if fqn in chips:
            return  # a chip layer called several times, or with other inputs: left to the other methods
        for name, child in mod.named_children():
            visit(f"{fqn}.{name}" if fqn else name, child)

    visit("", model)
    rank = {f: i for i, f in enumerate(order)}
    return [(f, layers, kwargs_of.get(f, {})) for f, layers in sorted(blocks.items(),
                                                                     key=lambda kv: rank.get(kv[0], 1 << 30))]


class _Stop(Exception):
    pass


def _capture(model: nn.Module, fqn: str, items: list, forward_fn, output: bool) -> torch.Tensor:
    """The input (or output) of module ``fqn`` on every item, stopping each forward right after it."""
    mod = dict(model.named_modules())[fqn]
    got = []

    def pre(m, args):
        if not output:
            got.append(args[0].detach())
            raise _Stop

    def post(m, args, out):
        got.append(out.detach())
        raise _Stop

    hooks = [mod.register_forward_pre_hook(pre)] + ([mod.register_forward_hook(post)] if output else [])
    try:
        with torch.no_grad():
            for item in items:
                try:
                    call_model(model, item, forward_fn, _device(model))
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(got)


def adaptive_rounding(qmodel: nn.Module, reference: nn.Module, data: Iterable, *, iterations: int = 300,
                      batch_size: int = 8, lr: float = 1e-2, bias_lr: float = 1e-3, reg_weight: float = 0.01,
                      max_block_layers: int = 4, seed: int = 0, forward_fn: Optional[Callable] = None,
                      inplace: bool = False, progress=None) -> nn.Module:
    """Choose each weight's code from the two rungs around its float value, block by block (Note: accuracy recovery).

    ``iterations`` Adam steps per block on minibatches of ``batch_size`` of the block's captured
    inputs; ``reg_weight`` scales AdaRound's regulariser against the normalised reconstruction
    error. Biases move with the rounding (``bias_lr``; 0 keeps them). Works for every format and
    MAC, and for clustered layers (their centroid and kernel-scale codes). Returns the model (a
    copy unless ``inplace``); ``model.rounding_report`` lists each block's reconstruction error.
    """
    for name, v in (("iterations", iterations), ("batch_size", batch_size), ("max_block_layers", max_block_layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    model, twin, items = _prepare(qmodel, reference, data, forward_fn, inplace)
    return _adaptive_rounding(model, twin, items, iterations, batch_size, lr, bias_lr, reg_weight, max_block_layers,
                              seed, forward_fn, progress)


def _adaptive_rounding(model, twin, items, iterations, batch_size, lr, bias_lr, reg_weight, max_block_layers, seed,
                       forward_fn, progress):
    from tqdm.auto import tqdm

    blocks = _blocks(model, items[0], forward_fn, max_block_layers)
    twin_mods = dict(twin.named_modules())
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    report = []
    bar = tqdm(blocks, desc="adaptive rounding", disable=_disabled(progress))
    for fqn, layers, block_kwargs in bar:
        x = _capture(model, fqn, items, forward_fn, output=False)
        y = _capture(twin, fqn, items, forward_fn, output=True)
        block = mods[fqn]
        roundings = [_LayerRounding(mods[f], _reference_weight(twin_mods[f], mods[f]))
                     for f in layers if f in twin_mods]
        biases = [mods[f].bias for f in layers if mods[f].bias is not None]
        start = [b.detach().clone() for b in biases]
        params = [{"params": [p for r in roundings for p in r.parameters()], "lr": lr}]
        if bias_lr > 0 and biases:
            for b in biases:
                b.requires_grad_(True)
            params.append({"params": biases, "lr": bias_lr})
        opt = torch.optim.Adam(params)
        scale = y.pow(2).mean().clamp_min(1e-30)

        def loss_on(idx):
            with _SoftForward(roundings):
                out = block(x[idx], **block_kwargs)
            return (out - y[idx]).pow(2).mean() / scale

        with torch.no_grad():  # nearest rounding (the codes as converted) on the whole data, for the guard
            before = _block_error(block, block_kwargs, x, y, scale)
        for it in range(iterations):
            idx = torch.randint(x.shape[0], (min(batch_size, x.shape[0]),), generator=gen)
            beta = 20 - (20 - 2) * max(0.0, (it - 0.2 * iterations) / (0.8 * iterations))
            reg = sum(r.regulariser(beta) for r in roundings) / max(1, len(roundings))
            warm = it < 0.2 * iterations
            loss = loss_on(idx) + (0.0 if warm else reg_weight * reg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for b in biases:
            b.requires_grad_(False)
        saved = {r.layer: {k: getattr(r.layer, k) for k in r.rungs} for r in roundings}
        for r in roundings:
            r.store(nearest=False)
        with torch.no_grad():
            after = _block_error(block, block_kwargs, x, y, scale)
        kept = after <= before
        if not kept:  # worse than nearest rounding on the whole data: undo, biases too
            for r in roundings:
                for k, t in saved[r.layer].items():
                    setattr(r.layer, k, t)
            with torch.no_grad():
                for b, s in zip(biases, start):
                    b.copy_(s)
        for b in biases:
            b.requires_grad_(True)
        report.append(dict(block=fqn, layers=len(layers), before_db=-10 * math.log10(max(before, 1e-30)),
                           after_db=-10 * math.log10(max(after if kept else before, 1e-30)), kept=kept))
        bar.set_postfix(block=fqn, db=f"{report[-1]['after_db']:.1f}")
        x = y = None  # free this block's captures before the next block's
    model.rounding_report = report
    return model


def _block_error(block, kwargs, x, y, scale) -> float:
    """Normalised squared error of the block's exact chip output on all of ``x``."""
    err = 0.0
    for xs, ys in zip(x.split(32), y.split(32)):
        err += (block(xs, **kwargs) - ys).double().pow(2).sum().item()
    return err / (y.numel() * scale.item())


# ----------------------------------------------------------------------------------------
# distillation
# ----------------------------------------------------------------------------------------
def distill(qmodel: nn.Module, reference: nn.Module, data: Iterable, *, steps: int = 200, batch_size: int = 16,
            lr: float = 1e-3, loss: str = "kl", temperature: float = 1.0, features: Sequence[str] = (),
            feature_weight: float = 1.0, augment: Optional[Callable] = None, time_budget: Optional[float] = None,
            validate_every: int = 25, seed: int = 0, forward_fn: Optional[Callable] = None,
            output_fn: Optional[Callable] = None, inplace: bool = False, progress=None) -> nn.Module:
    """Fine-tune the chip's stored fields against the float model's outputs (Note: accuracy recovery).

    ``loss``: ``"kl"`` (softmax over dim 1: logits, or per-pixel class maps of a dense head) or
    ``"mse"`` (normalised); ``features``: module names whose outputs are matched too (normalised
    MSE, ``feature_weight``). ``augment(x)`` transforms each training batch (both models see
    the same); ``lr`` is Adam's step relative to each layer's weight RMS. Runs ``steps`` steps or
    until ``time_budget`` seconds, keeping the state with the lowest held-out loss. Tensor
    items are split into minibatches of ``batch_size``; other items are used as they are.
    """
    if loss not in ("kl", "mse"):
        raise ValueError(f"loss must be 'kl' or 'mse', got {loss!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    model, twin, items = _prepare(qmodel, reference, data, forward_fn, inplace)
    return _distill(model, twin, items, steps, batch_size, lr, loss, temperature, tuple(features), feature_weight,
                    augment, time_budget, validate_every, seed, forward_fn, output_fn, progress)


def _minibatches(items: list, batch_size: int) -> list:
    out = []
    for item in items:
        if isinstance(item, torch.Tensor) and item.dim() >= 1 and item.shape[0] > batch_size:
            out += list(item.split(batch_size))
        else:
            out.append(item)
    return out


def _distill(model, twin, items, steps, batch_size, lr, loss, temperature, features, feature_weight, augment,
             time_budget, validate_every, seed, forward_fn, output_fn, progress):
    from tqdm.auto import tqdm

    from .convert import enable_qat

    batches = _minibatches(items, batch_size)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(batches), generator=gen).tolist()
    held = [batches[i] for i in order[: max(1, len(batches) // 5)]] if len(batches) > 1 else batches
    train = [batches[i] for i in order[len(held):]] if len(batches) > 1 else batches
    chips = _chip_layers(model)
    enable_qat(model, "fake")
    groups = []
    for m in chips.values():
        masters = [p for p in (m.weight_float, getattr(m, "centroids_float", None), getattr(m, "scales_float", None))
                   if isinstance(p, nn.Parameter)]
        for p in masters:
            rms = p.detach().float().pow(2).mean().sqrt().clamp_min(1e-12).item()
            groups.append({"params": [p], "lr": lr * rms})
        if m.bias is not None:
            rms = m.bias.detach().float().pow(2).mean().sqrt().clamp_min(1e-6).item()
            groups.append({"params": [m.bias], "lr": lr * rms})
    opt = torch.optim.Adam(groups)
    feats_q: Dict[str, torch.Tensor] = {}
    feats_f: Dict[str, torch.Tensor] = {}
    hooks = []
    mods, twin_mods = dict(model.named_modules()), dict(twin.named_modules())
    for f in features:
        if f not in mods or f not in twin_mods:
            raise ValueError(f"features names {f!r}, which is not a module of both models")
        hooks.append(mods[f].register_forward_hook(lambda m, a, o, f=f: feats_q.__setitem__(f, o)))
        hooks.append(twin_mods[f].register_forward_hook(lambda m, a, o, f=f: feats_f.__setitem__(f, o)))

    def objective(yq, yf):
        if loss == "kl" and yf.dim() >= 2:
            return _kl(yq, yf, temperature) * temperature ** 2
        return (yq - yf).pow(2).mean() / yf.pow(2).mean().clamp_min(1e-30)

    def chip_mode(train: bool):
        for m in chips.values():
            m.train(train)  # eval() re-encodes the masters: the exact chip

    def held_loss() -> float:
        chip_mode(False)
        total = 0.0
        with torch.no_grad():
            for item in held:
                total += objective(_output(call_model(model, item, forward_fn, _device(model)), output_fn).float(),
                                   _output(call_model(twin, item, forward_fn, _device(twin)), output_fn).float()).item()
        return total / len(held)

    def snapshot():  # the stored fields: eval() assigns new coded tensors, so references are enough
        return {f: ({k: m._buffers[k] for k in _STORED if m._buffers.get(k) is not None},
                    None if m.bias is None else m.bias.detach().clone()) for f, m in chips.items()}

    best, best_state, start = held_loss(), snapshot(), time.monotonic()
    first = best
    bar = tqdm(range(steps), desc="distill", disable=_disabled(progress))
    try:
        for step in bar:
            item = train[step % len(train)]
            if augment is not None:
                item = _augmented(item, augment)
            chip_mode(True)
            with torch.no_grad():
                yf = _output(call_model(twin, item, forward_fn, _device(twin)), output_fn).float()
            yq = _output(call_model(model, item, forward_fn, _device(model)), output_fn).float()
            total = objective(yq, yf)
            for f in features:
                total = total + feature_weight * (feats_q[f] - feats_f[f].detach()).pow(2).mean() / \
                    feats_f[f].detach().pow(2).mean().clamp_min(1e-30)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            bar.set_postfix(loss=f"{total.item():.4f}", held=f"{best:.4f}")
            last = step == steps - 1 or (time_budget is not None and time.monotonic() - start > time_budget)
            if (step + 1) % validate_every == 0 or last:
                h = held_loss()
                if h < best:
                    best, best_state = h, snapshot()
            if last:
                break
    finally:
        for hk in hooks:
            hk.remove()
    chip_mode(False)
    _drop_masters(chips.values())
    with torch.no_grad():
        for f, (fields, bias) in best_state.items():
            for k, t in fields.items():
                setattr(chips[f], k, t)
            if bias is not None:
                chips[f].bias.copy_(bias)
    model.distill_report = dict(held_out_loss_before=first, held_out_loss_after=best, steps=step + 1)
    return model


_STORED = ("weight", "centroids", "kernel_scales")


def _drop_masters(layers) -> None:
    for m in layers:
        m.weight_float = None
        if isinstance(m, LNSClusteredConv2d):
            m.centroids_float = m.scales_float = None


def _augmented(item, augment):
    if isinstance(item, torch.Tensor):
        return augment(item)
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return type(item)([augment(item[0]), *item[1:]])
    return item


# ----------------------------------------------------------------------------------------
# error_split
# ----------------------------------------------------------------------------------------
# Note: error split
# Where a converted model's error comes from, split as AIMET's QuantAnalyzer splits it: every
# chip layer runs one way at a time, on the same data, against the float twin:
#   * weights only: the fake-quantized forward (float math on the decoded weights), its input float;
#   * activations only: the float layer, on its input as the chip encodes it;
#   * weights and activations: the fake-quantized forward, i.e. an ideal MAC (exact products, float sums);
#   * chip: the model as converted (its MAC: LUT conversion, fixed accumulator, saturation).
# Recovery changes only what the chip stores, weight codes and biases, not how activations
# are rounded: with every weight exact, the activations-only row is what bias correction and
# adaptive rounding can at best come back to (they may pass it by a little, by compensating
# systematic errors). Beyond it lie a finer activation format (``mixed_precision``) or a
# network trained to tolerate the rounding (``distill``, with far more data and steps).
@dataclass
class ErrorSplit:
    """Fidelity (``agreement``, ``sqnr``, ``kl`` as ``recover`` measures it) of each row of Note: error split."""

    rows: List[dict]

    def __getitem__(self, name: str) -> dict:
        for r in self.rows:
            if r["model"] == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r['model'] for r in self.rows]}")

    def __str__(self) -> str:
        return "error split (against the float model):\n" + format_table(
            ("quantized", "agreement", "SQNR dB", "KL"),
            [(r["model"], f"{r['agreement']:.1%}", f"{r['sqnr']:.1f}", f"{r['kl']:.4f}") for r in self.rows],
            right=(1, 2, 3))


SPLIT_ROWS = ("weights only", "activations only", "weights and activations", "chip")


class _Split(nn.Module):
    """A chip layer run one way of Note: error split."""

    def __init__(self, chip: _CodedLayer, float_layer: nn.Module, row: str):
        super().__init__()
        self.chip, self.float_layer, self.row = chip, float_layer, row

    def forward(self, x, *args, **kwargs):
        if self.row == "activations only":
            return self.float_layer(self.chip.fake_input(x), *args, **kwargs)
        return self.chip.fake_forward(x, *args, quantize_input=self.row != "weights only", **kwargs)


@torch.no_grad()
def error_split(qmodel: nn.Module, reference: nn.Module, data: Iterable, *, forward_fn: Optional[Callable] = None,
                output_fn: Optional[Callable] = None) -> ErrorSplit:
    """How much of ``qmodel``'s error its weights, its activations and its MAC each cause (see
    Note: error split), on ``data`` (items as ``convert`` takes them) against ``reference``, the
    float model it came from. The activations-only row bounds what recovery of stored weights can win."""
    model, twin, items = _prepare(qmodel, reference, data, forward_fn, inplace=True)
    floats = dict(twin.named_modules())
    rows = []
    for row in SPLIT_ROWS:
        hybrid = copy.deepcopy(model).eval()  # qmodel itself keeps its mode and state
        chips = _chip_layers(hybrid) if row != "chip" else {}
        if "" in chips:
            hybrid = _Split(chips[""], floats[""], row)
        else:
            for fqn, chip in chips.items():
                hybrid.set_submodule(fqn, _Split(chip, floats[fqn], row))
        rows.append(dict(model=row, **fidelity(hybrid, twin, items, forward_fn, output_fn)))
    return ErrorSplit(rows)


# ----------------------------------------------------------------------------------------
# recover
# ----------------------------------------------------------------------------------------
def recover(qmodel: nn.Module, reference: nn.Module, data: Iterable, *, methods: Sequence[str] = METHODS,
            forward_fn: Optional[Callable] = None, output_fn: Optional[Callable] = None, inplace: bool = False,
            progress=None, bias_passes: int = 2, rounding: Optional[dict] = None,
            distillation: Optional[dict] = None) -> nn.Module:
    """Win back fidelity from unlabelled ``data``: bias correction, adaptive rounding, distillation, in that order.

    ``reference`` is the float model ``qmodel`` was converted from; ``data`` calibration items
    as ``convert`` takes them (keep them apart from evaluation data). ``methods`` picks and
    orders the methods; ``rounding`` and ``distillation`` are keyword arguments for
    ``adaptive_rounding`` and ``distill``. Returns the recovered model (a copy unless
    ``inplace``) with ``recovery_report``: fidelity on the data before and after each method.
    Only stored fields change (see Note: accuracy recovery); ``qmodel`` is untouched unless
    ``inplace``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty sequence of {METHODS}, got {tuple(methods)!r}")
    model, twin, items = _prepare(qmodel, reference, data, forward_fn, inplace)
    report = RecoveryReport()
    now = fidelity(model, twin, items, forward_fn, output_fn)
    for method in methods:
        t = time.monotonic()
        note = ""
        if method == "bias":
            _bias_correction(model, twin, items, bias_passes, forward_fn, progress)
        elif method == "rounding":
            kw = dict(iterations=300, batch_size=8, lr=1e-2, bias_lr=1e-3, reg_weight=0.01, max_block_layers=4, seed=0)
            kw.update(rounding or {})
            _adaptive_rounding(model, twin, items, kw["iterations"], kw["batch_size"], kw["lr"], kw["bias_lr"],
                               kw["reg_weight"], kw["max_block_layers"], kw["seed"], forward_fn, progress)
            kept = sum(r["kept"] for r in model.rounding_report)
            note = f"{len(model.rounding_report)} blocks, {kept} rounded"
        else:
            kw = dict(steps=200, batch_size=16, lr=1e-3, loss="kl", temperature=1.0, features=(), feature_weight=1.0,
                      augment=None, time_budget=None, validate_every=25, seed=0)
            kw.update(distillation or {})
            _distill(model, twin, items, kw["steps"], kw["batch_size"], kw["lr"], kw["loss"], kw["temperature"],
                     tuple(kw["features"]), kw["feature_weight"], kw["augment"], kw["time_budget"],
                     kw["validate_every"], kw["seed"], forward_fn, output_fn, progress)
            d = model.distill_report
            note = f"{d['steps']} steps, held-out loss {d['held_out_loss_before']:.4f} -> {d['held_out_loss_after']:.4f}"
        after = fidelity(model, twin, items, forward_fn, output_fn)
        report.add(method, now, after, time.monotonic() - t, note)
        now = after
    model.recovery_report = report
    return model
