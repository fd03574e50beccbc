"""Conv and linear subclasses that pad and then call the base op convert and cluster with no user swap.

See Note: pad-then-conv subclasses in torchlns/transforms/graph.py. Before this, the
EfficientNet wheel's ``Conv2dStaticSamePadding``/``Conv2dDynamicSamePadding`` and timm's
``Conv2dSame`` stayed float (17 of EfficientNet-Lite0's 50 convs) and ``cluster_kernels``
skipped them without a word.
"""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import replicas
import torchlns
from torchlns import CHIP_MAC, ConvertConfig, LNSConv2d
from torchlns.core.geometry import InputPad, tf_same_pads
from torchlns.transforms.graph import pad_then_base


class PadConv1d(nn.Conv1d):
    def forward(self, x):
        return F.conv1d(F.pad(x, (2, 1)), self.weight, self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class PadConv3d(nn.Conv3d):
    def forward(self, x):
        return self._conv_forward(F.pad(x, (1, 1, 0, 1, 1, 0)), self.weight, self.bias)


class PadLinear(nn.Linear):
    def forward(self, x):
        return F.linear(F.pad(x, (0, 3)), self.weight, self.bias)


class OnePadConv(nn.Conv2d):  # pads with ones: not the chip's zero padding
    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), value=1.0), self.weight, self.bias, self.stride)


class ReflectPadConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.weight, self.bias, self.stride)


class ModPadConv(nn.Conv2d):  # pads by a rule of its own
    def forward(self, x):
        p = x.shape[-1] % 3
        return F.conv2d(F.pad(x, (p, 0, 0, 0)), self.weight, self.bias, self.stride)


class ScaledConv(nn.Conv2d):  # pads, convolves, then rescales
    def forward(self, x):
        return 2 * F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class OtherWeightConv(nn.Conv2d):  # pads, then convolves with a weight that is not its own
    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight.flip(-1), self.bias, self.stride)


RECOGNISED = [
    (lambda: replicas.Conv2dStaticSamePadding(3, 8, 3, stride=2, image_size=16), InputPad(pads=(0, 1, 0, 1))),
    (lambda: replicas.Conv2dStaticSamePadding(8, 8, 5, groups=8, image_size=16), InputPad(pads=(2, 2, 2, 2))),
    (lambda: replicas.Conv2dDynamicSamePadding(3, 8, 3, stride=2), InputPad(same=True)),
    (lambda: replicas.Conv2dDynamicSamePadding(8, 8, 5, stride=2, groups=8, dilation=2), InputPad(same=True)),
    (lambda: replicas.Conv2dSame(3, 8, (3, 5), stride=(2, 1)), InputPad(same=True)),
    (lambda: PadConv1d(3, 4, 3), InputPad(pads=(2, 1))),
    (lambda: PadConv3d(2, 4, 3), InputPad(pads=(1, 1, 0, 1, 1, 0))),
    (lambda: PadLinear(5, 4), InputPad(pads=(0, 3))),
]
REFUSED = [(OnePadConv, "constant 1.0"), (ReflectPadConv, "'reflect'"), (ModPadConv, "rule other than"),
           (ScaledConv, "tensor calls"), (OtherWeightConv, "tensor calls")]


def _input(m, size=13, batch=2):
    if isinstance(m, nn.Linear):
        return torch.randn(batch, m.in_features - (3 if isinstance(m, PadLinear) else 0))
    n = len(m.kernel_size)
    return torch.randn(batch, m.in_channels, *[size + i for i in range(n)])


