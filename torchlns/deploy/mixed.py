"""``torchlns.mixed_precision``: a format per layer under a budget of stored bytes or of energy.

# Note: mixed-precision search
Every candidate format converts the whole model once (calibrated as ``convert`` calibrates),
which gives each layer's stored bytes (``size_report``) and energy (``cost_report``) in each
format. What a layer's quantization costs the model is estimated without converting it
alone: the layer's own error in each format (its chip output minus the float layer's, both
on the float model's input to the layer, per output channel) weighted by how much the
model's output moves when that layer's output moves: the mean squared gradient of the
cross-entropy against the float model's own predictions, per channel (the empirical Fisher
information, as in HAWQ and NVIDIA ModelOpt's AutoQuantize). The estimate is additive over
layers, so a greedy walk finds the trade: start from every layer's cheapest format, then take
the change of one layer's format with the largest estimated gain per added byte (or
picojoule), free gains first, until the budget is spent. Points along that walk, and every
single-format model, are then converted for real and measured on the data; the result is
the best measured point within the budget, and ``pareto`` marks the points that no other
beats on both cost and fidelity.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._text import format_table
from ..config import ConvertConfig
from ..core.formats import Format, IntFormat, LNSFormat
from ..nn.layers import _CodedLayer
from ..transforms.convert import call_model, convert
from ..transforms.fold import fold_batchnorm
from ..transforms.recover import _device, _output, channel_rows, fidelity
from ..transforms.size import size_report
from .cost import CHIPS, ChipSpec, cost_report

__all__ = ["mixed_precision", "MixedPrecisionResult", "default_candidates"]


def default_candidates(fmt: Format) -> List[Format]:
    """LNS8 with 3 and 4 fraction bits, LNS10 with 5 and 6, and INT8 (the base format first).

    LNS10 F=6 trades LNS10 F=5's range (2^16) for precision (2^8 range, steps of 2^(1/64)):
    per-tensor activations of trained networks rarely use more, and precision is what 8-bit
    LNS lacks (the direct kernels run every F up to 10 at LNS8's speed; see Note: product
    pairs in csrc/lns_direct.h).
    """
    out = [fmt]
    for c in (LNSFormat(8, 3), LNSFormat(8, 4), LNSFormat(10, 5), LNSFormat(10, 6), IntFormat(8)):
        if c not in out:
            out.append(c)
    return out


@dataclass
class MixedPrecisionResult:
    """``overrides`` for ``ConvertConfig``, the per-layer ``choices``, and the measured ``pareto`` rows."""

    overrides: Dict[str, dict]
    choices: Dict[str, str]
    pareto: List[dict] = field(default_factory=list)
    budget: Optional[dict] = None

    def config(self, base: ConvertConfig) -> ConvertConfig:
        return dataclasses.replace(base, overrides={**dict(base.overrides), **self.overrides})

    def __str__(self) -> str:
        rows = [(r["name"], f"{r['bytes']:,.0f}", f"{r['energy_uj']:.1f}", f"{100 * r['agreement']:.1f}%",
                 f"{r['sqnr']:.1f}", f"{r['kl']:.4f}", "*" if r["front"] else "", "<" if r["chosen"] else "")
                for r in self.pareto]
        return format_table(("point", "bytes", "energy uJ", "agreement", "SQNR dB", "KL", "front", "chosen"),
                            rows, right=(1, 2, 3, 4, 5))

    def plot(self, path) -> Path:
        """A PNG: measured fidelity (SQNR) against stored bytes and against energy; the front joined, the choice
        ringed, single-format models labelled."""
        from PIL import Image, ImageDraw

        path = Path(path)
        W, H, pad = 520, 360, 56
        img = Image.new("RGB", (2 * W, H), "white")
        d = ImageDraw.Draw(img)
        ys = [r["sqnr"] for r in self.pareto if math.isfinite(r["sqnr"])] or [0.0]
        y0, y1 = min(ys) - 1, max(ys) + 1
        for panel, key, label in ((0, "bytes", "stored bytes"), (1, "energy_uj", "energy per inference (uJ)")):
            ox = panel * W
            xs = [r[key] for r in self.pareto] or [0.0]
            x0, x1 = min(xs) * 0.97, max(xs) * 1.03 + 1e-9

            def at(r, ox=ox, key=key, x0=x0, x1=x1):
                return (ox + pad + (r[key] - x0) / (x1 - x0) * (W - 2 * pad),
                        H - pad - (min(max(r["sqnr"], y0), y1) - y0) / (y1 - y0) * (H - 2 * pad))

            d.rectangle([ox + pad, pad, ox + W - pad, H - pad], outline="black")
            d.text((ox + W // 2 - 60, H - pad + 24), label, fill="black")
            d.text((ox + 4, pad - 20), "output SQNR (dB)", fill="black")
            for v, s in ((x0, f"{x0:,.0f}"), (x1, f"{x1:,.0f}")):
                d.text((ox + pad + (v - x0) / (x1 - x0) * (W - 2 * pad) - 20, H - pad + 6), s, fill="black")
            for v in (y0, y1):
                d.text((ox + 6, H - pad - (v - y0) / (y1 - y0) * (H - 2 * pad) - 6), f"{v:.1f}", fill="black")
            front = sorted((r for r in self.pareto if r["front"]), key=lambda r: r[key])
            if len(front) > 1:
                d.line([at(r) for r in front], fill=(40, 90, 200), width=2)
            for r in self.pareto:
                x, y = at(r)
                colour = (40, 90, 200) if r["kind"] == "mixed" else (200, 60, 40)
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
                if r["kind"] == "single":
                    d.text((x + 6, y - 12), r["name"], fill=colour)
                if r["chosen"]:
                    d.ellipse([x - 9, y - 9, x + 9, y + 9], outline="black", width=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        return path


def _fisher(twin: nn.Module, layers: Sequence[str], items: list, forward_fn, output_fn) -> Dict[str, torch.Tensor]:
    """Per layer and output channel: the squared gradient of the cross-entropy against the float model's own
    predictions, summed over positions, averaged over samples."""
    mods = dict(twin.named_modules())
    acc: Dict[str, torch.Tensor] = {}
    samples = 0
    hooks = []

    def fwd(fqn):
        def fn(mod, args, out):
            if not out.requires_grad:
                return

            def grad(g, fqn=fqn, mod=mod):
                acc[fqn] = acc.get(fqn, 0) + channel_rows(g.detach().double().pow(2), mod).sum(0)
            out.register_hook(grad)
        return fn

    for f in layers:
        hooks.append(mods[f].register_forward_hook(fwd(f)))
    try:
        for item in items:
            with torch.enable_grad():
                params = [p.requires_grad_(True) for p in twin.parameters()]
                y = _output(call_model(twin, item, forward_fn, _device(twin)), output_fn).float()
                if y.dim() >= 2:
                    loss = F.cross_entropy(y, y.detach().argmax(1), reduction="sum")
                else:
                    loss = 0.5 * y.pow(2).sum()
                loss.backward()
                samples += y.shape[0] if y.dim() else 1
                for p in params:
                    p.grad = None
    finally:
        for h in hooks:
            h.remove()
    return {f: v / max(samples, 1) for f, v in acc.items()}


@torch.no_grad()
def _local_errors(twin: nn.Module, converted: List[nn.Module], layers: Sequence[str], items: list,
                  forward_fn) -> List[Dict[str, torch.Tensor]]:
    """Per candidate, layer and output channel: the squared error of the chip layer against the float layer on
    the float model's input to it, summed over positions, averaged over samples."""
    mods = dict(twin.named_modules())
    chips = [dict(q.named_modules()) for q in converted]
    errs: List[Dict[str, torch.Tensor]] = [{} for _ in converted]
    samples = [0]
    hooks = []

    def fn(fqn):
        def hook(mod, args, out):
            for i, c in enumerate(chips):
                chip = c.get(fqn)
                if isinstance(chip, _CodedLayer):
                    e2 = channel_rows((chip(args[0]) - out).double().pow(2), mod).sum(0)
                    errs[i][fqn] = errs[i].get(fqn, 0) + e2
        return hook

    for f in layers:
        hooks.append(mods[f].register_forward_hook(fn(f)))
    try:
        for item in items:
            y = call_model(twin, item, forward_fn, _device(twin))
            t = y if isinstance(y, torch.Tensor) else None
            samples[0] += t.shape[0] if t is not None and t.dim() else 1
    finally:
        for h in hooks:
            h.remove()
    return [{f: v / samples[0] for f, v in e.items()} for e in errs]


