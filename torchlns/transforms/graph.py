"""What the conversion passes read off a model's code: an fx tracer that keeps layers whole,
and questions about a module's ``forward`` (does a subclass compute what its base class
computes? which part of a BN subclass is the normalisation?).

# Note: subclasses of the float layers
Real code subclasses ``nn.Conv2d``, ``nn.Linear`` and the BNs: to add a constructor argument
(``Conv3DSimple``), to override ``forward`` with the same computation (timm's ``Linear``), or
to compute something else (``Conv2dSame`` pads by the input size first; ``BatchNormAct2d``
applies an activation after the normalisation). A subclass is treated as its base class only
when its ``forward`` *is* the base class's, or when both trace (fx, in the module's current
mode) to the same graph: the same ops on the same attributes in the same order. Anything
else is not the base layer, and the passes say so by name instead of guessing.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LeafTracer", "trace", "base_layer", "forward_matches", "PRODUCERS", "is_bn_like", "bn_dims",
           "FLOAT_NORMS"]

PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_BN = nn.modules.batchnorm._BatchNorm
# Normalisations with per-sample statistics: they cannot fold and stay float (reported).
FLOAT_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def _is_frozen_bn(m: nn.Module) -> bool:
    """torchvision's/detectron2's ``FrozenBatchNorm2d``: fixed statistics and affine held as buffers."""
    return (not isinstance(m, _BN) and type(m).__name__.startswith("FrozenBatchNorm")
            and all(isinstance(getattr(m, k, None), torch.Tensor) for k in ("weight", "bias", "running_mean",
                                                                             "running_var")))


def is_bn_like(m: nn.Module) -> bool:
    return isinstance(m, _BN) or _is_frozen_bn(m)


def bn_dims(m: nn.Module) -> Optional[int]:
    """The spatial rank a BN-like module normalises (1, 2 or 3), or None if unknown."""
    for n, cls in ((1, nn.BatchNorm1d), (2, nn.BatchNorm2d), (3, nn.BatchNorm3d)):
        if isinstance(m, cls):
            return n
    name = type(m).__name__
    return int(name[-2]) if _is_frozen_bn(m) and name[-2:] in ("1d", "2d", "3d") else None


class LeafTracer(torch.fx.Tracer):
    """The default fx tracer, with every conv/linear/BN-like module (subclasses too) a leaf."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PRODUCERS) or is_bn_like(m) or super().is_leaf_module(m, qualname)


def trace(module: nn.Module, tracer_cls=LeafTracer) -> torch.fx.GraphModule:
    """``symbolic_trace`` with ``tracer_cls``; the GraphModule references, never re-creates, submodules."""
    tracer = tracer_cls()
    graph = tracer.trace(module)
    return torch.fx.GraphModule(tracer.root, graph, type(module).__name__)


class _InsideTracer(torch.fx.Tracer):
    """Traces into the root's own forward; its children stay leaves as usual."""


def _signature(module: nn.Module, cls: type) -> Optional[list]:
    """The traced graph of ``cls.forward`` run on ``module``'s state, as comparable tuples."""
    view = copy.copy(module)  # shares parameters and children; only its class differs
    view.__class__ = cls
    try:
        graph = _InsideTracer().trace(view)
    except Exception:  # noqa: BLE001 - an untraceable forward is simply not comparable
        return None
    index = {}
    out = []
    for i, node in enumerate(graph.nodes):
        index[node] = i

        def arg(a):
            return ("node", index[a]) if isinstance(a, torch.fx.Node) else a

        out.append((node.op, node.target if node.op != "placeholder" else "input",
                    tuple(torch.fx.node.map_aggregate(node.args, arg)) if node.op != "placeholder" else (),
                    tuple(sorted((k, torch.fx.node.map_aggregate(v, arg)) for k, v in node.kwargs.items()))))
    return out


def forward_matches(module: nn.Module, base: type) -> bool:
    """Whether ``module`` computes what ``base.forward`` computes (see Note: subclasses of the float layers)."""
    if type(module).forward is base.forward:
        return True
    mine, theirs = _signature(module, type(module)), _signature(module, base)
    return mine is not None and mine == theirs


def base_layer(module: nn.Module, bases: Tuple[type, ...]) -> Optional[type]:
    """The first of ``bases`` that ``module`` is an instance of (its most specific one)."""
    for cls in type(module).__mro__:
        if cls in bases:
            return cls
    return None


def _probe_input(module: nn.Module, base: type, g: torch.Generator) -> torch.Tensor:
    w = module.weight
    if base is nn.Linear:
        return torch.randn(3, module.in_features, generator=g, dtype=torch.float64)
    n = w.dim() - 2
    span = [d * (k - 1) + 1 for k, d in zip(module.kernel_size, module.dilation)]
    size = [sp + 2 * s + 1 for sp, s in zip(span, module.stride)]
    return torch.randn(2, module.in_channels, *size[:n], generator=g, dtype=torch.float64)


@torch.no_grad()
def affine_in_parameters(module: nn.Module, base: type) -> Optional[str]:
    """None if rescaling ``module``'s weight and bias per output channel rescales its output.

    The base layers qualify. A subclass with its own ``forward`` is checked on a seeded probe
    (``f(x; W·s, b·s + c) == s·f(x; W, b) + c`` per output channel): ``Conv2dSame`` passes, a
    weight-standardising conv does not. Otherwise a sentence saying why not.
    """
    if type(module).forward is base.forward and getattr(type(module), "_conv_forward", None) is \
            getattr(base, "_conv_forward", None):
        return None
    g = torch.Generator().manual_seed(0)
    out_dim = 0 if base is nn.Linear or not issubclass(base, nn.modules.conv._ConvTransposeNd) else 1
    C = module.out_features if base is nn.Linear else module.out_channels
    s = torch.rand(C, generator=g, dtype=torch.float64) * 2 + 0.25
    c = torch.randn(C, generator=g, dtype=torch.float64)
    probe = copy.deepcopy(module).double()
    try:
        x = _probe_input(probe, base, g)
        y = probe(x)
        w = probe.weight
        if out_dim == 1:  # ConvTranspose: (in, out/groups, *k); output channel gi*out_g + j
            G = probe.groups
            sw = s.reshape(G, 1, w.shape[1], *([1] * (w.dim() - 2)))
            w.data = (w.data.reshape(G, w.shape[0] // G, *w.shape[1:]) * sw).reshape(w.shape)
        else:
            w.data = w.data * s.reshape(-1, *([1] * (w.dim() - 1)))
        b = probe.bias.data if probe.bias is not None else torch.zeros(C, dtype=torch.float64)
        probe.bias = nn.Parameter(b * s + c)
        y2 = probe(x)
    except Exception as e:  # noqa: BLE001 - a forward that fails on the probe is not known to scale
        return f"its forward fails on a probe input ({type(e).__name__})"
    shape = (1, C) + (1,) * (y.dim() - 2)
    if y.dim() < 2 or y.shape[1] != C or y2.shape != y.shape:
        return "its output does not have the output channels on dim 1"
    want = y * s.reshape(shape) + c.reshape(shape)
    if not torch.allclose(y2, want, rtol=1e-9, atol=1e-9 * (1 + want.abs().max().item())):
        return "rescaling its weight does not rescale its output (a probe input disagreed)"
    return None
