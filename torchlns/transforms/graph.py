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

from ..core.geometry import ntuple
from ..nn.clustered import ClusteredConv2d

__all__ = ["LeafTracer", "trace", "base_layer", "forward_matches", "pad_then_base", "PAD_BASES", "PRODUCERS", "is_bn_like",
           "bn_dims", "FLOAT_NORMS"]

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
    """The default fx tracer, with every conv/linear/BN-like module (subclasses too) a leaf, and the
    clustered convs (whose "same" pad depends on the input's size, which fx cannot follow)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (PRODUCERS, ClusteredConv2d)) or is_bn_like(m) or super().is_leaf_module(m, qualname)


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

    The base layers qualify, and so does a subclass whose forward is a zero pad and then the base
    op on its own weight (``pad_then_base``, whose probes are cheaper than this one's float64
    ones). Any other subclass with its own ``forward`` is checked on a seeded probe
    (``f(x; W·s, b·s + c) == s·f(x; W, b) + c`` per output channel): a weight-standardising conv
    fails. Otherwise a sentence saying why not.
    """
    if type(module).forward is base.forward and getattr(type(module), "_conv_forward", None) is \
            getattr(base, "_conv_forward", None):
        return None
    if base in PAD_BASES and pad_then_base(module, base)[1] is None:
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


# Note: pad-then-conv subclasses
# Real model code writes "same" padding as a conv subclass whose ``forward`` pads its input
# and then calls the base op on its own weight: the EfficientNet wheels'
# ``Conv2dStaticSamePadding`` (a fixed ``nn.ZeroPad2d``) and ``Conv2dDynamicSamePadding``, and
# timm's ``Conv2dSame`` (pads from the input's size). fx cannot trace the dynamic ones
# (``math.ceil`` and ``max`` of input sizes), so ``pad_then_base`` records what the forward
# actually computes on concrete probe inputs of three sizes, with a ``TorchFunctionMode``:
# the calls that return tensors must be exactly one constant zero ``F.pad`` of the input
# (or none) and then the base op (``conv1d/2d/3d`` or ``linear``) on that, with the module's
# own weight, bias, stride, padding, dilation and groups, whose result is the output. The
# pads are then fixed (the same at every size) or TensorFlow's 'SAME' for each size
# (``tf_same_pads``); anything else (another computation, a non-zero pad value, another pad
# rule) is not recognised, and the layer stays float with the reason.
_BASE_OPS = {nn.Conv1d: torch.conv1d, nn.Conv2d: torch.conv2d, nn.Conv3d: torch.conv3d, nn.Linear: F.linear}
PAD_BASES = tuple(_BASE_OPS)


class _Record(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):  # sizes, dims and shapes are bookkeeping, not computation
            self.calls.append((func, args, kwargs, out))
        return out


def _pad_call(call, x) -> Tuple[Optional[tuple], Optional[str]]:
    func, args, kwargs, _ = call
    if func is not F.pad or not args or args[0] is not x:
        return None, "its forward computes something other than a pad of its input before the base op"
    names = ("input", "pad", "mode", "value")
    bound = dict(zip(names, args), **kwargs)
    mode, value = bound.get("mode", "constant"), bound.get("value", None)
    if mode != "constant":
        return None, f"it pads its input in mode {mode!r} before the base op (only constant zero pads convert)"
    if value not in (None, 0, 0.0):
        return None, f"it pads its input with the constant {value!r} (the chip pads with zeros)"
    return tuple(int(p) for p in bound["pad"]), None


def _base_call_matches(call, inp, module: nn.Module, base: type) -> Optional[str]:
    func, args, kwargs, _ = call
    if func is not _BASE_OPS[base]:
        return f"its forward computes something other than {_BASE_OPS[base].__name__} after the pad"
    names = ("input", "weight", "bias") if base is nn.Linear else \
        ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args), **kwargs)
    if bound.get("input") is not inp or bound.get("weight") is not module.weight or \
            bound.get("bias", None) is not module.bias:
        return f"its {_BASE_OPS[base].__name__} call is not on its padded input with its own weight and bias"
    if base is not nn.Linear:
        n = len(module.kernel_size)
        mine = (ntuple(module.stride, n, "stride"), module.padding if isinstance(module.padding, str)
                else ntuple(module.padding, n, "padding"), ntuple(module.dilation, n, "dilation"), module.groups)
        got = (ntuple(bound.get("stride", 1), n, "stride"), bound.get("padding", 0) if isinstance(bound.get("padding", 0), str)
               else ntuple(bound.get("padding", 0), n, "padding"), ntuple(bound.get("dilation", 1), n, "dilation"),
               bound.get("groups", 1))
        if mine != got:
            return f"its conv call's stride/padding/dilation/groups {got} are not the module's {mine}"
    return None


