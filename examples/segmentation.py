"""Semantic segmentation of driving scenes: float32 against every chip format.

    python examples/segmentation.py                   # the demo's defaults: a few minutes on a CPU
    python examples/segmentation.py --smoke           # tiny settings, seconds (what CI runs)
    python examples/segmentation.py --device cuda --size 128 256 --n-train 8192 --train-steps 4000
    python examples/segmentation.py --cityscapes /data/cityscapes --size 128 256

A small CNN is trained on generated scenes (or on a Cityscapes-style folder: train on its
``train`` split, evaluate on ``val``), then converted with batch-norm folding to LNS8 (ideal
and chip MACs), FP8, INT8, and LNS8 with cluster compression and centroid fine-tuning. The
table, a Figure-1-style difference map and a markdown report land in ``--out``.
"""

import argparse
import sys

from torchlns.apps import demo
from torchlns.apps.scenes import CityscapesFolder, SceneDataset


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    demo.add_arguments(p)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    p.add_argument("--cityscapes", metavar="ROOT", help="a Cityscapes-style folder instead of generated scenes")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.n_train, args.n_eval = (32, 64), 64, 8
        args.train_steps, args.finetune_steps, args.clusters, args.net_width = 20, 5, 4, 8
    if args.cityscapes is None:
        return demo.run_from_args(args)
    size = tuple(args.size)  # the folder's images are resized to the model's input size
    data = (SceneDataset.from_dataset(CityscapesFolder(args.cityscapes, "train", size)),
            SceneDataset.from_dataset(CityscapesFolder(args.cityscapes, "val", size)))
    return demo.run_from_args(args, data=data)


if __name__ == "__main__":
    sys.exit(main())
