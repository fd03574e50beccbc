"""Task metrics for judging a converted model: segmentation, classification, boxes, SQNR.

# Note: label conventions
* A prediction is either integer labels of the target's shape, or float logits with the
  class dimension at dim 1 (``(N, C, ...)`` for a target ``(N, ...)``), reduced by argmax.
  Float predictions of the target's own shape are refused: rounding them would hide a
  missing argmax.
* ``ConfusionMatrix.matrix[t, p]`` counts positions with target ``t`` and prediction ``p``
  (rows are targets). Positions whose target is ``ignore_index`` are skipped, whatever was
  predicted there; every other target, and every prediction at a counted position, must lie
  in ``[0, num_classes)`` (``ValueError`` otherwise). An ``ignore_index`` inside that range
  is allowed: its row stays empty, but predicting it still counts against the other classes.
* ``iou()`` is NaN for a class absent from both targets and predictions (its union is 0);
  ``mean_iou()`` averages the other classes, and is NaN when nothing was counted. Accuracies
  over zero counted positions are NaN too.
* The matrix follows the data's device unless ``device=`` pins it (pin it to the process
  group's device for ``all_reduce``: CUDA for NCCL, CPU for gloo).

# Note: box conventions
* ``box_iou``: ``(x1, y1, x2, y2)`` with ``x2 >= x1`` and ``y2 >= y1``.
* ``box3d_iou_aligned``: ``(cx, cy, cz, dx, dy, dz)``, centre and full size.
* ``bev_iou`` / ``box3d_iou``: ``(cx, cy, dx, dy, yaw)`` / ``(cx, cy, cz, dx, dy, dz, yaw)``,
  yaw in radians counterclockwise about z, ``dx`` along the box's own x axis at yaw 0.
  ``bev_iou`` also takes the 7-column form and reads columns 0, 1, 3, 4, 6.
* Sizes must be non-negative. A pair whose union is empty (degenerate boxes) has IoU 0.
  Results are ``(N, M)`` in the inputs' floating dtype (the default dtype for integer boxes).

# Note: rotated intersection
The BEV intersection is exact up to rounding: box 1 is moved into box 2's frame, where box 2
is the axis-aligned rectangle ``|u| <= dx/2, |v| <= dy/2``, and clipped by its four sides
(Sutherland–Hodgman), every pair at once in fixed buffers of 8 vertices (two convex
quadrilaterals meet in at most 8); the shoelace formula gives the area. It runs in float64.
A vertex within ``1e-10`` of the pair's size outside a side counts as inside, so shared
edges and corners (identical boxes, quarter turns) neither flicker in and out nor add
spurious vertices; that moves the area by at most that tolerance times the perimeter. Only
pairs whose axis-aligned bounding boxes overlap are clipped, in chunks of bounded memory.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .tensor import CodedTensor

__all__ = [
    "ConfusionMatrix",
    "mean_iou",
    "pixel_accuracy",
    "top1_accuracy",
    "box_iou",
    "box3d_iou_aligned",
    "bev_iou",
    "box3d_iou",
    "sqnr",
    "agreement",
]

_MAX_VERTICES = 8
_CLIP_TOL = 1e-10  # relative to the pair's size; float64 rounding is ~1e-16 of it
_PAIR_CHUNK = 1 << 18  # pairs clipped at once: ~0.5 GB of float64 temporaries at most


# ---------------------------------------------------------------------------------------
# labels


def _check_tensor(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def _is_integer(x: torch.Tensor) -> bool:
    return not (x.dtype.is_floating_point or x.dtype.is_complex)


def _labels(pred: torch.Tensor, target: torch.Tensor, num_classes: Optional[int] = None,
            pred_name: str = "pred", target_name: str = "target") -> torch.Tensor:
    """Integer labels of ``target``'s shape from labels or (N, C, ...) logits (see Note: label conventions)."""
    _check_tensor(pred, pred_name)
    _check_tensor(target, target_name)
    if not _is_integer(target):
        raise TypeError(f"{target_name} must hold integer labels, got dtype {target.dtype}")
    if pred.dtype.is_complex:
        raise TypeError(f"{pred_name} must be integer labels or real logits, got dtype {pred.dtype}")
    if pred.dtype.is_floating_point:
        if pred.dim() != target.dim() + 1 or pred.dim() < 2:
            raise ValueError(
                f"float {pred_name} must be logits of shape (N, C, ...) for {target_name} of shape (N, ...); "
                f"got {pred_name} {tuple(pred.shape)} and {target_name} {tuple(target.shape)} "
                f"(pass integer labels if {pred_name} is already argmaxed)"
            )
        if num_classes is not None and pred.shape[1] != num_classes:
            raise ValueError(f"logits have {pred.shape[1]} classes at dim 1, expected num_classes={num_classes}")
        pred = pred.argmax(dim=1)
    if pred.shape != target.shape:
        raise ValueError(
            f"{pred_name} shape {tuple(pred.shape)} does not match {target_name} shape {tuple(target.shape)}")
    return pred


