"""The GPU MAC: its operand algebra in plain torch (every code pair, tolerance 0), and its
Triton kernels against the reference, every tile configuration and both kernels.

On a GPU the kernels run compiled; in CI under TRITON_INTERPRET=1 (tests/conftest.py). The
fixed accumulator must give the reference's bits; the float32 accumulator must stay within
the spec's bound (see Note: bf16 pieces of the remainder classes in torchlns/ops/mac_tables.py).
"""

import copy
import math

import pytest
import torch

from test_kernels import MACS, assert_mm_matches, assert_same, mm_args, mm_case

from torchlns import ops
from torchlns.core import tables
from torchlns.core.formats import LNSFormat, MACConfig
from torchlns.ops import mac_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy integer/NaN arithmetic in the interpreter


def conversion(F, mac: MACConfig):
    return tables.conversion_tensor_f64(F, mac.conversion, mac.lut_bits, torch.device("cpu"))


# ----------------------------------------------------------------------------------------
# the operand algebra, without Triton
# ----------------------------------------------------------------------------------------
TABLES = ([("exact", F, 0) for F in range(0, 11)] + [("lut", 3, P) for P in range(1, 24)]
          + [("mitchell", F, 0) for F in range(0, 11)])


@pytest.mark.parametrize("kind,F,P", TABLES, ids=lambda v: str(v))
def test_bf16_pieces_are_exact_and_fewest(kind, F, P):
    table = tables.conversion_tensor_f64(F, kind, P or 8, torch.device("cpu"))
    ext = mac_tables.extended_table(table)
    pieces = mac_tables.bf16_pieces(ext)
    assert torch.equal(pieces.double().sum(0), ext.double())  # the pieces add up exactly (each sum is exact)
    assert torch.equal(pieces.to(torch.bfloat16).float(), pieces)  # each is a bf16 value
    assert ((pieces == 0) | (torch.sign(pieces) == torch.sign(ext))).all()  # truncation: the entry's sign
    assert torch.equal(pieces.abs().double().sum(0), ext.abs().double())
    nonzero = pieces[pieces != 0].abs()
    assert (nonzero >= 2.0**mac_tables.PIECE_MIN_EXP).all() and (nonzero <= 4).all()  # a LUT entry may round to 2
    significant = {"exact": 24 if F > 0 else 1, "lut": P + 1, "mitchell": F + 1}[kind]
    assert pieces.shape[0] <= math.ceil(significant / 8)
    if kind == "lut" and P == 8:
        assert pieces.shape[0] == 2  # the chip's LUT: 16 tensor-core products for LNS8
    if kind == "exact" and F == 3:
        assert pieces.shape[0] == 3  # LNS8 ideal: 24