def test_tf_same_pads_match_the_wheels_formula():
    for i in range(5, 40):
        for k, s, d in [(3, 1, 1), (3, 2, 1), (5, 2, 1), (5, 2, 2), (1, 2, 1), (2, 2, 1)]:
            o = math.ceil(i / s)
            total = max((o - 1) * s + (k - 1) * d + 1 - i, 0)
            assert tf_same_pads((i,), (k,), (s,), (d,)) == (total // 2, total - total // 2)


@pytest.mark.parametrize("make,pad", RECOGNISED, ids=lambda v: type(v).__name__ if isinstance(v, InputPad) else "")
def test_pad_then_base_is_recognised(make, pad):
    m = make()
    base = nn.Linear if isinstance(m, nn.Linear) else type(m).__mro__[1]
    assert pad_then_base(m, base) == (pad, None)


@pytest.mark.parametrize("cls,why", REFUSED, ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_other_computations_stay_float_and_are_reported(cls, why):
    m = nn.Sequential(cls(3, 4, 3, stride=2)).eval()
    assert pad_then_base(m[0], nn.Conv2d)[1] is not None and why in pad_then_base(m[0], nn.Conv2d)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing converts: convert says so
        q = torchlns.convert(m, ConvertConfig(), [torch.randn(2, 3, 11, 11)])
    assert type(q[0]) is cls
    row = q.conversion_report.float_layers[0]
    assert row["layer"] == "0" and why in row["reason"] and f"register_swap({cls.__name__})" in row["reason"]


@pytest.mark.parametrize("make,pad", RECOGNISED, ids=lambda v: type(v).__name__ if isinstance(v, InputPad) else "")
def test_padded_subclasses_convert_bit_exact(make, pad):
    """The converted layer pads the float input (zeros: zero codes) and runs the base chip layer: bits equal
    to the plain chip layer on the padded input, at the calibration size and at another size."""
    torch.manual_seed(0)
    m = make().eval()
    x = _input(m)
    q = torchlns.convert(nn.Sequential(m), ConvertConfig(mac=CHIP_MAC), [x])
    chip = q[0]
    assert chip.input_pad == pad
    assert q.conversion_report.coverage == 1.0, str(q.conversion_report)
    base = type(chip)(chip.weight, chip.bias, chip.mac, input_param=chip.input_param, acc_lsb=chip.acc_lsb,
                      **({} if isinstance(m, nn.Linear) else dict(stride=chip.stride, dilation=chip.dilation,
                                                                  groups=chip.groups)))
    for size in (13, 16):
        xs = _input(m, size)
        pads = pad.amounts(xs, m.kernel_size, chip.stride, chip.dilation) if pad.same else pad.pads
        with torch.no_grad():
            y = q(xs)
            assert torch.equal(y.view(torch.int32), base(F.pad(xs, pads)).view(torch.int32))
            assert y.shape == m(xs).shape
            assert torchlns.metrics.sqnr(y, m(xs)) > 10  # a sanity check; the bits are checked above


def test_the_wheel_network_folds_converts_and_clusters_whole():
    m, (x,) = replicas.build("efficientnet_wheelish")
    q = torchlns.convert(m, ConvertConfig(mac=CHIP_MAC), [x])
    assert q.conversion_report.coverage == 1.0 and len(q.conversion_report) == 5
    assert not q.fold_report.skipped
    assert q._dynamic_conv.input_pad == InputPad(same=True) and q._project_conv.input_pad is None

    c = torchlns.cluster_kernels(m, 4)
    assert {s.layer for s in c.cluster_report} == {"_conv_stem", "_depthwise_conv", "_dynamic_conv"}
    assert c._dynamic_conv.input_pad == InputPad(same=True)
    for x2 in (x, torch.randn(1, 3, 20, 18)):  # the dynamic pad follows the input size
        with torch.no_grad():
            dense = m._dynamic_conv.weight.clone()
            m._dynamic_conv.weight.copy_(c._dynamic_conv.weight)
            m._conv_stem.weight.copy_(c._conv_stem.weight)
            m._depthwise_conv.weight.copy_(c._depthwise_conv.weight)
            assert torch.allclose(c(x2), m(x2), atol=1e-5)
            m._dynamic_conv.weight.copy_(dense)
    qc = torchlns.convert(c, ConvertConfig(mac=CHIP_MAC), [x])
    assert type(qc._dynamic_conv).__name__ == "LNSClusteredConv2d" and qc._dynamic_conv.input_pad.same
    assert qc.conversion_report.coverage == 1.0


def test_input_pad_survives_state_dict_compile_and_the_weight_image(tmp_path):
    m, (x,) = replicas.build("efficientnet_wheelish")
    q = torchlns.convert(m, ConvertConfig(mac=CHIP_MAC), [x])
    with torch.no_grad():
        want = q(x)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    fresh = torchlns.convert(m, ConvertConfig(mac=CHIP_MAC), [x * 0.5])
    fresh._dynamic_conv.input_pad = None  # the state carries it back
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert fresh._dynamic_conv.input_pad == InputPad(same=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
        assert torch.equal(torch.compile(q, fullgraph=True)(x), want)
    torchlns.export(q, tmp_path / "q.tlns")
    loaded = torchlns.load_image(tmp_path / "q.tlns", replicas.build("efficientnet_wheelish")[0])
    assert loaded._conv_stem.input_pad == q._conv_stem.input_pad
    with torch.no_grad():
        assert torch.equal(loaded(x), want)


def test_a_bad_input_pad_in_a_state_dict_is_refused():
    m, (x,) = replicas.build("efficientnet_wheelish")
    q = torchlns.convert(m, ConvertConfig(), [x])
    state = q.state_dict()
    state["_fc._extra_state"] = dict(state["_fc._extra_state"], input_pad="same")  # a linear has no kernel
    with pytest.raises(RuntimeError, match="input_pad|no kernel"):
        q.load_state_dict(state)
    state = q.state_dict()
    state["_conv_stem._extra_state"] = dict(state["_conv_stem._extra_state"], input_pad=[1, -1])
    with pytest.raises(RuntimeError, match="pads must be"):
        q.load_state_dict(state)


def test_transforms_that_find_nothing_to_do_say_why():
    only_1x1 = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.warns(UserWarning, match=r"clustered no layer.*2 \(0, \.\.\.\): 1x1 kernels"):
        torchlns.cluster_kernels(only_1x1, 4)
    with pytest.warns(UserWarning, match="found no Conv2d layer"):
        torchlns.cluster_kernels(nn.Sequential(nn.Linear(3, 4)), 4)
    std = nn.Sequential(replicas.StdConv2d(3, 4, 3))
    with pytest.warns(UserWarning, match="StdConv2d's forward is not a Conv2d's"):
        torchlns.cluster_kernels(std, 4)
    with pytest.warns(torchlns.TorchLNSFoldWarning, match="folded nothing: the model has no BatchNorm"):
        torchlns.fold_batchnorm(only_1x1)
    after_relu = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    with pytest.warns(torchlns.TorchLNSFoldWarning, match="folded nothing: 1 normalisation layer"):
        torchlns.fold_batchnorm(after_relu)
    with pytest.warns(UserWarning, match="convert put no layer on the chip"):
        torchlns.convert(nn.Sequential(nn.ReLU()), ConvertConfig(), [torch.randn(2, 3)])
    with warnings.catch_warnings():  # convert does not warn about a model that has no BN to fold
        warnings.simplefilter("error")
        torchlns.convert(only_1x1, ConvertConfig(), [torch.randn(2, 3, 5, 5)])


def test_the_real_wheel_when_installed():
    """The wheel itself (the `examples` extra): every conv of its EfficientNet-Lite0 is recognised."""
    utils = pytest.importorskip("efficientnet_lite_pytorch.utils")
    for m, want in [(utils.Conv2dStaticSamePadding(3, 8, 3, stride=2, image_size=224), InputPad(pads=(0, 1, 0, 1))),
                    (utils.Conv2dDynamicSamePadding(8, 8, 5, stride=2, groups=8), InputPad(same=True))]:
        assert pad_then_base(m, nn.Conv2d) == (want, None)
        q = torchlns.convert(nn.Sequential(m).eval(), ConvertConfig(), [torch.randn(1, m.in_channels, 15, 15)])
        assert isinstance(q[0], LNSConv2d) and q[0].input_pad == want