def _counted(target: torch.Tensor, ignore_index: Optional[int]) -> Optional[torch.Tensor]:
    return None if ignore_index is None else target != ignore_index


def _check_index(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")


# ---------------------------------------------------------------------------------------
# segmentation and classification


class ConfusionMatrix:
    """A ``num_classes × num_classes`` int64 count of (target, prediction) pairs (see Note: label conventions)."""

    def __init__(self, num_classes: int, ignore_index: Optional[int] = None, device=None):
        _check_index(num_classes, "num_classes")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        _check_index(ignore_index, "ignore_index", allow_none=True)
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self._pinned = device is not None
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
                f"count={int(self.matrix.sum())}, device={self.matrix.device})")

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> "ConfusionMatrix":
        """Count one batch: ``pred`` labels of ``target``'s shape, or logits (N, C, ...) for target (N, ...)."""
        c = self.num_classes
        pred = _labels(pred, target, c)
        if pred.device != target.device:
            raise ValueError(f"pred is on {pred.device} but target is on {target.device}")
        t, p = target.reshape(-1).long(), pred.reshape(-1).long()
        counted = _counted(t, self.ignore_index)
        bad_t = (t < 0) | (t >= c)
        bad_p = (p < 0) | (p >= c)
        if counted is not None:
            bad_t, bad_p = bad_t & counted, bad_p & counted
        # one host sync for both checks
        any_bad_t, any_bad_p = torch.stack([bad_t.any(), bad_p.any()]).tolist()
        if any_bad_t:
            v = t[bad_t][0].item()
            raise ValueError(f"target label {v} is outside [0, {c}) and is not ignore_index={self.ignore_index}")
        if any_bad_p:
            v = p[bad_p][0].item()
            raise ValueError(f"predicted label {v} is outside [0, num_classes={c})")
        # ignored positions go to an extra bin that is dropped: no boolean compaction (and its sync)
        idx = t * c + p
        if counted is not None:
            idx = torch.where(counted, idx, c * c)
        counts = torch.bincount(idx, minlength=c * c + 1)[: c * c].view(c, c)
        if not self._pinned and self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts.to(self.matrix.device)
        return self

    def iou(self) -> torch.Tensor:
        """Per-class IoU (float64); NaN where the class is in neither targets nor predictions."""
        m = self.matrix.double()
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))

    def mean_iou(self) -> float:
        """Mean IoU over the classes with a non-empty union; NaN if there are none."""
        return torch.nanmean(self.iou()).item()

    def pixel_accuracy(self) -> float:
        """Correct over counted positions; NaN if nothing was counted."""
        total = self.matrix.sum().item()
        return self.matrix.diagonal().sum().item() / total if total else math.nan

    def reset(self) -> "ConfusionMatrix":
        self.matrix.zero_()
        return self

    def merge(self, other: Union["ConfusionMatrix", torch.Tensor]) -> "ConfusionMatrix":
        """Add another ``ConfusionMatrix`` (same ``num_classes``) or a (C, C) count tensor."""
        m = other.matrix if isinstance(other, ConfusionMatrix) else other
        _check_tensor(m, "other")
        if m.shape != self.matrix.shape:
            raise ValueError(f"cannot merge a {tuple(m.shape)} matrix into a {tuple(self.matrix.shape)} one "
                             f"(num_classes={self.num_classes})")
        if isinstance(other, ConfusionMatrix) and other.ignore_index != self.ignore_index:
            raise ValueError(f"cannot merge matrices with ignore_index {other.ignore_index} and {self.ignore_index}")
        if not _is_integer(m):
            raise TypeError(f"counts must be integers, got dtype {m.dtype}")
        self.matrix += m.to(self.matrix.device, torch.int64)
        return self

    def all_reduce(self, group=None) -> "ConfusionMatrix":
        """Sum the matrix over the processes of ``group``; a no-op without an initialized process group."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM, group=group)
        return self


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: Optional[int] = None) -> float:
    """``ConfusionMatrix(num_classes, ignore_index).update(pred, target).mean_iou()``."""
    _check_tensor(target, "target")
    return ConfusionMatrix(num_classes, ignore_index, device=target.device).update(pred, target).mean_iou()


@torch.no_grad()
def pixel_accuracy(pred: torch.Tensor, target: torch.Tensor, ignore_index: Optional[int] = None) -> float:
    """Fraction of positions (those whose target is not ``ignore_index``) predicted right; NaN if none."""
    _check_index(ignore_index, "ignore_index", allow_none=True)
    pred = _labels(pred, target)
    correct = pred == target
    # compared as int64, as in ConfusionMatrix: uint8 == -1 would wrap to 255
    counted = _counted(target.long(), ignore_index)
    if counted is None:
        n, hits = target.numel(), correct.sum().item()
    else:
        n, hits = torch.stack([counted.sum(), (correct & counted).sum()]).tolist()
    return hits / n if n else math.nan


@torch.no_grad()
def top1_accuracy(logits_or_pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy of logits (N, C) or integer predictions (N,) against labels (N,); NaN if N = 0."""
    _check_tensor(target, "target")
    if target.dim() != 1:
        raise ValueError(f"target must have shape (N,), got {tuple(target.shape)}")
    pred = _labels(logits_or_pred, target, pred_name="logits_or_pred")
    n = target.numel()
    return (pred == target).sum().item() / n if n else math.nan


