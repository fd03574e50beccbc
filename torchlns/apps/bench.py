"""``python -m torchlns bench``: how fast the chip emulation runs on this machine.

Two tables, each figure a ratio against the torch baseline measured in the same run (these
machines are noisy, so an absolute time means little):

* **networks**: the converted forward of each network of ``apps/bench_models.py``
  (ResNet-18/50-, MobileNetV2-, VGG-11-style nets and the demo's SegNet) in LNS8 with the
  ideal MAC, LNS8 with the chip preset, FP8 e4m3 and INT8, against the float model's forward,
  at batch 8 and batch 1, 128x128 inputs;
* **kernels**: encode/decode of 16M values against torch's float8 casts, ``lns_linear``
  512x1024x1024 against ``F.linear``, ``lns_conv2d`` 8x64x56x56 3x3 against ``F.conv2d``;
* **wide formats and dynamic activations** (also in the kernels table): the same conv and
  linear layers in LNS8 F=4, LNS10 F=5 and LNS12 F=6 against LNS8 F=3 on the same layer
  and MAC (the kernel that ran, table or product pairs, is named), and with dynamic per-block
  activations (blocks of 32) against static per-tensor ones.

# Note: bench protocol
Each measurement is the median of ``repeats`` timed calls after one warm-up call, and the
baseline and the candidate alternate call by call, so that a burst of load on a shared
machine hits both. The header names the CPU, its vector extensions and the instruction-set
level the kernels ran at (``TORCHLNS_ISA`` forces one).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["cpu_info", "compare", "network_rows", "kernel_rows", "wide_format_rows", "run", "add_arguments", "run_from_args", "FORMATS"]

# Extensions worth naming: what decides which kernels run and how fast torch's own are.
_EXTENSIONS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
               "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict:
    """The CPU's name, its vector extensions (of ``_EXTENSIONS``) and the kernels' ISA level."""
    from ..ops import backend

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return {"cpu": name, "extensions": [e for e in _EXTENSIONS if e in flags], "isa": backend.isa(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def compare(baseline: Callable[[], object], candidate: Callable[[], object], repeats: int) -> tuple:
    """(baseline median s, candidate median s): alternating calls after one warm-up each (see Note: bench protocol)."""
    with torch.no_grad():  # not inference_mode: tables cached on first use must stay ordinary tensors
        baseline()
        candidate()
        tb, tc = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            baseline()
            tb.append(time.perf_counter() - t)
            t = time.perf_counter()
            candidate()
            tc.append(time.perf_counter() - t)
    return statistics.median(tb), statistics.median(tc)


@dataclass
class Row:
    group: str
    name: str
    baseline: str
    baseline_ms: float
    ms: float
    ratio: float


def _formats():
    from .. import CHIP_MAC, FP8_E4M3, INT8, ConvertConfig

    return {"LNS8 ideal": ConvertConfig(), "LNS8 chip": ConvertConfig(mac=CHIP_MAC),
            "FP8 e4m3": ConvertConfig(fmt=FP8_E4M3), "INT8": ConvertConfig(fmt=INT8)}


FORMATS = ("LNS8 ideal", "LNS8 chip", "FP8 e4m3", "INT8")


def network_rows(networks: Sequence[str], batches: Sequence[int], formats: Sequence[str] = FORMATS,
                 image: int = 128, repeats: int = 5, log: Optional[Callable[[str], None]] = None) -> List[Row]:
    """Converted forward against the float forward, per network, batch and format."""
    from .. import convert
    from .bench_models import build

    configs = _formats()
    rows = []
    g = torch.Generator().manual_seed(0)
    for net in networks:
        model = build(net)
        calib = [torch.rand(4, 3, image, image, generator=g) for _ in range(2)]
        converted = {f: convert(model, configs[f], calib) for f in formats}
        for batch in batches:
            x = torch.rand(batch, 3, image, image, generator=g)
            for f in formats:
                tb, tc = compare(lambda: model(x), lambda q=converted[f]: q(x), repeats)
                rows.append(Row(f"{net} batch {batch}", f, "float32 forward", tb * 1e3, tc * 1e3, tc / tb))
                if log:
                    log(f"{net:12s} batch {batch}  {f:10s}  {tc / tb:6.2f}x  ({tc * 1e3:.1f} ms vs {tb * 1e3:.1f} ms)")
    return rows


def kernel_rows(repeats: int = 5, log: Optional[Callable[[str], None]] = None) -> List[Row]:
    """The micro-benchmarks of the issue that set the kernels' targets (see the module docstring)."""
    from .. import CHIP_MAC, FP8_E4M3, IDEAL_MAC, INT8, LNS8, LNSTensor, decode, encode, lns_conv2d, lns_linear
    from ..codec import default_offset
    from ..tensor import CodedTensor

    g = torch.Generator().manual_seed(0)
    rows = []

    def add(group, name, base_name, base, cand):
        tb, tc = compare(base, cand, repeats)
        rows.append(Row(group, name, base_name, tb * 1e3, tc * 1e3, tc / tb))
        if log:
            log(f"{group:22s} {name:24s} {tc / tb:6.2f}x  ({tc * 1e3:.2f} ms vs {base_name} {tb * 1e3:.2f} ms)")

    big = torch.randn(1 << 24, generator=g)
    off = default_offset(big, LNS8)
    codes = encode(big, LNS8, off)
    f8 = big.to(torch.float8_e4m3fn)
    add("encode 16M", "LNS8", "x.to(float8_e4m3fn)", lambda: big.to(torch.float8_e4m3fn), lambda: encode(big, LNS8, off))
    add("decode 16M", "LNS8", "float8_e4m3fn.float()", lambda: f8.to(torch.float32), lambda: decode(codes, LNS8, off))

    x, w = torch.randn(512, 1024, generator=g), torch.randn(1024, 1024, generator=g) / 32
    xq, wq = LNSTensor.from_float(x, LNS8), LNSTensor.from_float(w, LNS8, granularity="channel")
    lsb = _acc_lsb(F.linear(x, w), CHIP_MAC.acc_bits)
    add("linear 512x1024x1024", "LNS8 ideal (float32 acc)", "F.linear", lambda: F.linear(x, w),
        lambda: lns_linear(xq, wq, None, IDEAL_MAC))
    add("linear 512x1024x1024", "LNS8 chip (fixed acc)", "F.linear", lambda: F.linear(x, w),
        lambda: lns_linear(xq, wq, None, CHIP_MAC, acc_lsb=lsb))
    for fmt in (FP8_E4M3, INT8):
        xs, ws = CodedTensor.from_float(x, fmt), CodedTensor.from_float(w, fmt, granularity="channel")
        add("linear 512x1024x1024", str(fmt), "F.linear", lambda: F.linear(x, w), lambda a=xs, b=ws: lns_linear(a, b))

    xc, wc = torch.randn(8, 64, 56, 56, generator=g).relu(), torch.randn(64, 64, 3, 3, generator=g) / 24
    xcq, wcq = LNSTensor.from_float(xc, LNS8), LNSTensor.from_float(wc, LNS8, granularity="channel")
    lsbc = _acc_lsb(F.conv2d(xc, wc, padding=1), CHIP_MAC.acc_bits)
    add("conv2d 8x64x56x56 3x3", "LNS8 ideal (float32 acc)", "F.conv2d", lambda: F.conv2d(xc, wc, None, 1, 1),
        lambda: lns_conv2d(xcq, wcq, None, 1, 1))
    add("conv2d 8x64x56x56 3x3", "LNS8 chip (fixed acc)", "F.conv2d", lambda: F.conv2d(xc, wc, None, 1, 1),
        lambda: lns_conv2d(xcq, wcq, None, 1, 1, mac=CHIP_MAC, acc_lsb=lsbc))
    rows += wide_format_rows(repeats, log, operands=((x, w, lsb), (xc, wc, lsbc)))
    return rows


