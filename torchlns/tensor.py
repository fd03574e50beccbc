"""The coded operand (``Coded``) and its tensor face, ``CodedTensor`` (``LNSTensor`` and siblings).

# Note: coded operands
A coded operand is four things: ``codes`` (the bit patterns), a compact ``param`` (offset for
LNS, scale for FP8/INT; see Note: parameter layout in core/layout.py), the format, and an
optional ``block = (axis, block_size)``. ``Coded`` is that record and the one operand type
below the public API: the layers build and hold it, the functional ops take it, and they
lower it to op arguments in one place. ``CodedTensor`` is the same four fields as a
``torch.Tensor`` subclass (in the style of torchao's quantized tensors): its logical dtype
is float32, layout ops move the parameters with the data, ``state_dict``/``torch.save``
store it, and ``t.coded`` is its operand. Why two classes: torch.compile cannot read a
non-literal attribute (the format) of a tensor subclass constructed inside a compiled
region, while a NamedTuple built there is traced field by field. So operands made inside a
compiled ``forward`` (an encoded input, a re-encoded QAT weight, a clustered weight) are
``Coded``; tensors that users hold and modules store are ``CodedTensor``.

``F.linear``, ``F.conv1d``, ``F.conv2d`` and ``torch.matmul`` on a ``CodedTensor`` run the
ideal MAC (registered by functional.py; ``torchlns.lns_linear`` takes any other). Every
other op raises an error naming it, so that nothing silently computes on codes.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch

from .codec import calibrate, check_format, decode, encode
from .core.formats import Format
from .core.formats import FP8Format as _FP8Format, IntFormat as _IntFormat, LNSFormat as _LNSFormat
from .core.layout import check_block_size, check_granularity, compact_shape, compress, expand_param, norm_axis

__all__ = ["Coded", "CodedTensor", "LNSTensor", "FP8Tensor", "IntTensor", "as_coded", "implements",
           "implements_torch_function"]

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


class Coded(NamedTuple):
    """A coded operand (see Note: coded operands)."""

    codes: torch.Tensor
    param: torch.Tensor
    fmt: Format
    block: Optional[Tuple[int, int]] = None

    @staticmethod
    def encode(x: torch.Tensor, fmt: Format, granularity: str = "tensor", axis: Optional[int] = None,
               block_size: Optional[int] = None, param=None) -> "Coded":
        """Encode ``x``; ``param`` (compact layout) defaults to calibration from max|x| per group.

        ``granularity``: ``"tensor"``; ``"channel"`` (one per index of ``axis``, default 0);
        ``"block"`` (one per ``block_size`` run along ``axis``, default -1).
        """
        check_format(fmt)
        check_granularity(granularity)
        block = None
        if granularity == "block":
            axis = norm_axis(-1 if axis is None else axis, x.dim())
            block = (axis, check_block_size(block_size))
        elif block_size is not None:
            raise ValueError(f"block_size is only used with granularity='block', not {granularity!r}")
        if param is None:
            param = calibrate(x, fmt, granularity, axis, block_size)
        else:
            param = _compact_param(param, fmt, x, granularity, axis, block_size)
        full = expand_param(param, *(block or (None, None)), x.shape[block[0]] if block else 0)
        return Coded(encode(x, fmt, full), param, fmt, block)

    def validate(self, what: str = "coded tensor") -> "Coded":
        """Check every coded field, as a loaded file needs (a crafted one must not compute garbage).

        The format, the codes' type, dtype and range, the block axis and size, and the
        parameter's type, layout (compact for blocks, else broadcasting against the codes) and
        range. Raises ``ValueError`` naming ``what``; returns ``self``.
        """
        try:
            if not isinstance(self.fmt, Format):
                raise TypeError(f"format must be a Format, got {type(self.fmt).__name__}")
            check_format(self.fmt)
            codes = self.fmt.check_codes(self.codes)
            if not isinstance(self.param, torch.Tensor):
                raise TypeError(f"the {self.fmt.param_name} must be a tensor, got {type(self.param).__name__}")
            full = self.param
            if self.block is not None:
                if not (isinstance(self.block, tuple) and len(self.block) == 2):
                    raise ValueError(f"block must be (axis, size), got {self.block!r}")
                axis, size = self.block
                if isinstance(axis, bool) or not isinstance(axis, int):
                    raise ValueError(f"block axis must be an int, got {axis!r}")
                axis = norm_axis(axis, codes.dim())
                check_block_size(size)
                want = list(compact_shape(codes.shape, "block", axis, size))
                if self.param.dim() != codes.dim() or self.param.shape[axis] != want[axis]:
                    raise ValueError(f"per-block {self.fmt.param_name} of shape {tuple(self.param.shape)} does not fit "
                                     f"codes of shape {tuple(codes.shape)} in blocks of {size} along axis {axis}")
                full = expand_param(self.param, axis, size, codes.shape[axis])
            self.fmt.check_param(full, codes.shape, codes.device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what}: {e}") from None
        return self

    def expanded_param(self) -> torch.Tensor:
        """The parameter broadcastable against the codes (blocks repeated)."""
        if self.block is None:
            return self.param
        axis, size = self.block
        return expand_param(self.param, axis, size, self.codes.shape[axis])

    def dequantize(self) -> torch.Tensor:
        """The float32 values of the codes (exact)."""
        return decode(self.codes, self.fmt, self.expanded_param())

    def tensor(self) -> "CodedTensor":
        """This operand as a tensor of the format's class (``LNSTensor`` for LNS, ...)."""
        return CodedTensor.class_for(self.fmt)(self.codes, self.param, self.fmt, self.block)


