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


# ----------------------------------------------------------------------------------------
# validated loading (Note: validated loading in torchlns/nn/layers.py)
# ----------------------------------------------------------------------------------------
def _converted(mac=None):
    net = _net()
    x = torch.rand(4, 3, 16, 16)
    net(x)
    cfg = torchlns.ConvertConfig(progress=False) if mac is None else torchlns.ConvertConfig(mac=mac, progress=False)
    return torchlns.convert(net, cfg, [x]), x


def _crafted(sd, key, **change):
    t = sd[key]
    fields = {**dict(codes=t.codes, param=t.param, fmt=t.fmt, block=t.block), **change}
    return {**sd, key: type(t)(fields["codes"], fields["param"], fields["fmt"], fields["block"])}


def _snapshot(model):
    out = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torchlns.CodedTensor):
            out[k] = (v.codes.clone(), v.param.clone(), v.block)
        elif isinstance(v, torch.Tensor):
            out[k] = v.clone()
        else:
            out[k] = repr(v)
    return out


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], tuple):
            assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) and a[k][2] == b[k][2], k
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


CRAFTS = {
    "offset out of range": lambda sd, k: _crafted(sd, k, param=sd[k].param + 10**6),
    "bogus block": lambda sd, k: _crafted(sd, k, block=(7, 0)),
    "codes of another dtype": lambda sd, k: _crafted(sd, k, codes=sd[k].codes.to(torch.int16)),
    "float offsets": lambda sd, k: _crafted(sd, k, param=sd[k].param.float()),
    "offsets of the wrong layout": lambda sd, k: _crafted(sd, k, param=sd[k].param.reshape(-1)[:1].expand(5).clone()),
}


@pytest.mark.parametrize("craft", list(CRAFTS), ids=str)
def test_a_crafted_state_dict_is_refused_whole_and_names_the_key(craft, tmp_path):
    q, x = _converted()
    sd = q.state_dict()
    key = next(k for k, v in sd.items() if isinstance(v, torchlns.CodedTensor) and k.startswith("2."))
    bad = CRAFTS[craft](sd, key)
    torch.save(bad, tmp_path / "bad.pt")
    bad = torch.load(tmp_path / "bad.pt", weights_only=True)  # a file: safe to unpickle, not yet to use
    before, y = _snapshot(q), q(x)
    bad["0.bias"] = torch.zeros_like(sd["0.bias"])  # an earlier module's change must not land either
    with pytest.raises(RuntimeError, match=key.replace(".", r"\.")):
        q.load_state_dict(bad)
    _same(before, _snapshot(q))
    assert torch.equal(q(x), y)


@pytest.mark.parametrize("field,value,match", [("acc_lsb", 10**6, "acc_lsb"),
                                               ("input_block_size", 0, "input_block_size"),
                                               ("weight_granularity", ("diagonal", None), "granularity")])
def test_crafted_extra_state_is_refused(field, value, match):
    q, x = _converted(torchlns.CHIP_MAC)
    sd = q.state_dict()
    key = "2._extra_state"
    bad = {**sd, key: {**sd[key], field: value}}
    before = _snapshot(q)
    with pytest.raises(RuntimeError, match=match):
        q.load_state_dict(bad)
    _same(before, _snapshot(q))


def test_a_crafted_activation_offset_is_refused():
    q, _ = _converted()
    sd = q.state_dict()
    bad = {**sd, "0.input_param": sd["0.input_param"] + 10**6}
    with pytest.raises(RuntimeError, match=r"0\.input_param: offset .* is out of range"):
        q.load_state_dict(bad)


def test_a_good_state_dict_still_round_trips(tmp_path):
    q, x = _converted(torchlns.CHIP_MAC)
    y = q(x)
    torch.save(q.state_dict(), tmp_path / "sd.pt")
    r, _ = _converted(torchlns.CHIP_MAC)
    r.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(r(x), y)
    torch.save(q, tmp_path / "m.pt")  # the load pre-hook pickles with the model
    m = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(m(x), y)
    with pytest.raises(RuntimeError, match="out of range"):
        m.load_state_dict(_crafted(q.state_dict(), "2.weight", param=q.state_dict()["2.weight"].param + 10**6))
