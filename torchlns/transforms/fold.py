"""Batch-norm folding (chip-model.md section 6).

# Note: how folding finds its pairs
The graph comes from ``torch.fx``: a BatchNorm module call whose only input is the output of
a Conv/ConvTranspose/Linear module call. The graph is used for *analysis only*; the rewrite
is applied to a copy of the user's module tree (the weights of the producer are rescaled in
place and the BN becomes ``nn.Identity``). The returned model therefore keeps its class,
its methods and its ``forward`` code, which matters to users far more than a GraphModule.

Replacing a BN by the identity is only correct if every call of that BN is the folded one,
and rescaling the producer is only correct if every call of the producer feeds that BN. So
a pair is folded only when the BN and the producer are each called exactly once, the
producer's output has no other user, and neither module object is registered under a
second name (an alias the trace may not see).

If the whole model does not trace (data-dependent control flow, say), each submodule is
traced on its own, recursively; inside an ``nn.Sequential`` that does not trace, adjacent
(producer, BN) children are folded, since a Sequential feeds each child only the previous
child's output. This fallback is announced with a warning, because a submodule can also be
called from untraceable code that the analysis does not see.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.fx
import torch.nn as nn

from .._text import format_table

__all__ = ["fold_batchnorm", "FoldReport", "FoldEntry", "TorchLNSFoldWarning"]

_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm
# The BN class that normalises each producer's channel dimension; anything else does not
# line up with the producer's output channels (e.g. BatchNorm2d after a Linear).
_BN_FOR = {
    nn.Conv1d: (nn.BatchNorm1d,), nn.ConvTranspose1d: (nn.BatchNorm1d,), nn.Linear: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d,), nn.ConvTranspose2d: (nn.BatchNorm2d,),
    nn.Conv3d: (nn.BatchNorm3d,), nn.ConvTranspose3d: (nn.BatchNorm3d,),
}


class TorchLNSFoldWarning(UserWarning):
    """Folding fell back to container adjacency because torch.fx could not trace the model."""


@dataclass(frozen=True)
class FoldEntry:
    bn: str
    producer: Optional[str]
    folded: bool
    reason: str = ""


@dataclass
class FoldReport:
    """What ``fold_batchnorm`` folded, what it left, and why. ``print(report)`` shows a table."""

    entries: List[FoldEntry] = field(default_factory=list)
    traced: bool = True
    fallback_reason: str = ""

    @property
    def folded(self) -> List[FoldEntry]:
        return [e for e in self.entries if e.folded]

    @property
    def skipped(self) -> List[FoldEntry]:
        return [e for e in self.entries if not e.folded]

    def to_dicts(self) -> List[dict]:
        return [dict(bn=e.bn, producer=e.producer, folded=e.folded, reason=e.reason) for e in self.entries]

    def __str__(self) -> str:
        head = f"fold_batchnorm: {len(self.folded)} folded, {len(self.skipped)} left in place"
        if not self.traced:
            head += f" (torch.fx fallback: {self.fallback_reason})"
        rows = [(e.bn, e.producer or "-", "folded" if e.folded else f"kept: {e.reason}") for e in self.entries]
        return head + "\n" + format_table(("batch norm", "producer", "result"), rows)


def fold_batchnorm(model: nn.Module, inplace: bool = False, example_inputs: Optional[tuple] = None) -> nn.Module:
    """Fold eval-mode BatchNorm into the Conv/ConvTranspose/Linear that feeds it.

    Returns the model (a deep copy unless ``inplace``), whose folded BNs are
    ``nn.Identity``. The report is the returned model's ``fold_report`` attribute
    (a ``FoldReport``; ``print`` it). See Note: how folding finds its pairs.

    Linear + BatchNorm1d is exact only for 2-D ``(batch, features)`` input (on 3-D input
    BatchNorm1d normalises dim 1, not the features). ``example_inputs`` (a tuple of model
    inputs) lets the pass check the rank; without it such a BN becomes a guard that raises
    on input of another rank instead of computing a wrong answer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold_batchnorm needs an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = FoldReport()
    names = _all_names(model)
    fallbacks: List[str] = []
    _fold_tree(model, "", names, report, fallbacks, example_inputs)
    if fallbacks:
        report.traced = False
        report.fallback_reason = "; ".join(fallbacks)
        warnings.warn(
            f"torch.fx could not trace {report.fallback_reason}; folded what traced submodules and adjacent "
            "(producer, BN) pairs inside nn.Sequential show. Check the report (model.fold_report).",
            TorchLNSFoldWarning, stacklevel=2,
        )
    reported = {e.bn for e in report.entries}
    for name, m in model.named_modules():  # BNs the analysis never reached are reported too
        if isinstance(m, _BN) and name not in reported:
            report.entries.append(FoldEntry(name, None, False, "not fed by a Conv/Linear module call"))
    model.fold_report = report
    return model


