"""``python -m torchlns gpu-check``: the GPU path, proved and measured on one CUDA machine.

One run does three things and writes one markdown table (``--out``, default ``gpu-check.md``):

1. **Tests.** The CUDA test subset, ``tests/ops/test_triton.py`` and ``test_triton_mac.py``,
   compiled on the GPU. Every kernel is checked against the reference: bits for the codecs
   and the fixed accumulator, the spec's bound for float32. ``--quick`` leaves out the
   every-configuration sweeps, which compile each tile configuration.
2. **Kernels.** Throughput ratios against torch, measured in the same run:
   - ``lns_mm`` at ``--size``^3 against float32 matmul with TF32 off and against bf16:
     LNS8 ideal and the chip's LUT with the float32 accumulator, and the chip preset (the
     fixed accumulator);
   - a ResNet 3x3 convolution against cuDNN;
   - LNS8 encode and decode as a fraction of a copy's bandwidth;
   - the largest float32-accumulator error, as a fraction of the spec's bound.
3. **A network.** The ResNet-50 replica of ``bench_models``, converted with the chip preset,
   at batch ``--batch`` against its float32 forward (TF32 off). The table also says whether
   its outputs are the CPU kernels' bits.

Each figure stands beside its issue-13 target. ``TRITON_INTERPRET=1 ... gpu-check --device
cpu`` runs the same steps on toy sizes through the Triton interpreter, with no GPU, so that
CI keeps the command working. Its timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from ..ops.dense import _ieee_float32  # float32 products without TF32: the baseline the targets name

__all__ = ["Check", "run", "add_arguments", "run_from_args", "to_markdown"]

TEST_FILES = ("tests/ops/test_triton.py", "tests/ops/test_triton_mac.py")


@dataclass
class Check:
    """One line of the table: a figure, what it is measured against, and its target."""
    measure: str
    value: str
    vs_float32: str = ""
    vs_bf16: str = ""
    target: str = ""
    met: Optional[bool] = None
    timed: bool = False  # a speed figure: judged on a GPU only


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of a call: Triton's ``do_bench`` on CUDA (warm-up, L2 flush), one call on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def once(fn):  # the interpreter: one call, a figure that only shows the command runs
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    return once


def _ratio(baseline_ms: float, ms: float) -> str:
    return f"{baseline_ms / ms:.2f}x ({baseline_ms:.2f} ms)"


def _acc_lsb(y: torch.Tensor, acc_bits: int) -> int:
    return math.floor(math.log2(float(y.abs().max()))) - (acc_bits - 3)


def device_info(device: torch.device) -> str:
    import triton

    from .. import __version__

    versions = f"torch {torch.__version__}, triton {triton.__version__}, torchlns {__version__}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), "
                f"CUDA {torch.version.cuda}; {versions}")
    return f"CPU {platform.processor() or platform.machine()} through the Triton interpreter; {versions}"


# ----------------------------------------------------------------------------------------
# 1. tests
# ----------------------------------------------------------------------------------------
def test_check(quick: bool, log: Callable[[str], None]) -> Check:
    root = Path(__file__).resolve().parents[2]
    files = [str(root / f) for f in TEST_FILES]
    if not all(Path(f).exists() for f in files):
        return Check("CUDA tests", "not run: tests/ is not beside the package (run from a clone)", target="all pass")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if quick:
        cmd += ["-k", "not every_config"]
    log("tests: " + " ".join(cmd[3:]))
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    took = time.perf_counter() - t
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    log(proc.stdout[-3000:] if proc.returncode else tail)
    counts = ", ".join(re.findall(r"\d+ (?:passed|failed|skipped|error|errors)", tail)) or tail
    return Check("CUDA tests (" + ", ".join(TEST_FILES) + (", quick" if quick else "") + ")",
                 f"{counts} in {took:.0f} s", target="all pass", met=proc.returncode == 0)


# ----------------------------------------------------------------------------------------
# 2. kernels
# ----------------------------------------------------------------------------------------
def mm_checks(size: int, device: torch.device, time_ms, log) -> List[Check]:
    from .. import CHIP_MAC, IDEAL_MAC, LNS8, LNSTensor, MACConfig, lns_linear

    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, size, generator=g).to(device)
    w = (torch.randn(size, size, generator=g) / math.sqrt(size)).to(device)
    with _ieee_float32():
        t32 = time_ms(lambda: x @ w.T)
    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    tbf = time_ms(lambda: xb @ wb.T)
    xq, wq = LNSTensor.from_float(x, LNS8), LNSTensor.from_float(w, LNS8, granularity="channel")
    lsb = _acc_lsb(x @ w.T, CHIP_MAC.acc_bits)
    rows = []
    for name, mac, target in [("LNS8 ideal (exact table), float32 acc", IDEAL_MAC, 1.0),
                              ("LNS8 chip LUT8, float32 acc", MACConfig(conversion="lut", lut_bits=8), 1.0),
                              ("LNS8 chip preset (LUT8, fixed 32-bit acc)", CHIP_MAC, 0.3)]:
        t = time_ms(lambda m=mac: lns_linear(xq, wq, None, m, acc_lsb=lsb if m.fixed else None))
        rows.append(Check(f"lns_mm {size}^3, {name}", f"{t:.2f} ms", _ratio(t32, t), _ratio(tbf, t),
                          f">= {target}x float32", t32 / t >= target, timed=True))
        log(f"{rows[-1].measure}: {rows[-1].value}, vs float32 {rows[-1].vs_float32}, vs bf16 {rows[-1].vs_bf16}")
    rows.append(bound_check(xq, wq, device, log))
    return rows


def bound_check(xq, wq, device, log, rows: int = 256) -> Check:
    """The float32 accumulator's largest error on real-valued codes, as a fraction of the spec's bound."""
    from ..core import tables
    from ..ops import triton_mac

    table = tables.conversion_tensor_f64(3, "exact", 8, device)
    x, xo = xq.codes[:rows], xq.offset.reshape(-1, 1)[:1].to(torch.int32)
    w, wo = wq.codes, wq.offset.reshape(-1, 1).to(torch.int32)
    K = x.shape[1]
    args = (x, xo, w, wo, table, None, 8, 8, 3, False, 32, 0)
    got = triton_mac.lns_mm(*args)
    exact = triton_mac.lns_mm(*args, route="direct")  # float64 sums, rounded once
    mags = (x & 0x7F, xo, w & 0x7F, wo) + args[4:]
    bound = K * 2.0**-24 * triton_mac.lns_mm(*mags, route="direct").double()
    frac = float(((got.double() - exact.double()).abs() / bound.clamp(min=2.0**-149)).max())
    log(f"float32 accumulator error: {frac:.2e} of the spec's bound")
    return Check(f"float32 accumulator: largest error / spec bound ({rows}x{w.shape[0]}x{K})", f"{frac:.2e}",
                 target="<= 1", met=frac <= 1)


def conv_checks(batch: int, device: torch.device, time_ms, log, side: int = 56, channels: int = 64) -> List[Check]:
    from .. import CHIP_MAC, IDEAL_MAC, LNS8, LNSTensor, lns_conv2d

    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, side, side, generator=g).relu().to(device)
    w = (torch.randn(channels, channels, 3, 3, generator=g) / (3 * math.sqrt(channels))).to(device)
    with _ieee_float32():
        t32 = time_ms(lambda: F.conv2d(x, w, None, 1, 1))
        lsb = _acc_lsb(F.conv2d(x, w, None, 1, 1), CHIP_MAC.acc_bits)
    xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
    tbf = time_ms(lambda: F.conv2d(xb, wb, None, 1, 1))
    xq, wq = LNSTensor.from_float(x, LNS8), LNSTensor.from_float(w, LNS8, granularity="channel")
    rows = []
    for name, mac in [("LNS8 ideal, float32 acc", IDEAL_MAC), ("LNS8 chip preset", CHIP_MAC)]:
        t = time_ms(lambda m=mac: lns_conv2d(xq, wq, None, 1, 1, mac=m, acc_lsb=lsb if m.fixed else None))
        rows.append(Check(f"conv2d {batch}x{channels}x{side}x{side} 3x3, {name}", f"{t:.2f} ms", _ratio(t32, t),
                          _ratio(tbf, t), timed=True))
        log(f"{rows[-1].measure}: {rows[-1].value}, vs float32 {rows[-1].vs_float32}")
    return rows


def codec_checks(n: int, device: torch.device, time_ms, log) -> List[Check]:
    from .. import LNS8, decode, encode
    from ..codec import default_offset

    x = torch.randn(n, generator=torch.Generator().manual_seed(2)).to(device)
    out = torch.empty_like(x)
    t_copy = time_ms(lambda: out.copy_(x))
    bandwidth = 8 * n / t_copy  # bytes per ms: read 4, write 4 per element
    off = default_offset(x, LNS8)
    codes = encode(x, LNS8, off)
    rows = []
    for name, fn in [("LNS8 encode (4 bytes in, 1 out)", lambda: encode(x, LNS8, off)),
                     ("LNS8 decode (1 byte in, 4 out)", lambda: decode(codes, LNS8, off))]:
        t = time_ms(fn)
        frac = 5 * n / t / bandwidth
        rows.append(Check(f"{name}, {n / 2**20:.0f}M elements", f"{t:.3f} ms, {frac:.0%} of copy bandwidth "
                          f"({bandwidth / 1e6:.0f} GB/s)", target=">= 50% of copy", met=frac >= 0.5, timed=True))
        log(f"{rows[-1].measure}: {rows[-1].value}")
    return rows


# ----------------------------------------------------------------------------------------
# 3. a converted network
# ----------------------------------------------------------------------------------------
def _tiny_resnet():
    """Two basic blocks on an 8-channel stem: the smoke run's network (the interpreter is slow)."""
    from torch import nn

    from .bench_models import BasicBlock, _conv_bn

    return nn.Sequential(_conv_bn(3, 8, 3), BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10))