@torch.no_grad()
def agreement(pred_a: torch.Tensor, pred_b: torch.Tensor, ignore_mask: Optional[torch.Tensor] = None) -> float:
    """Fraction of positions where two predictions agree, leaving out those where ``ignore_mask`` is True.

    Each prediction is integer labels, or float logits (N, C, ...) reduced by argmax over dim
    1; after that both (and ``ignore_mask``) must have one shape. NaN if no position counts.
    """
    labels = []
    for x, name in ((pred_a, "pred_a"), (pred_b, "pred_b")):
        _check_tensor(x, name)
        if x.dtype.is_complex:
            raise TypeError(f"{name} must be integer labels or real logits, got dtype {x.dtype}")
        if x.dtype.is_floating_point:
            if x.dim() < 2:
                raise ValueError(f"float {name} must be logits of shape (N, C, ...), got {tuple(x.shape)}")
            x = x.argmax(dim=1)
        labels.append(x)
    a, b = labels
    if a.shape != b.shape:
        raise ValueError(f"pred_a labels have shape {tuple(a.shape)} but pred_b labels have {tuple(b.shape)}")
    same = a == b
    if ignore_mask is None:
        n, hits = same.numel(), same.sum().item()
    else:
        _check_tensor(ignore_mask, "ignore_mask")
        if ignore_mask.dtype != torch.bool:
            raise TypeError(f"ignore_mask must be a bool tensor, got dtype {ignore_mask.dtype}")
        if ignore_mask.shape != a.shape:
            raise ValueError(
                f"ignore_mask shape {tuple(ignore_mask.shape)} does not match the labels' {tuple(a.shape)}")
        keep = ~ignore_mask
        n, hits = torch.stack([keep.sum(), (same & keep).sum()]).tolist()
    return hits / n if n else math.nan


# ---------------------------------------------------------------------------------------
# signal


