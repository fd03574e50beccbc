"""Converted layers (``LNSLinear``, ``LNSConv1d``, ``LNSConv2d``): the chip's bits, state, STE."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, FP8_E5M2, IDEAL_MAC, INT8, LNS8, ConvertConfig, LNSTensor

MACS = [(IDEAL_MAC, None), (CHIP_MAC, -20)]  # (mac, acc_lsb); -20 keeps outputs below 2^11


def same_bits(a, b):
    return torch.equal(a, b) and torch.equal(a.detach().view(torch.int32), b.detach().view(torch.int32))


def offset_for(x, shift=1):
    """A static input offset: the default one, shifted so that a few inputs saturate."""
    return torchlns.default_offset(x, LNS8) - shift


def coded_input(x, layer):
    return torchlns.CodedTensor.from_float(x, layer.fmt, offset=layer.input_param)


def mac_kwargs(layer):
    return dict(acc_lsb=layer.acc_lsb) if layer.acc_lsb is not None else {}


# ----------------------------------------------------------------------------------------
# forward = the public ops on the layer's own codes
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mac,lsb", MACS, ids=["ideal", "chip"])
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (16,)], ids=str)
def test_linear_forward_is_lns_linear(mac, lsb, shape):
    torch.manual_seed(0)
    lin = nn.Linear(16, 8).eval()
    x = torch.randn(shape)
    m = torchlns.LNSLinear.from_float(lin, ConvertConfig(mac=mac), input_param=offset_for(x), acc_lsb=lsb)
    assert m.acc_lsb == lsb and m.mac == mac and not m.training
    y = m(x)
    assert y.shape == F.linear(x, lin.weight).shape
    want = torchlns.lns_linear(coded_input(x, m), m.weight, lin.bias.detach(), mac, **mac_kwargs(m))
    assert same_bits(y, want)


CONV2D = [
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (2, 4, 9, 9)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, groups=2), (2, 4, 9, 9)),
    (dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", dilation=2, groups=4), (2, 4, 9, 9)),
    (dict(in_channels=4, out_channels=6, kernel_size=(2, 3), padding="same", bias=False), (2, 4, 7, 8)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=(2, 1), padding=(0, 2), dilation=(1, 2)), (2, 4, 9, 9)),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding=1), (4, 8, 8)),  # unbatched
]
CONV1D = [
    (dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), (2, 4, 11)),
    (dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", dilation=2, groups=2), (2, 4, 11)),
    (dict(in_channels=4, out_channels=5, kernel_size=3, bias=False), (4, 11)),  # unbatched
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own conv, for the shape
@pytest.mark.parametrize("mac,lsb", MACS, ids=["ideal", "chip"])
@pytest.mark.parametrize("cls,float_cls,op,geometry,xshape",
                         [(torchlns.LNSConv2d, nn.Conv2d, torchlns.lns_conv2d, *c) for c in CONV2D]
                         + [(torchlns.LNSConv1d, nn.Conv1d, torchlns.lns_conv1d, *c) for c in CONV1D],
                         ids=lambda v: str(v) if isinstance(v, (dict, tuple)) else "")
def test_conv_forward_is_lns_conv(mac, lsb, cls, float_cls, op, geometry, xshape):
    torch.manual_seed(0)
    conv = float_cls(**geometry).eval()
    x = torch.randn(xshape)
    m = cls.from_float(conv, ConvertConfig(mac=mac), input_param=offset_for(x), acc_lsb=lsb)
    assert (m.stride, m.padding, m.dilation, m.groups) == (conv.stride, conv.padding, conv.dilation, conv.groups)
    assert m.kernel_size == conv.kernel_size and m.in_channels == conv.in_channels
    y = m(x)
    assert y.shape == conv(x).shape
    bias = None if conv.bias is None else conv.bias.detach()
    want = op(coded_input(x, m), m.weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, mac,
              **mac_kwargs(m))
    assert same_bits(y, want)


@pytest.mark.parametrize("fmt,tensor_cls", [(FP8_E4M3, torchlns.FP8Tensor), (FP8_E5M2, torchlns.FP8Tensor),
                                            (INT8, torchlns.IntTensor)], ids=str)
def test_fp8_and_int_layers_use_their_format(fmt, tensor_cls):
    torch.manual_seed(0)
    lin, conv = nn.Linear(16, 8).eval(), nn.Conv2d(4, 6, 3, padding=1).eval()
    x, xc = torch.randn(5, 16), torch.randn(2, 4, 6, 6)
    scale = torchlns.default_scale(x, fmt)
    # CHIP_MAC applies to LNS only: comparison formats use their own exact MAC.
    m = torchlns.LNSLinear.from_float(lin, ConvertConfig(fmt=fmt, mac=CHIP_MAC), input_param=scale)
    assert m.mac == IDEAL_MAC and m.acc_lsb is None
    assert isinstance(m.weight, tensor_cls) and m.fmt == fmt == m.weight.fmt
    assert m.input_param.dtype == torch.float32 and m.input_param.item() == pytest.approx(scale)
    xq = tensor_cls.from_float(x, fmt, offset=m.input_param)
    assert same_bits(m(x), torchlns.lns_linear(xq, m.weight, lin.bias.detach()))
    c = torchlns.LNSConv2d.from_float(conv, ConvertConfig(fmt=fmt), input_param=torchlns.default_scale(xc, fmt))
    want = torchlns.lns_conv2d(tensor_cls.from_float(xc, fmt, offset=c.input_param), c.weight, conv.bias.detach(),
                               padding=1)
    assert same_bits(c(xc), want)
    assert str(fmt) in repr(m) and str(fmt) in repr(c)


def test_layers_reject_coded_inputs():
    m = torchlns.LNSLinear.from_float(nn.Linear(4, 2).eval(), input_param=-100)
    with pytest.raises(TypeError, match="float activations"):
        m(LNSTensor.from_float(torch.randn(3, 4), LNS8))


# ----------------------------------------------------------------------------------------
# from_float errors
# ----------------------------------------------------------------------------------------
def test_from_float_errors():
    lin, conv = nn.Linear(4, 2), nn.Conv2d(2, 2, 3)
    with pytest.raises(ValueError, match="input_param"):
        torchlns.LNSLinear.from_float(lin)  # static activations by default
    with pytest.raises(ValueError, match="input_param"):
        torchlns.LNSConv2d.from_float(conv, ConvertConfig(fmt=INT8))
    with pytest.raises(ValueError, match="acc_lsb"):
        torchlns.LNSLinear.from_float(lin, ConvertConfig(mac=CHIP_MAC), input_param=-100)
    with pytest.raises(ValueError, match="acc_lsb"):
        torchlns.LNSConv2d.from_float(conv, ConvertConfig(mac=CHIP_MAC, activation="dynamic"))
    with pytest.raises(TypeError, match="nn.Linear"):
        torchlns.LNSLinear.from_float(conv, input_param=-100)
    with pytest.raises(TypeError, match="Conv2d"):
        torchlns.LNSConv2d.from_float(nn.Conv1d(2, 2, 3), input_param=-100)
    with pytest.raises(TypeError, match="Conv1d"):
        torchlns.LNSConv1d.from_float(conv, input_param=-100)
    # a non-zero padding mode pads in float before the chip conv (tests/test_conv_nd.py checks the values)
    assert torchlns.LNSConv2d.from_float(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"),
                                         input_param=-100).padding_mode == "reflect"
    with pytest.raises(ValueError, match="input_param"):
        torchlns.LNSLinear.from_float(lin, input_param=torch.tensor([-100, -99]))  # per tensor only


def test_dynamic_from_float_needs_no_input_param():
    torch.manual_seed(0)
    lin = nn.Linear(40, 8).eval()
    m = torchlns.LNSLinear.from_float(lin, ConvertConfig(activation="dynamic", activation_block_size=16))
    assert m.input_param is None and m.input_block_size == 16
    x = torch.randn(3, 40)
    assert same_bits(m(x), torchlns.lns_linear(x, m.weight, lin.bias.detach(), x_block_size=16))


# ----------------------------------------------------------------------------------------
# weight parameters, repr
# ----------------------------------------------------------------------------------------
def test_per_channel_weight_offsets_by_default():
    lin, conv, conv1 = nn.Linear(10, 6), nn.Conv2d(4, 6, 3, groups=2), nn.Conv1d(4, 5, 3)
    a = torchlns.LNSLinear.from_float(lin, input_param=-100)
    b = torchlns.LNSConv2d.from_float(conv, input_param=-100)
    c = torchlns.LNSConv1d.from_float(conv1, input_param=-100)
    assert a.weight.offset.shape == (6, 1) and b.weight.offset.shape == (6, 1, 1, 1)
    assert c.weight.offset.shape == (5, 1, 1)
    for m, f in ((a, lin), (b, conv), (c, conv1)):
        assert isinstance(m.weight, LNSTensor) and m.weight.offset.dtype == torch.int32
        want = LNSTensor.from_float(f.weight, LNS8, granularity="channel")
        assert torch.equal(m.weight.codes, want.codes) and torch.equal(m.weight.offset, want.offset)
        # each channel's largest weight sits at the top code
        top = (m.weight.codes.to(torch.int32) & 0x7F).flatten(1).max(1).values
        assert (top == LNS8.e_max).all()


def test_tensor_and_block_weight_granularity():
    torch.manual_seed(0)
    lin, conv = nn.Linear(10, 6).eval(), nn.Conv2d(8, 6, 3, groups=2).eval()
    x, xc = torch.randn(3, 10), torch.randn(2, 8, 5, 5)
    t = ConvertConfig(weight_granularity="tensor")
    blk = ConvertConfig(weight_granularity="block", weight_block_size=4)
    a = torchlns.LNSLinear.from_float(lin, t, input_param=offset_for(x))
    assert a.weight.offset.numel() == 1 and a.weight.block is None
    b = torchlns.LNSLinear.from_float(lin, blk, input_param=offset_for(x))
    assert b.weight.offset.shape == (6, 3) and b.weight.block == (1, 4)  # ceil(10/4) blocks along in_features
    c = torchlns.LNSConv2d.from_float(conv, blk, input_param=offset_for(xc))
    assert c.weight.offset.shape == (6, 1, 3, 3) and c.weight.block == (1, 4)  # blocks along in_channels/groups
    for m in (a, b):
        assert same_bits(m(x), torchlns.lns_linear(coded_input(x, m), m.weight, lin.bias.detach()))
    assert same_bits(c(xc), torchlns.lns_conv2d(coded_input(xc, c), c.weight, conv.bias.detach(), groups=2))
    assert "weight=tensor" in repr(a) and "weight=block" in repr(b)


def test_extra_repr_shows_the_format():
    m = torchlns.LNSConv2d.from_float(nn.Conv2d(3, 4, 3), ConvertConfig(mac=CHIP_MAC), input_param=-100, acc_lsb=-18)
    r = repr(m)
    assert "LNS8(F=3)" in r and str(CHIP_MAC) in r and "acc_lsb=-18" in r and "offset=-100" in r
    assert isinstance(m.weight, torchlns.LNSTensor) and "weight" not in dict(m.named_parameters())
    assert "qat" in repr(m.enable_qat())


# ----------------------------------------------------------------------------------------
# straight-through gradients
# ----------------------------------------------------------------------------------------
def _leaf(t):
    return t.detach().clone().requires_grad_()


@pytest.mark.parametrize("mac,lsb", MACS, ids=["ideal", "chip"])
def test_linear_ste_gradients_are_the_float_layer_on_dequantized_operands(mac, lsb):
    torch.manual_seed(0)
    x = _leaf(torch.randn(2, 5, 16))
    m = torchlns.LNSLinear.from_float(nn.Linear(16, 8), ConvertConfig(mac=mac), input_param=offset_for(x),
                                      acc_lsb=lsb, qat=True).train()
    y = m(x)
    up = torch.randn_like(y)
    y.backward(up)
    xd, wd, bd = _leaf(coded_input(x, m).dequantize()), _leaf(m.weight.dequantize()), _leaf(m.bias)
    F.linear(xd, wd, bd).backward(up)
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.weight_float.grad, wd.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.bias.grad, bd.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mac,lsb", MACS, ids=["ideal", "chip"])
@pytest.mark.parametrize("cls,float_op,geometry,xshape", [
    (torchlns.LNSConv2d, F.conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1,
                                        groups=2), (2, 4, 9, 9)),
    (torchlns.LNSConv2d, F.conv2d, dict(in_channels=4, out_channels=4, kernel_size=(2, 3), padding="same",
                                        dilation=2), (4, 8, 8)),
    (torchlns.LNSConv1d, F.conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2),
     (2, 4, 11)),
], ids=lambda v: str(v) if isinstance(v, (dict, tuple)) else "")
def test_conv_ste_gradients_are_the_float_layer_on_dequantized_operands(mac, lsb, cls, float_op, geometry, xshape):
    torch.manual_seed(0)
    float_cls = nn.Conv2d if cls is torchlns.LNSConv2d else nn.Conv1d
    conv = float_cls(**geometry)
    x = _leaf(torch.randn(xshape))
    m = cls.from_float(conv, ConvertConfig(mac=mac), input_param=offset_for(x), acc_lsb=lsb, qat=True).train()
    y = m(x)
    up = torch.randn_like(y)
    y.backward(up)
    xd, wd, bd = _leaf(coded_input(x, m).dequantize()), _leaf(m.weight.dequantize()), _leaf(m.bias)
    float_op(xd, wd, bd, conv.stride, conv.padding, conv.dilation, conv.groups).backward(up)
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.weight_float.grad, wd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias.grad, bd.grad, rtol=1e-5, atol=1e-5)


def test_training_forward_encodes_the_master_and_eval_freezes_it():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    m = torchlns.LNSLinear.from_float(nn.Linear(16, 8), input_param=offset_for(x), qat=True).train()
    with torch.no_grad():
        m.weight_float.mul_(3)  # a new weight: training forwards use it at once
        master = LNSTensor.from_float(m.weight_float, LNS8, granularity="channel")
        assert same_bits(m(x), torchlns.lns_linear(coded_input(x, m), master, m.bias))
        assert not torch.equal(m.weight.codes, master.codes) or not torch.equal(m.weight.offset, master.offset)
    m.eval()
    assert torch.equal(m.weight.codes, master.codes) and torch.equal(m.weight.offset, master.offset)


# ----------------------------------------------------------------------------------------
# state dict
# ----------------------------------------------------------------------------------------
def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_roundtrip_restores_codes_params_and_acc_lsb():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8)
    src = torchlns.LNSConv2d.from_float(nn.Conv2d(4, 6, 3).eval(), ConvertConfig(mac=CHIP_MAC),
                                        input_param=offset_for(x), acc_lsb=-19)
    dst = torchlns.LNSConv2d.from_float(nn.Conv2d(4, 6, 3).eval(), ConvertConfig(mac=CHIP_MAC),
                                        input_param=offset_for(x, 5), acc_lsb=-12)
    assert set(src.state_dict()) == {"weight", "bias", "input_param", "_extra_state"}
    dst.load_state_dict(_roundtrip(src.state_dict()))
    assert dst.acc_lsb == -19 and torch.equal(dst.input_param, src.input_param)
    assert same_bits(dst(x), src(x))


def _seq(layer):
    return nn.Sequential(torchlns.LNSLinear.from_float(nn.Linear(8, 8).eval(), input_param=-100), layer)


@pytest.mark.parametrize("other", [
    dict(config=ConvertConfig(fmt=FP8_E4M3), input_param=0.01),  # another format
    dict(config=ConvertConfig(mac=CHIP_MAC), input_param=-100, acc_lsb=-20),  # another MAC
    dict(features=(8, 5), input_param=-100),  # another shape
], ids=["format", "mac", "shape"])
def test_load_state_dict_mismatch_is_a_runtime_error_naming_the_key(other):
    torch.manual_seed(0)
    src = _seq(torchlns.LNSLinear.from_float(nn.Linear(8, 4).eval(), input_param=-100))
    other = dict(other)
    features = other.pop("features", (8, 4))
    dst = _seq(torchlns.LNSLinear.from_float(nn.Linear(*features).eval(), **other))
    with pytest.raises(RuntimeError, match=r"\b1\.(weight|_extra_state)\b"):
        dst.load_state_dict(src.state_dict())


def test_load_state_dict_missing_coded_weight_is_reported():
    m = torchlns.LNSLinear.from_float(nn.Linear(8, 4).eval(), input_param=-100)
    sd = m.state_dict()
    del sd["weight"]
    with pytest.raises(RuntimeError, match="weight"):
        m.load_state_dict(sd)
    assert "weight" in m.load_state_dict(sd, strict=False).missing_keys


# ----------------------------------------------------------------------------------------
# fake-quantized training (see Note: fake-quantized training in nn/layers.py)
# ----------------------------------------------------------------------------------------
def _qat_model(fmt=torchlns.LNS8, mac=torchlns.IDEAL_MAC, forward="fake"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding="same", groups=2),
                          nn.Flatten(), nn.Linear(8 * 36, 5))
    x = torch.randn(4, 3, 6, 6)
    cfg = ConvertConfig(fmt=fmt, mac=mac, qat=True, qat_forward=forward)
    return torchlns.convert(model, cfg, [x]), x


@pytest.mark.parametrize("fmt", [torchlns.LNS8, torchlns.FP8_E4M3, torchlns.INT8], ids=str)
def test_fake_forward_has_the_exact_forwards_gradients(fmt):
    fake, x = _qat_model(fmt)
    exact, _ = _qat_model(fmt, forward="exact")
    c = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    grads = []
    for q in (fake, exact):
        q.train()
        xin = x.clone().requires_grad_()
        y = q(xin)
        (y * c).sum().backward()  # linear in y: both runs get the same upstream gradient
        grads.append([xin.grad] + [p.grad for p in q.parameters()])
        q.zero_grad()
    for gf, ge in zip(*grads):
        torch.testing.assert_close(gf, ge, rtol=1e-4, atol=1e-6)


def test_fake_forward_is_close_to_the_chip_and_eval_is_exact():
    fake, x = _qat_model(mac=torchlns.CHIP_MAC)
    exact, _ = _qat_model(mac=torchlns.CHIP_MAC, forward="exact")
    fake.train()
    exact.train()
    with torch.no_grad():
        yf, ye = fake(x), exact(x)
    assert not torch.equal(yf, ye)  # the chip's LUT and accumulator are not modelled in training
    torch.testing.assert_close(yf, ye, rtol=0.05, atol=0.05 * ye.abs().max().item())
    fake.eval()
    exact.eval()
    assert torch.equal(fake(x), exact(x))


def test_train_forward_is_validated_kept_in_the_state_dict_and_set_by_enable_qat():
    with pytest.raises(ValueError, match="qat_forward"):
        ConvertConfig(qat_forward="approximate")
    q, x = _qat_model()
    assert all(m.train_forward == "fake" for m in q.modules() if hasattr(m, "train_forward"))
    assert "qat (fake forward)" in repr(q)
    exact, _ = _qat_model(forward="exact")
    exact.load_state_dict(q.state_dict())
    assert exact[0].train_forward == "fake"
    torchlns.enable_qat(exact, "exact")
    assert exact[0].train_forward == "exact"
    with pytest.raises(ValueError, match="train_forward"):
        exact[0].set_train_forward("sloppy")


def test_fake_training_moves_the_masters_and_eval_reencodes_them():
    q, x = _qat_model()
    before = q[0].weight.codes.clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.5)
    q.train()
    for _ in range(3):
        loss = q(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    assert not torch.equal(q[0].weight.codes, before)
    with torch.no_grad():
        assert torch.equal(q(x), q(x))
