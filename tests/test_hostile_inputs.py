"""Careless calls get a clear error naming the problem, never a crash deep in a kernel (issue 14)."""

import pytest
import torch

import torchlns
from torchlns import LNS8

CONVS = [  # (function, input shape, weight shape)
    (torchlns.lns_conv1d, (1, 4, 9), (4, 4, 3)),
    (torchlns.lns_conv2d, (1, 4, 9, 9), (4, 4, 3, 3)),
    (torchlns.lns_conv3d, (1, 4, 5, 5, 5), (4, 4, 3, 3, 3)),
    (torchlns.lns_conv_transpose1d, (1, 4, 9), (4, 4, 3)),
    (torchlns.lns_conv_transpose2d, (1, 4, 9, 9), (4, 4, 3, 3)),
    (torchlns.lns_conv_transpose3d, (1, 4, 5, 5, 5), (4, 4, 3, 3, 3)),
]


@pytest.mark.parametrize("fn,xs,ws", CONVS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("kw,name", [(dict(stride=0), "stride"), (dict(stride=-1), "stride"),
                                     (dict(dilation=0), "dilation"), (dict(padding=-1), "padding"),
                                     (dict(groups=0), "groups"), (dict(groups=3), "groups")], ids=str)
def test_conv_geometry_is_validated_up_front(fn, xs, ws, kw, name):
    x = torchlns.LNSTensor.from_float(torch.randn(xs), LNS8)
    w = torchlns.LNSTensor.from_float(torch.randn(ws), LNS8)
    with pytest.raises(ValueError, match=name):
        fn(x, w, **kw)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3),
                               torch.nn.Flatten(), torch.nn.LazyLinear(4)).eval()


def test_a_single_tensor_is_one_calibration_batch():
    net = _net()
    x = torch.randn(8, 3, 16, 16)
    net(x)
    q = torchlns.convert(net, torchlns.ConvertConfig(progress=False), x)  # iterated sample by sample before
    assert torch.equal(q(x), torchlns.convert(net, torchlns.ConvertConfig(progress=False), [x])(x))


def test_too_many_centroids_warn_and_say_why():
    net = _net()
    with pytest.warns(UserWarning, match=r"layer '0' has 24 kernels, fewer than the 100000 centroids") as record:
        torchlns.cluster_kernels(net, 100000)
    assert any("plain 8-bit weights" in str(w.message) for w in record)


def test_a_useful_number_of_centroids_does_not_warn():
    import warnings

    net = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchlns.cluster_kernels(net, 16)


@pytest.mark.parametrize("scale,match", [(0.0, "saw no signal"), (1e30, "peak at")])
def test_calibration_without_signal_or_at_an_absurd_scale_warns(scale, match):
    net = _net()
    x = torch.rand(4, 3, 16, 16)
    net(x)
    with pytest.warns(UserWarning, match=match):
        torchlns.convert(net, torchlns.ConvertConfig(progress=False), [x * scale])


def test_calibration_that_saturates_most_values_warns():
    net = torch.nn.Conv2d(3, 4, 1).eval()
    x = torch.rand(4, 3, 16, 16)
    # The largest valid LNS8 offset reaches 2^127 = 1.7e38, so values of 2e38..3e38 saturate.
    with pytest.warns(UserWarning, match=r"saturates most values at layers \[' \(100%\)'\]"):
        torchlns.convert(net, torchlns.ConvertConfig(progress=False), [x * 1e38 + 2e38])


def test_ordinary_calibration_does_not_warn():
    import warnings

    net = _net()
    x = torch.rand(4, 3, 16, 16)
    net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchlns.convert(net, torchlns.ConvertConfig(progress=False), [x])