WIDE_FORMATS = ((8, 4), (10, 5), (12, 6))


def wide_format_rows(repeats: int = 5, log: Optional[Callable[[str], None]] = None, operands=None) -> List[Row]:
    """Wider LNS formats and dynamic per-block activations against LNS8 F=3 static on the same layer.

    ``operands``: ((x, w, acc_lsb) of the linear layer, (x, w, acc_lsb) of the conv layer, and
    optionally of a 3x3 depthwise conv); by default those of :func:`kernel_rows` and a
    MobileNetV2-like depthwise layer on ReLU6 outputs (8x144x56x56).
    """
    from .. import CHIP_MAC, IDEAL_MAC, LNS8, LNSFormat, LNSTensor, lns_conv2d, lns_linear
    from ..ops import backend

    if operands is None:
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(512, 1024, generator=g), torch.randn(1024, 1024, generator=g) / 32
        xc, wc = torch.randn(8, 64, 56, 56, generator=g).relu(), torch.randn(64, 64, 3, 3, generator=g) / 24
        operands = ((x, w, _acc_lsb(F.linear(x, w), CHIP_MAC.acc_bits)),
                    (xc, wc, _acc_lsb(F.conv2d(xc, wc, padding=1), CHIP_MAC.acc_bits)))
    if len(operands) == 2:
        g = torch.Generator().manual_seed(1)
        xd, wd = (2 * torch.randn(8, 144, 56, 56, generator=g)).clamp(0, 6), torch.randn(144, 1, 3, 3, generator=g) / 3
        operands = (*operands, (xd, wd, _acc_lsb(F.conv2d(xd, wd, padding=1, groups=144), CHIP_MAC.acc_bits)))
    rows = []
    layers = {"linear 512x1024x1024": (operands[0], lambda a, b, mac, lsb, **kw: lns_linear(a, b, None, mac, acc_lsb=lsb,
                                                                                           **kw)),
              "conv2d 8x64x56x56 3x3": (operands[1], lambda a, b, mac, lsb, **kw: lns_conv2d(a, b, None, 1, 1, mac=mac,
                                                                                             acc_lsb=lsb, **kw))}
    dw = operands[2][0].shape
    layers[f"depthwise {'x'.join(map(str, dw))} 3x3"] = (operands[2], lambda a, b, mac, lsb, **kw: lns_conv2d(
        a, b, None, 1, 1, 1, dw[1], mac=mac, acc_lsb=lsb, **kw))
    for layer, ((xf, wf, lsb), op) in layers.items():
        coded = {fmt: (LNSTensor.from_float(xf, fmt), LNSTensor.from_float(wf, fmt, granularity="channel"))
                 for fmt in (LNS8, *(LNSFormat(b, f) for b, f in WIDE_FORMATS))}
        for mac_name, mac in (("ideal", IDEAL_MAC), ("chip", CHIP_MAC)):
            lsb_ = lsb if mac.fixed else None
            base_name = f"LNS8 F=3 {mac_name}"
            base = lambda: op(*coded[LNS8], mac, lsb_)  # noqa: E731
            for fmt in list(coded)[1:]:
                cand = lambda f=fmt: op(*coded[f], mac, lsb_)  # noqa: E731
                backend.reset_direct_kernel_counts()
                with torch.no_grad():
                    cand()
                kernel = "/".join(k for k, n in backend.direct_kernel_counts().items() if n) or "none"
                tb, tc = compare(base, cand, repeats)
                name = f"LNS{fmt.bits} F={fmt.frac_bits} {mac_name} ({kernel})"
                rows.append(Row(f"{layer}: formats", name, base_name, tb * 1e3, tc * 1e3, tc / tb))
                if log:
                    log(f"{layer:22s} {name} {tc / tb:6.2f}x {base_name}")
            w8 = coded[LNS8][1]
            static = lambda: op(xf, w8, mac, lsb_, fmt=LNS8)  # noqa: E731
            dynamic = lambda: op(xf, w8, mac, lsb_, fmt=LNS8, x_block_size=32)  # noqa: E731
            tb, tc = compare(static, dynamic, repeats)
            rows.append(Row(f"{layer}: activations", f"LNS8 dynamic per-block(32) {mac_name}",
                            f"LNS8 static per-tensor {mac_name}", tb * 1e3, tc * 1e3, tc / tb))
            if log:
                log(f"{layer:22s} dynamic per-block(32) {mac_name:5s} {tc / tb:6.2f}x static")
    return rows


