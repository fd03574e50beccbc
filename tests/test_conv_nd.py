"""Conv3d and transposed convolutions on the chip (chip-model.md section 4), against an oracle
written straight from the spec's definitions, not from the lowering the library uses.

The oracle enumerates (output, input, tap) triples from PyTorch's index relations
(conv: ``i = o·s − p + t·d``; transposed: ``o = i·s − p + t·d``) and forms each product
from the log sum, so it shares nothing with the depth stacking or the zero stuffing. The
fixed accumulator must be bit-equal to it; the float32 accumulator within the spec's bound.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlns
from torchlns import LNS8, FP8Format, IntFormat, LNSFormat, LNSTensor, MACConfig
from torchlns import functional as tf
from torchlns.core.fields import exp2_f64, log_fields
from torchlns.ops import reference_kernels

CHIP = MACConfig(conversion="lut", lut_bits=8, accumulator="fixed", acc_bits=24)


def _products(xq, wq, mac, acc_lsb):
    """Per (n, ci, *in) x (ci, co, *k): exact products: int64 (fixed) or float64, NaN flags."""
    fmt = xq.fmt
    F_ = fmt.frac_bits
    gx, nx, zx, nanx = log_fields(xq.codes, xq.expanded_param().to(torch.int32).expand(xq.codes.shape), fmt.bits)
    gw, nw, zw, nanw = log_fields(wq.codes, wq.expanded_param().to(torch.int32).expand(wq.codes.shape), fmt.bits)
    table = mac.table(F_, "cpu").double()
    return (gx, nx, zx, nanx), (gw, nw, zw, nanw), table, F_


def oracle(x, w, bias, stride, padding, dilation, groups, mac, acc_lsb, *, transposed=False, output_padding=0):
    """The chip's output from the definitions: x, w are LNSTensors (w in PyTorch's layout)."""
    n = x.dim() - 2
    (gx, nx, zx, nanx), (gw, nw, zw, nanw), table, F_ = _products(x.coded, w.coded, mac, acc_lsb)
    s, p, d = (torch.nn.modules.utils._ntuple(n)(v) for v in (stride, padding, dilation))
    op = torch.nn.modules.utils._ntuple(n)(output_padding)
    N, Cin = x.shape[:2]
    k = w.shape[2:]
    if transposed:
        Cout = w.shape[1] * groups
        out_size = [(L - 1) * s_ - 2 * p_ + d_ * (k_ - 1) + o_ + 1 for L, s_, p_, d_, k_, o_ in
                    zip(x.shape[2:], s, p, d, k, op)]
    else:
        Cout = w.shape[0]
        out_size = [(L + 2 * p_ - d_ * (k_ - 1) - 1) // s_ + 1 for L, s_, p_, d_, k_ in zip(x.shape[2:], s, p, d, k)]
    fixed = mac.accumulator == "fixed"
    acc = torch.zeros(N, Cout, *out_size, dtype=torch.int64 if fixed else torch.float64)
    nan = torch.zeros(N, Cout, *out_size, dtype=torch.bool)
    T = 2 ** (mac.acc_bits - 1) - 1
    Cin_g, Cout_g = Cin // groups, Cout // groups
    for g in range(groups):
        for ci in range(g * Cin_g, (g + 1) * Cin_g):
            for co in range(g * Cout_g, (g + 1) * Cout_g):
                for t in itertools.product(*[range(kk) for kk in k]):
                    if transposed:
                        wi = (ci, co - g * Cout_g, *t)
                    else:
                        wi = (co, ci - g * Cin_g, *t)
                    for o in itertools.product(*[range(L) for L in out_size]) if not transposed else \
                            itertools.product(*[range(L) for L in x.shape[2:]]):
                        if transposed:  # o here is the input position i
                            i = o
                            oo = tuple(i_ * s_ - p_ + t_ * d_ for i_, s_, p_, t_, d_ in zip(i, s, p, t, d))
                            if not all(0 <= a < L for a, L in zip(oo, out_size)):
                                continue
                        else:
                            oo = o
                            i = tuple(o_ * s_ - p_ + t_ * d_ for o_, s_, p_, t_, d_ in zip(o, s, p, t, d))
                            if not all(0 <= a < L for a, L in zip(i, x.shape[2:])):
                                continue  # padding: the zero code
                        xi = (slice(None), ci, *i)
                        G = gx[xi] + gw[wi]
                        prod = table[(G & ((1 << F_) - 1)).long()] * exp2_f64((G >> F_) - (acc_lsb if fixed else 0))
                        if fixed:
                            prod = prod.floor().clamp(max=T)
                        prod = torch.where(zx[xi] | zw[wi], 0.0, prod)
                        prod = torch.where(nx[xi] ^ nw[wi], -prod, prod)
                        idx = (slice(None), co, *oo)
                        acc[idx] += prod.to(torch.int64) if fixed else prod
                        nan[idx] |= nanx[xi] | nanw[wi]
    b = bias.reshape(1, -1, *([1] * n)) if bias is not None else None
    if fixed:
        if b is not None:
            acc = acc + torch.round(b.double() * 2.0 ** -acc_lsb).to(torch.int64)
        y = (acc.clamp(-T, T).double() * 2.0 ** acc_lsb).float()
    else:
        y = acc.float() + (b if b is not None else 0)
    return y.masked_fill(nan, math.nan)


def _case(seed, shape, wshape):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2
    w = torch.randn(wshape, generator=g)
    x[x.abs() < 0.05] = 0  # some zero codes
    return x, w, torch.randn(wshape[0] if len(shape) == len(wshape) else 1, generator=g)


CONV3D = [  # (x shape, w shape, stride, padding, dilation, groups)
    ((1, 2, 3, 4, 4), (3, 2, 2, 2, 3), 1, 0, 1, 1),
    ((2, 4, 4, 5, 3), (4, 2, 3, 2, 1), (2, 1, 1), (1, 1, 0), (1, 2, 1), 2),
    ((1, 3, 5, 3, 3), (3, 1, 2, 3, 3), (1, 2, 1), 1, (2, 1, 1), 3),
]
TRANSPOSED = [  # (x shape, w shape (in, out/g, *k), stride, padding, output_padding, dilation, groups)
    ((2, 2, 5), (2, 3, 3), 2, 1, 1, 1, 1),
    ((1, 4, 4), (4, 1, 4), 3, 2, 2, 1, 2),
    ((1, 2, 3, 4), (2, 2, 3, 3), 2, 1, 1, 1, 1),
    ((2, 4, 3, 3), (4, 1, 3, 2), (2, 3), (2, 0), (1, 2), (2, 1), 4),
    ((1, 2, 3, 3), (2, 2, 2, 3), 1, (0, 2), 0, (1, 1), 2),  # padding > d(k-1): cropping
    ((1, 2, 2, 3, 2), (2, 2, 2, 3, 2), (2, 1, 2), (0, 1, 0), (1, 0, 1), 1, 1),
]


@pytest.mark.parametrize("mac,acc_lsb", [(CHIP, -10), (MACConfig(), None)], ids=["fixed", "float32"])
@pytest.mark.parametrize("case", range(len(CONV3D)))
def test_conv3d_matches_definition(case, mac, acc_lsb):
    shape, wshape, s, p, d, g = CONV3D[case]
    x, w, _ = _case(case, shape, wshape)
    b = torch.randn(wshape[0])
    xq, wq = LNSTensor.from_float(x, LNS8), LNSTensor.from_float(w, LNS8, granularity="channel")
    want = oracle(xq, wq, b, s, p, d, g, mac, acc_lsb)
    got = tf.lns_conv3d(xq, wq, b, s, p, d, g, mac, acc_lsb=acc_lsb)
    with reference_kernels():
        ref = tf.lns_conv3d(xq, wq, b, s, p, d, g, mac, acc_lsb=acc_lsb)
    _compare(got, want, mac, xq, wq)
    _compare(ref, want, mac, xq, wq)


@pytest.mark.parametrize("mac,acc_lsb", [(CHIP, -10), (MACConfig(), None)], ids=["fixed", "float32"])
@pytest.mark.parametrize("case", range(len(TRANSPOSED)))
def test_conv_transpose_matches_definition(case, mac, acc_lsb):
    shape, wshape, s, p, op, d, g = TRANSPOSED[case]
    x, w, _ = _case(10 + case, shape, wshape)
    b = torch.randn(wshape[1] * g)
    xq, wq = LNSTensor.from_float(x, LNS8), LNSTensor.from_float(w, LNS8, granularity="channel")
    n = len(shape) - 2
    want = oracle(xq, wq, b, s, p, d, g, mac, acc_lsb, transposed=True, output_padding=op)
    fn = getattr(torchlns, f"lns_conv_transpose{n}d")
    got = fn(xq, wq, b, s, p, op, g, d, mac, acc_lsb=acc_lsb)
    assert got.shape == getattr(F, f"conv_transpose{n}d")(x, w, b, s, p, op, g, d).shape
    _compare(got, want, mac, xq, wq)


def _compare(got, want, mac, xq, wq):
    assert got.shape == want.shape and got.dtype == torch.float32
    if mac.accumulator == "fixed":  # bit-equal
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    else:  # |y - y_exact| <= K 2^-24 sum|p| (a loose form: the largest |y| bounds sum|p| per output by K·max)
        K = wq.shape[1] * math.prod(wq.shape[2:]) * max(1, xq.shape[1])
        bound = K * 2.0 ** -24 * (xq.dequantize().abs().max() * wq.dequantize().abs().max() * K + 1)
        assert (got - want).abs().max() <= bound


def test_uncovered_outputs_are_the_bias_alone():
    # stride 3 with a 1-tap kernel leaves two of every three outputs without an input
    x = torch.randn(1, 2, 4)
    w = torch.randn(2, 3, 1)
    b = torch.tensor([0.5, -1.25, 2.0])
    y = torchlns.lns_conv_transpose1d(x, w, b, stride=3, mac=CHIP, acc_lsb=-8)
    assert torch.equal(y[:, :, 1::3], b.reshape(1, 3, 1).expand(1, 3, 3))
    assert torch.equal(y[:, :, 2::3], b.reshape(1, 3, 1).expand(1, 3, 3))


@pytest.mark.parametrize("fmt", [FP8Format("e4m3"), IntFormat(8), LNSFormat(8, 3, "mitchell")], ids=str)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_format_transposed_and_3d(fmt, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, 4, *([5] * n), generator=g)
    wt = torch.randn(4, 3, *([3] * n), generator=g)
    xq = torchlns.LNSTensor.from_float(x, fmt) if isinstance(fmt, LNSFormat) else None
    ref_t = getattr(F, f"conv_transpose{n}d")
    enc = (lambda t: torchlns.CodedTensor.class_for(fmt).from_float(t, fmt))
    xd, wd = enc(x).dequantize(), enc(wt).dequantize()
    got = getattr(torchlns, f"lns_conv_transpose{n}d")(x, wt, None, 2, 1, 1, 2, 1, fmt=fmt)
    want = ref_t(xd.double(), wd.double(), None, 2, 1, 1, 2, 1).float()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    if n == 3:
        w3 = torch.randn(6, 2, 2, 3, 3, generator=g)
        got = torchlns.lns_conv3d(x, w3, None, (2, 1, 1), 1, 1, 2, fmt=fmt)
        want = F.conv3d(xd.double(), enc(w3).dequantize().double(), None, (2, 1, 1), 1, 1, 2).float()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    del xq


@pytest.mark.parametrize("cls", [nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d])
def test_layers_round_trip_compile_and_qat(cls, tmp_path):
    n = {nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}[cls]
    torch.manual_seed(0)
    kw = dict(stride=2, padding=1, groups=2) | ({"output_padding": 1} if cls is not nn.Conv3d else {})
    layer = cls(4, 6, 3, **kw).eval()
    x = torch.randn(2, 4, *([4] * n))
    q = torchlns.convert(nn.Sequential(layer), torchlns.ConvertConfig(mac=CHIP), [x])
    chip = q[0]
    assert type(chip).__name__ == "LNS" + cls.__name__
    y = q(x)
    assert y.shape == layer(x).shape
    assert 10 * torch.log10(layer(x).pow(2).sum() / (layer(x) - y).pow(2).sum()) > 20
    # state_dict and torch.save
    path = tmp_path / "m.pt"
    torch.save(q, path)
    q2 = torch.load(path, weights_only=False)
    assert torch.equal(q2(x), y)
    fresh = torchlns.convert(nn.Sequential(cls(4, 6, 3, **kw).eval()), torchlns.ConvertConfig(mac=CHIP), [x])
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), y)
    # torch.compile: the same bits
    compiled = torch.compile(q, fullgraph=False)
    assert torch.equal(compiled(x), y)
    # QAT: exact and fake forwards train the master weight
    torchlns.enable_qat(q)
    for mode in ("exact", "fake"):
        chip.set_train_forward(mode)
        q.train()
        chip.weight_float.grad = None
        q(x).square().mean().backward()
        assert chip.weight_float.grad is not None and chip.weight_float.grad.abs().sum() > 0
    q.eval()
    if cls is not nn.Conv3d:  # output_size picks output_padding, as in torch
        size = [2, 6] + [s - 1 for s in layer(x).shape[2:]]
        assert q[0](x, output_size=size).shape == layer(x, output_size=size).shape


def test_reflect_padding_converts_and_matches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").eval()
    x = torch.randn(2, 3, 6, 6)
    q = torchlns.convert(nn.Sequential(conv), torchlns.ConvertConfig(), [x])
    assert type(q[0]).__name__ == "LNSConv2d" and q[0].padding_mode == "reflect"
    xd = LNSTensor.from_float(x, LNS8).dequantize()
    assert (q(x) - F.conv2d(F.pad(xd, (1, 1, 1, 1), mode="reflect"), q[0].weight.dequantize(), q[0].bias)
            ).abs().max() < 1e-4


def test_bad_transposed_arguments_are_named():
    x, w = torch.randn(1, 2, 4), torch.randn(2, 2, 3)
    with pytest.raises(ValueError, match="output_padding"):
        torchlns.lns_conv_transpose1d(x, w, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="3-D"):
        torchlns.lns_conv_transpose1d(x, torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="channels"):
        torchlns.lns_conv3d(torch.randn(1, 3, 4, 4, 4), torch.randn(2, 2, 3, 3, 3))