def network_check(network: str, batch: int, image: int, device: torch.device, time_ms, log) -> List[Check]:
    from .. import CHIP_MAC, ConvertConfig, convert
    from .bench_models import NETWORKS, prepare

    torch.manual_seed(0)
    builder = _tiny_resnet if network == "resnet-tiny" else NETWORKS[network]
    model = prepare(builder(), image=min(image, 64)).to(device)
    g = torch.Generator().manual_seed(3)
    calib = [torch.rand(4, 3, image, image, generator=g).to(device) for _ in range(2)]
    t = time.perf_counter()
    q = convert(model, ConvertConfig(mac=CHIP_MAC, progress=False), calib)
    log(f"{network}: converted in {time.perf_counter() - t:.1f} s")
    x = torch.rand(batch, 3, image, image, generator=g).to(device)
    with torch.no_grad():
        with _ieee_float32():
            t32 = time_ms(lambda: model(x))
        t = time_ms(lambda: q(x))
        same = _same_bits_as_cpu(q, x[:2] if device.type == "cuda" else x[:1], device)
    ratio = t / t32
    log(f"{network} batch {batch}: chip {t:.1f} ms, float32 {t32:.1f} ms: {ratio:.2f}x")
    return [Check(f"converted {network} forward, batch {batch}, {image}x{image}, chip preset", f"{t:.1f} ms",
                  f"{ratio:.2f}x the float32 forward ({t32:.1f} ms)", target="<= 3x the float forward",
                  met=ratio <= 3, timed=True), same]


