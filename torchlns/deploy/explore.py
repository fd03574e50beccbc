"""``torchlns.explore``: sweep chip designs (number format x datapath) and find the Pareto front.

# Note: design-space exploration
A ``Design`` is one chip: the LNS format (bits, F), the conversion (``lut`` with ``lut_bits``,
``mitchell``, ``exact``), the fixed accumulator (``acc_bits``, ``overflow``, chunks of
``chunk`` products at ``chunk_bits``), the weight granularity and optionally kernel
clustering into C centroids. A ``DesignSpace`` is a grid of such choices, swept whole or as
a seeded random sample (the chip preset always included). Each design is one
``torchlns.convert`` of the float model on the calibration items, then:

* fidelity on the evaluation items, against the float model's outputs: argmax agreement
  (over dim 1: classes, or pixels of a segmentation), mean KL(float || design) of the
  softmax over dim 1, output SQNR; and the task metric when ``metric`` is given
  (``metric(outputs, targets)``, e.g. mIoU or top-1). The score the front uses is the task
  metric if there is one, else agreement;
* stored bytes (``size_report``: what the weight image holds) and energy per inference
  (``cost_report`` on one sample on ``chip``; the MAC's share follows the datapath, see Note:
  cost model).

A design is on the energy front (bytes front) when no other design has a score at least as
high and energy (bytes) at most as low, one of them strictly. "Beats the preset at equal
fidelity": lower energy than the chip preset with a score no lower than the preset's minus
``tolerance``.

Runs are resumable: every finished design is appended to ``results`` (JSON lines, after a
header line that fingerprints the model and data, so a file from another model or data is
refused), and a rerun skips the designs already there. ``workers`` > 1 evaluates designs in
that many spawned processes (each with an equal share of the CPU threads; the model, data
and metric must pickle, and a script that calls it must keep its top level under
``if __name__ == "__main__":``, since spawning imports the script again; a worker whose
parent was killed outright leaves too, within a second). ``time_budget`` stops starting designs once that many seconds have
passed; what is left is named in the result. Calibration and evaluation items are kept apart:
without ``eval_data`` the first half of ``data`` calibrates and the second half evaluates.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._text import format_table
from ..config import ClusterConfig, ConvertConfig
from ..core.formats import LNSFormat, MACConfig
from .cost import CHIPS, ChipSpec, cost_report

__all__ = ["CHIP_PRESET", "Design", "DesignSpace", "ExploreResult", "explore"]


@dataclass(frozen=True)
class Design:
    """One chip design (see Note: design-space exploration). The defaults are the chip preset."""

    bits: int = 8
    frac_bits: int = 3
    conversion: str = "lut"
    lut_bits: int = 8
    acc_bits: int = 32
    overflow: str = "saturate"
    chunk: int = 0
    chunk_bits: int = 0
    weight_granularity: str = "channel"
    clusters: Optional[int] = None

    def __post_init__(self):
        self.fmt, self.mac  # noqa: B018  (validates: an invalid design fails here, not mid-sweep)
        if self.weight_granularity not in ("tensor", "channel", "block"):
            raise ValueError(f"Design.weight_granularity must be tensor, channel or block, got {self.weight_granularity!r}")
        if self.clusters is not None and (isinstance(self.clusters, bool) or not isinstance(self.clusters, int)
                                          or self.clusters < 2):
            raise ValueError(f"Design.clusters must be an int >= 2 or None, got {self.clusters!r}")

    @property
    def fmt(self) -> LNSFormat:
        return LNSFormat(self.bits, self.frac_bits)

    @property
    def mac(self) -> MACConfig:
        return MACConfig(conversion=self.conversion, lut_bits=self.lut_bits, accumulator="fixed",
                         acc_bits=self.acc_bits, overflow=self.overflow, chunk=self.chunk, chunk_bits=self.chunk_bits)

    @property
    def name(self) -> str:
        conv = {"lut": f"lut{self.lut_bits}", "mitchell": "mitchell", "exact": "exact"}[self.conversion]
        acc = f"acc{self.acc_bits}" + (" wrap" if self.overflow == "wrap" else "")
        if self.chunk:
            acc += f" chunk{self.chunk}x{self.chunk_bits or self.acc_bits}"
        gran = "" if self.weight_granularity == "channel" else f" w/{self.weight_granularity}"
        cl = f" C={self.clusters}" if self.clusters else ""
        return f"LNS{self.bits} F={self.frac_bits} {conv} {acc}{gran}{cl}"

    @property
    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def config(self, base: ConvertConfig = ConvertConfig()) -> ConvertConfig:
        """``base`` with this design's format, MAC, weight granularity and clustering."""
        block = 32 if self.weight_granularity == "block" else None
        cluster = None if self.clusters is None else ClusterConfig(num_clusters=self.clusters)
        return dataclasses.replace(base, fmt=self.fmt, mac=self.mac, weight_granularity=self.weight_granularity,
                                   weight_block_size=block, cluster=cluster)


