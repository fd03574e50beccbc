"""Native kernels against the pure-PyTorch reference, op by op (tolerance 0 where exact).

``torch.ops.torchlns.X`` on a CPU tensor runs the C++ kernel; ``ops.REFERENCE[X]`` is the
reference registered as the fallback (see Note: op registration in torchlns/ops/library.py).
"""

import math

import pytest
import torch
from torch.library import opcheck

import torchlns
from torchlns import ops
from torchlns.core import tables
from torchlns.core.formats import FP8Format, LNSFormat, MACConfig

OPS = torch.ops.torchlns
pytestmark = pytest.mark.skipif(not torchlns.has_native(), reason="the C++ extension is required (CI builds it)")

SHAPES = [(1,), (7,), (129,), (3, 5, 7), (0, 4)]
LNS_FORMATS = [LNSFormat(8, 3), LNSFormat(4, 2), LNSFormat(6, 0 + 3), LNSFormat(12, 6), LNSFormat(16, 10),
               LNSFormat(16, 14), LNSFormat(8, 5), LNSFormat(8, 3, "mitchell"), LNSFormat(16, 12, "mitchell")]


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape}/{got.dtype} vs {want.shape}/{want.dtype}"
    g, w = bits_of(got), bits_of(want)
    if not torch.equal(g, w):
        i = (g != w).nonzero()[0].tolist()
        raise AssertionError(f"{what}: first mismatch at {i}: native {got[tuple(i)]!r} vs reference {want[tuple(i)]!r}")


def special_floats() -> torch.Tensor:
    f32 = torch.finfo(torch.float32)
    vals = [0.0, -0.0, math.inf, -math.inf, math.nan, f32.max, -f32.max, f32.tiny, -f32.tiny, 2.0**-149, 2.0**-140,
            1.0, -1.0, 448.0, 464.0, 57344.0, 61440.0, 1e30, 1e-30, 0.5, 1.5, 2.5]
    return torch.tensor(vals, dtype=torch.float32)


def random_floats(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    wide = bits.view(torch.float32)  # every float32 pattern, NaNs included
    normal = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    return torch.cat([wide, normal, special_floats()])


# ----------------------------------------------------------------------------------------
# codec ops
# ----------------------------------------------------------------------------------------
def test_cpu_kernels_are_registered():
    for name in ops.KERNEL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"torchlns::{name}", "CPU"), name


