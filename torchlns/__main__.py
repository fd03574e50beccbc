"""Command line: ``python -m torchlns <command>`` (or the ``torchlns`` console script).

Commands: ``demo``. (``convert``, ``report`` and ``compare`` will join it.)
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(n=args.n, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchlns",
        description="Bit-exact emulation of a logarithmic-number-system (LNS) inference chip.",
    )
    sub = parser.add_subparsers(dest="command", title="commands")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="encode a tensor and run two layers in every format; print an error table",
        description="Encode a heavy-tailed random tensor in LNS8, LNS8 (mitchell), FP8 e4m3/e5m2 "
        "and INT8, run a Linear and a Conv2d layer under the ideal and chip MACs, and print "
        "the errors against float32.",
    )
    demo.add_argument("--n", type=int, default=1 << 20, help="elements in the encoded tensor (default 2^20)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
