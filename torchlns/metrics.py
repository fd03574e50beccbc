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

# Note: detection conventions
* One image's detections are a dict of ``scores`` (m,), ``labels`` (m,) integer classes,
  ``boxes2d`` (m, 4) and/or ``boxes3d`` (m, 7) (Note: box conventions); its ground truth is
  the same without ``scores``. A metric reads only the box kind it needs: ``"2d"``
  (``box_iou`` on ``boxes2d``), ``"bev"`` (``bev_iou``) or ``"3d"`` (``box3d_iou``) on ``boxes3d``.
* Matching is greedy by score, image by image and class by class (KITTI, PASCAL VOC): in
  descending score (ties in input order), each detection takes the unmatched ground-truth
  box of its class with the highest IoU (ties: the first), if that IoU is at least the
  threshold; otherwise it is a false positive. A duplicate of a matched box is a false
  positive too.
* Average precision is all-point interpolated (VOC 2010 onwards): the area under the
  precision-recall curve after each precision is replaced by the highest precision at any
  recall at least as large; the detections of all images are ranked together by score
  (ties: image order, then rank within the image). A class with ground truth and no
  detection has AP 0; a class without ground truth has AP NaN, and the mean AP averages the
  others (NaN if none has any).
* Box errors are over the detections of at least ``min_score`` matched to ground truth at
  2-D IoU >= 0.5 by default: mean |depth error| (the x of the box centre: forward distance),
  also relative to the true depth; mean |size error| over the three dimensions; mean
  |yaw error|, wrapped into [0, pi].
* Box agreement between a reference model (float) and a test model (converted): the fraction
  of the reference's detections of at least ``min_score`` matched, by the same greedy rule,
  by a test detection of the same class at IoU >= 0.9 (any test score: a box whose score
  moved across the threshold is still the same box). NaN if the reference has none.

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
from typing import Dict, List, Optional, Sequence, Union

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
    "DetectionEval",
    "average_precision",
    "box_errors",
    "box_agreement",
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


# ---------------------------------------------------------------------------------------
# detection (see Note: detection conventions)

_IOU_KINDS = {"2d": ("boxes2d", 4), "bev": ("boxes3d", 7), "3d": ("boxes3d", 7)}


