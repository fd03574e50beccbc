"""Kernel cluster compression (Son, Nah & Lee, ECCV 2018; chip-model.md section 6): ``cluster_kernels``.

# Note: kernel normalisation
Every k×k kernel ``w`` (k > 1) of a Conv2d is one point. It is divided by
``scale = ‖w‖₂ · sign(w[centre])``, so that similar shapes of either sign and any magnitude
land on one point, and k-means (k-means++ initialisation from a seeded generator, then
Lloyd iterations) clusters the normalised kernels. A kernel is then stored as the index of
its centroid plus its scale, and reconstructed as ``scale · centroid``. The centre tap of an
even kernel is ``w[k//2, k//2]``; a zero centre counts as positive; an all-zero kernel gets
scale 0 and takes no part in the clustering.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..core.geometry import InputPad
from ..nn.clustered import ClusteredConv2d
from .graph import forward_matches, pad_then_base

__all__ = ["cluster_kernels", "kmeans", "normalise_kernels", "ClusterStats"]


# ----------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------
def normalise_kernels(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, in/g, kh, kw) weight -> (points (P, kh*kw), signed scales (out, in/g)).

    See Note: kernel normalisation. Zero kernels get scale 0 and a zero point.
    """
    kh, kw = weight.shape[-2:]
    flat = weight.detach().reshape(-1, kh * kw).float()
    centre = flat[:, (kh // 2) * kw + kw // 2]
    sign = torch.where(centre < 0, -1.0, 1.0)
    scale = flat.norm(dim=1) * sign
    points = torch.where(scale[:, None] != 0, flat / torch.where(scale == 0, 1.0, scale)[:, None], 0.0)
    return points, scale.reshape(weight.shape[:2])


def _nearest(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 16) -> Tuple[torch.Tensor, torch.Tensor]:
    """(index, squared distance) of each point's nearest centroid, in chunks of points."""
    c2 = (centroids * centroids).sum(1)
    idx, dist = [], []
    for p in points.split(chunk):
        d = (p * p).sum(1, keepdim=True) - 2 * p @ centroids.T + c2
        v, i = d.min(1)
        idx.append(i)
        dist.append(v.clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def kmeans(points: torch.Tensor, num_clusters: int, *, iterations: int = 50, tol: float = 1e-4, seed: int = 0,
           progress=None, desc: str = "k-means") -> Tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ initialisation, batched in torch on ``points``' device.

    Deterministic for a given seed and device: the generator drives every random choice,
    and an emptied cluster is re-seeded with the point farthest from its centroid. Stops
    after ``iterations`` or when no centroid moves by more than ``tol`` (relative to the
    points' RMS norm). Returns (centroids (C, D), assignment (P,)).
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (P, D) tensor, got shape {tuple(points.shape)}")
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
        raise ValueError(f"num_clusters must be a positive int, got {num_clusters!r}")
    points = points.float()
    P = points.shape[0]
    C = min(num_clusters, P)
    gen = torch.Generator(device=points.device).manual_seed(seed)
    # k-means++: each next centre is drawn with probability proportional to D(x)^2.
    first = torch.randint(P, (1,), generator=gen, device=points.device)
    centroids = points[first]
    best = ((points - centroids) ** 2).sum(1)
    for _ in range(1, C):
        total = best.sum()
        if total <= 0:  # fewer distinct points than clusters: duplicate centres are harmless
            nxt = torch.randint(P, (1,), generator=gen, device=points.device)
        else:
            nxt = torch.multinomial(best / total, 1, generator=gen)
        c = points[nxt]
        centroids = torch.cat([centroids, c])
        best = torch.minimum(best, ((points - c) ** 2).sum(1))
    scale = points.pow(2).sum(1).mean().sqrt().clamp_min(1e-30)
    from tqdm.auto import tqdm

    bar = tqdm(range(iterations), desc=desc, leave=False, disable=_disabled(progress))
    assign, _ = _nearest(points, centroids)
    for _ in bar:
        counts = torch.bincount(assign, minlength=C).to(points.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            _, d = _nearest(points, new)
            far = d.topk(empty.numel()).indices
            new[empty] = points[far]
        shift = (new - centroids).norm(dim=1).max() / scale
        centroids = new
        assign, _ = _nearest(points, centroids)
        bar.set_postfix(shift=f"{shift.item():.2e}")
        if shift.item() <= tol:
            break
    bar.close()
    return centroids, assign


def _disabled(progress) -> Optional[bool]:
    """tqdm's ``disable``: None (the default) shows a bar only on a terminal, so tests stay quiet."""
    return None if progress is None else not progress


# ----------------------------------------------------------------------------------------
# model transform
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterStats:
    layer: str
    kernels: int
    clusters: int
    relative_error: float  # ‖W - W_clustered‖ / ‖W‖


def _eligible(m: nn.Module) -> Tuple[bool, Optional[InputPad], Optional[str]]:
    """(clusterable, the input pad its forward applies, why not): a k×k (k > 1) Conv2d with zero
    padding, or a subclass whose forward is the base conv's, or a zero pad and then it (see Note:
    pad-then-conv subclasses in transforms/graph.py)."""
    if not isinstance(m, nn.Conv2d):
        return False, None, None
    if m.kernel_size[0] * m.kernel_size[1] == 1:
        return False, None, "1x1 kernels have no shape to cluster"
    if m.padding_mode != "zeros":
        return False, None, f"padding_mode={m.padding_mode!r} (only zero padding clusters)"
    if type(m) is nn.Conv2d or forward_matches(m, nn.Conv2d):
        return True, None, None
    pad, why = pad_then_base(m, nn.Conv2d)
    if why is not None:
        return False, None, f"{type(m).__name__}'s forward is not a Conv2d's: {why}"
    return True, pad, None


def _warn_if_no_saving(fqns: List[str], asked: int, live: int, kernels: int, taps: int) -> None:
    """Warn when the centroids asked for are capped, or the clustered layer is no smaller.

    Sizes as ``size_report`` counts them, with 8-bit weights: per kernel an index of
    ceil(log2 C) bits and an 8-bit scale, plus C centroids of ``taps`` 8-bit values; against
    ``taps`` 8-bit values per kernel.
    """
    where = f"layer {fqns[0]!r}" if len(fqns) == 1 else f"{len(fqns)} layers ({fqns[0]!r}, ...)"
    C = max(1, min(asked, live))
    if asked > live:
        warnings.warn(f"cluster_kernels: {where} has {live} kernels, fewer than the {asked} centroids asked for; "
                      f"it gets {C} (one per kernel)", stacklevel=3)
    index_bits = math.ceil(math.log2(C))
    clustered = kernels * (index_bits + 8) + C * taps * 8
    plain = kernels * taps * 8
    if clustered >= plain:
        even = kernels * (taps * 8 - index_bits - 8) // (taps * 8)
        warnings.warn(f"cluster_kernels: {where} with {C} centroids takes {clustered / 8:,.0f} bytes against "
                      f"{plain / 8:,.0f} for its plain 8-bit weights, because the centroid table outweighs what "
                      f"the indices save; fewer than about {even:,} centroids make it smaller", stacklevel=3)


def _warn_nothing_to_cluster(passed_over: Dict[str, str]) -> None:
    if not passed_over:
        warnings.warn("cluster_kernels found no Conv2d layer to cluster; the model is returned unchanged",
                      stacklevel=3)
        return
    reasons: Dict[str, List[str]] = {}
    for fqn, why in passed_over.items():
        reasons.setdefault(why, []).append(fqn or "(the model)")
    parts = [f"{len(f)} ({f[0]}{', ...' if len(f) > 1 else ''}): {why}" for why, f in reasons.items()]
    warnings.warn("cluster_kernels clustered no layer; the model is returned unchanged. Convs passed over: "
                  + "; ".join(parts), stacklevel=3)


def cluster_kernels(model: nn.Module, num_clusters: Union[int, Mapping[str, int]], *, scope: str = "layer",
                    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None, iterations: int = 50,
                    tol: float = 1e-4, seed: int = 0, progress=None, inplace: bool = False) -> nn.Module:
    """Replace the k×k (k > 1) ``nn.Conv2d`` layers by ``ClusteredConv2d`` (see Note: kernel normalisation).

    ``num_clusters`` is one count for every layer, or a mapping from layer name to count
    (layers it does not name are left alone). ``scope="network"`` runs one k-means per kernel
    shape over all selected layers, which then share one ``centroids`` Parameter.
    ``filter_fn(module, fqn)`` selects layers. k-means runs on the model's device; ``progress``
    shows tqdm bars over layers and iterations (default: only on a terminal). The returned
    model (a copy unless ``inplace``) has a ``cluster_report``: a list of ``ClusterStats``.
    """
    if scope not in ("layer", "network"):
        raise ValueError(f"scope must be 'layer' or 'network', got {scope!r}")
    if not isinstance(num_clusters, Mapping) and (
            isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1):
        raise ValueError(f"num_clusters must be a positive int or a mapping of layer name to int, got {num_clusters!r}")
    if scope == "network" and isinstance(num_clusters, Mapping):
        raise ValueError("scope='network' shares one set of centroids: num_clusters must be a single int")
    if not inplace:
        model = copy.deepcopy(model)
    layers: Dict[str, nn.Conv2d] = {}
    pads: Dict[str, Optional[InputPad]] = {}
    passed_over: Dict[str, str] = {}  # convs left alone, and why (for the warning when nothing clusters)
    for fqn, m in model.named_modules():
        ok, pad, why = _eligible(m)
        if why is not None:
            passed_over[fqn] = why
        if not ok:
            continue
        if filter_fn is not None and not filter_fn(m, fqn):
            passed_over[fqn] = "filter_fn left it out"
            continue
        if isinstance(num_clusters, Mapping) and fqn not in num_clusters:
            continue
        layers[fqn], pads[fqn] = m, pad
    if isinstance(num_clusters, Mapping):
        unknown = sorted(set(num_clusters) - set(layers))
        if unknown:
            why = "; ".join(f"{f}: {passed_over[f]}" for f in unknown if f in passed_over)
            raise ValueError(f"num_clusters names layers that are not clusterable k×k Conv2d layers: {unknown}"
                             + (f" ({why})" if why else ""))
    if not layers:
        _warn_nothing_to_cluster(passed_over)
    from tqdm.auto import tqdm

    groups: List[Tuple[List[str], int]]
    if scope == "layer":
        groups = [([fqn], num_clusters[fqn] if isinstance(num_clusters, Mapping) else num_clusters) for fqn in layers]
    else:
        by_shape: Dict[tuple, List[str]] = {}
        for fqn, m in layers.items():
            by_shape.setdefault(tuple(m.kernel_size), []).append(fqn)
        groups = [(fqns, num_clusters) for fqns in by_shape.values()]
    report: List[ClusterStats] = []
    for fqns, count in tqdm(groups, desc="cluster_kernels", disable=_disabled(progress)):
        pts, scales = zip(*(normalise_kernels(layers[f].weight) for f in fqns))
        points = torch.cat(pts)
        live = torch.cat([s.flatten() for s in scales]) != 0
        if live.any():
            centroids, assign_live = kmeans(points[live], count, iterations=iterations, tol=tol, seed=seed,
                                            progress=progress, desc=fqns[0] if len(fqns) == 1 else "network")
        else:
            centroids, assign_live = points[:1] * 0, None
        assign = torch.zeros(points.shape[0], dtype=torch.long, device=points.device)
        if assign_live is not None:
            assign[live] = assign_live
        kh, kw = layers[fqns[0]].kernel_size
        _warn_if_no_saving(fqns, count, int(live.sum()), points.shape[0], kh * kw)
        shared = nn.Parameter(centroids.reshape(-1, kh, kw).to(layers[fqns[0]].weight.dtype))
        start = 0
        for fqn, s in zip(fqns, scales):
            conv = layers[fqn]
            n = s.numel()
            new = ClusteredConv2d.from_float(conv, shared, assign[start:start + n].reshape(s.shape), s, pads[fqn])
            start += n
            with torch.no_grad():
                err = (new.weight - conv.weight).norm() / conv.weight.norm().clamp_min(1e-30)
            report.append(ClusterStats(fqn, n, shared.shape[0], err.item()))
            if not fqn:  # the model is itself the conv
                model = new
                continue
            model.set_submodule(fqn, new)
    model.cluster_report = report
    return model