def _same_bits_as_cpu(q, x, device) -> Check:
    """The converted network's outputs on this device against the CPU kernels' (the fixed accumulator is exact)."""
    got = q(x).cpu()
    if device.type == "cpu":  # run() put the GPU kernels in place; the reference (same bits) is the oracle
        from ..ops import library

        with library.reference_kernels():
            want = q(x)
    else:
        want = copy.deepcopy(q).cpu()(x.cpu())
    equal = torch.equal(got.view(torch.int32), want.view(torch.int32))
    rel = float(((got - want).abs().max() / want.abs().max().clamp(min=1e-30)))
    note = "bit-equal" if equal else (f"max rel. diff {rel:.1e} (float ops between layers, e.g. the average pool, "
                                      "may sum in another order on the GPU)")
    return Check(f"converted network: GPU outputs vs the CPU kernels' ({x.shape[0]} images)", note, target="bit-equal",
                 met=equal)


# ----------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------
def to_markdown(checks: List[Check], header: str) -> str:
    lines = [header, "", "| measure | torchlns | vs float32 (TF32 off) | vs bf16 | target | met |",
             "|---|---|---|---|---|---|"]
    for c in checks:
        met = "" if c.met is None else ("yes" if c.met else "**no**")
        lines.append(f"| {c.measure} | {c.value} | {c.vs_float32} | {c.vs_bf16} | {c.target} | {met} |")
    return "\n".join(lines) + "\n"