def test_bf16_pieces_refuse_what_they_cannot_split():
    with pytest.raises(TypeError, match="float32"):
        mac_tables.bf16_pieces(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        mac_tables.bf16_pieces(torch.tensor([1.0, math.inf]))
    with pytest.raises(ValueError, match="exact float32"):
        mac_tables.extended_table(torch.tensor([1.0 + 2.0**-30], dtype=torch.float64))


FORMAT_MACS = [(LNSFormat(8, 3), MACConfig()), (LNSFormat(8, 3), MACConfig(conversion="lut", lut_bits=8)),
               (LNSFormat(8, 3, "mitchell"), MACConfig(conversion="mitchell")), (LNSFormat(6, 2), MACConfig()),
               (LNSFormat(4, 1), MACConfig(conversion="lut", lut_bits=5)), (LNSFormat(10, 4), MACConfig())]


@pytest.mark.parametrize("fmt,mac", FORMAT_MACS, ids=str)
def test_class_operands_give_every_product_exactly(fmt, mac):
    """Every code pair of the format (K = 1): sum_i sum_j A_i V_ij is the exact product, in float64."""
    F = fmt.frac_bits
    codes = torch.arange(1 << fmt.bits, dtype=torch.int32)
    codes = codes[codes != fmt.nan_code]
    codes = (torch.where(codes >= 1 << 15, codes - (1 << 16), codes) if fmt.bits == 16 else codes).to(fmt.code_dtype)
    table = conversion(F, mac)
    for xo, wo in [(-fmt.e_max, -fmt.e_max), (-fmt.e_max - 3 * (1 << F) + 1, 5), (7, -fmt.e_max - 11)]:
        x_off = torch.tensor([[xo]], dtype=torch.int32)
        w_off = torch.tensor([[wo]], dtype=torch.int32)
        A, V = mac_tables.class_operands(codes[:, None], x_off, codes[:, None], w_off, table, fmt.bits, fmt.bits, F)
        got = torch.einsum("imk,ijnk->mn", A.double(), V.double())
        want = ops.REFERENCE["lns_mm"](codes[:, None], x_off, codes[:, None], w_off, table, None, fmt.bits, fmt.bits,
                                       F, False, 32, 0)  # K = 1: the float32 output is the product, if exact
        from torchlns.core.fields import exp2_f64, log_fields

        gx, nx, zx, _ = log_fields(codes[:, None], x_off, fmt.bits)
        gw, nw, zw, _ = log_fields(codes[:, None], w_off, fmt.bits)
        G = gx + gw.T
        exact = table[G & ((1 << F) - 1)] * exp2_f64(G >> F)
        exact = torch.where(zx | zw.T, 0.0, torch.where(nx ^ nw.T, -exact, exact))
        assert torch.equal(got, exact), f"{fmt} offsets {xo}/{wo}"
        assert torch.equal(want.double(), exact.float().double())


def test_class_terms_in_range_rules():
    ok = mac_tables.class_terms_in_range
    assert ok((-20, 10), (-20, 10))
    assert not ok((-127, 0), (0, 0))  # an A entry below the normal range
    assert not ok((0, 0), (-104, 0))  # a V piece below it (pieces reach 2^-23)
    assert ok((0, 0), (-103, 0))
    assert not ok((-60, 0), (-44, 0))  # a product below it
    assert ok((-60, 0), (-43, 0))
    assert not ok((0, 100), (0, 26))  # a product of 2^126 * C_ext (< 4) may reach 2^128
    assert ok((0, 100), (0, 25))
    assert mac_tables.octave_bounds(torch.tensor([-130, -120]), 8, 3) == ((1 - 130) >> 3, (127 - 120) >> 3)


def test_integer_table():
    for F, kind, P, S in [(3, "lut", 8, 8), (3, "exact", 8, 23), (3, "mitchell", 8, 3), (0, "exact", 8, 0)]:
        L, got_S = mac_tables.integer_table(tables.conversion_tensor_f64(F, kind, P, torch.device("cpu")))
        assert got_S == S and L.dtype == torch.int32
        assert torch.equal(L.double() / 2.0**S, tables.conversion_tensor_f64(F, kind, P, torch.device("cpu")))
    L, _ = mac_tables.integer_table(conversion(3, MACConfig(conversion="lut", lut_bits=8)))
    assert L.tolist() == [256, 279, 304, 332, 362, 395, 431, 470]  # the spec's LUT8


# ----------------------------------------------------------------------------------------
# the kernels
# ----------------------------------------------------------------------------------------
triton = pytest.importorskip("triton")
from torchlns.ops import triton_mac as tm  # noqa: E402


def on_device(args):
    return tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)


def routes(mac):
    return ["direct"] if mac.accumulator == "fixed" else ["classes", "direct"]


MM_SHAPES = [(1, 1, 1, "tensor"), (7, 5, 13, "row"), (17, 9, 37, "element"), (0, 3, 4, "tensor"), (3, 2, 0, "column"),
             (33, 18, 70, "column")]


def config_id(c):
    return "x".join(str(v) for v in c.kwargs.values()) + f"w{c.num_warps}"


