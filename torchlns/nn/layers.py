"""Drop-in layers that compute exactly what the chip computes.

# Note: converted layer state
A converted layer holds what the chip stores, and nothing it does not:

* ``weight``: a buffer holding a coded tensor (``LNSTensor`` by default, per-channel
  parameters; FP8/INT for comparison formats through the same machinery);
* ``bias``: a float32 Parameter;
* ``input_param``: the static per-tensor activation offset (LNS, int32) or scale (FP8/INT),
  a 0-d buffer; ``None`` for dynamic activations, which are encoded at run time per
  tensor or per ``input_block_size`` block along the reduction axis (MX style);
* ``acc_lsb``: the fixed accumulator's LSB exponent, a Python int (a constant under
  torch.compile), saved in the state dict as extra state along with the format and MAC.

The output is bit for bit the chip's; the layer does no float arithmetic of its own: its
``forward`` hands its operands to ``functional.linear``/``functional.conv``.

# Note: QAT in converted layers
Codes have no gradient. In ``train()`` mode the bias and the float input get the
straight-through gradient (see Note: straight-through estimator in ops/autograd.py). The weight
trains only if the layer has a float master (``weight_float``; ``convert(..., qat=True)``
or ``enable_qat()``): each training forward then re-encodes the master with freshly
calibrated weight parameters, and the master receives the gradient (``w_master`` of the
functional ops). ``eval()`` (or
``freeze()``) re-encodes the master into ``weight``. Without a master a training forward
that needs gradients warns once that only the bias and the input train.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import functional
from ..config import ConvertConfig
from ..core.formats import IDEAL_MAC, Format, MACConfig
from ..core.geometry import InputPad, ntuple
from ..core.layout import GRANULARITIES
from ..tensor import Coded, CodedTensor
from .swap import register_swap

__all__ = ["LNSLinear", "LNSConv1d", "LNSConv2d", "LNSConv3d", "LNSConvTranspose1d", "LNSConvTranspose2d",
           "LNSConvTranspose3d", "TRAIN_FORWARDS"]

TRAIN_FORWARDS = ("exact", "fake")


def _describe_param(fmt: Format, p: Optional[torch.Tensor], block_size: Optional[int]) -> str:
    if p is None:
        return f"dynamic per-block({block_size})" if block_size else "dynamic per-tensor"
    return "static " + fmt.describe_param(p.item())


class _CodedLayer(nn.Module):
    """Shared state and forward of the converted layers (see Note: converted layer state)."""

    _weight_axis = -1  # the reduction axis of per-block weight parameters

    def __init__(self, weight: Optional[CodedTensor], bias: Optional[torch.Tensor], mac: MACConfig = IDEAL_MAC, *,
                 input_param: Optional[torch.Tensor] = None, input_block_size: Optional[int] = None,
                 acc_lsb: Optional[int] = None, weight_granularity: str = "channel",
                 weight_block_size: Optional[int] = None, fmt: Optional[Format] = None):
        super().__init__()
        if weight is not None and not isinstance(weight, CodedTensor):
            raise TypeError(f"weight must be an LNSTensor, FP8Tensor or IntTensor, got {type(weight).__name__}")
        if weight_granularity not in GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {GRANULARITIES}, got {weight_granularity!r}")
        fmt = weight.fmt if weight is not None else fmt
        device = weight.device if weight is not None else None
        fmt.check_mac(mac, acc_lsb)
        if input_param is not None:
            if input_block_size is not None:
                raise ValueError("input_block_size is for dynamic activations; a static input_param is per tensor")
            if input_param.numel() != 1:
                raise ValueError(f"input_param must be one per-tensor value, got shape {tuple(input_param.shape)}")
            input_param = input_param.detach().reshape(()).to(dtype=fmt.param_dtype, device=device)
        self.fmt, self.mac, self.acc_lsb = fmt, mac, acc_lsb
        self.input_block_size = input_block_size
        self.weight_granularity, self.weight_block_size = weight_granularity, weight_block_size
        if weight is not None:
            self.register_buffer("weight", weight)
        self.register_buffer("input_param", input_param)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())
        self.weight_float: Optional[nn.Parameter] = None
        self.train_forward = "exact"  # see Note: fake-quantized training
        self.input_pad: Optional[InputPad] = None  # see Note: pad-then-conv subclasses in transforms/graph.py
        self._warned_frozen = False

    # -- weights ---------------------------------------------------------------------------
    def _encode_weight(self, w: torch.Tensor) -> Coded:
        """Weight parameters from max|w| (spec section 3's default), and the codes."""
        block = self.weight_granularity == "block"
        return Coded.encode(w, self.fmt, self.weight_granularity, self._weight_axis if block else None,
                            self.weight_block_size)

    def _master(self) -> Optional[torch.Tensor]:
        """The float weight that receives gradients in training (None: weight is frozen)."""
        return self.weight_float

    def _coded_weight(self) -> Coded:
        master = self._master()
        if self.training and master is not None:
            return self._encode_weight(master.detach())
        return self.weight.coded

    def enable_qat(self, train_forward: Optional[str] = None) -> "_CodedLayer":
        """Give the layer a float master weight, starting from the dequantized codes.

        ``train_forward``: ``"exact"`` or ``"fake"`` (see Note: fake-quantized training); None keeps it.
        """
        if self.weight_float is None:
            self.weight_float = nn.Parameter(self.weight.dequantize())
        if train_forward is not None:
            self.set_train_forward(train_forward)
        return self

    def set_train_forward(self, mode: str) -> "_CodedLayer":
        """``"exact"`` (the chip's forward in training too) or ``"fake"`` (see Note: fake-quantized training)."""
        if mode not in TRAIN_FORWARDS:
            raise ValueError(f"train_forward must be one of {TRAIN_FORWARDS}, got {mode!r}")
        self.train_forward = mode
        return self

    @torch.no_grad()
    def freeze(self) -> "_CodedLayer":
        """Re-encode the float master (if any) into the stored codes."""
        master = self._master()
        if master is not None:
            self.weight = self._encode_weight(master.detach()).tensor()
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.freeze()
        return self

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, **call) -> torch.Tensor:
        if isinstance(x, (CodedTensor, Coded)):
            raise TypeError(f"{type(self).__name__} takes float activations (the chip encodes each layer's input)")
        master = self._master() if self.training else None
        if master is None and self.training and not self._warned_frozen and not torch.compiler.is_compiling() \
                and functional.needs_grad(x, self.bias):
            self._warned_frozen = True
            warnings.warn(f"{type(self).__name__} has no float master weight, so only its bias and input train; "
                          "convert with qat=True or call enable_qat() to train the weight", stacklevel=2)
        if self.input_pad is not None:
            x = F.pad(x, self._input_pad_amounts(x))
        if self.training and self.train_forward == "fake":
            return self._fake(x, self._coded_weight(), master, **call)
        return self._chip(x, self._coded_weight(), master, **call)

    def fake_forward(self, x: torch.Tensor, *, quantize_input: bool = True, **call) -> torch.Tensor:
        """The fake-quantized forward (see Note: fake-quantized training), whatever the mode;
        ``quantize_input=False`` keeps the input float (the weights-only error of ``error_split``)."""
        if self.input_pad is not None:
            x = F.pad(x, self._input_pad_amounts(x))
        return self._fake(x, self._coded_weight(), self._master() if self.training else None,
                          quantize_x=quantize_input, **call)

    def fake_input(self, x: torch.Tensor) -> torch.Tensor:
        """The float input as this layer's chip encodes it, decoded (per tensor, or dynamic blocks
        as the fake-quantized forward takes them)."""
        kw = self._fake_kwargs()
        axis = (1 if x.dim() == self._n + 2 else 0) if isinstance(self, _LNSConvNd) else -1  # blocks run along channels
        return functional.fake_input(x, kw["fmt"], x_param=kw.get("x_param"), x_block_size=kw.get("x_block_size"),
                                     channel_axis=axis)

    def _input_pad_amounts(self, x) -> tuple:
        if not self.input_pad.same:  # fixed pads (the only kind a linear layer takes)
            return self.input_pad.pads
        return self.input_pad.amounts(x, self.kernel_size, self.stride, self.dilation)

    def _check_input_pad(self, pad: Optional[InputPad]) -> None:
        if pad is None:
            return
        if not isinstance(pad, InputPad):
            raise TypeError(f"input_pad must be an InputPad or None, got {type(pad).__name__}")
        n = getattr(type(self), "_n", 1)  # spatial dims (a linear layer pads its one feature dim)
        if pad.same and not isinstance(self, _LNSConvNd):
            raise ValueError(f"{type(self).__name__} has no kernel: its input_pad cannot be TF 'same'")
        if pad.pads is not None and len(pad.pads) > 2 * n:
            raise ValueError(f"input_pad {pad.pads} pads more than the {n} spatial dims of {type(self).__name__}")

    def set_input_pad(self, pad: Optional[InputPad]) -> "_CodedLayer":
        """Zero-pad the float input before the MAC (see Note: pad-then-conv subclasses in transforms/graph.py)."""
        self._check_input_pad(pad)
        self.input_pad = pad
        return self

    def _mac_kwargs(self) -> dict:
        """Arguments of the functional op: the format, acc_lsb, and how the input is encoded."""
        kw = dict(fmt=self.fmt, acc_lsb=self.acc_lsb)
        if self.input_param is None:
            kw["x_block_size"] = self.input_block_size
        else:
            kw["x_param"] = self.input_param
        return kw

    def _fake_kwargs(self) -> dict:
        kw = self._mac_kwargs()
        kw.pop("acc_lsb")
        return kw

    # -- state -----------------------------------------------------------------------------
    def get_extra_state(self):
        return {"fmt": self.fmt.to_tuple(), "mac": self.mac.to_tuple(), "train_forward": self.train_forward,
                "acc_lsb": self.acc_lsb, "input_block_size": self.input_block_size,
                "weight_granularity": (self.weight_granularity, self.weight_block_size),
                "input_pad": None if self.input_pad is None else self.input_pad.to_json()}

    def _extra_state_mismatch(self, state) -> Optional[str]:
        try:
            fmt, mac = Format.from_tuple(tuple(state["fmt"])), MACConfig(*state["mac"])
            if fmt != self.fmt or mac != self.mac:
                return f"state is for {fmt} with {mac}; this {type(self).__name__} is {self.fmt} with {self.mac}"
            mac.check_acc_lsb(state["acc_lsb"])
            block = state["input_block_size"]
            if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
                raise ValueError(f"input_block_size must be a positive int or None, got {block!r}")
            granularity, size = tuple(state["weight_granularity"])
            if granularity not in ("tensor", "channel", "block"):
                raise ValueError(f"unknown weight granularity {granularity!r}")
            pad = state.get("input_pad")
            self._check_input_pad(None if pad is None else InputPad.from_json(pad))
            if state.get("train_forward", "exact") not in TRAIN_FORWARDS:
                raise ValueError(f"train_forward must be one of {TRAIN_FORWARDS}, got {state['train_forward']!r}")
        except (KeyError, TypeError, ValueError) as e:
            return f"not a valid {type(self).__name__} state ({e})"
        return None

    def _state_problems(self, state_dict, prefix) -> list:
        """What in ``state_dict`` this layer cannot load, one message per key (checks only; nothing changes)."""
        problems = []
        for name, mine in self._buffers.items():
            if not isinstance(mine, CodedTensor) or prefix + name not in state_dict:
                continue
            key, got = prefix + name, state_dict[prefix + name]
            if not isinstance(got, CodedTensor) or got.fmt != mine.fmt or got.shape != mine.shape:
                problems.append(f"{key}: expected a {mine.fmt} tensor of shape {tuple(mine.shape)}, got "
                                f"{type(got).__name__} {getattr(got, 'fmt', '')} {tuple(got.shape)}")
                continue
            try:
                got.coded.validate(key)
            except ValueError as e:
                problems.append(str(e))
        key = prefix + "input_param"
        if self.input_param is not None and isinstance(state_dict.get(key), torch.Tensor):
            got = state_dict[key]
            try:
                if got.shape != self.input_param.shape or got.dtype != self.input_param.dtype:
                    raise ValueError(f"expected shape {tuple(self.input_param.shape)} and dtype "
                                     f"{self.input_param.dtype}, got {tuple(got.shape)} {got.dtype}")
                self.fmt.check_param(got, torch.Size(), got.device)
            except (TypeError, ValueError) as e:
                problems.append(f"{key}: {e}")
        if prefix + "_extra_state" in state_dict:
            problem = self._extra_state_mismatch(state_dict[prefix + "_extra_state"])
            if problem:
                problems.append(f"{prefix}_extra_state: {problem}")
        return problems

    def set_extra_state(self, state) -> None:
        problem = self._extra_state_mismatch(state)
        if problem:
            raise ValueError(problem)
        self.acc_lsb = state["acc_lsb"]
        self.train_forward = state.get("train_forward", "exact")
        self.input_block_size = state["input_block_size"]
        self.weight_granularity, self.weight_block_size = tuple(state["weight_granularity"])
        pad = state.get("input_pad")
        self.input_pad = None if pad is None else InputPad.from_json(pad)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A coded buffer is replaced, not copied into: its parameters may have another
        # layout, and copy_ has no meaning on codes. Every field is checked before anything
        # changes (see Note: validated loading).
        problems = self._state_problems(state_dict, prefix)
        coded = {k: v for k, v in self._buffers.items() if isinstance(v, CodedTensor)}
        if problems:  # load_state_dict raises with these once it has visited every module
            error_msgs.extend(problems)
            return
        for name, mine in coded.items():
            key = prefix + name
            got = state_dict.get(key)
            if got is None:
                missing_keys.append(key)
            else:
                self._buffers[name] = got.to(mine.device)
        held = {k: self._buffers.pop(k) for k in coded}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._buffers.update(held)
        for name in coded:  # super() did not see these buffers, which were consumed above
            if prefix + name in unexpected_keys:
                unexpected_keys.remove(prefix + name)

    def _apply(self, fn, recurse=True):
        # Convert the coded buffers first: a dtype cast (.half()) raises there, before the bias
        # or any other state of this layer has changed. super() then meets them already
        # converted, where fn (a .to()) returns them as they are.
        coded = {k: fn(b) for k, b in self._buffers.items() if isinstance(b, CodedTensor)}
        self._buffers.update(coded)
        return super()._apply(fn, recurse)

    def _extra_repr_tail(self) -> str:
        acc = f", acc_lsb={self.acc_lsb}" if self.acc_lsb is not None else ""
        qat = (", qat" if self.train_forward == "exact" else ", qat (fake forward)") if self._master() is not None else ""
        pad = f", input_pad={self.input_pad}" if self.input_pad is not None else ""
        return (f"fmt={self.fmt}, mac={self.mac}, weight={self._weight_description()}, "
                f"input={_describe_param(self.fmt, self.input_param, self.input_block_size)}{acc}, "
                f"bias={self.bias is not None}{qat}{pad}")

    def _weight_description(self) -> str:
        return self.weight_granularity

    @classmethod
    def _from_config(cls, float_module, weight: torch.Tensor, config, input_param, acc_lsb, qat_master, **geometry):
        config, mac, kw = _layer_settings(cls, config, input_param, acc_lsb)
        block = config.weight_granularity == "block"
        coded = Coded.encode(weight.detach().float(), config.fmt, config.weight_granularity,
                             cls._weight_axis if block else None, config.weight_block_size).tensor()
        m = cls(coded, float_module.bias, mac, weight_granularity=config.weight_granularity,
                weight_block_size=config.weight_block_size, **kw, **geometry)
        if qat_master:
            m.weight_float = nn.Parameter(weight.detach().float().clone())
        return m.train(float_module.training)


