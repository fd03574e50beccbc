"""``python -m torchlns bench``: its networks, tables and command line (smoke sizes)."""

import json

import pytest
import torch

import torchlns

from torchlns.__main__ import main
from torchlns.apps import bench
from torchlns.apps.bench_models import NETWORKS, build


@pytest.mark.parametrize("name", list(NETWORKS))
def test_bench_networks_build_and_run_at_any_size(name):
    model = build(name)
    assert not model.training
    with torch.no_grad():
        y = model(torch.rand(2, 3, 64, 64))
    assert y.shape[0] == 2 and torch.isfinite(y).all()


def test_bench_network_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown network"):
        build("alexnet")


def test_cpu_info_names_the_cpu_and_the_kernel_level():
    info = bench.cpu_info()
    assert info["cpu"] and info["isa"] in ("baseline", "avx2", "avx512", "none")
    assert set(info["extensions"]) <= set(bench._EXTENSIONS)


def test_compare_alternates_and_reports_medians():
    calls = []
    tb, tc = bench.compare(lambda: calls.append("b"), lambda: calls.append("c"), repeats=3)
    assert calls == ["b", "c"] * 4 and tb >= 0 and tc >= 0


def test_bench_command_prints_the_network_table(capsys):
    assert main(["bench", "--networks", "segnet", "--batch", "1", "--image", "32", "--repeats", "1",
                 "--no-kernels"]) == 0
    out = capsys.readouterr().out
    assert "CPU:" in out and "segnet batch 1" in out
    for f in bench.FORMATS:
        assert f in out


def test_bench_command_json(capsys):
    assert main(["bench", "--networks", "--repeats", "1", "--json", "--no-kernels"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cpu"]["cpu"] and result["networks"] == []


def test_wide_format_rows_name_the_kernel_and_time_dynamic_activations():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 64, generator=g), torch.randn(32, 64, generator=g) / 8
    xc, wc = torch.randn(1, 8, 10, 10, generator=g).relu(), torch.randn(16, 8, 3, 3, generator=g) / 8
    xd, wd = torch.randn(2, 8, 9, 9, generator=g).clamp(0, 6), torch.randn(8, 1, 3, 3, generator=g)
    rows = bench.wide_format_rows(1, operands=((x, w, -20), (xc, wc, -20), (xd, wd, -20)))
    names = [r.name for r in rows if r.group.endswith("formats")]
    assert len(names) == 3 * 2 * len(bench.WIDE_FORMATS)  # three layers (one depthwise), two MACs
    if torchlns.ops.isa() != "baseline":  # the direct kernels run every wide format, none declines
        assert all("(table)" in n or "(pairs)" in n for n in names), names
    dyn = [r for r in rows if r.group.endswith("activations")]
    assert len(dyn) == 6 and all(r.ratio > 0 for r in dyn)
    assert any(r.group.startswith("depthwise 2x8x9x9") for r in dyn)
