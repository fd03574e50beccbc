"""``torch.export`` of a converted model (issue 15's first step): the graph holds the
``torchlns::`` ops, runs to the same bits, and survives ``torch.export.save``/``load``."""

import pytest
import torch

import torchlns


def _net():
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()


CONFIGS = {
    "ideal": torchlns.ConvertConfig(mac=torchlns.IDEAL_MAC, progress=False),
    "chip": torchlns.ConvertConfig(mac=torchlns.CHIP_MAC, progress=False),
    # Clustered kernels keep trainable centroids, so the graph also carries the
    # straight-through ops and the centroid decode: they must export too.
    "chip + cluster": torchlns.ConvertConfig(mac=torchlns.CHIP_MAC, cluster=torchlns.ClusterConfig(num_clusters=4),
                                             progress=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_export_of_a_converted_model(name, tmp_path):
    x = torch.rand(2, 3, 8, 8)
    q = torchlns.convert(_net(), CONFIGS[name], [x])
    ep = torch.export.export(q, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"torchlns.lns_encode.default", "torchlns.lns_conv.default", "torchlns.lns_mm.default"} <= ops, ops
    y = q(x)
    assert torch.equal(ep.module()(x), y)
    torch.export.save(ep, tmp_path / "q.pt2")
    loaded = torch.export.load(tmp_path / "q.pt2")
    assert torch.equal(loaded.module()(x), y)
    other = torch.rand(2, 3, 8, 8)
    assert torch.equal(loaded.module()(other), q(other))