def _acc_lsb(y: torch.Tensor, acc_bits: int) -> int:
    """An LSB that fits max|y| with two bits of headroom, as calibration would choose."""
    return math.floor(math.log2(float(y.abs().max()))) - (acc_bits - 3)


def format_rows(rows: List[Row]) -> str:
    from .._text import format_table

    return format_table(["group", "benchmark", "ratio", "ms", "baseline", "baseline ms"],
                        [[r.group, r.name, f"{r.ratio:.2f}x", f"{r.ms:.2f}", r.baseline, f"{r.baseline_ms:.2f}"]
                         for r in rows])


def network_matrix(rows: List[Row]) -> str:
    """One line per (network, batch), one column per format: the Measured table of the README."""
    from .._text import format_table

    groups: Dict[str, Dict[str, Row]] = {}
    for r in rows:
        groups.setdefault(r.group, {})[r.name] = r
    formats = [f for f in FORMATS if any(f in g for g in groups.values())]
    body = [[grp, f"{next(iter(g.values())).baseline_ms:.1f} ms", *(f"{g[f].ratio:.2f}x" if f in g else "-"
                                                                      for f in formats)] for grp, g in groups.items()]
    return format_table(["network", "float32", *formats], body)


def run(networks: Sequence[str], batches: Sequence[int], repeats: int, kernels: bool = True,
        as_json: bool = False, image: int = 128) -> dict:
    info = cpu_info()
    say = (lambda s: None) if as_json else print
    say(f"CPU: {info['cpu']}; extensions: {' '.join(info['extensions']) or 'none'}; kernels: {info['isa']}; "
        f"{info['threads']} threads; torch {info['torch']}")
    say("Ratios are against the torch baseline measured in the same run (lower is better; see Note: bench protocol).")
    result = {"cpu": info, "networks": [], "kernels": []}
    if networks:
        say("")
        net = network_rows(networks, batches, image=image, repeats=repeats, log=say)
        result["networks"] = [asdict(r) for r in net]
        say("")
        say(network_matrix(net))
    if kernels:
        say("")
        ker = kernel_rows(repeats=repeats)
        result["kernels"] = [asdict(r) for r in ker]
        say(format_rows(ker))
    if as_json:
        print(json.dumps(result, indent=2))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .bench_models import NETWORKS

    p.add_argument("--networks", nargs="*", default=list(NETWORKS), choices=list(NETWORKS),
                   help="networks to time (default: all); none: kernels only")
    p.add_argument("--batch", type=int, nargs="+", default=[8, 1], help="batch sizes (default: 8 1)")
    p.add_argument("--image", type=int, default=128, help="input height and width (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def run_from_args(args: argparse.Namespace) -> int:
    run(args.networks, args.batch, args.repeats, kernels=not args.no_kernels, as_json=args.json, image=args.image)
    return 0
