"""The main job: a segmentation network on driving scenes, converted to every format.

``python -m torchlns demo`` trains (or loads from ``--out``) a small segmentation CNN on
generated driving scenes (``torchlns.scenes``), converts it with batch-norm folding and
calibration to LNS8 (ideal and chip MACs), FP8 e4m3/e5m2 and INT8, and to LNS8 with
cluster compression plus centroid fine-tuning, and evaluates each on a held-out set. It
prints one row per format (mIoU, pixel accuracy, agreement with float, model bytes,
compression ratio) and what one scene costs on a small chip in each format (MACs, weight
bytes, on-chip fit, DRAM traffic, latency, energy: ``torchlns.compare_costs``), and writes a
Figure-1-style difference map (``difference_map.png``) and a markdown report (``report.md``)
to the output folder.

# Note: demo protocol
Training runs a fixed number of steps (not a time budget), so the numbers are the same on
every machine for a given seed and size. Calibration uses the first training batches;
evaluation uses a separate seed. Agreement with float counts the labelled pixels where the
converted and the float model predict the same class. The float model's trained weights
ship in the package (see Note: shipped weights).

# Note: demo fine-tuning
Clustering 16 centroids per layer leaves the model far from float (about 62 mIoU before any
fine-tuning), and fine-tuning on 2 CPU cores is most of the demo's time, so it is made to
converge in few, cheap steps: bias correction against the float model first (the mean error
each layer leaves, measured on the calibration batches), then distillation from the float
model (KL of the per-pixel class distributions, a richer signal than the labels) on random
crops of half the height and width (a quarter of the pixels, so a step costs about 0.3x; the
network is fully convolutional), in batches of 8. Measured on the default settings
(2026-12-07, 2 Zen 3 cores; mIoU points below float after fine-tuning, and its seconds):
batches of 8, 700 steps 0.88 (54 s), 1000 steps 0.62 (79 s); batches of 16, 800 steps 0.83
(89 s), and 800 steps of cross entropy on the same crops 1.51; batches of 4, 1000 steps
0.83 (54 s). The previous protocol (cross entropy on whole scenes, batches of 16) needed
1000 steps and about 250 s for 0.85, and 200 of them gave 2.32.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, FP8_E5M2, INT8, ConvertConfig

from ..metrics import agreement
from .progress import LogProgress, _progress  # noqa: F401 - re-exported: the jobs' progress lines
from .scenes import CLASSES, IGNORE_INDEX, PALETTE, SceneDataset

__all__ = ["SegNet", "DemoConfig", "Row", "batches", "train", "evaluate", "cluster", "finetune", "float_model", "run",
           "scene_data", "main", "add_arguments", "config_from_args", "cached_model"]


class SegNet(nn.Module):
    """A small encoder-decoder: 3x3 conv + BN + ReLU blocks, two downsamplings, skips."""

    def __init__(self, num_classes: int = len(CLASSES), width: int = 16):
        super().__init__()
        w = width

        def block(cin, cout, stride=1, dilation=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.enc1 = nn.Sequential(block(3, w), block(w, w))
        self.enc2 = nn.Sequential(block(w, 2 * w, 2), block(2 * w, 2 * w))
        self.enc3 = nn.Sequential(block(2 * w, 4 * w, 2), block(4 * w, 4 * w, dilation=2))
        self.dec2 = block(6 * w, 2 * w)
        self.dec1 = block(3 * w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.head(d1)


@dataclass
class DemoConfig:
    out: Path = Path("torchlns-demo")
    height: int = 64
    width: int = 128
    n_train: int = 2048
    n_eval: int = 64
    train_steps: int = 500
    batch_size: int = 16
    net_width: int = 16
    clusters: int = 16
    finetune_steps: int = 800
    finetune_batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    retrain: bool = False


@dataclass
class Row:
    name: str
    miou: float
    pixel_acc: float
    agreement: float
    bytes: float
    ratio: float
    seconds: float


def batches(ds, batch_size: int, shuffle_seed: Optional[int] = None):
    """(images, labels) batches of a ``SceneDataset``, in order or shuffled by a seed."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(shuffle_seed)) \
        if shuffle_seed is not None else torch.arange(len(ds))
    for i in range(0, len(ds), batch_size):
        idx = order[i:i + batch_size]
        yield ds.images[idx], ds.labels[idx]


