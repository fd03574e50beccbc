"""The main job (`python -m torchlns demo`) in a small setting: the table, the PNG, the report."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchlns.apps import demo

ROOT = Path(__file__).resolve().parents[2]
ROWS = ["float32", "LNS8 ideal", "LNS8 chip", "FP8 e4m3", "FP8 e5m2", "INT8", "LNS8 + cluster C=4"]
SMALL = ["--size", "32", "64", "--n-train", "64", "--n-eval", "8", "--train-steps", "15", "--finetune-steps", "3",
         "--clusters", "4", "--net-width", "8"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "torchlns", "demo", "--out", str(out), *SMALL], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def _table(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (.+?) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d,]+) \| ([\d.]+)x \|", line)
        if m:
            rows[m.group(1)] = [float(v.replace(",", "")) for v in m.groups()[1:]]
    return rows


def test_demo_prints_a_row_per_format(demo_run):
    out, stdout = demo_run
    rows = _table(stdout)
    assert list(rows) == ROWS
    for name, (miou, acc, agree, size, ratio) in rows.items():
        assert 0 <= miou <= 100 and 0 <= acc <= 100 and 0 <= agree <= 100
        assert size > 0 and ratio > 0
    assert rows["float32"][2] == 100 and rows["float32"][4] == 1.0
    # Eight-bit codes are a quarter of float32, plus offsets, scales and biases.
    for name in ("LNS8 ideal", "LNS8 chip", "FP8 e4m3", "INT8"):
        assert 3.5 < rows[name][4] < 4.01
    assert rows["LNS8 + cluster C=4"][4] > rows["LNS8 ideal"][4]
    assert "target" in stdout  # the fidelity targets are reported, met or missed by how much


def test_demo_writes_the_difference_map_and_the_report(demo_run):
    from PIL import Image

    out, stdout = demo_run
    img = Image.open(out / "difference_map.png")
    assert img.width > img.height > 100
    report = (out / "report.md").read_text()
    assert _table(report) == _table(stdout)
    assert "difference_map.png" in report and "Targets" in report
    # the cost table: one row per model, the float one BN-folded, plus the chip-MAC clustered one
    costs = re.findall(r"^\| (.+?) \| ([\d,]+) \| (all|\d+%) \| ([\d,]+) \| ([\d.]+) \| ([\d.]+) \|", report, re.M)
    names = [c[0] for c in costs]
    assert names == ["float32 (BN folded)", *ROWS[1:], "LNS8 chip + cluster C=4 (cost only)"]
    assert len({c[4] for c in costs}) == 1  # the same MACs in every format
    pj = {c[0]: float(c[5]) for c in costs}
    assert pj["float32 (BN folded)"] == 4.6 and pj["LNS8 chip"] == 0.38 and pj["INT8"] == 0.3
    assert "Horowitz" in report and "cost of one" in stdout
    assert (out / "segnet_float.pt").is_file()


def test_demo_reuses_the_trained_model(demo_run, capsys):
    out, _ = demo_run
    cfg = demo.DemoConfig(out=out, height=32, width=64, n_train=64, n_eval=8, train_steps=15, net_width=8)
    train_ds, _ = demo.scene_data(cfg)
    demo.float_model(cfg, train_ds, log=print)
    assert "loaded the trained float model" in capsys.readouterr().out


def test_shipped_weights_match_the_default_settings_and_score(tmp_path, capsys):
    """The demo's trained float SegNet ships in the package (see Note: shipped weights): its key
    must still match the default settings and the scene generator, or a fresh clone would train
    for minutes; and it must be the trained model, not a stale one."""
    cfg = demo.DemoConfig(out=tmp_path)
    train_ds, eval_ds = demo.scene_data(cfg)
    model = demo.float_model(cfg, train_ds, log=print)
    assert "shipped with torchlns" in capsys.readouterr().out
    cm, _ = demo.evaluate(model, eval_ds, cfg.batch_size, "cpu")
    assert cm.mean_iou() > 0.98
    assert not (tmp_path / "segnet_float.pt").exists()  # nothing trained, nothing written
    saved = torch.load(demo.WEIGHTS / "segnet_float.pt", weights_only=True)
    key = dict(saved["key"])
    assert demo._same_key(key, {**key, "data": key["data"] * (1 + 1e-7)})
    assert not demo._same_key(key, {**key, "data": key["data"] * 1.001})  # other scenes: train
    assert not demo._same_key(key, {**key, "steps": key["steps"] + 1})


def test_target_lines_say_by_how_much():
    rows = [demo.Row("float32", 0.90, 0.95, 1.0, 400.0, 1.0, 0),
            demo.Row("LNS8 ideal", 0.892, 0.95, 0.99, 100.0, 4.0, 0),
            demo.Row("LNS8 chip", 0.895, 0.95, 0.99, 100.0, 4.0, 0),
            demo.Row("LNS8 + cluster C=16", 0.87, 0.9, 0.9, 20.0, 18.0, 0)]
    lines = demo.target_lines(rows)
    assert "missed by 0.30 points" in lines[0]
    assert "met" in lines[1]
    assert "missed by 2.00 points" in lines[2] and "missed by 2.0x" in lines[2]


def test_difference_map_counts_legend_and_legible_text(tmp_path):
    from PIL import Image

    from torchlns.apps import demo
    from torchlns.apps.scenes import CLASSES, SceneDataset

    ds = SceneDataset(3, 32, 64, seed=1)
    fp = ds.labels.clone()
    fp[fp == 255] = 0
    cp = fp.clone()
    cp[0, 5, 7] = (cp[0, 5, 7] + 1) % len(CLASSES)  # one pixel: still visible, still counted
    cp[1, 10:12, 20:30] = (cp[1, 10:12, 20:30] + 1) % len(CLASSES)
    counts = demo._write_figure(tmp_path / "map.png", ds, fp, cp, "LNS8 chip", n=3)
    valid = [(ds.labels[i] != 255).sum().item() for i in range(3)]
    assert [c[0][0] for c in counts] == [1, 20, 0]  # per panel, exact
    assert counts[1][0][1] == pytest.approx(20 / valid[1])
    img = Image.open(tmp_path / "map.png").convert("RGB")
    rows = 3 * (32 * 3) + 3 * (demo.FIGURE_FONT_PX + 6)
    assert img.height > rows + demo.FIGURE_FONT_PX  # title strip and legend strip beyond the panels
    assert demo._font(demo.FIGURE_FONT_PX).getbbox("Ag")[3] >= 12  # not PIL's 11-px bitmap default
    px = img.load()
    reds = sum(1 for x in range(img.width) for y in range(img.height) if px[x, y] == (235, 20, 20))
    assert reds >= 9 * 3 * 3 * 2  # the lone pixel is drawn 3x3, at scale 3, in two panels