@pytest.mark.parametrize("fmt", LNS_FORMATS, ids=str)
def test_lns_encode_decode_native_equals_reference(fmt):
    thr, dbits = tables.buckets_tensor(fmt.frac_bits, "cpu"), tables.decode_bits_tensor(fmt.frac_bits, "cpu")
    x = random_floats(5000)
    mitchell = fmt.rounding == "mitchell"
    for offset in [torch.tensor(fmt.offset_min, dtype=torch.int32), torch.tensor([fmt.offset_max], dtype=torch.int32),
                   torch.randint(fmt.offset_min, fmt.offset_max + 1, x.shape, dtype=torch.int32)]:
        args = (x, offset, thr, fmt.bits, fmt.frac_bits, mitchell)
        codes = OPS.lns_encode(*args)
        assert_same(codes, ops.REFERENCE["lns_encode"](*args), f"encode {fmt} offset {offset.shape}")
        dargs = (codes, offset, dbits, fmt.bits, fmt.frac_bits)
        assert_same(OPS.lns_decode(*dargs), ops.REFERENCE["lns_decode"](*dargs), f"decode {fmt}")
    every_code = torch.arange(1 << fmt.bits, dtype=torch.int32)
    every_code = (torch.where(every_code >= 1 << 15, every_code - (1 << 16), every_code) if fmt.bits == 16 else every_code)
    every_code = every_code.to(fmt.code_dtype)
    for off in (fmt.offset_min, fmt.offset_max):
        dargs = (every_code, torch.tensor(off, dtype=torch.int32), dbits, fmt.bits, fmt.frac_bits)
        assert_same(OPS.lns_decode(*dargs), ops.REFERENCE["lns_decode"](*dargs), f"decode every code {fmt}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layouts_odd_shapes_and_broadcast_parameters(shape):
    thr, dbits = tables.buckets_tensor(3, "cpu"), tables.decode_bits_tensor(3, "cpu")
    x = torch.randn(*shape) * 100
    layouts = {"contiguous": x, "transposed": x.t() if x.dim() == 2 else x, "strided": x[..., ::2]}
    if x.dim() == 3:
        layouts["permuted"] = x.permute(2, 0, 1)
    for name, xv in layouts.items():
        per_last = torch.randint(-130, -80, (xv.shape[-1],) if xv.dim() else (), dtype=torch.int32)
        for off in (torch.tensor(-100, dtype=torch.int32), per_last):
            args = (xv, off, thr, 8, 3, False)
            codes = OPS.lns_encode(*args)
            assert_same(codes, ops.REFERENCE["lns_encode"](*args), f"encode {name}")
            c = codes.t() if codes.dim() == 2 else codes
            o = off if off.dim() == 0 or codes.dim() != 2 else off[:, None]
            dargs = (c, o, dbits, 8, 3)
            assert_same(OPS.lns_decode(*dargs), ops.REFERENCE["lns_decode"](*dargs), f"decode {name}")


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
def test_fp8_native_equals_reference(variant):
    fmt = FP8Format(variant)
    x = random_floats(20000, seed=1)
    table = fmt.value_table("cpu")
    for scale in [torch.tensor(1.0), torch.tensor([0.37]), torch.tensor(2.0**-10), torch.rand(x.shape) + 0.5]:
        args = (x, scale, *fmt.encode_args("cpu"))
        codes = OPS.fp8_encode(*args)
        assert_same(codes, ops.REFERENCE["fp8_encode"](*args), f"fp8 encode {variant} scale {scale.shape}")
        dargs = (codes, scale, table)
        assert_same(OPS.fp8_decode(*dargs), ops.REFERENCE["fp8_decode"](*dargs), f"fp8 decode {variant}")


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_int_native_equals_reference(bits):
    qmax = (1 << (bits - 1)) - 1
    x = random_floats(20000, seed=2)
    x = x[~torch.isnan(x)]
    x = torch.cat([x, torch.tensor([0.5, 1.5, 2.5, -2.5, -0.5])])
    for scale in [torch.tensor(1.0), torch.tensor([0.01]), torch.rand(x.shape) + 0.1]:
        args = (x, scale, qmax, bits)
        codes = OPS.int_encode(*args)
        assert_same(codes, ops.REFERENCE["int_encode"](*args), f"int{bits} encode")
        assert_same(OPS.int_decode(codes, scale), ops.REFERENCE["int_decode"](codes, scale), f"int{bits} decode")


# ----------------------------------------------------------------------------------------
# lns_mm
# ----------------------------------------------------------------------------------------
def mm_case(M, N, K, fmt=LNSFormat(8, 3), seed=0, p_zero=0.1, p_nan=0.0, offsets="tensor"):
    g = torch.Generator().manual_seed(seed)
    dt = fmt.code_dtype

    def codes(rows):
        c = torch.randint(0, 1 << fmt.bits, (rows, K), generator=g, dtype=torch.int32)
        c = torch.where(torch.rand(rows, K, generator=g) < p_zero, 0, c)
        c = torch.where(torch.rand(rows, K, generator=g) < p_nan, fmt.nan_code, c)
        c = torch.where(c == fmt.nan_code, 1, c) if p_nan == 0 else c
        if fmt.bits == 16:
            c = torch.where(c >= 1 << 15, c - (1 << 16), c)
        return c.to(dt)

    def offset(rows):
        # Values around 2^-4 .. 2^2 at E_max: products straddle acc_lsb, so fixed-point
        # truncation and saturation both happen.
        one = 1 << fmt.frac_bits
        lo, hi = max(fmt.offset_min, -fmt.e_max - 4 * one), min(fmt.offset_max, -fmt.e_max + 2 * one)
        shape = {"tensor": (1, 1), "row": (rows, 1), "column": (1, K), "element": (rows, K)}[offsets]
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int32)

    return codes(M), offset(M), codes(N), offset(N), torch.randn(N, generator=g)


def mm_args(case, fmt, mac: MACConfig, acc_lsb, with_bias=True):
    x, xo, w, wo, b = case
    table = tables.conversion_tensor_f64(fmt.frac_bits, mac.conversion, mac.lut_bits, torch.device("cpu"))
    fixed = mac.accumulator == "fixed"
    return (x, xo, w, wo, table, b if with_bias else None, fmt.bits, fmt.bits, fmt.frac_bits, fixed, mac.acc_bits,
            acc_lsb if fixed else 0)