def _segmentation_loss(model, x, y):
    return F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX)


def train(model: nn.Module, ds: SceneDataset, steps: int, batch_size: int, lr: float, device, seed: int,
          params=None, desc: str = "training", loss=_segmentation_loss, clip: Optional[float] = None) -> nn.Module:
    """Adam with a cosine schedule on ``loss(model, x, y)`` (default: cross entropy ignoring
    IGNORE_INDEX) over shuffled ``batches`` of ``ds``; ``clip`` bounds the gradient's norm."""
    model.train().to(device)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    torch.manual_seed(seed)
    epoch, done = 0, 0
    bar = _progress(range(steps), desc)
    while done < steps:
        for x, y in batches(ds, batch_size, shuffle_seed=seed * 1000 + epoch):
            if done == steps:
                break
            value = loss(model, x.to(device), y.to(device))
            opt.zero_grad(set_to_none=True)
            value.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params if params is not None else model.parameters(), clip)
            opt.step()
            sched.step()
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{value.item():.3f}")
        epoch += 1
    bar.close()
    return model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, ds: SceneDataset, batch_size: int, device, desc: str = "evaluating"):
    """(ConfusionMatrix, predictions (N, H, W) uint8) of ``model`` on ``ds``."""
    from ..metrics import ConfusionMatrix

    model.eval()
    cm = ConfusionMatrix(len(CLASSES), ignore_index=IGNORE_INDEX, device=device)
    preds = []
    for x, y in _progress(batches(ds, batch_size), desc, total=math.ceil(len(ds) / batch_size)):
        p = model(x.to(device)).argmax(1)
        cm.update(p, y.to(device))
        preds.append(p.to(torch.uint8).cpu())
    return cm, torch.cat(preds)


def finetune(converted: nn.Module, ds: SceneDataset, cfg: DemoConfig, teacher: nn.Module,
             calib: Sequence[torch.Tensor]) -> nn.Module:
    """Centroid fine-tuning through the chip's quantization (see Note: demo fine-tuning): bias
    correction against ``teacher`` (the float model) on ``calib``, then distillation from it on
    random half-size crops. Every float master trains (centroids, per-kernel scales, the
    unclustered layers' weights) and every bias; the cluster indices are buffers and stay fixed,
    so the model keeps its size. ``train`` returns the model in ``eval()``, which re-encodes the
    masters and runs the exact chip forward."""
    converted.eval()
    torchlns.bias_correction(converted, teacher, list(calib), inplace=True)
    folded = torchlns.fold_batchnorm(teacher).eval()
    g = torch.Generator().manual_seed(cfg.seed + 2)

    def crop_distillation(model, x, y):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        i = int(torch.randint(0, x.shape[-2] - h + 1, (1,), generator=g))
        j = int(torch.randint(0, x.shape[-1] - w + 1, (1,), generator=g))
        x = x[..., i:i + h, j:j + w]
        with torch.no_grad():
            target = folded(x).log_softmax(1)
        return F.kl_div(model(x).log_softmax(1), target, log_target=True, reduction="none").sum(1).mean()
    return train(converted, ds, cfg.finetune_steps, cfg.finetune_batch_size, 3e-3, cfg.device, cfg.seed + 1,
                 desc="fine-tuning centroids", loss=crop_distillation)


