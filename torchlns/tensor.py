"""``LNSTensor`` and its FP8/INT siblings: codes that behave as float32 tensors.

A coded tensor is a wrapper subclass (in the style of torchao's quantized tensors): its
logical dtype is float32, and it holds ``codes`` (the bit patterns), a compact ``param``
(offset for LNS, scale for FP8/INT; see Note: parameter layout in codec.py), the format and
an optional ``block = (axis, block_size)``. Layout ops move the parameters with the data.
``F.linear``, ``F.conv1d``, ``F.conv2d`` and ``torch.matmul`` run the reference MAC with the
ideal MAC config (``torchlns.lns_linear`` takes any other). Every other op raises an error
naming it, so that nothing silently computes on codes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .codec import _check_block_size, _norm_axis, calibrate, decode, encode, expand_param, _as_offset, _as_scale
from .formats import FP8Format, Format, IntFormat, LNSFormat

__all__ = ["CodedTensor", "LNSTensor", "FP8Tensor", "IntTensor", "implements", "implements_torch_function"]

aten = torch.ops.aten
_ATEN_TABLE: dict = {}
_TORCH_FN_TABLE: dict = {}


def implements(ops) -> Callable:
    """Register an aten-op implementation for every coded tensor type."""
    ops = ops if isinstance(ops, (list, tuple)) else [ops]

    def decorator(fn):
        for op in ops:
            _ATEN_TABLE[op] = fn
        return fn

    return decorator


def implements_torch_function(fns) -> Callable:
    """Register a torch-function-level override (``F.linear`` etc.)."""
    fns = fns if isinstance(fns, (list, tuple)) else [fns]

    def decorator(fn):
        for f in fns:
            _TORCH_FN_TABLE[f] = fn
        return fn

    return decorator


class CodedTensor(torch.Tensor):
    """Machinery shared by ``LNSTensor``, ``FP8Tensor`` and ``IntTensor``."""

    codes: torch.Tensor
    param: torch.Tensor
    fmt: Format
    block: Optional[tuple]

    @staticmethod
    def __new__(cls, codes: torch.Tensor, param: torch.Tensor, fmt: Format, block: Optional[tuple] = None):
        return torch.Tensor._make_wrapper_subclass(
            cls, codes.shape, strides=codes.stride(), dtype=torch.float32, device=codes.device, requires_grad=False
        )

    def __init__(self, codes: torch.Tensor, param: torch.Tensor, fmt: Format, block: Optional[tuple] = None):
        self.codes = codes
        self.param = param
        self.fmt = fmt
        self.block = block

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def _class_for(fmt: Format):
        if isinstance(fmt, LNSFormat):
            return LNSTensor
        if isinstance(fmt, FP8Format):
            return FP8Tensor
        if isinstance(fmt, IntFormat):
            return IntTensor
        raise TypeError(f"fmt must be an LNSFormat, FP8Format or IntFormat, got {type(fmt).__name__}")

    @classmethod
    def _make(cls, codes, param, fmt, block=None) -> "CodedTensor":
        return CodedTensor._class_for(fmt)(codes, param, fmt, block)

    @classmethod
    def from_float(cls, x: torch.Tensor, fmt: Format, offset=None, *, granularity: str = "tensor",
                   axis: Optional[int] = None, block_size: Optional[int] = None) -> "CodedTensor":
        """Encode ``x``. ``offset`` (LNS) or scale (FP8/INT) defaults to calibration from max|x|.

        ``granularity``: ``"tensor"``; ``"channel"`` (one per index of ``axis``, default 0);
        ``"block"`` (one per ``block_size`` run along ``axis``, default -1). A given
        ``offset`` must be an int or a tensor in that compact layout.
        """
        target = CodedTensor._class_for(fmt)
        if cls is not CodedTensor and cls is not target:
            raise TypeError(f"{cls.__name__}.from_float cannot hold {fmt}; use {target.__name__}.from_float")
        if isinstance(x, CodedTensor):
            raise TypeError("x is already encoded; call .dequantize() first to re-encode it")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        codes, param, block = encode_compact(x.detach(), fmt, granularity, axis, block_size, offset)
        return target(codes, param, fmt, block)

    def dequantize(self) -> torch.Tensor:
        """The float32 values of the codes (exact)."""
        return decode(self.codes, self.fmt, self._param_broadcast())

    def _param_broadcast(self) -> torch.Tensor:
        if self.block is None:
            return self.param
        axis, size = self.block
        return expand_param(self.param, axis, size, self.codes.shape[axis])

    # -- tensor-subclass protocol ----------------------------------------------------------
    def __tensor_flatten__(self):
        return ["codes", "param"], (self.fmt, self.block)

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        return cls(inner["codes"], inner["param"], *meta)

    def __reduce_ex__(self, protocol):
        # Plain tuples of builtins only, so that torch.load(weights_only=True) accepts it
        # once _rebuild_coded_tensor is a safe global (registered below).
        return _rebuild_coded_tensor, (_format_to_tuple(self.fmt), self.codes, self.param, self.block)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _TORCH_FN_TABLE:
            return _TORCH_FN_TABLE[func](func, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ATEN_TABLE:
            return _ATEN_TABLE[func](func, args, kwargs)
        raise NotImplementedError(
            f"{cls.__name__} does not support {func}: codes have no float meaning under it. "
            "Call .dequantize() to get float32 values first."
        )

    def __repr__(self, *, tensor_contents=None) -> str:
        p = self.param
        name = "offset" if isinstance(self.fmt, LNSFormat) else "scale"
        if p.numel() == 1:
            desc = f"{name}={p.reshape(()).item():g}"
        else:
            kind = f"per-block(axis={self.block[0]}, size={self.block[1]})" if self.block else "per-channel" if sum(
                s > 1 for s in p.shape) == 1 else "per-element"
            desc = f"{name}={kind} {tuple(p.shape)} in [{p.min().item():g}, {p.max().item():g}]"
        dev = "" if self.device.type == "cpu" else f", device={self.device}"
        return f"{type(self).__name__}({self.fmt}, shape={tuple(self.shape)}, {desc}{dev})"


class LNSTensor(CodedTensor):
    """Log-domain codes; ``.offset`` is the integer offset (per tensor, channel or block)."""

    @property
    def offset(self) -> torch.Tensor:
        return self.param


class FP8Tensor(CodedTensor):
    """FP8 codes (torch's bit patterns); ``.scale`` is the float32 scale."""

    @property
    def scale(self) -> torch.Tensor:
        return self.param


class IntTensor(CodedTensor):
    """Symmetric integer codes; ``.scale`` is the float32 scale."""

    @property
    def scale(self) -> torch.Tensor:
        return self.param


# ----------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------
def encode_compact(x: torch.Tensor, fmt: Format, granularity: str = "tensor", axis: Optional[int] = None,
                   block_size: Optional[int] = None, offset=None):
    """(codes, compact parameters, block) of ``x``: what ``from_float`` stores, as plain tensors.

    Layers call this inside ``forward``, where torch.compile cannot build a subclass.
    """
    block = None
    if granularity == "block":
        axis = _norm_axis(-1 if axis is None else axis, x.dim())
        block = (axis, _check_block_size(block_size))
    elif block_size is not None:
        raise ValueError(f"block_size is only used with granularity='block', not {granularity!r}")
    if offset is None:
        param = calibrate(x, fmt, granularity, axis, block_size)
    else:
        param = _compact_param(offset, fmt, x, granularity, axis, block_size)
    full = expand_param(param, *(block or (None, None)), x.shape[block[0]] if block else 0)
    return encode(x, fmt, full), param, block


def _compact_shape(x: torch.Tensor, granularity, axis, block_size) -> list:
    nd = x.dim()
    if granularity == "tensor":
        return [1] * nd
    if granularity == "channel":
        ax = _norm_axis(0 if axis is None else axis, nd)
        return [x.shape[d] if d == ax else 1 for d in range(nd)]
    if granularity == "block":
        return [-(-x.shape[d] // block_size) if d == axis else x.shape[d] for d in range(nd)]
    raise ValueError(f"unknown granularity {granularity!r}; expected 'tensor', 'channel' or 'block'")


def _compact_param(value, fmt, x, granularity, axis, block_size) -> torch.Tensor:
    shape = _compact_shape(x, granularity, axis, block_size)
    if isinstance(value, torch.Tensor):
        if value.numel() != int(torch.Size(shape).numel()):
            raise ValueError(
                f"{'offset' if isinstance(fmt, LNSFormat) else 'scale'} has {value.numel()} entries; "
                f"granularity={granularity!r} on shape {tuple(x.shape)} needs {tuple(shape)}"
            )
        value = value.reshape(shape)
    if isinstance(fmt, LNSFormat):
        p = _as_offset(value, fmt, torch.Size(shape), x.device)
    else:
        p = _as_scale(value, torch.Size(shape), x.device)
    return p.expand(shape).contiguous() if p.dim() == len(shape) or p.dim() == 0 else p.reshape(shape)


def _full_param(t: CodedTensor) -> torch.Tensor:
    """One parameter per element (used when a layout op cuts across the compact layout)."""
    return t._param_broadcast().expand(t.codes.shape)


def _compress(param: torch.Tensor, keep: tuple = ()) -> torch.Tensor:
    """Shrink every dim along which ``param`` is constant back to size 1."""
    for d in range(param.dim()):
        if d in keep or param.shape[d] == 1:
            continue
        first = param.narrow(d, 0, 1)
        if torch.equal(param, first.expand_as(param)):
            param = first
    return param.contiguous()


# ----------------------------------------------------------------------------------------
# aten implementations: layout ops
# ----------------------------------------------------------------------------------------
def _same(t: CodedTensor, codes, param, block=...):
    return CodedTensor._make(codes, param, t.fmt, t.block if block is ... else block)


@implements([aten.detach.default, aten.alias.default])
def _detach(func, args, kwargs):
    t = args[0]
    return _same(t, func(t.codes), t.param)


@implements(aten.clone.default)
def _clone(func, args, kwargs):
    t = args[0]
    return _same(t, t.codes.clone(**kwargs), t.param.clone())


@implements(aten._to_copy.default)
def _to_copy(func, args, kwargs):
    t = args[0]
    dtype = kwargs.pop("dtype", None)
    if dtype is not None and dtype != torch.float32:
        raise TypeError(
            f"{type(t).__name__}.to({dtype}) would silently dequantize; call .dequantize().to({dtype}) instead"
        )
    kwargs.pop("layout", None)
    device = kwargs.get("device")
    return _same(t, t.codes.to(device=device, copy=True, memory_format=kwargs.get("memory_format", torch.preserve_format)),
                 t.param.to(device=device, copy=True))


@implements(aten.t.default)
def _t(func, args, kwargs):
    t = args[0]
    return _permute(t, list(range(t.dim()))[::-1])


@implements(aten.transpose.int)
def _transpose(func, args, kwargs):
    t, d0, d1 = args
    order = list(range(t.dim()))
    d0, d1 = d0 % t.dim(), d1 % t.dim()
    order[d0], order[d1] = order[d1], order[d0]
    return _permute(t, order)


@implements(aten.permute.default)
def _permute_op(func, args, kwargs):
    return _permute(args[0], [d % args[0].dim() for d in args[1]])


def _permute(t: CodedTensor, order):
    block = None if t.block is None else (order.index(t.block[0]), t.block[1])
    return _same(t, t.codes.permute(order), t.param.permute(order), block)


@implements([aten.view.default, aten._unsafe_view.default, aten.reshape.default])
def _view(func, args, kwargs):
    t, shape = args[0], args[1]
    codes = func(t.codes, shape)
    if t.param.numel() == 1:
        return _same(t, codes, t.param.reshape([1] * codes.dim()), None)
    if t.block is not None and t.block[0] == t.dim() - 1 and codes.dim() and codes.shape[-1] == t.shape[-1]:
        # Blocks along an untouched last axis survive any reshape of the leading dims.
        lead = t.param.expand(*t.shape[:-1], t.param.shape[-1])
        param = _compress(lead.reshape(*codes.shape[:-1], t.param.shape[-1]), keep=(codes.dim() - 1,))
        return _same(t, codes, param, (codes.dim() - 1, t.block[1]))
    return _same(t, codes, _compress(_full_param(t).reshape(codes.shape)), None)


@implements(aten.unsqueeze.default)
def _unsqueeze(func, args, kwargs):
    t, d = args
    d = d % (t.dim() + 1)
    block = None if t.block is None else (t.block[0] + (t.block[0] >= d), t.block[1])
    return _same(t, t.codes.unsqueeze(d), t.param.unsqueeze(d), block)


@implements([aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default])
def _squeeze(func, args, kwargs):
    t = args[0]
    dims = range(t.dim()) if len(args) < 2 else ([args[1]] if isinstance(args[1], int) else args[1])
    dims = sorted({d % t.dim() for d in dims if t.shape[d] == 1}) if t.dim() else []
    block = t.block
    if block is not None and block[0] in dims:
        block = None
    elif block is not None:
        block = (block[0] - sum(d < block[0] for d in dims), block[1])
    return _same(t, t.codes.squeeze(dims) if dims else t.codes, t.param.squeeze(dims) if dims else t.param, block)


def _index_dim(t: CodedTensor, d: int, op):
    """Apply an indexing ``op`` along dim ``d`` to the codes and the matching parameters."""
    param, block = t.param, t.block
    if block is not None and block[0] == d:
        param, block = _full_param(t).narrow(d, 0, t.shape[d]).contiguous(), None
        param = _compress(param, keep=(d,)) if param.numel() else param
    if param.shape[d] != 1:
        param = op(param)
    return param, block


@implements(aten.slice.Tensor)
def _slice(func, args, kwargs):
    t = args[0]
    d = (args[1] if len(args) > 1 else 0) % t.dim()
    start = args[2] if len(args) > 2 else None
    end = args[3] if len(args) > 3 else None
    step = args[4] if len(args) > 4 else 1
    codes = func(t.codes, d, start, end, step)
    n = t.shape[d]
    s = 0 if start is None else (max(0, start + n) if start < 0 else min(start, n))
    if t.block is not None and t.block[0] == d and step == 1 and s % t.block[1] == 0:
        # Block-aligned slice: keep whole blocks (the last one may now be shorter).
        bs = t.block[1]
        param = t.param.narrow(d, s // bs, -(-codes.shape[d] // bs)) if codes.shape[d] else t.param.narrow(d, 0, 0)
        return _same(t, codes, param, t.block)
    param, block = _index_dim(t, d, lambda p: func(p, d, start, end, step))
    return _same(t, codes, param, block)


@implements(aten.select.int)
def _select(func, args, kwargs):
    t, d, index = args
    d = d % t.dim()
    codes = func(t.codes, d, index)
    if t.block is not None and t.block[0] == d:
        param = t.param.select(d, (index % t.shape[d]) // t.block[1])
        return _same(t, codes, param, None)
    param = t.param.select(d, index) if t.param.shape[d] != 1 else t.param.squeeze(d)
    block = None if t.block is None else (t.block[0] - (t.block[0] > d), t.block[1])
    return _same(t, codes, param, block)


@implements(aten.index.Tensor)
def _index(func, args, kwargs):
    t, indices = args
    codes = func(t.codes, indices)
    param = func(_full_param(t), indices)
    return _same(t, codes, _compress(param) if param.numel() else param.contiguous(), None)


@implements([aten.expand.default])
def _expand(func, args, kwargs):
    t, size = args[0], args[1]
    codes = t.codes.expand(size)
    lead = codes.dim() - t.dim()
    param = t.param.reshape([1] * lead + list(t.param.shape))
    block = None if t.block is None else (t.block[0] + lead, t.block[1])
    return _same(t, codes, param, block)


@implements([aten.is_same_size.default])
def _is_same_size(func, args, kwargs):
    return args[0].shape == args[1].shape


# ----------------------------------------------------------------------------------------
# torch-function overrides: the layers
# ----------------------------------------------------------------------------------------
@implements_torch_function(F.linear)
def _linear(func, args, kwargs):
    from .mac import lns_linear

    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return lns_linear(x, w, bias)


@implements_torch_function([F.conv1d, F.conv2d])
def _conv(func, args, kwargs):
    from .mac import lns_conv1d, lns_conv2d

    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    op = lns_conv2d if func is F.conv2d else lns_conv1d
    return op(bound["input"], bound["weight"], bound.get("bias"), bound.get("stride", 1), bound.get("padding", 0),
              bound.get("dilation", 1), bound.get("groups", 1))


@implements_torch_function([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])
def _matmul(func, args, kwargs):
    from .mac import lns_linear

    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
    if b.dim() != 2:
        raise NotImplementedError(
            f"torch.matmul with a coded operand needs a 2-D right operand (K, N); got shape {tuple(b.shape)}"
        )
    if a.dim() == 1:
        return lns_linear(a.unsqueeze(0), b.t()).squeeze(0)
    return lns_linear(a, b.t())


# ----------------------------------------------------------------------------------------
# serialization
# ----------------------------------------------------------------------------------------
def _format_to_tuple(fmt: Format) -> tuple:
    if isinstance(fmt, LNSFormat):
        return ("lns", fmt.bits, fmt.frac_bits, fmt.rounding)
    if isinstance(fmt, FP8Format):
        return ("fp8", fmt.variant)
    return ("int", fmt.bits)


def _format_from_tuple(t: tuple) -> Format:
    kind, *fields = t
    return {"lns": LNSFormat, "fp8": FP8Format, "int": IntFormat}[kind](*fields)


def _rebuild_coded_tensor(fmt_tuple, codes, param, block):
    fmt = _format_from_tuple(tuple(fmt_tuple))
    return CodedTensor._make(codes, param, fmt, tuple(block) if block is not None else None)


torch.serialization.add_safe_globals([_rebuild_coded_tensor])
