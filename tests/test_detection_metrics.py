"""Detection metrics (torchlns.metrics, Note: detection conventions) against hand-computed cases."""

import math

import pytest
import torch

from torchlns.metrics import DetectionEval, average_precision, box_agreement, box_errors


def box(x1, y1, x2, y2):
    return [float(x1), float(y1), float(x2), float(y2)]


def dets(boxes, scores, labels=None):
    n = len(boxes)
    return {"boxes2d": torch.tensor(boxes, dtype=torch.float32).view(n, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels if labels is not None else [0] * n, dtype=torch.int64)}


def gts(boxes, labels=None):
    n = len(boxes)
    return {"boxes2d": torch.tensor(boxes, dtype=torch.float32).view(n, 4),
            "labels": torch.tensor(labels if labels is not None else [0] * n, dtype=torch.int64)}


A, B, C = box(0, 0, 10, 10), box(20, 0, 30, 10), box(50, 0, 60, 10)


def test_perfect_detections_have_ap_one():
    assert average_precision([dets([A, B], [0.9, 0.8])], [gts([A, B])]) == 1.0


def test_all_point_interpolation_by_hand():
    # ranked: TP, FP, TP over 2 ground truths -> precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1:
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    ap = average_precision([dets([A, C, B], [0.9, 0.8, 0.7])], [gts([A, B])])
    assert math.isclose(ap, 5 / 6, rel_tol=0, abs_tol=1e-15)
    # the envelope: FP first -> precisions 0, 1/2, 2/3 at recalls 0, 1/2, 1 -> AP = 1/2 * 2/3 + 1/2 * 2/3
    ap = average_precision([dets([C, A, B], [0.9, 0.8, 0.7])], [gts([A, B])])
    assert math.isclose(ap, 2 / 3, rel_tol=0, abs_tol=1e-15)


def test_missed_ground_truth_caps_recall():
    # one of two found, nothing else: precision 1 up to recall 1/2
    assert math.isclose(average_precision([dets([A], [0.5])], [gts([A, B])]), 0.5, abs_tol=1e-15)


def test_duplicate_is_a_false_positive():
    # TP, then a duplicate of the same box (FP), then the second object (TP): AP = 5/6
    ap = average_precision([dets([A, A, B], [0.9, 0.8, 0.7])], [gts([A, B])])
    assert math.isclose(ap, 5 / 6, abs_tol=1e-15)


def test_threshold_is_inclusive_and_exact():
    # IoU of (0,0,10,10) with (0,0,10,5) is exactly 1/2
    half = box(0, 0, 10, 5)
    assert average_precision([dets([half], [0.9])], [gts([A])], threshold=0.5) == 1.0
    assert average_precision([dets([half], [0.9])], [gts([A])], threshold=0.5 + 1e-9) == 0.0


def test_greedy_takes_the_highest_iou_free_ground_truth():
    # the first detection overlaps g1 at IoU 7/13 and g2 at IoU 2/3: it takes g2, which leaves
    # g1 to the second detection (exactly g1). Taking the first box over the threshold would
    # leave the second detection only g2, at IoU 1/3: a false positive.
    g1, g2 = box(0, 0, 10, 10), box(5, 0, 15, 10)
    ap = average_precision([dets([box(3, 0, 13, 10), g1], [0.9, 0.8])], [gts([g1, g2])], threshold=0.5)
    assert ap == 1.0


def test_score_ranking_spans_images():
    # image 0: an FP at 0.9; image 1: a TP at 0.8 -> precision 0 then 1/2 at recall 1: AP 1/2
    ap = average_precision([dets([C], [0.9]), dets([A], [0.8])], [gts([A]), gts([A])])
    assert math.isclose(ap, 0.25, abs_tol=1e-15)  # recall 1/2 at precision 1/2
    ap = average_precision([dets([C], [0.7]), dets([A], [0.8])], [gts([A]), gts([A])])
    assert math.isclose(ap, 0.5, abs_tol=1e-15)  # TP first (precision 1, recall 1/2), then the FP


def test_classes_average_and_absent_classes_are_nan():
    d = dets([A, B], [0.9, 0.9], labels=[0, 2])
    g = gts([A, B], labels=[0, 1])
    per = average_precision([d], [g], num_classes=3, per_class=True)
    assert per[0] == 1.0 and per[1] == 0.0 and math.isnan(per[2])
    assert average_precision([d], [g], num_classes=3) == 0.5


def test_no_ground_truth_at_all_is_nan():
    assert math.isnan(average_precision([dets([A], [0.9])], [gts([])], num_classes=1))


def test_bev_and_3d_kinds():
    g = {"labels": torch.tensor([0]), "boxes3d": torch.tensor([[10.0, 0.0, 0.75, 3.0, 2.0, 1.5, 0.0]])}
    same = {**g, "scores": torch.tensor([0.9])}
    # the same footprint turned by pi: the same box for BEV and 3-D IoU
    turned = {**same, "boxes3d": torch.tensor([[10.0, 0.0, 0.75, 3.0, 2.0, 1.5, math.pi]])}
    # moved 1 m forward: BEV IoU (3 - 1) / (3 + 1) = 1/2
    moved = {**same, "boxes3d": torch.tensor([[11.0, 0.0, 0.75, 3.0, 2.0, 1.5, 0.0]])}
    for kind in ("bev", "3d"):
        assert average_precision([same], [g], kind) == 1.0
        assert average_precision([turned], [g], kind) == 1.0
    assert average_precision([moved], [g], "bev", threshold=0.5 - 1e-9) == 1.0
    assert average_precision([moved], [g], "bev", threshold=0.5 + 1e-9) == 0.0
    # and raised by a third of its height: overlap 2 x 2 x 1 = 4 of two volumes of 9: 3-D IoU 4/14
    raised = {**moved, "boxes3d": torch.tensor([[11.0, 0.0, 1.25, 3.0, 2.0, 1.5, 0.0]])}
    assert average_precision([raised], [g], "3d", threshold=2 / 7 - 1e-9) == 1.0
    assert average_precision([raised], [g], "3d", threshold=2 / 7 + 1e-9) == 0.0


