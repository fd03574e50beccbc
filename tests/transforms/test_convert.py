"""``torchlns.convert``: accuracy on the zoo, serialization, compile, QAT, calibration, config."""

import dataclasses
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, INT8, LNS8, ConvertConfig
from zoo import FOLDABLE, UNFOLDABLE, ZOO, calibration_batches

FLOAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONVERTED = (torchlns.LNSLinear, torchlns.LNSConv1d, torchlns.LNSConv2d, torchlns.LNSConv3d,
             torchlns.LNSConvTranspose1d, torchlns.LNSConvTranspose2d, torchlns.LNSConvTranspose3d)
# "dynamic" has data-dependent control flow: folding falls back (with a warning) by design.
no_fold_warning = pytest.mark.filterwarnings("ignore::torchlns.TorchLNSFoldWarning")


def sqnr_db(ref, out):
    ref, out = ref.double(), out.double()
    return 10 * math.log10(ref.pow(2).sum().item() / (out - ref).pow(2).sum().item())


def bits(t):
    return t.detach().view(torch.int32)


def same_bits(a, b):
    return torch.equal(a, b) and torch.equal(bits(a), bits(b))


class Tiny(nn.Module):
    """Conv + Linear: small enough to compile in seconds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def tiny():
    torch.manual_seed(0)
    return Tiny().eval(), torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------
# accuracy on the zoo
# ----------------------------------------------------------------------------------------
CONFIGS = {
    "lns8": ConvertConfig(),
    "lns8_chip": ConvertConfig(mac=CHIP_MAC),
    "fp8_e4m3": ConvertConfig(fmt=FP8_E4M3),
    "int8": ConvertConfig(fmt=INT8),
}
# SQNR floors in dB of the converted vs the float model on the zoo's example input, with
# calibration_batches(x, 4). Measured (torch 2.13 CPU), then lowered by ~5 dB and floored:
#   model       lns8   lns8_chip  fp8_e4m3  int8
#   resnet      30.6   31.6       30.9      42.5
#   mobilenet   34.2   34.3       33.7      44.9
#   unet        29.8   29.8       29.4      36.1
#   seq1d       30.0   30.0       30.7      44.6
#   awkward     23.2   23.4       23.4      31.8   (unfoldable BNs amplify the error)
#   dynamic     39.9   39.9       39.5      54.5
# A wrong offset, scale or accumulator LSB costs tens of dB, far below these floors.
SQNR_FLOOR = {
    "resnet": {"lns8": 25, "lns8_chip": 26, "fp8_e4m3": 25, "int8": 37},
    "mobilenet": {"lns8": 29, "lns8_chip": 29, "fp8_e4m3": 28, "int8": 39},
    "unet": {"lns8": 24, "lns8_chip": 24, "fp8_e4m3": 24, "int8": 31},
    "seq1d": {"lns8": 24, "lns8_chip": 24, "fp8_e4m3": 25, "int8": 39},
    "awkward": {"lns8": 18, "lns8_chip": 18, "fp8_e4m3": 18, "int8": 26},
    "dynamic": {"lns8": 34, "lns8_chip": 34, "fp8_e4m3": 34, "int8": 49},
}


@no_fold_warning
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("name", list(SQNR_FLOOR))
def test_zoo_sqnr_swaps_and_folds(name, cfg_name):
    model, x = ZOO[name]()
    q = torchlns.convert(model, CONFIGS[cfg_name], calibration_batches(x, 4))
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > SQNR_FLOOR[name][cfg_name]
    leftover = [n for n, m in q.named_modules() if type(m) in FLOAT_LAYERS]
    assert not leftover, f"layers left in float: {leftover}"
    n_float = sum(type(m) in FLOAT_LAYERS for m in model.modules())
    assert len(q.conversion_report) == n_float
    fmt = CONFIGS[cfg_name].fmt
    for m in q.modules():
        if isinstance(m, CONVERTED):
            assert m.fmt == fmt and m.weight.fmt == fmt
    for bn in FOLDABLE[name]:
        assert isinstance(q.get_submodule(bn), nn.Identity), bn
    for bn in UNFOLDABLE.get(name, {}):
        assert isinstance(q.get_submodule(bn), nn.modules.batchnorm._BatchNorm), bn


def test_transposed_3d_converts_whole():
    model, x = ZOO["transpose3d"]()
    q = torchlns.convert(model, None, calibration_batches(x, 2))
    assert q.conversion_report and q.conversion_report.coverage == 1.0
    assert not any(type(m) in FLOAT_LAYERS for m in q.modules())
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 20


# ----------------------------------------------------------------------------------------
# serialization
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_state_dict_roundtrip_is_bit_identical(cfg_name):
    model, x = ZOO["resnet"]()
    cfg = CONFIGS[cfg_name]
    q = torchlns.convert(model, cfg, calibration_batches(x, 4))
    # Different (and 8x larger) calibration data: other input params and acc_lsb.
    other = torchlns.convert(model, cfg, [8 * b for b in calibration_batches(x, 2, seed=7)])
    with torch.no_grad():
        want = q(x)
        assert not torch.equal(other(x), want)
    if cfg.mac.accumulator == "fixed":
        assert other.fc.acc_lsb != q.fc.acc_lsb
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    result = other.load_state_dict(torch.load(buf, weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert same_bits(other(x), want)
    for (name, a), b in zip(q.named_modules(), other.modules()):
        if isinstance(a, CONVERTED):
            assert b.acc_lsb == a.acc_lsb, name  # restored from the extra state
            assert torch.equal(b.input_param, a.input_param), name


@pytest.mark.parametrize("cfg_name", ["lns8", "lns8_chip", "int8"])
def test_whole_module_save_load_is_bit_identical(cfg_name):
    model, x = ZOO["mobilenet"]()
    q = torchlns.convert(model, CONFIGS[cfg_name], calibration_batches(x, 2))
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert same_bits(loaded(x), q(x))
    assert loaded.conversion_report == q.conversion_report


# ----------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,cfg", [
    ("aot_eager", ConvertConfig()),
    ("aot_eager", ConvertConfig(activation="dynamic", activation_block_size=16)),
    ("aot_eager", ConvertConfig(fmt=INT8)),
    ("inductor", ConvertConfig(mac=CHIP_MAC)),
], ids=["aot_eager-lns8", "aot_eager-dynamic", "aot_eager-int8", "inductor-chip"])
def test_compile_gives_eager_bits(backend, cfg):
    model, x = tiny()
    q = torchlns.convert(model, cfg, calibration_batches(x, 2))
    # Grad mode on, as users call it: the bias requires grad, so the STE op is in the graph.
    eager = q(x)
    compiled = torch.compile(q, backend=backend, fullgraph=True)(x)
    assert eager.requires_grad and compiled.requires_grad
    assert same_bits(compiled, eager)


# ----------------------------------------------------------------------------------------
# QAT
# ----------------------------------------------------------------------------------------
def _train(q, x, target, steps=20):
    opt = torch.optim.Adam([p for p in q.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for _ in range(steps):
        loss = F.mse_loss(q(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mac", [torchlns.IDEAL_MAC, CHIP_MAC], ids=["ideal", "chip"])
def test_qat_trains_weights_and_freeze_reencodes(mac):
    model, x = tiny()
    torch.manual_seed(3)
    target = Tiny()(x).detach()  # regress onto another network: the weights must move
    q = torchlns.convert(model, ConvertConfig(qat=True, mac=mac), [x])
    codes = {n: m.weight.codes.clone() for n, m in q.named_modules() if isinstance(m, CONVERTED)}
    assert {n for n, _ in q.named_parameters()} >= {"conv.weight_float", "fc.weight_float"}
    q.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a QAT model has masters: no "only bias trains" warning
        losses = _train(q, x, target)
    assert losses[-1] < 0.5 * losses[0]
    q.eval()
    assert not q.training
    for n, c in codes.items():
        m = q.get_submodule(n)
        assert not torch.equal(m.weight.codes, c), n  # eval() froze the trained masters
        want = torchlns.LNSTensor.from_float(m.weight_float.detach(), LNS8, granularity="channel")
        assert torch.equal(m.weight.codes, want.codes) and torch.equal(m.weight.offset, want.offset), n
    with torch.no_grad():
        assert F.mse_loss(q(x), target).item() < 0.5 * losses[0]


def test_without_qat_only_bias_trains_and_warns():
    model, x = tiny()
    torch.manual_seed(3)
    target = Tiny()(x).detach()
    q = torchlns.convert(model, ConvertConfig(), [x])
    codes = {n: (m.weight.codes.clone(), m.weight.offset.clone()) for n, m in q.named_modules()
             if isinstance(m, CONVERTED)}
    assert {n for n, _ in q.named_parameters()} == {"conv.bias", "fc.bias"}
    q.train()
    with pytest.warns(UserWarning, match="only its bias"):
        losses = _train(q, x, target, steps=5)
    assert losses[-1] < losses[0]  # the bias did train
    q.eval()
    for n, (c, o) in codes.items():
        w = q.get_submodule(n).weight
        assert torch.equal(w.codes, c) and torch.equal(w.offset, o), n


def test_enable_qat_adds_masters_and_freeze_without_steps_keeps_bits():
    model, x = ZOO["resnet"]()
    q = torchlns.convert(model, None, calibration_batches(x, 2))
    with torch.no_grad():
        before = q(x)
    assert torchlns.enable_qat(q) is q
    masters = [n for n, _ in q.named_parameters() if n.endswith("weight_float")]
    assert len(masters) == len(q.conversion_report)
    q.train().eval()  # re-encoding the dequantized codes must be the identity
    with torch.no_grad():
        assert same_bits(q(x), before)


# ----------------------------------------------------------------------------------------
# the fixed accumulator
# ----------------------------------------------------------------------------------------
def _outputs_max(model, names, batches):
    seen = dict.fromkeys(names, 0.0)
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, max(seen[n], out.detach().abs().max().item()))) for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return seen


def test_acc_lsb_is_calibrated_per_layer_and_nothing_saturates():
    model, x = ZOO["resnet"]()
    batches = calibration_batches(x, 4)
    q = torchlns.convert(model, ConvertConfig(mac=CHIP_MAC), batches)
    lsb = {r["layer"]: r["acc_lsb"] for r in q.conversion_report}
    assert all(isinstance(v, int) for v in lsb.values())
    assert len(set(lsb.values())) > 1  # layers with different output ranges get different LSBs
    T = 2 ** (CHIP_MAC.acc_bits - 1) - 1
    # The smallest LSB that holds the float model's largest output with one bit to spare.
    ref = _outputs_max(torchlns.fold_batchnorm(model), list(lsb), batches)
    for name, m in ref.items():
        assert q.get_submodule(name).acc_lsb == lsb[name]
        assert 2 * m <= T * 2.0 ** lsb[name] < 4 * m, name
    # The chip's own outputs on the calibration data stay clear of saturation.
    for name, m in _outputs_max(q, list(lsb), batches).items():
        assert m < T * 2.0 ** lsb[name], name


def test_acc_headroom_bits_shift_acc_lsb():
    model, x = ZOO["seq1d"]()
    batches = calibration_batches(x, 2)
    lo = torchlns.convert(model, ConvertConfig(mac=CHIP_MAC, acc_headroom_bits=0), batches)
    hi = torchlns.convert(model, ConvertConfig(mac=CHIP_MAC, acc_headroom_bits=2), batches)
    for a, b in zip(lo.conversion_report, hi.conversion_report):
        assert b["acc_lsb"] - a["acc_lsb"] == 2, a["layer"]


# ----------------------------------------------------------------------------------------
# calibrators
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [LNS8, FP8_E4M3, INT8], ids=str)
def test_max_calibrator_is_calibrate_on_all_inputs(fmt):
    model, x = ZOO["resnet"]()
    batches = calibration_batches(x, 4)
    q = torchlns.convert(model, ConvertConfig(fmt=fmt, calibrator="max"), batches)
    want = torchlns.calibrate(torch.cat(batches), fmt).reshape(())
    assert torch.equal(q.stem[0].input_param, want)
    assert q.conversion_report[0]["input"] == want.item()


def _with_outlier(x):
    batches = calibration_batches(x, 4)
    batches[1][0, 0, 0, 0] = 1000.0  # one value, ~300x the rest
    return batches


def test_percentile_ignores_an_outlier():
    model, x = ZOO["resnet"]()
    batches = _with_outlier(x)
    by_max = torchlns.convert(model, ConvertConfig(calibrator="max"), batches)
    by_pct = torchlns.convert(model, ConvertConfig(calibrator="percentile", percentile=99.9), batches)
    off_max, off_pct = by_max.stem[0].input_param.item(), by_pct.stem[0].input_param.item()
    assert off_max == torchlns.default_offset(torch.cat(batches), LNS8)
    assert off_pct < off_max - 8 * 5  # the outlier is ~2^8 above the 99.9th percentile
    assert off_pct == torchlns.default_offset(torch.cat(batches).abs().double().quantile(0.999).float(), LNS8)


def _roundtrip_sse(data, fmt, p):
    return (torchlns.decode(torchlns.encode(data, fmt, p), fmt, p).double() - data.double()).pow(2).sum().item()


@pytest.mark.parametrize("fmt", [LNS8, INT8], ids=str)
def test_mse_calibrator_beats_max_on_the_observed_data(fmt):
    model, x = ZOO["resnet"]()
    batches = calibration_batches(x, 4)
    data = torch.cat(batches).flatten()  # small enough that the observer keeps every value
    p_max = torchlns.convert(model, ConvertConfig(fmt=fmt, calibrator="max"), batches).stem[0].input_param
    p_mse = torchlns.convert(model, ConvertConfig(fmt=fmt, calibrator="mse"), batches).stem[0].input_param
    assert _roundtrip_sse(data, fmt, p_mse) <= _roundtrip_sse(data, fmt, p_max)
    if fmt == INT8:  # uniform steps: clipping the Gaussian tail buys resolution
        assert p_mse < p_max
    else:  # the search covers 4 octaves below the max offset; nothing there may be better
        best = min(_roundtrip_sse(data, fmt, p_max - j) for j in range(4 * 8 + 1))
        assert _roundtrip_sse(data, fmt, p_mse) == best


# ----------------------------------------------------------------------------------------
# dynamic activations
# ----------------------------------------------------------------------------------------
def _seq(conv):
    torch.manual_seed(0)
    if conv is nn.Conv2d:
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 5)).eval(), torch.randn(3, 3, 8, 8)
    return nn.Sequential(nn.Conv1d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 10, 5)).eval(), torch.randn(3, 4, 10)


@pytest.mark.parametrize("block", [16, None])
@pytest.mark.parametrize("conv", [nn.Conv2d, nn.Conv1d], ids=["conv2d", "conv1d"])
def test_dynamic_activations_need_no_data_and_match_the_ops(conv, block):
    model, x = _seq(conv)
    q = torchlns.convert(model, ConvertConfig(activation="dynamic", activation_block_size=block))
    c, lin = q[0], q[3]
    assert c.input_param is None and lin.input_param is None
    assert c.input_block_size == block and lin.input_block_size == block
    op = torchlns.lns_conv2d if conv is nn.Conv2d else torchlns.lns_conv1d
    with torch.no_grad():
        h = op(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, x_block_size=block)
        want = torchlns.lns_linear(torch.relu(h).flatten(1), lin.weight, lin.bias, x_block_size=block)
        assert same_bits(q(x), want)
    kind = f"dynamic per-block({block})" if block else "dynamic per-tensor"
    assert kind in repr(lin)


def test_dynamic_with_fixed_accumulator_calibrates_only_acc_lsb():
    model, x = _seq(nn.Conv2d)
    q = torchlns.convert(model, ConvertConfig(activation="dynamic", mac=CHIP_MAC), calibration_batches(x, 2))
    assert q[0].input_param is None and isinstance(q[0].acc_lsb, int) and isinstance(q[3].acc_lsb, int)


# ----------------------------------------------------------------------------------------
# selecting layers: module_filter_fn and overrides
# ----------------------------------------------------------------------------------------
def _kinds(q):
    return {n: type(m) for n, m in q.named_modules() if isinstance(m, FLOAT_LAYERS + CONVERTED)}


def test_overrides_keep_first_and_last_layer_float():
    model, x = ZOO["resnet"]()
    q = torchlns.convert(model, ConvertConfig(overrides={"stem.0": None, "fc": None}), calibration_batches(x, 2))
    kinds = _kinds(q)
    assert kinds.pop("stem.0") is nn.Conv2d and kinds.pop("fc") is nn.Linear
    assert set(kinds.values()) == {torchlns.LNSConv2d}
    assert [r["layer"] for r in q.conversion_report] == list(kinds)
    # the float layers still hold the folded BN
    folded = torchlns.fold_batchnorm(model)
    assert torch.equal(q.stem[0].weight, folded.stem[0].weight) and torch.equal(q.stem[0].bias, folded.stem[0].bias)


def test_pattern_and_format_overrides():
    model, x = ZOO["resnet"]()
    cfg = ConvertConfig(overrides={"layer1.*": None, "layer2.conv1": {"fmt": INT8}, "layer2.*": {"fmt": FP8_E4M3},
                                   "fc": {"fmt": FP8_E4M3, "activation": "dynamic"}})
    q = torchlns.convert(model, cfg, calibration_batches(x, 2))
    kinds = _kinds(q)
    assert kinds["layer1.conv1"] is nn.Conv2d and kinds["layer1.conv2"] is nn.Conv2d
    assert q.layer2.conv1.fmt == INT8 and isinstance(q.layer2.conv1.weight, torchlns.IntTensor)  # exact name wins
    assert q.layer2.conv2.fmt == FP8_E4M3 and q.layer2.downsample[0].fmt == FP8_E4M3
    assert isinstance(q.fc.weight, torchlns.FP8Tensor) and q.fc.input_param is None
    assert q.stem[0].fmt == LNS8 and isinstance(q.stem[0].weight, torchlns.LNSTensor)
    assert q.layer2.conv2.input_param.dtype == torch.float32  # a scale, calibrated for FP8
    with torch.no_grad():
        assert sqnr_db(model(x), q(x)) > 20


def test_module_filter_fn():
    model, x = ZOO["resnet"]()
    calls = []

    def only_convs(m, fqn):
        calls.append(fqn)
        return isinstance(m, nn.Conv2d) and not fqn.startswith("layer2")

    q = torchlns.convert(model, ConvertConfig(module_filter_fn=only_convs), calibration_batches(x, 2))
    kinds = _kinds(q)
    assert kinds == {"stem.0": torchlns.LNSConv2d, "layer1.conv1": torchlns.LNSConv2d,
                     "layer1.conv2": torchlns.LNSConv2d, "layer2.conv1": nn.Conv2d, "layer2.conv2": nn.Conv2d,
                     "layer2.downsample.0": nn.Conv2d, "fc": nn.Linear}
    assert "fc" in calls


def test_unknown_override_field_is_rejected_at_construction():
    with pytest.raises(ValueError, match="bogus"):
        ConvertConfig(overrides={"fc": {"bogus": 1}})
    with pytest.raises(ValueError, match="fold_bn"):  # pipeline-wide, not per layer
        ConvertConfig(overrides={"fc": {"fold_bn": False}})


# ----------------------------------------------------------------------------------------
# errors and inputs
# ----------------------------------------------------------------------------------------
def test_missing_calibration_data_is_a_clear_error():
    model, _ = ZOO["resnet"]()
    with pytest.raises(ValueError, match="calibration_data"):
        torchlns.convert(model)
    with pytest.raises(ValueError, match="calibration_data.*acc_lsb"):
        torchlns.convert(model, ConvertConfig(activation="dynamic", mac=CHIP_MAC))
    for empty in ([], iter(()), DataLoader(TensorDataset(torch.zeros(0, 3, 16, 16)), batch_size=2)):
        with pytest.raises(ValueError, match="no batches"):
            torchlns.convert(model, None, empty)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(calibrator="foo"), ValueError),
    (dict(weight_granularity="block"), ValueError),
    (dict(weight_block_size=8), ValueError),
    (dict(weight_granularity="row"), ValueError),
    (dict(activation="x"), ValueError),
    (dict(activation_block_size=0), ValueError),
    (dict(percentile=0.0), ValueError),
    (dict(acc_headroom_bits=-1), ValueError),
    (dict(fmt="lns8"), TypeError),
    (dict(fmt=CHIP_MAC), TypeError),
    (dict(mac=LNS8), TypeError),
    (dict(cluster={"num_clusters": 4}), TypeError),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_bad_config_fails_at_construction(kwargs, exc):
    with pytest.raises(exc):
        ConvertConfig(**kwargs)


def test_config_is_frozen_and_overrides_are_read_only():
    cfg = ConvertConfig(overrides={"fc": None})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fmt = INT8
    with pytest.raises(TypeError):
        cfg.overrides["stem.0"] = None
    with pytest.raises(TypeError, match="ConvertConfig"):
        torchlns.convert(nn.Linear(2, 2), {"fmt": INT8})


class _Keyword(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *, image):
        return self.inner(image)


def test_calibration_item_kinds_agree():
    model, x = ZOO["resnet"]()
    batches = calibration_batches(x, 3)
    data = torch.cat(batches)
    want = torchlns.convert(model, ConvertConfig(mac=CHIP_MAC), batches).conversion_report
    labels = torch.zeros(len(data), dtype=torch.long)
    loader = DataLoader(TensorDataset(data, labels), batch_size=len(x))  # yields [input, target]
    pairs = [(b, torch.zeros(len(b))) for b in batches]
    for items in (loader, pairs, (b for b in batches)):
        assert torchlns.convert(model, ConvertConfig(mac=CHIP_MAC), items).conversion_report == want
    kw = torchlns.convert(_Keyword(model), ConvertConfig(mac=CHIP_MAC), [{"image": b} for b in batches])
    assert [{**r, "layer": r["layer"].removeprefix("inner.")} for r in kw.conversion_report] == want
    with pytest.raises(TypeError, match="calibration items"):
        torchlns.convert(model, None, [3.0])


def test_original_model_is_untouched():
    model, x = ZOO["resnet"]()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = {n: type(m) for n, m in model.named_modules()}
    q = torchlns.convert(model, ConvertConfig(qat=True), calibration_batches(x, 2))
    assert q is not model and q.fold_report is not None
    assert model.training and all(m.training for m in model.modules())
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("train", [False, True], ids=["from_eval", "from_train"])
def test_converted_model_is_in_eval_mode(train):
    model, x = ZOO["resnet"]()
    q = torchlns.convert(model.train(train), None, calibration_batches(x, 2))
    assert not q.training
    assert [n for n, m in q.named_modules() if m.training] == []  # the folded BNs' Identity too


def test_to_cpu_works_and_half_is_a_clear_type_error():
    model, x = ZOO["resnet"]()
    q = torchlns.convert(model, None, calibration_batches(x, 2))
    with torch.no_grad():
        want = q(x)
        assert q.to("cpu") is q and same_bits(q(x), want)
        assert same_bits(q.to(torch.device("cpu")).float()(x), want)
    with pytest.raises(TypeError, match="dequantize"):
        q.half()


def test_failed_half_leaves_the_model_unchanged():
    # The TypeError comes from the first coded buffer, after earlier parameters were cast.
    model, x = ZOO["resnet"]()
    q = torchlns.convert(model, None, calibration_batches(x, 2))
    with torch.no_grad():
        want = q(x)
    with pytest.raises(TypeError):
        q.half()
    assert {p.dtype for p in q.parameters()} == {torch.float32}
    with torch.no_grad():
        assert same_bits(q(x), want)


def test_a_float64_model_converts_to_float32_layers():
    # The chip outputs float32; float layers kept after a chip layer must accept it.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.LayerNorm(4 * 6 * 6)).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    q = torchlns.convert(model, calibration_data=[x])
    y = q(x)
    assert y.dtype == torch.float32 and q[3].weight.dtype == torch.float32
    assert model[3].weight.dtype == torch.float64  # the original is untouched
    assert torchlns.metrics.sqnr(y.detach(), model(x).float().detach()) > 20


def test_acc_lsb_sizes_chunk_sums_to_their_bits():
    """Note: chunk calibration: a chunked MAC's acc_lsb keeps every chunk sum of the calibration
    data inside chunk_bits (the total's LSB alone overflows nearly every product)."""
    from torchlns.transforms.calibration import acc_lsb_for

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Identity(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 5)).eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    mac = torchlns.MACConfig.chip().replace(chunk=8, chunk_bits=12)
    q = torchlns.convert(model, torchlns.ConvertConfig(mac=mac), calibration_data=data)
    r = torchlns.telemetry(q, data)
    assert r.total.chunks and r.total.chunk_overflow == 0 and 0.25 < r.total.chunk_headroom <= 1
    plain = torchlns.convert(model, torchlns.ConvertConfig(mac=torchlns.MACConfig.chip()), calibration_data=data)
    for name in ("0", "4"):
        assert q.get_submodule(name).acc_lsb > plain.get_submodule(name).acc_lsb
    assert acc_lsb_for(100.0, mac, 1, chunk_amax=None) == acc_lsb_for(100.0, mac.replace(acc_bits=12, chunk=0,
                                                                                         chunk_bits=0), 1)