# Note: validated loading
# A state_dict is data from a file, and a crafted one must not compute garbage. Each chip
# layer checks every coded field it is given before it takes any: the format and MAC
# against its own, each coded buffer's code dtype and range, block axis and size, parameter
# layout and range (``Coded.validate``), the activation parameter's range, ``acc_lsb``'s
# range and the other extra state, and reports problems under their keys. A layer with a
# problem loads nothing. A converted model (``convert``) also checks the whole state_dict
# before any module loads (``check_state_dict``, a load pre-hook on the model), so a bad
# file leaves the model exactly as it was.
def check_state_dict(model: nn.Module, state_dict, prefix: str = "") -> list:
    """Every problem loading ``state_dict`` into ``model`` would meet, without changing anything."""
    problems = []
    for name, m in model.named_modules():
        if isinstance(m, _CodedLayer):
            problems += m._state_problems(state_dict, prefix + (name + "." if name else ""))
    for name, t in model.state_dict(keep_vars=True).items():
        got = state_dict.get(prefix + name)
        if isinstance(t, torch.Tensor) and not isinstance(t, CodedTensor) and isinstance(got, torch.Tensor) \
                and not isinstance(got, CodedTensor) and got.shape != t.shape:
            problems.append(f"{prefix + name}: expected shape {tuple(t.shape)}, got {tuple(got.shape)}")
    return problems