def test_accumulating_equals_one_call():
    d = [dets([A, C], [0.9, 0.4]), dets([B], [0.6]), dets([], [])]
    g = [gts([A]), gts([B, C]), gts([A])]
    ev = DetectionEval(1)
    for i in range(3):
        ev.update(d[i:i + 1], g[i:i + 1])
    assert len(ev) == 3
    assert ev.average_precision() == average_precision(d, g)


def _with3d(d, boxes3d):
    return {**d, "boxes3d": torch.tensor(boxes3d, dtype=torch.float32)}


def test_box_errors_by_hand():
    g = _with3d(gts([A, B]), [[10.0, 1.0, 0.75, 4.0, 2.0, 1.5, 0.1], [20.0, -1.0, 0.75, 4.0, 2.0, 1.5, 3.0]])
    d = _with3d(dets([A, B, C], [0.9, 0.8, 0.2]),
                [[11.0, 1.0, 0.75, 4.5, 2.0, 1.2, 0.3],     # depth +1, sizes +0.5/0/-0.3, yaw +0.2
                 [18.0, -1.0, 0.75, 4.0, 2.0, 1.5, -3.0],   # depth -2, yaw 3 -> -3: 2 pi - 6 off
                 [5.0, 0.0, 0.75, 1.0, 1.0, 1.0, 0.0]])     # below min_score: not counted
    e = box_errors([d], [g], min_score=0.3)
    assert e["matched"] == 2
    assert math.isclose(e["depth"], 1.5, abs_tol=1e-6)
    assert math.isclose(e["depth_rel"], (1 / 10 + 2 / 20) / 2, abs_tol=1e-6)
    assert math.isclose(e["size"], (0.5 + 0.3) / 6, abs_tol=1e-6)
    assert math.isclose(e["yaw"], (0.2 + (2 * math.pi - 6)) / 2, abs_tol=1e-6)
    none = box_errors([dets([C], [0.9]) | {"boxes3d": torch.zeros(1, 7)}], [g])
    assert none["matched"] == 0 and math.isnan(none["depth"])


def test_box_agreement_by_hand():
    near = box(0, 0, 10, 9.5)  # IoU 0.95 with A
    far = box(0, 0, 10, 8)  # IoU 0.8
    ref = [dets([A, B, C], [0.9, 0.8, 0.1]), dets([A], [0.5], labels=[1])]
    # A matched (0.95), B moved (0.8), C under min_score; image 1: same box, wrong class
    test = [dets([near, box(20, 0, 30, 8)], [0.2, 0.9]), dets([A], [0.5], labels=[0])]
    assert box_agreement(ref, test) == 1 / 3
    assert box_agreement(ref, test, threshold=0.8) == 2 / 3
    assert box_agreement(ref, ref) == 1.0
    assert math.isnan(box_agreement([dets([A], [0.1])], [dets([A], [0.1])]))
    # one test box cannot match two reference boxes
    assert box_agreement([dets([A, A], [0.9, 0.8])], [dets([A], [0.9])]) == 0.5
    assert box_agreement([dets([A], [0.9])], [dets([far], [0.9])]) == 0.0


def test_bad_input_is_named():
    g = [gts([A])]
    with pytest.raises(ValueError, match="kind must be one of"):
        average_precision([dets([A], [0.9])], g, kind="2.5d")
    with pytest.raises(ValueError, match="no 'scores'"):
        average_precision([gts([A])], g)
    with pytest.raises(ValueError, match="no 'boxes3d'"):
        average_precision([dets([A], [0.9])], g, kind="bev")
    with pytest.raises(ValueError, match="threshold"):
        average_precision([dets([A], [0.9])], g, threshold=1.5)
    with pytest.raises(ValueError, match="1 images of detections but 2"):
        DetectionEval(1).update([dets([A], [0.9])], g * 2)
    with pytest.raises(ValueError, match="outside"):
        DetectionEval(1).update([dets([A], [0.9], labels=[3])], g)
    with pytest.raises(ValueError, match="integer classes"):
        average_precision([{**dets([A], [0.9]), "labels": torch.tensor([0.0])}], g)
    with pytest.raises(ValueError, match=r"boxes2d'\] has 1 boxes but .* has 2"):
        average_precision([dets([A, B], [0.9, 0.8]) | {"boxes2d": torch.tensor([A])}], g)
    with pytest.raises(TypeError, match="one dict per image"):
        average_precision(dets([A], [0.9]), g)
    with pytest.raises(ValueError, match=r"x2 < x1"):
        average_precision([dets([box(10, 0, 0, 10)], [0.9])], g)