CHIP_PRESET = Design()


def _choices(name: str, values) -> tuple:
    values = tuple(values)
    if not values:
        raise ValueError(f"DesignSpace.{name} needs at least one choice")
    return values


@dataclass(frozen=True)
class DesignSpace:
    """The choices of each design field; ``designs()`` is their grid (invalid combinations left
    out, conversions without a table counted once), or a seeded sample of ``samples`` of it."""

    bits: Sequence[int] = (8,)
    frac_bits: Sequence[int] = (3,)
    conversion: Sequence[str] = ("lut",)
    lut_bits: Sequence[int] = (8,)
    acc_bits: Sequence[int] = (32,)
    overflow: Sequence[str] = ("saturate",)
    chunks: Sequence[Tuple[int, int]] = ((0, 0),)  # (chunk, chunk_bits); (0, 0): one stage
    weight_granularity: Sequence[str] = ("channel",)
    clusters: Sequence[Optional[int]] = (None,)
    samples: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name not in ("samples", "seed"):
                object.__setattr__(self, f.name, _choices(f.name, getattr(self, f.name)))
        if self.samples is not None and (isinstance(self.samples, bool) or not isinstance(self.samples, int)
                                         or self.samples < 1):
            raise ValueError(f"DesignSpace.samples must be a positive int or None, got {self.samples!r}")

    def grid(self) -> List[Design]:
        seen: Dict[str, Design] = {}
        for b, F, conv, P, W, ovf, (L, W1), gran, C in itertools.product(
                self.bits, self.frac_bits, self.conversion, self.lut_bits, self.acc_bits, self.overflow, self.chunks,
                self.weight_granularity, self.clusters):
            if F > b - 2 or (W1 and W1 > W):
                continue
            try:
                d = Design(b, F, conv, P if conv == "lut" else 8, W, ovf, L, W1 if L else 0, gran, C)
            except ValueError:
                continue
            seen.setdefault(d.key, d)
        return list(seen.values())

    def designs(self) -> List[Design]:
        """The grid, or ``samples`` of it drawn with ``seed``; the chip preset first when it is in the
        space, and always when sampling (it is what every design is compared with)."""
        grid = self.grid()
        if not grid:
            raise ValueError("the design space is empty (every combination is invalid)")
        preset = [d for d in grid if d == CHIP_PRESET]
        rest = [d for d in grid if d != CHIP_PRESET]
        if self.samples is None:
            return preset + rest
        rng = random.Random(self.seed)
        return [CHIP_PRESET] + rng.sample(rest, min(self.samples - 1, len(rest)))

    @classmethod
    def architect(cls, samples: Optional[int] = 48, seed: int = 0) -> "DesignSpace":
        """A broad space around the chip preset: formats of 6 to 10 bits, every conversion, accumulators
        of 16 to 32 bits that saturate or wrap, with and without chunks, per-channel or per-tensor weights."""
        return cls(bits=(6, 7, 8, 10), frac_bits=(2, 3, 4), conversion=("lut", "mitchell"), lut_bits=(5, 6, 8),
                   acc_bits=(16, 20, 24, 32), overflow=("saturate", "wrap"), chunks=((0, 0), (16, 16), (32, 20)),
                   weight_granularity=("channel", "tensor"), samples=samples, seed=seed)


