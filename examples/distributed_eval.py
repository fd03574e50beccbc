"""Data-parallel evaluation of a converted segmentation model with torchrun.

    torchrun --nproc_per_node 2 examples/distributed_eval.py --smoke      # 2 CPU processes (gloo)
    torchrun --nproc_per_node 8 examples/distributed_eval.py --device cuda --format lns8-chip   # NCCL

Rank 0 trains the demo's SegNet (or reuses the one saved in ``--out``) and saves it; every
rank loads it, converts it identically (same calibration batches, deterministic
calibration), and evaluates every ``world_size``-th scene of the evaluation set. The
confusion matrices are all-reduced, so each rank ends with the whole set's mIoU. With
``--check`` rank 0 also evaluates the whole set alone and confirms the matrices are equal.
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, INT8, ConvertConfig
from torchlns.apps import demo
from torchlns.metrics import ConfusionMatrix
from torchlns.apps.scenes import CLASSES, IGNORE_INDEX

FORMATS = {"lns8": ConvertConfig(), "lns8-chip": ConvertConfig(mac=CHIP_MAC), "fp8-e4m3": ConvertConfig(fmt=FP8_E4M3),
           "int8": ConvertConfig(fmt=INT8)}


@torch.no_grad()
def confusion(model, images, labels, device, batch_size=16) -> ConfusionMatrix:
    cm = ConfusionMatrix(len(CLASSES), ignore_index=IGNORE_INDEX, device=device)
    for i in range(0, len(labels), batch_size):
        cm.update(model(images[i:i + batch_size].to(device)).argmax(1), labels[i:i + batch_size].to(device))
    return cm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--format", choices=sorted(FORMATS), default="lns8-chip")
    p.add_argument("--out", type=Path, default=Path("torchlns-demo"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    p.add_argument("--check", action="store_true", help="rank 0 also evaluates alone and compares")
    args = p.parse_args(argv)
    cfg = demo.DemoConfig(out=args.out, device=args.device)
    if args.smoke:
        cfg = demo.DemoConfig(out=args.out, device=args.device, height=32, width=64, n_train=64, n_eval=12,
                              train_steps=10, net_width=8)
    cuda = args.device.startswith("cuda")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    cfg.device = str(device)
    cfg.out.mkdir(parents=True, exist_ok=True)
    train_ds, eval_ds = demo.scene_data(cfg)
    if rank == 0:
        demo.float_model(cfg, train_ds, log=print)  # trains once, or finds the saved model
    dist.barrier()
    model = demo.float_model(cfg, train_ds, log=lambda *_: None)  # every rank loads the saved model
    calib = [x for x, _ in list(demo.batches(train_ds, cfg.batch_size))[:8]]
    converted = torchlns.convert(model, FORMATS[args.format], [c.to(device) for c in calib])
    shard = slice(rank, None, world)
    cm = confusion(converted, eval_ds.images[shard], eval_ds.labels[shard], device).all_reduce()
    if rank == 0:
        print(f"{world} processes ({dist.get_backend()}), {args.format}: {len(eval_ds)} scenes, "
              f"mIoU {100 * cm.mean_iou():.2f}%, pixel accuracy {100 * cm.pixel_accuracy():.2f}%")
        if args.check:
            alone = confusion(converted, eval_ds.images, eval_ds.labels, device)
            print(f"matches single-process evaluation: {torch.equal(alone.matrix, cm.matrix)}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
