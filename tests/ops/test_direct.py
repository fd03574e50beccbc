"""Every CPU MAC kernel on every instruction-set level against the reference.

The LNS MAC has three CPU kernels (direct, the remainder-class form, scalar; see Note: direct
kernels in csrc/lns_direct.h) and each hot loop three builds (AVX-512, AVX2, baseline; see
Note: instruction sets in csrc/common.h). ``force_isa``/``force_mac_path`` select them, so one
machine checks all of them: the fixed accumulator and INT bit for bit, float32 sums within
the spec's bound ``K 2^-24 sum|p|``.
"""

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

import torchlns
from torchlns import ops
from torchlns.core import tables
from torchlns.core.formats import FP8Format, IntFormat, LNSFormat, MACConfig
from torchlns.ops import dense, reference

from test_kernels import assert_same

OPS = torch.ops.torchlns
pytestmark = pytest.mark.skipif(not torchlns.has_native(), reason="the C++ extension is required (CI builds it)")

ISAS = ops.available_isas()
PATHS = ["direct", "scalar", "classes"]

MACS = [  # (MAC, acc_lsb)
    (MACConfig(), None),
    (MACConfig(conversion="lut", lut_bits=8), None),
    (MACConfig(conversion="mitchell"), None),
    (MACConfig.chip(), -14),
    (MACConfig.chip(), -40),  # every large product saturates: the kernels' saturation path
    (MACConfig.chip(), -33),  # products just above 2^31, or just below: the shift of -1
    (MACConfig(accumulator="fixed", acc_bits=32), -14),  # the exact table, P = 23
    (MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=24), -10),  # W < 32: clamp to T
    (MACConfig(conversion="lut", lut_bits=3, accumulator="fixed", acc_bits=16), -6),
    (MACConfig(conversion="lut", lut_bits=1), None),  # an entry rounds to 2.0: not for the direct kernels
]
FORMATS = [LNSFormat(8, 3), LNSFormat(8, 4), LNSFormat(6, 2), LNSFormat(5, 0), LNSFormat(10, 5), LNSFormat(12, 6)]


def _codes(shape, fmt, g, p_zero=0.3, p_nan=0.0):
    mags = torch.randint(1, fmt.e_max + 1, shape, generator=g)
    mags = torch.where(torch.rand(shape, generator=g) < p_zero, 0, mags)
    sign = torch.randint(0, 2, shape, generator=g)
    code = mags | (sign << (fmt.bits - 1))
    code = torch.where(torch.rand(shape, generator=g) < p_nan, 1 << (fmt.bits - 1), code)
    if fmt.bits == 16:
        code = torch.where(code >= 1 << 15, code - (1 << 16), code)
    return code.to(fmt.code_dtype)


def _offsets(rows, fmt, g, per_row=True):
    lo, hi = -fmt.e_max - 4 * (1 << fmt.frac_bits), -fmt.e_max + 2 * (1 << fmt.frac_bits)
    n = rows if per_row else 1
    return torch.randint(lo, hi, (n, 1), generator=g, dtype=torch.int32)


def _table(fmt, mac):
    return tables.conversion_tensor_f64(fmt.frac_bits, mac.conversion, mac.lut_bits, torch.device("cpu"))


def _abs_mm(x, xo, w, wo, table, fmt):
    """sum|p| per output: the reference on sign-cleared, NaN-free codes."""
    strip = lambda c: (c.to(torch.int32) & fmt.e_max).to(c.dtype)  # noqa: E731
    return reference.lns_mm_reference(strip(x), xo, strip(w), wo, table, None, fmt.bits, fmt.bits, fmt.frac_bits,
                                      False, 32, 0).double()


def _check(got, want, fixed, K, abs_sum, bias, what):
    if fixed:
        assert_same(got, want, what)
        return
    assert torch.equal(torch.isnan(got), torch.isnan(want)), what
    ok = ~torch.isnan(want)
    bound = K * 2.0**-24 * abs_sum + torch.finfo(torch.float32).eps * want.double().abs()
    if bias is not None:  # per output channel: the last dim of a matrix, dim 1 of an image
        b = bias.double().abs()
        bound = bound + torch.finfo(torch.float32).eps * (b.reshape(1, -1, 1, 1) if bound.dim() == 4 else b)
    err = (got.double() - want.double()).abs()
    assert (err[ok] <= bound[ok] + 2.0**-149).all(), f"{what}: max error {err[ok].max()}"


