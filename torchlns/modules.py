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

The output is bit for bit the chip's; the layer does no float arithmetic of its own.

# Note: QAT in converted layers
Codes have no gradient. In ``train()`` mode the bias and the float input get the
straight-through gradient (see Note: straight-through estimator in autograd.py). The weight
trains only if the layer has a float master (``weight_float``; ``convert(..., qat=True)``
or ``enable_qat()``): each training forward then re-encodes the master with freshly
calibrated weight parameters, and the master receives the gradient. ``eval()`` (or
``freeze()``) re-encodes the master into ``weight``. Without a master a training forward
that needs gradients warns once that only the bias and the input train.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn as nn

from . import mac as _mac
from .mac import CodedParts
from .autograd import needs_grad, ste_conv, ste_linear
from .cluster import ClusteredConv2d
from .codec import encode
from .formats import IDEAL_MAC, Format, LNSFormat, MACConfig
from .tensor import CodedTensor, _format_from_tuple, _format_to_tuple, encode_compact

__all__ = ["LNSLinear", "LNSConv1d", "LNSConv2d", "LNSClusteredConv2d"]

_GRANULARITIES = ("tensor", "channel", "block")


def _describe_param(fmt: Format, p: Optional[torch.Tensor], block_size: Optional[int]) -> str:
    if p is None:
        return f"dynamic per-block({block_size})" if block_size else "dynamic per-tensor"
    v = p.item()
    return f"static offset={int(v)}" if isinstance(fmt, LNSFormat) else f"static scale={v:.4g}"


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
        if weight_granularity not in _GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {_GRANULARITIES}, got {weight_granularity!r}")
        fmt = weight.fmt if weight is not None else fmt
        device = weight.device if weight is not None else None
        _mac._check_mac(mac, acc_lsb, fmt)
        if input_param is not None:
            if input_block_size is not None:
                raise ValueError("input_block_size is for dynamic activations; a static input_param is per tensor")
            if input_param.numel() != 1:
                raise ValueError(f"input_param must be one per-tensor value, got shape {tuple(input_param.shape)}")
            dtype = torch.int32 if isinstance(fmt, LNSFormat) else torch.float32
            input_param = input_param.detach().reshape(()).to(dtype=dtype, device=device)
        self.fmt, self.mac, self.acc_lsb = fmt, mac, acc_lsb
        self.input_block_size = input_block_size
        self.weight_granularity, self.weight_block_size = weight_granularity, weight_block_size
        if weight is not None:
            self.register_buffer("weight", weight)
        self.register_buffer("input_param", input_param)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())
        self.weight_float: Optional[nn.Parameter] = None
        self._warned_frozen = False

    # -- weights ---------------------------------------------------------------------------
    def _encode_weight(self, w: torch.Tensor) -> CodedParts:
        return _encode_weight(w, self.fmt, self.weight_granularity, self.weight_block_size, self._weight_axis)

    def _master(self) -> Optional[torch.Tensor]:
        """The float weight that receives gradients in training (None: weight is frozen)."""
        return self.weight_float

    def _coded_weight(self) -> CodedParts:
        master = self._master()
        if self.training and master is not None:
            return self._encode_weight(master.detach())
        return _mac._coded_parts(self.weight)

    def enable_qat(self) -> "_CodedLayer":
        """Give the layer a float master weight, starting from the dequantized codes."""
        if self.weight_float is None:
            self.weight_float = nn.Parameter(self.weight.dequantize())
        return self

    @torch.no_grad()
    def freeze(self) -> "_CodedLayer":
        """Re-encode the float master (if any) into the stored codes."""
        master = self._master()
        if master is not None:
            self.weight = _as_tensor(self._encode_weight(master.detach()))
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self.freeze()
        return self

    # -- forward ---------------------------------------------------------------------------
    def _encode_input(self, x: torch.Tensor) -> Optional[CodedParts]:
        if isinstance(x, CodedTensor):
            raise TypeError(f"{type(self).__name__} takes float activations (the chip encodes each layer's input)")
        if self.input_param is None:
            return None
        p = self.input_param.reshape([1] * x.dim())
        return CodedParts(encode(x, self.fmt, p), self.fmt, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self._encode_input(x)
        w = self._coded_weight()
        master = self._master() if self.training else None
        with torch.no_grad():
            bias = None if self.bias is None else self.bias.detach()
            y = self._chip(x.detach() if xq is None else xq, w, bias)
        if needs_grad(x, master, self.bias):
            if master is None and self.training and not self._warned_frozen and not torch.compiler.is_compiling():
                self._warned_frozen = True
                warnings.warn(f"{type(self).__name__} has no float master weight, so only its bias and input train; "
                              "convert with qat=True or call enable_qat() to train the weight", stacklevel=2)
            w_deq = _mac._dequantize(w)
            x_deq = x.detach() if xq is None else _mac._dequantize(xq)
            y = self._ste(y, x_deq, w_deq, x, w_deq if master is None else master, self.bias)
        return y

    def _mac_kwargs(self) -> dict:
        kw = {}
        if self.acc_lsb is not None:
            kw["acc_lsb"] = self.acc_lsb
        if self.input_param is None:
            kw["x_block_size"] = self.input_block_size
        return kw

    # -- state -----------------------------------------------------------------------------
    def get_extra_state(self):
        return {"fmt": _format_to_tuple(self.fmt), "mac": (self.mac.conversion, self.mac.accumulator,
                                                             self.mac.lut_bits, self.mac.acc_bits),
                "acc_lsb": self.acc_lsb, "input_block_size": self.input_block_size,
                "weight_granularity": (self.weight_granularity, self.weight_block_size)}

    def _extra_state_mismatch(self, state) -> Optional[str]:
        try:
            fmt, mac = _format_from_tuple(tuple(state["fmt"])), MACConfig(*state["mac"])
        except (KeyError, TypeError, ValueError) as e:
            return f"not a {type(self).__name__} state ({e})"
        if fmt != self.fmt or mac != self.mac:
            return f"state is for {fmt} with {mac}; this {type(self).__name__} is {self.fmt} with {self.mac}"
        return None

    def set_extra_state(self, state) -> None:
        problem = self._extra_state_mismatch(state)
        if problem:
            raise ValueError(problem)
        self.acc_lsb = state["acc_lsb"]
        self.input_block_size = state["input_block_size"]
        self.weight_granularity, self.weight_block_size = tuple(state["weight_granularity"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A coded buffer is replaced, not copied into: its parameters may have another
        # layout, and copy_ has no meaning on codes.
        coded = {k: v for k, v in self._buffers.items() if isinstance(v, CodedTensor)}
        for name, mine in coded.items():
            key = prefix + name
            got = state_dict.get(key)
            if got is None:
                missing_keys.append(key)
            elif not isinstance(got, CodedTensor) or got.fmt != mine.fmt or got.shape != mine.shape:
                error_msgs.append(f"{key}: expected a {mine.fmt} tensor of shape {tuple(mine.shape)}, got "
                                  f"{type(got).__name__} {getattr(got, 'fmt', '')} {tuple(got.shape)}")
            else:
                self._buffers[name] = got.to(mine.device)
        # A format or MAC mismatch is reported like any other state-dict error, under its key.
        extra_key = prefix + "_extra_state"
        hidden = None
        if extra_key in state_dict:
            problem = self._extra_state_mismatch(state_dict[extra_key])
            if problem:
                error_msgs.append(f"{extra_key}: {problem}")
                hidden = state_dict.pop(extra_key)
        held = {k: self._buffers.pop(k) for k in coded}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        finally:
            self._buffers.update(held)
            if hidden is not None:
                state_dict[extra_key] = hidden
                if extra_key in missing_keys:
                    missing_keys.remove(extra_key)
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
        qat = ", qat" if self._master() is not None else ""
        weight = "clustered" if isinstance(self, LNSClusteredConv2d) else self.weight_granularity
        return (f"fmt={self.fmt}, mac={self.mac}, weight={weight}, "
                f"input={_describe_param(self.fmt, self.input_param, self.input_block_size)}{acc}, "
                f"bias={self.bias is not None}{qat}")

    @classmethod
    def _from_config(cls, float_module, weight: torch.Tensor, config, input_param, acc_lsb, qat_master, **geometry):
        config, mac, kw = _layer_settings(cls, config, input_param, acc_lsb)
        coded = _as_tensor(_encode_weight(weight.detach().float(), config.fmt, config.weight_granularity,
                                          config.weight_block_size, cls._weight_axis))
        m = cls(coded, float_module.bias, mac, weight_granularity=config.weight_granularity,
                weight_block_size=config.weight_block_size, **kw, **geometry)
        if qat_master:
            m.weight_float = nn.Parameter(weight.detach().float().clone())
        return m.train(float_module.training)


def _layer_settings(cls, config, input_param, acc_lsb):
    """(config, MAC, constructor kwargs) of a converted layer; clear errors for what is missing."""
    from .convert import ConvertConfig

    config = ConvertConfig() if config is None else config
    fmt = config.fmt
    static = config.activation == "static"
    if static and input_param is None:
        raise ValueError(f"{cls.__name__}.from_float: static activations need input_param (the calibrated "
                         "per-tensor offset or scale); torchlns.convert calibrates it from calibration_data")
    needs_lsb = isinstance(fmt, LNSFormat) and config.mac.accumulator == "fixed"
    if needs_lsb and acc_lsb is None:
        raise ValueError(f"{cls.__name__}.from_float: the fixed accumulator needs acc_lsb; torchlns.convert "
                         "calibrates it from the observed output range")
    if isinstance(input_param, (int, float)):
        input_param = torch.tensor(input_param)
    kw = dict(input_param=input_param if static else None,
              input_block_size=None if static else config.activation_block_size,
              acc_lsb=acc_lsb if needs_lsb else None)
    return config, config.mac if isinstance(fmt, LNSFormat) else IDEAL_MAC, kw


def _encode_weight(w: torch.Tensor, fmt: Format, granularity: str, block_size: Optional[int], axis: int) -> CodedParts:
    """Weight parameters from max|w| (spec section 3's default), and the codes."""
    codes, param, block = encode_compact(w, fmt, granularity, axis if granularity == "block" else None, block_size)
    return CodedParts(codes, fmt, param, *(block or (None, None)))


def _as_tensor(parts: CodedParts) -> CodedTensor:
    block = None if parts.block_axis is None else (parts.block_axis, parts.block_size)
    return CodedTensor._make(parts.codes, parts.param, parts.fmt, block)


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

    def _chip(self, x, w, bias):
        return _mac.lns_linear(x, w, bias, self.mac, fmt=self.fmt, **self._mac_kwargs())

    def _ste(self, y, x_deq, w_deq, x, w, bias):
        return ste_linear(y, x_deq, w_deq, x, w, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + self._extra_repr_tail()


class _LNSConvNd(_CodedLayer):
    _n = 2
    _weight_axis = 1  # per-block weight parameters run along the input channels

    def __init__(self, weight: CodedTensor, bias: Optional[torch.Tensor] = None, mac: MACConfig = IDEAL_MAC, *,
                 stride=1, padding=0, dilation=1, groups: int = 1, **kw):
        super().__init__(weight, bias, mac, **kw)
        n = self._n
        if weight.dim() != n + 2:
            raise ValueError(f"{type(self).__name__} weight must be {n + 2}-D, got shape {tuple(weight.shape)}")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

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
        want = nn.Conv1d if cls._n == 1 else nn.Conv2d
        if not isinstance(conv, want):
            raise TypeError(f"{cls.__name__}.from_float needs an {want.__name__}, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"the chip pads with the zero code; padding_mode={conv.padding_mode!r} is not supported")
        return cls._from_config(conv, conv.weight, config, input_param, acc_lsb, qat, stride=conv.stride,
                                padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def _unbatched(self, x) -> bool:
        return x.dim() == self._n + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._unbatched(x):
            return super().forward(x.unsqueeze(0)).squeeze(0)
        return super().forward(x)

    def _chip(self, x, w, bias):
        fn = _mac.lns_conv1d if self._n == 1 else _mac.lns_conv2d
        return fn(x, w, bias, self.stride, self.padding, self.dilation, self.groups, self.mac, fmt=self.fmt,
                  **self._mac_kwargs())

    def _ste(self, y, x_deq, w_deq, x, w, bias):
        n = self._n
        stride, dilation = _mac._pair(tuple(self.stride), n, "stride"), _mac._pair(tuple(self.dilation), n, "dilation")
        padding = self.padding if isinstance(self.padding, str) else _mac._pair(tuple(self.padding), n, "padding")
        pads = _mac._conv_padding(padding, self.kernel_size, dilation, stride, n)
        return ste_conv(y, x_deq, w_deq, x, w, bias, stride, pads, dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, " + self._extra_repr_tail())


class LNSConv1d(_LNSConvNd):
    """``nn.Conv1d`` on the chip (see Note: converted layer state)."""

    _n = 1


class LNSConv2d(_LNSConvNd):
    """``nn.Conv2d`` on the chip (see Note: converted layer state)."""

    _n = 2


class LNSClusteredConv2d(_LNSConvNd):
    """``ClusteredConv2d`` on the chip: shared LNS centroids, an index and an LNS scale per kernel.

    A kernel's weight codes are its centroid's codes; its scale's log is added to the
    offset (``off_w = off_centroids + E_scale + off_scales``) and its sign flips the codes'
    signs, so the per-kernel scale costs one addition of codes (chip-model.md section 6).
    Scales are stored as ``LNSFormat(max(8, F+2), F)`` codes: 8 bits for LNS8.
    """

    def __init__(self, centroids: CodedTensor, indices: torch.Tensor, kernel_scales: CodedTensor,
                 bias: Optional[torch.Tensor] = None, mac: MACConfig = IDEAL_MAC, *, stride=1, padding=0,
                 dilation=1, groups: int = 1, **kw):
        fmt = centroids.fmt
        if not isinstance(fmt, LNSFormat) or not isinstance(kernel_scales, CodedTensor) \
                or not isinstance(kernel_scales.fmt, LNSFormat):
            raise TypeError("LNSClusteredConv2d holds LNS centroids and LNS kernel scales")
        if kernel_scales.fmt.frac_bits != fmt.frac_bits:
            raise ValueError(f"kernel scales {kernel_scales.fmt} must share frac_bits with the centroids {fmt}")
        if centroids.dim() != 3 or indices.shape != kernel_scales.shape or indices.dim() != 2:
            raise ValueError(f"centroids must be (C, kh, kw) and indices and kernel_scales (out, in/groups); got "
                             f"{tuple(centroids.shape)}, {tuple(indices.shape)}, {tuple(kernel_scales.shape)}")
        if centroids.param.numel() != 1 or kernel_scales.param.numel() != 1:
            raise ValueError("centroids and kernel scales take one per-tensor offset each")
        _CodedLayer.__init__(self, None, bias, mac, fmt=fmt, **kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.register_buffer("centroids", centroids)
        self.register_buffer("indices", indices.to(torch.long))
        self.register_buffer("kernel_scales", kernel_scales)
        self.centroids_float: Optional[nn.Parameter] = None
        self.scales_float: Optional[nn.Parameter] = None
        self._check_offsets(centroids, kernel_scales)

    def _check_offsets(self, centroids, kernel_scales) -> None:
        lo = int(centroids.param) + 1 + int(kernel_scales.param)
        hi = int(centroids.param) + kernel_scales.fmt.e_max + int(kernel_scales.param)
        if lo < self.fmt.offset_min or hi > self.fmt.offset_max:
            raise ValueError(f"kernel offsets span {lo}..{hi}, outside {self.fmt}'s valid {self.fmt.offset_min}.."
                             f"{self.fmt.offset_max}: the kernel scales are too far from the centroids' range")

    def share_centroids(self, other: "LNSClusteredConv2d") -> "LNSClusteredConv2d":
        """Use ``other``'s centroid table (and its float master): network-scope clustering."""
        if other.centroids.fmt != self.centroids.fmt or other.centroids.shape != self.centroids.shape:
            raise ValueError("shared centroids must have the same format and shape")
        self.centroids = other.centroids
        if other.centroids_float is not None or self.centroids_float is not None:
            self.centroids_float = other.centroids_float
        return self

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    @property
    def kernel_size(self) -> Tuple[int, ...]:
        return tuple(self.centroids.shape[1:])

    @property
    def in_channels(self) -> int:
        return self.indices.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.indices.shape[0]

    @property
    def weight(self) -> CodedTensor:
        """The (out, in/groups, kh, kw) LNS weight the chip forms from the stored fields."""
        return _as_tensor(self._assemble(self.centroids, self.kernel_scales))

    def _assemble(self, centroids, kernel_scales) -> CodedParts:
        """Weight codes and per-kernel offsets from coded centroids and scales (tensors or parts)."""
        bits, sbits = self.fmt.bits, kernel_scales.fmt.bits
        c = centroids.codes.to(torch.int32)[self.indices]  # (out, in/g, kh, kw)
        s = kernel_scales.codes.to(torch.int32) & ((1 << sbits) - 1)
        s_mag, s_sign = s & ((1 << (sbits - 1)) - 1), s >> (sbits - 1)
        flip = (s_sign << (bits - 1))[..., None, None]
        c = torch.where((c & ((1 << (bits - 1)) - 1)) != 0, c ^ flip, c)  # zero codes keep their sign (not NaN)
        c = torch.where(s_mag[..., None, None] == 0, 0, c)  # a zero scale zeroes the kernel
        offset = (centroids.param.reshape(()) + kernel_scales.param.reshape(()) + s_mag)[..., None, None]
        return CodedParts(c.to(centroids.codes.dtype), self.fmt, offset.to(torch.int32))

    # -- QAT: the masters are float centroids and scales ----------------------------------
    def _master(self) -> Optional[torch.Tensor]:
        if self.centroids_float is None:
            return None
        return self.scales_float[..., None, None] * self.centroids_float[self.indices]

    def _encode_masters(self):
        centroids = _encode_weight(self.centroids_float.detach(), self.fmt, "tensor", None, 0)
        scales = _encode_weight(self.scales_float.detach(), self.kernel_scales.fmt, "tensor", None, 0)
        if not torch.compiler.is_compiling():  # a data-dependent check: eager only (see codec.py)
            self._check_offsets(centroids, scales)
        return centroids, scales

    def _coded_weight(self) -> CodedParts:
        if self.training and self.centroids_float is not None:
            return self._assemble(*self._encode_masters())
        return self._assemble(self.centroids, self.kernel_scales)

    def enable_qat(self) -> "LNSClusteredConv2d":
        if self.centroids_float is None:
            self.centroids_float = nn.Parameter(self.centroids.dequantize())
            self.scales_float = nn.Parameter(self.kernel_scales.dequantize())
        return self

    @torch.no_grad()
    def freeze(self) -> "LNSClusteredConv2d":
        if self.centroids_float is not None:
            self.centroids, self.kernel_scales = map(_as_tensor, self._encode_masters())
        return self

    @classmethod
    def from_float(cls, conv: ClusteredConv2d, config=None, *, input_param=None, acc_lsb: Optional[int] = None,
                   qat: bool = False) -> "LNSClusteredConv2d":
        """Encode a ``ClusteredConv2d``: centroids per tensor, scales as LNS codes; see ``LNSLinear.from_float``."""
        if not isinstance(conv, ClusteredConv2d):
            raise TypeError(f"LNSClusteredConv2d.from_float needs a ClusteredConv2d, got {type(conv).__name__}")
        config, mac, kw = _layer_settings(cls, config, input_param, acc_lsb)
        fmt = config.fmt
        if not isinstance(fmt, LNSFormat):
            raise TypeError(f"a clustered layer's per-kernel scale is an LNS offset; {fmt} is not LNS "
                            "(convert the reconstructed weight with LNSConv2d.from_float instead)")
        scale_fmt = LNSFormat(max(8, fmt.frac_bits + 2), fmt.frac_bits, fmt.rounding)
        centroids = CodedTensor.from_float(conv.centroids.detach().float(), fmt)
        scales = CodedTensor.from_float(conv.scales.detach().float(), scale_fmt)
        m = cls(centroids, conv.indices, scales, conv.bias, mac, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, **kw)
        if qat:
            m.centroids_float = nn.Parameter(conv.centroids.detach().float().clone())
            m.scales_float = nn.Parameter(conv.scales.detach().float().clone())
        return m.train(conv.training)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_clusters={self.num_clusters}, scales={self.kernel_scales.fmt}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, " + self._extra_repr_tail())