def _iou(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if len(a) == 0 or len(b) == 0:
        return torch.zeros(len(a), len(b), dtype=torch.float64)
    fn = {"2d": box_iou, "bev": bev_iou, "3d": box3d_iou}[kind]
    return fn(a.double(), b.double())


def _check_kind(kind: str) -> str:
    if kind not in _IOU_KINDS:
        raise ValueError(f"kind must be one of {sorted(_IOU_KINDS)}, got {kind!r}")
    return kind


def _check_threshold(t: float, name: str = "threshold") -> float:
    if not (isinstance(t, (int, float)) and 0 <= t <= 1):
        raise ValueError(f"{name} must be a number in [0, 1], got {t!r}")
    return float(t)


def _image(item, name: str, scored: bool) -> Dict[str, torch.Tensor]:
    """One image's detections or ground truth, checked and moved to the CPU."""
    if not isinstance(item, dict):
        raise TypeError(f"{name} must be a dict of tensors (labels, boxes2d and/or boxes3d"
                        f"{', scores' if scored else ''}), got {type(item).__name__}")
    keys = ("labels", "scores") if scored else ("labels",)
    for key in keys:
        if key not in item:
            raise ValueError(f"{name} has no {key!r}")
    out = {}
    labels = item["labels"]
    _check_tensor(labels, f"{name}['labels']")
    if labels.dim() != 1 or not _is_integer(labels):
        raise ValueError(f"{name}['labels'] must be integer classes of shape (m,), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    out["labels"] = labels.cpu().long()
    m = len(labels)
    if scored:
        scores = item["scores"]
        _check_tensor(scores, f"{name}['scores']")
        if not scores.dtype.is_floating_point or scores.shape != (m,):
            raise ValueError(f"{name}['scores'] must be float of shape ({m},), got {scores.dtype} {tuple(scores.shape)}")
        out["scores"] = scores.detach().cpu().double()
    for key, cols in (("boxes2d", 4), ("boxes3d", 7)):
        if key in item:
            b = _boxes(item[key], f"{name}['{key}']", (cols,))
            if len(b) != m:
                raise ValueError(f"{name}['{key}'] has {len(b)} boxes but {name}['labels'] has {m}")
            out[key] = b.detach().cpu().double()
    return out


def _images(items, name: str, scored: bool, kinds=()) -> List[Dict[str, torch.Tensor]]:
    if isinstance(items, dict) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list with one dict per image, got {type(items).__name__}")
    out = [_image(x, f"{name}[{i}]", scored) for i, x in enumerate(items)]
    for kind in kinds:
        key = _IOU_KINDS[kind][0]
        for i, x in enumerate(out):
            if key not in x:
                raise ValueError(f"{name}[{i}] has no {key!r}, which kind={kind!r} needs")
    return out


def _greedy(scores: torch.Tensor, iou: torch.Tensor, threshold: float) -> torch.Tensor:
    """For detections in the given order of ``scores`` (descending, ties in input order), the matched
    ground-truth index or -1 (see Note: detection conventions)."""
    order = torch.sort(scores, descending=True, stable=True).indices
    match = torch.full((len(scores),), -1, dtype=torch.long)
    if iou.shape[1] == 0:
        return match
    free = torch.ones(iou.shape[1], dtype=torch.bool)
    for d in order.tolist():
        cand = torch.where(free, iou[d], torch.full_like(iou[d], -1.0))
        best = int(cand.argmax())  # the first of equal maxima
        if cand[best] >= threshold:
            match[d] = best
            free[best] = False
    return match


def _match_class(det: dict, gt: dict, cls: int, kind: str, threshold: float, min_score: float = -math.inf):
    """(detection indices, their matched ground-truth indices or -1, ground-truth indices) of one class."""
    key = _IOU_KINDS[kind][0]
    d_idx = ((det["labels"] == cls) & (det["scores"] >= min_score)).nonzero()[:, 0]
    g_idx = (gt["labels"] == cls).nonzero()[:, 0]
    iou = _iou(kind, det[key][d_idx], gt[key][g_idx])
    m = _greedy(det["scores"][d_idx], iou, threshold)
    return d_idx, torch.where(m >= 0, g_idx[m.clamp_min(0)] if len(g_idx) else m, m), g_idx


def _ap(scores: torch.Tensor, tp: torch.Tensor, n_gt: int) -> float:
    if n_gt == 0:
        return math.nan
    if len(scores) == 0:
        return 0.0
    order = torch.sort(scores, descending=True, stable=True).indices
    hits = tp[order].double()
    tps, fps = hits.cumsum(0), (1 - hits).cumsum(0)
    recall = torch.cat([torch.zeros(1, dtype=torch.float64), tps / n_gt])
    precision = torch.cat([torch.ones(1, dtype=torch.float64), tps / (tps + fps)])
    envelope = precision.flip(0).cummax(0).values.flip(0)
    return float(((recall[1:] - recall[:-1]) * envelope[1:]).sum())


class DetectionEval:
    """Accumulates detections and ground truth image by image; computes AP and box errors
    (see Note: detection conventions).

        ev = DetectionEval(num_classes=3)
        for images, targets in data:
            ev.update(decode(model(images)), targets)
        ev.average_precision("bev", 0.5), ev.errors()
    """

    def __init__(self, num_classes: int):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.detections: List[Dict[str, torch.Tensor]] = []
        self.targets: List[Dict[str, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return f"DetectionEval(num_classes={self.num_classes}, images={len(self)})"

    def update(self, detections: Sequence[dict], targets: Sequence[dict]) -> "DetectionEval":
        return self._extend(_images(detections, "detections", True), _images(targets, "targets", False))

    def _extend(self, dets: List[Dict[str, torch.Tensor]], gts: List[Dict[str, torch.Tensor]]) -> "DetectionEval":
        """``update`` on images already checked by ``_images``."""
        if len(dets) != len(gts):
            raise ValueError(f"{len(dets)} images of detections but {len(gts)} of targets")
        for x, name in [(d, "detections") for d in dets] + [(g, "targets") for g in gts]:
            bad = (x["labels"] < 0) | (x["labels"] >= self.num_classes)
            if bad.any():
                raise ValueError(f"{name} hold class {int(x['labels'][bad][0])}, outside [0, {self.num_classes})")
        self.detections += dets
        self.targets += gts
        return self

    def _require(self, kind: str) -> None:
        key = _IOU_KINDS[_check_kind(kind)][0]
        for name, items in (("detections", self.detections), ("targets", self.targets)):
            for i, x in enumerate(items):
                if key not in x:
                    raise ValueError(f"{name} of image {i} have no {key!r}, which kind={kind!r} needs")

    def average_precision(self, kind: str = "2d", threshold: float = 0.5, per_class: bool = False):
        """Mean AP over the classes with ground truth (a float; NaN if none), or with ``per_class``
        a float64 tensor (num_classes,) with NaN for classes without ground truth."""
        self._require(kind)
        threshold = _check_threshold(threshold)
        aps = []
        for c in range(self.num_classes):
            scores, tp, n_gt = [], [], 0
            for det, gt in zip(self.detections, self.targets):
                d_idx, m, g_idx = _match_class(det, gt, c, kind, threshold)
                scores.append(det["scores"][d_idx])
                tp.append(m >= 0)
                n_gt += len(g_idx)
            aps.append(_ap(torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64),
                           torch.cat(tp) if tp else torch.zeros(0, dtype=torch.bool), n_gt))
        ap = torch.tensor(aps, dtype=torch.float64)
        if per_class:
            return ap
        known = ap[~ap.isnan()]
        return float(known.mean()) if len(known) else math.nan

    def errors(self, min_score: float = 0.3, kind: str = "2d", threshold: float = 0.5) -> Dict[str, float]:
        """Mean absolute errors of matched boxes: ``depth`` (m), ``depth_rel``, ``size`` (m), ``yaw``
        (radians), and ``matched`` (how many); NaN errors if none matched."""
        self._require(kind)
        self._require("3d")
        threshold = _check_threshold(threshold)
        pred, true = [], []
        for det, gt in zip(self.detections, self.targets):
            for c in range(self.num_classes):
                d_idx, m, _ = _match_class(det, gt, c, kind, threshold, min_score)
                ok = m >= 0
                pred.append(det["boxes3d"][d_idx[ok]])
                true.append(gt["boxes3d"][m[ok]])
        p = torch.cat(pred) if pred else torch.zeros(0, 7, dtype=torch.float64)
        t = torch.cat(true) if true else torch.zeros(0, 7, dtype=torch.float64)
        if len(p) == 0:
            return {"depth": math.nan, "depth_rel": math.nan, "size": math.nan, "yaw": math.nan, "matched": 0}
        dyaw = torch.remainder(p[:, 6] - t[:, 6] + math.pi, 2 * math.pi) - math.pi
        depth = (p[:, 0] - t[:, 0]).abs()
        return {"depth": float(depth.mean()), "depth_rel": float((depth / t[:, 0].abs()).mean()),
                "size": float((p[:, 3:6] - t[:, 3:6]).abs().mean()), "yaw": float(dyaw.abs().mean()),
                "matched": len(p)}


def _num_classes(*groups) -> int:
    top = [int(x["labels"].max()) for g in groups for x in g if len(x["labels"])]
    return max(top, default=0) + 1


def average_precision(detections: Sequence[dict], targets: Sequence[dict], kind: str = "2d",
                      threshold: float = 0.5, num_classes: Optional[int] = None, per_class: bool = False):
    """AP of per-image ``detections`` against ``targets`` (see Note: detection conventions);
    ``num_classes`` defaults to one more than the largest label seen."""
    _check_kind(kind)
    dets, gts = _images(detections, "detections", True), _images(targets, "targets", False)
    ev = DetectionEval(num_classes or _num_classes(dets, gts))
    return ev._extend(dets, gts).average_precision(kind, threshold, per_class)


def box_errors(detections: Sequence[dict], targets: Sequence[dict], min_score: float = 0.3, kind: str = "2d",
               threshold: float = 0.5) -> Dict[str, float]:
    """``DetectionEval.errors`` of per-image ``detections`` against ``targets``."""
    dets, gts = _images(detections, "detections", True), _images(targets, "targets", False)
    return DetectionEval(_num_classes(dets, gts))._extend(dets, gts).errors(min_score, kind, threshold)


def box_agreement(reference: Sequence[dict], test: Sequence[dict], threshold: float = 0.9, kind: str = "2d",
                  min_score: float = 0.3) -> float:
    """Fraction of the reference model's detections (score >= ``min_score``) that a test detection of
    the same class matches at IoU >= ``threshold`` (see Note: detection conventions)."""
    _check_kind(kind)
    threshold = _check_threshold(threshold)
    ref, tst = _images(reference, "reference", True, (kind,)), _images(test, "test", True, (kind,))
    if len(ref) != len(tst):
        raise ValueError(f"{len(ref)} images of reference detections but {len(tst)} of test detections")
    key = _IOU_KINDS[kind][0]
    found = total = 0
    for r, t in zip(ref, tst):
        for c in r["labels"][r["scores"] >= min_score].unique().tolist():
            r_idx = ((r["labels"] == c) & (r["scores"] >= min_score)).nonzero()[:, 0]
            t_idx = (t["labels"] == c).nonzero()[:, 0]
            m = _greedy(r["scores"][r_idx], _iou(kind, r[key][r_idx], t[key][t_idx]), threshold)
            found += int((m >= 0).sum())
            total += len(r_idx)
    return found / total if total else math.nan
