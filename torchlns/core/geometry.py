"""Convolution geometry: argument normalisation, output sizes and im2col (chip-model.md section 4).

A convolution is the MAC over each receptive field. These helpers say which input element
meets which weight tap; they do no arithmetic on values, so the functional layer, the
reference kernel and the fake kernel share them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


def ntuple(v, n: int, what: str, minimum: int | None = None) -> tuple:
    """An int or a sequence of ``n`` ints as an ``n``-tuple, each at least ``minimum``, with an error naming ``what``."""
    if isinstance(v, int) and not isinstance(v, bool):
        t = (v,) * n
    elif isinstance(v, (tuple, list)) and len(v) == n and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        t = tuple(v)
    else:
        raise ValueError(f"{what} must be an int or a tuple of {n} ints, got {v!r}")
    if minimum is not None and min(t) < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {v!r}")
    return t


def conv_padding(padding, kernel: Sequence[int], dilation: Sequence[int], stride: Sequence[int],
                 n: int) -> List[Tuple[int, int]]:
    """(before, after) padding per spatial dim; 'same' pads the extra element after, as torch."""
    if padding == "valid":
        return [(0, 0)] * n
    if isinstance(padding, list) and len(padding) == n and all(isinstance(p, tuple) and len(p) == 2 for p in padding):
        pairs = [(int(a), int(b)) for a, b in padding]  # explicit (before, after) pairs
        if min(min(p) for p in pairs) < 0:
            raise ValueError(f"padding must be >= 0, got {padding!r}")
        return pairs
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is not supported for strided convolutions")
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in total]
    return [(p, p) for p in ntuple(padding, n, "padding", minimum=0)]


def conv_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_shape(H: int, W: int, kernel, stride, padding, dilation) -> tuple:
    """(Ho, Wo) of a 2-D convolution with (before, after) ``padding``; an error if it is empty."""
    (ph0, ph1), (pw0, pw1) = padding
    Ho = conv_output_size(H, kernel[0], stride[0], ph0, ph1, dilation[0])
    Wo = conv_output_size(W, kernel[1], stride[1], pw0, pw1, dilation[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"input {H}x{W} is smaller than the dilated kernel after padding")
    return Ho, Wo


def im2col_index(H: int, W: int, kernel, stride, padding, dilation, device):
    """Flat input index of each (tap, output position), or H*W for padding (the zero code)."""
    (ph0, _), (pw0, _) = padding
    Ho, Wo = conv_output_shape(H, W, kernel, stride, padding, dilation)
    ih = torch.arange(kernel[0], device=device)[:, None] * dilation[0] + torch.arange(Ho, device=device)[None, :] * stride[0] - ph0
    iw = torch.arange(kernel[1], device=device)[:, None] * dilation[1] + torch.arange(Wo, device=device)[None, :] * stride[1] - pw0
    valid = ((ih >= 0) & (ih < H))[:, None, :, None] & ((iw >= 0) & (iw < W))[None, :, None, :]
    flat = ih[:, None, :, None] * W + iw[None, :, None, :]
    idx = torch.where(valid, flat, H * W)  # (kh, kw, Ho, Wo)
    return idx.reshape(kernel[0] * kernel[1], Ho * Wo), Ho, Wo


def im2col(t: torch.Tensor, idx: torch.Tensor, pad_value) -> torch.Tensor:
    """(N, C, H, W) -> (N*L, C*kh*kw) columns in PyTorch's (c, i, j) order; padding is ``pad_value``."""
    N, C, H, W = t.shape
    flat = torch.cat([t.reshape(N, C, H * W), t.new_full((N, C, 1), pad_value)], dim=2)
    cols = flat[:, :, idx]  # (N, C, taps, L)
    return cols.permute(0, 3, 1, 2).reshape(N * idx.shape[1], C * idx.shape[0])


def cols_to_image(y: torch.Tensor, N: int, Ho: int, Wo: int) -> torch.Tensor:
    """(N*L, Cout) rows of an im2col product -> a contiguous (N, Cout, Ho, Wo) image."""
    return y.reshape(N, Ho * Wo, y.shape[-1]).permute(0, 2, 1).reshape(N, y.shape[-1], Ho, Wo).contiguous()


