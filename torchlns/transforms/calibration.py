"""Static calibration: observers of activation and output ranges, calibrators, acc_lsb.

# Note: calibrators
A static per-tensor activation offset (LNS) or scale (FP8/INT) is chosen from what an
``Observer`` saw on the calibration data:

* ``"max"``: from the largest finite |x| (spec section 3's default; nothing saturates).
* ``"percentile"``: from the given percentile of |x|, so rare outliers saturate instead of
  pushing the whole range up.
* ``"mse"``: a search over the format's candidate parameters (``Format.candidate_params``:
  from the max-based one down by four octaves; LNS: every offset step, FP8/INT: scales
  ``2^(-j/8)`` below), keeping the one whose encode/decode round trip has the least squared
  error on the observed sample. Its data term is exact (the real codec runs on the sample).

The observer keeps the exact running maximum and a deterministic, bounded sample of |x|
(a fixed-seed draw from every batch), so memory stays bounded on whole datasets.
"""

from __future__ import annotations

import math

import torch

from ..codec import decode, encode
from ..config import CALIBRATORS
from ..core.formats import Format, MACConfig

__all__ = ["Observer", "choose_param", "acc_lsb_for", "CALIBRATORS"]


class Observer:
    """Running max|x| and a bounded sample of |x| (finite values only)."""

    def __init__(self, per_batch: int = 1 << 15, capacity: int = 1 << 19, seed: int = 0):
        self.per_batch, self.capacity = per_batch, capacity
        self.max = 0.0
        self.count = 0
        self._samples = []
        self._kept = 0
        self._gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        a = x.detach().float().abs().flatten()
        a = a[torch.isfinite(a)]
        if a.numel() == 0:
            return
        self.max = max(self.max, a.max().item())
        self.count += a.numel()
        if a.numel() > self.per_batch:
            idx = torch.randint(a.numel(), (self.per_batch,), generator=self._gen).to(a.device)
            a = a[idx]
        self._samples.append(a.cpu())
        self._kept += a.numel()
        if self._kept > 2 * self.capacity:  # thin out evenly, keeping every batch represented
            s = torch.cat(self._samples)
            s = s[torch.randperm(s.numel(), generator=self._gen)[: self.capacity]]
            self._samples, self._kept = [s], s.numel()

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self._samples) if self._samples else torch.zeros(0)


def _param_for_amax(m: float, fmt: Format) -> torch.Tensor:
    return fmt.param_from_amax(torch.tensor(m, dtype=torch.float32))


def _roundtrip_error(sample: torch.Tensor, fmt: Format, param: torch.Tensor) -> float:
    return (decode(encode(sample, fmt, param), fmt, param).double() - sample.double()).pow(2).sum().item()


def choose_param(obs: Observer, fmt: Format, calibrator: str = "max", percentile: float = 99.99) -> torch.Tensor:
    """The static per-tensor offset (int32) or scale (float32) as a 0-d tensor (see Note: calibrators)."""
    if calibrator not in CALIBRATORS:
        raise ValueError(f"unknown calibrator {calibrator!r}; expected one of {CALIBRATORS}")
    if obs.count == 0:
        raise ValueError("the observer saw no finite values; the calibration data never reached this layer")
    if calibrator == "max":
        return _param_for_amax(obs.max, fmt)
    sample = obs.sample
    if calibrator == "percentile":
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        q = torch.quantile(sample.double(), percentile / 100).item() if sample.numel() < (1 << 24) else obs.max
        return _param_for_amax(q if q > 0 else obs.max, fmt)
    candidates = fmt.candidate_params(obs.max)
    errors = [_roundtrip_error(sample, fmt, c) for c in candidates]
    return candidates[min(range(len(errors)), key=errors.__getitem__)]  # first minimum: the widest range


def acc_lsb_for(output_amax: float, mac: MACConfig, headroom_bits: int = 1) -> int:
    """The smallest ``acc_lsb`` whose accumulator holds ``output_amax · 2^headroom_bits``.

    ``T = 2^(W-1) - 1`` is the largest accumulator value, so the condition is
    ``output_amax · 2^h <= T · 2^acc_lsb``; smaller LSBs truncate products less.
    """
    T = mac.acc_max
    m = output_amax if output_amax > 0 and math.isfinite(output_amax) else 1.0
    lsb = math.ceil(math.log2(m * 2.0**headroom_bits / T))
    while m * 2.0**headroom_bits > T * 2.0**lsb:  # guard log2 rounding at exact powers of two
        lsb += 1
    while m * 2.0**headroom_bits <= T * 2.0 ** (lsb - 1):
        lsb -= 1
    return max(MACConfig.ACC_LSB_MIN, min(MACConfig.ACC_LSB_MAX, lsb))