def atomic_load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs) -> None:
    """A load_state_dict pre-hook: refuse the whole state_dict before anything loads (Note: validated loading)."""
    problems = check_state_dict(module, state_dict, prefix)
    if problems:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(module).__name__} (nothing was loaded):\n\t"
                           + "\n\t".join(problems))


def _layer_settings(cls, config, input_param, acc_lsb):
    """(config, MAC, constructor kwargs) of a converted layer; clear errors for what is missing."""
    config = ConvertConfig() if config is None else config
    if not isinstance(config, ConvertConfig):
        raise TypeError(f"{cls.__name__}.from_float: config must be a ConvertConfig, got {type(config).__name__}")
    fmt = config.fmt
    static = config.activation == "static"
    if static and input_param is None:
        raise ValueError(f"{cls.__name__}.from_float: static activations need input_param (the calibrated "
                         "per-tensor offset or scale); torchlns.convert calibrates it from calibration_data")
    needs_lsb = fmt.needs_acc_lsb(config.mac)
    if needs_lsb and acc_lsb is None:
        raise ValueError(f"{cls.__name__}.from_float: the fixed accumulator needs acc_lsb; torchlns.convert "
                         "calibrates it from the observed output range")
    if isinstance(input_param, (int, float)):
        input_param = torch.tensor(input_param)
    kw = dict(input_param=input_param if static else None,
              input_block_size=None if static else config.activation_block_size,
              acc_lsb=acc_lsb if needs_lsb else None)
    return config, fmt.layer_mac(config.mac), kw


