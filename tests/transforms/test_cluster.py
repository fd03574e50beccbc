"""Kernel cluster compression: cluster_kernels and kmeans (the layers: tests/nn/test_clustered.py).

See Note: kernel normalisation in torchlns/transforms/cluster.py and chip-model.md section 6.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlns
from torchlns import ClusteredConv2d
from torchlns.transforms.cluster import kmeans, normalise_kernels
from zoo import ZOO, small_net


def distinct_points(points: torch.Tensor, tol: float = 1e-5) -> int:
    """Number of distinct rows, up to ``tol``. The mm-based cdist is inaccurate for
    self-distances, hence the exact mode."""
    d = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
    first = (d <= tol).float().argmax(1)  # the first row close to each row
    return int((first == torch.arange(len(points))).sum())


def nmse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE relative to the target's power: O(1), so plain SGD steps of ~0.1 make progress."""
    return F.mse_loss(y, target) / target.pow(2).mean()


def clustered_layers(model: nn.Module):
    return {n: m for n, m in model.named_modules() if isinstance(m, ClusteredConv2d)}


def live_points(weight: torch.Tensor) -> torch.Tensor:
    points, scales = normalise_kernels(weight.detach())
    return points[scales.flatten() != 0]


# ----------------------------------------------------------------------------------------
# the compression invariant: at most C distinct normalised kernels
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "unet"])
@pytest.mark.parametrize("C", [1, 3, 8])
def test_layer_scope_at_most_C_distinct_kernels(name, C):
    model, _ = ZOO[name]()
    clustered = torchlns.cluster_kernels(model, C)
    layers = clustered_layers(clustered)
    assert layers, "the zoo model has k×k convs to cluster"
    for fqn, m in layers.items():
        assert m.num_clusters <= C and m.indices.max() < m.num_clusters
        assert distinct_points(live_points(m.weight)) <= C, fqn
    # one report row per clustered layer, with the counts it stored
    assert [s.layer for s in clustered.cluster_report] == list(layers)
    for s in clustered.cluster_report:
        assert s.kernels == layers[s.layer].indices.numel() and s.clusters == layers[s.layer].num_clusters


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_network_scope_shares_one_centroid_parameter(name):
    model, x = ZOO[name]()
    C = 6
    clustered = torchlns.cluster_kernels(model, C, scope="network")
    layers = list(clustered_layers(clustered).values())
    assert len(layers) > 1
    assert all(m.centroids is layers[0].centroids for m in layers)  # the same object, not equal copies
    assert isinstance(layers[0].centroids, nn.Parameter)
    assert sum(p is layers[0].centroids for p in clustered.parameters()) == 1  # optimisers see it once
    pooled = torch.cat([live_points(m.weight) for m in layers])
    assert distinct_points(pooled) <= C
    assert torch.isfinite(clustered(x)).all()


def test_network_scope_groups_by_kernel_shape():
    # One k-means per kernel shape: 3×3 and 5×5 layers cannot share a (C, kh, kw) tensor.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 5), nn.Conv2d(4, 4, 3))
    clustered = torchlns.cluster_kernels(model, 4, scope="network")
    assert clustered[0].centroids is clustered[2].centroids
    assert clustered[1].centroids is not clustered[0].centroids
    assert clustered[1].centroids.shape == (4, 5, 5)


# ----------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------
def test_normalise_kernels_definition():
    torch.manual_seed(0)
    w = torch.randn(5, 4, 3, 3)
    points, scales = normalise_kernels(w)
    flat = w.reshape(20, 9)
    sign = torch.where(flat[:, 4] < 0, -1.0, 1.0)  # centre tap of 3×3 is flat index 4
    assert torch.allclose(scales.flatten(), flat.norm(dim=1) * sign)
    assert torch.allclose(points, flat / (flat.norm(dim=1) * sign)[:, None])
    assert (scales < 0).any() and (scales > 0).any()  # scales are signed
    assert torch.allclose(points.norm(dim=1), torch.ones(20))
    assert (points[:, 4] > 0).all()  # every point has a positive centre
    assert torch.allclose(scales[..., None, None] * points.reshape(w.shape), w)  # scale · point is the kernel


