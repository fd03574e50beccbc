"""Mixed precision (Note: mixed-precision search in torchlns/deploy/mixed.py) on a small trained network."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from PIL import Image

import torchlns
from torchlns import CHIP_MAC, INT8, ConvertConfig, LNSFormat
from zoo import trained_digits_net

CANDIDATES = [LNSFormat(6, 2), LNSFormat(8, 3), INT8]
BASE = ConvertConfig(fmt=LNSFormat(6, 2), mac=CHIP_MAC)


@pytest.fixture(scope="module")
def net():
    model, calib, held = trained_digits_net()
    return model, [calib[0][:32]], held


@pytest.fixture(scope="module")
def front(net, tmp_path_factory):
    model, calib, _ = net
    path = tmp_path_factory.mktemp("mixed") / "front.png"
    return torchlns.mixed_precision(model, calib, BASE, candidates=CANDIDATES, points=4, plot=path), path


def _convert(model, cfg, calib):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchlns.convert(model, cfg, calib)


def test_the_front_spans_the_single_formats_and_is_drawn(front):
    result, path = front
    singles = {r["name"]: r for r in result.pareto if r["kind"] == "single"}
    assert set(singles) == {str(c) for c in CANDIDATES}
    mixed = [r for r in result.pareto if r["kind"] == "mixed"]
    assert len(mixed) >= 2
    cheapest = min(singles.values(), key=lambda r: r["bytes"])
    assert mixed[0]["bytes"] == pytest.approx(cheapest["bytes"])  # the walk starts at every layer's cheapest
    assert any(r["front"] for r in mixed) and sum(r["chosen"] for r in result.pareto) == 1
    for r in result.pareto:  # no point on the front is beaten on both cost and fidelity
        if r["front"]:
            assert not any(o["bytes"] < r["bytes"] and o["sqnr"] > r["sqnr"] for o in result.pareto)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 500
    assert "front" in str(result)


@pytest.mark.parametrize("share", [0.5])
def test_a_bytes_budget_is_kept_and_its_overrides_convert_to_it(net, share):
    model, calib, held = net
    sizes = {str(c): torchlns.size_report(_convert(model, dataclasses.replace(BASE, fmt=c), calib)).total_bytes
             for c in CANDIDATES}
    lo, hi = min(sizes.values()), max(sizes.values())
    budget = lo + share * (hi - lo)
    r = torchlns.mixed_precision(model, calib, BASE, candidates=CANDIDATES, budget_bytes=budget, points=3)
    q = _convert(model, ConvertConfig(fmt=BASE.fmt, mac=CHIP_MAC, overrides=r.overrides), calib)
    assert torchlns.size_report(q).total_bytes <= budget + 1e-6
    assert r.config(BASE).overrides == r.overrides
    chosen = next(p for p in r.pareto if p["chosen"])
    cheapest = next(p for p in r.pareto if p["name"] == str(LNSFormat(6, 2)))
    assert chosen["sqnr"] >= cheapest["sqnr"]
    assert set(r.choices) == {f for f, m in q.named_modules() if isinstance(m, torchlns.nn.layers._CodedLayer)}


def test_an_energy_budget(net):
    model, calib, _ = net
    r = torchlns.mixed_precision(model, calib, BASE, candidates=CANDIDATES, budget_energy=1e9, points=2)
    assert r.budget == {"energy": 1e9}
    assert all(p["energy_uj"] > 0 for p in r.pareto)


def test_bad_budgets_and_data_get_one_clear_line(net):
    model, calib, _ = net
    with pytest.raises(ValueError, match="below the smallest the candidates allow"):
        torchlns.mixed_precision(model, calib, BASE, candidates=CANDIDATES, budget_bytes=10)
    with pytest.raises(ValueError, match="one budget"):
        torchlns.mixed_precision(model, calib, BASE, budget_bytes=1e6, budget_energy=1.0)
    with pytest.raises(ValueError, match="positive number"):
        torchlns.mixed_precision(model, calib, BASE, budget_bytes=-1)
    with pytest.raises(ValueError, match="calibration data is empty"):
        torchlns.mixed_precision(model, [], BASE)
    with pytest.raises(ValueError, match="does not run through"):
        torchlns.mixed_precision(model, [torch.randn(2, 3, 8, 8)], BASE, candidates=CANDIDATES)