@register_swap(nn.Linear)
class LNSLinear(_CodedLayer):
    """``nn.Linear`` on the chip: ``y = MAC(x, W) + b`` (see Note: converted layer state)."""

    def __init__(self, weight: CodedTensor, bias: Optional[torch.Tensor] = None, mac: MACConfig = IDEAL_MAC, **kw):
        super().__init__(weight, bias, mac, **kw)
        if weight.dim() != 2:
            raise ValueError(f"LNSLinear weight must be 2-D (out, in), got shape {tuple(weight.shape)}")

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @classmethod
    def from_float(cls, linear: nn.Linear, config=None, *, input_param=None, acc_lsb: Optional[int] = None,
                   qat: bool = False) -> "LNSLinear":
        """Encode ``linear``'s weight per ``config`` (a ``ConvertConfig``; default LNS8 per channel).

        ``input_param`` is the static activation offset/scale; ``acc_lsb`` the fixed
        accumulator's LSB. ``torchlns.convert`` calibrates both.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LNSLinear.from_float needs an nn.Linear, got {type(linear).__name__}")
        return cls._from_config(linear, linear.weight, config, input_param, acc_lsb, qat)

    def _chip(self, x, w: Coded, master):
        return functional.linear(x, w, self.bias, self.mac, w_master=master, **self._mac_kwargs())

    def _fake(self, x, w: Coded, master, quantize_x: bool = True):
        return functional.fake_linear(x, w, self.bias, w_master=master, quantize_x=quantize_x, **self._fake_kwargs())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + self._extra_repr_tail()


class _LNSConvNd(_CodedLayer):
    _n = 2
    _float_type = nn.Conv2d
    _weight_axis = 1  # per-block weight parameters run along the input channels
    padding_mode = "zeros"  # the chip pads with the zero code; other modes pad in float first

    def __init__(self, weight: CodedTensor, bias: Optional[torch.Tensor] = None, mac: MACConfig = IDEAL_MAC, *,
                 stride=1, padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros", **kw):
        super().__init__(weight, bias, mac, **kw)
        n = self._n
        if weight.dim() != n + 2:
            raise ValueError(f"{type(self).__name__} weight must be {n + 2}-D, got shape {tuple(weight.shape)}")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', got {padding_mode!r}")
        if padding_mode != "zeros" and isinstance(padding, str):
            raise ValueError(f"padding={padding!r} needs padding_mode='zeros'")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @classmethod
    def from_float(cls, conv, config=None, *, input_param=None, acc_lsb: Optional[int] = None, qat: bool = False):
        """Encode a float conv's weight per ``config``; see ``LNSLinear.from_float``."""
        if not isinstance(conv, cls._float_type):
            raise TypeError(f"{cls.__name__}.from_float needs an {cls._float_type.__name__}, got {type(conv).__name__}")
        return cls._from_config(conv, conv.weight, config, input_param, acc_lsb, qat, stride=conv.stride,
                                padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                                padding_mode=conv.padding_mode)

    def _padded(self, x):
        """(input, padding): a non-zero padding mode pads in float first, as torch does; the chip then
        encodes the padded tensor, whose values (copies of the input's) encode as the input's do."""
        if self.padding_mode == "zeros":
            return x, self.padding
        pads = [p for p in reversed(ntuple_padding(self.padding, self._n)) for _ in range(2)]
        return F.pad(x, pads, mode=self.padding_mode), 0

    def _chip(self, x, w: Coded, master):
        x, padding = self._padded(x)
        return functional.conv(x, w, self.bias, self.stride, padding, self.dilation, self.groups, self.mac,
                               n=self._n, w_master=master, **self._mac_kwargs())

    def _fake(self, x, w: Coded, master, quantize_x: bool = True):
        x, padding = self._padded(x)
        return functional.fake_conv(x, w, self.bias, self.stride, padding, self.dilation, self.groups, n=self._n,
                                    w_master=master, quantize_x=quantize_x, **self._fake_kwargs())

    def get_extra_state(self):
        return {**super().get_extra_state(), "padding_mode": self.padding_mode}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self.padding_mode = state.get("padding_mode", "zeros")

    def extra_repr(self) -> str:
        mode = f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}{mode}, "
                + self._extra_repr_tail())


