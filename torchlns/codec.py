"""Public encode / decode / calibrate for every format (chip-model.md sections 1, 3 and 5).

Each function validates its arguments, asks the format for its op and the op's extra
arguments (see Note: formats carry their behaviour in core/formats.py) and calls the
``torchlns::`` op, whose kernels are exact on every backend. Parameters follow Note:
parameter layout in core/layout.py.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .core.checks import as_float32
from .core.formats import Format, LNSFormat
from .core.layout import amax, expand_param
from .ops import library as _library  # noqa: F401  (declares the ops called here)

__all__ = ["encode", "decode", "calibrate", "default_offset", "default_scale", "expand_param", "amax"]

ParamLike = Union[int, float, torch.Tensor]
_OPS = torch.ops.torchlns


def check_format(fmt) -> Format:
    if not isinstance(fmt, Format):
        raise TypeError(f"fmt must be an LNSFormat, FP8Format or IntFormat, got {type(fmt).__name__}")
    return fmt


def encode(x: torch.Tensor, fmt: Format, offset_or_scale: ParamLike) -> torch.Tensor:
    """Encode ``x`` to codes of ``fmt`` (exact, spec sections 1 and 5).

    ``offset_or_scale`` is an int offset (LNS) or a float scale (FP8/INT), or a tensor of
    them that broadcasts against ``x``. Inputs of any float dtype are rounded to float32 first.
    """
    check_format(fmt)
    x = as_float32(x)
    param = fmt.check_param(offset_or_scale, x.shape, x.device)
    fmt.check_input(x)
    return getattr(_OPS, fmt.encode_op)(x, param, *fmt.encode_args(x.device))


def decode(codes: torch.Tensor, fmt: Format, offset_or_scale: ParamLike) -> torch.Tensor:
    """Decode codes of ``fmt`` to float32 (exact, spec sections 1 and 5)."""
    check_format(fmt)
    codes = fmt.check_codes(codes)
    param = fmt.check_param(offset_or_scale, codes.shape, codes.device)
    return getattr(_OPS, fmt.decode_op)(codes, param, *fmt.decode_args(codes.device))


def calibrate(x: torch.Tensor, fmt: Format, granularity: str = "tensor", axis: Optional[int] = None,
              block_size: Optional[int] = None) -> torch.Tensor:
    """Default offset (LNS, int32) or scale (FP8/INT, float32) from max|x|, ignoring NaN.

    Returned in the compact layout (see Note: parameter layout in core/layout.py): same dims as ``x``.
    """
    check_format(fmt)
    return fmt.param_from_amax(amax(x, granularity, axis, block_size))


def default_offset(x: torch.Tensor, fmt: LNSFormat) -> int:
    """Per-tensor default offset as a Python int (``g(max|x|) - E_max``)."""
    if not isinstance(fmt, Format) or fmt.param_name != "offset":
        raise TypeError(f"default_offset needs an LNSFormat, got {fmt!r}; use default_scale for FP8/INT")
    return int(calibrate(x, fmt).reshape(()))


def default_scale(x: torch.Tensor, fmt: Format) -> float:
    """Per-tensor default scale as a Python float (``max|x| / max code value``)."""
    if not isinstance(fmt, Format) or fmt.param_name != "scale":
        raise TypeError(f"default_scale needs an FP8Format or IntFormat, got {fmt!r}; use default_offset for LNS")
    return float(calibrate(x, fmt).reshape(()))