@torch.no_grad()
def sqnr(test: torch.Tensor, reference: torch.Tensor) -> float:
    """``10·log10(Σ ref² / Σ (test − ref)²)`` in dB, in float64.

    +inf when identical; -inf for an all-zero reference that ``test`` misses. Coded tensors
    (``LNSTensor`` etc.) are compared by their decoded values.
    """
    _check_tensor(test, "test")
    _check_tensor(reference, "reference")
    # coded tensors refuse arithmetic on their codes (tensor.py); compare their values
    test, reference = (x.dequantize() if isinstance(x, CodedTensor) else x for x in (test, reference))
    if test.shape != reference.shape:
        raise ValueError(f"test shape {tuple(test.shape)} does not match reference shape {tuple(reference.shape)}")
    if test.dtype.is_complex or reference.dtype.is_complex:
        raise TypeError("sqnr takes real tensors")
    ref = reference.double()
    signal, noise = torch.stack([ref.square().sum(), (test.double() - ref).square().sum()]).tolist()
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# ---------------------------------------------------------------------------------------
# boxes


def _boxes(b, name: str, cols: tuple) -> torch.Tensor:
    _check_tensor(b, name)
    if b.dtype.is_complex or b.dtype == torch.bool:
        raise TypeError(f"{name} must be real, got dtype {b.dtype}")
    if b.dim() != 2 or b.shape[1] not in cols:
        want = " or ".join(f"(N, {c})" for c in cols)
        raise ValueError(f"{name} must have shape {want}, got {tuple(b.shape)}")
    return b


def _out_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    dt = torch.promote_types(a.dtype, b.dtype)
    return dt if dt.is_floating_point else torch.get_default_dtype()


def _check_sizes(sizes: torch.Tensor, name: str, what: str) -> None:
    if (sizes < 0).any():
        row = (sizes < 0).any(1).nonzero()[0, 0].item()
        raise ValueError(f"{name}[{row}] has a negative size ({what}): {sizes[row].tolist()}")


def _ratio(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    # an empty union (both boxes degenerate) is no overlap, not 0/0
    return torch.where(union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)),
                       torch.zeros_like(inter))


@torch.no_grad()
def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (N, M) of 2D boxes ``(x1, y1, x2, y2)`` (see Note: box conventions)."""
    b1, b2 = _boxes(boxes1, "boxes1", (4,)), _boxes(boxes2, "boxes2", (4,))
    dt = _out_dtype(b1, b2)
    b1, b2 = b1.to(dt), b2.to(dt)
    for b, name in ((b1, "boxes1"), (b2, "boxes2")):
        if (b[:, 2:] < b[:, :2]).any():
            row = (b[:, 2:] < b[:, :2]).any(1).nonzero()[0, 0].item()
            raise ValueError(f"{name}[{row}] = {b[row].tolist()} has x2 < x1 or y2 < y1")
    area1 = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    area2 = (b2[:, 2] - b2[:, 0]) * (b2[:, 3] - b2[:, 1])
    lo = torch.maximum(b1[:, None, :2], b2[None, :, :2])
    hi = torch.minimum(b1[:, None, 2:], b2[None, :, 2:])
    inter = (hi - lo).clamp_min(0).prod(-1)
    return _ratio(inter, area1[:, None] + area2[None, :] - inter)


@torch.no_grad()
def box3d_iou_aligned(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (N, M) of axis-aligned 3D boxes ``(cx, cy, cz, dx, dy, dz)``."""
    b1, b2 = _boxes(boxes1, "boxes1", (6,)), _boxes(boxes2, "boxes2", (6,))
    dt = _out_dtype(b1, b2)
    b1, b2 = b1.to(dt), b2.to(dt)
    _check_sizes(b1[:, 3:], "boxes1", "dx, dy, dz")
    _check_sizes(b2[:, 3:], "boxes2", "dx, dy, dz")
    lo = torch.maximum(b1[:, None, :3] - b1[:, None, 3:] / 2, b2[None, :, :3] - b2[None, :, 3:] / 2)
    hi = torch.minimum(b1[:, None, :3] + b1[:, None, 3:] / 2, b2[None, :, :3] + b2[None, :, 3:] / 2)
    inter = (hi - lo).clamp_min(0).prod(-1)
    vol1, vol2 = b1[:, 3:].prod(-1), b2[:, 3:].prod(-1)
    return _ratio(inter, vol1[:, None] + vol2[None, :] - inter)


