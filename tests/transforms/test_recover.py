"""Accuracy recovery (Note: accuracy recovery in torchlns/transforms/recover.py) on a small real-weight-like net.

The net is MobileNet-like (BN, ReLU6, depthwise 3x3, an expansion and a residual, a linear
head), trained for a few seconds on scikit-learn's bundled digits, so its weights and
activations are shaped by training as a real network's are, not random. Calibration digits
are disjoint from the evaluation digits. Each method must improve fidelity on held-out
digits, change only what the chip stores, leave the input model untouched, and give a
model that still runs bit for bit on every backend.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, INT8, ClusterConfig, ConvertConfig, LNSFormat, MACConfig
from torchlns.nn.layers import _CodedLayer
from torchlns.ops import reference_kernels
from zoo import TinyMobileNet, trained_digits_net


@pytest.fixture(scope="module")
def trained():
    return trained_digits_net()


def _fidelity(q, model, x):
    with torch.no_grad():
        yf, yq = model(x), q(x)
    return torchlns.metrics.sqnr(yq, yf), F.kl_div(yq.log_softmax(1), yf.log_softmax(1), log_target=True,
                                                    reduction="batchmean").item()


def _convert(model, calib, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchlns.convert(model, ConvertConfig(**kw), calib)


def _stored(q):
    """Everything a chip layer stores, by key, as plain tensors (codes and parameters of coded fields)."""
    out = {}
    for k, v in q.state_dict().items():
        if isinstance(v, torchlns.CodedTensor):
            out[k + ".codes"], out[k + ".param"] = v.codes.clone(), v.param.clone()
        elif isinstance(v, torch.Tensor):
            out[k] = v.clone()
    return out


def _only_stored_fields_changed(before, after_model):
    after = _stored(after_model)
    assert set(after) == set(before)  # no field added or removed (no float masters left behind)
    for k, v in after.items():
        assert v.dtype == before[k].dtype and v.shape == before[k].shape, k


@pytest.mark.parametrize("method", ["bias", "rounding", "distill"])
def test_each_method_improves_held_out_fidelity_and_changes_only_stored_fields(trained, method):
    model, calib, held = trained
    q = _convert(model, calib, fmt=LNSFormat(6, 2), mac=CHIP_MAC)  # a coarse format: clear room to recover
    untouched = _stored(q)
    sqnr0, kl0 = _fidelity(q, model, held)
    if method == "bias":
        r = torchlns.bias_correction(q, model, calib)
    elif method == "rounding":
        r = torchlns.adaptive_rounding(q, model, calib, iterations=40, batch_size=16)
        assert r.rounding_report and any(b["kept"] for b in r.rounding_report)
        assert {b["block"] for b in r.rounding_report} >= {"blocks.0", "blocks.1"}  # blocks, not single layers
    else:
        r = torchlns.distill(q, model, calib, steps=40, batch_size=16, lr=3e-3, validate_every=10)
        assert r.distill_report["held_out_loss_after"] <= r.distill_report["held_out_loss_before"]
    sqnr1, kl1 = _fidelity(r, model, held)
    assert sqnr1 > sqnr0 + 0.3 and kl1 < kl0, (method, sqnr0, sqnr1, kl0, kl1)
    assert all(torch.equal(v, _stored(q)[k]) for k, v in untouched.items())  # qmodel itself is untouched
    _only_stored_fields_changed(untouched, r)
    with torch.no_grad():  # still an exact chip model: the fixed accumulator's bits on every backend
        x = held[:16]
        want = r(x)
        with reference_kernels():
            assert torch.equal(r(x).view(torch.int32), want.view(torch.int32))


def test_rounding_picks_a_neighbouring_rung_of_every_weight(trained):
    model, calib, _ = trained
    q = _convert(model, calib, mac=CHIP_MAC)
    r = torchlns.adaptive_rounding(q, model, calib[:2], iterations=10, batch_size=16)
    for (name, a), b in zip(((n, m) for n, m in q.named_modules() if isinstance(m, _CodedLayer)),
                            (m for m in r.modules() if isinstance(m, _CodedLayer))):
        assert torch.equal(a.weight.param, b.weight.param), name  # offsets are not moved
        na, ia = a.fmt.magnitude(a.weight.codes)
        nb, ib = b.fmt.magnitude(b.weight.codes)
        assert (ia - ib).abs().max() <= 1, name  # one log step at most from the nearest code
        assert torch.equal(na[(ia > 0) & (ib > 0)], nb[(ia > 0) & (ib > 0)]), name  # signs kept


@pytest.mark.parametrize("kw", [dict(fmt=FP8_E4M3), dict(fmt=INT8), dict(mac=MACConfig()),
                                dict(fmt=LNSFormat(8, 4), mac=CHIP_MAC), dict(activation="dynamic", activation_block_size=8),
                                dict(cluster=ClusterConfig(num_clusters=8), mac=CHIP_MAC)],
                         ids=["fp8", "int8", "lns-ideal", "lns-f4-chip", "dynamic", "clustered"])
def test_recover_works_for_every_format_mac_and_clustered_layers(trained, kw):
    model, calib, held = trained
    calib = [calib[0][:24]]
    q = _convert(model, calib, **kw)
    before = _stored(q)
    r = torchlns.recover(q, model, calib, rounding=dict(iterations=10, batch_size=16),
                         distillation=dict(steps=6, validate_every=3))
    assert [row["method"] for row in r.recovery_report.rows] == ["bias", "rounding", "distill"]
    assert "agreement" in str(r.recovery_report)
    _only_stored_fields_changed(before, r)
    sqnr0, _ = _fidelity(q, model, held)
    sqnr1, _ = _fidelity(r, model, held)
    assert sqnr1 > sqnr0 - 0.5, (sqnr0, sqnr1)  # never meaningfully worse; usually better
    if "cluster" in kw:
        chip = r.blocks[0].dw[0]
        assert type(chip).__name__ == "LNSClusteredConv2d" and chip.centroids.codes.dtype == torch.uint8


def test_recovered_model_round_trips_state_dict(trained):
    model, calib, held = trained
    q = _convert(model, calib, mac=CHIP_MAC)
    r = torchlns.recover(q, model, calib, methods=("bias", "rounding"), rounding=dict(iterations=10))
    fresh = copy.deepcopy(q)
    fresh.load_state_dict(r.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(held[:8]), r(held[:8]))


def test_bad_input_gets_one_clear_line_and_leaves_the_model_alone(trained):
    model, calib, held = trained
    q = _convert(model, calib, mac=CHIP_MAC)
    before = _stored(q)
    torch.manual_seed(123)
    other = TinyMobileNet().eval()  # the same architecture, other weights
    with pytest.raises(ValueError, match="not the model qmodel came from.*cosine"):
        torchlns.recover(q, other, calib)
    with pytest.raises(ValueError, match="not the model qmodel came from.*no module"):
        torchlns.recover(q, nn.Sequential(nn.Linear(3, 3)), calib)
    with pytest.raises(ValueError, match="does not run through"):
        torchlns.recover(q, model, [torch.randn(4, 3, 8, 8)])  # three channels for a one-channel net
    with pytest.raises(ValueError, match="calibration data is empty"):
        torchlns.recover(q, model, [])
    with pytest.raises(ValueError, match="methods must be"):
        torchlns.recover(q, model, calib, methods=("magic",))
    with pytest.raises(ValueError, match="no chip layers"):
        torchlns.recover(model, model, calib)
    with pytest.raises(TypeError, match="reference must be"):
        torchlns.recover(q, "model.pt", calib)
    assert all(torch.equal(v, _stored(q)[k]) for k, v in before.items())


def test_magnitude_ladder_round_trips_every_code_of_every_format():
    for fmt in [LNSFormat(8, 3), LNSFormat(5, 0), LNSFormat(12, 6), LNSFormat(16, 10), FP8_E4M3,
                torchlns.FP8_E5M2, INT8, torchlns.IntFormat(4)]:
        bits = fmt.bits
        codes = torch.arange(1 << bits, dtype=torch.int32)
        if isinstance(fmt, torchlns.IntFormat):
            codes = torch.arange(-fmt.qmax, fmt.qmax + 1, dtype=torch.int32)
        elif bits == 16:
            codes = torch.where(codes >= 1 << 15, codes - (1 << 16), codes)
        codes = codes.to(fmt.code_dtype)
        negative, index = fmt.magnitude(codes)
        back = fmt.from_magnitude(negative, index)
        value = torchlns.decode(codes, fmt, 0 if isinstance(fmt, LNSFormat) and bits < 16 else
                                (-30000 if isinstance(fmt, LNSFormat) else 1.0))
        finite = torch.isfinite(value) & (index > 0)
        assert torch.equal(back[finite], codes[finite]), fmt
        assert (index <= fmt.max_index).all(), fmt


# ----------------------------------------------------------------------------------------
# error_split (see Note: error split in transforms/recover.py)
# ----------------------------------------------------------------------------------------
def test_error_split_runs_each_row_as_its_definition(trained):
    """One linear layer: each row's outputs are F.linear of the operands the row quantizes."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 10).eval()
    x = [torch.randn(16, 24) * 3 for _ in range(2)]
    q = _convert(lin, x, mac=CHIP_MAC)
    layer = q
    w_q, b = layer.weight.dequantize(), layer.bias.detach()
    split = torchlns.error_split(q, lin, x)
    assert [r["model"] for r in split.rows] == ["weights only", "activations only", "weights and activations", "chip"]

    def sqnr(fn):
        yf = torch.cat([lin(t) for t in x]).double()
        y = torch.cat([fn(t) for t in x]).double()
        return (10 * torch.log10(yf.pow(2).sum() / (y - yf).pow(2).sum())).item()

    def act(t):  # the input as the chip encodes it
        return torchlns.decode(torchlns.encode(t, layer.fmt, layer.input_param), layer.fmt, layer.input_param)
    with torch.no_grad():
        assert split["weights only"]["sqnr"] == pytest.approx(sqnr(lambda t: F.linear(t, w_q, b)), abs=1e-6)
        assert split["activations only"]["sqnr"] == pytest.approx(sqnr(lambda t: lin(act(t))), abs=1e-6)
        assert split["weights and activations"]["sqnr"] == pytest.approx(
            sqnr(lambda t: F.linear(act(t), w_q, b)), abs=1e-6)
        assert split["chip"]["sqnr"] == pytest.approx(sqnr(q), abs=1e-6)


