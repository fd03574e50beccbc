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
from typing import Optional

import torch

from ..codec import decode, encode
from ..config import CALIBRATORS
from ..core.formats import Format, MACConfig

__all__ = ["Observer", "choose_param", "acc_lsb_for", "chunk_amax", "CALIBRATORS"]


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


def acc_lsb_for(output_amax: float, mac: MACConfig, headroom_bits: int = 1, chunk_amax: Optional[float] = None) -> int:
    """The smallest ``acc_lsb`` whose accumulator holds ``output_amax · 2^headroom_bits``.

    ``T = 2^(W-1) - 1`` is the largest accumulator value, so the condition is
    ``output_amax · 2^h <= T · 2^acc_lsb``; smaller LSBs truncate products less. A chunked
    MAC's chunk sums must fit their ``chunk_bits`` too (see Note: chunk calibration).
    """
    lsb = _lsb_holding(output_amax, mac.acc_max, headroom_bits)
    if mac.chunk:
        top = 2 ** (mac.chunk_width - 1) - 1
        lsb = max(lsb, _lsb_holding(output_amax if chunk_amax is None else chunk_amax, top, headroom_bits))
    return lsb


# Note: chunk calibration
# A two-stage MAC (chunks of L products summed at W1 bits) needs every chunk sum, not just the
# total, to fit: acc_lsb is the larger of the two LSBs. The chunk sums are measured in float on
# the calibration data, for Linear and (non-transposed) Conv1d/2d/3d layers: the layer's
# weight masked to each run of L consecutive k (the spec's order, input channel slowest), the
# masked copies stacked as extra output channels, so that one float matmul or convolution
# gives every chunk sum (it costs a convolution per chunk, so only the first calibration
# batch is measured; acc_headroom_bits covers the rest as it does for totals). Other layers use the output's maximum for their chunks too (a chunk
# holds fewer products than the whole sum, but it may cancel less: an estimate, not a bound).
@torch.no_grad()
def chunk_amax(module, x: torch.Tensor, chunk: int) -> Optional[float]:
    """The largest |sum of a chunk of ``chunk`` products| of float ``module`` on ``x`` (None: not measured)."""
    import torch.nn as nn

    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    conv = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    if not (conv or isinstance(module, nn.Linear)):
        return None
    N, Kg = w.shape[0], w[0].numel()
    nc = -(-Kg // chunk)
    mask = (torch.arange(Kg, device=w.device) // chunk == torch.arange(nc, device=w.device)[:, None]).to(w.dtype)
    top, j0, step = 0.0, 0, 1
    while j0 < nc:  # a few chunks at a time: the stacked outputs stay near 2^24 values
        j1 = min(nc, j0 + step)
        stacked = (w.reshape(N, 1, Kg) * mask[j0:j1]).reshape(N * (j1 - j0), *w.shape[1:])  # n-major: groups hold
        y = module._conv_forward(x, stacked, None) if conv else torch.nn.functional.linear(x, stacked)
        m = float(y.abs().amax()) if y.numel() else 0.0
        if not math.isfinite(m):  # inf or NaN inputs: the finite sums only
            a = y.abs()
            a = a[torch.isfinite(a)]
            m = float(a.max()) if a.numel() else 0.0
        top = max(top, m)
        step = max(1, (1 << 24) * (j1 - j0) // max(1, y.numel()))
        j0 = j1
    return top


def _lsb_holding(amax: float, T: int, headroom_bits: int) -> int:
    m = amax if amax > 0 and math.isfinite(amax) else 1.0
    lsb = math.ceil(math.log2(m * 2.0**headroom_bits / T))
    while m * 2.0**headroom_bits > T * 2.0**lsb:  # guard log2 rounding at exact powers of two
        lsb += 1
    while m * 2.0**headroom_bits <= T * 2.0 ** (lsb - 1):
        lsb -= 1
    return max(MACConfig.ACC_LSB_MIN, min(MACConfig.ACC_LSB_MAX, lsb))