def _clip(poly: torch.Tensor, n: torch.Tensor, dist: torch.Tensor, tol: torch.Tensor):
    """One Sutherland–Hodgman step: keep the part of each polygon where ``dist >= 0``.

    ``poly`` (P, K, 2) holds ``n`` (P,) valid vertices each; ``dist`` (P, K) is the signed
    distance of every vertex to the clipping line. Returns the clipped (poly, n).
    """
    P, K, _ = poly.shape
    i = torch.arange(K, device=poly.device)
    valid = i < n[:, None]
    prev = torch.where(i == 0, n[:, None] - 1, i - 1).clamp_min(0)  # cyclic within each polygon
    inside = dist >= -tol[:, None]
    d_prev = dist.gather(1, prev)
    p_prev = poly.gather(1, prev[..., None].expand(P, K, 2))
    in_prev = inside.gather(1, prev)
    crossing = valid & (inside != in_prev)
    keep = valid & inside
    # the edge prev -> cur meets the line where dist is 0; the clamp guards the tolerance band
    denom = d_prev - dist
    t = (d_prev / torch.where(crossing, denom, torch.ones_like(denom))).clamp(0, 1)
    cut = p_prev + t[..., None] * (poly - p_prev)
    # each vertex emits [crossing point, itself]; compact the emitted ones in order
    cand = torch.stack([cut, poly], dim=2).reshape(P, 2 * K, 2)
    emit = torch.stack([crossing, keep], dim=2).reshape(P, 2 * K)
    pos = emit.cumsum(1) - 1
    # exact arithmetic never exceeds K (see Note: rotated intersection); the slot K is a sink
    pos = torch.where(emit & (pos < K), pos, K)
    out = poly.new_zeros(P, K + 1, 2).scatter_(1, pos[..., None].expand(P, 2 * K, 2), cand)
    return out[:, :K], emit.sum(1).clamp_max(K)


