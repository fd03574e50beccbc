"""The FP8/INT MAC as one float32 matrix product or convolution, in torch ops: its CUDA kernels.

The algorithm is that of the C++ CPU kernels (see Note: the scaled MAC as one float32 product
in csrc/scaled_cpu.cpp): decode the codes to their unscaled values, run one float32
``mm``/``conv2d`` (cuBLAS, cuDNN) on them, which is exact for FP8 products and, below the
2^24 bound, for INT sums, then scale by ``s_x * s_w`` and add the bias in float32. TF32 is
off for the call, so every product stays exact. Written in torch ops, the same code runs on
any device, so CI checks it on the CPU against the reference.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["scaled_mm_dense", "scaled_conv_dense"]

_EXACT_FLOAT32 = 2.0**24  # integer partial sums below it are exact in float32


@contextlib.contextmanager
def _ieee_float32():
    """Full float32 products in cuBLAS and cuDNN (no TF32) inside the block."""
    conv, mm = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = conv, mm


def _values(codes: torch.Tensor, values: Optional[torch.Tensor]) -> torch.Tensor:
    return codes.to(torch.float32) if values is None else values.to(torch.float32)[codes.long()]


def _scale(part: torch.Tensor, scale: torch.Tensor, integer: bool) -> torch.Tensor:
    return ((part + 0.0) if integer else part) * scale  # an integer sum has no -0


def scaled_mm_dense(x, x_scale, x_values, w, w_scale, w_values, bias, x_block: int, w_block: int) -> torch.Tensor:
    """``torchlns::scaled_mm`` with one float32 product per K segment (see the module docstring)."""
    from .reference import _segments

    M, K = x.shape
    N = w.shape[0]
    integer = x_values is None
    vx, vw = _values(x, x_values), _values(w, w_values)
    dtype = torch.float32
    if integer and M and N and K:
        ax, aw = vx.abs(), vw.abs()
        bound = min(float(aw.max()) * float(ax.sum(1, dtype=torch.float64).max()),
                    float(ax.max()) * float(aw.sum(1, dtype=torch.float64).max()))
        dtype = torch.float32 if bound < _EXACT_FLOAT32 else torch.float64
    y = None
    with _ieee_float32():
        for k0, k1 in _segments(K, x_block, w_block):
            part = (vx[:, k0:k1].to(dtype) @ vw[:, k0:k1].to(dtype).T).to(torch.float32)
            scale = x_scale[:, min(k0, x_scale.shape[1] - 1), None] * w_scale[None, :, min(k0, w_scale.shape[1] - 1)]
            part = _scale(part, scale, integer)
            y = part if y is None else y + part
    if y is None:
        y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    return y if bias is None else y + bias


def scaled_conv_dense(x, x_scale, x_values, w, w_scale, w_values, bias, stride: Sequence[int],
                      pad_before: Sequence[int], pad_after: Sequence[int], dilation: Sequence[int],
                      groups: int) -> torch.Tensor:
    """``torchlns::scaled_conv`` as one float32 convolution (see the module docstring)."""
    integer = x_values is None
    vx, vw = _values(x, x_values), _values(w, w_values)
    vx = F.pad(vx, (pad_before[1], pad_after[1], pad_before[0], pad_after[0]))  # the zero code's value is 0
    dtype = torch.float32
    if integer and vx.numel() and vw.numel():
        ax = vx.abs()
        bound = float(ax.max()) * float(vw.abs().reshape(vw.shape[0], -1).sum(1, dtype=torch.float64).max())
        if bound >= _EXACT_FLOAT32:
            field = ax.reshape(ax.shape[0], groups, -1, *ax.shape[2:]).sum(2)
            box = torch.ones(groups, 1, *vw.shape[2:], dtype=ax.dtype, device=ax.device)
            bound = float(vw.abs().max()) * float(F.conv2d(field, box, None, stride, 0, dilation, groups).max())
        dtype = torch.float32 if bound < _EXACT_FLOAT32 else torch.float64
    with _ieee_float32():
        part = F.conv2d(vx.to(dtype), vw.to(dtype), None, stride, 0, dilation, groups).to(torch.float32)
    scale = (x_scale.reshape(1) * w_scale.reshape(-1)).reshape(1, -1, 1, 1)
    y = _scale(part, scale, integer)
    return (y if bias is None else y + bias.reshape(1, -1, 1, 1)).contiguous()