@pytest.mark.parametrize("config", tm._classes_configs(), ids=config_id)
@pytest.mark.parametrize("mac", [m for m, _ in MACS if m.accumulator == "float32"], ids=repr)
def test_classes_kernel_every_config(config, mac):
    fmt = LNSFormat(8, 3)
    for M, N, K, offsets in MM_SHAPES:
        args = on_device(mm_args(mm_case(M, N, K, fmt, seed=K, p_nan=0.03 if K > 5 else 0.0, offsets=offsets), fmt,
                                 mac, None))
        got = tm.lns_mm(*args, config=config, route="classes")
        assert_mm_matches(got.cpu(), ops.REFERENCE["lns_mm"](*args).cpu(), tuple(a.cpu() if isinstance(a, torch.Tensor)
                          else a for a in args), f"classes {mac} {M}x{N}x{K}")


@pytest.mark.parametrize("config", tm._direct_configs(), ids=config_id)
@pytest.mark.parametrize("mac,acc_lsb", MACS, ids=repr)
def test_direct_kernel_every_config(config, mac, acc_lsb):
    fmt = LNSFormat(8, 3)
    for M, N, K, offsets in MM_SHAPES[:5]:
        args = on_device(mm_args(mm_case(M, N, K, fmt, seed=K, p_nan=0.03 if K > 5 else 0.0, offsets=offsets), fmt,
                                 mac, acc_lsb))
        got = tm.lns_mm(*args, config=config, route="direct")
        assert_mm_matches(got.cpu(), ops.REFERENCE["lns_mm"](*args).cpu(), tuple(a.cpu() if isinstance(a, torch.Tensor)
                          else a for a in args), f"direct {mac} {M}x{N}x{K}")


@pytest.mark.parametrize("fmt", [LNSFormat(6, 2), LNSFormat(12, 4), LNSFormat(16, 10), LNSFormat(12, 6), LNSFormat(5, 0),
                                 LNSFormat(8, 3, "mitchell")], ids=str)
def test_wide_and_narrow_formats(fmt):
    macs = [(MACConfig.chip(), -10), (MACConfig(accumulator="fixed", acc_bits=40, conversion="mitchell"), -25),
            (MACConfig(), None), (MACConfig(conversion="lut", lut_bits=8), None)]
    for mac, lsb in macs:
        args = on_device(mm_args(mm_case(6, 5, 21, fmt, seed=fmt.bits), fmt, mac, lsb))
        want = ops.REFERENCE["lns_mm"](*args).cpu()
        cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
        for route in routes(mac) if fmt.frac_bits <= mac_tables.MAX_CLASS_BITS else ["direct"]:
            assert_mm_matches(tm.lns_mm(*args, route=route).cpu(), want, cpu_args, f"{fmt} {mac} {route}")


def test_fixed_bias_edge_cases():
    fmt = LNSFormat(8, 3)
    case = list(mm_case(4, 5, 16, fmt))
    case[4] = torch.tensor([math.nan, math.inf, -math.inf, 3e38, -0.5])
    for lsb in (-8, -30, 20):
        args = on_device(mm_args(tuple(case), fmt, MACConfig.chip(), lsb))
        assert_same(tm.lns_mm(*args).cpu(), ops.REFERENCE["lns_mm"](*args).cpu(), f"bias edge cases, lsb {lsb}")


def test_fixed_saturation_and_truncation():
    """Products above T, below the LSB, and a sum that saturates: the reference's bits."""
    fmt = LNSFormat(8, 3)
    x, xo, w, wo, b = mm_case(5, 7, 40, fmt, seed=9, p_zero=0.0)
    for mac, lsb in [(MACConfig(accumulator="fixed", acc_bits=8, conversion="lut", lut_bits=8), -2),
                     (MACConfig(accumulator="fixed", acc_bits=12, conversion="exact"), 6),
                     (MACConfig(accumulator="fixed", acc_bits=48, conversion="exact"), -120)]:
        args = on_device(mm_args((x, xo, w, wo, b), fmt, mac, lsb))
        assert_same(tm.lns_mm(*args).cpu(), ops.REFERENCE["lns_mm"](*args).cpu(), f"{mac} lsb {lsb}")