def sum_abs_products(args):
    """Σ|p| per output (the reference on sign-cleared, NaN-free codes, float mode, no bias)."""
    x, xo, w, wo, table, _, xb, wb, F, _, acc_bits, _ = args
    e_max = (1 << (xb - 1)) - 1
    strip = lambda c: (c.to(torch.int32) & e_max).to(c.dtype)  # noqa: E731
    return ops.REFERENCE["lns_mm"](strip(x), xo, strip(w), wo, table, None, xb, wb, F, False, acc_bits, 0).double()


MACS = [(MACConfig(), None), (MACConfig(conversion="lut", lut_bits=8), None), (MACConfig(conversion="mitchell"), None),
        (MACConfig.chip(), -20), (MACConfig(conversion="exact", accumulator="fixed", acc_bits=48), -30),
        (MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=8), -6),
        (MACConfig(conversion="lut", lut_bits=3, accumulator="fixed", acc_bits=16), -12)]


@pytest.mark.parametrize("mac,acc_lsb", MACS, ids=lambda v: repr(v))
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (7, 5, 13), (4, 3, 129), (9, 17, 64), (0, 3, 5), (3, 0, 5), (2, 3, 0)])
@pytest.mark.parametrize("offsets", ["tensor", "row", "column", "element"])
def test_lns_mm_native_vs_reference(mac, acc_lsb, M, N, K, offsets):
    fmt = LNSFormat(8, 3)
    args = mm_args(mm_case(M, N, K, fmt, seed=M * 31 + K, p_nan=0.02 if K > 5 else 0.0, offsets=offsets), fmt, mac, acc_lsb)
    assert_mm_matches(OPS.lns_mm(*args), ops.REFERENCE["lns_mm"](*args), args, f"lns_mm {mac}")


def assert_mm_matches(got, want, args, what):
    """Fixed accumulator: bit-equal. float32: the spec's bound, K 2^-24 Σ|p| (the reference
    is within K 2^-53 Σ|p| and one rounding of the exact sum; see Note: remainder classes in
    csrc/mac_cpu.cpp for why a kernel may use all of the spec's bound)."""
    if args[9]:
        assert_same(got, want, what)
        return
    assert torch.equal(torch.isnan(got), torch.isnan(want)), what
    ok = ~torch.isnan(want)
    K = args[0].shape[1]
    bound = K * (2.0**-24 + 2.0**-53) * sum_abs_products(args)[ok] + torch.finfo(torch.float32).eps * want[ok].double().abs()
    if args[5] is not None:  # the bias add
        bound = bound + torch.finfo(torch.float32).eps * args[5].double().abs().expand_as(got)[ok]
    assert ((got[ok].double() - want[ok].double()).abs() <= bound + 2.0**-149).all(), what


@pytest.mark.parametrize("fmt", [LNSFormat(5, 0), LNSFormat(4, 1), LNSFormat(6, 2), LNSFormat(6, 4), LNSFormat(12, 6),
                                 LNSFormat(16, 10)], ids=str)  # F <= 4 runs the AVX-512 fixed kernel
def test_lns_mm_wide_formats_fixed_bit_exact(fmt):
    for mac, lsb in [(MACConfig.chip(), -10), (MACConfig(accumulator="fixed", acc_bits=40, conversion="mitchell"), -25)]:
        args = mm_args(mm_case(6, 5, 37, fmt, seed=fmt.bits), fmt, mac, lsb)
        assert_same(OPS.lns_mm(*args), ops.REFERENCE["lns_mm"](*args), f"lns_mm {fmt} {mac}")


def test_lns_mm_fixed_bias_edge_cases():
    fmt = LNSFormat(8, 3)
    case = list(mm_case(4, 5, 16, fmt))
    case[4] = torch.tensor([math.nan, math.inf, -math.inf, 3e38, -0.5])
    args = mm_args(tuple(case), fmt, MACConfig.chip(), -8)
    assert_same(OPS.lns_mm(*args), ops.REFERENCE["lns_mm"](*args), "bias edge cases")


