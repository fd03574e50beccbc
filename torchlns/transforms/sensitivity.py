"""``torchlns.sensitivity``: which chip layers cost a model its fidelity, and what keeping them wider buys.

# Note: per-layer sensitivity
The model is prepared once as ``convert`` prepares it (BN folded, kernels clustered if the
config says so) and converted once, so that every layer is calibrated on the float
activations exactly as in the real conversion. Hybrids are then built by putting converted
layers into the prepared float model, one layer at a time:

* **alone**: only this layer on the chip, every other layer float. Its SQNR is what this
  layer's quantization costs by itself (AIMET calls this per-layer analysis).
* **cumulative**: this layer and every chip layer before it in model order on the chip. The
  curve shows where the fidelity goes as errors accumulate through the network.

Every SQNR is of the model's outputs (all tensors in them, over all the data) against the
prepared float model's, in float64. The worst layers by the *alone* SQNR are the candidates
for a wider format: ``suggestion`` converts the model with the k worst kept float (or in the
``wider`` config) for k = 0..k_max and reports SQNR and stored size for each, so the choice
between fidelity and bytes is a row of a table; ``overrides(k)`` is the
``ConvertConfig.overrides`` entry that makes it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

import torch
import torch.nn as nn

from .._text import format_table
from ..config import ConvertConfig
from .cluster import _disabled, cluster_kernels
from .convert import call_model, convert
from .fold import fold_batchnorm
from .size import size_report

__all__ = ["sensitivity", "SensitivityReport", "LayerSensitivity", "Suggestion"]


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    kind: str
    macs: Optional[int]
    alone_db: float  # output SQNR with only this layer on the chip
    cumulative_db: float  # output SQNR with this layer and every chip layer before it on the chip


@dataclass(frozen=True)
class Suggestion:
    kept: tuple  # the layers kept wider, worst first
    sqnr_db: float
    bytes: float
    ratio: float  # float32 bytes / stored bytes


@dataclass
class SensitivityReport:
    """Per-layer SQNRs in model order (``layers``), the full conversion's SQNR, and suggestions."""

    layers: List[LayerSensitivity]
    full_db: float
    suggestions: List[Suggestion] = field(default_factory=list)
    wider: Optional[Mapping[str, Any]] = None

    def worst(self, k: int) -> List[str]:
        """The ``k`` layers whose conversion alone costs the most SQNR."""
        return [r.layer for r in sorted(self.layers, key=lambda r: r.alone_db)[:k]]

    def overrides(self, k: int) -> Dict[str, Optional[Mapping[str, Any]]]:
        """``ConvertConfig.overrides`` that keep the ``k`` worst layers float (or in ``wider``)."""
        return {name: None if self.wider is None else dict(self.wider) for name in self.worst(k)}

    def to_dicts(self) -> List[dict]:
        return [dataclasses.asdict(r) for r in self.layers]

    def __str__(self) -> str:
        rank = {r.layer: i + 1 for i, r in enumerate(sorted(self.layers, key=lambda r: r.alone_db))}
        rows = [(str(rank[r.layer]), r.layer or "(root)", r.kind, "-" if r.macs is None else f"{r.macs:,}",
                 _db(r.alone_db), _db(r.cumulative_db))
                for r in sorted(self.layers, key=lambda r: r.alone_db)]
        text = [f"sensitivity: output SQNR of the whole conversion {_db(self.full_db)} dB; layers worst first "
                "(alone: only this layer on the chip; cumulative: it and every chip layer before it in model order)",
                format_table(("rank", "layer", "kind", "MACs", "alone dB", "cumulative dB"), rows,
                             right=(0, 3, 4, 5))]
        if self.suggestions:
            how = "float" if self.wider is None else ", ".join(f"{k}={v}" for k, v in self.wider.items())
            srows = [(str(len(s.kept)), ", ".join(s.kept) or "-", _db(s.sqnr_db), f"{s.bytes:,.0f}", f"{s.ratio:.2f}x")
                     for s in self.suggestions]
            text += ["", f"keeping the k worst layers in {how} (ConvertConfig(overrides=report.overrides(k))):",
                     format_table(("k", "kept", "SQNR dB", "bytes", "vs float32"), srows, right=(0, 2, 3, 4))]
        return "\n".join(text)


def _db(v: float) -> str:
    return "inf" if v == math.inf else f"{v:.2f}"