def test_normalise_even_kernel_centre_and_zero_centre():
    w = torch.zeros(3, 1, 4, 4)
    w[0, 0, 2, 2], w[0, 0, 0, 0] = -1.0, 5.0  # centre of an even kernel is [k//2, k//2]
    w[1, 0, 1, 1], w[1, 0, 2, 2] = -3.0, 0.0  # zero centre counts as positive
    w[1, 0, 3, 3] = 4.0
    _, scales = normalise_kernels(w)
    assert scales[0, 0] < 0 and scales[1, 0] == 5.0 and scales[2, 0] == 0


def test_multiples_land_on_one_point():
    torch.manual_seed(0)
    base = torch.randn(2, 3, 3)
    kernels = torch.stack([base[0], -3.0 * base[0], 0.25 * base[0], -7.5 * base[0],
                           base[1], 2.0 * base[1], -0.1 * base[1]])
    points, scales = normalise_kernels(kernels[:, None])
    for i in (1, 2, 3):
        assert torch.allclose(points[i], points[0], atol=1e-6)
    for i in (5, 6):
        assert torch.allclose(points[i], points[4], atol=1e-6)
    assert torch.allclose(scales[1, 0], -3.0 * scales[0, 0]) and torch.allclose(scales[3, 0], -7.5 * scales[0, 0])
    # two clusters suffice for the seven kernels, and reconstruct them
    conv = nn.Conv2d(1, 7, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(kernels[:, None])
    c = torchlns.cluster_kernels(conv, 2)
    idx = c.indices.flatten()
    assert len(set(idx[:4].tolist())) == 1 and len(set(idx[4:].tolist())) == 1 and idx[0] != idx[4]
    assert torch.allclose(c.weight, conv.weight, atol=1e-6)
    assert c.cluster_report[0].relative_error < 1e-5


def test_zero_kernel_gets_scale_zero_and_reconstructs_to_zero():
    conv = nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight[1, 2] = 0
        conv.weight[3] = 0
    c = torchlns.cluster_kernels(conv, 3)
    assert c.scales[1, 2] == 0 and (c.scales[3] == 0).all()
    assert (c.scales != 0).sum() == 12 - 4
    assert (c.weight[1, 2] == 0).all() and (c.weight[3] == 0).all()
    # zero kernels take no part in k-means, so they cost no centroid
    assert distinct_points(live_points(c.weight)) <= 3
    assert torch.isfinite(c.centroids).all()


def test_all_zero_layer():
    conv = nn.Conv2d(2, 2, 3)
    nn.init.zeros_(conv.weight)
    c = torchlns.cluster_kernels(conv, 4)
    assert torch.equal(c.weight, torch.zeros(2, 2, 3, 3)) and torch.equal(c.scales, torch.zeros(2, 2))
    x = torch.randn(1, 2, 5, 5)
    assert torch.equal(c(x), conv(x))  # bias only


# ----------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "network"])
def test_same_seed_same_state_dict(scope):
    model, _ = ZOO["resnet"]()
    a = torchlns.cluster_kernels(model, 5, scope=scope, seed=3).state_dict()
    torch.manual_seed(123)  # the global RNG must play no part
    b = torchlns.cluster_kernels(model, 5, scope=scope, seed=3).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_different_seed_different_init():
    # With no Lloyd iterations, kmeans returns its k-means++ picks: for 500 distinct points
    # two seeds picking the same 5 is essentially impossible (and, seeded, not flaky).
    points = torch.randn(500, 9, generator=torch.Generator().manual_seed(0))
    c0, _ = kmeans(points, 5, iterations=0, seed=0)
    c1, _ = kmeans(points, 5, iterations=0, seed=1)
    assert not torch.equal(c0, c1)
    assert torch.equal(c0, kmeans(points, 5, iterations=0, seed=0)[0])
    # the picks are data points
    assert (torch.cdist(c0, points, compute_mode="donot_use_mm_for_euclid_dist").min(1).values == 0).all()
    model, _ = ZOO["resnet"]()
    a = torchlns.cluster_kernels(model, 4, seed=0, iterations=0)
    b = torchlns.cluster_kernels(model, 4, seed=1, iterations=0)
    assert not torch.equal(a.stem[0].centroids, b.stem[0].centroids)


# ----------------------------------------------------------------------------------------
# which layers, and argument checks
# ----------------------------------------------------------------------------------------
def test_only_kxk_conv2d_is_clustered():
    model, _ = ZOO["unet"]()  # 3×3 convs, a ConvTranspose2d, a 1×1 conv
    clustered = torchlns.cluster_kernels(model, 4)
    assert set(clustered_layers(clustered)) == {"enc1.0", "enc2.0", "dec.0"}
    assert type(clustered.up) is nn.ConvTranspose2d and torch.equal(clustered.up.weight, model.up.weight)
    assert type(clustered.out) is nn.Conv2d and torch.equal(clustered.out.weight, model.out.weight)
    seq, _ = ZOO["seq1d"]()  # Conv1d and Linear only
    assert not clustered_layers(torchlns.cluster_kernels(seq, 4))
    # a non-zero padding mode is left alone (the chip pads with zero codes)
    reflect = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert type(torchlns.cluster_kernels(reflect, 2)[0]) is nn.Conv2d


def test_filter_fn_and_dict_select_layers():
    model, _ = ZOO["resnet"]()
    seen = []

    def only_layer1(m, fqn):
        seen.append((type(m), fqn))
        return fqn.startswith("layer1.")

    clustered = torchlns.cluster_kernels(model, 4, filter_fn=only_layer1)
    assert set(clustered_layers(clustered)) == {"layer1.conv1", "layer1.conv2"}
    assert (nn.Conv2d, "stem.0") in seen  # filter_fn gets (module, fully qualified name)
    clustered = torchlns.cluster_kernels(model, {"stem.0": 2, "layer2.conv2": 7})
    layers = clustered_layers(clustered)
    assert set(layers) == {"stem.0", "layer2.conv2"}
    assert layers["stem.0"].num_clusters == 2 and layers["layer2.conv2"].num_clusters == 7
    assert type(clustered.layer1.conv1) is nn.Conv2d


@pytest.mark.parametrize("bad", [{"nope": 4}, {"stem.0": 4, "layer2.downsample.0": 4}, {"fc": 4}])
def test_dict_with_unknown_or_ineligible_name_raises(bad):
    model, _ = ZOO["resnet"]()
    with pytest.raises(ValueError):
        torchlns.cluster_kernels(model, bad)


@pytest.mark.parametrize("kwargs", [dict(num_clusters=0), dict(num_clusters=-2), dict(num_clusters=True),
                                    dict(num_clusters=2.0), dict(num_clusters=4, scope="bad"),
                                    dict(num_clusters={"stem.0": 4}, scope="network")])
def test_bad_arguments_raise(kwargs):
    model, _ = ZOO["resnet"]()
    with pytest.raises(ValueError):
        torchlns.cluster_kernels(model, **kwargs)


def test_kmeans_bad_arguments():
    with pytest.raises(ValueError):
        kmeans(torch.randn(5, 9), 0)
    with pytest.raises(ValueError):
        kmeans(torch.zeros(0, 9), 2)


def test_index_bits():
    for C, bits in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (256, 8), (1024, 10), (1025, 11)]:
        assert ClusteredConv2d(1, 1, 3, C).index_bits == bits, C