def cluster(model: nn.Module, cfg: DemoConfig) -> nn.Module:
    """Fold BN, then cluster every 3x3 conv but the first (3 input channels: 48 kernels, little to
    gain and the most sensitive layer) with ``cfg.clusters`` centroids per layer."""
    return torchlns.cluster_kernels(torchlns.fold_batchnorm(model), cfg.clusters, scope="layer",
                                    filter_fn=lambda m, fqn: m.in_channels > 3, seed=cfg.seed)


# Note: shipped weights
# Training the demo's float SegNet is most of a first run's time on a laptop-class CPU and is
# not what the demo shows, so its trained weights ship in the package
# (``torchlns/apps/weights/segnet_float.pt``, about 430 KB), written by this module's own
# ``train`` with the default settings: ``python -m torchlns demo --retrain --out D`` rewrites
# D/segnet_float.pt, which is that file. They are used only when their key (every training
# setting, and a checksum of the first generated scenes, which must agree to 1e-5) matches
# this run's; any other settings train, as does ``--retrain``. A test checks that the shipped
# key still matches the defaults and the scene generator, and that the weights score.
WEIGHTS = Path(__file__).resolve().parent / "weights"


def _same_key(saved, key: dict) -> bool:
    """Equal training settings; the data checksums (float sums, which differ between CPUs in
    their last bits) within 1e-5."""
    if not isinstance(saved, dict) or set(saved) != set(key):
        return False
    for k, v in key.items():
        if k == "data":
            if not isinstance(saved[k], float) or abs(saved[k] - v) > 1e-5 * max(1.0, abs(v)):
                return False
        elif saved[k] != v:
            return False
    return True


def cached_model(path: Path, model: nn.Module, key: dict, fit, log, what: str, retrain: bool = False,
                 shipped: Optional[Path] = None) -> nn.Module:
    """``model`` with the weights saved at ``path`` (or else ``shipped``, see Note: shipped weights)
    if they were trained with settings ``key`` (and not ``retrain``); else ``fit(model)`` trains
    it, and it is saved at ``path`` with ``key``."""
    for source, where in ((path, f"from {path}"), (shipped, "shipped with torchlns (--retrain trains it again)")):
        if retrain or source is None or not source.is_file():
            continue
        saved = torch.load(source, weights_only=True)
        if _same_key(saved.get("key"), key):
            model.load_state_dict(saved["state_dict"])
            log(f"loaded the trained {what} {where}")
            return model.eval()
    t = time.time()
    fit(model)
    log(f"trained the {what}: {key['steps']} steps in {time.time() - t:.0f} s")
    torch.save({"key": key, "state_dict": model.state_dict()}, path)
    return model.eval()


def float_model(cfg: DemoConfig, train_ds: SceneDataset, log) -> nn.Module:
    """The trained float SegNet: loaded from ``cfg.out`` if trained with these settings, else trained and saved."""
    torch.manual_seed(cfg.seed)
    model = SegNet(width=cfg.net_width).to(cfg.device)
    key = dict(height=cfg.height, width=cfg.width, n_train=len(train_ds), steps=cfg.train_steps,
               net_width=cfg.net_width, seed=cfg.seed, data=float(train_ds.images[:4].sum()))
    return cached_model(cfg.out / "segnet_float.pt", model, key,
                        lambda m: train(m, train_ds, cfg.train_steps, cfg.batch_size, 3e-3, cfg.device, cfg.seed),
                        log, "float model", cfg.retrain, shipped=WEIGHTS / "segnet_float.pt")


def scene_data(cfg: DemoConfig):
    """(training, evaluation) scene datasets of the demo protocol (see Note: demo protocol)."""
    return (SceneDataset(cfg.n_train, cfg.height, cfg.width, seed=cfg.seed),
            SceneDataset(cfg.n_eval, cfg.height, cfg.width, seed=cfg.seed + 1_000))


