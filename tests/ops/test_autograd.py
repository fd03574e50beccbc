"""Straight-through estimator and torch.compile of the public layer functions."""

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, INT8, LNS8, CodedTensor, LNSTensor

FORMATS = [(LNS8, torchlns.IDEAL_MAC, None), (LNS8, CHIP_MAC, -20), (FP8_E4M3, torchlns.IDEAL_MAC, None),
           (INT8, torchlns.IDEAL_MAC, None)]


def leaf(t):
    return t.detach().clone().requires_grad_()


def float_grads(layer, x, w, b, fmt, upstream):
    """Gradients of the float layer on the dequantized operands (per-tensor encoding)."""
    xd = leaf(CodedTensor.from_float(x.detach(), fmt).dequantize())
    wd = leaf(CodedTensor.from_float(w.detach(), fmt).dequantize())
    bd = leaf(b)
    layer(xd, wd, bd).backward(upstream)
    return xd.grad, wd.grad, bd.grad


@pytest.mark.parametrize("fmt,mac,lsb", FORMATS, ids=lambda v: repr(v))
def test_linear_ste_gradients_are_the_float_layer_on_dequantized_values(fmt, mac, lsb):
    x, w, b = leaf(torch.randn(3, 5, 16)), leaf(torch.randn(8, 16)), leaf(torch.randn(8))
    y = torchlns.lns_linear(x, w, b, mac, acc_lsb=lsb, fmt=fmt)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    for got, want in zip((x.grad, w.grad, b.grad), float_grads(F.linear, x, w, b, fmt, upstream)):
        torch.testing.assert_close(got, want)


CONVS = [
    (torchlns.lns_conv2d, F.conv2d, (2, 4, 9, 9), (6, 4, 3, 3), dict(padding=1)),
    (torchlns.lns_conv2d, F.conv2d, (2, 4, 9, 9), (6, 2, 3, 3), dict(stride=2, groups=2)),
    (torchlns.lns_conv2d, F.conv2d, (2, 4, 9, 9), (4, 1, 3, 3), dict(padding="same", dilation=2, groups=4)),
    (torchlns.lns_conv2d, F.conv2d, (4, 8, 8), (6, 4, 2, 2), dict(padding="same")),  # unbatched, asymmetric
    (torchlns.lns_conv1d, F.conv1d, (2, 4, 11), (5, 4, 3), dict(padding=2, dilation=2)),
    (torchlns.lns_conv1d, F.conv1d, (4, 11), (5, 4, 4), dict(padding="same")),
]


@pytest.mark.parametrize("fmt,mac,lsb", FORMATS[:2] + FORMATS[3:], ids=lambda v: repr(v))
@pytest.mark.parametrize("lns_conv,float_conv,xs,ws,kw", CONVS, ids=lambda v: str(v) if isinstance(v, (tuple, dict)) else "")
def test_conv_ste_gradients(fmt, mac, lsb, lns_conv, float_conv, xs, ws, kw):
    x, w, b = leaf(torch.randn(xs)), leaf(torch.randn(ws) / 4), leaf(torch.randn(ws[0]))
    y = lns_conv(x, w, b, mac=mac, acc_lsb=lsb, fmt=fmt, **kw)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    want = float_grads(lambda a, c, d: float_conv(a, c, d, **kw), x, w, b, fmt, upstream)
    for got, exp in zip((x.grad, w.grad, b.grad), want):
        torch.testing.assert_close(got, exp, atol=1e-4, rtol=1e-4)


def test_fmt_encodes_float_operands_and_conflicts_are_errors():
    x, w = torch.randn(4, 16), torch.randn(8, 16)
    X, W = CodedTensor.from_float(x, FP8_E4M3), CodedTensor.from_float(w, FP8_E4M3)
    assert torch.equal(torchlns.lns_linear(x, w, fmt=FP8_E4M3), torchlns.lns_linear(X, W))
    with pytest.raises(TypeError, match="conflicts"):
        torchlns.lns_linear(X, w, fmt=LNS8)


def test_forward_bits_do_not_depend_on_grad_mode():
    x, w, b = torch.randn(4, 16), torch.randn(8, 16), torch.randn(8)
    plain = torchlns.lns_linear(x, w, b, CHIP_MAC, acc_lsb=-20)
    with_grad = torchlns.lns_linear(leaf(x), leaf(w), leaf(b), CHIP_MAC, acc_lsb=-20)
    assert with_grad.requires_grad
    assert torch.equal(plain.view(torch.int32), with_grad.detach().view(torch.int32))