# ----------------------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------------------
def test_C_at_least_kernels_reconstructs_exactly():
    model = small_net()
    for C in (32, 1000):  # layer 0 has 3·8 = 24 kernels, layer 2 has 8·4 = 32
        clustered = torchlns.cluster_kernels(model, C)
        for i in (0, 2):
            assert torch.allclose(clustered[i].weight, model[i].weight, rtol=1e-6, atol=1e-7)
            assert clustered[i].num_clusters <= max(C, 1)
        assert all(s.relative_error < 1e-6 for s in clustered.cluster_report)
        x = torch.randn(2, 3, 8, 8)
        assert torch.allclose(clustered(x), model(x), atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_kmeans_recovers_separated_partition(seed):
    g = torch.Generator().manual_seed(seed)
    C, n, D = 5, 40, 9
    centres = torch.randn(C, D, generator=g) * 10
    labels = torch.arange(C).repeat_interleave(n)
    points = centres[labels] + 0.05 * torch.randn(C * n, D, generator=g)
    perm = torch.randperm(C * n, generator=g)
    points, labels = points[perm], labels[perm]
    centroids, assign = kmeans(points, C, seed=seed)
    assert centroids.shape == (C, D) and assign.shape == (C * n,)
    # the same partition, up to relabelling
    mapping = {}
    for true, got in zip(labels.tolist(), assign.tolist()):
        assert mapping.setdefault(true, got) == got
    assert len(set(mapping.values())) == C
    for true, got in mapping.items():
        assert torch.allclose(centroids[got], centres[true], atol=0.05)


def test_kmeans_fewer_distinct_points_than_clusters():
    points = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    centroids, assign = kmeans(points, 5)
    assert torch.isfinite(centroids).all() and assign.max() < len(centroids)
    assert torch.equal(centroids[assign], points)  # every point keeps its own value


def test_relative_error_falls_with_more_clusters():
    model = small_net()
    errs = [torchlns.cluster_kernels(model, C).cluster_report[0].relative_error for C in (1, 4, 16, 24)]
    assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-6
    c = torchlns.cluster_kernels(model, 4)
    want = ((c[0].weight - model[0].weight).norm() / model[0].weight.norm()).item()
    assert c.cluster_report[0].relative_error == pytest.approx(want, rel=1e-5)


# ----------------------------------------------------------------------------------------
# the model: copy semantics, dtype, forward, progress
# ----------------------------------------------------------------------------------------
def test_original_untouched_unless_inplace():
    model = small_net()
    before = copy.deepcopy(model.state_dict())
    clustered = torchlns.cluster_kernels(model, 3)
    assert clustered is not model and type(model[0]) is nn.Conv2d
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not hasattr(model, "cluster_report")
    same = torchlns.cluster_kernels(model, 3, inplace=True)
    assert same is model and type(model[0]) is ClusteredConv2d and type(model[2]) is ClusteredConv2d
    assert torch.equal(model[0].centroids, clustered[0].centroids)  # inplace gives the same result


def test_conv_as_whole_model():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2)
    c = torchlns.cluster_kernels(conv, 64)
    assert isinstance(c, ClusteredConv2d) and c.cluster_report[0].layer == ""
    assert (c.stride, c.padding, c.dilation) == (conv.stride, conv.padding, conv.dilation)
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(c(x), conv(x), atol=1e-5)


