"""2-D and 3-D object detection in rendered driving scenes: float32 against every chip format.

    python examples/detection.py                 # the job's defaults: about five minutes on a 2-core CPU
    python examples/detection.py --smoke         # tiny settings, seconds (what CI runs)
    python examples/detection.py --device cuda --size 128 384 --n-train 8192 --train-steps 4000

A small CenterNet-style detector (class heatmaps, 2-D boxes, depth, 3-D size and yaw) is
trained on generated scenes with 3-D boxes, then converted with batch-norm folding to LNS8
(ideal and chip MACs), FP8, INT8, and LNS8 with cluster compression and centroid
fine-tuning. The AP table, the Figure-2-style picture (``boxes.png``: float and converted
boxes in the image and in a bird's-eye view) and a markdown report land in ``--out``.
"""

import argparse
import sys

from torchlns.apps import detection


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    detection.add_arguments(p)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.n_train, args.n_eval = (48, 128), 32, 8
        args.train_steps, args.finetune_steps, args.clusters, args.net_width = 10, 3, 4, 4
    return detection.run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
