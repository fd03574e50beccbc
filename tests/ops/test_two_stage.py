"""The fixed accumulator's wrap-around and chunked (two-stage) designs (spec section 2; see
Note: overflow and chunks in torchlns/ops/reference.py), against an oracle in Python
integers, every code pair of a small format, tolerance 0."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import torchlns
from conftest import sweep
from torchlns import LNSFormat, LNSTensor, MACConfig
from torchlns.core import tables

FMT = LNSFormat(6, 2)  # 64 codes: every pair fits one test
E_BITS = FMT.bits - 1


def _oracle(xc, xo, wc, wo, bias, mac: MACConfig, lsb: int) -> float:
    """One output, in Python integers, straight from the spec's words."""
    C = [float(v) for v in tables.conversion_tensor_f64(FMT.frac_bits, mac.conversion, mac.lut_bits,
                                                        torch.device("cpu"))]
    R, nan_code = 1 << FMT.frac_bits, 1 << E_BITS
    W, W1 = mac.acc_bits, mac.chunk_width

    def fit(v, bits):
        if mac.overflow == "wrap":
            return (v + (1 << (bits - 1))) % (1 << bits) - (1 << (bits - 1))
        return max(-(2 ** (bits - 1) - 1), min(2 ** (bits - 1) - 1, v))
    products = []
    for a, b in zip(xc, wc):
        if a == nan_code or b == nan_code:
            return math.nan
        ea, eb = a & (nan_code - 1), b & (nan_code - 1)
        if ea == 0 or eb == 0:
            products.append(0)
            continue
        G = (ea + xo) + (eb + wo)
        q, r = G // R, G % R
        mag = math.floor(math.ldexp(C[r], q - lsb))
        products.append(fit(-mag if (a ^ b) & nan_code else mag, W1))
    if mac.chunk:
        total = sum(fit(sum(products[i:i + mac.chunk]), W1) for i in range(0, len(products), mac.chunk))
    else:
        total = sum(products)
    if bias is not None:
        total += round(bias * 2.0**-lsb)  # ties to even, as Python's round
    return float(torch.tensor(fit(total, W) * 2.0**lsb, dtype=torch.float64).to(torch.float32))


MACS = [MACConfig(conversion=c, lut_bits=4, accumulator="fixed", acc_bits=W, overflow=o, chunk=L, chunk_bits=W1)
        for c, W, o, (L, W1) in itertools.product(("exact", "lut", "mitchell"), (8, 12), ("saturate", "wrap"),
                                                 ((0, 0), (3, 8), (8, 10), (5, 0)))]


def _code_pairs(K: int = 8):
    """(x, w): every code of FMT at every k position over x's rows, against 16 rolled weight rows."""
    codes = torch.arange(64, dtype=torch.uint8)
    return (torch.stack([codes.roll(-i)[:K] for i in range(0, 64, 1)]),
            torch.stack([codes.roll(-3 * j)[:K] for j in range(0, 64, 4)]))


def _op_args(mac: MACConfig) -> tuple:
    """``lns_mm``'s arguments for the code pairs, offsets -4 and -2, acc_lsb -3, a bias."""
    x, w = _code_pairs()
    return (x, torch.tensor([[-4]], dtype=torch.int32), w, torch.tensor([[-2]], dtype=torch.int32),
            mac.table(FMT.frac_bits, torch.device("cpu")), torch.linspace(-40, 40, w.shape[0]), FMT.bits, FMT.bits,
            FMT.frac_bits, True, mac.acc_bits, -3, mac.overflow, mac.chunk, mac.chunk_bits)


@pytest.mark.parametrize("mac", MACS, ids=repr)
def test_every_code_pair_against_the_integer_oracle(mac):
    x, w = _code_pairs()
    xo, wo, lsb = -4, -2, -3
    xq = LNSTensor(x, torch.tensor(xo), FMT)
    wq = LNSTensor(w, torch.tensor(wo), FMT)
    bias = torch.linspace(-40, 40, w.shape[0])
    got = torchlns.lns_linear(xq, wq, bias, mac=mac, acc_lsb=lsb)
    want = torch.tensor([[_oracle(x[i].tolist(), xo, w[j].tolist(), wo, float(bias[j]), mac, lsb)
                          for j in range(w.shape[0])] for i in range(x.shape[0])], dtype=torch.float32)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    assert torch.equal(got[ok].view(torch.int32), want[ok].view(torch.int32)), mac