def stack_depth(t: torch.Tensor, kd: int, pad: Tuple[int, int], stride: int, dilation: int, fill) -> tuple:
    """(N, C, D, H, W) -> ((N*Do, C*kd, H, W), Do): each output depth's kd taps as channels.

    The taps of channel ``c`` are channels ``c*kd .. c*kd + kd - 1``, PyTorch's (c, a) order of
    a Conv3d weight, so the weight viewed as (Cout, Cin/groups*kd, kh, kw) convolves the
    stack in 2-D with the same products. Depth padding is ``fill``.
    """
    p0, p1 = pad
    span = dilation * (kd - 1) + 1
    t = torch.nn.functional.pad(t, (0, 0, 0, 0, p0, p1), value=fill) if p0 or p1 else t
    if t.shape[2] < span:
        raise ValueError(f"input depth {t.shape[2] - p0 - p1} is smaller than the dilated kernel after padding")
    t = t.unfold(2, span, stride)[..., ::dilation]  # (N, C, Do, H, W, kd)
    N, C, Do, H, W = t.shape[:5]
    return t.permute(0, 2, 1, 5, 3, 4).reshape(N * Do, C * kd, H, W), Do


def tf_same_pads(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                 dilation: Sequence[int]) -> Tuple[int, ...]:
    """TensorFlow's 'SAME' padding of an input of spatial ``size``, in ``F.pad`` order (last dim first).

    Output ``ceil(i / s)``; the total ``max((o - 1) s + (k - 1) d + 1 - i, 0)`` is split with
    the odd element after, as TensorFlow (and timm's ``Conv2dSame``) do. Integer arithmetic
    only, so it also runs on the symbolic sizes of a compiled graph.
    """
    pads: List[int] = []
    for i, k, s, d in reversed(list(zip(size, kernel, stride, dilation))):
        o = -(-i // s)
        total = max((o - 1) * s + (k - 1) * d + 1 - i, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


@dataclass(frozen=True)
class InputPad:
    """Zero padding a layer applies to its float input before its MAC, as real model code does.

    "Same"-padding convs (the EfficientNet wheels' ``Conv2dStaticSamePadding`` and
    ``Conv2dDynamicSamePadding``, timm's ``Conv2dSame``) pad in their ``forward`` and then call
    the base conv. Either ``pads`` is fixed (``F.pad`` order, last dim first) or ``same`` is
    True and the pads are TensorFlow's 'SAME' for each input's size (``tf_same_pads``). Zeros
    encode to the zero code in every format, so padding the float input first gives the bits
    of a chip that pads with zero codes.
    """

    pads: Optional[Tuple[int, ...]] = None
    same: bool = False

    def __post_init__(self):
        if self.same == (self.pads is not None):
            raise ValueError("InputPad takes either fixed pads or same=True")
        if self.pads is not None:
            if not (isinstance(self.pads, tuple) and len(self.pads) % 2 == 0 and self.pads
                    and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in self.pads)):
                raise ValueError(f"pads must be a non-empty tuple of an even number of ints >= 0, got {self.pads!r}")

    def amounts(self, x: torch.Tensor, kernel=None, stride=None, dilation=None) -> Tuple[int, ...]:
        """The ``F.pad`` amounts for input ``x`` (the geometry is the conv's, for ``same``)."""
        if not self.same:
            return self.pads
        n = len(kernel)
        return tf_same_pads(tuple(x.shape[-n:]), kernel, ntuple(stride, n, "stride"), ntuple(dilation, n, "dilation"))

    def to_json(self):
        return "same" if self.same else list(self.pads)

    @classmethod
    def from_json(cls, v) -> "InputPad":
        if v == "same":
            return cls(same=True)
        if not isinstance(v, list):
            raise ValueError(f"input_pad must be 'same' or a list of ints, got {v!r}")
        return cls(pads=tuple(v))

    def __str__(self) -> str:
        return "TF 'same'" if self.same else f"pads {self.pads}"