def as_coded(t) -> Optional[Coded]:
    """The operand of a ``Coded`` or ``CodedTensor``; None for anything else (a float tensor)."""
    if isinstance(t, Coded):
        return t
    if isinstance(t, CodedTensor):
        return t.coded
    return None


class CodedTensor(torch.Tensor):
    """A coded operand as a ``torch.Tensor`` (see Note: coded operands); the base of ``LNSTensor`` etc.

    A subclass declares the formats it holds with ``class LNSTensor(CodedTensor, format=LNSFormat)``;
    a format without its own class is held by ``CodedTensor`` itself.
    """

    codes: torch.Tensor
    param: torch.Tensor
    fmt: Format
    block: Optional[tuple]

    _CLASS_FOR: Dict[type, type] = {}

    def __init_subclass__(cls, format: Optional[type] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if format is not None:
            CodedTensor._CLASS_FOR[format] = cls

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

    @staticmethod
    def class_for(fmt: Format) -> type:
        """The tensor class that holds ``fmt``'s codes."""
        check_format(fmt)
        return next((CodedTensor._CLASS_FOR[k] for k in type(fmt).__mro__ if k in CodedTensor._CLASS_FOR), CodedTensor)

    @property
    def coded(self) -> Coded:
        """The operand this tensor holds."""
        return Coded(self.codes, self.param, self.fmt, self.block)

    @classmethod
    def from_float(cls, x: torch.Tensor, fmt: Format, offset=None, *, granularity: str = "tensor",
                   axis: Optional[int] = None, block_size: Optional[int] = None) -> "CodedTensor":
        """Encode ``x``. ``offset`` (LNS) or scale (FP8/INT) defaults to calibration from max|x|.

        ``granularity``: ``"tensor"``; ``"channel"`` (one per index of ``axis``, default 0);
        ``"block"`` (one per ``block_size`` run along ``axis``, default -1). A given
        ``offset`` must be an int or a tensor in that compact layout.
        """
        target = CodedTensor.class_for(fmt)
        if cls is not CodedTensor and cls is not target:
            raise TypeError(f"{cls.__name__}.from_float cannot hold {fmt}; use {target.__name__}.from_float")
        if isinstance(x, CodedTensor):
            raise TypeError("x is already encoded; call .dequantize() first to re-encode it")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        return Coded.encode(x.detach(), fmt, granularity, axis, block_size, offset).tensor()

    def dequantize(self) -> torch.Tensor:
        """The float32 values of the codes (exact)."""
        return self.coded.dequantize()

    # -- tensor-subclass protocol ----------------------------------------------------------
    def __tensor_flatten__(self):
        return ["codes", "param"], (self.fmt, self.block)

    @classmethod
    def __tensor_unflatten__(cls, inner, meta, outer_size, outer_stride):
        return cls(inner["codes"], inner["param"], *meta)

    def __reduce_ex__(self, protocol):
        # Plain tuples of builtins only, so that torch.load(weights_only=True) accepts it
        # once _rebuild_coded_tensor is a safe global (registered below).
        return _rebuild_coded_tensor, (self.fmt.to_tuple(), self.codes, self.param, self.block)

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
        name = self.fmt.param_name
        if p.numel() == 1:
            desc = f"{name}={p.reshape(()).item():g}"
        else:
            kind = f"per-block(axis={self.block[0]}, size={self.block[1]})" if self.block else "per-channel" if sum(
                s > 1 for s in p.shape) == 1 else "per-element"
            desc = f"{name}={kind} {tuple(p.shape)} in [{p.min().item():g}, {p.max().item():g}]"
        dev = "" if self.device.type == "cpu" else f", device={self.device}"
        return f"{type(self).__name__}({self.fmt}, shape={tuple(self.shape)}, {desc}{dev})"


class LNSTensor(CodedTensor, format=_LNSFormat):
    """Log-domain codes; ``.offset`` is the integer offset (per tensor, channel or block)."""

    @property
    def offset(self) -> torch.Tensor:
        return self.param


class FP8Tensor(CodedTensor, format=_FP8Format):
    """FP8 codes (torch's bit patterns); ``.scale`` is the float32 scale."""

    @property
    def scale(self) -> torch.Tensor:
        return self.param


class IntTensor(CodedTensor, format=_IntFormat):
    """Symmetric integer codes; ``.scale`` is the float32 scale."""

    @property
    def scale(self) -> torch.Tensor:
        return self.param


# ----------------------------------------------------------------------------------------
# parameters
# ----------------------------------------------------------------------------------------
def _compact_param(value, fmt: Format, x: torch.Tensor, granularity, axis, block_size) -> torch.Tensor:
    shape = compact_shape(x.shape, granularity, axis, block_size)
    if isinstance(value, torch.Tensor):
        if value.numel() != int(torch.Size(shape).numel()):
            raise ValueError(
                f"{fmt.param_name} has {value.numel()} entries; "
                f"granularity={granularity!r} on shape {tuple(x.shape)} needs {tuple(shape)}"
            )
        value = value.reshape(shape)
    p = fmt.check_param(value, torch.Size(shape), x.device)
    return p.expand(shape).contiguous() if p.dim() == len(shape) or p.dim() == 0 else p.reshape(shape)


def _full_param(t: CodedTensor) -> torch.Tensor:
    """One parameter per element (used when a layout op cuts across the compact layout)."""
    return t.coded.expanded_param().expand(t.codes.shape)


# ----------------------------------------------------------------------------------------
# aten implementations: layout ops
# ----------------------------------------------------------------------------------------
def _same(t: CodedTensor, codes, param, block=...):
    return type(t)(codes, param, t.fmt, t.block if block is ... else block)


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
        param = compress(lead.reshape(*codes.shape[:-1], t.param.shape[-1]), keep=(codes.dim() - 1,))
        return _same(t, codes, param, (codes.dim() - 1, t.block[1]))
    return _same(t, codes, compress(_full_param(t).reshape(codes.shape)), None)


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
        param = compress(param, keep=(d,)) if param.numel() else param
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
    return _same(t, codes, compress(param) if param.numel() else param.contiguous(), None)


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
# serialization
# ----------------------------------------------------------------------------------------
def _rebuild_coded_tensor(fmt_tuple, codes, param, block):
    return Coded(codes, param, Format.from_tuple(tuple(fmt_tuple)), tuple(block) if block is not None else None).tensor()


torch.serialization.add_safe_globals([_rebuild_coded_tensor])