def test_route_follows_the_offsets():
    """Offsets that would take a product out of float32's normal range run the direct kernel."""
    fmt = LNSFormat(8, 3)
    x, _, w, _, b = mm_case(4, 3, 9, fmt, seed=2)
    mac = MACConfig()
    calls = []
    real = tm._pick

    def spy(config, tuned, plain, *rest):
        calls.append(plain.fn.__name__ if hasattr(plain, "fn") else str(plain))
        return real(config, tuned, plain, *rest)

    tm._pick = spy
    try:
        for xo, wo, kernel in [(-127, -127, "classes"), (fmt.offset_min, fmt.offset_min, "direct"),
                               (fmt.offset_max, fmt.offset_max, "direct")]:
            calls.clear()
            args = on_device(mm_args((x, torch.tensor([[xo]], dtype=torch.int32), w,
                                      torch.tensor([[wo]], dtype=torch.int32), b), fmt, mac, None))
            got = tm.lns_mm(*args).cpu()
            assert kernel in calls[0], (xo, wo, calls)
            want = ops.REFERENCE["lns_mm"](*args).cpu()
            same = (got == want) | (torch.isnan(got) & torch.isnan(want))  # overflow: inf on both sides
            close = (got.double() - want.double()).abs() <= 2.0**-20 * want.double().abs()
            assert (same | close).all(), f"offsets {xo}/{wo}"
    finally:
        tm._pick = real


def test_octave_bounds_cache_follows_in_place_changes():
    off = torch.full((3, 1), -120, dtype=torch.int32)
    assert tm._octaves(off.expand(3, 5), 8, 3) == tm._octaves(off, 8, 3)
    before = tm._octaves(off.expand(3, 5), 8, 3)
    off.fill_(200)
    assert tm._octaves(off.expand(3, 5), 8, 3) != before


# ----------------------------------------------------------------------------------------
# implicit-GEMM convolution
# ----------------------------------------------------------------------------------------
CONVS = [  # N, C, H, W, Cout, groups, kernel, stride, pad_before, pad_after, dilation
    (2, 4, 7, 6, 6, 2, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),
    (1, 3, 9, 8, 4, 1, (3, 2), (2, 1), (0, 1), (2, 0), (1, 2)),
    (2, 4, 5, 5, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1)),  # depthwise
    (1, 5, 1, 11, 3, 1, (1, 3), (1, 2), (0, 2), (0, 0), (1, 1)),  # conv1d as 2-D
    (2, 3, 4, 4, 2, 1, (1, 1), (1, 1), (0, 0), (0, 0), (1, 1)),  # 1x1
]