# ----------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------
def _all_names(model: nn.Module) -> Dict[int, List[str]]:
    """Every name of every module and parameter object (more than one: aliased)."""
    names: Dict[int, List[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(name)
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _fold_tree(module: nn.Module, prefix: str, names, report: FoldReport, fallbacks: List[str],
               example_inputs=None) -> None:
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - any tracing failure means "use the fallback"
        if not list(module.children()):
            return
        fallbacks.append(f"{prefix or type(module).__name__} ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            _fold_sequential(module, prefix, names, report)
        for name, child in module.named_children():
            _fold_tree(child, _join(prefix, name), names, report, fallbacks)
        return
    if example_inputs is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    _fold_graph(module, gm, prefix, names, report)


def _fold_graph(root: nn.Module, gm: torch.fx.GraphModule, prefix: str, names, report: FoldReport) -> None:
    calls: Dict[str, int] = {}
    read_outside: set = set()  # modules whose parameters or buffers the graph reads directly
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read_outside.add(node.target.rpartition(".")[0])
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BN):
            continue
        bn_name = _join(prefix, node.target)
        if any(e.bn == bn_name for e in report.entries):
            continue
        bn = root.get_submodule(node.target)
        src = node.args[0] if node.args else None
        producer_name, producer = None, None
        if isinstance(src, torch.fx.Node) and src.op == "call_module":
            producer_name, producer = src.target, root.get_submodule(src.target)
        if not isinstance(producer, _PRODUCERS):
            what = type(producer).__name__ if producer is not None else _describe(src)
            reason = ("BN comes before the conv (only a BN after its producer can be folded)" if _feeds_conv(node, gm)
                      else f"fed by {what}, not a Conv/ConvTranspose/Linear module call")
        else:
            reason = _why_not(bn, producer, names)
        if reason is None and len(node.args) + len(node.kwargs) != 1:
            reason = "called with extra arguments"
        if reason is None and calls[node.target] > 1:
            reason = f"the BN module is called in {calls[node.target]} places"
        if reason is None and calls[producer_name] > 1:
            reason = f"the producer {_join(prefix, producer_name)} is called in {calls[producer_name]} places"
        if reason is None and len(src.users) > 1:
            others = sorted(u.name for u in src.users if u is not node)
            reason = f"the producer's output has other users ({', '.join(others)})"
        if reason is None and producer_name in read_outside:
            reason = "the producer's parameters are also used outside its call"
        if reason is None and node.target in read_outside:
            reason = "the BN's parameters or buffers are read outside its call"
        rank = _rank(src) if reason is None and isinstance(producer, nn.Linear) else None
        if rank is not None and rank != 2:
            reason = f"the Linear's output is {rank}-D; BatchNorm1d would normalise dim 1, not the features"
        if reason is None:
            _fold_pair(producer, bn)
            guard = isinstance(producer, nn.Linear) and rank is None
            _replace(root, node.target, _LinearFoldGuard(bn_name) if guard else nn.Identity())
        report.entries.append(FoldEntry(bn_name, _join(prefix, producer_name) if producer_name else None,
                                        reason is None, reason or ""))


def _rank(node: torch.fx.Node) -> Optional[int]:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _LinearFoldGuard(nn.Identity):
    """A BatchNorm1d folded into the Linear before it: exact only for 2-D input, so it checks."""

    def __init__(self, bn_name: str):
        super().__init__()
        self.bn_name = bn_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise RuntimeError(
                f"BatchNorm1d {self.bn_name!r} was folded into the Linear before it, which is exact only for "
                f"2-D (batch, features) input; this input is {x.dim()}-D. Fold with example_inputs=... so the "
                "pass can see the shapes and keep this BN.")
        return x


def _describe(src) -> str:
    if not isinstance(src, torch.fx.Node):
        return "a constant"
    if src.op == "placeholder":
        return f"the model input {src.target!r}"
    if src.op in ("call_function", "call_method"):
        return f"{getattr(src.target, '__name__', src.target)}()"
    return src.op


def _feeds_conv(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    return any(u.op == "call_module" and isinstance(gm.get_submodule(u.target), _PRODUCERS) for u in node.users)


def _why_not(bn: nn.Module, producer: nn.Module, names) -> Optional[str]:
    if bn.running_mean is None or bn.running_var is None:
        return "no running stats (track_running_stats=False)"
    if bn.training:
        return "in training mode (call .eval() first: folding uses the running stats)"
    kind = next(k for k in _BN_FOR if type(producer) is k or isinstance(producer, k))
    if not isinstance(bn, _BN_FOR[kind]):
        return f"{type(bn).__name__} does not match {type(producer).__name__}"
    out_channels = producer.out_features if isinstance(producer, nn.Linear) else producer.out_channels
    if bn.num_features != out_channels:
        return f"BN has {bn.num_features} features, the producer {out_channels} outputs"
    if torch.nn.utils.parametrize.is_parametrized(producer):
        return "the producer's weight is parametrized"
    if len(names[id(producer)]) > 1:
        return f"the producer is registered under several names ({', '.join(names[id(producer)])})"
    if len(names[id(bn)]) > 1:
        return f"the BN is registered under several names ({', '.join(names[id(bn)])})"
    for p in (producer.weight, producer.bias):
        if p is not None and len(names.get(id(p), ())) > 1:
            return f"the producer's parameters are shared ({', '.join(names[id(p)])})"
    return None


def _fold_sequential(seq: nn.Sequential, prefix: str, names, report: FoldReport) -> None:
    children = [(k, m) for k, m in seq._modules.items() if m is not None]  # in call order, repeats included
    for (pname, producer), (bname, bn) in zip(children, children[1:]):
        if not isinstance(bn, _BN) or not isinstance(producer, _PRODUCERS):
            continue
        reason = _why_not(bn, producer, names)
        if reason is None:
            _fold_pair(producer, bn)
            _replace(seq, bname, _LinearFoldGuard(_join(prefix, bname)) if isinstance(producer, nn.Linear)
                     else nn.Identity())
        report.entries.append(FoldEntry(_join(prefix, bname), _join(prefix, pname), reason is None, reason or ""))


# ----------------------------------------------------------------------------------------
# rewrite
# ----------------------------------------------------------------------------------------
@torch.no_grad()
def _fold_pair(producer: nn.Module, bn: nn.Module) -> None:
    """``W' = W·γ/√(var+ε)`` per output channel, ``b' = (b − mean)·γ/√(var+ε) + β``.

    Computed in float64 and rounded once, so the folded layer is as close to the original
    composition as float32 allows.
    """
    w = producer.weight
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    b = producer.bias.double() if producer.bias is not None else torch.zeros_like(var)
    if isinstance(producer, nn.modules.conv._ConvTransposeNd):
        # weight is (in, out/groups, *k); output channel g*out_g + j lives in group g, column j
        g = producer.groups
        shape = (g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        sw = s.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        new_w = (w.double().reshape(shape) * sw).reshape(w.shape)
    else:
        new_w = w.double() * s.reshape(-1, *([1] * (w.dim() - 1)))
    w.copy_(new_w.to(w.dtype))
    new_b = ((b - mean) * s + beta).to(w.dtype)
    if producer.bias is None:
        producer.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
    else:
        producer.bias.copy_(new_b)


def _replace(root: nn.Module, target: str, new: nn.Module) -> None:
    root.set_submodule(target, new.train(root.get_submodule(target).training))
