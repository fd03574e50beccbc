"""Clustered convolutions: the float ClusteredConv2d (fine-tuning, serialisation) and LNSClusteredConv2d.

See Note: kernel normalisation in torchlns/transforms/cluster.py and chip-model.md section 6.
"""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlns
from torchlns import ClusterConfig, ClusteredConv2d, ConvertConfig, LNSClusteredConv2d
from zoo import calibration_batches, small_net


def nmse(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE relative to the target's power: O(1), so plain SGD steps of ~0.1 make progress."""
    return F.mse_loss(y, target) / target.pow(2).mean()


def clustered_layers(model: nn.Module):
    return {n: m for n, m in model.named_modules() if isinstance(m, ClusteredConv2d)}


# ----------------------------------------------------------------------------------------
# fine-tuning the float clustered model
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "network"])
def test_fine_tuning_reduces_loss(scope):
    model = small_net()
    x = torch.randn(8, 3, 8, 8)
    target = model(x).detach()
    clustered = torchlns.cluster_kernels(model, 2, scope=scope).train()
    layers = list(clustered_layers(clustered).values())
    indices = [m.indices.clone() for m in layers]
    centroids = [m.centroids.detach().clone() for m in layers]
    params = list({id(p): p for m in layers for p in (m.centroids, m.scales)}.values())
    assert not any(p is m.indices for m in layers for p in clustered.parameters())
    opt = torch.optim.SGD(params, lr=0.2)
    losses = []
    for _ in range(10):
        loss = nmse(clustered(x), target)
        opt.zero_grad()
        loss.backward()
        for m in layers:
            assert m.centroids.grad is not None and m.centroids.grad.abs().sum() > 0
            assert m.scales.grad is not None and m.scales.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.95 * losses[0], losses
    for m, idx, c in zip(layers, indices, centroids):
        assert torch.equal(m.indices, idx)  # indices are fixed
        assert not torch.equal(m.centroids, c)  # centroids moved
    if scope == "network":
        assert layers[0].centroids is layers[1].centroids


# ----------------------------------------------------------------------------------------
# serialisation of the float clustered model
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "network"])
def test_state_dict_round_trip(scope):
    model = small_net()
    clustered = torchlns.cluster_kernels(model, 3, scope=scope)
    buf = io.BytesIO()
    torch.save(clustered.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = torchlns.cluster_kernels(small_net(seed=7), 3, scope=scope)  # same structure, other values
    x = torch.randn(2, 3, 8, 8)
    assert not torch.equal(fresh(x), clustered(x))
    fresh.load_state_dict(sd)
    for k, v in clustered.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh[0].indices.dtype == torch.long
    assert torch.equal(fresh(x), clustered(x))
    if scope == "network":
        assert fresh[0].centroids is fresh[2].centroids


def test_constructor_and_load_state_dict():
    conv = torchlns.cluster_kernels(nn.Conv2d(4, 6, 3, padding=1, groups=2), 5)
    fresh = ClusteredConv2d(4, 6, 3, 5, padding=1, groups=2)
    fresh.load_state_dict(conv.state_dict())
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(fresh(x), conv(x))


def test_torch_save_whole_model_keeps_sharing():
    clustered = torchlns.cluster_kernels(small_net(), 3, scope="network")
    buf = io.BytesIO()
    torch.save(clustered, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), clustered(x))
    assert loaded[0].centroids is loaded[2].centroids


# ----------------------------------------------------------------------------------------
# LNS: convert with a cluster config
# ----------------------------------------------------------------------------------------
def lns_clustered(scope="layer", C=4, model=None, **config):
    model = small_net() if model is None else model
    cal = calibration_batches(torch.zeros(2, 3, 8, 8), n=2)
    cfg = ConvertConfig(cluster=ClusterConfig(num_clusters=C, scope=scope), **config)
    return model, torchlns.convert(model, cfg, cal)