# ----------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------
@dataclass
class ExploreResult:
    """The evaluated designs (``rows``: dicts, in the order they finished), the fronts, the preset."""

    rows: List[dict]
    score_name: str
    skipped: List[Design] = field(default_factory=list)  # not started: the time budget ran out
    tolerance: float = 0.0

    @property
    def preset(self) -> Optional[dict]:
        return next((r for r in self.rows if r["key"] == CHIP_PRESET.key), None)

    def front(self, cost: str = "energy_pj") -> List[dict]:
        """The designs no other design beats on score and ``cost`` ("energy_pj" or "bytes"), cheapest first."""
        ok = [r for r in self.rows if r.get("error") is None]
        out = [r for r in ok if not any(
            o["score"] >= r["score"] and o[cost] <= r[cost] and (o["score"] > r["score"] or o[cost] < r[cost])
            for o in ok)]
        return sorted(out, key=lambda r: r[cost])

    def beats_preset(self, strict: bool = False) -> List[dict]:
        """Designs with less energy than the chip preset and a score no lower than its score minus
        ``tolerance`` (equal fidelity), least energy first. ``strict``: agreement and SQNR no lower
        and KL no higher than the preset's too (a task metric on a small set can favour a design
        that changes more of the float model's decisions)."""
        p = self.preset
        if p is None:
            return []

        def fits(r):
            ok = r["energy_pj"] < p["energy_pj"] and r["score"] >= p["score"] - self.tolerance
            if strict:
                ok = ok and r["agreement"] >= p["agreement"] - self.tolerance and r["sqnr_db"] >= p["sqnr_db"] \
                    and r["kl"] <= p["kl"]
            return ok

        return sorted((r for r in self.rows if r.get("error") is None and fits(r)), key=lambda r: r["energy_pj"])

    def table(self, rows: Optional[List[dict]] = None) -> str:
        rows = sorted(self.rows if rows is None else rows, key=lambda r: r.get("energy_pj", math.inf))
        fe, fb = {r["key"] for r in self.front("energy_pj")}, {r["key"] for r in self.front("bytes")}
        head = ("design", self.score_name, "agreement", "KL", "SQNR dB", "bytes", "energy uJ", "pJ/MAC", "front",
                "s")
        body = []
        for r in rows:
            if r.get("error"):
                body.append((r["name"], "error: " + r["error"][:60], "", "", "", "", "", "", "", ""))
                continue
            mark = ("E" if r["key"] in fe else "") + ("B" if r["key"] in fb else "")
            body.append((r["name"] + (" (chip preset)" if r["key"] == CHIP_PRESET.key else ""), f"{r['score']:.4f}",
                         f"{r['agreement']:.4f}", f"{r['kl']:.2e}", f"{r['sqnr_db']:.1f}", f"{r['bytes']:,.0f}",
                         f"{r['energy_pj'] / 1e6:.3f}", f"{r['mac_pj']:.3f}", mark or "-", f"{r['seconds']:.0f}"))
        return (format_table(head, body, right=tuple(range(1, len(head)))) +
                "\nfront: E = on the score/energy front, B = on the score/bytes front")

    def __str__(self) -> str:
        lines = [self.table()]
        best = self.beats_preset()
        p = self.preset
        if p is not None:
            for strict, what in ((False, f"{self.score_name} >= preset - {self.tolerance:g}"),
                                 (True, "and agreement, SQNR, KL no worse")):
                best = self.beats_preset(strict)
                if best:
                    b = best[0]
                    lines.append(f"beats the chip preset at equal fidelity ({what}): {b['name']}, "
                                 f"{b['energy_pj'] / p['energy_pj']:.2f}x its energy ({self.score_name} "
                                 f"{b['score']:.4f} vs {p['score']:.4f}, agreement {b['agreement']:.4f} vs "
                                 f"{p['agreement']:.4f}, SQNR {b['sqnr_db']:.1f} vs {p['sqnr_db']:.1f} dB); "
                                 f"{len(best)} design(s) do")
                else:
                    lines.append(f"no design beats the chip preset on energy at equal fidelity ({what})")
        if self.skipped:
            lines.append(f"time budget: {len(self.skipped)} design(s) not started")
        return "\n".join(lines)

    def to_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(dict(score=self.score_name, tolerance=self.tolerance, rows=self.rows,
                                        front_energy=[r["key"] for r in self.front("energy_pj")],
                                        front_bytes=[r["key"] for r in self.front("bytes")],
                                        preset=CHIP_PRESET.key, beats_preset=[r["key"] for r in self.beats_preset()],
                                        beats_preset_strict=[r["key"] for r in self.beats_preset(True)],
                                        skipped=[d.key for d in self.skipped]), indent=2, default=str))
        return path

    def plot(self, path) -> Path:
        """A PNG: score against energy and against bytes; every design a dot, the front joined, the
        chip preset ringed in red, the designs that beat it in green, those far below the front
        hollow on the axis's floor."""
        from PIL import Image, ImageDraw

        path = Path(path)
        ok = [r for r in self.rows if r.get("error") is None]
        W, H, pad = 560, 400, 64
        img = Image.new("RGB", (2 * W, H), "white")
        d = ImageDraw.Draw(img)
        # The score axis spans the fronts and the preset; designs far below sit on its floor, hollow.
        keep = [r["score"] for r in (*self.front("energy_pj"), *self.front("bytes"))]
        if self.preset is not None:
            keep.append(self.preset["score"])
        top = max([r["score"] for r in ok] or [1.0])
        low = min(keep or [top])
        y0, y1 = low - 0.5 * (top - low + 1e-4), top + 0.1 * (top - low + 1e-4)
        beats = {r["key"] for r in self.beats_preset()}
        for panel, key, label, scale in ((0, "energy_pj", "energy per inference (uJ, log)", 1e-6),
                                         (1, "bytes", "stored bytes (log)", 1.0)):
            ox = panel * W
            xs = [math.log10(max(r[key] * scale, 1e-12)) for r in ok] or [0.0]
            x0, x1 = min(xs) - 0.02, max(xs) + 0.02

            def at(r, ox=ox, key=key, x0=x0, x1=x1, scale=scale):
                x = math.log10(max(r[key] * scale, 1e-12))
                return (ox + pad + (x - x0) / (x1 - x0) * (W - 2 * pad),
                        H - pad - (max(r["score"], y0) - y0) / (y1 - y0) * (H - 2 * pad))

            d.rectangle([ox + pad, pad, ox + W - pad, H - pad], outline="black")
            d.text((ox + W // 2 - 80, H - pad + 24), label, fill="black")
            d.text((ox + 4, pad - 24), self.score_name, fill="black")
            for v in (x0, x1):
                d.text((ox + pad + (v - x0) / (x1 - x0) * (W - 2 * pad) - 20, H - pad + 6), f"{10 ** v:,.3g}",
                       fill="black")
            for v in (y0, y1):
                d.text((ox + 4, H - pad - (v - y0) / (y1 - y0) * (H - 2 * pad) - 6), f"{v:.3f}", fill="black")
            front = self.front(key)
            if len(front) > 1:
                d.line([at(r) for r in front], fill=(40, 90, 200), width=2)
            for r in ok:
                x, y = at(r)
                color = (30, 150, 60) if r["key"] in beats else (40, 90, 200) if r in front else (150, 150, 150)
                below = r["score"] < y0
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=None if below else color, outline=color)
            p = self.preset
            if p is not None:
                x, y = at(p)
                d.ellipse([x - 8, y - 8, x + 8, y + 8], outline=(200, 30, 30), width=2)
                d.text((x + 10, y - 6), "chip preset", fill=(200, 30, 30))
        img.save(path)
        return path


# ----------------------------------------------------------------------------------------
# evaluating one design
# ----------------------------------------------------------------------------------------
def _outputs(model: nn.Module, items, forward_fn) -> torch.Tensor:
    from ..transforms.convert import call_model

    with torch.no_grad():
        outs = [call_model(model, x, forward_fn) for x in items]
    if not all(isinstance(o, torch.Tensor) for o in outs):
        raise ValueError("explore needs models whose outputs are tensors (pass forward_fn to pick one)")
    return torch.cat([o.detach().float() for o in outs])


def _fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Agreement, KL and SQNR of a design's outputs against the float model's (transforms.recover's measures)."""
    from ..transforms.recover import FidelityMeter

    meter = FidelityMeter()
    meter.add(out, ref)
    f = meter.result()
    return dict(agreement=f["agreement"], kl=f["kl"], sqnr_db=f["sqnr"])


class _Job:
    """Everything one design's evaluation reads (sent once to each worker process)."""

    def __init__(self, model, calib, evaluate, ref, targets, metric, base, chip, forward_fn):
        self.model, self.calib, self.evaluate, self.ref = model, calib, evaluate, ref
        self.targets, self.metric, self.base, self.chip, self.forward_fn = targets, metric, base, chip, forward_fn

    def run(self, design: Design) -> dict:
        import warnings

        from ..transforms.convert import convert
        from ..transforms.size import size_report

        t0 = time.perf_counter()
        row = dict(key=design.key, name=design.name, design=asdict(design))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = convert(self.model, design.config(self.base), calibration_data=self.calib,
                            forward_fn=self.forward_fn)
            out = _outputs(q, self.evaluate, self.forward_fn)
            row.update(_fidelity(out, self.ref))
            task = None if self.metric is None else float(self.metric(out, self.targets))
            row.update(task=task, score=task if task is not None else row["agreement"])
            row["bytes"] = float(size_report(q).total_bytes)
            first = self.evaluate[0]
            one = first[:1] if isinstance(first, torch.Tensor) else first
            report = cost_report(q, one, self.chip, forward_fn=self.forward_fn)
            row.update(energy_pj=report.energy_pj, mac_pj=report.energy_mac_pj / max(report.macs, 1),
                       macs=report.macs, error=None)
        except (ValueError, RuntimeError) as e:  # a design the network cannot take (say, an accumulator too narrow)
            row.update(error=" ".join(str(e).split()))
        row["seconds"] = time.perf_counter() - t0
        return row


_WORKER_JOB: Optional[_Job] = None


def _worker_init(job: _Job, threads: int) -> None:
    global _WORKER_JOB
    torch.set_num_threads(threads)
    _WORKER_JOB = job
    parent = os.getppid()

    def orphaned() -> None:  # a parent killed outright (SIGKILL, SIGTERM) cannot stop its pool: leave with it
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=orphaned, daemon=True).start()


def _worker_run(design: Design) -> dict:
    return _WORKER_JOB.run(design)


def _fingerprint(model: nn.Module, calib, evaluate) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(f"{tuple(t.shape)}{float(t.double().sum()) if t.numel() else 0:.10e}".encode())
    for items in (calib, evaluate):
        for x in items:
            if isinstance(x, torch.Tensor):
                h.update(f"{tuple(x.shape)}{float(x.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def _read_results(path: Path, fingerprint: str) -> Dict[str, dict]:
    if not path.is_file() or path.stat().st_size == 0:
        return {}
    lines = path.read_text().splitlines()
    head = json.loads(lines[0]) if lines else {}
    if head.get("explore") != 1:
        raise ValueError(f"{path} is not a torchlns.explore results file")
    if head.get("fingerprint") != fingerprint:
        raise ValueError(f"{path} holds results for another model or other data (fingerprint "
                         f"{head.get('fingerprint')}, this run {fingerprint}); give another results path")
    done = {}
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interrupted run
            continue
        done[row["key"]] = row
    return done


def explore(model: nn.Module, data, space: Optional[DesignSpace] = None, *, eval_data=None, targets=None,
            metric: Optional[Callable] = None, metric_name: str = "metric", base: Optional[ConvertConfig] = None,
            chip: Optional[ChipSpec] = None, results=None, workers: int = 1, time_budget: Optional[float] = None,
            tolerance: float = 0.0, progress: Optional[bool] = None, forward_fn=None) -> ExploreResult:
    """Evaluate every design of ``space`` on ``model`` (see Note: design-space exploration).

    ``data``: calibration items as ``torchlns.convert`` takes them; ``eval_data``: evaluation items
    (default: the second half of ``data``). ``targets``/``metric``: the task metric,
    ``metric(outputs, targets)`` on the concatenated evaluation outputs. ``base``: the rest of the
    conversion config. ``results``: a JSON-lines file to resume from and append to.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explore needs an nn.Module, got {type(model).__name__}")
    space = DesignSpace() if space is None else space
    if not isinstance(space, DesignSpace):
        raise TypeError(f"space must be a DesignSpace, got {type(space).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    data = list(data)
    if eval_data is None:
        if len(data) < 2:
            raise ValueError("explore needs calibration and evaluation items: give eval_data, or two or more items "
                             "in data (the first half calibrates, the second half evaluates)")
        data, eval_data = data[:len(data) // 2], data[len(data) // 2:]
    eval_data = list(eval_data)
    if (metric is None) != (targets is None):
        raise ValueError("metric and targets go together")
    model = model.eval()
    ref = _outputs(model, eval_data, forward_fn)
    base = ConvertConfig() if base is None else base
    job = _Job(model, data, eval_data, ref, targets, metric, base, CHIPS["edge"] if chip is None else chip, forward_fn)
    designs = space.designs()
    fingerprint = _fingerprint(model, data, eval_data)
    path = None if results is None else Path(results)
    done = {} if path is None else _read_results(path, fingerprint)
    rows = [done[d.key] for d in designs if d.key in done]
    todo = [d for d in designs if d.key not in done]
    if path is not None and not done:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(explore=1, fingerprint=fingerprint)) + "\n")
    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    skipped: List[Design] = []

    def finished(row: dict) -> None:
        rows.append(row)
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        if show:
            n = len(rows)
            el = time.perf_counter() - t0
            left = (len(designs) - n) * el / max(1, n - len(done))
            print(f"explore: {n}/{len(designs)} designs ({len(done)} resumed), {el:.0f} s, about {left:.0f} s left; "
                  f"{row['name']}: " + (f"score {row['score']:.4f}, {row['energy_pj'] / 1e6:.3f} uJ"
                                         if row.get('error') is None else "error"), file=sys.stderr, flush=True)

    def over_budget() -> bool:
        return time_budget is not None and time.perf_counter() - t0 > time_budget

    if workers == 1:
        for i, d in enumerate(todo):
            if over_budget():
                skipped = todo[i:]
                break
            finished(job.run(d))
    else:
        threads = max(1, torch.get_num_threads() // workers)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                    initargs=(job, threads)) as pool:
            pending = {}
            queue = list(todo)
            while queue or pending:
                while queue and len(pending) < workers and not over_budget():
                    d = queue.pop(0)
                    pending[pool.submit(_worker_run, d)] = d
                if not pending:
                    break
                ready, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in ready:
                    pending.pop(fut)
                    finished(fut.result())
            skipped = queue
    score_name = metric_name if metric is not None else "agreement"
    return ExploreResult(rows, score_name, skipped, tolerance)
