"""torchlns.metrics against hand-computed cases.

Expected values are worked out by hand in the comments (or by a brute-force grid for the
rotated boxes), not from the library's own arithmetic.
"""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchlns.metrics import (
    ConfusionMatrix,
    agreement,
    bev_iou,
    box3d_iou,
    box3d_iou_aligned,
    box_iou,
    mean_iou,
    pixel_accuracy,
    sqnr,
    top1_accuracy,
)

# ---------------------------------------------------------------------------------------
# confusion matrix: 4 classes, class 3 absent from targets and predictions, 255 ignored
#
#   (target, pred) pairs: (0,0) (0,0) (0,1) (1,1) (1,2) (2,2) (2,2) (2,0) (2,2) + ignored
#   rows = target:  0: [2, 1, 0, 0]   1: [0, 1, 1, 0]   2: [1, 0, 3, 0]   3: [0, 0, 0, 0]
#   IoU0 = 2 / (3 + 3 - 2) = 1/2;  IoU1 = 1 / (2 + 2 - 1) = 1/3;  IoU2 = 3 / (4 + 4 - 3) = 3/5
#   IoU3 = 0/0 -> NaN, left out: mIoU = (1/2 + 1/3 + 3/5) / 3 = 43/90; accuracy = 6/9
TARGET = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 255, 255])
PRED = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 2, 1, 3])
MATRIX = torch.tensor([[2, 1, 0, 0], [0, 1, 1, 0], [1, 0, 3, 0], [0, 0, 0, 0]])
IOU = [1 / 2, 1 / 3, 3 / 5]
MIOU = 43 / 90
ACC = 6 / 9


def reference_matrix(pred, target, c, ignore_index=None):
    m = np.zeros((c, c), dtype=np.int64)
    t, p = target.flatten().numpy(), pred.flatten().numpy()
    keep = t != ignore_index if ignore_index is not None else np.ones_like(t, dtype=bool)
    np.add.at(m, (t[keep], p[keep]), 1)
    return torch.from_numpy(m)


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(4, ignore_index=255).update(PRED, TARGET)
    assert cm.matrix.dtype == torch.int64
    assert torch.equal(cm.matrix, MATRIX)
    iou = cm.iou()
    assert iou.dtype == torch.float64
    assert iou[:3].tolist() == pytest.approx(IOU, abs=1e-15)
    assert math.isnan(iou[3].item())
    assert cm.mean_iou() == pytest.approx(MIOU, abs=1e-15)
    assert cm.pixel_accuracy() == pytest.approx(ACC, abs=1e-15)


def test_ignore_index_skips_any_prediction():
    # an out-of-range prediction at an ignored position is not counted, so not checked
    pred = PRED.clone()
    pred[-1] = 99
    cm = ConfusionMatrix(4, ignore_index=255).update(pred, TARGET)
    assert torch.equal(cm.matrix, MATRIX)
    # without ignore_index, 255 is an out-of-range target
    with pytest.raises(ValueError, match="target label 255"):
        ConfusionMatrix(4).update(PRED, TARGET)
    # a negative ignore_index and a 2D layout
    t2 = torch.where(TARGET == 255, -1, TARGET).view(1, 11)
    cm = ConfusionMatrix(4, ignore_index=-1).update(PRED.view(1, 11), t2)
    assert torch.equal(cm.matrix, MATRIX)


def test_logits_path():
    # logits (N, C, ...) for target (N, ...): the argmax over dim 1 is PRED
    logits = torch.nn.functional.one_hot(PRED.clamp_max(3), 4).T.float().unsqueeze(0)  # (1, 4, 11)
    logits = logits * 3.0 - torch.rand(1, 4, 11)  # noise that does not move the argmax
    cm = ConfusionMatrix(4, ignore_index=255).update(logits, TARGET.unsqueeze(0))
    assert torch.equal(cm.matrix, MATRIX)
    with pytest.raises(ValueError, match="5 classes"):
        ConfusionMatrix(4, ignore_index=255).update(torch.randn(1, 5, 11), TARGET.unsqueeze(0))


