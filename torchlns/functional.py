"""The chip's layers as functions: ``lns_linear``, ``lns_conv1d``, ``lns_conv2d`` (chip-model.md 2-5).

Every call goes the same way:

1. **operands**: each of ``x`` and ``w`` is a coded operand (a ``CodedTensor`` or a
   ``Coded``; see Note: coded operands in tensor.py) or a float tensor, which is encoded
   here in the format of the other operand (or ``fmt=``): per tensor, with a given static
   parameter, or per block along the reduction axis (dynamic activations, MX style);
2. **validation**: formats that can multiply (``Format.check_partner``), MAC arguments
   (``Format.check_mac``), shapes, geometry, bias and the accumulator's reduction length;
3. **lowering**: one ``torchlns::`` op call per layer (``lns_mm``/``lns_conv`` for the log
   MAC, ``scaled_mm`` for FP8/INT), with parameters expanded against their codes;
4. **straight-through estimator**: when a float operand or the bias requires grad, the
   chip's output is wrapped in ``ste_linear``/``ste_conv`` (see Note: straight-through
   estimator in ops/autograd.py), here and nowhere else.

The converted layers (``torchlns.nn``) call ``linear``/``conv`` below, which add two
layer-only arguments to the public functions: ``x_param`` (a static per-tensor parameter for
a float input) and ``w_master`` (the float master weight that receives the weight's
straight-through gradient in QAT).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .core.checks import as_float32
from .core.layout import amax, check_block_size
from .core.formats import IDEAL_MAC, LNS8, Format, MACConfig
from .core.geometry import (cols_to_image, conv_output_shape, conv_output_size, conv_padding, im2col, im2col_index,
                            ntuple, stack_depth)
from .ops import library as _library  # noqa: F401  (declares the ops called here)
from .tensor import Coded, CodedTensor, as_coded, implements_torch_function

__all__ = ["lns_linear", "lns_conv1d", "lns_conv2d", "lns_conv3d", "lns_conv_transpose1d", "lns_conv_transpose2d",
           "lns_conv_transpose3d", "linear", "conv", "conv_transpose", "fake_linear", "fake_conv",
           "fake_conv_transpose", "needs_grad", "transpose_weight_as_conv", "conv_weight_as_transpose"]

_OPS = torch.ops.torchlns

# Note: MAC observers
# ``torchlns.telemetry`` (deploy/telemetry.py) watches the datapath from above this layer: while
# an observer is set, every LNS activation encoding (``encoded(x, coded)``) and every LNS MAC
# (``mm(x, w, mac, acc_lsb)`` with coded operands, ``conv(*args)`` with ``lns_conv``'s
# arguments) is shown to it just before it runs, with exactly the operands the op receives,
# so that it counts from codes what the op does with them. Observers only read; with none
# set (the default) nothing changes, and a compiled forward never sees one.
_observer = None


def set_observer(observer):
    """Install ``observer`` (None: remove it); returns the one it replaces."""
    global _observer
    held, _observer = _observer, observer
    return held


# ----------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------
def lns_linear(x, w, bias: Optional[torch.Tensor] = None, mac: MACConfig = IDEAL_MAC, *,
               acc_lsb: Optional[int] = None, x_block_size: Optional[int] = None,
               fmt: Optional[Format] = None) -> torch.Tensor:
    """``y[..., n] = MAC_k(x[..., k], w[n, k]) + bias[n]`` as the chip computes it.

    ``x`` and ``w`` are coded tensors (LNS, FP8 or INT; both of one kind) or float tensors,
    which are encoded per tensor in ``fmt`` (default: the other operand's format, else LNS8).
    Float operands that require grad get straight-through gradients (QAT).
    ``x_block_size`` encodes a float ``x`` with dynamic per-block offsets/scales along K, as
    MX formats do. ``acc_lsb`` is required by, and only by, the LNS fixed accumulator.
    """
    return linear(x, w, bias, mac, acc_lsb=acc_lsb, x_block_size=x_block_size, fmt=fmt)


def lns_conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, mac: MACConfig = IDEAL_MAC, *,
               acc_lsb: Optional[int] = None, x_block_size: Optional[int] = None,
               fmt: Optional[Format] = None) -> torch.Tensor:
    """2-D convolution as the chip computes it: the MAC over each receptive field.

    Arguments follow ``F.conv2d`` (padding may be an int, a pair, 'valid' or 'same');
    padding is the zero code. See ``lns_linear`` for operands, ``acc_lsb`` and ``x_block_size``
    (blocks run along each group's ``Cin/groups * kh * kw`` reduction axis).
    """
    return conv(x, w, bias, stride, padding, dilation, groups, mac, n=2, acc_lsb=acc_lsb, x_block_size=x_block_size,
                fmt=fmt)


def lns_conv1d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, mac: MACConfig = IDEAL_MAC, *,
               acc_lsb: Optional[int] = None, x_block_size: Optional[int] = None,
               fmt: Optional[Format] = None) -> torch.Tensor:
    """1-D convolution as the chip computes it; see ``lns_conv2d``."""
    return conv(x, w, bias, stride, padding, dilation, groups, mac, n=1, acc_lsb=acc_lsb, x_block_size=x_block_size,
                fmt=fmt)


def lns_conv3d(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, mac: MACConfig = IDEAL_MAC, *,
               acc_lsb: Optional[int] = None, x_block_size: Optional[int] = None,
               fmt: Optional[Format] = None) -> torch.Tensor:
    """3-D convolution as the chip computes it; see ``lns_conv2d`` (see Note: 3-D and transposed convolutions)."""
    return conv(x, w, bias, stride, padding, dilation, groups, mac, n=3, acc_lsb=acc_lsb, x_block_size=x_block_size,
                fmt=fmt)


def _transpose_doc(n):
    def wrap(fn):
        fn.__doc__ = (f"{n}-D transposed convolution as the chip computes it (chip-model.md section 4).\n\n"
                      f"    Arguments follow ``F.conv_transpose{n}d``: ``w`` is ``(in, out/groups, *kernel)``. Every\n"
                      "    output sums exactly the products PyTorch's transposed convolution sums there; outputs no\n"
                      "    input reaches are the bias alone (see Note: 3-D and transposed convolutions).\n"
                      "    See ``lns_linear`` for operands, ``acc_lsb`` and ``x_block_size``.")
        return fn
    return wrap


@_transpose_doc(1)
def lns_conv_transpose1d(x, w, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                         mac: MACConfig = IDEAL_MAC, *, acc_lsb: Optional[int] = None,
                         x_block_size: Optional[int] = None, fmt: Optional[Format] = None) -> torch.Tensor:
    return conv_transpose(x, w, bias, stride, padding, output_padding, groups, dilation, mac, n=1, acc_lsb=acc_lsb,
                          x_block_size=x_block_size, fmt=fmt)


@_transpose_doc(2)
def lns_conv_transpose2d(x, w, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                         mac: MACConfig = IDEAL_MAC, *, acc_lsb: Optional[int] = None,
                         x_block_size: Optional[int] = None, fmt: Optional[Format] = None) -> torch.Tensor:
    return conv_transpose(x, w, bias, stride, padding, output_padding, groups, dilation, mac, n=2, acc_lsb=acc_lsb,
                          x_block_size=x_block_size, fmt=fmt)


@_transpose_doc(3)
def lns_conv_transpose3d(x, w, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                         mac: MACConfig = IDEAL_MAC, *, acc_lsb: Optional[int] = None,
                         x_block_size: Optional[int] = None, fmt: Optional[Format] = None) -> torch.Tensor:
    return conv_transpose(x, w, bias, stride, padding, output_padding, groups, dilation, mac, n=3, acc_lsb=acc_lsb,
                          x_block_size=x_block_size, fmt=fmt)


# ----------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------
def linear(x, w, bias: Optional[torch.Tensor] = None, mac: MACConfig = IDEAL_MAC, *, acc_lsb: Optional[int] = None,
           x_block_size: Optional[int] = None, fmt: Optional[Format] = None, x_param: Optional[torch.Tensor] = None,
           w_master: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``lns_linear`` with the layers' ``x_param`` and ``w_master`` (see the module docstring)."""
    xq, wq, fmt = _operands(x, w, fmt, x_block_size, x_param)
    xq = xq or _encode(x, fmt, "x", block_size=x_block_size, param=x_param)
    wq = wq or _encode(w, fmt, "w")
    xq.fmt.check_partner(wq.fmt)
    xq.fmt.check_mac(mac, acc_lsb)
    if wq.codes.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(wq.codes.shape)}")
    if xq.codes.dim() < 1:
        raise ValueError("x must have at least one dim (..., in_features)")
    if wq.block is not None and wq.block[0] == 0:
        raise ValueError("per-block weight parameters must run along the reduction axis (dim 1)")
    lead = xq.codes.shape[:-1]
    y = _matmul(_rows(xq, lead), wq, _check_bias(bias, wq.codes.shape[0], xq.codes.device), mac, acc_lsb)
    y = y.reshape(*lead, wq.codes.shape[0])
    w_grad = w_master if w_master is not None else _float_operand(w)
    if needs_grad(x, w_grad, bias):
        x_deq, w_deq = _ste_operands(xq, wq, x, w_grad)
        y = _OPS.ste_linear(y, x_deq, w_deq, _float_operand(x, x_deq), w_deq if w_grad is None else w_grad, bias)
    return y


def _ste_operands(xq: Optional[Coded], wq: Coded, x, w_grad) -> Tuple[torch.Tensor, torch.Tensor]:
    """The dequantized operands the straight-through backward reads, decoded only where it reads them.

    The input's gradient reads only ``w_deq`` and the weight's only ``x_deq`` (see Note:
    straight-through estimator), so an operand no gradient will read is a zero-stride stand-in
    of its shape: a model run for inference with grad mode on (its biases are parameters)
    would otherwise decode every activation once more per layer. Dynamic per-block
    activations have no single dequantized value, so the weight's gradient reads the float
    input for them.
    """
    need_x = needs_grad(_float_operand(x))
    need_w = needs_grad(w_grad)

    def stand_in(shape, device):
        return torch.zeros((), dtype=torch.float32, device=device).expand(shape)

    if xq is None:
        x_deq = as_float32(x).detach()
    else:
        x_deq = xq.dequantize() if need_w else stand_in(xq.codes.shape, xq.codes.device)
    w_deq = wq.dequantize() if need_x else stand_in(wq.codes.shape, wq.codes.device)
    return x_deq, w_deq


def _rows(xq: Coded, lead: torch.Size) -> Coded:
    """An (..., K) operand as (rows, K) codes with (1 or rows, 1 or K or blocks) parameters."""
    param = xq.param.reshape(1, 1) if xq.param.dim() == 0 else xq.param  # a 0-d per-tensor parameter
    if xq.block is not None and xq.block[0] != len(lead):
        raise ValueError("per-block parameters of a linear operand must run along its last (reduction) axis")
    if all(s == 1 for s in param.shape[:-1]):
        param = param.reshape(1, param.shape[-1])
    else:
        param = param.expand(*lead, param.shape[-1]).reshape(lead.numel(), param.shape[-1])
    block = None if xq.block is None else (1, xq.block[1])
    return Coded(xq.codes.reshape(lead.numel(), xq.codes.shape[-1]), param, xq.fmt, block)


# ----------------------------------------------------------------------------------------
# convolution
# ----------------------------------------------------------------------------------------
def conv(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, mac: MACConfig = IDEAL_MAC, *, n: int,
         acc_lsb: Optional[int] = None, x_block_size: Optional[int] = None, fmt: Optional[Format] = None,
         x_param: Optional[torch.Tensor] = None, w_master: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``lns_conv{n}d`` with the layers' ``x_param`` and ``w_master`` (see the module docstring)."""
    if n == 3:
        return _conv3d(x, w, bias, stride, padding, dilation, groups, mac, acc_lsb=acc_lsb, x_block_size=x_block_size,
                       fmt=fmt, x_param=x_param, w_master=w_master)
    name = f"lns_conv{n}d"
    xq, wq, fmt = _operands(x, w, fmt, x_block_size, x_param)
    wq = wq or _encode(w, fmt, "w")
    if wq.codes.dim() != n + 2:
        raise ValueError(f"{name} weight must be {n + 2}-D (out, in/groups, *kernel), got shape {tuple(wq.codes.shape)}")
    if xq is None and x_block_size is None:
        xq = _encode(x, fmt, "x", param=x_param)  # per tensor, before im2col
    xt = xq.codes if xq is not None else as_float32(x)
    if xt.dim() not in (n + 1, n + 2):
        raise ValueError(f"{name} input must be {n + 1}-D or {n + 2}-D, got {tuple(xt.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    unbatched = xt.dim() == n + 1
    stride, dilation = ntuple(stride, n, "stride", minimum=1), ntuple(dilation, n, "dilation", minimum=1)
    pads = conv_padding(padding, tuple(wq.codes.shape[2:]), dilation, stride, n)
    geometry = _Geometry(stride, pads, dilation, groups)
    if n == 1:  # conv1d is conv2d with a height-1 kernel
        geometry = _Geometry((1, *stride), [(0, 0), *pads], (1, *dilation), groups)

    def as4d(t):
        t = t.unsqueeze(0) if unbatched else t
        return t.unsqueeze(2) if n == 1 else t

    xt4, w4 = as4d(xt), wq.codes.unsqueeze(2) if n == 1 else wq.codes
    C, Cout, Cin_g = xt4.shape[1], w4.shape[0], w4.shape[1]
    if C != Cin_g * groups or Cout % groups:
        raise ValueError(f"{name}: input has {C} channels, weight expects {Cin_g}x{groups} groups and {Cout} outputs")
    conv_output_shape(xt4.shape[2], xt4.shape[3], w4.shape[2:], geometry.stride, geometry.pads, geometry.dilation)
    b = _check_bias(bias, Cout, xt.device)
    if mac.two_stage and (xq.fmt if xq is not None else fmt).mac_kind == "log":  # see Note: two-stage MACs
        y = _conv_by_columns(xq, wq, fmt, xt4, w4, b, mac, acc_lsb, x_block_size, geometry)
    elif xq is not None and xq.fmt.mac_kind == "log":
        y = _lns_conv(xq, wq, as4d, b, mac, acc_lsb, geometry, w4[0].numel(), n)
    elif xq is None and x_block_size is not None and _blocks_in_op(fmt, wq):
        y = _lns_conv_blocks(as4d(as_float32(x)), wq, fmt, b, mac, acc_lsb, geometry, w4[0].numel(), n, x_block_size)
    elif xq is not None and xq.param.numel() == 1 and wq.block is None and wq.param.shape[1:].numel() == 1:
        y = _scaled_conv(xq, wq, as4d, b, mac, acc_lsb, geometry, w4[0].numel(), n)
    else:
        y = _conv_by_columns(xq, wq, fmt, xt4, w4, b, mac, acc_lsb, x_block_size, geometry)
    if n == 1:
        y = y.squeeze(2)
    y = _ste_conv(y, x, xq, wq, w, w_master, bias, stride, pads, dilation, groups, unbatched)
    return y.squeeze(0) if unbatched else y


def _ste_conv(y, x, xq: Optional[Coded], wq: Coded, w, w_master, bias, stride, pads, dilation, groups,
              unbatched: bool) -> torch.Tensor:
    """The chip's (batched) output, with straight-through gradients when an operand needs them."""
    w_grad = w_master if w_master is not None else _float_operand(w)
    if not needs_grad(x, w_grad, bias):
        return y
    x_deq, w_deq = _ste_operands(xq, wq, x, w_grad)
    batch = (lambda t: t.unsqueeze(0)) if unbatched else (lambda t: t)  # noqa: E731
    return _OPS.ste_conv(y, batch(x_deq), w_deq, batch(_float_operand(x, x_deq)), w_deq if w_grad is None else w_grad,
                         bias, list(stride), [p[0] for p in pads], [p[1] for p in pads], list(dilation), groups)


# Note: 3-D and transposed convolutions
# The chip's Conv3d is the MAC over each (c, kd, kh, kw) receptive field. LNS codes go to
# ``torchlns::lns_conv`` as they are, 5-D: the CUDA kernel is a 3-D implicit GEMM, and the
# CPU kernel and the reference stack the kd depth taps of every output depth as channels,
# (c, dz) in PyTorch's c-major order (``core.geometry.stack_depth``), so that an output
# depth is a 2-D convolution over Cin·kd channels with the weight viewed as
# (Cout, Cin/groups·kd, kh, kw), and the output depths become the batch. FP8/INT and dynamic
# per-block activations stack here, before their 2-D MAC. Each output sees the same
# products, so the fixed accumulator's exact sum is bit-equal, the float32 one is within the
# spec's bound, and per-block parameters (runs of Cin/groups·kd·kh·kw) keep their order.
# The stacking moves codes (one byte each).
#
# A transposed convolution is, by the spec's definition, the convolution of the
# zero-stuffed input (stride−1 zero codes between elements) with the flipped kernel: pad
# d·(k−1)−p before and d·(k−1)−p+output_padding after (cropping where that is negative),
# stride 1, the same dilation and groups. Zero codes contribute no product, so every
# output sums exactly the input elements PyTorch sums there, and an output no input reaches
# is the bias alone. The converted layers store the flipped, regrouped kernel
# (Cout, Cin/groups, *k) as the weight, so the per-channel parameters are per output channel;
# ``conv_weight_as_transpose`` gives PyTorch's layout back. Dynamic per-block activations
# run along that convolution's reduction axis, stuffed zeros included.
def _conv3d(x, w, bias, stride, padding, dilation, groups, mac, *, acc_lsb, x_block_size, fmt, x_param, w_master):
    xq, wq, fmt = _operands(x, w, fmt, x_block_size, x_param)
    wq = wq or _encode(w, fmt, "w")
    if wq.codes.dim() != 5:
        raise ValueError(f"lns_conv3d weight must be 5-D (out, in/groups, kd, kh, kw), got shape "
                         f"{tuple(wq.codes.shape)}")
    if xq is None and x_block_size is None:
        xq = _encode(x, fmt, "x", param=x_param)
    xt = xq.codes if xq is not None else as_float32(x).detach()
    if xt.dim() not in (4, 5):
        raise ValueError(f"lns_conv3d input must be 4-D or 5-D, got {tuple(xt.shape)}")
    unbatched = xt.dim() == 4
    stride, dilation = ntuple(stride, 3, "stride", minimum=1), ntuple(dilation, 3, "dilation", minimum=1)
    pads = conv_padding(padding, tuple(wq.codes.shape[2:]), dilation, stride, 3)
    kd = wq.codes.shape[2]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    C, Cout = xt.shape[-4], wq.codes.shape[0]
    if C != wq.codes.shape[1] * groups or Cout % groups:
        raise ValueError(f"lns_conv3d: input has {C} channels, weight expects {wq.codes.shape[1]}x{groups} groups and "
                         f"{Cout} outputs")

    batch = (lambda t: t.unsqueeze(0)) if unbatched else (lambda t: t)  # noqa: E731
    sizes = [conv_output_size(batch(xt).shape[2 + d], wq.codes.shape[2 + d], stride[d], *pads[d], dilation[d])
             for d in range(3)]
    if min(sizes) < 1:
        raise ValueError(f"lns_conv3d: input {tuple(xt.shape[-3:])} is smaller than the dilated kernel after padding")
    if xq is not None and xq.fmt.mac_kind == "log" and not mac.two_stage:  # one lns_conv call on the 5-D codes
        y = _lns_conv(xq, wq, batch, _check_bias(bias, Cout, xt.device), mac, acc_lsb,
                      _Geometry(stride, pads, dilation, groups), wq.codes[0].numel(), 3)
        y = _ste_conv(y, x, xq, wq, w, w_master, bias, stride, pads, dilation, groups, unbatched)
        return y.squeeze(0) if unbatched else y

    def stack(t, fill):
        return stack_depth(batch(t), kd, pads[0], stride[0], dilation[0], fill)

    if xq is not None:
        codes, Do = stack(xq.codes, 0)
        param = xq.expanded_param()
        if param.numel() == 1:
            param = param.reshape(1, 1, 1, 1)
        else:  # any other layout: one parameter per element, stacked like the codes (padding ignores it)
            param, _ = stack(param.expand(xq.codes.shape), param.flatten()[0].item())
        x2 = Coded(codes, param, xq.fmt)
    else:
        x2, Do = stack(xt, 0.0)
    w2 = _depth_weight(wq, kd)
    y = conv(x2, w2, bias, stride[1:], pads[1:], dilation[1:], groups, mac, n=2, acc_lsb=acc_lsb,
             x_block_size=x_block_size, fmt=fmt)
    N = y.shape[0] // Do
    y = y.reshape(N, Do, *y.shape[1:]).transpose(1, 2).contiguous()
    y = _ste_conv(y, x, xq, wq, w, w_master, bias, stride, pads, dilation, groups, unbatched)
    return y.squeeze(0) if unbatched else y


def _depth_weight(wq: Coded, kd: int) -> Coded:
    """A (Cout, Cin_g, kd, kh, kw) weight as (Cout, Cin_g*kd, kh, kw), parameters to match."""
    Cout, Cin_g = wq.codes.shape[:2]
    codes = wq.codes.reshape(Cout, Cin_g * kd, *wq.codes.shape[3:])
    if wq.block is not None and wq.block[0] in (1, -4):  # blocks of input channels: runs of size*kd
        p = wq.param
        return Coded(codes, p.reshape(p.shape[0], p.shape[1], *p.shape[3:]), wq.fmt, (1, wq.block[1] * kd))
    p = wq.expanded_param()
    p = p.reshape(*([1] * (5 - p.dim())), *p.shape)
    if p.shape[1] == 1 and p.shape[2] == 1:
        return Coded(codes, p.reshape(p.shape[0], 1, *p.shape[3:]), wq.fmt)
    p = p.expand(p.shape[0], Cin_g, kd, *p.shape[3:])
    return Coded(codes, p.reshape(p.shape[0], Cin_g * kd, *p.shape[3:]), wq.fmt)


def transpose_weight_as_conv(w, groups: int):
    """A ConvTranspose weight (in, out/groups, *k) as the equivalent conv's (out, in/groups, *k), flipped.

    Takes a float tensor (differentiably) or a ``Coded`` (codes and parameters alike).
    """
    if isinstance(w, Coded):
        param = w.param if w.param.numel() == 1 else w.expanded_param().expand(w.codes.shape)
        return Coded(transpose_weight_as_conv(w.codes, groups), param if param.numel() == 1
                     else transpose_weight_as_conv(param, groups), w.fmt)
    Cin, Cout_g, *k = w.shape
    if Cin % groups:
        raise ValueError(f"transposed conv weight has {Cin} input channels, not divisible by groups={groups}")
    t = w.reshape(groups, Cin // groups, Cout_g, *k).transpose(1, 2).reshape(groups * Cout_g, Cin // groups, *k)
    return t.flip(list(range(2, 2 + len(k))))


def conv_weight_as_transpose(w: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of ``transpose_weight_as_conv``: PyTorch's ConvTranspose layout."""
    Cout, Cin_g, *k = w.shape
    t = w.flip(list(range(2, 2 + len(k))))
    return t.reshape(groups, Cout // groups, Cin_g, *k).transpose(1, 2).reshape(groups * Cin_g, Cout // groups, *k)


def _transpose_geometry(stride, padding, output_padding, dilation, kernel, n: int):
    """Per dim: (stride, crop before, crop after, pad before, pad after) of the stuffed convolution."""
    stride, dilation = ntuple(stride, n, "stride"), ntuple(dilation, n, "dilation")
    padding, output_padding = ntuple(padding, n, "padding"), ntuple(output_padding, n, "output_padding")
    out = []
    for s, p, op, d, k in zip(stride, padding, output_padding, dilation, kernel):
        if s < 1 or d < 1 or p < 0 or op < 0:
            raise ValueError(f"transposed conv needs stride, dilation >= 1 and padding, output_padding >= 0; got "
                             f"stride={stride}, padding={padding}, output_padding={output_padding}, dilation={dilation}")
        if op >= max(s, d):
            raise ValueError(f"output_padding must be smaller than either stride or dilation, got output_padding="
                             f"{output_padding}, stride={stride}, dilation={dilation}")
        lo, hi = d * (k - 1) - p, d * (k - 1) - p + op
        out.append((s, max(-lo, 0), max(-hi, 0), max(lo, 0), max(hi, 0)))
    return out, dilation


def _stuff(t: torch.Tensor, geo, fill=0) -> torch.Tensor:
    """(N, C, *L): ``stride-1`` fill values between elements, then the crops (differentiable for floats)."""
    n = len(geo)
    if any(s > 1 for s, *_ in geo):
        sizes = [(L - 1) * g[0] + 1 for L, g in zip(t.shape[2:], geo)]
        out = t.new_full((*t.shape[:2], *sizes), fill)
        out[(slice(None), slice(None), *[slice(None, None, g[0]) for g in geo])] = t
        t = out
    for d, (_, c0, c1, _, _) in enumerate(geo):
        if c0 or c1:
            t = t.narrow(2 + d, c0, t.shape[2 + d] - c0 - c1)
    if any(L < 1 for L in t.shape[2:2 + n]):
        raise ValueError("transposed conv: padding crops away the whole input")
    return t


def conv_transpose(x, w, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                   mac: MACConfig = IDEAL_MAC, *, n: int, acc_lsb: Optional[int] = None,
                   x_block_size: Optional[int] = None, fmt: Optional[Format] = None,
                   x_param: Optional[torch.Tensor] = None, w_master: Optional[torch.Tensor] = None,
                   weight_as_conv: bool = False) -> torch.Tensor:
    """``lns_conv_transpose{n}d``; the layers pass their stored conv-layout weight with ``weight_as_conv``."""
    name = f"lns_conv_transpose{n}d"
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    xq, wq, fmt = _operands(x, w, fmt, x_block_size, x_param)
    wt = wq.codes if wq is not None else w
    if not isinstance(wt, torch.Tensor) or wt.dim() != n + 2:
        raise ValueError(f"{name} weight must be {n + 2}-D (in, out/groups, *kernel), got "
                         f"{tuple(getattr(wt, 'shape', ()))}")
    if not weight_as_conv:
        w = transpose_weight_as_conv(wq if wq is not None else as_float32(w), groups)
    geo, dilation = _transpose_geometry(stride, padding, output_padding, dilation, tuple(wt.shape[2:]), n)
    xt = xq.codes if xq is not None else as_float32(x)
    if xt.dim() not in (n + 1, n + 2):
        raise ValueError(f"{name} input must be {n + 1}-D or {n + 2}-D, got {tuple(xt.shape)}")
    unbatched = xt.dim() == n + 1
    batch = (lambda t: t.unsqueeze(0)) if unbatched else (lambda t: t)  # noqa: E731
    if xq is None and x_block_size is None and not needs_grad(x):
        xq, x_param = _encode(x, fmt, "x", param=x_param), None  # stuff one-byte codes, not floats
    if xq is not None:
        param = xq.expanded_param()
        if param.numel() != 1:
            param = _stuff(batch(param.expand(xq.codes.shape)), geo, param.flatten()[0].item())
        xs = Coded(_stuff(batch(xq.codes), geo, 0), param.reshape([1] * (n + 2)) if param.numel() == 1 else param,
                   xq.fmt)
    else:
        xs = _stuff(batch(as_float32(x)), geo, 0.0)
    y = conv(xs, w, bias, 1, [(g[3], g[4]) for g in geo], dilation, groups, mac, n=n, acc_lsb=acc_lsb,
             x_block_size=x_block_size, fmt=fmt, x_param=x_param, w_master=w_master)
    return y.squeeze(0) if unbatched else y


class _Geometry(NamedTuple):
    """Stride, (before, after) padding, dilation and groups of a convolution as 2-D."""

    stride: tuple
    pads: list
    dilation: tuple
    groups: int


def _conv_weight(wq: Coded, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """An LNS weight's codes and int32 offsets as ``lns_conv`` takes them (conv1d: a height-1 kernel)."""
    w_off = wq.expanded_param().to(torch.int32)
    return (wq.codes.unsqueeze(2), w_off.unsqueeze(2)) if n == 1 else (wq.codes, w_off)


def _lns_conv(xq: Coded, wq: Coded, as4d, bias, mac: MACConfig, acc_lsb, geometry: _Geometry, Kg: int,
              n: int) -> torch.Tensor:
    """Coded LNS input: one ``torchlns::lns_conv`` call."""
    xq.fmt.check_partner(wq.fmt)
    xq.fmt.check_mac(mac, acc_lsb)
    mac.check_reduction(Kg)
    x_off = as4d(xq.expanded_param()).to(torch.int32)
    w4, w_off = _conv_weight(wq, n)
    F_ = xq.fmt.frac_bits
    args = (as4d(xq.codes), x_off, w4, w_off, mac.table(F_, xq.codes.device), bias, xq.fmt.bits, wq.fmt.bits, F_,
            mac.fixed, mac.acc_bits, acc_lsb if mac.fixed else 0, list(geometry.stride),
            [p[0] for p in geometry.pads], [p[1] for p in geometry.pads], list(geometry.dilation), geometry.groups)
    if _observer is not None:
        _observer.conv(args, mac, xq.fmt)
    return _OPS.lns_conv(*args)


# The wide codes that carry a float input's integer logs into lns_conv's dynamic blocks
# (see Note: dynamic blocks in ops/reference.py): 16 bits hold every log a block can keep
# (254 octaves above the flush point of the narrow format) for F <= 7.
_WIDE_BITS, _WIDE_MAX_F = 16, 7


def _blocks_in_op(fmt: Format, wq: Coded) -> bool:
    return fmt.mac_kind == "log" and wq.fmt.mac_kind == "log" and fmt.frac_bits <= _WIDE_MAX_F


def _lns_conv_blocks(x4: torch.Tensor, wq: Coded, fmt: Format, bias, mac: MACConfig, acc_lsb, geometry: _Geometry,
                     Kg: int, n: int, block_size: int) -> torch.Tensor:
    """Float input, dynamic per-block LNS activations: one ``torchlns::lns_conv`` call on the
    input encoded once per tensor in wide codes; the op encodes each receptive field's blocks."""
    fmt.check_partner(wq.fmt)
    fmt.check_mac(mac, acc_lsb)
    mac.check_reduction(Kg)
    check_block_size(block_size)
    # The wide codes are no LNSFormat (no offset keeps all 2^15 of their magnitudes normal
    # floats); the same F and rounding give the same integer logs. The largest finite |x| sits
    # one step below E_max16, so that ±inf (saturating to E_max16) stands apart.
    e_wide = (1 << (_WIDE_BITS - 1)) - 1
    off = fmt.integer_log(amax(x4)).reshape(1, 1, 1, 1).to(torch.int32) - (e_wide - 1)
    buckets, _, F_, mitchell = fmt.encode_args(x4.device)
    codes = _OPS.lns_encode(x4.contiguous(), off, buckets, _WIDE_BITS, F_, mitchell)
    w4, w_off = _conv_weight(wq, n)
    args = (codes, off, w4, w_off, mac.table(F_, x4.device), bias, _WIDE_BITS, wq.fmt.bits, F_, mac.fixed,
            mac.acc_bits, acc_lsb if mac.fixed else 0, list(geometry.stride), [p[0] for p in geometry.pads],
            [p[1] for p in geometry.pads], list(geometry.dilation), geometry.groups, block_size, fmt.bits)
    if _observer is not None:
        _observer.conv(args, mac, fmt)
    return _OPS.lns_conv(*args)


def _scaled_conv(xq: Coded, wq: Coded, as4d, bias, mac: MACConfig, acc_lsb, geometry: _Geometry, Kg: int,
                 n: int) -> torch.Tensor:
    """FP8/INT input with a per-tensor scale, weights per tensor or channel: one ``torchlns::scaled_conv`` call."""
    xq.fmt.check_partner(wq.fmt)
    xq.fmt.check_mac(mac, acc_lsb)
    _check_exact_range(xq.fmt, wq.fmt, Kg)
    w4 = wq.codes.unsqueeze(2) if n == 1 else wq.codes
    device = xq.codes.device
    return _OPS.scaled_conv(
        as4d(xq.codes), xq.param.reshape(1), xq.fmt.value_table(device), w4, wq.param.reshape(-1),
        wq.fmt.value_table(device), bias, list(geometry.stride), [p[0] for p in geometry.pads],
        [p[1] for p in geometry.pads], list(geometry.dilation), geometry.groups)


def _check_exact_range(fx: Format, fw: Format, K: int) -> None:
    if fx.integer and K * fx.max * fw.max >= 2**53:
        raise ValueError(f"accumulator overflow: K={K} products of {fx} x {fw} exceed the 2^53 exact range")


def _conv_by_columns(xq: Optional[Coded], wq: Coded, fmt: Format, xt4, w4, bias, mac: MACConfig, acc_lsb,
                     x_block_size, geometry: _Geometry) -> torch.Tensor:
    """FP8/INT convolutions, and LNS with dynamic per-block activations: im2col, then the MAC per group."""
    idx, Ho, Wo = im2col_index(xt4.shape[2], xt4.shape[3], w4.shape[2:], geometry.stride, geometry.pads,
                               geometry.dilation, xt4.device)
    groups = geometry.groups
    Cout, Nb, taps = w4.shape[0], xt4.shape[0], idx.shape[0]
    Kg = w4.shape[1] * taps
    if xq is not None:
        if xq.param.numel() != 1:
            raise ValueError(f"{xq.fmt} activations of a convolution take a per-tensor "
                             f"{xq.fmt.param_name}, or x_block_size for dynamic blocks")
        fx = xq.fmt
        cols = Coded(im2col(xt4, idx, 0), xq.param.reshape(1, 1), fx)
    else:
        fx, cols = fmt, im2col(xt4, idx, 0.0)
    fx.check_partner(wq.fmt)
    fx.check_mac(mac, acc_lsb)
    w_param, w_block = wq.param, None
    if wq.fmt.mac_kind == "scaled" and wq.block is not None and wq.block[0] == 1 and wq.param.shape[2:].numel() == 1:
        w_param, w_block = wq.param.reshape(wq.param.shape[0], -1), (1, wq.block[1] * taps)  # blocks of channels: runs of bs*taps
    elif wq.fmt.mac_kind == "scaled" and wq.block is None and wq.param.shape[1:].numel() == 1:
        w_param = wq.param.reshape(wq.param.shape[0], 1)  # per tensor or per output channel
    else:  # any other layout: one parameter per weight element
        w_param = wq.expanded_param().expand(wq.codes.shape).reshape(Cout, Kg)
    w_codes = w4.reshape(Cout, Kg)
    outs = []
    Cout_g = Cout // groups
    for gi in range(groups):
        ks, os_ = slice(gi * Kg, (gi + 1) * Kg), slice(gi * Cout_g, (gi + 1) * Cout_g)
        if isinstance(cols, Coded):
            xm = Coded(cols.codes[:, ks], cols.param, fx)
        else:
            xm = _encode(cols[:, ks], fmt, "x", block_size=x_block_size)
        wm = Coded(w_codes[os_], w_param[os_] if w_param.shape[0] > 1 else w_param, wq.fmt, w_block)
        outs.append(_matmul(xm, wm, bias[os_] if bias is not None else None, mac, acc_lsb))
    return cols_to_image(torch.cat(outs, dim=1), Nb, Ho, Wo)


# ----------------------------------------------------------------------------------------
# the MAC
# ----------------------------------------------------------------------------------------
# Note: two-stage MACs
# A fixed accumulator that wraps or sums in chunks (Note: overflow and chunks in
# ops/reference.py) is three more arguments of ``torchlns::lns_mm`` (overflow, chunk,
# chunk_bits), not of ``lns_conv``: a convolution with such a MAC runs as im2col columns (k
# ordered input channel slowest, as the spec's chunks count it), then one ``lns_mm`` per
# group. The CPU kernel is a scalar loop per output (csrc/mac_cpu.cpp, every ISA level); on
# CUDA the Triton direct kernel's integer path (TWO_STAGE in ops/triton_mac.py).
def _matmul(x: Coded, w: Coded, bias, mac: MACConfig, acc_lsb) -> torch.Tensor:
    """(M, K) x (N, K) coded operands -> (M, N) float32: one ``torchlns::`` op call."""
    K = x.codes.shape[1]
    if K != w.codes.shape[1]:
        raise ValueError(f"reduction sizes differ: activations have K={K}, weights K={w.codes.shape[1]}")
    if x.codes.device != w.codes.device:
        raise ValueError(f"operands are on different devices: {x.codes.device} and {w.codes.device}")
    if x.fmt.mac_kind == "log":
        mac.check_reduction(K)
        F_ = x.fmt.frac_bits
        if _observer is not None:
            _observer.mm(x, w, bias, mac, acc_lsb)
        two = (mac.overflow, mac.chunk, mac.chunk_bits) if mac.two_stage else ()  # see Note: two-stage MACs
        return _OPS.lns_mm(x.codes, x.expanded_param().to(torch.int32), w.codes, w.expanded_param().to(torch.int32),
                           mac.table(F_, x.codes.device), bias, x.fmt.bits, w.fmt.bits, F_, mac.fixed, mac.acc_bits,
                           acc_lsb if mac.fixed else 0, *two)
    _check_exact_range(x.fmt, w.fmt, K)
    device = x.codes.device
    return _OPS.scaled_mm(x.codes, x.expanded_param(), x.fmt.value_table(device), w.codes, w.expanded_param(),
                          w.fmt.value_table(device), bias, _run_length(x), _run_length(w))


def _run_length(m: Coded) -> int:
    """Run length along K over which a 2-D operand's parameter is constant (0: all of K)."""
    if m.block is not None:
        return m.block[1]
    return 1 if m.param.shape[1] > 1 else 0


# ----------------------------------------------------------------------------------------
# operands
# ----------------------------------------------------------------------------------------
def _operands(x, w, fmt: Optional[Format], x_block_size, x_param) -> Tuple[Optional[Coded], Optional[Coded], Format]:
    """The coded operands among ``x`` and ``w``, and the format that float operands are encoded in."""
    xq, wq = as_coded(x), as_coded(w)
    if xq is not None and x_block_size is not None:
        raise ValueError("x_block_size encodes a float x dynamically; x is already encoded")
    if x_param is not None and (xq is not None or x_block_size is not None):
        raise ValueError("x_param is the static parameter of a float x encoded per tensor")
    coded = xq.fmt if xq is not None else wq.fmt if wq is not None else None
    if fmt is not None and coded is not None and type(fmt) is not type(coded):
        raise TypeError(f"fmt={fmt} conflicts with an operand already encoded as {coded}")
    return xq, wq, fmt or coded or LNS8


def _encode(t, fmt: Format, what: str, block_size: Optional[int] = None, param=None) -> Coded:
    """A float operand as a coded one: per tensor (calibrated, or ``param``), or per block along K."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a tensor or an LNSTensor, got {type(t).__name__}")
    t = t.detach()  # codes carry no gradient; the straight-through estimator supplies it
    if block_size is None:
        coded = Coded.encode(t, fmt, "tensor", param=param)
    else:
        coded = Coded.encode(t, fmt, "block", -1, block_size)
    if _observer is not None and what == "x":
        _observer.encoded(t, coded)
    return coded


def _check_bias(bias, n_out: int, device) -> Optional[torch.Tensor]:
    if bias is None:
        return None
    if isinstance(bias, (CodedTensor, Coded)):
        raise TypeError(f"bias is a {type(bias).__name__}; the chip adds a float32 bias, so pass a float tensor")
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be a float tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
    if bias.shape != (n_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n_out},)")
    return bias.detach().to(device=device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------
# straight-through estimator (see Note: straight-through estimator in ops/autograd.py)
# ----------------------------------------------------------------------------------------
def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _float_operand(operand, otherwise: Optional[torch.Tensor] = None):
    """The tensor that receives an operand's gradient: the operand if it is a float tensor, else ``otherwise``."""
    if as_coded(operand) is None and isinstance(operand, torch.Tensor):
        return operand
    return otherwise


# ----------------------------------------------------------------------------------------
# fake-quantized training forward (see Note: fake-quantized training in nn/layers.py)
# ----------------------------------------------------------------------------------------
class _StraightThrough(torch.autograd.Function):
    """``value`` forward, the identity gradient into ``t`` backward: ``t + (value - t).detach()``
    without the two passes over the tensor that spelling costs."""

    @staticmethod
    def forward(ctx, t, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _straight_through(t: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """``value`` forward; the identity gradient into ``t`` backward (``value`` itself when there is no ``t``)."""
    if t is None or not (torch.is_grad_enabled() and t.requires_grad):
        return value
    return _StraightThrough.apply(t, value)


def fake_input(x, fmt: Format, *, x_param=None, x_block_size=None, channel_axis: int = -1) -> torch.Tensor:
    """``x`` as the chip encodes it, decoded to float32 (per tensor with ``x_param``, or per
    block of ``x_block_size`` along ``channel_axis``)."""
    x = as_float32(x)
    if x_block_size is None:
        return _encode(x, fmt, "x", param=x_param).dequantize()
    return Coded.encode(x.detach(), fmt, "block", channel_axis, x_block_size).dequantize()


def fake_linear(x, w: Coded, bias, *, fmt: Format, x_param=None, x_block_size=None, w_master=None,
                quantize_x: bool = True) -> torch.Tensor:
    """``F.linear`` of the dequantized operands, with straight-through gradients into ``x`` and ``w_master``
    (``quantize_x=False``: ``x`` as it is, for the weights-only error of ``error_split``)."""
    x = as_float32(x)
    xd = fake_input(x, fmt, x_param=x_param, x_block_size=x_block_size) if quantize_x else x
    return F.linear(_straight_through(x, xd), _straight_through(w_master, w.dequantize()), bias)


def fake_conv(x, w: Coded, bias, stride, padding, dilation, groups, *, n: int, fmt: Format, x_param=None,
              x_block_size=None, w_master=None, quantize_x: bool = True) -> torch.Tensor:
    """``F.conv{n}d`` of the dequantized operands, with straight-through gradients into ``x`` and ``w_master``.

    Dynamic per-block activations are fake-quantized in blocks along the channels, since an
    input element has no single value when the chip encodes each receptive field.
    """
    x = as_float32(x)
    xd = fake_input(x, fmt, x_param=x_param, x_block_size=x_block_size,
                    channel_axis=1 if x.dim() == n + 2 else 0) if quantize_x else x
    op = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return op(_straight_through(x, xd), _straight_through(w_master, w.dequantize()), bias, stride, padding, dilation,
              groups)


def fake_conv_transpose(x, w: Coded, bias, stride, padding, output_padding, groups, dilation, *, n: int, fmt: Format,
                        x_param=None, x_block_size=None, w_master=None, quantize_x: bool = True) -> torch.Tensor:
    """``F.conv_transpose{n}d`` of the dequantized operands; ``w`` is the layers' conv-layout weight."""
    x = as_float32(x)
    xd = fake_input(x, fmt, x_param=x_param, x_block_size=x_block_size,
                    channel_axis=1 if x.dim() == n + 2 else 0) if quantize_x else x
    op = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    wt = conv_weight_as_transpose(_straight_through(w_master, w.dequantize()), groups)
    return op(_straight_through(x, xd), wt, bias, stride, padding, output_padding, groups, dilation)


# ----------------------------------------------------------------------------------------
# torch functions on coded tensors: the layers run the ideal MAC
# ----------------------------------------------------------------------------------------
@implements_torch_function(F.linear)
def _linear_override(func, args, kwargs):
    x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return lns_linear(x, w, bias)


@implements_torch_function([F.conv1d, F.conv2d])
def _conv_override(func, args, kwargs):
    names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    op = lns_conv2d if func is F.conv2d else lns_conv1d
    return op(bound["input"], bound["weight"], bound.get("bias"), bound.get("stride", 1), bound.get("padding", 0),
              bound.get("dilation", 1), bound.get("groups", 1))


@implements_torch_function([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])
def _matmul_override(func, args, kwargs):
    a, b = args[0], args[1] if len(args) > 1 else kwargs["other"]
    if b.dim() != 2:
        raise NotImplementedError(
            f"torch.matmul with a coded operand needs a 2-D right operand (K, N); got shape {tuple(b.shape)}"
        )
    if a.dim() == 1:
        return lns_linear(a.unsqueeze(0), b.t()).squeeze(0)
    return lns_linear(a, b.t())
