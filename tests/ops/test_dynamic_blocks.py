"""Dynamic per-block activations of a convolution inside ``torchlns::lns_conv`` (see Note:
dynamic blocks in torchlns/ops/reference.py).

The oracle is the composite the op replaced: im2col of the float input, each row's blocks
encoded by the codec with their own offsets, then ``lns_mm`` per group. Products are the
same, so the fixed accumulator must agree bit for bit on every backend, ISA and kernel, and
the reference's float32 sums (float64 inside, one rounding) too.
"""

import math

import pytest
import torch

import torchlns
import torchlns.functional as functional
from torchlns import CHIP_MAC, IDEAL_MAC, LNSFormat, LNSTensor, ops
from torchlns.core.formats import MACConfig

from test_kernels import assert_same

ISAS = ops.available_isas()
native = pytest.mark.skipif(not torchlns.has_native(), reason="the C++ extension is required (CI builds it)")


def _composite(monkeypatch, fn):
    """fn() with the dynamic blocks computed the old way (im2col, codec per block, lns_mm)."""
    with monkeypatch.context() as m:
        m.setattr(functional, "_blocks_in_op", lambda fmt, wq: False)
        return fn()


def _input(shape, g):
    x = torch.randn(shape, generator=g) * torch.exp(3 * torch.randn(shape[0], shape[1], 1, 1, generator=g))
    flat = x.view(-1)
    flat[0], flat[7], flat[11] = 0.0, -0.0, 1e-30  # zero, negative zero, a value every block flushes
    flat[13], flat[17], flat[19] = math.inf, -math.inf, 3e-39  # saturating and subnormal inputs
    return x.relu() if shape[1] == 5 else x  # one case with ReLU zeros