def test_batches_accumulate_like_one_update():
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 6, (6, 16, 16), generator=g)
    target[torch.rand(6, 16, 16, generator=g) < 0.1] = 255
    pred = torch.randint(0, 6, (6, 16, 16), generator=g)
    one = ConfusionMatrix(6, ignore_index=255).update(pred, target)
    assert torch.equal(one.matrix, reference_matrix(pred, target, 6, 255))
    many = ConfusionMatrix(6, ignore_index=255)
    for p, t in zip(pred.split(2), target.split(2)):
        many.update(p, t)
    assert torch.equal(many.matrix, one.matrix)

    # merge: two halves add up to the whole
    a = ConfusionMatrix(6, ignore_index=255).update(pred[:3], target[:3])
    b = ConfusionMatrix(6, ignore_index=255).update(pred[3:], target[3:])
    assert a.merge(b) is a
    assert torch.equal(a.matrix, one.matrix)
    a.merge(b.matrix)  # a bare count tensor too
    assert torch.equal(a.matrix, one.matrix + b.matrix)
    with pytest.raises(ValueError, match="merge"):
        a.merge(ConfusionMatrix(5))

    # reset
    a.reset()
    assert a.matrix.sum().item() == 0 and a.matrix.shape == (6, 6)
    assert math.isnan(a.mean_iou()) and math.isnan(a.pixel_accuracy())


def test_confusion_matrix_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target label 3"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="target label -1"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="predicted label 5"):
        cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="predicted label -2"):
        cm.update(torch.tensor([0, -2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([0, 1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="logits"):
        cm.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))  # float labels: argmax missing
    with pytest.raises(TypeError, match="integer labels"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="torch.Tensor"):
        cm.update([0, 1], torch.tensor([0, 1]))
    assert cm.matrix.sum().item() == 0  # nothing counted by a failed update
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(TypeError, match="num_classes"):
        ConfusionMatrix(2.5)
    with pytest.raises(TypeError, match="ignore_index"):
        ConfusionMatrix(3, ignore_index="void")


def test_functional_equal_the_class():
    assert mean_iou(PRED, TARGET, 4, ignore_index=255) == pytest.approx(MIOU, abs=1e-15)
    assert pixel_accuracy(PRED, TARGET, ignore_index=255) == pytest.approx(ACC, abs=1e-15)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 8, 8, generator=g)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    target[0, 0] = 255
    cm = ConfusionMatrix(5, ignore_index=255).update(logits, target)
    assert mean_iou(logits, target, 5, ignore_index=255) == cm.mean_iou()
    assert pixel_accuracy(logits, target, ignore_index=255) == pytest.approx(cm.pixel_accuracy(), abs=1e-15)
    # without ignore_index every position counts: 7 right of 11
    assert pixel_accuracy(PRED, TARGET) == pytest.approx(6 / 11, abs=1e-15)
    with pytest.raises(ValueError, match="shape"):
        pixel_accuracy(PRED[:3], TARGET)


# ---------------------------------------------------------------------------------------
# all_reduce over two gloo processes


def _all_reduce_worker(rank, init_file, out_dir, pred, target):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = pred.shape[0] // 2
        sl = slice(rank * half, (rank + 1) * half)
        cm = ConfusionMatrix(4, ignore_index=255, device="cpu").update(pred[sl], target[sl])
        assert cm.all_reduce() is cm
        torch.save(cm.matrix, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_processes(tmp_path):
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (4, 32), generator=g)
    target[:, ::7] = 255
    pred = torch.randint(0, 4, (4, 32), generator=g)
    # fork (where there is one) starts the workers without re-importing torch and torchlns (seconds
    # each); their tensors are tiny, so no intra-op thread pool runs in them after the fork
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_all_reduce_worker, args=(str(tmp_path / "init"), str(tmp_path), pred, target), nprocs=2,
                       join=True, start_method=method)
    whole = ConfusionMatrix(4, ignore_index=255).update(pred, target).matrix
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), whole)


