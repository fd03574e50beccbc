"""Argument checks shared by every layer above the kernels.

# Note: eager-only value checks
Checks that read tensor values (offset ranges, code ranges, NaN in INT input) run in eager
mode only: under torch.compile they would break the graph. Compiled code is therefore
validated by running it eagerly once, which every model conversion does. Checks of dtypes,
shapes and Python arguments run in both modes.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_values() -> bool:
    """Whether value-reading checks run here (see Note: eager-only value checks)."""
    return not torch.compiler.is_compiling()


def check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    return value


def as_float32(x, what: str = "x") -> torch.Tensor:
    """A float tensor of any dtype, rounded to float32 (spec section 1); coded tensors are refused."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if hasattr(x, "codes") and type(x) is not torch.Tensor:
        raise TypeError(f"{what} is already encoded ({type(x).__name__}); call .dequantize() first")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} has dtype {x.dtype}; torchlns encodes float16, bfloat16, float32 or float64 "
            "(converted to float32 first)"
        )
    return x.to(torch.float32)


def check_broadcast(param: torch.Tensor, shape: torch.Size, what: str) -> None:
    try:
        out = torch.broadcast_shapes(param.shape, shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise ValueError(f"{what} of shape {tuple(param.shape)} does not broadcast against the data shape {tuple(shape)}")


def value_range(t: torch.Tensor) -> tuple:
    """(min, max) of an integer tensor as Python ints; (0, 0) when empty."""
    if not t.numel():
        return 0, 0
    lo, hi = t.aminmax()
    return int(lo), int(hi)