def test_large_C_forward_approximates_original():
    model, x = ZOO["mobilenet"]()  # grouped, depthwise and dilated convs
    clustered = torchlns.cluster_kernels(model, 512)
    assert torch.allclose(clustered(x), model(x), rtol=1e-4, atol=1e-4)
    # fewer clusters: a coarser, still sane approximation
    coarse = torchlns.cluster_kernels(model, 16)(x)
    err = lambda y: ((y - model(x)).norm() / model(x).norm()).item()  # noqa: E731
    assert err(clustered(x)) < err(coarse) < 1.0


def test_float64_model_keeps_its_dtype():
    # A float64 conv must cluster to a float64 layer (scales and bias included) that runs
    # on float64 input, as the original did.
    model = small_net().double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    clustered = torchlns.cluster_kernels(model, 64)
    for m in clustered_layers(clustered).values():
        assert m.centroids.dtype == m.scales.dtype == m.bias.dtype == torch.float64
    assert torch.allclose(clustered(x), model(x), atol=1e-6)


@pytest.mark.parametrize("progress", [False, None])
def test_progress_off_prints_nothing(progress, capsys):
    model, _ = ZOO["resnet"]()
    torchlns.cluster_kernels(model, 4, progress=progress)
    kmeans(torch.randn(50, 9), 3, progress=progress)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_progress_true_shows_bars(capsys):
    # the positive control: capsys does see tqdm's bars, so the test above means something
    model, _ = ZOO["resnet"]()
    torchlns.cluster_kernels(model, 4, progress=True)
    assert "cluster_kernels" in capsys.readouterr().err
