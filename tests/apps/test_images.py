"""Image files as DATA on the command line (see Note: image data on the command line in
torchlns/apps/images.py), and models from ``--model-factory``: real JPEG and PNG files made
here, grayscale and RGBA, a corrupt one, an empty folder."""

from __future__ import annotations

import re
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from torchlns.__main__ import main
from torchlns.apps.cli import DataError, load_data
from torchlns.apps.images import ImageDataError, load_images, normalize

HELPER = "torchlns_images_helper"
HELPER_SOURCE = textwrap.dedent('''
    import torch
    import torch.nn as nn


    class Classifier(nn.Module):
        """Conv + BN + ReLU, global average, linear: (N, classes) logits."""

        def __init__(self, classes=6, width=8):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


    def pretrained(classes=6, width=8):
        return Classifier(classes, width).eval()


    def broken(**kw):
        raise RuntimeError("weights not found")


    def not_a_model():
        return 42
''')


def _save(path: Path, mode: str, size, colour, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, fmt)
    return path


@pytest.fixture()
def helper(tmp_path, monkeypatch):
    (tmp_path / f"{HELPER}.py").write_text(HELPER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield __import__(HELPER)
    sys.modules.pop(HELPER, None)


@pytest.fixture()
def folders(tmp_path):
    """A class-folder tree (numbered classes) and a flat folder, in JPEG/PNG, RGB/grayscale/RGBA."""
    tree = tmp_path / "labelled"
    g = torch.Generator().manual_seed(0)
    for cls in ("2-cat", "5-dog"):
        for i in range(4):
            colour = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
            _save(tree / cls / f"rgb{i}.jpg", "RGB", (40 + 8 * i, 30), colour)
        _save(tree / cls / "gray.png", "L", (32, 48), 200)
        _save(tree / cls / "alpha.png", "RGBA", (36, 36), (10, 20, 30, 128))
    flat = tmp_path / "flat"
    for i in range(3):
        _save(flat / f"p{i}.png", "RGB", (20, 20), (i * 60, 0, 0))
    return tree, flat


def test_a_class_folder_tree_reads_as_labelled_images(folders):
    tree, _ = folders
    s = load_images(str(tree), 16, "none", progress=False)
    assert s.inputs.shape == (12, 3, 16, 16) and s.inputs.dtype == torch.float32
    assert s.targets.tolist() == [2] * 6 + [5] * 6  # numbered folders name their class index
    assert s.classes == ["2-cat", "5-dog"] and s.class_name(5) == "5-dog" and s.class_name(0) is None
    gray = s.inputs[s.paths.index(tree / "2-cat" / "gray.png")]
    assert torch.allclose(gray, torch.full_like(gray, 200 / 255))  # grayscale replicated to RGB
    alpha = s.inputs[s.paths.index(tree / "2-cat" / "alpha.png")]
    assert torch.allclose(alpha[:, 0, 0], torch.tensor([10, 20, 30]) / 255)  # alpha dropped
    for p in tree.glob("*"):  # unnumbered folders: sorted order, as torchvision's ImageFolder
        p.rename(p.with_name(p.name.split("-")[1]))
    assert load_images(str(tree), 16, progress=False).targets.tolist() == [0] * 6 + [1] * 6


def test_normalisation_presets_and_resizing(tmp_path):
    img = _save(tmp_path / "wide.png", "RGB", (60, 30), (255, 127, 0))
    x = load_images(str(img), 10, "tf", progress=False).inputs
    assert x.shape == (1, 3, 10, 10)  # the shorter side to 10, the centre 10x10
    assert torch.allclose(x[0, :, 5, 5], torch.tensor([1.0, 0.0, -127 / 128]))
    y = load_images(str(img), 10, "imagenet", progress=False).inputs[0, :, 5, 5]
    want = (torch.tensor([1.0, 127 / 255, 0.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225])
    assert torch.allclose(y, want, atol=1e-6)
    u8 = torch.tensor([[[[0, 255]]] * 3], dtype=torch.uint8)
    assert normalize(u8, "none").tolist() == [[[[0.0, 1.0]]] * 3]
    with pytest.raises(ValueError, match="normalisation"):
        normalize(u8, "zscore")


def test_globs_and_flat_folders(folders, tmp_path):
    tree, flat = folders
    assert load_images(str(flat), 8, progress=False).targets is None
    (flat / "notes.txt").write_text("not an image")
    (flat / ".DS_Store").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"left out 1 file\(s\) that are not images .*notes\.txt"):
        assert len(load_images(str(flat), 8, progress=False).paths) == 3
    s = load_images(str(tree / "*" / "*.jpg"), 8, progress=False)
    assert len(s.paths) == 8 and all(p.suffix == ".jpg" for p in s.paths)
    assert load_data(str(tree / "**" / "*.png")).inputs.shape == (4, 3, 224, 224)


def test_bad_image_data_is_named_in_one_line(folders, tmp_path):
    tree, flat = folders
    bad = flat / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageDataError, match=r"cannot read image .*broken\.jpg.*--skip-bad"):
        load_images(str(flat), 8, progress=False)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) of 4: .*broken\.jpg"):
        s = load_images(str(flat), 8, skip_bad=True, progress=False)
    assert len(s.paths) == 3 and [p.name for p, _ in s.skipped] == ["broken.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageDataError, match="holds no images"):
        load_images(str(empty), progress=False)
    with pytest.raises(ImageDataError, match="matches no image files"):
        load_images(str(tmp_path / "*.webp"), progress=False)
    _save(tree / "stray.png", "RGB", (8, 8), (0, 0, 0))
    with pytest.raises(ImageDataError, match="both images and class folders"):
        load_images(str(tree), progress=False)
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageDataError, match="none of its 1 image"):
            load_images(str(only_bad), skip_bad=True, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        load_data(str(tmp_path / "missing.png"))


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err, *needles):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("torchlns: error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_convert_and_compare_a_factory_model_on_a_labelled_folder(helper, folders, tmp_path, capsys):
    tree, flat = folders
    q = tmp_path / "q.pt"
    rc, out, err = _cli(capsys, "convert", "--model-factory", f"{HELPER}:pretrained", "--factory-arg", "classes=6",
                        "--factory-arg", "width=8", "--calib", flat, "--image-size", "24", "--normalize", "tf",
                        "-o", q, "--format", "lns8-chip")
    assert rc == 0, err
    assert f"converted --model-factory {HELPER}:pretrained (Classifier)" in out
    sheet = tmp_path / "sheet.png"
    rc, out, err = _cli(capsys, "compare", q, "--model-factory", f"{HELPER}:pretrained", "--factory-arg",
                        "classes=6", "--data", tree, "--image-size", "24", "--normalize", "tf", "--trust-pickle",
                        "--sheet", sheet, "--sheet-count", "4")
    assert rc == 0, err
    got = dict(re.findall(r"^(.*?): (-?[\d.]+(?:e-?\d+)?|inf)", out, re.M))
    for key in ("top-1 accuracy (float)", "top-1 accuracy (converted)", "top-5 accuracy (float)",
                "top-5 accuracy (converted)", "prediction agreement", "KL(float || converted)", "output SQNR"):
        assert key in got, out
    # The same numbers by hand, from the same images.
    data = load_images(str(tree), 24, "tf", progress=False)
    ref = helper.pretrained(6)(data.inputs).detach()
    conv = torch.load(q, weights_only=False).eval()
    with torch.no_grad():
        y = conv(data.inputs)
    top5 = (ref.topk(5, 1).indices == data.targets[:, None]).any(1).double().mean().item()
    assert float(got["top-5 accuracy (float)"]) == pytest.approx(top5, abs=1e-6)
    kl = torch.nn.functional.kl_div(y.double().log_softmax(1), ref.double().log_softmax(1), log_target=True,
                                    reduction="none").sum(1).mean().item()
    assert float(got["KL(float || converted)"]) == pytest.approx(kl, rel=1e-4, abs=1e-9)
    with Image.open(sheet) as im:
        assert im.format == "PNG" and im.size[0] == 4 * 168  # four thumbnails in a row
    assert f"wrote {sheet}" in out
    rc, out, _ = _cli(capsys, "compare", q, "--model-factory", f"{HELPER}:pretrained", "--data", tree,
                      "--image-size", "24", "--trust-pickle", "--sheet", "")
    assert rc == 0 and "wrote" not in out


def test_factory_and_image_errors_are_one_line(helper, folders, tmp_path, capsys):
    tree, flat = folders
    (flat / "broken.png").write_bytes(b"\x89PNG broken")
    q = tmp_path / "q.pt"
    cases = [
        (("convert", "--model-factory", f"{HELPER}:broken", "--calib", flat, "-o", q),
         ("--model-factory", "weights not found")),
        (("convert", "--model-factory", f"{HELPER}:not_a_model", "--calib", flat, "-o", q), ("not an nn.Module",)),
        (("convert", "--model-factory", f"{HELPER}:nope", "--calib", flat, "-o", q), ("has no attribute",)),
        (("convert", "--model-factory", f"{HELPER}:pretrained", "--factory-arg", "classes", "--calib", flat,
          "-o", q), ("name=value",)),
        (("convert", "--model-factory", f"{HELPER}:pretrained", "--model-class", f"{HELPER}:pretrained", "--calib",
          flat, "-o", q), ("give one",)),
        (("convert", "--calib", flat, "-o", q), ("--model-factory",)),
        (("convert", "--model-factory", f"{HELPER}:pretrained", "--calib", flat, "-o", q), ("broken.png",
                                                                                             "--skip-bad")),
        (("convert", "--model-factory", f"{HELPER}:pretrained", "--calib", tmp_path / "nothing", "-o", q),
         ("not found",)),
    ]
    for argv, needles in cases:
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2, (argv, err)
        _one_line(err, *needles)
    rc, out, err = _cli(capsys, "convert", "--model-factory", f"{HELPER}:pretrained", "--calib", flat, "--skip-bad",
                        "--image-size", "16", "-o", q)
    assert rc == 0 and "skipped 1 unreadable image(s) of 4" in err, err


def test_recover_command_takes_a_factory_and_an_image_folder(helper, folders, tmp_path, capsys):
    tree, flat = folders
    q, r = tmp_path / "q.pt", tmp_path / "r.pt"
    common = ("--model-factory", f"{HELPER}:pretrained", "--image-size", "24")
    assert _cli(capsys, "convert", *common, "--calib", flat, "-o", q, "--format", "lns8-chip")[0] == 0
    rc, out, err = _cli(capsys, "recover", q, *common, "--calib", tree, "--trust-pickle", "-o", r,
                        "--methods", "bias,rounding", "--rounding-iterations", "5")
    assert rc == 0, err
    assert "recovered" in out and "bias" in out and "rounding" in out and r.is_file()
    assert r.with_suffix(".state_dict.pt").is_file()
    recovered = torch.load(r, weights_only=False)
    assert type(recovered).__name__ == "Classifier"
    rc, _, err = _cli(capsys, "recover", q, *common, "--calib", tree, "--trust-pickle", "-o", r, "--methods", "magic")
    assert rc == 2
    _one_line(err, "--methods")
    rc, _, err = _cli(capsys, "recover", q, "--model-factory", f"{HELPER}:pretrained", "--factory-arg", "width=4",
                      "--calib", tree, "--trust-pickle", "-o", r)
    assert rc == 2
    _one_line(err, "not the model qmodel came from")


def test_telemetry_command(helper, folders, tmp_path, capsys):
    import json

    tree, flat = folders
    q, png = tmp_path / "q.pt", tmp_path / "t.png"
    common = ("--model-factory", f"{HELPER}:pretrained", "--image-size", "24")
    assert _cli(capsys, "convert", *common, "--calib", flat, "-o", q, "--format", "lns8-chip")[0] == 0
    rc, out, err = _cli(capsys, "telemetry", q, *common, "--data", tree, "--trust-pickle", "--png", png)
    assert rc == 0, err
    assert "prod trunc" in out and "headroom" in out and re.search(r"^conv\s", out, re.M) and png.is_file()
    rc, out, err = _cli(capsys, "telemetry", q, *common, "--data", tree, "--trust-pickle", "--png", "", "--json")
    rows = json.loads(out)["layers"]
    assert [r["layer"] for r in rows] == ["conv", "fc", "total"] and rows[0]["totals"] > 0
    rc, _, err = _cli(capsys, "telemetry", *common, "--data", tree)
    assert rc == 2
    _one_line(err, "CONVERTED_MODEL")


def test_explore_command_on_your_own_model(helper, folders, tmp_path, capsys):
    import json

    tree, flat = folders
    common = ("--model-factory", f"{HELPER}:pretrained", "--image-size", "24")
    out = tmp_path / "ex"
    rc, stdout, err = _cli(capsys, "explore", *common, "--calib", flat, "--data", tree, "--samples", "2",
                           "--workers", "1", "--bits", "6,8", "-o", out)
    assert rc == 0, err
    assert "top-1" in stdout and "(chip preset)" in stdout  # class folders: the score is top-1
    rows = json.loads((out / "explore.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["task"] is not None for r in rows)
    rc, _, err = _cli(capsys, "explore", *common, "--calib", flat, "-o", out)
    assert rc == 2
    _one_line(err, "--data")


def test_real_net_writes_its_photos_as_an_image_folder(tmp_path):
    """``torchlns real-net --write-images``: the bundled photos' crops, calibration flat and
    evaluation in ImageNet-indexed class folders, readable as labelled image DATA."""
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    from torchlns.apps import realnet

    calib, held = realnet.write_images(tmp_path, 1, 16)
    assert calib == len(realnet.CALIBRATION) and held == len(realnet.LABELS)
    s = load_images(str(tmp_path / "eval"), 16, "tf", progress=False)
    assert len(s.paths) == held and set(s.targets.tolist()) == {v[0] for v in realnet.LABELS.values()}
    assert load_images(str(tmp_path / "calib"), 16, "tf", progress=False).targets is None
    # The files hold the crops run() scores, to the rounding of 8-bit pixels.
    x = realnet.crops(realnet.photo("chelsea"), 1, 16, seed=realnet.EVAL.index("chelsea"))
    assert (s.inputs[s.paths.index(tmp_path / "eval" / "281" / "chelsea-00.png")] - x[0]).abs().max() <= 0.5 / 128


def test_every_model_command_takes_a_factory(helper, folders, tmp_path, capsys):
    tree, flat = folders
    factory = ("--model-factory", f"{HELPER}:pretrained", "--factory-arg", "width=4")
    rc, out, err = _cli(capsys, "report", *factory)
    assert rc == 0 and "Classifier" not in err and "fc" in out, err
    rc, out, err = _cli(capsys, "cost", *factory, "--input-shape", "1,3,16,16", "--json")
    assert rc == 0, err
    rc, out, err = _cli(capsys, "cost", *factory, "--compare", "--calib", flat, "--image-size", "16")
    assert rc == 0 and "LNS8" in out, err
    rc, out, err = _cli(capsys, "sensitivity", *factory, "--data", tree, "--image-size", "16", "-k", "1", "--json")
    assert rc == 0 and '"layers"' in out, err
    rc, _, err = _cli(capsys, "export", *factory, "-o", tmp_path / "x.tlns")
    assert rc == 0 and (tmp_path / "x.tlns").stat().st_size > 0, err
    # A state_dict beside the factory is loaded into the factory's model.
    sd = tmp_path / "sd.pt"
    torch.save(helper.pretrained(width=4).state_dict(), sd)
    rc, out, err = _cli(capsys, "report", sd, *factory)
    assert rc == 0, err
    torch.save(helper.pretrained(width=8).state_dict(), sd)
    rc, _, err = _cli(capsys, "report", sd, *factory)
    assert rc == 2
    _one_line(err, "does not fit", "--model-factory")