def test_thread_count_does_not_change_bits():
    fmt = LNSFormat(8, 3)
    x = random_floats(300000, seed=3)
    thr = tables.buckets_tensor(3, "cpu")
    cases = [
        lambda: OPS.lns_encode(x, torch.tensor(-100, dtype=torch.int32), thr, 8, 3, False),
        lambda: OPS.fp8_encode(x, torch.tensor(0.5), *FP8Format("e4m3").encode_args("cpu")),
    ]
    for mac, lsb in MACS[:1] + MACS[3:4]:
        args = mm_args(mm_case(96, 80, 300, fmt, offsets="element"), fmt, mac, lsb)
        cases.append(lambda args=args: OPS.lns_mm(*args))
    threads = torch.get_num_threads()
    try:
        for run in cases:
            torch.set_num_threads(1)
            one = run()
            torch.set_num_threads(2)
            assert_same(run(), one, "1 vs 2 threads")
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------
# torch.library contracts
# ----------------------------------------------------------------------------------------
def opcheck_samples():
    fmt = LNSFormat(8, 3)
    x = torch.randn(4, 6)
    off = torch.tensor([[-100]], dtype=torch.int32)
    thr, dbits = tables.buckets_tensor(3, "cpu"), tables.decode_bits_tensor(3, "cpu")
    codes = OPS.lns_encode(x, off, thr, 8, 3, False)
    e4m3 = FP8Format("e4m3")
    yield "lns_encode", (x, off, thr, 8, 3, False)
    yield "lns_encode", (x, off, thr, 8, 3, True)
    yield "lns_decode", (codes, off, dbits, 8, 3)
    yield "fp8_encode", (x, torch.tensor([0.5]), *e4m3.encode_args("cpu"))
    yield "fp8_decode", (OPS.fp8_encode(x, torch.tensor([0.5]), *e4m3.encode_args("cpu")), torch.tensor([0.5]),
                          e4m3.value_table("cpu"))
    yield "int_encode", (x, torch.tensor([0.05]), 127, 8)
    yield "int_decode", (OPS.int_encode(x, torch.tensor([0.05]), 127, 8), torch.tensor([0.05]))
    for mac, lsb in [(MACConfig(), None), (MACConfig.chip(), -16)]:
        yield "lns_mm", mm_args(mm_case(3, 4, 9, fmt), fmt, mac, lsb)
        yield "lns_mm", mm_args(mm_case(3, 4, 9, fmt), fmt, mac, lsb, with_bias=False)
        if lsb is not None:  # two-stage accumulators (see Note: two-stage MACs)
            yield "lns_mm", (*mm_args(mm_case(3, 4, 9, fmt), fmt, mac, lsb), "wrap", 4, 20)
            yield "lns_mm", (*mm_args(mm_case(3, 4, 9, fmt), fmt, mac, lsb), "saturate", 3, 0)
        table = tables.conversion_tensor_f64(3, mac.conversion, mac.lut_bits, torch.device("cpu"))
        xc = OPS.lns_encode(torch.randn(2, 4, 7, 6), off.reshape(1, 1, 1, 1), thr, 8, 3, False)
        wc = OPS.lns_encode(torch.randn(6, 2, 3, 3), off.reshape(1, 1, 1, 1), thr, 8, 3, False)
        w_off = torch.randint(-110, -90, (6, 1, 1, 1), dtype=torch.int32)
        fixed = mac.accumulator == "fixed"
        yield "lns_conv", (xc, off.reshape(1, 1, 1, 1), wc, w_off, table, torch.randn(6), 8, 8, 3, fixed, 32,
                           lsb or 0, [1, 2], [1, 0], [1, 1], [1, 1], 2)
        x3 = OPS.lns_encode(torch.randn(2, 4, 5, 4, 6), off.reshape(1, 1, 1, 1, 1), thr, 8, 3, False)
        w3 = OPS.lns_encode(torch.randn(6, 2, 2, 3, 3), off.reshape(1, 1, 1, 1, 1), thr, 8, 3, False)
        yield "lns_conv", (x3, off.reshape(1, 1, 1, 1, 1), w3, w_off.unsqueeze(-1), table, torch.randn(6), 8, 8, 3,
                           fixed, 32, lsb or 0, [2, 1, 2], [1, 1, 0], [0, 1, 1], [1, 1, 1], 2)
        # Dynamic per-block activations: 16-bit wide codes, blocks re-encoded as 8-bit codes.
        wide_off = torch.tensor([[[[-32760]]]], dtype=torch.int32)
        xw = OPS.lns_encode(torch.randn(2, 4, 5, 7), wide_off, thr, 16, 3, False)
        yield "lns_conv", (xw, wide_off, wc, w_off, table, torch.randn(6), 16, 8, 3, fixed, 32, lsb or 0, [1, 2],
                           [1, 0], [1, 1], [1, 1], 2, 5, 8)