def _pad_probes(module: nn.Module, base: type, g: torch.Generator) -> list:
    """Three inputs of different sizes (float32, one sample: only the calls matter, and float64 convs can be
    slow). A Linear's last dim is fixed, and narrower than its
    ``in_features`` by what the forward pads: the widest width the forward accepts (at most 64 tries)."""
    if base is nn.Linear:
        for width in range(module.in_features, max(0, module.in_features - 64), -1):
            x = torch.randn(1, width, generator=g)
            try:
                with torch.no_grad():
                    module(x)
            except Exception:  # noqa: BLE001 - the wrong width: try a narrower one
                continue
            return [x]
        return [torch.randn(1, module.in_features, generator=g)]
    n = len(module.kernel_size)
    stride = ntuple(module.stride, n, "stride")
    span = [d * (k - 1) + 1 for k, d in zip(module.kernel_size, ntuple(module.dilation, n, "dilation"))]
    sizes = [[sp + 2 * s + extra for sp, s in zip(span, stride)] for extra in (1, 2, 5)]
    sizes[2] = [v + i for i, v in enumerate(sizes[2])]  # unequal dims catch a swapped H/W rule
    return [torch.randn(1, module.in_channels, *size, generator=g) for size in sizes]


def pad_then_base(module: nn.Module, base: type):
    """(InputPad, None) when ``module``'s forward is a zero pad of its input and then ``base``'s op on
    its own weight; (None, why not) otherwise (see Note: pad-then-conv subclasses)."""
    from ..core.geometry import InputPad, tf_same_pads

    if base not in _BASE_OPS:
        return None, None
    g = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(module).float().eval()
    seen = []
    for x in _pad_probes(probe, base, g):
        rec = _Record()
        try:
            with torch.no_grad(), rec:
                y = probe(x)
        except Exception as e:  # noqa: BLE001 - a forward that fails on a probe is not recognised
            return None, f"its forward fails on a probe input ({type(e).__name__})"
        calls = rec.calls
        pads, inp = None, x
        if len(calls) == 2:
            pads, why = _pad_call(calls[0], x)
            if why:
                return None, why
            inp = calls[0][3]
        elif len(calls) != 1:
            return None, f"its forward makes {len(calls)} tensor calls, not a pad and the base op"
        why = _base_call_matches(calls[-1], inp, probe, base)
        if why:
            return None, why
        if calls[-1][3] is not y:
            return None, "its forward changes the base op's result before returning it"
        seen.append((x, pads))
    if all(p is None for _, p in seen):
        return None, None  # no pad: the forward computes what the base class does (forward_matches' business)
    if any(p is None for _, p in seen):
        return None, "it pads some input sizes and not others, by a rule torchlns does not know"
    n = 1 if base is nn.Linear else len(module.kernel_size)
    full = [tuple(p) + (0,) * (2 * n - len(p)) if len(p) < 2 * n else tuple(p) for _, p in seen]
    if base is not nn.Linear:
        geo = (tuple(module.kernel_size), ntuple(module.stride, n, "stride"), ntuple(module.dilation, n, "dilation"))
        if all(f == tf_same_pads(tuple(x.shape[-n:]), *geo) for f, (x, _) in zip(full, seen)) and \
                len(set(full)) > 1:
            return InputPad(same=True), None
    if any(len(p) > 2 * n for _, p in seen):
        return None, "it pads the channel or batch dims of its input"
    if len(set(full)) == 1:
        return InputPad(pads=full[0]), None
    return None, "its pads depend on the input size by a rule other than TensorFlow's 'SAME'"
