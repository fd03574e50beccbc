"""``torchlns explore``: sweep chip designs on a network and print the Pareto front.

Convert the network once per chip design (LNS bits and F, conversion and LUT width,
accumulator width, saturation or wrap-around, two-stage chunks, weight granularity,
optionally clustering), measure its fidelity against the float network on held-out data
(task metric, argmax agreement, KL, SQNR), its stored bytes and its energy per inference on
the cost model's chip, and print the designs with the fronts of fidelity against energy and
against bytes, the chip preset marked. Without MODEL it sweeps the demo network (the trained
SegNet shipped with torchlns) on generated driving scenes, scored by mIoU. Results go to
OUT/results.jsonl as they finish, so an interrupted run resumes; OUT/explore.json and
OUT/explore.png hold the table and the front.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import List, Optional

import torch

from ..deploy.explore import DesignSpace, explore

DEMO_CALIB_SCENES, DEMO_EVAL_SCENES = 32, 16


def demo_miou(outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """mIoU of segmentation logits (N, classes, H, W) against the scenes' labels (N, H, W)."""
    from ..metrics import ConfusionMatrix
    from .scenes import CLASSES, IGNORE_INDEX

    cm = ConfusionMatrix(len(CLASSES), ignore_index=IGNORE_INDEX)
    cm.update(outputs.argmax(1), labels)
    return float(cm.mean_iou())


def demo_problem(calib_scenes: int = DEMO_CALIB_SCENES, eval_scenes: int = DEMO_EVAL_SCENES, batch: int = 8):
    """(float SegNet with its shipped weights, calibration batches, evaluation batches, labels):
    calibration scenes from the demo's training seed, evaluation scenes from its held-out seed."""
    from .demo import WEIGHTS, DemoConfig, SegNet
    from .scenes import SceneDataset

    cfg = DemoConfig()
    model = SegNet(width=cfg.net_width)
    model.load_state_dict(torch.load(WEIGHTS / "segnet_float.pt", weights_only=True)["state_dict"])
    train = SceneDataset(calib_scenes, cfg.height, cfg.width, seed=cfg.seed)
    held = SceneDataset(eval_scenes, cfg.height, cfg.width, seed=cfg.seed + 1_000)
    calib = [train.images[i:i + batch] for i in range(0, calib_scenes, batch)]
    evaluate = [held.images[i:i + batch] for i in range(0, eval_scenes, batch)]
    return model.eval(), calib, evaluate, held.labels


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _words(text: str) -> List[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _chunks(text: str) -> List[tuple]:
    out = []
    for v in _words(text):
        L, _, W1 = v.partition("x")
        out.append((int(L), int(W1 or 0)))
    return out


def _clusters(text: str) -> List[Optional[int]]:
    return [None if v == "none" else int(v) for v in _words(text)]


def space_from_args(args: argparse.Namespace) -> DesignSpace:
    base = DesignSpace.architect()
    given = dict(bits=args.bits, frac_bits=args.frac_bits, conversion=args.conversion, lut_bits=args.lut_bits,
                 acc_bits=args.acc_bits, overflow=args.overflow, chunks=args.chunks,
                 weight_granularity=args.weight_granularity, clusters=args.clusters)
    fields = {k: v for k, v in given.items() if v is not None}
    import dataclasses

    return dataclasses.replace(base, samples=args.samples or None, seed=args.seed, **fields)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import DATA_HELP, _data_options, _loading_options, _positive_int

    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a float model (state_dict with --model-class, a pickled module with --trust-pickle, or "
                        "--model-factory); default: the demo network on generated scenes")
    p.add_argument("--calib", metavar="DATA", help="MODEL's calibration inputs: " + DATA_HELP)
    p.add_argument("--data", metavar="DATA", help="MODEL's evaluation inputs (with targets: the score is top-1 "
                                                  "accuracy; else argmax agreement): " + DATA_HELP)
    p.add_argument("--bits", type=_ints, metavar="B,...", help="LNS bits (default 6,7,8,10)")
    p.add_argument("--frac-bits", type=_ints, metavar="F,...", help="fraction bits F (default 2,3,4)")
    p.add_argument("--conversion", type=_words, metavar="C,...", help="lut, mitchell, exact (default lut,mitchell)")
    p.add_argument("--lut-bits", type=_ints, metavar="P,...", help="LUT widths (default 5,6,8)")
    p.add_argument("--acc-bits", type=_ints, metavar="W,...", help="accumulator widths (default 16,20,24,32)")
    p.add_argument("--overflow", type=_words, metavar="O,...", help="saturate, wrap (default both)")
    p.add_argument("--chunks", type=_chunks, metavar="LxW1,...",
                   help="two-stage accumulation: chunks of L products at W1 bits; 0x0 is one stage "
                        "(default 0x0,16x16,32x20)")
    p.add_argument("--weight-granularity", type=_words, metavar="G,...", help="channel, tensor, block "
                                                                               "(default channel,tensor)")
    p.add_argument("--clusters", type=_clusters, metavar="C,...", help="kernel clusters, or none (default none)")
    p.add_argument("--samples", type=int, default=48, metavar="N",
                   help="evaluate a seeded random sample of N designs, the chip preset among them (0: the whole "
                        "grid; default 48)")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    p.add_argument("--workers", type=_positive_int, default=max(1, min(os.cpu_count() or 1, 8)), metavar="N",
                   help="processes evaluating designs in parallel (default: the CPU count, at most 8)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS", help="start no design after this many seconds")
    p.add_argument("--tolerance", type=float, default=0.0, metavar="T",
                   help="equal fidelity: a score no lower than the chip preset's minus T (default 0)")
    p.add_argument("--calib-scenes", type=_positive_int, default=DEMO_CALIB_SCENES, metavar="N",
                   help=f"demo network: calibration scenes (default {DEMO_CALIB_SCENES})")
    p.add_argument("--eval-scenes", type=_positive_int, default=DEMO_EVAL_SCENES, metavar="N",
                   help=f"demo network: held-out evaluation scenes (default {DEMO_EVAL_SCENES})")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="batch size (default 8)")
    p.add_argument("-o", "--out", default="torchlns-explore", metavar="OUT",
                   help="folder for results.jsonl (resumable), explore.json and explore.png (default "
                        "torchlns-explore)")
    _loading_options(p)
    _data_options(p)