def _shoelace(poly: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    P, K, _ = poly.shape
    i = torch.arange(K, device=poly.device)
    nxt = torch.where(i + 1 < n[:, None], i + 1, 0)
    q = poly.gather(1, nxt[..., None].expand(P, K, 2))
    cross = poly[..., 0] * q[..., 1] - q[..., 0] * poly[..., 1]
    return 0.5 * torch.where(i < n[:, None], cross, torch.zeros_like(cross)).sum(1).abs()


def _bev_pair_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection areas of paired BEV boxes a[k], b[k] ((P, 5) float64 each)."""
    P = a.shape[0]
    # box a in box b's frame: b becomes |u| <= hx, |v| <= hy
    cb, sb = torch.cos(b[:, 4]), torch.sin(b[:, 4])
    rx, ry = a[:, 0] - b[:, 0], a[:, 1] - b[:, 1]
    cu, cv = cb * rx + sb * ry, -sb * rx + cb * ry
    yaw = a[:, 4] - b[:, 4]
    c, s = torch.cos(yaw), torch.sin(yaw)
    ha = a[:, 2:4] / 2
    sx = a.new_tensor([-1.0, 1.0, 1.0, -1.0])  # counterclockwise corners
    sy = a.new_tensor([-1.0, -1.0, 1.0, 1.0])
    lx, ly = sx * ha[:, :1], sy * ha[:, 1:]
    corners = torch.stack([cu[:, None] + c[:, None] * lx - s[:, None] * ly,
                           cv[:, None] + s[:, None] * lx + c[:, None] * ly], dim=-1)
    poly = torch.cat([corners, a.new_zeros(P, _MAX_VERTICES - 4, 2)], dim=1)
    n = torch.full((P,), 4, dtype=torch.int64, device=a.device)
    hx, hy = b[:, 2:3] / 2, b[:, 3:4] / 2
    tol = _CLIP_TOL * (ha.sum(1) + hx[:, 0] + hy[:, 0] + cu.abs() + cv.abs())
    for side in range(4):  # the four sides of b: u <= hx, -u <= hx, v <= hy, -v <= hy
        coord = poly[..., side // 2]
        dist = (hx if side < 2 else hy) - (coord if side % 2 == 0 else -coord)
        poly, n = _clip(poly, n, dist, tol)
    area = _shoelace(poly, n)
    # rounding must not let the overlap exceed either box
    return torch.minimum(area, torch.minimum(a[:, 2] * a[:, 3], b[:, 2] * b[:, 3]))


def _bev_intersection(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """(N, M) float64 intersection areas of BEV boxes (cx, cy, dx, dy, yaw), float64 inputs."""
    N, M = b1.shape[0], b2.shape[0]
    inter = b1.new_zeros(N, M)
    if N == 0 or M == 0:
        return inter

    def half_extent(b):  # of the axis-aligned bounding box
        c, s = torch.cos(b[:, 4]).abs(), torch.sin(b[:, 4]).abs()
        return torch.stack([c * b[:, 2] + s * b[:, 3], s * b[:, 2] + c * b[:, 3]], dim=1) / 2

    e1, e2 = half_extent(b1), half_extent(b2)
    near = ((b1[:, None, :2] - b2[None, :, :2]).abs() <= e1[:, None] + e2[None, :]).all(-1)
    i, j = near.nonzero(as_tuple=True)
    for k in range(0, i.numel(), _PAIR_CHUNK):  # chunks of pairs, not elements: bounded memory
        ii, jj = i[k:k + _PAIR_CHUNK], j[k:k + _PAIR_CHUNK]
        inter[ii, jj] = _bev_pair_area(b1[ii], b2[jj])
    return inter


def _bev_columns(b: torch.Tensor) -> torch.Tensor:
    return b[:, [0, 1, 3, 4, 6]] if b.shape[1] == 7 else b


def _check_bev(b: torch.Tensor, name: str) -> None:
    _check_sizes(b[:, 2:4], name, "dx, dy")


@torch.no_grad()
def bev_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise bird's-eye-view IoU (N, M) of rotated boxes (cx, cy, dx, dy, yaw) or 7-column 3D boxes.

    Exact polygon clipping (see Note: rotated intersection).
    """
    b1, b2 = _boxes(boxes1, "boxes1", (5, 7)), _boxes(boxes2, "boxes2", (5, 7))
    dt = _out_dtype(b1, b2)
    b1, b2 = _bev_columns(b1).double(), _bev_columns(b2).double()
    _check_bev(b1, "boxes1")
    _check_bev(b2, "boxes2")
    inter = _bev_intersection(b1, b2)
    a1, a2 = b1[:, 2] * b1[:, 3], b2[:, 2] * b2[:, 3]
    return _ratio(inter, a1[:, None] + a2[None, :] - inter).to(dt)


@torch.no_grad()
def box3d_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (N, M) of yawed 3D boxes (cx, cy, cz, dx, dy, dz, yaw): BEV overlap times z overlap."""
    b1, b2 = _boxes(boxes1, "boxes1", (7,)), _boxes(boxes2, "boxes2", (7,))
    dt = _out_dtype(b1, b2)
    b1, b2 = b1.double(), b2.double()
    _check_sizes(b1[:, 3:6], "boxes1", "dx, dy, dz")
    _check_sizes(b2[:, 3:6], "boxes2", "dx, dy, dz")
    area = _bev_intersection(_bev_columns(b1), _bev_columns(b2))
    lo = torch.maximum(b1[:, None, 2] - b1[:, None, 5] / 2, b2[None, :, 2] - b2[None, :, 5] / 2)
    hi = torch.minimum(b1[:, None, 2] + b1[:, None, 5] / 2, b2[None, :, 2] + b2[None, :, 5] / 2)
    inter = area * (hi - lo).clamp_min(0)
    vol1, vol2 = b1[:, 3:6].prod(-1), b2[:, 3:6].prod(-1)
    return _ratio(inter, vol1[:, None] + vol2[None, :] - inter).to(dt)