def test_all_reduce_without_process_group_is_a_no_op():
    cm = ConfusionMatrix(4, ignore_index=255).update(PRED, TARGET)
    assert cm.all_reduce() is cm
    assert torch.equal(cm.matrix, MATRIX)


# ---------------------------------------------------------------------------------------
# classification


def test_top1_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [4.0, 0.0, 1.0]])  # argmax 0, 1, 2, 0
    target = torch.tensor([0, 2, 2, 1])
    assert top1_accuracy(logits, target) == 0.5  # rows 0 and 2
    assert top1_accuracy(torch.tensor([0, 1, 2, 0]), target) == 0.5
    assert top1_accuracy(torch.tensor([0, 2, 2, 1]), target) == 1.0
    with pytest.raises(ValueError, match="shape"):
        top1_accuracy(logits[:3], target)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        top1_accuracy(logits, target.view(2, 2))


# ---------------------------------------------------------------------------------------
# boxes


def test_box_iou_by_hand():
    b1 = torch.tensor([[0.0, 0, 2, 2], [0, 0, 2, 2], [1, 1, 1, 3]])  # the last has zero area
    b2 = torch.tensor([[0.0, 0, 2, 2], [1, 0, 3, 2], [5, 5, 6, 6], [1, 1, 1, 3]])
    iou = box_iou(b1, b2)
    # same: 1; [0,0,2,2] vs [1,0,3,2]: 2 / (4 + 4 - 2) = 1/3; disjoint: 0; degenerate: 0, never NaN
    expected = torch.tensor([[1, 1 / 3, 0, 0], [1, 1 / 3, 0, 0], [0, 0, 0, 0]])
    assert iou.shape == (3, 4) and iou.dtype == torch.float32
    assert torch.allclose(iou, expected, atol=1e-7, rtol=0)
    # [0,0,2,2] vs [1,1,3,4]: 1 / (4 + 6 - 1) = 1/9; integer boxes give float IoU
    assert box_iou(torch.tensor([[0, 0, 2, 2]]), torch.tensor([[1, 1, 3, 4]])).item() == pytest.approx(1 / 9, abs=1e-7)
    assert box_iou(torch.zeros(0, 4), b2).shape == (0, 4)
    with pytest.raises(ValueError, match="x2 < x1"):
        box_iou(torch.tensor([[2.0, 0, 1, 1]]), b2)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        box_iou(torch.zeros(2, 5), b2)


def test_box3d_iou_aligned_by_hand():
    cube = torch.tensor([[0.0, 0, 0, 1, 1, 1]])
    shifted = torch.tensor([[0.5, 0, 0, 1, 1, 1], [3, 0, 0, 1, 1, 1], [0, 0, 0, 2, 2, 2]])
    # shift by 0.5 in x: 0.5 / (1 + 1 - 0.5) = 1/3; disjoint: 0; inside a 2-cube: 1/8
    expected = torch.tensor([[1 / 3, 0, 1 / 8]])
    assert torch.allclose(box3d_iou_aligned(cube, shifted), expected, atol=1e-7, rtol=0)
    assert box3d_iou_aligned(cube, cube).item() == 1.0
    flat = torch.tensor([[0.0, 0, 0, 1, 1, 0]])
    assert box3d_iou_aligned(flat, flat).item() == 0.0
    with pytest.raises(ValueError, match="negative size"):
        box3d_iou_aligned(torch.tensor([[0.0, 0, 0, 1, -1, 1]]), cube)


# the unit square over itself turned 45°: the overlap is a regular octagon with apothem 1/2,
# area 8 · (1/2)² · tan(22.5°) = 2(√2 − 1); IoU = A / (2 − A) = 1/√2
OCTAGON = 2 * (math.sqrt(2) - 1)