@register_swap(nn.Conv1d)
class LNSConv1d(_LNSConvNd):
    """``nn.Conv1d`` on the chip (see Note: converted layer state)."""

    _n = 1
    _float_type = nn.Conv1d


@register_swap(nn.Conv2d)
class LNSConv2d(_LNSConvNd):
    """``nn.Conv2d`` on the chip (see Note: converted layer state)."""

    _n = 2
    _float_type = nn.Conv2d


@register_swap(nn.Conv3d)
class LNSConv3d(_LNSConvNd):
    """``nn.Conv3d`` on the chip (see Note: 3-D and transposed convolutions in functional.py)."""

    _n = 3
    _float_type = nn.Conv3d


def ntuple_padding(padding, n: int) -> tuple:
    return ntuple(padding, n, "padding")


class _LNSConvTransposeNd(_LNSConvNd):
    """A transposed conv on the chip. ``weight`` holds the equivalent convolution's kernel,
    (out, in/groups, *k) flipped, so its per-channel parameters are per output channel (see
    Note: 3-D and transposed convolutions in functional.py); ``transposed_weight()`` gives
    PyTorch's (in, out/groups, *k) layout."""

    _float_type = nn.modules.conv._ConvTransposeNd

    def __init__(self, weight: CodedTensor, bias: Optional[torch.Tensor] = None, mac: MACConfig = IDEAL_MAC, *,
                 stride=1, padding=0, output_padding=0, dilation=1, groups: int = 1, **kw):
        super().__init__(weight, bias, mac, stride=stride, padding=padding, dilation=dilation, groups=groups, **kw)
        self.output_padding = output_padding

    @classmethod
    def from_float(cls, conv, config=None, *, input_param=None, acc_lsb: Optional[int] = None, qat: bool = False):
        """Encode a float transposed conv's weight per ``config``; see ``LNSLinear.from_float``."""
        if not isinstance(conv, cls._float_type) or conv.weight.dim() != cls._n + 2:
            raise TypeError(f"{cls.__name__}.from_float needs an nn.ConvTranspose{cls._n}d, got {type(conv).__name__}")
        w = functional.transpose_weight_as_conv(conv.weight.detach().float(), conv.groups)
        return cls._from_config(conv, w, config, input_param, acc_lsb, qat, stride=conv.stride, padding=conv.padding,
                                output_padding=conv.output_padding, dilation=conv.dilation, groups=conv.groups)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    def transposed_weight(self) -> torch.Tensor:
        """The dequantized weight in PyTorch's ConvTranspose layout (in, out/groups, *k)."""
        return functional.conv_weight_as_transpose(self.weight.dequantize(), self.groups)

    def _output_padding(self, x, output_size):
        if output_size is None:
            return self.output_padding
        return nn.modules.conv._ConvTransposeNd._output_padding(
            self, x, list(output_size), list(ntuple(self.stride, self._n, "stride")),
            list(ntuple(self.padding, self._n, "padding")), list(self.kernel_size), self._n,
            list(ntuple(self.dilation, self._n, "dilation")))

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        return super().forward(x, output_size=output_size)

    def _chip(self, x, w: Coded, master, output_size=None):
        op = self._output_padding(x, output_size)
        return functional.conv_transpose(x, w, self.bias, self.stride, self.padding, op, self.groups, self.dilation,
                                         self.mac, n=self._n, w_master=master, weight_as_conv=True,
                                         **self._mac_kwargs())

    def _fake(self, x, w: Coded, master, output_size=None, quantize_x: bool = True):
        op = self._output_padding(x, output_size)
        return functional.fake_conv_transpose(x, w, self.bias, self.stride, self.padding, op, self.groups,
                                              self.dilation, n=self._n, w_master=master, quantize_x=quantize_x,
                                              **self._fake_kwargs())

    def get_extra_state(self):
        return {**super().get_extra_state(), "output_padding": self.output_padding}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self.output_padding = tuple(state.get("output_padding", self.output_padding))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
                f"groups={self.groups}, " + self._extra_repr_tail())


@register_swap(nn.ConvTranspose1d)
class LNSConvTranspose1d(_LNSConvTransposeNd):
    """``nn.ConvTranspose1d`` on the chip."""

    _n = 1


@register_swap(nn.ConvTranspose2d)
class LNSConvTranspose2d(_LNSConvTransposeNd):
    """``nn.ConvTranspose2d`` on the chip."""

    _n = 2


@register_swap(nn.ConvTranspose3d)
class LNSConvTranspose3d(_LNSConvTransposeNd):
    """``nn.ConvTranspose3d`` on the chip."""

    _n = 3