@pytest.mark.parametrize("name,args", list(opcheck_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    opcheck(getattr(OPS, name).default, args)


def test_ops_compile_fullgraph():
    fmt = LNSFormat(8, 3)
    thr, dbits = tables.buckets_tensor(3, "cpu"), tables.decode_bits_tensor(3, "cpu")
    table = tables.conversion_tensor_f64(3, "lut", 8, torch.device("cpu"))

    def layer(x, w_codes, w_off, bias):
        off = torch.tensor([[-100]], dtype=torch.int32)
        xc = OPS.lns_encode(x, off, thr, 8, 3, False)
        y = OPS.lns_mm(xc, off, w_codes, w_off, table, bias, 8, 8, 3, True, 32, -16)
        return torch.relu(y), OPS.lns_decode(xc, off, dbits, 8, 3)

    x = torch.randn(5, 12) * 10
    _, _, w, wo, b = mm_case(1, 6, 12, fmt)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, w, wo, b), layer(x, w, wo, b)):
        assert_same(got, want, "compiled")


def test_reference_kernels_context_swaps_and_restores():
    x, w = torch.randn(16, 64), torch.randn(8, 64)
    run = lambda: torchlns.lns_linear(x, w, mac=MACConfig.chip(), acc_lsb=-20)  # noqa: E731
    native = run()
    with ops.reference_kernels():
        assert_same(run(), native, "reference inside the context")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("torchlns::lns_mm", "CPU")
    assert "mac_cpu.cpp" in torch._C._dispatch_dump("torchlns::lns_mm")  # the C++ kernel is back


@pytest.mark.parametrize("kw", [dict(padding=1), dict(stride=2, groups=2), dict(dilation=2, padding=2),
                                dict(padding=1, groups=8)], ids=str)
def test_lns_conv_same_bits_for_any_thread_count_and_layout(kw):
    torch.manual_seed(1)
    x = torchlns.LNSTensor.from_float(torch.randn(3, 8, 13, 11), torchlns.LNS8)
    w = torchlns.LNSTensor.from_float(torch.randn(8, 8 // kw.get("groups", 1), 3, 3), torchlns.LNS8, granularity="channel")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torchlns.lns_conv2d(x, w, **kw)
        torch.set_num_threads(2)
        assert_same(torchlns.lns_conv2d(x, w, **kw), one, "1 vs 2 threads")
        assert_same(torchlns.lns_conv2d(x.contiguous(memory_format=torch.channels_last), w, **kw), one, "channels_last")
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mac,lsb", [(MACConfig.chip(), -14), (MACConfig(), 0)], ids=repr)
def test_lns_conv_3d_native_equals_reference(mac, lsb):
    """5-D codes (a Conv3d): the C++ kernel stacks the depth taps as the reference does; bits (fixed) or the bound."""
    thr = tables.buckets_tensor(3, "cpu")
    table = tables.conversion_tensor_f64(3, mac.conversion, mac.lut_bits, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, 5, 7, generator=g)
    w = torch.randn(6, 2, 3, 2, 3, generator=g)
    for x_off, w_off in [(torch.tensor(-100, dtype=torch.int32).reshape(1, 1, 1, 1, 1),
                          torch.randint(-110, -90, (6, 1, 1, 1, 1), generator=g, dtype=torch.int32)),
                         (torch.randint(-110, -90, x.shape, generator=g, dtype=torch.int32),
                          torch.randint(-110, -90, w.shape, generator=g, dtype=torch.int32))]:
        xc, wc = OPS.lns_encode(x, x_off, thr, 8, 3, False), OPS.lns_encode(w, w_off, thr, 8, 3, False)
        args = (xc, x_off, wc, w_off, table, torch.randn(6, generator=g), 8, 8, 3, mac.fixed, 32, lsb, [1, 2, 1],
                [1, 0, 1], [1, 1, 0], [2, 1, 1], 2)
        got = OPS.lns_conv(*args)
        with ops.reference_kernels():
            want = OPS.lns_conv(*args)
        assert got.shape == (2, 6, 4, 3, 6)
        if mac.fixed:
            assert_same(got, want, "lns_conv 3-D")
        else:
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