def _flat(out) -> torch.Tensor:
    """Every tensor in a model output (tensor, tuple, list, dict), flattened, in float64."""
    if isinstance(out, torch.Tensor):
        return out.detach().double().flatten()
    if isinstance(out, Mapping):
        return torch.cat([_flat(out[k]) for k in sorted(out, key=str)]) if out else torch.zeros(0)
    if isinstance(out, (tuple, list)):
        return torch.cat([_flat(o) for o in out]) if out else torch.zeros(0)
    return torch.zeros(0, dtype=torch.float64)


class _Scorer:
    """SQNR of a model's outputs on the data against the reference outputs."""

    def __init__(self, reference: nn.Module, data: list, forward_fn):
        self.data, self.forward_fn = data, forward_fn
        self.refs = self._outputs(reference)
        self.power = sum(r.pow(2).sum().item() for r in self.refs)

    def _outputs(self, model: nn.Module) -> List[torch.Tensor]:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            return [_flat(call_model(model, item, self.forward_fn, device)).cpu() for item in self.data]

    def __call__(self, model: nn.Module) -> float:
        noise = sum((o - r).pow(2).sum().item() for o, r in zip(self._outputs(model), self.refs))
        if noise == 0:
            return math.inf
        return 10 * math.log10(self.power / noise) if self.power > 0 else -math.inf


def sensitivity(model: nn.Module, config: Optional[ConvertConfig] = None, data: Iterable = (), *,
                forward_fn: Optional[Callable] = None, k: int = 3, wider: Optional[Mapping[str, Any]] = None,
                progress: Optional[bool] = None) -> SensitivityReport:
    """Per-layer sensitivity of ``convert(model, config)`` on ``data`` (see Note: per-layer sensitivity).

    ``data`` is a list (or iterable) of calibration items, as ``convert`` takes; it is used both
    to calibrate and to score, so give held-out items if the model's own data is at stake.
    ``k``: suggestions for keeping 0..k of the worst layers float, or in ``wider`` (fields of
    ``ConvertConfig`` for those layers, e.g. ``{"fmt": LNSFormat(12, 6)}``). ``progress``
    shows a bar (default: only on a terminal).
    """
    from tqdm.auto import tqdm

    config = ConvertConfig() if config is None else config
    data = list(data)
    if not data:
        raise ValueError("sensitivity needs data: a non-empty list of calibration items")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    prepared = copy.deepcopy(model).eval().float()
    if config.fold_bn:
        prepared = fold_batchnorm(prepared, inplace=True)
    if config.cluster is not None:
        c = config.cluster
        prepared = cluster_kernels(prepared, c.num_clusters, scope=c.scope, iterations=c.iterations, tol=c.tol,
                                   seed=c.seed, progress=progress, inplace=True)
    base = dataclasses.replace(config, fold_bn=False, cluster=None, progress=False)
    qmodel = convert(prepared, base, data, forward_fn=forward_fn)
    chip = [r["layer"] for r in qmodel.conversion_report]
    if not chip:
        raise ValueError("the config converts no layer of this model")
    if "" in chip:
        raise ValueError("the model is itself one layer; its sensitivity is the conversion's SQNR")
    score = _Scorer(prepared, data, forward_fn)
    floats = {name: prepared.get_submodule(name) for name in chip}
    converted = {name: qmodel.get_submodule(name) for name in chip}
    macs = {r["layer"]: r.get("macs") for r in qmodel.conversion_report}
    alone: Dict[str, float] = {}
    cumulative: Dict[str, float] = {}
    bar = tqdm(total=2 * len(chip), desc="sensitivity", disable=_disabled(progress))
    try:
        for name in chip:
            prepared.set_submodule(name, converted[name])
            alone[name] = score(prepared)
            prepared.set_submodule(name, floats[name])
            bar.update()
        for name in chip:  # model order; left converted for the next step
            prepared.set_submodule(name, converted[name])
            cumulative[name] = score(prepared)
            bar.update()
    finally:
        for name in chip:
            prepared.set_submodule(name, floats[name])
        bar.close()
    layers = [LayerSensitivity(n, type(converted[n]).__name__, macs.get(n), alone[n], cumulative[n]) for n in chip]
    report = SensitivityReport(layers, full_db=score(qmodel), wider=wider)
    reference = prepared
    for j in range(min(k, len(chip)) + 1):
        if j == 0:
            q = qmodel
        else:
            q = convert(prepared, dataclasses.replace(base, overrides={**dict(config.overrides), **report.overrides(j)}),
                        data, forward_fn=forward_fn)
        size = size_report(q, reference=reference)
        report.suggestions.append(Suggestion(tuple(report.worst(j)), score(q), size.total_bytes, size.ratio))
    return report
