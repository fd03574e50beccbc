"""Real networks convert whole: replicas of timm/torchvision block types (tests/replicas.py).

Each replica must fold within float tolerance, run 100% of its MACs on the chip (counted by
torch's FlopCounterMode), and give fixed-accumulator outputs bit-equal to the reference
kernels.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn as nn

import replicas
import torchlns
from torchlns import ConvertConfig, Inputs, MACConfig
from torchlns.ops import reference_kernels

CHIP = MACConfig.chip()


def _item(x):
    return Inputs(*x) if len(x) > 1 else x[0]


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("name", replicas.NAMES)
def test_fold_matches_and_keeps_every_activation(name):
    m, x = replicas.build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchlns.TorchLNSFoldWarning)
        f = torchlns.fold_batchnorm(m)
    with torch.no_grad():
        assert _rel(m(*x), f(*x)) < 1e-5
    kept = [e for e in f.fold_report.entries if not e.folded and "GroupNorm" not in e.reason]
    assert not kept, kept
    bns = [n for n, mod in f.named_modules() if isinstance(mod, (nn.modules.batchnorm._BatchNorm,
                                                                 replicas.FrozenBatchNorm2d))]
    assert not bns  # every BN, BN-act, frozen BN and siamese pair folded


def test_bn_act_in_untraceable_sequential_keeps_its_activation():
    m, x = replicas.build("untraceable_bnact")
    with pytest.warns(torchlns.TorchLNSFoldWarning):
        f = torchlns.fold_batchnorm(m)
    assert isinstance(f.features[1].act, nn.ReLU) and isinstance(f.features[3].act, nn.SiLU)
    with torch.no_grad():
        y = f.features[:2](x[0])
        assert y.min() >= 0  # the ReLU is still there
        assert _rel(m(*x), f(*x)) < 1e-5


class _Mystery(nn.BatchNorm2d):
    """A BN subclass whose extra computation cannot be separated from the normalisation."""

    def forward(self, x):
        return super().forward(x) * 2 + x.mean()


class _MysteryNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), _Mystery(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class _MysteryUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), _Mystery(4))

    def forward(self, x):
        if x.sum() > 0:
            x = x + 0
        return self.seq(x)


@pytest.mark.parametrize("cls", [_MysteryNet, _MysteryUntraceable], ids=["traced", "sequential fallback"])
def test_no_fold_path_drops_computation(cls):
    m = replicas.randomise_bn(cls())
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchlns.TorchLNSFoldWarning)
        f = torchlns.fold_batchnorm(m)
    assert not f.fold_report.folded
    assert "_Mystery" in f.fold_report.entries[0].reason
    with torch.no_grad():
        assert torch.equal(m(x), f(x))


def test_weight_standardising_conv_is_not_folded_into():
    m = replicas.randomise_bn(nn.Sequential(replicas.StdConv2d(3, 4, 3), nn.BatchNorm2d(4)))
    f = torchlns.fold_batchnorm(m)
    assert not f.fold_report.folded and "not linear in its weight" in f.fold_report.entries[0].reason


def test_frozen_bn_and_siamese_pairs_are_folded_and_reported():
    m, x = replicas.build("stereo")
    f = torchlns.fold_batchnorm(m)
    assert {"features.1", "features.4"} <= {e.bn for e in f.fold_report.folded}  # called twice, always together
    m, x = replicas.build("detectorish")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchlns.TorchLNSFoldWarning)
        f = torchlns.fold_batchnorm(m)
    assert {"backbone.1", "backbone.4"} <= {e.bn for e in f.fold_report.folded}
    assert any(e.bn == "head.cls.1" and "GroupNorm" in e.reason for e in f.fold_report.skipped)


@pytest.mark.parametrize("name", replicas.NAMES)
def test_replicas_run_every_mac_on_the_chip_bit_equal(name):
    m, x = replicas.build(name)
    item = _item(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchlns.TorchLNSFoldWarning)
        q = torchlns.convert(m, ConvertConfig(mac=CHIP), [item, item])
    report = q.conversion_report
    assert report.total_macs > 0
    assert report.chip_macs == report.total_macs, str(report)
    assert report.coverage == 1.0
    with torch.no_grad():
        y = q(*x)
        with reference_kernels():
            y_ref = q(*x)
        assert torch.equal(y.view(torch.int32), y_ref.view(torch.int32))  # fixed accumulator: bit-equal
        sqnr = torchlns.metrics.sqnr(y, m(*x))
    assert sqnr > 18, sqnr


def test_subclasses_convert_or_are_reported():
    m, x = replicas.build("efficientnet_liteish")
    m.conv_stem = replicas.StdConv2d(3, 8, 3, stride=2, bias=False)  # standardises its weight: not a plain conv
    q = torchlns.convert(m, ConvertConfig(), [x[0]])
    assert type(q.classifier).__name__ == "LNSLinear"  # timm's Linear: the same forward as nn.Linear
    rows = {r["layer"]: r for r in q.conversion_report.float_layers}
    assert "conv_stem" in rows and rows["conv_stem"]["macs"] > 0
    assert "register_swap(StdConv2d)" in rows["conv_stem"]["reason"]
    assert "conv_stem" in str(q.conversion_report)
    assert q.conversion_report.coverage < 1


def test_attention_is_reported_with_its_macs():
    class Att(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.mha = nn.Linear(8, 8), nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            x = self.proj(x)
            return self.mha(x, x, x)[0]

    q = torchlns.convert(Att().eval(), ConvertConfig(), [torch.randn(2, 5, 8)])
    rows = {r["layer"]: r for r in q.conversion_report.float_layers}
    assert rows["mha"]["macs"] == 2 * (2 * 5 * 64 + 5 * 16 * 8 + 2 * 25 * 8)
    assert "attention" in rows["mha"]["reason"]
    assert [r["layer"] for r in q.conversion_report] == ["proj"]


def test_multi_input_calibration_items():
    m, (left, right) = replicas.build("stereo")
    a = torchlns.convert(m, ConvertConfig(mac=CHIP), [Inputs(left, right)])
    b = torchlns.convert(m, ConvertConfig(mac=CHIP), [{"left": left, "right": right}])
    c = torchlns.convert(m, ConvertConfig(mac=CHIP), [(left, right)], forward_fn=lambda model, it: model(*it))
    with torch.no_grad():
        assert torch.equal(a(left, right), b(left, right)) and torch.equal(a(left, right), c(left, right))
    with pytest.raises(TypeError, match="torchlns.Inputs"):  # a tuple is (input, target): said, not obscure
        torchlns.convert(m, ConvertConfig(mac=CHIP), [(left, right)])


def test_list_of_images_for_a_detector():
    m, (images,) = replicas.build("detectorish")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchlns.TorchLNSFoldWarning)
        q = torchlns.convert(m, ConvertConfig(), [images])  # an item that is a list of images
    assert q.conversion_report.coverage == 1.0
    assert isinstance(q.transform, replicas.Transform) and q.transform.min_size == 32  # copied, never rebuilt


def test_already_clustered_model_is_not_clustered_again():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)).eval()
    clustered = torchlns.cluster_kernels(conv, 4)
    with pytest.warns(UserWarning, match="already clustered"):
        q = torchlns.convert(clustered, ConvertConfig(cluster=torchlns.ClusterConfig(4)), [torch.randn(1, 3, 8, 8)])
    assert q.cluster_report is None


def test_sensitivity_table_data_and_suggestions():
    m, x = replicas.build("decoder")
    data = [x[0], x[0] * 0.5]
    r = torchlns.sensitivity(m, ConvertConfig(mac=CHIP), data, k=2)
    names = [row.layer for row in r.layers]
    assert names == [row["layer"] for row in torchlns.convert(m, ConvertConfig(mac=CHIP), data).conversion_report]
    assert all(row.alone_db > r.full_db - 1e-9 for row in r.layers)  # one layer alone costs less than all
    assert abs(r.layers[-1].cumulative_db - r.full_db) < 1e-9  # every layer on: the full conversion
    assert [len(s.kept) for s in r.suggestions] == [0, 1, 2]
    assert r.suggestions[0].sqnr_db == r.full_db
    worst = r.worst(2)
    assert worst == [row.layer for row in sorted(r.layers, key=lambda row: row.alone_db)[:2]]
    assert r.overrides(1) == {worst[0]: None}
    assert r.suggestions[2].bytes > r.suggestions[0].bytes  # float layers cost bytes
    text = str(r)
    assert "alone dB" in text and worst[0] in text and "overrides" in text
    assert len(r.to_dicts()) == len(r.layers)
    # the suggestion is what the overrides give
    q = torchlns.convert(m, ConvertConfig(mac=CHIP, overrides=r.overrides(2)), data)
    with torch.no_grad():
        ref = torchlns.fold_batchnorm(m)
        num = sum(ref(d).double().pow(2).sum() for d in data)
        den = sum((ref(d).double() - q(d).double()).pow(2).sum() for d in data)
    assert abs(10 * torch.log10(num / den).item() - r.suggestions[2].sqnr_db) < 1e-6


def test_cli_report_and_sensitivity(tmp_path, capsys):
    from torchlns.__main__ import main

    m, x = replicas.build("decoder")
    mpath, dpath, out = tmp_path / "m.pt", tmp_path / "d.pt", tmp_path / "q.pt"
    torch.save(m, mpath)
    torch.save(torch.cat([x[0]] * 2), dpath)
    assert main(["convert", str(mpath), "--calib", str(dpath), "-o", str(out), "--trust-pickle"]) == 0
    assert "100.0%" in capsys.readouterr().out
    assert main(["report", str(out), "--trust-pickle"]) == 0
    assert "of 189.44k MACs (100.0%)" in capsys.readouterr().out  # the first batch: 4 inputs
    assert main(["sensitivity", str(mpath), "--data", str(dpath), "--trust-pickle", "-k", "1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["layers"]) == 6 and len(data["suggestions"]) == 2


def test_cli_multi_input_data(tmp_path, capsys):
    from torchlns.__main__ import main

    m, (left, right) = replicas.build("stereo")
    mpath, dpath, out = tmp_path / "m.pt", tmp_path / "d.pt", tmp_path / "q.pt"
    torch.save(m, mpath)
    torch.save({"inputs": {"left": torch.cat([left] * 2), "right": torch.cat([right] * 2)}}, dpath)
    assert main(["convert", str(mpath), "--calib", str(dpath), "-o", str(out), "--trust-pickle",
                 "--batch-size", "1"]) == 0
    assert "(100.0%)" in capsys.readouterr().out