def test_wrap_and_chunks_change_what_saturation_gives():
    """A sum that saturates a narrow accumulator wraps around instead; chunks saturate early."""
    xq = LNSTensor(torch.full((1, 16), 20, dtype=torch.uint8), torch.tensor(0), FMT)
    wq = LNSTensor(torch.full((1, 16), 20, dtype=torch.uint8), torch.tensor(0), FMT)
    base = dict(accumulator="fixed", acc_bits=8)
    sat = torchlns.lns_linear(xq, wq, mac=MACConfig(**base), acc_lsb=0)
    wrap = torchlns.lns_linear(xq, wq, mac=MACConfig(**base, overflow="wrap"), acc_lsb=0)
    assert sat.item() == 127 and wrap.item() != 127  # 16 products of 2^10 each: far past 2^7
    wide = MACConfig(accumulator="fixed", acc_bits=32)
    chunked = MACConfig(accumulator="fixed", acc_bits=32, chunk=4, chunk_bits=12)
    assert torchlns.lns_linear(xq, wq, mac=wide, acc_lsb=0).item() == 16 * 1024
    assert torchlns.lns_linear(xq, wq, mac=chunked, acc_lsb=0).item() == 4 * 2047  # each chunk at 2^11 - 1


@pytest.mark.parametrize("groups", [1, 2])
def test_a_convolution_chunks_its_k_input_channel_slowest(groups):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (2, 4, 5, 5), generator=g, dtype=torch.uint8)
    w = torch.randint(0, 64, (6, 4 // groups, 3, 3), generator=g, dtype=torch.uint8)
    x[x == 32] = 0  # no NaN
    w[w == 32] = 0
    mac = MACConfig(accumulator="fixed", acc_bits=12, overflow="wrap", chunk=5, chunk_bits=9)
    xq, wq = LNSTensor(x, torch.tensor(-2), FMT), LNSTensor(w, torch.tensor(-1), FMT)
    got = torchlns.lns_conv2d(xq, wq, None, 1, 1, 1, groups, mac=mac, acc_lsb=-2)
    cols = F.unfold(x.float(), 3, padding=1).to(torch.int64)  # (N, C*9, L): channel slowest, then row, column
    Kg = 4 // groups * 9
    for n in range(2):
        for o in range(6):
            gi = o // (6 // groups)
            for l in range(25):
                want = _oracle(cols[n, gi * Kg:(gi + 1) * Kg, l].tolist(), -2, w[o].flatten().tolist(), -1, None, mac,
                               -2)
                assert got[n, o, l // 5, l % 5].item() == want, (n, o, l)


def test_two_stage_configs_are_checked():
    with pytest.raises(ValueError, match="overflow"):
        MACConfig(accumulator="fixed", overflow="clip")
    with pytest.raises(ValueError, match="fixed accumulator"):
        MACConfig(overflow="wrap")
    with pytest.raises(ValueError, match="chunk_bits needs chunk"):
        MACConfig(accumulator="fixed", chunk_bits=12)
    with pytest.raises(ValueError, match="chunk=-1"):
        MACConfig(accumulator="fixed", chunk=-1)
    with pytest.raises(ValueError, match="chunk_bits=60"):
        MACConfig(accumulator="fixed", chunk=4, chunk_bits=60)
    m = MACConfig(accumulator="fixed", acc_bits=24, overflow="wrap", chunk=16, chunk_bits=16)
    assert repr(m) == "MAC(exact, fixed24 wrap chunk16x16)" and m.two_stage and MACConfig(*m.to_tuple()) == m
    assert MACConfig(*MACConfig.chip().to_tuple()[:4]) == MACConfig.chip()  # states saved before these fields


def test_a_converted_model_runs_and_round_trips_a_two_stage_mac():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 36, 4)).eval()
    calib = [torch.randn(4, 3, 6, 6)]
    mac = MACConfig(conversion="lut", accumulator="fixed", acc_bits=20, overflow="wrap", chunk=9, chunk_bits=14)
    q = torchlns.convert(model, torchlns.ConvertConfig(mac=mac), calib)
    y = q(calib[0])
    assert torch.isfinite(y).all()
    q2 = torchlns.convert(model, torchlns.ConvertConfig(mac=mac), [2 * calib[0]])  # other calibration
    q2.load_state_dict(q.state_dict())
    assert q2[0].mac == mac and torch.equal(q2(calib[0]), y)
    chip = torchlns.convert(model, torchlns.ConvertConfig(mac=MACConfig.chip()), calib)
    with pytest.raises(RuntimeError, match="wrap chunk9x14"):  # a state names its MAC, and is refused by another
        chip.load_state_dict(q.state_dict())


TWO_STAGE = [m for m in MACS if m.two_stage]


@pytest.mark.skipif(not torchlns.ops.has_native(), reason="needs the C++ kernels")
@pytest.mark.parametrize("isa", torchlns.ops.available_isas())
def test_the_cpu_kernel_at_every_isa_level_is_the_reference(isa):
    """Every code pair, every two-stage MAC above: the C++ op's bits at each instruction-set level
    against the reference op's (which the integer oracle pins above)."""
    from torchlns.ops.reference import lns_mm_reference

    for mac in TWO_STAGE:
        args = _op_args(mac)
        with torchlns.ops.force_isa(isa):
            got = torch.ops.torchlns.lns_mm(*args)
        want = lns_mm_reference(*args)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (isa, mac)


def _triton():
    pytest.importorskip("triton")
    from torchlns.ops import triton_mac

    return triton_mac


@pytest.mark.slow
@pytest.mark.parametrize("config", [0, 3])
def test_the_triton_kernel_every_code_pair(config):
    """The Triton direct kernel's two-stage path (in the interpreter on CI): every code pair, the
    two-stage MACs above (all of them in a full sweep, see Note: sweep size), two tile
    configurations, against the reference op."""
    triton_mac = _triton()
    from torchlns.ops.reference import lns_mm_reference

    cfg = triton_mac._direct_configs()[config]
    for mac in sweep(TWO_STAGE, 8, seed=config):
        args = _op_args(mac)
        got = triton_mac.lns_mm(*args, config=cfg)
        assert torch.equal(got.view(torch.int32), lns_mm_reference(*args).view(torch.int32)), mac


@pytest.mark.slow
def test_the_triton_kernel_wraps_huge_products_and_takes_every_table():
    """Products far beyond 2^61 (their residues), the chip's packed LUT, LNS6/8/10, per-channel offsets."""
    triton_mac = _triton()
    from torchlns.ops.reference import lns_mm_reference

    g = torch.Generator().manual_seed(0)
    for bits, F in ((6, 2), (8, 3), (10, 5)):
        dtype = torch.uint8 if bits <= 8 else torch.int16
        x = torch.randint(0, 1 << bits, (20, 37), generator=g).to(dtype)
        w = torch.randint(0, 1 << bits, (9, 37), generator=g).to(dtype)
        xo, wo = torch.tensor([[-20]], dtype=torch.int32), torch.randint(-30, 0, (9, 1), generator=g, dtype=torch.int32)
        for mac in [MACConfig.chip().replace(overflow="wrap"),
                    MACConfig.chip().replace(acc_bits=24, overflow="wrap", chunk=7, chunk_bits=13),
                    MACConfig.chip().replace(acc_bits=20, chunk=16, chunk_bits=16),
                    MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=16, overflow="wrap", chunk=5,
                              chunk_bits=9)]:
            for lsb in sweep((-80, -40, -10, 0, 5), 1, seed=bits):
                args = (x, xo, w, wo, mac.table(F, torch.device("cpu")), torch.randn(9, generator=g) * 100, bits, bits,
                        F, True, mac.acc_bits, lsb, mac.overflow, mac.chunk, mac.chunk_bits)
                got, want = triton_mac.lns_mm(*args), lns_mm_reference(*args)
                assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (bits, mac, lsb)