def test_bev_iou_rotated_square_by_hand():
    square = torch.tensor([[0.0, 0, 1, 1, 0]], dtype=torch.float64)
    turned = torch.tensor([[0.0, 0, 1, 1, math.pi / 4]], dtype=torch.float64)
    assert bev_iou(square, turned).item() == pytest.approx(OCTAGON / (2 - OCTAGON), abs=1e-12)
    # scaled by 3 and moved: the ratio stays
    big = torch.tensor([[5.0, -2, 3, 3, 0.3], [5.0, -2, 3, 3, 0.3 + math.pi / 4]], dtype=torch.float64)
    assert bev_iou(big[:1], big[1:]).item() == pytest.approx(OCTAGON / (2 - OCTAGON), abs=1e-12)


def test_bev_iou_identities():
    boxes = torch.tensor([[0.0, 0, 2, 1, 0.3], [1, 2, 4, 0.5, -1.2], [-3, 1, 1, 1, 2.0], [0, 0, 2, 1, 0.3 + math.pi]],
                         dtype=torch.float64)
    iou = bev_iou(boxes, boxes)
    assert torch.allclose(iou.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-9, rtol=0)
    assert torch.allclose(iou, iou.T, atol=1e-12, rtol=0)
    assert iou[0, 3].item() == pytest.approx(1.0, abs=1e-9)  # yaw is periodic by π
    # a quarter turn with dx, dy swapped is the same box
    quarter = boxes[:, [0, 1, 3, 2, 4]].clone()
    quarter[:, 4] += math.pi / 2
    assert torch.allclose(bev_iou(quarter, boxes), iou, atol=1e-12, rtol=0)
    far = torch.tensor([[100.0, 100, 1, 1, 0.7]], dtype=torch.float64)
    assert bev_iou(far, boxes).abs().max().item() == 0.0
    # float32 in, float32 out; a degenerate box has IoU 0
    assert bev_iou(boxes.float(), boxes.float()).dtype == torch.float32
    line = torch.tensor([[0.0, 0, 2, 0, 0.4]])
    assert bev_iou(line, line).item() == 0.0
    with pytest.raises(ValueError, match="negative size"):
        bev_iou(torch.tensor([[0.0, 0, -1, 1, 0]]), line)
    with pytest.raises(ValueError, match=r"\(N, 5\) or \(N, 7\)"):
        bev_iou(torch.zeros(1, 6), line)


def test_bev_iou_seven_columns():
    b3 = torch.tensor([[0.0, 0, 7, 2, 1, 9, 0.4], [0.5, 0.2, -3, 1, 1, 1, 1.0]], dtype=torch.float64)
    assert torch.equal(bev_iou(b3, b3), bev_iou(b3[:, [0, 1, 3, 4, 6]], b3[:, [0, 1, 3, 4, 6]]))


def _grid_iou(a, b, n=600):
    """IoU of BEV box pairs a[k], b[k] by counting the midpoints of an n × n grid over each pair's bounding square."""
    r = torch.maximum(a[:, 2:4].norm(dim=1), b[:, 2:4].norm(dim=1)) / 2
    lo = torch.minimum(a[:, :2], b[:, :2]) - r[:, None]
    hi = torch.maximum(a[:, :2], b[:, :2]) + r[:, None]
    frac = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    xs = lo[:, :1] + frac * (hi[:, :1] - lo[:, :1])  # (P, n)
    ys = lo[:, 1:] + frac * (hi[:, 1:] - lo[:, 1:])
    x, y = xs[:, :, None], ys[:, None, :]  # all pairs at once: few large ops

    def inside(box):
        cx, cy, dx, dy, yaw = (box[:, k, None, None] for k in range(5))
        u = (x - cx) * torch.cos(yaw) + (y - cy) * torch.sin(yaw)
        v = (y - cy) * torch.cos(yaw) - (x - cx) * torch.sin(yaw)
        return (u.abs() <= dx / 2) & (v.abs() <= dy / 2)

    ia, ib = inside(a), inside(b)
    inter, union = (ia & ib).sum((1, 2)).double(), (ia | ib).sum((1, 2)).double()
    return torch.where(union > 0, inter / union.clamp_min(1), 0.0)


