"""Every script in examples/ runs to completion in its smoke setting, and the data loaders work."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"

# script -> (extra arguments, a regex its stdout must match)
SMOKE = {
    "encode_layer.py": ([], r"SQNR"),
    "classify_digits.py": (["--smoke"], r"LNS8 chip\s+\d+\.\d+"),
    "segmentation.py": (["--smoke"], r"\| LNS8 \+ cluster C=4 \|"),
    "detection.py": (["--smoke"], r"\| LNS8 \+ cluster C=4 \|"),
    "efficientnet_lite0.py": (["--smoke"], r"\+ distillation\s+agreement"),
}


def _run(cmd, tmp_path, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_example_is_covered():
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(SMOKE) | {"distributed_eval.py"}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_example_runs(script, tmp_path):
    args, expected = SMOKE[script]
    out = _run([sys.executable, str(EXAMPLES / script), *args, *(["--out", str(tmp_path)] if args else [])], tmp_path)
    assert re.search(expected, out), out[-2000:]
    if script == "segmentation.py":
        assert (tmp_path / "difference_map.png").stat().st_size > 1000
    if script == "detection.py":
        assert (tmp_path / "boxes.png").stat().st_size > 1000
        assert "| float32 |" in (tmp_path / "report.md").read_text()
    if script == "classify_digits.py":
        assert (tmp_path / "digits_difference_map.png").stat().st_size > 1000


def test_distributed_evaluation_matches_one_process(tmp_path):
    # Two gloo processes evaluate half the scenes each; the all-reduced confusion matrix must
    # equal the one rank 0 computes alone over the whole set.
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(EXAMPLES / "distributed_eval.py"), "--smoke", "--check", "--out", str(tmp_path)], tmp_path)
    assert "2 processes (gloo)" in out
    assert "matches single-process evaluation: True" in out


def _write_cityscapes(root: pathlib.Path, split: str, n: int, seed: int):
    """A Cityscapes-style folder made from generated scenes, with Cityscapes labelIds."""
    from PIL import Image

    from torchlns.apps.scenes import generate_scenes

    images, labels = generate_scenes(n, 32, 64, seed=seed)
    to_id = torch.tensor([7, 7, 26, 23, 21])  # road, lane mark (road in Cityscapes), car, sky, vegetation
    for i in range(n):
        city = "aachen" if i % 2 else "bremen"
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        stem = f"{city}_{i:06d}_000019"
        img = (images[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        ids = torch.where(labels[i] == 255, 1, to_id[labels[i].clamp(max=4)]).to(torch.uint8).numpy()  # 1 = ego vehicle
        Image.fromarray(img).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return images, labels


def test_cityscapes_folder_loads_and_maps_labels(tmp_path):
    from torchlns.apps.scenes import IGNORE_INDEX, CityscapesFolder

    images, labels = _write_cityscapes(tmp_path, "val", 3, seed=5)
    ds = CityscapesFolder(tmp_path, "val")
    assert len(ds) == 3
    by_name = sorted(range(3), key=lambda i: ("aachen" if i % 2 else "bremen", i))  # the loader sorts by path
    for k, i in enumerate(by_name):
        x, y = ds[k]
        assert x.shape == (3, 32, 64) and y.dtype == torch.long
        assert (x - images[i]).abs().max() <= 0.5 / 255 + 1e-6
        expected = labels[i].clone()
        expected[expected == 1] = 0  # lane marks are road in Cityscapes
        expected[expected == 255] = IGNORE_INDEX
        assert torch.equal(y, expected)
    x, y = CityscapesFolder(tmp_path, "val", size=(16, 32))[0]
    assert x.shape == (3, 16, 32) and y.shape == (16, 32)
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        CityscapesFolder(tmp_path, "train")


def test_segmentation_example_on_a_cityscapes_folder(tmp_path):
    _write_cityscapes(tmp_path / "cs", "train", 16, seed=1)
    _write_cityscapes(tmp_path / "cs", "val", 4, seed=2)
    out = _run([sys.executable, str(EXAMPLES / "segmentation.py"), "--smoke", "--cityscapes", str(tmp_path / "cs"),
                "--out", str(tmp_path / "out")], tmp_path)
    assert "| LNS8 chip |" in out