def mixed_precision(model: nn.Module, data: Iterable, config: Optional[ConvertConfig] = None, *,
                    budget_bytes: Optional[float] = None, budget_energy: Optional[float] = None,
                    candidates: Optional[Sequence[Format]] = None, points: int = 6, chip: Optional[ChipSpec] = None,
                    forward_fn: Optional[Callable] = None, output_fn: Optional[Callable] = None,
                    plot: Optional[str] = None) -> MixedPrecisionResult:
    """Choose each chip layer's format from ``candidates`` under a budget (see Note: mixed-precision search).

    ``budget_bytes``: stored bytes of the layers (``size_report``); ``budget_energy``: microjoules per
    inference on ``chip`` (``cost_report``, default ``CHIPS["edge"]``) on the first data item; neither:
    the whole front. ``config`` is the base ``ConvertConfig`` (its MAC applies to the LNS
    candidates); ``data`` is calibration items as ``convert`` takes them. Returns the result
    whose ``.overrides`` plug into ``ConvertConfig(overrides=...)``; ``plot`` writes the PNG.
    """
    config = ConvertConfig() if config is None else config
    if not isinstance(config, ConvertConfig):
        raise TypeError(f"config must be a ConvertConfig, got {type(config).__name__}")
    if budget_bytes is not None and budget_energy is not None:
        raise ValueError("give one budget: budget_bytes or budget_energy")
    for name, v in (("budget_bytes", budget_bytes), ("budget_energy", budget_energy)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an int >= 2, got {points!r}")
    items = list([data] if isinstance(data, torch.Tensor) else data)
    if not items:
        raise ValueError("the calibration data is empty: mixed_precision needs at least one batch of inputs")
    candidates = default_candidates(config.fmt) if candidates is None else list(candidates)
    if not candidates or not all(isinstance(c, Format) for c in candidates):
        raise ValueError(f"candidates must be a non-empty sequence of formats, got {candidates!r}")
    chip = CHIPS["edge"] if chip is None else chip
    key = "energy" if budget_energy is not None else "bytes"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twin = fold_batchnorm(model, inplace=False).float().eval()
        try:
            converted = [convert(model, dataclasses.replace(config, fmt=c), items, forward_fn=forward_fn)
                         for c in candidates]
        except (TypeError, RuntimeError, IndexError) as e:
            raise ValueError(f"the data does not run through the model: {str(e).splitlines()[0]}") from None
    layers = [f for f, m in converted[0].named_modules() if isinstance(m, _CodedLayer)]
    cost: List[Dict[str, float]] = []
    for q in converted:
        if key == "bytes":
            cost.append({r["layer"]: r["bytes"] for r in size_report(q).rows})
        else:
            cost.append({r.layer: r.energy_pj / 1e6 for r in cost_report(q, items[0], chip, forward_fn=forward_fn).rows})
    fisher = _fisher(twin, layers, items, forward_fn, output_fn)
    errors = _local_errors(twin, converted, layers, items, forward_fn)
    impact = [{f: float((fisher.get(f, 0) * e[f]).sum()) if f in e else math.inf for f in layers} for e in errors]

    def total(state):
        return sum(cost[c].get(f, 0.0) for f, c in state.items())

    state = {f: min(range(len(candidates)), key=lambda c: (cost[c].get(f, 0.0), impact[c][f])) for f in layers}
    smallest = total(state)
    budget = budget_bytes if key == "bytes" else budget_energy
    if budget is not None and budget < smallest:
        unit = "bytes" if key == "bytes" else "uJ"
        raise ValueError(f"budget_{key}={budget:,.6g} is below the smallest the candidates allow: {smallest:,.6g} "
                         f"{unit} with every layer in its cheapest format")
    path = [dict(state)]
    while True:  # the greedy walk: best estimated gain per added cost, free gains first
        best, best_ratio = None, 0.0
        spent = total(state)
        for f in layers:
            for c in range(len(candidates)):
                gain = impact[state[f]][f] - impact[c][f]
                if c == state[f] or not gain > 0:
                    continue
                extra = cost[c].get(f, 0.0) - cost[state[f]].get(f, 0.0)
                if budget is not None and spent + extra > budget * (1 + 1e-9):
                    continue
                ratio = math.inf if extra <= 0 else gain / extra
                if best is None or ratio > best_ratio:
                    best, best_ratio = (f, c), ratio
        if best is None:
            break
        state[best[0]] = best[1]
        path.append(dict(state))
    picks = sorted({round(i * (len(path) - 1) / (points - 1)) for i in range(points)})
    rows = []

    def measure(name, kind, q, choice):
        fid = fidelity(q, twin, items, forward_fn, output_fn)
        energy = cost_report(q, items[0], chip, forward_fn=forward_fn).energy_pj / 1e6
        rows.append(dict(name=name, kind=kind, bytes=size_report(q).total_bytes, energy_uj=energy, **fid,
                         choice=choice, front=False, chosen=False))

    for c, q in zip(candidates, converted):
        measure(str(c), "single", q, {f: candidates.index(c) for f in layers})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in picks:
            s = path[i]
            overrides = _overrides(s, candidates, config)
            q = convert(model, dataclasses.replace(config, overrides={**dict(config.overrides), **overrides}), items,
                        forward_fn=forward_fn)
            changed = sum(1 for f in layers if candidates[s[f]] != config.fmt)
            measure(f"mixed {i}/{len(path) - 1} ({changed} layers)", "mixed", q, s)
    ckey = "bytes" if key == "bytes" else "energy_uj"
    for r in rows:
        r["front"] = not any(o is not r and o[ckey] <= r[ckey] and o["sqnr"] >= r["sqnr"] and
                             (o[ckey] < r[ckey] or o["sqnr"] > r["sqnr"]) for o in rows)
    within = [r for r in rows if budget is None or r[ckey] <= budget * (1 + 1e-9)]
    chosen = max(within or rows, key=lambda r: (r["sqnr"], -r[ckey]))
    chosen["chosen"] = True
    result = MixedPrecisionResult(overrides=_overrides(chosen["choice"], candidates, config),
                                  choices={f: str(candidates[c]) for f, c in chosen["choice"].items()},
                                  pareto=[{k: v for k, v in r.items() if k != "choice"} for r in rows],
                                  budget=None if budget is None else {key: budget})
    if plot is not None:
        result.plot(plot)
    return result


def _overrides(state: Dict[str, int], candidates: List[Format], config: ConvertConfig) -> Dict[str, dict]:
    return {f: {"fmt": candidates[c]} for f, c in state.items() if candidates[c] != config.fmt}