def run(cfg: DemoConfig, log=print, data=None) -> List[Row]:
    """The demo; ``data`` = (train, eval) ``SceneDataset``s replaces the generated scenes."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    if data is None:
        log(f"generating {cfg.n_train} training and {cfg.n_eval} evaluation scenes ({cfg.height}x{cfg.width})")
        data = scene_data(cfg)
    train_ds, eval_ds = data
    model = float_model(cfg, train_ds, log)
    calib = [x for x, _ in list(batches(train_ds, cfg.batch_size))[:8]]
    float_bytes = torchlns.size_report(model).total_bytes

    rows: List[Row] = []
    preds = {}
    models = {"float32 (BN folded)": torchlns.fold_batchnorm(model)}

    def add(name: str, m: nn.Module, t0: float):
        if name != "float32":
            models[name] = m
        cm, p = evaluate(m, eval_ds, cfg.batch_size, device, desc=name)
        agree = agreement(p, preds.get("float32", p), ignore_mask=eval_ds.labels == IGNORE_INDEX)
        size = torchlns.size_report(m).total_bytes
        preds[name] = p
        rows.append(Row(name, cm.mean_iou(), cm.pixel_accuracy(), agree, size, float_bytes / size, time.time() - t0))
        r = rows[-1]
        log(f"  {name:<22} mIoU {100 * r.miou:6.2f}  pixel acc {100 * r.pixel_acc:6.2f}  "
            f"agreement {100 * r.agreement:6.2f}%  {r.bytes / 1024:8.1f} KiB  {r.ratio:5.1f}x  ({r.seconds:.0f} s)")

    log("evaluating (float32, then each converted model)")
    add("float32", model, time.time())
    for name, config in [("LNS8 ideal", ConvertConfig()), ("LNS8 chip", ConvertConfig(mac=CHIP_MAC)),
                         ("FP8 e4m3", ConvertConfig(fmt=FP8_E4M3)), ("FP8 e5m2", ConvertConfig(fmt=FP8_E5M2)),
                         ("INT8", ConvertConfig(fmt=INT8))]:
        t0 = time.time()
        add(name, torchlns.convert(model, config, calib), t0)

    t0 = time.time()
    clustered = torchlns.convert(cluster(model, cfg), ConvertConfig(qat=True, qat_forward="fake"), calib)
    finetune(clustered, train_ds, cfg, model, calib)
    add(f"LNS8 + cluster C={cfg.clusters}", clustered, t0)

    # Costs depend on formats and shapes, not on the weights' values: the fine-tuned clustered model
    # runs the ideal MAC, so the chip-MAC clustered model is costed too (calibrated, not fine-tuned).
    models[f"LNS8 chip + cluster C={cfg.clusters} (cost only)"] = torchlns.convert(
        cluster(model, cfg), ConvertConfig(mac=CHIP_MAC), calib)
    costs = torchlns.compare_costs(models, eval_ds.images[:1].to(device), COST_CHIP)
    log(f"cost of one {cfg.height}x{cfg.width} scene on the {COST_CHIP.name} chip (torchlns.cost_report):")
    log(costs.table())
    _write_figure(cfg.out / "difference_map.png", eval_ds, preds["float32"], preds["LNS8 chip"], "LNS8 chip")
    (cfg.out / "report.md").write_text(_report(cfg, rows, costs))
    log(f"wrote {cfg.out / 'difference_map.png'} and {cfg.out / 'report.md'}")
    return rows


# ----------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------
# The demo's net is small (427 KB in float32, about 108 KB in 8 bits, about 20 KB clustered at its
# default width), so on the edge preset everything fits and the table would only show MAC energy.
# The micro preset's 64 KiB of weight SRAM is where the fit question has an answer for it: float32
# and the 8-bit formats stream most of their weights from DRAM, the clustered model does not.
COST_CHIP = torchlns.CHIPS["micro"]

TARGETS = (  # (row, points of mIoU it may lose against float32, minimum compression ratio)
    ("LNS8 ideal", 0.5, None),
    ("LNS8 chip", 1.0, None),
    ("LNS8 + cluster", 1.0, 20.0),
)


def table(rows: Sequence[Row]) -> str:
    head = "| format | mIoU % | pixel acc % | agreement with float % | model bytes | vs float32 |\n" \
           "|---|---:|---:|---:|---:|---:|\n"
    return head + "".join(f"| {r.name} | {100 * r.miou:.2f} | {100 * r.pixel_acc:.2f} | {100 * r.agreement:.2f} | "
                          f"{r.bytes:,.0f} | {r.ratio:.1f}x |\n" for r in rows)


def target_lines(rows: Sequence[Row]) -> List[str]:
    base = rows[0]
    out = []
    for prefix, points, ratio in TARGETS:
        r = next((r for r in rows if r.name.startswith(prefix)), None)
        if r is None:
            continue
        drop = 100 * (base.miou - r.miou)
        ok = drop <= points
        where = f"{drop:.2f} points below" if drop >= 0 else f"{-drop:.2f} points above"
        line = f"- {r.name}: mIoU {where} float32 (target: at most {points} below) — " + (
            "met" if ok else f"**missed by {drop - points:.2f} points**")
        if ratio is not None:
            line += f"; {r.ratio:.1f}x smaller (target: at least {ratio:.0f}x) — " + (
                "met" if r.ratio >= ratio else f"**missed by {ratio - r.ratio:.1f}x**")
        out.append(line)
    return out


def _cost_section(cfg: DemoConfig, costs) -> str:
    chip = costs.chip
    e = chip.energies
    return (
        f"## What it costs on a chip\n\n`torchlns.cost_report` of one {cfg.height}x{cfg.width} scene on the "
        f"`{chip.name}` chip preset: {chip.note}. It shows what the format buys in energy per MAC and what "
        "clustering buys in on-chip fit. The fine-tuned clustered model above runs the ideal MAC; the last row is "
        "the same clustering on the chip's MAC (LUT conversion, fixed accumulator), calibrated but not "
        "fine-tuned, costed for the like-for-like comparison with LNS8 chip.\n\n" + costs.table(markdown=True) +
        "\nAssumptions (see Note: cost model in `torchlns/deploy/cost.py`): MACs counted exactly from the layer "
        "shapes; weight bytes are the weight image's (`torchlns.export`); weights placed in SRAM greedily in "
        "layer order, the rest streamed from DRAM on every inference; a layer's activations spill to DRAM when "
        "its input and output do not fit the activation SRAM together; every byte moves once per layer call; "
        "latency is a per-layer roofline on the same MAC array for every format. Energy per operation from "
        f"Horowitz (ISSCC 2014, 45 nm): fp32 mult {e.fp32_mult} + add {e.fp32_add} pJ, int8 mult {e.int8_mult}, "
        f"int8 add {e.int8_add}, int32 add {e.int32_add} pJ; SRAM {e.sram_per_64b(chip.sram_bank_bytes):g} pJ "
        f"per 64-bit access ({chip.sram_bank_bytes // 1024} KiB banks), DRAM {e.dram_64b / 1000:g} nJ per 64 "
        "bits. FP8 is charged an int8 multiply and an fp32 add; an LNS MAC is an 8-bit add of the logs, its "
        "conversion (the table read, and the shift into the fixed accumulator, counted in 2:1-multiplexer bits at "
        f"an assumed {e.mux2_bit} pJ each) and the accumulate (int32 add and its saturation on the chip's fixed "
        "accumulator, fp32 add on the ideal one).\n\n")


def _report(cfg: DemoConfig, rows: Sequence[Row], costs=None) -> str:
    return (
        "# torchlns demo: segmentation of generated driving scenes\n\n"
        f"SegNet (width {cfg.net_width}) trained {cfg.train_steps} steps on {cfg.n_train} scenes of "
        f"{cfg.height}x{cfg.width}; evaluated on {cfg.n_eval} held-out scenes; classes: {', '.join(CLASSES)}. "
        "Every converted model has its batch norms folded and is calibrated on 8 training batches; "
        f"the clustered one has {cfg.clusters} centroids per 3x3 layer (all but the first) and had "
        f"{cfg.finetune_steps} steps of centroid fine-tuning (bias correction, then distillation from the float "
        "model on half-size crops). Model bytes count every stored field at its bit width "
        "(`torchlns.size_report`).\n\n" + table(rows) + "\nTargets:\n\n" + "\n".join(target_lines(rows)) +
        "\n\n" + (_cost_section(cfg, costs) if costs is not None else "") +
        "![difference map](difference_map.png)\n\n"
        "Difference map, per scene: image, ground truth, float32 prediction, LNS8 chip prediction, "
        "pixels where the two predictions differ (red, each drawn 3x3; the exact count and share of "
        "labelled pixels under the panel), float32 errors and LNS8 chip errors against the ground truth "
        "(the same; ignored pixels grey). The legend at the bottom names the class colours.\n")


FIGURE_FONT_PX = 15  # titles and captions, legible at 100% zoom


def _font(px: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=px)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _write_figure(path: Path, ds: SceneDataset, float_pred, conv_pred, conv_name: str, n: int = 4,
                  scale: int = 3) -> List[List[tuple]]:
    """The Figure-1 difference map. Returns, per scene, (differing pixels, share) of each red panel.

    Each row: image, ground truth, float32, the converted model, where the two predictions
    differ, and each model's errors against the ground truth. Red pixels are drawn 3x3 (the
    count under each panel is exact), so that one differing pixel cannot be missed. A legend
    names the class colours.
    """
    from PIL import Image, ImageDraw

    palette = torch.tensor(PALETTE + ((0, 0, 0),), dtype=torch.uint8)
    red, grey, dark = torch.tensor([235, 20, 20], dtype=torch.uint8), 110, 40

    def colour(labels):
        lab = labels.long().clone()
        lab[lab >= len(PALETTE)] = len(PALETTE)
        return palette[lab]

    def mask(m, ignore):
        img = torch.full((*m.shape, 3), dark, dtype=torch.uint8)
        img[ignore] = grey
        grown = F.max_pool2d(m[None, None].float(), 3, 1, 1)[0, 0] > 0  # visible at any zoom
        img[grown] = red
        return img

    titles = ("image", "ground truth", "float32", conv_name, f"{conv_name} vs float32", "float32 errors",
              f"{conv_name} errors")
    font = _font(FIGURE_FONT_PX)
    line = FIGURE_FONT_PX + 6
    H, W = ds.labels.shape[1:]
    panel_w = (W + 2) * scale
    rows, counts = [], []
    for i in range(min(n, len(ds))):
        y = ds.labels[i]
        ignore = y == IGNORE_INDEX
        fp, cp = float_pred[i].long(), conv_pred[i].long()
        fp_shown, cp_shown = fp.masked_fill(ignore, len(PALETTE)), cp.masked_fill(ignore, len(PALETTE))
        diffs = [(fp != cp) & ~ignore, (fp != y) & ~ignore, (cp != y) & ~ignore]
        valid = int((~ignore).sum())
        counts.append([(int(d.sum()), int(d.sum()) / max(valid, 1)) for d in diffs])
        panels = [(ds.images[i].permute(1, 2, 0) * 255).round().to(torch.uint8), colour(y), colour(fp_shown),
                  colour(cp_shown), *(mask(d, ignore) for d in diffs)]
        sep = torch.full((H, 2, 3), 255, dtype=torch.uint8)
        rows.append(torch.cat([t for p in panels for t in (p, sep)][:-1], dim=1))
    legend = [(CLASSES[k], tuple(PALETTE[k])) for k in range(len(PALETTE))] + [
        ("not labelled", (0, 0, 0)), ("differs (drawn 3x3)", tuple(red.tolist())), ("not labelled, red panels", (grey,) * 3)]
    width = len(titles) * panel_w
    height = line + len(rows) * (H * scale + line) + 2 * line
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, title in enumerate(titles):
        draw.text((k * panel_w + 2, 2), title, fill="black", font=font)
    top = line
    for row, row_counts in zip(rows, counts):
        grid = row.numpy()
        canvas.paste(Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST),
                     (0, top))
        top += H * scale
        for k, (px, share) in enumerate(row_counts):
            draw.text(((4 + k) * panel_w + 2, top + 2), f"{px:,} px ({share:.2%})", fill="black", font=font)
        top += line
    x = 2
    for name, rgb in legend:  # the colour key
        draw.rectangle((x, top + 6, x + FIGURE_FONT_PX, top + 6 + FIGURE_FONT_PX), fill=rgb, outline="black")
        draw.text((x + FIGURE_FONT_PX + 4, top + 6), name, fill="black", font=font)
        x += FIGURE_FONT_PX + 14 + int(draw.textlength(name, font=font))
    canvas.save(path)
    return counts


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="torchlns demo", description=__doc__.split("\n\n")[1])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser, d: Optional[DemoConfig] = None) -> None:
    """The job's flags, with defaults from ``d`` (a ``DemoConfig`` or a subclass)."""
    d = d or DemoConfig()
    from .cli import nonnegative_int, positive_int

    p.add_argument("--out", type=Path, default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--device", default=d.device, help=f"cpu or cuda (default {d.device})")
    p.add_argument("--size", type=positive_int, nargs=2, default=(d.height, d.width), metavar=("H", "W"),
                   help=f"image height and width (default {d.height} {d.width})")
    p.add_argument("--n-train", type=positive_int, default=d.n_train,
                   help=f"generated training images (default {d.n_train})")
    p.add_argument("--n-eval", type=positive_int, default=d.n_eval,
                   help=f"generated evaluation images (default {d.n_eval})")
    p.add_argument("--train-steps", type=nonnegative_int, default=d.train_steps,
                   help=f"float training steps (default {d.train_steps})")
    p.add_argument("--finetune-steps", type=nonnegative_int, default=d.finetune_steps,
                   help=f"fine-tuning steps of the clustered model through the chip (default {d.finetune_steps})")
    p.add_argument("--finetune-batch-size", type=positive_int, default=d.finetune_batch_size,
                   help=f"fine-tuning batch size (default {d.finetune_batch_size})")
    p.add_argument("--clusters", type=positive_int, default=d.clusters,
                   help=f"centroids per layer for cluster compression (default {d.clusters})")
    p.add_argument("--net-width", type=positive_int, default=d.net_width,
                   help=f"channels of the network's first stage (default {d.net_width})")
    p.add_argument("--seed", type=nonnegative_int, default=d.seed, help=f"random seed (default {d.seed})")
    p.add_argument("--retrain", action="store_true", help="train even if a trained model is in --out")


def config_from_args(args: argparse.Namespace, cls=DemoConfig) -> DemoConfig:
    return cls(out=args.out, height=args.size[0], width=args.size[1], n_train=args.n_train, n_eval=args.n_eval,
               train_steps=args.train_steps, net_width=args.net_width,
               clusters=args.clusters, finetune_steps=args.finetune_steps,
               finetune_batch_size=args.finetune_batch_size, device=args.device, seed=args.seed,
               retrain=args.retrain)


def run_from_args(args: argparse.Namespace, data=None) -> int:
    """Run the demo from parsed ``add_arguments`` flags; ``data`` as in ``run``."""
    cfg = config_from_args(args)
    t = time.time()
    rows = run(cfg, data=data)
    print()
    print(table(rows))
    print("\n".join(target_lines(rows)))
    print(f"\ndone in {time.time() - t:.0f} s; report: {cfg.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