def test_gradient_reaches_only_float_operands():
    x = leaf(torch.randn(4, 16))
    W = LNSTensor.from_float(torch.randn(8, 16), LNS8, granularity="channel")
    torchlns.lns_linear(x, W).sum().backward()
    torch.testing.assert_close(x.grad, W.dequantize().sum(0).expand(4, 16))
    w = leaf(torch.randn(8, 16))
    X = LNSTensor.from_float(torch.randn(4, 16), LNS8)
    torchlns.lns_linear(X, w).sum().backward()
    torch.testing.assert_close(w.grad, X.dequantize().sum(0).expand(8, 16))


def test_qat_steps_reduce_the_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    target = x @ torch.randn(8, 4) + 0.1
    w = torch.nn.Parameter(torch.randn(4, 8) * 0.1)
    b = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.Adam([w, b], lr=0.05)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(torchlns.lns_linear(x, w, b, CHIP_MAC, acc_lsb=-16), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_opcheck_ste_ops():
    y, xd, wd = torch.randn(3, 4), torch.randn(3, 5), torch.randn(4, 5)
    opcheck(torch.ops.torchlns.ste_linear.default, (y, xd, wd, leaf(xd), leaf(wd), leaf(torch.randn(4))))
    yc, xc, wc = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 6, 6), torch.randn(3, 2, 3, 3)
    opcheck(torch.ops.torchlns.ste_conv.default,
            (yc, xc, wc, leaf(xc), leaf(wc), None, [1, 1], [0, 0], [0, 0], [1, 1], 1))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_w = torch.nn.Parameter(torch.randn(8, 3, 3, 3) / 4)
        self.register_buffer("fc", LNSTensor.from_float(torch.randn(10, 8 * 6 * 6) / 16, LNS8, granularity="channel"))
        self.bias = torch.nn.Parameter(torch.randn(10))

    def forward(self, x):
        h = torch.relu(torchlns.lns_conv2d(x, self.conv_w, None, padding=1, mac=CHIP_MAC, acc_lsb=-20))
        h = F.max_pool2d(h, 2).flatten(1)
        return torchlns.lns_linear(h, self.fc, self.bias)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_model_compiles_fullgraph_with_the_same_bits_and_grads(backend):
    torch.manual_seed(0)
    model, x = _Model(), torch.randn(2, 3, 12, 12)
    eager = model(x)
    eager.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out = compiled(x)
    assert torch.equal(out.detach().view(torch.int32), eager.detach().view(torch.int32))
    out.sum().backward()
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


class _CountDecodes(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.torchlns.lns_decode.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


LAYERS = [(torchlns.lns_linear, F.linear, (3, 16), (8, 16), {}),
          *[c for c in CONVS if c[4].get("groups") == 4 or c[4].get("padding") == "same"]]


@pytest.mark.parametrize("needs", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 0)],
                         ids=lambda n: "grad:" + "".join(c for c, f in zip("xwb", n) if f))
@pytest.mark.parametrize("lns_op,float_op,xs,ws,kw", LAYERS, ids=lambda v: str(v) if isinstance(v, (tuple, dict)) else "")
def test_ste_decodes_only_what_a_gradient_reads(needs, lns_op, float_op, xs, ws, kw):
    """The input's gradient reads the weight and the weight's the input: the other operand is
    never decoded (a model run with grad mode on for inference would decode each activation
    twice), and the gradients asked for are still the float layer's on dequantized values."""
    torch.manual_seed(0)
    x, w, b = torch.randn(xs), torch.randn(ws) / 4, torch.randn(ws[0])
    x, w, b = (leaf(t) if n else t for t, n in zip((x, w, b), needs))
    with _CountDecodes() as seen:
        y = lns_op(x, w, b, mac=CHIP_MAC, acc_lsb=-20, fmt=LNS8, **kw)
    assert sorted(seen.shapes) == sorted([tuple(ws)] * needs[0] + [tuple(xs)] * needs[1])
    upstream = torch.randn_like(y)
    y.backward(upstream)
    want = float_grads(lambda a, c, d: float_op(a, c, d, **kw), x, w, b, LNS8, upstream)
    for t, n, exp in zip((x, w, b), needs, want):
        if n:
            torch.testing.assert_close(t.grad, exp, atol=1e-4, rtol=1e-4)