def test_bev_iou_against_grid():
    g = torch.Generator().manual_seed(4)

    def random_boxes(n):
        return torch.cat([torch.rand(n, 2, generator=g) * 2, 0.5 + torch.rand(n, 2, generator=g) * 2,
                          (torch.rand(n, 1, generator=g) - 0.5) * 2 * math.pi], dim=1).double()

    a, b = random_boxes(20), random_boxes(20)
    got = bev_iou(a, b).diagonal()
    expected = _grid_iou(a, b)
    assert (expected > 0).sum() >= 15  # most pairs overlap, so the comparison means something
    assert torch.allclose(got, expected, atol=1e-3, rtol=0)  # grid error is ~1e-4 here


def test_box3d_iou():
    g = torch.Generator().manual_seed(5)
    boxes = torch.cat([torch.rand(6, 3, generator=g) * 2, 0.5 + torch.rand(6, 3, generator=g) * 2,
                       torch.zeros(6, 1)], dim=1).double()
    # yaw 0: the aligned IoU
    assert torch.allclose(box3d_iou(boxes, boxes), box3d_iou_aligned(boxes[:, :6], boxes[:, :6]), atol=1e-12, rtol=0)
    # the unit square and its 45° turn in BEV (overlap 2(√2 − 1)), heights [0, 2] and [1, 4]:
    # z overlap 1, volumes 2 and 3, IoU = A / (2 + 3 − A)
    a = torch.tensor([[0.0, 0, 1, 1, 1, 2, 0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0, 2.5, 1, 1, 3, math.pi / 4]], dtype=torch.float64)
    assert box3d_iou(a, b).item() == pytest.approx(OCTAGON / (5 - OCTAGON), abs=1e-12)
    assert box3d_iou(b, a).item() == pytest.approx(OCTAGON / (5 - OCTAGON), abs=1e-12)
    b[0, 2] = 5.0  # no z overlap
    assert box3d_iou(a, b).item() == 0.0
    with pytest.raises(ValueError, match=r"\(N, 7\)"):
        box3d_iou(a[:, :6], b)


# ---------------------------------------------------------------------------------------
# sqnr and agreement


def test_sqnr_by_hand():
    # signal 1 + 1 = 2, noise 0.01 + 0.01 = 0.02: 10 log10(100) = 20 dB
    assert sqnr(torch.tensor([1.1, 0.9]), torch.tensor([1.0, 1.0])) == pytest.approx(20.0, abs=1e-5)
    assert sqnr(torch.tensor([1.1, 0.9], dtype=torch.float64), torch.ones(2, dtype=torch.float64)) == pytest.approx(
        20.0, abs=1e-12)
    x = torch.randn(3, 4)
    assert sqnr(x, x) == math.inf
    assert sqnr(torch.ones(2), torch.zeros(2)) == -math.inf
    with pytest.raises(ValueError, match="shape"):
        sqnr(torch.ones(2), torch.ones(3))


def test_agreement_by_hand():
    a = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 3]])
    b = torch.tensor([[0, 2, 2, 2], [1, 0, 0, 3]])  # differs at (0, 1) and (1, 1)
    assert agreement(a, b) == 6 / 8
    ignore = torch.tensor([[False, True, False, False], [False, False, False, True]])
    assert agreement(a, b, ignore) == 5 / 6  # (0, 1) and (1, 3) left out; (1, 1) still differs
    logits = torch.nn.functional.one_hot(a, 4).permute(0, 2, 1).float()  # (2, 4, 4) with argmax a
    assert agreement(logits, b) == 6 / 8
    assert agreement(logits, logits) == 1.0
    assert math.isnan(agreement(a, b, torch.ones(2, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="shape"):
        agreement(a, b[:, :3])
    with pytest.raises(TypeError, match="bool"):
        agreement(a, b, ignore.int())