def run(device: str = "cuda", size: int = 4096, batch: int = 64, image: int = 128, network: str = "resnet50",
        encode_elements: int = 1 << 26, tests: bool = True, quick: bool = False, out: Optional[Path] = None,
        log: Callable[[str], None] = print) -> List[Check]:
    from .cli import CLIError

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError("gpu-check needs a CUDA device and torch.cuda.is_available() is False; `--device cpu` runs the "
                       "same steps at toy sizes through the Triton interpreter")
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":  # Triton reads it when torch imports it
        raise CLIError("--device cpu runs the Triton kernels in Triton's interpreter, which must be chosen before "
                       "Python starts: TRITON_INTERPRET=1 python -m torchlns gpu-check --device cpu")
    from ..ops import library

    time_ms = _timer(dev)
    checks: List[Check] = []
    if tests:
        checks.append(test_check(quick, log))
    with library.cuda_kernels_on_cpu() if dev.type == "cpu" else contextlib.nullcontext():
        checks += mm_checks(size, dev, time_ms, log)
        checks += conv_checks(min(batch, 64), dev, time_ms, log, side=56 if dev.type == "cuda" else 8,
                              channels=64 if dev.type == "cuda" else 8)
        checks += codec_checks(encode_elements, dev, time_ms, log)
        checks += network_check(network, batch, image, dev, time_ms, log)
    if dev.type == "cpu":  # the interpreter's timings judge nothing
        for c in checks:
            if c.timed:
                c.met, c.target = None, f"{c.target} (on a GPU)"
    header = (f"# torchlns gpu-check, {datetime.date.today().isoformat()}\n\n{device_info(dev)}.\n\n"
              "Ratios are throughput against the torch baseline timed in the same run (higher is better), "
              "except the network row, which is time against the float forward (lower is better).")
    text = to_markdown(checks, header)
    if out is not None:
        out.write_text(text)
        log(f"wrote {out}")
    log(text)
    return checks


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda (default); cpu runs the same steps at toy sizes through the Triton interpreter")
    p.add_argument("--size", type=int, default=None, help="matmul M=N=K (default 4096 on cuda, 64 on cpu)")
    p.add_argument("--batch", type=int, default=None, help="network and conv batch (default 64 on cuda, 1 on cpu)")
    p.add_argument("--image", type=int, default=None, help="network input side (default 128 on cuda, 16 on cpu)")
    p.add_argument("--network", default=None, help="network: a bench_models name or resnet-tiny "
                   "(default resnet50 on cuda, resnet-tiny on cpu)")
    p.add_argument("--no-tests", action="store_true", help="skip the CUDA test subset")
    p.add_argument("--quick", action="store_true", help="leave the every-configuration sweeps out of the tests")
    p.add_argument("--out", type=Path, default=Path("gpu-check.md"), help="markdown table (default gpu-check.md)")


def run_from_args(args: argparse.Namespace) -> int:
    from .bench_models import NETWORKS
    from .cli import CLIError

    cuda = args.device == "cuda"
    network = args.network or ("resnet50" if cuda else "resnet-tiny")
    if network not in NETWORKS and network != "resnet-tiny":
        raise CLIError(f"unknown network {network!r}; choose from {sorted(NETWORKS) + ['resnet-tiny']}")
    for name in ("size", "batch", "image"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CLIError(f"--{name} must be a positive integer, got {v}")
    checks = run(args.device, size=args.size or (4096 if cuda else 64), batch=args.batch or (64 if cuda else 1),
                 image=args.image or (128 if cuda else 16), network=network,
                 encode_elements=1 << 26 if cuda else 1 << 12, tests=not args.no_tests, quick=args.quick,
                 out=args.out)
    failed = [c.measure for c in checks if c.measure.startswith(("CUDA tests", "converted network")) and c.met is False]
    return 1 if failed and cuda else 0