def _run(fn, isa, path):
    with ops.force_isa(isa), ops.force_mac_path(path):
        return fn()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mac,acc_lsb", MACS, ids=lambda v: repr(v))
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_lns_mm_every_kernel(isa, mac, acc_lsb, fmt):
    g = torch.Generator().manual_seed(fmt.bits * 7 + fmt.frac_bits)
    for (M, N, K) in [(9, 37, 300), (13, 5, 70), (1, 130, 17)]:  # rows and columns kernels, several K spans
        x, w = _codes((M, K), fmt, g, p_nan=0.01 if M > 5 else 0.0), _codes((N, K), fmt, g, p_nan=0.002)
        xo, wo = _offsets(1, fmt, g, per_row=False), _offsets(N, fmt, g)
        bias = torch.randn(N, generator=g) * 2.0**-8
        table = _table(fmt, mac)
        args = (x, xo, w, wo, table, bias, fmt.bits, fmt.bits, fmt.frac_bits, mac.fixed, mac.acc_bits,
                acc_lsb if mac.fixed else 0)
        want = reference.lns_mm_reference(*args)
        abs_sum = None if mac.fixed else _abs_mm(x, xo, w, wo, table, fmt)
        for path in PATHS:
            got = _run(lambda: OPS.lns_mm(*args), isa, path)
            _check(got, want, mac.fixed, K, abs_sum, bias, f"lns_mm {fmt} {mac} {isa} {path} {(M, N, K)}")


