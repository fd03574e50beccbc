"""Parameter layout: how offsets and scales sit beside their codes (chip-model.md section 3).

# Note: parameter layout
An offset (LNS) or scale (FP8/INT) tensor belonging to a tensor of shape ``S`` has the same
number of dims as ``S``. Each dim is 1 (shared), ``S[d]`` (one per index, e.g. per channel),
or, on at most one ``block_axis``, ``ceil(S[d] / block_size)`` (one per block; the last block
may be shorter). This is the *compact* layout that coded tensors store and state dicts save.
``expand_param`` turns it into one that broadcasts against ``S``, which is what the encode
and decode ops take.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .checks import as_float32

GRANULARITIES = ("tensor", "channel", "block")


def norm_axis(axis: int, nd: int) -> int:
    if not -nd <= axis < nd:
        raise ValueError(f"axis {axis} is out of range for a tensor with {nd} dims")
    return axis % nd


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"granularity='block' needs a positive int block_size, got {block_size!r}")
    return block_size


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected 'tensor', 'channel' or 'block'")
    return granularity


def expand_param(param: torch.Tensor, block_axis: Optional[int], block_size: Optional[int], length: int) -> torch.Tensor:
    """Compact per-block parameters -> broadcastable ones (repeat each block, cut to length)."""
    if block_axis is None:
        return param
    return param.repeat_interleave(block_size, dim=block_axis).narrow(block_axis, 0, length)


def compact_shape(shape: torch.Size, granularity: str, axis: Optional[int], block_size: Optional[int]) -> List[int]:
    """The compact parameter shape of data of ``shape`` (``axis`` already normalised for blocks)."""
    nd = len(shape)
    if check_granularity(granularity) == "tensor":
        return [1] * nd
    if granularity == "channel":
        ax = norm_axis(0 if axis is None else axis, nd)
        return [shape[d] if d == ax else 1 for d in range(nd)]
    return [-(-shape[d] // block_size) if d == axis else shape[d] for d in range(nd)]


def amax(x: torch.Tensor, granularity: str = "tensor", axis: Optional[int] = None, block_size: Optional[int] = None) -> torch.Tensor:
    """max|x| in the compact layout of the granularity, ignoring NaN and ±inf.

    ±inf is ignored as well as NaN: it saturates whatever the offset, and counting it would
    push every finite value of the group into underflow.
    """
    x = as_float32(x)
    nd = x.dim()
    # The fast path branches on the data, which torch.compile cannot trace into one graph.
    if granularity == "block" and nd and x.numel() and not torch.compiler.is_compiling():
        fast = _block_amax_finite(x, axis, block_size)
        if fast is not None:
            return fast
    a = x.abs()
    a = torch.where(torch.isfinite(a), a, 0.0)
    if granularity == "tensor":
        return (a.amax() if a.numel() else a.new_zeros(())).reshape([1] * nd)
    check_granularity(granularity)
    if nd == 0:
        raise ValueError(f"granularity={granularity!r} needs a tensor with at least one dim")
    if granularity == "channel":
        ax = norm_axis(0 if axis is None else axis, nd)
        others = [d for d in range(nd) if d != ax]
        return a.amax(dim=others, keepdim=True) if others else a.clone()
    ax = norm_axis(-1 if axis is None else axis, nd)
    bs = check_block_size(block_size)
    n = a.shape[ax]
    nb = -(-n // bs)
    a = a.movedim(ax, -1)
    a = torch.nn.functional.pad(a, (0, nb * bs - n))
    return a.reshape(*a.shape[:-1], nb, bs).amax(-1).movedim(-1, ax)


def _block_amax_finite(x: torch.Tensor, axis: Optional[int], block_size: Optional[int]) -> Optional[torch.Tensor]:
    """Block max|x| in one pass of min/max reductions (no |x| or mask tensor), or None when a
    block holds NaN or ±inf: those blocks need the masking path (dynamic activations run this
    on every forward, and the masked form reads and writes the whole operand three times)."""
    ax = norm_axis(-1 if axis is None else axis, x.dim())
    bs = check_block_size(block_size)
    n = x.shape[ax]
    nb = -(-n // bs)
    a = x.movedim(ax, -1)
    if nb * bs != n:
        a = torch.nn.functional.pad(a, (0, nb * bs - n))
    lo, hi = torch.aminmax(a.reshape(*a.shape[:-1], nb, bs), dim=-1)
    m = torch.maximum(hi, lo.neg())
    if not bool(torch.isfinite(m).all()):
        return None
    return m.movedim(-1, ax)


def compress(param: torch.Tensor, keep: tuple = ()) -> torch.Tensor:
    """Shrink every dim along which ``param`` is constant back to size 1."""
    for d in range(param.dim()):
        if d in keep or param.shape[d] == 1:
            continue
        first = param.narrow(d, 0, 1)
        if torch.equal(param, first.expand_as(param)):
            param = first
    return param.contiguous()