GEOMETRIES = [  # (N, C, H, W, Cout, k, stride, padding, dilation, groups)
    (2, 8, 9, 7, 16, 3, 1, 1, 1, 1),
    (2, 8, 8, 8, 8, 3, 2, 1, 1, 8),  # depthwise, stride 2: the columns kernel
    (1, 6, 7, 9, 4, 3, 1, (2, 0), (2, 1), 2),
    (2, 5, 6, 6, 24, 1, 1, 0, 1, 1),  # 1x1 on a ReLU output
]
FORMATS = [LNSFormat(8, 3), LNSFormat(8, 4), LNSFormat(10, 5), LNSFormat(12, 7), LNSFormat(6, 1),
           LNSFormat(8, 3, "mitchell")]


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_reference_blocks_equal_the_codec_per_block_bit_for_bit(monkeypatch, fmt):
    g = torch.Generator().manual_seed(fmt.bits * 10 + fmt.frac_bits)
    for (N, C, H, W, Cout, k, s, p, d, groups) in GEOMETRIES:
        x = _input((N, C, H, W), g)
        wq = LNSTensor.from_float(torch.randn(Cout, C // groups, k, k, generator=g), fmt, granularity="channel")
        for mac, lsb in [(IDEAL_MAC, None), (CHIP_MAC, -12)]:
            for bs in (32, 5, 1, 1000):
                def run():
                    return torchlns.lns_conv2d(x, wq, None, s, p, d, groups, mac=mac, acc_lsb=lsb, x_block_size=bs,
                                               fmt=fmt)
                with ops.reference_kernels():
                    want = _composite(monkeypatch, run)
                    got = run()
                assert_same(got, want, f"{fmt} {(N, C, H, W, Cout, k, groups)} {mac} block {bs}")


@native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", [LNSFormat(8, 3), LNSFormat(10, 5)], ids=str)
def test_native_blocks_match_the_reference_on_every_kernel(isa, fmt):
    g = torch.Generator().manual_seed(3)
    for (N, C, H, W, Cout, k, s, p, d, groups) in GEOMETRIES:
        x = _input((N, C, H, W), g)
        w = torch.randn(Cout, C // groups, k, k, generator=g)
        wq = LNSTensor.from_float(w, fmt, granularity="channel")
        with ops.reference_kernels():  # sum|p| per output: the same blocks flush the same elements of |x|
            abs_sum = torchlns.lns_conv2d(x.abs(), LNSTensor.from_float(w.abs(), fmt, granularity="channel"), None,
                                          s, p, d, groups, x_block_size=32, fmt=fmt).double()
        K = C // groups * k * k
        for mac, lsb in [(CHIP_MAC, -12), (MACConfig(accumulator="fixed", acc_bits=24), -9), (IDEAL_MAC, None)]:
            def run():
                return torchlns.lns_conv2d(x, wq, None, s, p, d, groups, mac=mac, acc_lsb=lsb, x_block_size=32,
                                           fmt=fmt)
            with ops.reference_kernels():
                want = run()
            for path in ("direct", "classes", "scalar"):
                with ops.force_isa(isa), ops.force_mac_path(path):
                    ops.reset_direct_kernel_counts()
                    got = run()
                    counts = ops.direct_kernel_counts()
                what = f"{fmt} {(N, C, H, W, Cout, k, groups)} {mac} {isa} {path}"
                if mac.fixed:
                    assert_same(got, want, what)
                else:  # float32 sums: within the spec's K 2^-24 sum|p| (and the reference's own rounding)
                    assert torch.equal(torch.isnan(got), torch.isnan(want)), what
                    ok = ~torch.isnan(want)
                    err = (got[ok].double() - want[ok].double()).abs()
                    bound = K * 2.0**-24 * abs_sum[ok] + 2.0**-24 * want[ok].double().abs() + 2.0**-149
                    assert (err <= bound).all(), what
                if path == "direct" and isa != "baseline":
                    assert counts["declined"] == 0 and counts["table"] + counts["pairs"] >= 1, (what, counts)


def test_conv1d_and_conv3d_blocks_equal_the_composite(monkeypatch):
    g = torch.Generator().manual_seed(4)
    fmt = LNSFormat(8, 3)
    x1, w1 = torch.randn(2, 6, 11, generator=g), torch.randn(4, 3, 3, generator=g)
    x3, w3 = torch.randn(1, 4, 5, 6, 6, generator=g), torch.randn(6, 4, 3, 3, 3, generator=g)
    w1q = LNSTensor.from_float(w1, fmt, granularity="channel")
    w3q = LNSTensor.from_float(w3, fmt, granularity="channel")
    runs = [lambda: torchlns.lns_conv1d(x1, w1q, None, 1, 1, 1, 2, mac=CHIP_MAC, acc_lsb=-12, x_block_size=4, fmt=fmt),
            lambda: torchlns.lns_conv3d(x3, w3q, None, 1, 1, mac=CHIP_MAC, acc_lsb=-12, x_block_size=16, fmt=fmt)]
    for run in runs:
        assert_same(run(), _composite(monkeypatch, run), "conv1d/3d dynamic blocks")


def test_formats_too_fine_for_the_wide_codes_keep_the_composite():
    assert functional._blocks_in_op(LNSFormat(12, 7), LNSTensor.from_float(torch.ones(2, 2), LNSFormat(12, 7)))
    wide_f = LNSFormat(12, 8)
    assert not functional._blocks_in_op(wide_f, LNSTensor.from_float(torch.ones(2, 2), wide_f))
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    y = torchlns.lns_conv2d(x, LNSTensor.from_float(w, wide_f), None, 1, 1, x_block_size=8, fmt=wide_f)
    assert y.shape == (1, 3, 5, 5) and torch.isfinite(y).all()


@native
def test_the_op_names_bad_dynamic_block_arguments():
    x = torch.zeros(1, 2, 4, 4, dtype=torch.uint8)
    w = torch.zeros(3, 2, 3, 3, dtype=torch.uint8)
    table = torchlns.core.tables.conversion_tensor_f64(3, "exact", 8, torch.device("cpu"))
    args = (torch.zeros(1, 1, 1, 1, dtype=torch.int32), w, torch.zeros(3, 1, 1, 1, dtype=torch.int32), table, None,
            16, 8, 3, False, 32, 0, [1, 1], [1, 1], [1, 1], [1, 1], 1)
    with pytest.raises(RuntimeError, match="16-bit wide codes"):
        torch.ops.torchlns.lns_conv(x, *args, 8, 8)
    with pytest.raises(RuntimeError, match="x_block_bits"):
        torch.ops.torchlns.lns_conv(x.to(torch.int16), *args, 8, 30)


def test_gpu_kernels_run_dynamic_blocks_exactly():
    """CUDA's lns_conv re-encodes the blocks on im2col columns and runs its lns_mm kernel (Triton
    in the interpreter here)."""
    pytest.importorskip("triton")
    from torchlns.ops import triton_mac as tm

    g = torch.Generator().manual_seed(6)
    fmt = LNSFormat(8, 3)
    x = _input((1, 4, 5, 5), g)
    wq = LNSTensor.from_float(torch.randn(6, 2, 3, 3, generator=g), fmt, granularity="channel")

    def run():
        return torchlns.lns_conv2d(x, wq, None, 1, 1, 1, 2, mac=CHIP_MAC, acc_lsb=-12, x_block_size=5, fmt=fmt)
    with ops.reference_kernels():
        want = run()
    launches = []
    real = tm._mac
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tm, "_mac", lambda *a: launches.append(a[21]) or real(*a))
        with ops.cuda_kernels_on_cpu():
            got = run()
    assert launches == [False, False], launches  # lns_mm per group, not the implicit-GEMM conv
    assert_same(got, want, "dynamic blocks through the GPU kernels")


@native
def test_narrow_groups_the_direct_kernels_decline_still_match():
    """Mitchell's table at F=5 has no direct kernel: the depthwise dynamic conv then runs lns_mm
    per group on the same k-major columns."""
    g = torch.Generator().manual_seed(8)
    fmt, mac = LNSFormat(10, 5), MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=24)
    x = _input((2, 8, 7, 7), g)
    wq = LNSTensor.from_float(torch.randn(8, 1, 3, 3, generator=g), fmt, granularity="channel")

    def run():
        return torchlns.lns_conv2d(x, wq, None, 1, 1, 1, 8, mac=mac, acc_lsb=-9, x_block_size=32, fmt=fmt)
    with ops.reference_kernels():
        want = run()
    for isa in ISAS:
        with ops.force_isa(isa):
            assert_same(run(), want, f"mitchell F=5 depthwise dynamic {isa}")


def _narrow_input(kind, shape, g, cap=True):
    """Inputs that send a narrow-group dynamic conv down each path (see Note: dynamic blocks by
    repair in csrc/conv_cpu.cpp): no code any block changes, a few positions to repair, or so
    many that the k-major columns run."""
    if kind == "unchanged":  # 2^±3 everywhere, zeros: no block flushes anything (LNS8 F=4 spans 2^7.9)
        return torch.exp2(6 * torch.rand(shape, generator=g) - 3) * torch.randn(shape, generator=g).sign().relu()
    x = torch.randn(shape, generator=g) * 4
    if kind == "columns":  # every element 2^±40 apart: flushes at most positions
        return x * torch.exp2(40 * torch.rand(shape, generator=g) - 20)
    flat = x.view(-1)  # a few flushed, saturating, capped, NaN and negative-zero inputs
    n = flat.numel()
    for i, v in [(n // 5 + 7, 1e-30), (n // 3, math.inf), (n // 2, -3e38 if cap else 1.0), (n // 2 + 1, math.nan),
                 (2 * n // 3, -1e-25), (n - 2, -0.0), (n // 4 + 5, 2e-39)]:  # a subnormal amid normal neighbours
        flat[i] = v
    return x


@native
@pytest.mark.parametrize("kind", ["unchanged", "repaired", "columns"])
@pytest.mark.parametrize("fmt", [LNSFormat(8, 3), LNSFormat(8, 4), LNSFormat(10, 5)], ids=str)
def test_narrow_group_blocks_take_each_path_bit_for_bit(kind, fmt):
    g = torch.Generator().manual_seed(11)
    cases = [  # (N, C, H, W, Cout, k, stride, padding, dilation, groups, block)
        (2, 6, 9, 9, 6, 3, 1, 1, 1, 6, 32),  # depthwise
        (2, 6, 10, 9, 12, 3, 2, 1, 1, 6, 4),  # multiplier 2, stride 2, blocks of 4 taps
        (2, 16, 8, 8, 16, 3, 1, 2, 2, 8, 5),  # 2 channels per group, dilation 2, four blocks per group
    ]
    for (N, C, H, W, Cout, k, s, p, d, groups, bs) in cases:
        # Capped at 2^127 (a clamped top offset): the product pairs' exponent guard declines it.
        x = _narrow_input(kind, (N, C, H, W), g, cap=fmt.frac_bits == 3)
        w = torch.randn(Cout, C // groups, k, k, generator=g) / 16  # float32 products of -3e38 stay finite
        wq = LNSTensor.from_float(w, fmt, granularity="channel")
        bias = torch.randn(Cout, generator=g)
        for mac, lsb in [(CHIP_MAC, -12), (IDEAL_MAC, None)]:
            def run():
                return torchlns.lns_conv2d(x, wq, bias, s, p, d, groups, mac=mac, acc_lsb=lsb, x_block_size=bs,
                                           fmt=fmt)
            with ops.reference_kernels():
                want = run()
            for isa in [i for i in ISAS if i != "baseline"]:
                with ops.force_isa(isa):
                    ops.reset_direct_kernel_counts()
                    got = run()
                    counts = ops.direct_kernel_counts()
                what = f"{kind} {fmt} {(N, C, H, W, Cout, groups, bs)} {mac} {isa}"
                assert counts[f"blocks_{kind}"] == 1 and counts["declined"] == 0, (what, counts)
                if mac.fixed:
                    assert_same(got, want, what)
                else:  # the same products; float32 sums within the spec's K 2^-24 sum|p| of the reference's
                    with ops.reference_kernels():  # |x| flushes where x does
                        abs_sum = torchlns.lns_conv2d(x.abs(), LNSTensor.from_float(w.abs(), fmt, granularity="channel"),
                                                      bias.abs(), s, p, d, groups, x_block_size=bs, fmt=fmt).double()
                    assert torch.equal(torch.isnan(got), torch.isnan(want)), what
                    ok = ~torch.isnan(want)
                    bound = (C // groups * k * k + 1) * 2.0**-24 * abs_sum[ok] + 2.0**-24 * want[ok].double().abs()
                    assert ((got[ok].double() - want[ok].double()).abs() <= bound + 2.0**-149).all(), what