def test_error_split_of_exact_operands_is_error_free():
    """Powers of two are exact in LNS8: weights that are have no weights-only error, inputs that are none
    on the activations side."""
    lin = nn.Linear(8, 4, bias=False).eval()
    with torch.no_grad():
        lin.weight.copy_(torch.exp2(torch.randint(-4, 3, (4, 8)).float()) * torch.randn(4, 8).sign())
    grid = [torch.exp2(torch.randint(-6, 4, (5, 8)).float())]
    q = _convert(lin, grid)
    split = torchlns.error_split(q, lin, grid)
    assert split["weights only"]["sqnr"] == float("inf") and split["activations only"]["sqnr"] == float("inf")
    off_grid = [torch.rand(5, 8) + 0.1]
    split = torchlns.error_split(q, lin, off_grid)
    assert split["weights only"]["sqnr"] == float("inf") and split["activations only"]["sqnr"] < 60
    assert "activations only" in str(split)


def test_error_split_on_a_network_leaves_the_model_alone_and_refuses_bad_input(trained):
    model, calib, held = trained
    q = _convert(model, calib, mac=CHIP_MAC)
    q.train()
    before = _stored(q)
    split = torchlns.error_split(q, model, held)
    assert q.training and all(torch.equal(v, _stored(q)[k]) for k, v in before.items())
    rows = {r["model"]: r for r in split.rows}
    assert all(0 < r["sqnr"] < 80 and 0 <= r["agreement"] <= 1 for r in split.rows), split.rows
    x = torch.cat(held) if isinstance(held, list) else held
    assert rows["chip"]["sqnr"] == pytest.approx(_fidelity(copy.deepcopy(q).eval(), model, x)[0], abs=1e-3)
    with pytest.raises(ValueError, match="calibration data is empty"):
        torchlns.error_split(q, model, [])
    with pytest.raises(ValueError, match="not the model qmodel came from"):
        torchlns.error_split(q, nn.Sequential(nn.Linear(3, 3)), held)