def test_convert_with_cluster_config_makes_lns_clustered_layers():
    model, lns = lns_clustered()
    assert type(lns[0]) is LNSClusteredConv2d and type(lns[2]) is LNSClusteredConv2d
    assert type(lns[4]) is torchlns.LNSConv2d  # 1×1: not clustered, converted densely
    assert [s.layer for s in lns.cluster_report] == ["0", "2"]
    float_clustered = torchlns.cluster_kernels(model, 4)
    for i in (0, 2):
        m = lns[i]
        assert isinstance(m.centroids, torchlns.LNSTensor) and isinstance(m.kernel_scales, torchlns.LNSTensor)
        assert m.kernel_scales.fmt.bits == 8 and m.kernel_scales.fmt.frac_bits == torchlns.LNS8.frac_bits
        assert torch.equal(m.indices, float_clustered[i].indices)  # the float clustering, as is
        assert m.groups == model[i].groups and m.padding == model[i].padding
    assert type(model[0]) is nn.Conv2d  # convert leaves its input alone


def test_lns_weight_is_scale_times_centroid():
    model, lns = lns_clustered()
    float_clustered = torchlns.cluster_kernels(model, 4)
    for i in (0, 2):
        m = lns[i]
        w = m.weight
        assert isinstance(w, torchlns.LNSTensor) and w.shape == model[i].weight.shape
        deq = w.dequantize()
        # exactly the dequantized scale times the dequantized centroid (up to float32 rounding) ...
        want = m.kernel_scales.dequantize()[..., None, None] * m.centroids.dequantize()[m.indices]
        assert torch.allclose(deq, want, rtol=1e-6, atol=0)
        # ... and so, within two LNS8 roundings (2^(1/16) each), the float clustered weight
        ref = float_clustered[i].weight.detach()
        assert torch.allclose(deq, ref, rtol=0.1, atol=1e-3 * ref.abs().max().item())
        assert torch.equal(torch.sign(deq), torch.sign(ref))  # negative scales flip the codes' signs


def test_lns_zero_kernel_stays_zero():
    model = small_net()
    with torch.no_grad():
        model[0].weight[2, 1] = 0
    _, lns = lns_clustered(model=model)
    assert torch.equal(lns[0].weight.dequantize()[2, 1], torch.zeros(3, 3))
    assert (lns[0].weight.dequantize().flatten(2).abs().sum(-1) != 0).sum() == 8 * 3 - 1


def test_lns_forward_equals_lns_conv2d_bit_for_bit():
    _, lns = lns_clustered()
    x = torch.randn(2, 3, 8, 8)
    for i, inp in ((0, x), (2, lns[1](lns[0](x)))):
        m = lns[i]
        xq = torchlns.LNSTensor.from_float(inp, m.fmt, int(m.input_param))  # what the layer encodes
        want = torchlns.lns_conv2d(xq, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.mac)
        assert torch.equal(m(inp), want)
    # and the chip's output approximates the float clustered model
    fc = torchlns.cluster_kernels(small_net(), 4)
    y, ref = lns(x), fc(x)
    assert ((y - ref).norm() / ref.norm()).item() < 0.15