def conv_case(spec, fmt, offsets, seed):
    N, C, H, W, Cout, groups, k, st, pb, pa, d = spec
    g = torch.Generator().manual_seed(seed)

    def codes(shape):
        c = torch.randint(0, 1 << fmt.bits, shape, generator=g)
        c = torch.where(c == fmt.nan_code, 1, c)
        c = torch.where(torch.rand(shape, generator=g) < 0.2, 0, c)
        return c.to(fmt.code_dtype)

    x, w = codes((N, C, H, W)), codes((Cout, C // groups, *k))
    lo, hi = -fmt.e_max - 4 * (1 << fmt.frac_bits), -fmt.e_max + 2 * (1 << fmt.frac_bits)
    xo_shape = {"tensor": (1, 1, 1, 1), "element": (N, C, H, W)}[offsets]
    wo_shape = {"tensor": (1, 1, 1, 1), "element": (Cout, C // groups, *k)}[offsets]
    if offsets == "tensor":
        wo_shape = (Cout, 1, 1, 1)
    xo = torch.randint(lo, hi, xo_shape, generator=g, dtype=torch.int32)
    wo = torch.randint(lo, hi, wo_shape, generator=g, dtype=torch.int32)
    return x, xo, w, wo, torch.randn(Cout, generator=g), (list(st), list(pb), list(pa), list(d), groups)


def reference_conv(args):
    with ops.reference_kernels():
        return torch.ops.torchlns.lns_conv(*args)


def conv_sum_abs(args):
    x, xo, w, wo, table, _, xb, wb, F, _, acc_bits, _, *geometry = args
    e_max = (1 << (xb - 1)) - 1
    strip = lambda c: (c.to(torch.int32) & e_max).to(c.dtype)  # noqa: E731
    return reference_conv((strip(x), xo, strip(w), wo, table, None, xb, wb, F, False, acc_bits, 0, *geometry)).double()


@pytest.mark.parametrize("spec", CONVS, ids=lambda s: "x".join(map(str, s[:6])))
@pytest.mark.parametrize("mac,acc_lsb", [(MACConfig.chip(), -14), (MACConfig(), None),
                                         (MACConfig(conversion="lut", lut_bits=8), None),
                                         (MACConfig(accumulator="fixed", acc_bits=40), -30)], ids=repr)
def test_implicit_gemm_conv(spec, mac, acc_lsb):
    fmt = LNSFormat(8, 3)
    for offsets in ["tensor", "element"]:
        x, xo, w, wo, b, geometry = conv_case(spec, fmt, offsets, seed=len(offsets))
        args = (x, xo, w, wo, conversion(3, mac), b, 8, 8, 3, mac.fixed, mac.acc_bits, acc_lsb if mac.fixed else 0,
                *geometry)
        want = reference_conv(args)
        for route in routes(mac):
            got = tm.lns_conv(*on_device(args), route=route).cpu()
            if mac.fixed:
                assert_same(got, want, f"conv {spec} {offsets}")
                continue
            assert got.shape == want.shape and got.is_contiguous()
            K = w[0].numel()
            bound = (K * 2.0**-24 * conv_sum_abs(args) + 2.0**-23 * (want.double().abs() + b.double().abs()[:, None, None])
                     + 2.0**-149)
            assert ((got.double() - want.double()).abs() <= bound).all(), f"conv {spec} {offsets} {route}"


def test_conv_every_config():
    fmt = LNSFormat(8, 3)
    spec = CONVS[0]
    x, xo, w, wo, b, geometry = conv_case(spec, fmt, "tensor", seed=3)
    for mac, lsb in [(MACConfig.chip(), -14), (MACConfig(conversion="lut", lut_bits=8), 0)]:
        args = (x, xo, w, wo, conversion(3, mac), b, 8, 8, 3, mac.fixed, mac.acc_bits, lsb, *geometry)
        want = reference_conv(args)
        configs = tm._direct_configs() if mac.fixed else tm._classes_configs()
        for config in configs:
            got = tm.lns_conv(*on_device(args), config=config).cpu()
            if mac.fixed:
                assert_same(got, want, f"conv {config}")
            else:
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-3), config


def test_conv_empty_and_non_contiguous():
    fmt = LNSFormat(8, 3)
    x, xo, w, wo, b, geometry = conv_case(CONVS[1], fmt, "tensor", seed=4)
    mac = MACConfig.chip()
    table = conversion(3, mac)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    args = (x, xo, w, wo, table, b, 8, 8, 3, True, 32, -14, *geometry)
    assert_same(tm.lns_conv(*on_device((xt,) + args[1:])).cpu(), reference_conv(args), "strided input")
    empty = (x[:0],) + args[1:]
    assert tm.lns_conv(*on_device(empty)).shape == reference_conv(empty).shape


# ----------------------------------------------------------------------------------------
# a whole converted model through the GPU path (on the CPU, under the interpreter)
# ----------------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    """Every layer kind the GPU path serves: conv, depthwise, Conv3d, ConvTranspose2d, Linear."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU())
        self.vol = nn.Conv3d(2, 4, (2, 3, 3), padding=(0, 1, 1))
        self.up = nn.ConvTranspose2d(16, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        x = self.dw(self.stem(x))  # (N, 8, 4, 4)
        v = self.vol(x.reshape(x.shape[0], 2, 4, 4, 4)).relu()  # (N, 4, 3, 4, 4)
        x = self.up(torch.cat([x, v.flatten(1, 2)[:, :8]], 1))  # (N, 4, 8, 8)
        return self.head(x.flatten(1))


@pytest.mark.parametrize("mac", [MACConfig.chip(), MACConfig()], ids=repr)
def test_converted_model_through_the_gpu_kernels(mac, monkeypatch):
    import torchlns
    from torchlns.config import ConvertConfig

    torch.manual_seed(0)
    model = _Net().eval()
    data = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    q = torchlns.convert(model, ConvertConfig(mac=mac), data)
    x = torch.randn(3, 3, 8, 8)
    launches = []
    real = tm._mac
    monkeypatch.setattr(tm, "_mac", lambda *a: launches.append(a[21]) or real(*a))  # a[21]: conv
    with torch.no_grad():
        want = q(x)
        assert not launches
        if DEVICE == "cuda":  # compiled kernels on the GPU
            got = copy.deepcopy(q).cuda()(x.cuda()).cpu()
        else:  # the same kernels in the interpreter, on CPU tensors
            with ops.cuda_kernels_on_cpu():
                got = q(x)
    assert launches.count(True) == 4 and launches.count(False) == 1  # four convs (Conv3d too), one linear
    assert torch.isfinite(want).all()
    if mac.fixed:  # exact sums: the CPU kernels' bits
        assert_same(got, want, "converted model, GPU kernels vs CPU kernels")
    else:  # float32 sums in another order, then re-encoded by the next layer
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_packed_table_holds_the_chip_lut():
    L, _ = mac_tables.integer_table(conversion(3, MACConfig(conversion="lut", lut_bits=8)))
    L0, w0, w1 = mac_tables.packed_table(L)
    unpacked = [L0 + (((w0 if r < 4 else w1) >> (8 * (r & 3))) & 255) for r in range(8)]
    assert unpacked == L.tolist()
    assert mac_tables.packed_table(mac_tables.integer_table(conversion(3, MACConfig()))[0]) is None  # 2^23..2^24
    assert mac_tables.packed_table(torch.arange(16, dtype=torch.int32)) is None  # more than 8 entries


CONVS3D = [  # N, C, D, H, W, Cout, groups, kernel, stride, pad_before, pad_after, dilation
    (2, 4, 5, 6, 5, 6, 2, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1)),
    (1, 3, 7, 5, 6, 4, 1, (2, 3, 2), (2, 1, 2), (0, 1, 1), (1, 0, 0), (2, 1, 1)),
    (1, 4, 4, 4, 4, 4, 4, (3, 1, 3), (1, 1, 1), (1, 0, 1), (1, 0, 1), (1, 1, 1)),
]


@pytest.mark.parametrize("spec", CONVS3D, ids=lambda s: "x".join(map(str, s[:7])))
@pytest.mark.parametrize("mac,acc_lsb", [(MACConfig.chip(), -14), (MACConfig(), None)], ids=repr)
def test_implicit_gemm_conv3d(spec, mac, acc_lsb):
    """A Conv3d as one 3-D implicit GEMM against the reference (which stacks the depth taps as channels)."""
    fmt = LNSFormat(8, 3)
    N, C, D, H, W, Cout, groups, k, st, pb, pa, d = spec
    g = torch.Generator().manual_seed(sum(k))

    def codes(shape):  # no NaN code: every output is a number to compare
        c = torch.randint(1, 128, shape, generator=g) + 128 * torch.randint(0, 2, shape, generator=g)
        return torch.where(torch.rand(shape, generator=g) < 0.2, 0, c).to(torch.uint8)

    x, w = codes((N, C, D, H, W)), codes((Cout, C // groups, *k))
    for xo, wo in [(torch.tensor(-110, dtype=torch.int32).reshape(1, 1, 1, 1, 1),
                    torch.randint(-140, -100, (Cout, 1, 1, 1, 1), generator=g, dtype=torch.int32)),
                   (torch.randint(-140, -100, x.shape, generator=g, dtype=torch.int32),
                    torch.randint(-140, -100, w.shape, generator=g, dtype=torch.int32))]:
        b = torch.randn(Cout, generator=g)
        args = (x, xo, w, wo, conversion(3, mac), b, 8, 8, 3, mac.fixed, mac.acc_bits, acc_lsb if mac.fixed else 0,
                list(st), list(pb), list(pa), list(d), groups)
        want = reference_conv(args)
        for route in routes(mac):
            got = tm.lns_conv(*on_device(args), route=route).cpu()
            if mac.fixed:
                assert_same(got, want, f"conv3d {spec}")
            else:
                assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item()), f"conv3d {spec} {route}"
