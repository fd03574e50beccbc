"""Clustered convolutions: ``ClusteredConv2d`` (float) and ``LNSClusteredConv2d`` (on the chip).

See Note: kernel normalisation in transforms/cluster.py for how kernels become centroids,
indices and per-kernel scales (chip-model.md section 6).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.checks import check_values
from ..core.fields import code_fields
from ..core.formats import IDEAL_MAC, LNSFormat, MACConfig
from ..core.geometry import InputPad
from ..tensor import Coded, CodedTensor
from .layers import LNSConv2d, _CodedLayer, _layer_settings, _LNSConvNd
from .swap import register_swap

__all__ = ["ClusteredConv2d", "LNSClusteredConv2d"]


def index_bits(num_clusters: int) -> int:
    """Bits of one stored cluster index: ``ceil(log2 C)``, at least 1 (chip-model.md section 6)."""
    return max(1, math.ceil(math.log2(num_clusters)))


class ClusteredConv2d(nn.Module):
    """A Conv2d whose kernels are ``scales[o, i] · centroids[indices[o, i]]``.

    ``centroids`` (C, kh, kw) and ``scales`` (out, in/groups) are Parameters, so fine-tuning
    by back-propagation moves them; ``indices`` is an integer buffer. With network-scope
    clustering several layers share one ``centroids`` Parameter.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, num_clusters: int, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, centroids: Optional[nn.Parameter] = None):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must divide groups={groups}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        if centroids is None:
            centroids = nn.Parameter(torch.zeros(num_clusters, kh, kw))
        if tuple(centroids.shape) != (num_clusters, kh, kw):
            raise ValueError(f"centroids must have shape {(num_clusters, kh, kw)}, got {tuple(centroids.shape)}")
        self.centroids = centroids
        self.scales = nn.Parameter(torch.zeros(out_channels, in_channels // groups))
        self.register_buffer("indices", torch.zeros(out_channels, in_channels // groups, dtype=torch.long))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.input_pad: Optional[InputPad] = None  # a "same"-padding conv's own pad (transforms/graph.py)

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    @property
    def index_bits(self) -> int:
        """Bits of one stored index: ``ceil(log2 C)`` (at least 1)."""
        return index_bits(self.num_clusters)

    @property
    def weight(self) -> torch.Tensor:
        """The reconstructed (out, in/groups, kh, kw) weight; differentiable in centroids and scales."""
        return self.scales[..., None, None] * self.centroids[self.indices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_pad is not None:
            x = F.pad(x, self.input_pad.amounts(x, self.kernel_size, self.stride, self.dilation))
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, centroids: Union[torch.Tensor, nn.Parameter], indices: torch.Tensor,
                   scales: torch.Tensor, input_pad: Optional[InputPad] = None) -> "ClusteredConv2d":
        """Wrap ``conv``'s geometry and bias around given centroids, indices and scales.

        Pass an ``nn.Parameter`` as ``centroids`` to share it with other layers; ``input_pad``
        is the pad a "same"-padding conv applies in its forward.
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_float needs an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding clusters, got padding_mode={conv.padding_mode!r}")
        shared = centroids if isinstance(centroids, nn.Parameter) else nn.Parameter(centroids.detach().clone())
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, shared.shape[0], conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, centroids=shared)
        if indices.shape != m.indices.shape or scales.shape != m.scales.shape:
            raise ValueError(f"indices and scales must have shape {tuple(m.indices.shape)}")
        with torch.no_grad():
            m.indices.copy_(indices)
            m.scales.copy_(scales)
            if conv.bias is not None:
                m.bias.copy_(conv.bias)
        m.input_pad = input_pad
        return m.to(device=conv.weight.device, dtype=conv.weight.dtype).train(conv.training)

    def to_dense(self) -> nn.Conv2d:
        """The ``nn.Conv2d`` with the reconstructed weight (for formats without per-kernel log offsets);
        it does not pad its input (``input_pad`` is the caller's to apply)."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=self.bias is not None).to(self.centroids.device)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        pad = f", input_pad={self.input_pad}" if self.input_pad is not None else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_clusters={self.num_clusters}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}{pad}")


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
    def index_bits(self) -> int:
        return index_bits(self.num_clusters)

    @property
    def in_channels(self) -> int:
        return self.indices.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.indices.shape[0]

    @property
    def weight(self) -> CodedTensor:
        """The (out, in/groups, kh, kw) LNS weight the chip forms from the stored fields."""
        return self._assemble(self.centroids, self.kernel_scales).tensor()

    def _weight_description(self) -> str:
        return "clustered"

    def _assemble(self, centroids, kernel_scales) -> Coded:
        """Weight codes and per-kernel offsets from coded centroids and scales (tensors or operands)."""
        c = centroids.codes.to(torch.int32)[self.indices]  # (out, in/g, kh, kw)
        c_mag, _ = code_fields(c, self.fmt.bits)
        s_mag, s_negative = code_fields(kernel_scales.codes, kernel_scales.fmt.bits)
        flip = (s_negative.to(torch.int32) << (self.fmt.bits - 1))[..., None, None]
        c = torch.where(c_mag != 0, c ^ flip, c)  # zero codes keep their sign (not NaN)
        c = torch.where(s_mag[..., None, None] == 0, 0, c)  # a zero scale zeroes the kernel
        offset = (centroids.param.reshape(()) + kernel_scales.param.reshape(()) + s_mag)[..., None, None]
        return Coded(c.to(centroids.codes.dtype), offset.to(torch.int32), self.fmt)

    # -- QAT: the masters are float centroids and scales ----------------------------------
    def _master(self) -> Optional[torch.Tensor]:
        if self.centroids_float is None:
            return None
        return self.scales_float[..., None, None] * self.centroids_float[self.indices]

    def _encode_masters(self):
        centroids = Coded.encode(self.centroids_float.detach(), self.fmt)
        scales = Coded.encode(self.scales_float.detach(), self.kernel_scales.fmt)
        if check_values():  # a data-dependent check: eager only
            self._check_offsets(centroids, scales)
        return centroids, scales

    def _coded_weight(self) -> Coded:
        if self.training and self.centroids_float is not None:
            return self._assemble(*self._encode_masters())
        return self._assemble(self.centroids, self.kernel_scales)

    def enable_qat(self, train_forward: Optional[str] = None) -> "LNSClusteredConv2d":
        if self.centroids_float is None:
            self.centroids_float = nn.Parameter(self.centroids.dequantize())
            self.scales_float = nn.Parameter(self.kernel_scales.dequantize())
        if train_forward is not None:
            self.set_train_forward(train_forward)
        return self

    @torch.no_grad()
    def freeze(self) -> "LNSClusteredConv2d":
        if self.centroids_float is not None:
            self.centroids, self.kernel_scales = (c.tensor() for c in self._encode_masters())
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
        m.set_input_pad(conv.input_pad)
        return m.train(conv.training)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_clusters={self.num_clusters}, scales={self.kernel_scales.fmt}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, " + self._extra_repr_tail())


@register_swap(ClusteredConv2d)
def _swap_clustered(conv: ClusteredConv2d, config, *, input_param=None, acc_lsb=None, qat: bool = False,
                    memo: dict) -> nn.Module:
    """A clustered conv on the chip; layers that shared a centroid table share its codes after conversion."""
    kw = dict(input_param=input_param, acc_lsb=acc_lsb, qat=qat)
    if not isinstance(config.fmt, LNSFormat):  # FP8/INT have no per-kernel log offsets
        return LNSConv2d.from_float(conv.to_dense(), config, **kw).set_input_pad(conv.input_pad)
    new = LNSClusteredConv2d.from_float(conv, config, **kw)
    first = memo.setdefault(("centroids", id(conv.centroids)), new)
    if first is not new and first.fmt == new.fmt:
        new.share_centroids(first)
    return new