def test_lns_forward_with_chip_mac():
    _, lns = lns_clustered(mac=torchlns.CHIP_MAC)
    m = lns[0]
    assert m.acc_lsb is not None
    x = torch.randn(2, 3, 8, 8)
    xq = torchlns.LNSTensor.from_float(x, m.fmt, int(m.input_param))
    want = torchlns.lns_conv2d(xq, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.mac,
                               acc_lsb=m.acc_lsb)
    assert torch.equal(m(x), want)


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_lns_state_dict_round_trip_bit_exact(scope):
    _, lns = lns_clustered(scope)
    buf = io.BytesIO()
    torch.save(lns.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    _, fresh = lns_clustered(scope, model=small_net(seed=9))
    x = torch.randn(2, 3, 8, 8)
    assert not torch.equal(fresh(x), lns(x))
    fresh.load_state_dict(sd)
    for i in (0, 2):
        for name in ("centroids", "kernel_scales"):
            a, b = getattr(fresh[i], name), getattr(lns[i], name)
            assert torch.equal(a.codes, b.codes) and torch.equal(a.param, b.param) and a.fmt == b.fmt
        assert torch.equal(fresh[i].indices, lns[i].indices)
    assert torch.equal(fresh(x), lns(x))


def test_lns_torch_save_whole_model_bit_exact():
    _, lns = lns_clustered()
    buf = io.BytesIO()
    torch.save(lns, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    assert type(loaded[0]) is LNSClusteredConv2d and torch.equal(loaded(x), lns(x))


def test_lns_qat_reduces_loss():
    model, lns = lns_clustered(C=2)
    x = torch.randn(8, 3, 8, 8)
    target = model(x).detach()
    eval_loss = nmse(lns(x), target).item()
    indices = [lns[i].indices.clone() for i in (0, 2)]
    torchlns.enable_qat(lns).train()
    masters = []
    for i in (0, 2):
        m = lns[i]
        assert isinstance(m.centroids_float, nn.Parameter) and isinstance(m.scales_float, nn.Parameter)
        # the masters start from the stored codes
        assert torch.equal(m.centroids_float.detach(), m.centroids.dequantize())
        masters.append((m.centroids_float.detach().clone(), m.scales_float.detach().clone()))
    opt = torch.optim.SGD(lns.parameters(), lr=0.02)
    losses = []
    for _ in range(8):
        loss = nmse(lns(x), target)
        opt.zero_grad()
        loss.backward()
        for i in (0, 2):
            assert lns[i].centroids_float.grad.abs().sum() > 0 and lns[i].scales_float.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    lns.eval()  # re-encodes the masters into codes
    assert nmse(lns(x), target).item() < 0.8 * eval_loss
    for i, idx, (c0, s0) in zip((0, 2), indices, masters):
        m = lns[i]
        assert torch.equal(m.indices, idx)
        assert not torch.equal(m.centroids_float.detach(), c0) and not torch.equal(m.scales_float.detach(), s0)
        want = torchlns.LNSTensor.from_float(m.centroids_float.detach(), m.fmt)
        assert isinstance(m.centroids, torchlns.LNSTensor)
        assert torch.equal(m.centroids.codes, want.codes) and torch.equal(m.centroids.param, want.param)


def test_lns_network_scope_qat_keeps_centroids_shared():
    # Network scope means one centroid table for all layers (chip-model.md section 6). QAT
    # must not fork it into one table per layer, or the model no longer fits the chip.
    _, lns = lns_clustered("network", C=2)
    assert torch.equal(lns[0].centroids.codes, lns[2].centroids.codes)  # shared after conversion
    before = lns[0].centroids.codes.clone()
    x = torch.randn(8, 3, 8, 8)
    target = small_net()(x).detach()
    torchlns.enable_qat(lns).train()
    opt = torch.optim.SGD(lns.parameters(), lr=0.5)
    for _ in range(8):
        loss = F.mse_loss(lns(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lns.eval()
    a, b = lns[0].centroids, lns[2].centroids
    assert not (torch.equal(a.codes, before) and torch.equal(b.codes, before))  # the centroids did train
    assert torch.equal(a.codes, b.codes) and torch.equal(a.param, b.param)
    # and so the size report still counts one table
    fields = [r["fields"] for r in torchlns.size_report(lns).rows]
    assert sum("centroids codes" in f for f in fields) == 1


def test_fp8_cluster_config_converts_to_dense_fp8():
    model, fp8 = lns_clustered(fmt=torchlns.FP8_E4M3)
    float_clustered = torchlns.cluster_kernels(model, 4)
    for i in (0, 2):
        m = fp8[i]
        assert type(m) is torchlns.LNSConv2d and isinstance(m.weight, torchlns.FP8Tensor)
        ref = float_clustered[i].weight.detach()
        # E4M3 has 3 mantissa bits: relative error at most 2^-4 for normal values
        assert torch.allclose(m.weight.dequantize(), ref, rtol=2**-4, atol=1e-2 * ref.abs().max().item())
    with pytest.raises(TypeError):  # the LNS layer has no FP8 form
        LNSClusteredConv2d.from_float(float_clustered[0], ConvertConfig(fmt=torchlns.FP8_E4M3), input_param=1.0)