def run_from_args(args: argparse.Namespace) -> int:
    from .cli import CLIError, build_model, data_from_args, model_name

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"-o {args.out} is a file; give a folder")
    try:
        space = space_from_args(args)
        space.designs()
    except (TypeError, ValueError) as e:
        raise CLIError(f"design space: {e}") from None
    targets = metric = None
    metric_name = "agreement"
    if args.model is None and args.model_factory is None:
        if args.calib or args.data:
            raise CLIError("--calib and --data are for MODEL; without it, explore sweeps the demo network")
        model, calib, evaluate, targets = demo_problem(args.calib_scenes, args.eval_scenes, args.batch_size)
        metric, metric_name, name = demo_miou, "mIoU", "the demo SegNet"
    else:
        if not (args.calib and args.data):
            raise CLIError("explore MODEL needs --calib DATA (calibration) and --data DATA (evaluation), kept apart")
        model = build_model(args.model, args)
        name = model_name(args.model, args)
        calib = data_from_args(args.calib, args).items(args.batch_size)
        held = data_from_args(args.data, args)
        evaluate = held.items(args.batch_size)
        if held.targets is not None:
            from ..metrics import top1_accuracy

            targets, metric, metric_name = held.targets, top1_accuracy, "top-1"
    out.mkdir(parents=True, exist_ok=True)
    designs = space.designs()
    print(f"explore: {len(designs)} designs of {name}, {args.workers} worker(s)"
          + (f", time budget {args.time_budget:g} s" if args.time_budget else "") + f"; results in {out}")
    t0 = time.time()
    try:
        result = explore(model, calib, space, eval_data=evaluate, targets=targets, metric=metric,
                         metric_name=metric_name, results=out / "results.jsonl", workers=args.workers,
                         time_budget=args.time_budget, tolerance=args.tolerance, progress=True)
    except ValueError as e:
        raise CLIError(f"explore failed: {' '.join(str(e).split())}") from None
    print(result)
    print(f"wrote {result.to_json(out / 'explore.json')} and {result.plot(out / 'explore.png')} "
          f"({len(result.rows)} designs, {time.time() - t0:.0f} s)")
    return 0
