"""The swap registry (see Note: swap registry in nn/swap.py): convert converts what is registered."""

import pytest
import torch
import torch.nn as nn

import torchlns
from torchlns import CHIP_MAC, ConvertConfig
from torchlns.nn import ClusteredConv2d, LNSClusteredConv2d, LNSConv1d, LNSConv2d, LNSLinear
from torchlns.nn.swap import _SWAPS, register_swap, swap_for, swappable_types


def test_the_chip_layers_are_registered():
    assert set(swappable_types()) >= {nn.Linear, nn.Conv1d, nn.Conv2d, ClusteredConv2d}
    for float_module, chip in [(nn.Linear(4, 3), LNSLinear), (nn.Conv1d(2, 3, 3), LNSConv1d),
                               (nn.Conv2d(2, 3, 3), LNSConv2d)]:
        new = swap_for(float_module)(float_module, ConvertConfig(activation="dynamic"), memo={})
        assert type(new) is chip


class Scale(nn.Module):
    """A float layer torchlns knows nothing about: y = x * w."""

    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 2.0, n))

    def forward(self, x):
        return x * self.w


class ChipScale(nn.Module):
    """Its 'chip' counterpart for the test: a diagonal LNSLinear."""

    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


@pytest.fixture
def scale_swap():
    calls = []

    @register_swap(Scale)
    def swap(module, config, *, input_param=None, acc_lsb=None, qat=False, memo):
        calls.append(dict(input_param=input_param, acc_lsb=acc_lsb, memo=memo))
        lin = nn.Linear(len(module.w), len(module.w), bias=False).eval()
        with torch.no_grad():
            lin.weight.copy_(torch.diag(module.w))
        return ChipScale(LNSLinear.from_float(lin, config, input_param=input_param, acc_lsb=acc_lsb, qat=qat))

    yield calls
    del _SWAPS[Scale]


def test_a_registered_swap_is_calibrated_and_called(scale_swap):
    model = nn.Sequential(nn.Linear(6, 6), Scale(6), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 6)
    q = torchlns.convert(model, ConvertConfig(mac=CHIP_MAC), [x, x * 2])
    assert [type(m).__name__ for m in q] == ["LNSLinear", "ChipScale", "LNSLinear"]
    (call,) = scale_swap
    assert call["input_param"] is not None and call["acc_lsb"] is not None  # calibrated like any layer
    assert isinstance(call["memo"], dict)
    assert [r["layer"] for r in q.conversion_report] == ["0", "1", "2"]
    assert torchlns.metrics.sqnr(q(x), model(x)) > 20


def test_a_type_is_registered_once(scale_swap):
    with pytest.raises(ValueError, match="already swaps"):
        register_swap(Scale)(LNSLinear)
    register_swap(Scale, replace=True)(ChipScale)  # an explicit replacement is allowed
    assert swap_for(Scale(2)).__qualname__ == "ChipScale.from_float"


def test_only_modules_register():
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        register_swap(int)


def test_swaps_match_exact_types_and_convert_faithful_subclasses():
    class MyLinear(nn.Linear):  # the base class's forward: converts
        pass

    class Doubled(nn.Linear):  # another computation: stays float, reported
        def forward(self, x):
            return 2 * super().forward(x)

    assert swap_for(MyLinear(2, 2)) is None  # the registry itself is by exact type
    q = torchlns.convert(nn.Sequential(MyLinear(4, 4), Doubled(4, 4)), ConvertConfig(activation="dynamic"))
    assert type(q[0]) is torchlns.LNSLinear and type(q[1]) is Doubled
    assert [r["layer"] for r in q.conversion_report.float_layers] == ["1"]
    assert "register_swap(Doubled)" in q.conversion_report.float_layers[0]["reason"]


def test_clustered_layers_share_their_table_through_the_memo():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    cfg = ConvertConfig(cluster=torchlns.ClusterConfig(num_clusters=4, iterations=3, scope="network"))
    q = torchlns.convert(model, cfg, [torch.randn(2, 3, 8, 8)])
    assert isinstance(q[0], LNSClusteredConv2d) and q[2].centroids is q[0].centroids
    fp8 = torchlns.convert(model, ConvertConfig(cluster=cfg.cluster, fmt=torchlns.FP8_E4M3), [torch.randn(2, 3, 8, 8)])
    assert type(fp8[0]) is LNSConv2d  # FP8 has no per-kernel log offsets: the dense weight is encoded