CONVS = [  # (N, C, H, W, Cout, k, stride, pad_before, pad_after, dilation, groups)
    (2, 8, 9, 11, 24, 3, (1, 1), (1, 1), (1, 1), (1, 1), 1),  # rows kernel
    (2, 16, 10, 9, 16, 3, (2, 2), (1, 1), (1, 1), (1, 1), 16),  # depthwise, stride 2: columns kernel
    (1, 12, 8, 13, 12, 3, (1, 2), (2, 0), (1, 2), (2, 1), 4),  # narrow groups, asymmetric padding
    (2, 4, 7, 7, 40, 1, (1, 1), (0, 0), (0, 0), (1, 1), 2),  # 1x1, two groups of 20 outputs
    (1, 3, 37, 41, 9, 5, (3, 2), (2, 2), (2, 2), (1, 1), 1),  # first-layer-like, few outputs
    # Columns runs span output rows (see ConvCols): MobileNet's 8x8 depthwise layers, and a
    # dilated stride-2 one whose taps land in one polyphase plane only.
    (3, 24, 8, 8, 24, 3, (1, 1), (1, 1), (1, 1), (1, 1), 24),
    (2, 8, 11, 6, 8, 3, (2, 2), (2, 1), (2, 3), (2, 2), 8),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mac,acc_lsb", [MACS[0], MACS[3], MACS[4], MACS[5], MACS[7]], ids=lambda v: repr(v))
@pytest.mark.parametrize("case", CONVS, ids=str)
def test_lns_conv_every_kernel(isa, mac, acc_lsb, case):
    N, C, H, W, Cout, k, stride, pb, pa, dil, groups = case
    fmt = LNSFormat(8, 3)
    g = torch.Generator().manual_seed(sum(case[:6]))
    x = _codes((N, C, H, W), fmt, g, p_nan=0.005)
    w = _codes((Cout, C // groups, k, k), fmt, g, p_zero=0.1, p_nan=0.01)
    xo = _offsets(1, fmt, g, per_row=False).reshape(1, 1, 1, 1)
    wo = _offsets(Cout, fmt, g).reshape(Cout, 1, 1, 1)
    bias = torch.randn(Cout, generator=g) * 2.0**-8
    table = _table(fmt, mac)
    args = (x, xo, w, wo, table, bias, 8, 8, 3, mac.fixed, mac.acc_bits, acc_lsb if mac.fixed else 0, list(stride),
            list(pb), list(pa), list(dil), groups)
    with ops.reference_kernels():  # the conv reference calls lns_mm: keep it on the oracle too
        want = reference.lns_conv_reference(*args)
    abs_sum = None
    if not mac.fixed:
        strip = lambda c: (c.to(torch.int32) & fmt.e_max).to(c.dtype)  # noqa: E731
        abs_args = (strip(x), xo, strip(w), *args[3:5], None, *args[6:9], False, 32, 0, *args[12:])
        with ops.reference_kernels():
            abs_sum = reference.lns_conv_reference(*abs_args).double()
    for path in PATHS:
        got = _run(lambda: OPS.lns_conv(*args), isa, path)
        _check(got, want, mac.fixed, C // groups * k * k, abs_sum, bias, f"lns_conv {case} {mac} {isa} {path}")


@pytest.mark.parametrize("isa", ISAS)
def test_direct_kernels_same_bits_at_one_and_two_threads(isa):
    g = torch.Generator().manual_seed(5)
    x = torchlns.LNSTensor.from_float(torch.randn(4, 16, 12, 12, generator=g).relu(), torchlns.LNS8)
    cases = [(torch.randn(32, 16, 3, 3, generator=g), 1), (torch.randn(16, 1, 3, 3, generator=g), 16)]
    threads = torch.get_num_threads()
    try:
        for w, groups in cases:
            wq = torchlns.LNSTensor.from_float(w, torchlns.LNS8, granularity="channel")
            for mac, lsb in [(torchlns.IDEAL_MAC, None), (torchlns.CHIP_MAC, -16)]:
                def run():
                    return _run(lambda: torchlns.lns_conv2d(x, wq, None, 1, 1, groups=groups, mac=mac, acc_lsb=lsb),
                                isa, "direct")
                torch.set_num_threads(1)
                one = run()
                torch.set_num_threads(2)
                assert_same(run(), one, f"1 vs 2 threads, {mac}, groups={groups}")
    finally:
        torch.set_num_threads(threads)


def test_isa_environment_variable_forces_a_level_and_refuses_nonsense():
    code = "import torch, torchlns; print(torchlns.ops.isa()); torchlns.LNSTensor.from_float(torch.randn(3), torchlns.LNS8)"
    env = dict(os.environ, TORCHLNS_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split()[-1] == "baseline", out.stderr
    env["TORCHLNS_ISA"] = "avx3"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "TORCHLNS_ISA=avx3 is not one of baseline, avx2, avx512" in out.stderr


def test_set_isa_refuses_levels_the_cpu_lacks():
    with pytest.raises(ValueError, match="unknown instruction-set level"):
        ops.set_isa("sse9")
    if ops.cpu_isa() != "avx512":
        with pytest.raises(ValueError, match="supports at most"):
            ops.set_isa("avx512")
    with ops.force_isa("baseline"):
        assert ops.isa() == "baseline"
    assert ops.isa() == ops.cpu_isa()


# ----------------------------------------------------------------------------------------
# prepared weights
# ----------------------------------------------------------------------------------------
def test_prepared_weights_are_reused_and_never_stale():
    g = torch.Generator().manual_seed(0)
    x = torchlns.LNSTensor.from_float(torch.randn(8, 64, generator=g), torchlns.LNS8)
    w = torchlns.LNSTensor.from_float(torch.randn(32, 64, generator=g), torchlns.LNS8, granularity="channel")
    ops.clear_weight_cache()
    first = torchlns.lns_linear(x, w)
    for _ in range(3):
        assert_same(torchlns.lns_linear(x, w), first, "cached weight")
    info = ops.weight_cache_info()
    assert info["entries"] == 1 and info["hits"] == 2 and info["builds"] == 2  # admitted on its second use
    # An in-place write bumps the version: the cache must not return the old preparation.
    with torch.no_grad():
        w.codes[0, :5] = 0
    with ops.reference_kernels():
        want = torchlns.lns_linear(x, w)
    _check(torchlns.lns_linear(x, w), want, False, 64, torch.full_like(want, 1.0).double() * 1e9, None, "after write")
    assert not torch.equal(torchlns.lns_linear(x, w)[:, 0], first[:, 0])


def test_converted_layer_drops_its_preparation_when_its_weights_change():
    torch.manual_seed(0)
    float_model = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                      torch.nn.Linear(16 * 36, 10))
    other = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(16 * 36, 10))
    calib = [torch.randn(2, 4, 6, 6)]
    cfg = torchlns.ConvertConfig(mac=torchlns.CHIP_MAC)
    q, q_other = torchlns.convert(float_model, cfg, calib), torchlns.convert(other, cfg, calib)
    x = torch.randn(3, 4, 6, 6)
    for _ in range(3):
        q(x)
    q.load_state_dict(q_other.state_dict())
    assert_same(q(x), q_other(x), "after load_state_dict")
    assert_same(q.float()(x), q_other(x), "after .float()")


# ----------------------------------------------------------------------------------------
# FP8 / INT
# ----------------------------------------------------------------------------------------
SCALED = [FP8Format("e4m3"), FP8Format("e5m2"), IntFormat(8), IntFormat(4)]


def _scaled_codes(shape, fmt, g, big=False):
    if fmt.integer:
        lim = fmt.qmax
        v = torch.randint(-lim, lim + 1, shape, generator=g)
        return (torch.where(torch.rand(shape, generator=g) < 0.5, lim, -lim) if big else v).to(fmt.code_dtype)
    c = torch.randint(0, 256, shape, generator=g, dtype=torch.int32)
    special = (c & 0x7F) == 0x7F if fmt.variant == "e4m3" else (c & 0x7C) == 0x7C
    return torch.where(special, 0x3C, c).to(torch.uint8)  # finite values (inf/NaN are tested with the codecs)


@pytest.mark.parametrize("impl", ["cpu", "dense"])
@pytest.mark.parametrize("fmt", SCALED, ids=str)
def test_scaled_mm_matches_reference(impl, fmt):
    g = torch.Generator().manual_seed(1)
    vals = fmt.value_table("cpu")
    for (M, N, K, xb, wb, big) in [(7, 9, 50, 0, 0, False), (5, 3, 2000, 0, 0, True), (6, 4, 48, 16, 0, False),
                                   (3, 5, 40, 8, 12, False), (1, 1, 0, 0, 0, False)]:
        x, w = _scaled_codes((M, K), fmt, g, big), _scaled_codes((N, K), fmt, g, big)
        xs = torch.rand(M if xb else 1, K if xb else 1, generator=g) + 0.5
        ws = torch.rand(N, K if wb else 1, generator=g) + 0.5
        args = (x, xs, vals, w, ws, vals, torch.randn(N, generator=g), xb, wb)
        want = reference.scaled_mm_reference(*args)
        got = OPS.scaled_mm(*args) if impl == "cpu" else dense.scaled_mm_dense(*args)
        if fmt.integer:  # big: K max codes pass 2^24, the float32 sum would not be exact
            assert_same(got, want, f"scaled_mm {fmt} {(M, N, K, xb, wb, big)}")
        else:
            vx, vw = vals[x.long()].double(), vals[w.long()].double()
            scale = (xs.double().amax() * ws.double().amax())
            bound = K * 2.0**-24 * (vx.abs() @ vw.abs().T) * scale + 1e-6 * want.double().abs() + 1e-30
            assert ((got.double() - want.double()).abs() <= bound).all(), f"scaled_mm {fmt} {(M, N, K)}"


@pytest.mark.parametrize("impl", ["cpu", "dense"])
@pytest.mark.parametrize("fmt", SCALED, ids=str)
def test_scaled_conv_matches_reference(impl, fmt):
    g = torch.Generator().manual_seed(2)
    vals = fmt.value_table("cpu")
    for (N, C, H, W, Cout, k, stride, pb, pa, groups, big) in [
            (2, 8, 7, 9, 6, 3, (1, 2), (1, 1), (1, 0), 2, False), (1, 4, 5, 5, 4, 3, (1, 1), (1, 1), (1, 1), 4, False),
            (1, 256, 4, 4, 2, 3, (1, 1), (1, 1), (1, 1), 1, True)]:
        x, w = _scaled_codes((N, C, H, W), fmt, g, big), _scaled_codes((Cout, C // groups, k, k), fmt, g, big)
        xs, ws = torch.tensor([0.75]), torch.rand(Cout, generator=g) + 0.5
        args = (x, xs, vals, w, ws, vals, torch.randn(Cout, generator=g), list(stride), list(pb), list(pa), [1, 1],
                groups)
        want = reference.scaled_conv_reference(*args)
        got = OPS.scaled_conv(*args) if impl == "cpu" else dense.scaled_conv_dense(*args)
        if fmt.integer:
            assert_same(got, want, f"scaled_conv {fmt} {(N, C, H, W, Cout)}")
        else:
            rel = (got.double() - want.double()).abs() / (want.double().abs() + 1e-3)
            assert rel.max() < C * k * k * 2.0**-20, f"scaled_conv {fmt}: {rel.max()}"


def test_every_isa_gives_the_same_codec_bits():
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(10000, generator=g) * 2.0 ** torch.randint(-30, 30, (10000,), generator=g).float(),
                   torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -3e38])])
    for fmt in [LNSFormat(8, 3), LNSFormat(8, 4), LNSFormat(12, 6), LNSFormat(8, 3, "mitchell"), LNSFormat(6, 1)]:
        off = torch.tensor(-fmt.e_max, dtype=torch.int32)
        args = (x, off, tables.buckets_tensor(fmt.frac_bits, "cpu"), fmt.bits, fmt.frac_bits,
                fmt.rounding == "mitchell")
        want = reference.lns_encode_reference(*args)
        for isa in ISAS:
            with ops.force_isa(isa):
                for n in (len(x), 7, 17):  # vector bodies and scalar tails
                    assert_same(OPS.lns_encode(x[:n], *args[1:]), want[:n], f"encode {fmt} {isa} n={n}")


def test_paths_named_in_order():
    assert tuple(ops.MAC_PATHS) == ("auto", "direct", "classes", "scalar")
    assert list(itertools.islice(ops.ISAS, 3)) == ["baseline", "avx2", "avx512"]


def test_scaled_kernels_same_bits_at_one_and_two_threads():
    g = torch.Generator().manual_seed(4)
    fmt = FP8Format("e4m3")
    vals = fmt.value_table("cpu")
    x, w = _scaled_codes((300, 256), fmt, g), _scaled_codes((96, 256), fmt, g)
    xi, wi = _scaled_codes((4, 32, 14, 14), fmt, g), _scaled_codes((48, 16, 3, 3), fmt, g)
    cases = [lambda: OPS.scaled_mm(x, torch.tensor([[0.5]]), vals, w, torch.rand(96, 1, generator=g) + 0.5, vals, None,
                                   0, 0),
             lambda: OPS.scaled_conv(xi, torch.tensor([0.5]), vals, wi, torch.ones(48), vals, None, [1, 1], [1, 1],
                                     [1, 1], [1, 1], 2)]
    threads = torch.get_num_threads()
    try:
        for run in cases:
            torch.set_num_threads(1)
            g.manual_seed(9)
            one = run()
            torch.set_num_threads(2)
            g.manual_seed(9)
            assert_same(run(), one, "scaled MAC, 1 vs 2 threads")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", [LNSFormat(5, 0), LNSFormat(4, 1), LNSFormat(6, 2), LNSFormat(8, 3)], ids=str)
def test_fixed_products_keep_their_sign_at_every_isa(isa, fmt):
    # AVX2's negate_where once read the sign from bit 0 of the field sum whatever the layout;
    # split fields (F < 3 on AVX2) keep it in bit 5, so negative products were summed as positive.
    from test_kernels import mm_args, mm_case

    args = mm_args(mm_case(6, 5, 37, fmt, seed=fmt.bits), fmt, MACConfig.chip(), -10)
    assert_same(_run(lambda: OPS.lns_mm(*args), isa, "direct"), reference.lns_mm_reference(*args),
                f"lns_mm {fmt} chip {isa}")


# ----------------------------------------------------------------------------------------
# product pairs (see Note: product pairs in csrc/lns_direct.h)
# ----------------------------------------------------------------------------------------
VECTOR_ISAS = [i for i in ISAS if i != "baseline"]
PAIR_MACS = [  # every conversion the pairs reproduce, both accumulators, saturation and W < 32
    (MACConfig(), None),
    (MACConfig(conversion="lut", lut_bits=8), None),
    (MACConfig.chip(), -14),
    (MACConfig.chip(), -40),
    (MACConfig(accumulator="fixed", acc_bits=32), -14),
    (MACConfig(conversion="lut", lut_bits=5, accumulator="fixed", acc_bits=16), -6),
]


def _counted(fn):
    ops.reset_direct_kernel_counts()
    out = fn()
    return out, ops.direct_kernel_counts()


def _expect_kernel(counts, fmt, isa, what):
    table_f = 4 if isa == "avx512" else 3  # the widest F of the table kernels (see Note: direct kernels)
    kind = "table" if fmt.frac_bits <= table_f else "pairs"
    assert counts[kind] >= 1 and counts["declined"] == 0, f"{what}: expected the {kind} kernel, ran {counts}"


@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("fmt", [LNSFormat(8, 4), LNSFormat(8, 5), LNSFormat(10, 5), LNSFormat(12, 6), LNSFormat(9, 7)],
                         ids=str)
def test_every_product_of_every_code_pair_is_exact(isa, fmt):
    """All (x, w) code pairs at once, each product alone in its own output (K = 1), so the
    float32 accumulator adds nothing to it: tolerance 0 for every conversion and accumulator."""
    codes = torch.arange(1 << fmt.bits, dtype=torch.int32)
    if fmt.bits > 10:  # 4096^2 products: every magnitude with a sign, against a stride of partners
        codes, partners = codes, codes[::7]
    else:
        partners = codes
    c = lambda v: (torch.where(v >= 1 << 15, v - (1 << 16), v) if fmt.bits == 16 else v).to(fmt.code_dtype)  # noqa
    x, w = c(codes).reshape(-1, 1), c(partners).reshape(-1, 1)
    x = torch.where(x.to(torch.int32) == fmt.nan_code, 0, x.to(torch.int32)).to(fmt.code_dtype)
    w = torch.where(w.to(torch.int32) == fmt.nan_code, 0, w.to(torch.int32)).to(fmt.code_dtype)
    xo = torch.tensor([[-fmt.e_max + 3]], dtype=torch.int32)
    wo = torch.tensor([[-fmt.e_max - (1 << fmt.frac_bits)]], dtype=torch.int32)
    for mac, lsb in PAIR_MACS:
        table = _table(fmt, mac)
        args = (x, xo, w, wo, table, None, fmt.bits, fmt.bits, fmt.frac_bits, mac.fixed, mac.acc_bits,
                lsb if mac.fixed else 0)
        want = reference.lns_mm_reference(*args)
        got, counts = _counted(lambda: _run(lambda: OPS.lns_mm(*args), isa, "direct"))
        assert_same(got, want, f"every product {fmt} {mac} {isa}")
        _expect_kernel(counts, fmt, isa, f"{fmt} {mac} {isa}")


@pytest.mark.parametrize("isa", VECTOR_ISAS)
@pytest.mark.parametrize("fmt", [LNSFormat(8, 4), LNSFormat(10, 5), LNSFormat(12, 6)], ids=str)
def test_wide_formats_run_the_direct_kernels_on_every_shape(isa, fmt):
    g = torch.Generator().manual_seed(fmt.bits)
    for mac, lsb in PAIR_MACS:
        table = _table(fmt, mac)
        for (M, N, K) in [(9, 37, 300), (13, 5, 70), (1, 130, 17)]:
            x, w = _codes((M, K), fmt, g, p_nan=0.01 if M > 5 else 0.0), _codes((N, K), fmt, g, p_nan=0.002)
            args = (x, _offsets(1, fmt, g, per_row=False), w, _offsets(N, fmt, g), table,
                    torch.randn(N, generator=g) * 2.0**-8, fmt.bits, fmt.bits, fmt.frac_bits, mac.fixed, mac.acc_bits,
                    lsb if mac.fixed else 0)
            want = reference.lns_mm_reference(*args)
            got, counts = _counted(lambda: _run(lambda: OPS.lns_mm(*args), isa, "direct"))
            abs_sum = None if mac.fixed else _abs_mm(args[0], args[1], w, args[3], table, fmt)
            _check(got, want, mac.fixed, K, abs_sum, args[5], f"lns_mm {fmt} {mac} {isa} {(M, N, K)}")
            _expect_kernel(counts, fmt, isa, f"lns_mm {fmt} {mac} {(M, N, K)}")
        for case in CONVS:
            N, C, H, W, Cout, k, stride, pb, pa, dil, groups = case
            x = _codes((N, C, H, W), fmt, g, p_nan=0.005)
            w = _codes((Cout, C // groups, k, k), fmt, g, p_zero=0.1, p_nan=0.01)
            args = (x, _offsets(1, fmt, g, per_row=False).reshape(1, 1, 1, 1), w,
                    _offsets(Cout, fmt, g).reshape(Cout, 1, 1, 1), table, torch.randn(Cout, generator=g) * 2.0**-8,
                    fmt.bits, fmt.bits, fmt.frac_bits, mac.fixed, mac.acc_bits, lsb if mac.fixed else 0, list(stride),
                    list(pb), list(pa), list(dil), groups)
            with ops.reference_kernels():
                want = reference.lns_conv_reference(*args)
                abs_sum = None
                if not mac.fixed:
                    strip = lambda c: (c.to(torch.int32) & fmt.e_max).to(c.dtype)  # noqa: E731
                    abs_sum = reference.lns_conv_reference(strip(x), args[1], strip(w), args[3], table, None,
                                                           *args[6:9], False, 32, 0, *args[12:]).double()
            got, counts = _counted(lambda: _run(lambda: OPS.lns_conv(*args), isa, "direct"))
            _check(got, want, mac.fixed, C // groups * k * k, abs_sum, args[5], f"lns_conv {fmt} {mac} {isa} {case}")
            _expect_kernel(counts, fmt, isa, f"lns_conv {fmt} {mac} {case}")


def test_product_pairs_decline_what_they_cannot_reproduce():
    """Mitchell's conversion is not a rounding of 2^(r/2^F): the pairs decline it, and another
    kernel gives the reference's bits."""
    fmt, mac = LNSFormat(10, 5), MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=24)
    from test_kernels import mm_args, mm_case

    args = mm_args(mm_case(6, 40, 37, fmt, seed=3), fmt, mac, -10)
    got, counts = _counted(lambda: OPS.lns_mm(*args))
    assert_same(got, reference.lns_mm_reference(*args), "mitchell F=5")
    if ISAS[-1] != "baseline":
        assert counts["pairs"] == 0 and counts["declined"] >= 1, counts


@pytest.mark.parametrize("isa", VECTOR_ISAS)
def test_product_pairs_near_the_float32_ceiling(isa):
    """Products near 2^127: a LUT's rounding step would overflow there, so the pairs must
    decline (or stay exact), never return inf or NaN."""
    fmt = LNSFormat(10, 5)
    g = torch.Generator().manual_seed(7)
    x, w = _codes((6, 40), fmt, g, p_zero=0.0), _codes((20, 40), fmt, g, p_zero=0.0)
    R = 1 << fmt.frac_bits
    for top in (100, 118, 124):  # the largest product's octave, about
        xo = torch.tensor([[top // 2 * R - fmt.e_max]], dtype=torch.int32)
        wo = torch.full((20, 1), (top - top // 2) * R - fmt.e_max, dtype=torch.int32)
        for mac in (MACConfig(conversion="lut", lut_bits=8), MACConfig()):
            args = (x, xo, w, wo, _table(fmt, mac), None, fmt.bits, fmt.bits, fmt.frac_bits, False, 32, 0)
            want = reference.lns_mm_reference(*args)
            got = _run(lambda: OPS.lns_mm(*args), isa, "direct")
            abs_sum = _abs_mm(x, xo, w, wo, args[4], fmt)
            _check(got, want, False, 40, abs_sum, None, f"ceiling {top} {mac} {isa}")
