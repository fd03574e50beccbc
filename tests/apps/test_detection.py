"""Rendered box scenes, the CenterNet target encoding and decoding, and the detection job in a small setting."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchlns.apps import detection as D
from torchlns.apps.scenes import BOX_CLASSES, Camera, box_corners, generate_box_scenes
from torchlns.metrics import DetectionEval, box_agreement

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def scenes():
    return generate_box_scenes(24, 64, 192, seed=3, stereo=True)


def test_scenes_are_reproducible_and_seeded(scenes):
    again = generate_box_scenes(24, 64, 192, seed=3, stereo=True)
    for name in ("images", "right", "labels", "boxes3d", "boxes2d"):
        assert torch.equal(getattr(scenes, name), getattr(again, name)), name
    assert not torch.equal(generate_box_scenes(24, 64, 192, seed=4).images, scenes.images)
    mono = generate_box_scenes(24, 64, 192, seed=3)
    assert torch.equal(mono.images, scenes.images) and mono.right is None


def test_ground_truth_is_consistent(scenes):
    s = scenes
    present = s.labels >= 0
    assert present.sum() >= 24 and set(s.labels[present].tolist()) == set(range(len(BOX_CLASSES)))
    b = s.boxes3d[present]
    assert ((b[:, 0] >= 7) & (b[:, 0] <= 42)).all()
    assert torch.allclose(b[:, 2], b[:, 5] / 2)  # standing on the ground
    # the projected 3-D centre lies in the image; the 2-D box is the corners' clipped extent
    uv = s.camera.project(b[:, :3])
    assert ((uv[:, 0] > 0) & (uv[:, 0] < 192) & (uv[:, 1] > 0) & (uv[:, 1] < 64)).all()
    corners = s.camera.project(box_corners(b))
    lo, hi = corners.min(1).values, corners.max(1).values
    want = torch.cat([lo.clamp(min=0), hi.clamp(min=0)], 1).minimum(torch.tensor([192.0, 64, 192, 64]))
    assert torch.allclose(s.boxes2d[present], want, atol=1e-4)
    assert (s.boxes2d[~present] == 0).all() and (s.boxes3d[~present] == 0).all()
    # no two objects of a scene overlap in the bird's-eye view
    from torchlns.metrics import bev_iou
    for i in range(len(s)):
        t = s.target(i)
        iou = bev_iou(t["boxes3d"], t["boxes3d"])
        assert torch.equal(iou > 0, torch.eye(len(iou), dtype=torch.bool))


def test_every_ground_truth_object_is_visible(scenes):
    from torchlns.apps.scenes import _trace

    s = scenes
    hits = _trace(s.camera, 64, 192, s.labels, s.boxes3d, right=False)
    for i in range(len(s)):
        for k in (s.labels[i] >= 0).nonzero()[:, 0].tolist():
            visible = int((hits["index"][i] == k).sum())
            assert visible >= 12 and visible >= 0.3 * int(hits["own"][i, k])


def test_camera_round_trip_and_stereo_geometry():
    cam = Camera.for_image(80, 256)
    pts = torch.tensor([[10.0, 2.0, 0.5], [30.0, -4.0, 1.7]])
    uv = cam.project(pts)
    assert torch.allclose(cam.backproject(uv, pts[:, 0]), pts, atol=1e-5)
    # disparity: fx * baseline / depth, the right view further left
    disparity = uv[:, 0] - cam.project(pts, right=True)[:, 0]
    assert torch.allclose(disparity, cam.fx * cam.baseline / pts[:, 0], atol=1e-4)
    assert abs(cam.cy - 32) < 1e-9 and abs(cam.fx - 128 / math.tan(math.radians(36))) < 1e-9
    # a zero baseline renders the right view pixel for pixel like the left (the noise aside)
    flat = Camera(cam.fx, cam.fy, cam.cx, cam.cy, baseline=0.0)
    s = generate_box_scenes(4, 80, 256, seed=1, stereo=True, camera=flat)
    assert (s.images - s.right).abs().max() < 0.3 and (s.images - s.right).abs().mean() < 0.05


def _perfect_output(s):
    """The detector output a perfect model would give: logits of the target heatmaps, the targets."""
    t = D.encode_targets(s.labels, s.boxes3d, s.boxes2d, s.camera, s.images.shape[-2:])
    c = len(BOX_CLASSES)
    heat = t[:, :c].clamp(1e-6, 1 - 1e-6)
    return torch.cat([heat.log() - (1 - heat).log(), t[:, c:c + D.REG]], 1)


def test_targets_decode_back_to_the_ground_truth(scenes):
    s = scenes
    dets = D.decode(_perfect_output(s), s.camera)
    ev = DetectionEval(len(BOX_CLASSES)).update(dets, s.targets())
    for kind, t in (("2d", 0.9), ("bev", 0.9), ("3d", 0.9)):
        assert ev.average_precision(kind, t) == pytest.approx(1.0, abs=0.02), kind
    e = ev.errors()
    assert e["depth"] < 1e-3 and e["size"] < 1e-3 and e["yaw"] < 1e-3


def test_a_peak_one_cell_off_decodes_the_same_box(scenes):
    s = scenes
    out = _perfect_output(s)
    c = len(BOX_CLASSES)
    base = D.decode(out, s.camera, min_score=0.99)
    shifted = out.clone()
    shifted[:, :c] = torch.roll(out[:, :c], 1, dims=3)  # every peak one cell to the right
    moved = D.decode(shifted, s.camera, min_score=0.99)
    assert box_agreement(base, moved, threshold=0.9, min_score=0.99) > 0.9


def test_model_shapes_and_loss():
    m = D.CenterNet(width=4)
    x = torch.rand(2, 3, 64, 192)
    out = m(x)
    assert out.shape == (2, len(BOX_CLASSES) + D.REG, 16, 48)
    s = generate_box_scenes(2, 64, 192, seed=0)
    target = D.encode_targets(s.labels, s.boxes3d, s.boxes2d, s.camera, (64, 192))
    loss = D.detection_loss(out, target)
    loss.backward()
    assert loss.item() > 0 and m.stem[0][0].weight.grad is not None


SMALL = ["--size", "48", "128", "--n-train", "32", "--n-eval", "8", "--train-steps", "6", "--finetune-steps", "2",
         "--clusters", "4", "--net-width", "4"]
ROWS = ["float32", "LNS8 ideal", "LNS8 chip", "LNS8 chip, edges LNS12", "FP8 e4m3", "INT8", "LNS8 + cluster C=4"]


def _table(text: str) -> dict:
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (.+?) \|" + r" (nan|[\d.]+) \|" * 7 + r" ([\d,]+) \| ([\d.]+)x \|", line)
        if m:
            rows[m.group(1)] = [float(v.replace(",", "")) for v in m.groups()[1:]]
    return rows


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    proc = subprocess.run([sys.executable, "-m", "torchlns", "detect-demo", "--out", str(out), *SMALL], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_detect_demo_prints_a_row_per_format(demo_run):
    out, stdout = demo_run
    rows = _table(stdout)
    assert list(rows) == ROWS, stdout[-2000:]
    f = rows["float32"]
    # float32 agrees with itself (NaN: this tiny model has no confident detection)
    assert (f[4] == 100 or math.isnan(f[4])) and f[-1] == 1.0
    for name in ("LNS8 ideal", "LNS8 chip", "FP8 e4m3", "INT8"):
        assert 3.5 < rows[name][-1] < 4.01
    assert rows["LNS8 + cluster C=4"][-1] > rows["LNS8 ideal"][-1]
    assert "target" in stdout


def test_detect_demo_writes_the_picture_and_the_report(demo_run):
    from PIL import Image

    out, stdout = demo_run
    img = Image.open(out / "boxes.png")
    assert img.width > 300 and img.height > 300
    report = (out / "report.md").read_text()
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(ROWS) and all(line in report.splitlines() for line in lines)
    assert "boxes.png" in report and "Targets" in report
    assert (out / "centernet_float.pt").is_file()


def test_stereo_detect_demo_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torchlns", "detect-demo", "--stereo", "--out", str(tmp_path), *SMALL],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(_table(proc.stdout)) == ROWS
    assert (tmp_path / "stereo_centernet_float.pt").is_file() and (tmp_path / "boxes.png").is_file()
    assert "Stereo CenterNet" in (tmp_path / "report.md").read_text()


def test_detect_demo_rejects_a_bad_size(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torchlns", "detect-demo", "--out", str(tmp_path), "--size", "50", "128"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "multiples of 16" in proc.stderr


def test_detector_folds_and_converts_whole():
    import torchlns

    m = D.CenterNet(width=4).eval()
    x = torch.rand(2, 3, 48, 128)
    folded = torchlns.fold_batchnorm(m)  # traced: the coordinate channels are an fx leaf
    assert folded.fold_report.traced and len(folded.fold_report.entries) == 12
    assert torch.allclose(folded(x), m(x), atol=1e-5)
    q = torchlns.convert(m, torchlns.ConvertConfig(mac=torchlns.CHIP_MAC, overrides=D.EDGES), [x])
    assert q.conversion_report.coverage == 1.0
    assert q.stem[0][0].fmt == D.LNS12 and q.box[1].fmt == D.LNS12 and q.down4[0][0].fmt == torchlns.LNS8


def test_correlation_volume_by_hand():
    left = torch.arange(2 * 4 * 1 * 5, dtype=torch.float32).view(2, 4, 1, 5)
    right = torch.rand(2, 4, 1, 5)
    vol = D.correlation_volume(left, right, 3, 2)
    assert vol.shape == (2, 2, 3, 1, 5)
    for d in range(3):
        for u in range(5):
            want = (left[:, :2, 0, u] * right[:, :2, 0, u - d]).mean(1) if u >= d else torch.zeros(2)
            assert torch.allclose(vol[:, 0, d, 0, u], want)


def test_stereo_detector_folds_its_shared_stem_and_converts_whole():
    import torchlns

    m = D.StereoCenterNet(width=4).eval()
    left, right = torch.rand(2, 3, 48, 128), torch.rand(2, 3, 48, 128)
    out = m(left, right)
    assert out.shape == (2, len(BOX_CLASSES) + D.REG, 12, 32)
    folded = torchlns.fold_batchnorm(m, example_inputs=(left, right))
    # the siamese stem's two BNs, the two BatchNorm3d and the rest
    assert folded.fold_report.traced and len(folded.fold_report.entries) == 16
    assert torch.allclose(folded(left, right), out, atol=1e-5)
    q = torchlns.convert(m, torchlns.ConvertConfig(mac=torchlns.CHIP_MAC), [torchlns.Inputs(left, right)])
    assert q.conversion_report.coverage == 1.0
    assert isinstance(q.volume[0][0], torchlns.LNSConv3d)
