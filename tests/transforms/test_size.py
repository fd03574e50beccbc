"""size_report: every stored field at its own bit width (chip-model.md section 6).

Expected sizes are counted by hand from the rules in Note: size accounting (size.py), not
from the library's own arithmetic.
"""

import json

import pytest
import torch
import torch.nn as nn

import torchlns
from torchlns import ClusterConfig, ClusteredConv2d, ConvertConfig, LNSClusteredConv2d, LNSFormat, LNSTensor

X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
CAL = [torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def small_net() -> nn.Module:
    # 3·4·9 = 108 weights; 4·2 = 8 weights; 2·4·4 = 32 features -> 5: 160 weights
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(32, 5)).eval()


def rows_by_layer(report):
    return {r["layer"]: r for r in report.rows}


def check_row(row, fields: dict, float32_bits: int):
    assert row["fields"] == fields
    bits = sum(fields.values())
    assert row["bits"] == bits and row["bytes"] == bits / 8
    assert row["float32_bytes"] == float32_bits / 8
    assert row["ratio"] == pytest.approx(float32_bits / bits)


def check_totals(report, bits: int, float32_bits: int):
    assert report.total_bytes == bits / 8
    assert report.float32_bytes == float32_bits / 8
    assert report.ratio == pytest.approx(float32_bits / bits)


# float32 bits each layer of small_net replaces: weights and bias at 32 bits
F32 = {"0": (108 + 4) * 32, "2": (8 + 2) * 32, "4": (160 + 5) * 32}


# ----------------------------------------------------------------------------------------
# dense layers
# ----------------------------------------------------------------------------------------
def test_hand_count_lns8():
    lns = torchlns.convert(small_net(), ConvertConfig(), CAL)
    report = torchlns.size_report(lns)
    rows = rows_by_layer(report)
    assert list(rows) == ["0", "2", "4"]  # ReLU and Flatten store nothing
    # codes at 8 bits, one 8-bit offset per output channel, an 8-bit input offset, 32-bit bias
    want = {
        "0": {"weight codes": 108 * 8, "weight offsets": 4 * 8, "input offset": 8, "bias": 4 * 32},
        "2": {"weight codes": 8 * 8, "weight offsets": 2 * 8, "input offset": 8, "bias": 2 * 32},
        "4": {"weight codes": 160 * 8, "weight offsets": 5 * 8, "input offset": 8, "bias": 5 * 32},
    }
    for name, fields in want.items():
        check_row(rows[name], fields, F32[name])
        assert rows[name]["format"] == str(torchlns.LNS8)
    assert rows["0"]["kind"] == "LNSConv2d" and rows["4"]["kind"] == "LNSLinear"
    assert sum(map(sum, (f.values() for f in want.values()))) == 1032 + 152 + 1488  # the hand sums
    check_totals(report, 2672, sum(F32.values()))
    assert report.total_bytes == 334 and report.float32_bytes == 1148


def test_hand_count_chip_mac_adds_acc_lsb():
    lns = torchlns.convert(small_net(), ConvertConfig(mac=torchlns.CHIP_MAC), CAL)
    rows = rows_by_layer(torchlns.size_report(lns))
    for name, (out, k) in {"0": (4, 108), "2": (2, 8), "4": (5, 160)}.items():
        check_row(rows[name], {"weight codes": k * 8, "weight offsets": out * 8, "input offset": 8,
                               "acc_lsb": 8, "bias": out * 32}, F32[name])
    assert torchlns.size_report(lns).total_bytes == (2672 + 3 * 8) / 8


@pytest.mark.parametrize("fmt", [torchlns.FP8_E4M3, torchlns.INT8])
def test_hand_count_fp8_int8_scales_at_32_bits(fmt):
    model = torchlns.convert(small_net(), ConvertConfig(fmt=fmt), CAL)
    report = torchlns.size_report(model)
    rows = rows_by_layer(report)
    total = 0
    for name, (out, k) in {"0": (4, 108), "2": (2, 8), "4": (5, 160)}.items():
        fields = {"weight codes": k * 8, "weight scales": out * 32, "input scale": 32, "bias": out * 32}
        check_row(rows[name], fields, F32[name])
        assert rows[name]["format"] == str(fmt)
        total += sum(fields.values())
    assert total == 1152 + 224 + 1632
    check_totals(report, total, sum(F32.values()))


def test_dynamic_activations_and_per_tensor_weights():
    # no static input offset is stored; a per-tensor weight has one offset
    cfg = ConvertConfig(activation="dynamic", weight_granularity="tensor")
    rows = rows_by_layer(torchlns.size_report(torchlns.convert(small_net(), cfg)))
    check_row(rows["0"], {"weight codes": 108 * 8, "weight offsets": 8, "bias": 4 * 32}, F32["0"])
    check_row(rows["4"], {"weight codes": 160 * 8, "weight offsets": 8, "bias": 5 * 32}, F32["4"])


def test_lns_bits_follow_the_format():
    fmt = LNSFormat(bits=6, frac_bits=2)
    rows = rows_by_layer(torchlns.size_report(torchlns.convert(small_net(), ConvertConfig(fmt=fmt), CAL)))
    check_row(rows["0"], {"weight codes": 108 * 6, "weight offsets": 4 * 8, "input offset": 8, "bias": 4 * 32},
              F32["0"])


def test_float_model_is_ratio_one():
    report = torchlns.size_report(small_net())
    rows = rows_by_layer(report)
    check_row(rows["0"], {"weight": 108 * 32, "bias": 4 * 32}, F32["0"])
    assert rows["0"]["kind"] == "Conv2d" and rows["0"]["format"] == "float32"
    check_totals(report, sum(F32.values()), sum(F32.values()))
    assert report.ratio == 1.0


# ----------------------------------------------------------------------------------------
# clustered layers
# ----------------------------------------------------------------------------------------
def two_conv_net() -> nn.Module:
    # 3·4 = 12 and 4·4 = 16 kernels of 3×3; C = 5 clusters -> ceil(log2 5) = 3-bit indices
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()


F32_CL = {"0": (12 * 9 + 4) * 32, "2": (16 * 9 + 4) * 32}


def test_hand_count_float_clustered_layer_scope():
    clustered = torchlns.cluster_kernels(two_conv_net(), 5)
    assert clustered[0].num_clusters == clustered[2].num_clusters == 5 and clustered[0].index_bits == 3
    report = torchlns.size_report(clustered)
    rows = rows_by_layer(report)
    # indices at 3 bits, float32 centroids (5·9), float32 per-kernel scales, float32 bias
    check_row(rows["0"], {"indices": 12 * 3, "centroids": 5 * 9 * 32, "kernel scales": 12 * 32, "bias": 4 * 32},
              F32_CL["0"])
    check_row(rows["2"], {"indices": 16 * 3, "centroids": 5 * 9 * 32, "kernel scales": 16 * 32, "bias": 4 * 32},
              F32_CL["2"])
    assert rows["0"]["kind"] == "ClusteredConv2d"
    check_totals(report, 1988 + 2128, sum(F32_CL.values()))


def test_hand_count_float_clustered_network_scope_counts_centroids_once():
    clustered = torchlns.cluster_kernels(two_conv_net(), 5, scope="network")
    rows = rows_by_layer(torchlns.size_report(clustered))
    check_row(rows["0"], {"indices": 12 * 3, "centroids": 5 * 9 * 32, "kernel scales": 12 * 32, "bias": 4 * 32},
              F32_CL["0"])
    check_row(rows["2"], {"indices": 16 * 3, "kernel scales": 16 * 32, "bias": 4 * 32}, F32_CL["2"])


def lns_clustered(scope: str):
    cfg = ConvertConfig(cluster=ClusterConfig(num_clusters=5, scope=scope))
    return torchlns.convert(two_conv_net(), cfg, CAL)


def test_hand_count_lns_clustered_layer_scope():
    lns = lns_clustered("layer")
    assert type(lns[0]) is LNSClusteredConv2d and lns[0].num_clusters == 5
    report = torchlns.size_report(lns)
    rows = rows_by_layer(report)
    # LNS8 centroid codes plus one 8-bit offset; 8-bit kernel scale codes plus their 8-bit offset
    common = {"centroids codes": 5 * 9 * 8, "centroids offsets": 8, "kernel scale offset": 8, "input offset": 8,
              "bias": 4 * 32}
    check_row(rows["0"], {"indices": 12 * 3, "kernel scales": 12 * 8, **common}, F32_CL["0"])
    check_row(rows["2"], {"indices": 16 * 3, "kernel scales": 16 * 8, **common}, F32_CL["2"])
    assert rows["0"]["format"] == str(torchlns.LNS8)
    check_totals(report, 644 + 688, sum(F32_CL.values()))


def test_hand_count_lns_clustered_network_scope_counts_centroids_once():
    rows = rows_by_layer(torchlns.size_report(lns_clustered("network")))
    check_row(rows["0"], {"indices": 12 * 3, "centroids codes": 5 * 9 * 8, "centroids offsets": 8,
                          "kernel scales": 12 * 8, "kernel scale offset": 8, "input offset": 8, "bias": 4 * 32},
              F32_CL["0"])
    check_row(rows["2"], {"indices": 16 * 3, "kernel scales": 16 * 8, "kernel scale offset": 8, "input offset": 8,
                          "bias": 4 * 32}, F32_CL["2"])


def test_lns_clustered_with_chip_mac():
    lns = torchlns.convert(two_conv_net(), ConvertConfig(mac=torchlns.CHIP_MAC, cluster=ClusterConfig(5)), CAL)
    assert rows_by_layer(torchlns.size_report(lns))["0"]["fields"]["acc_lsb"] == 8


def test_fp8_clustered_is_counted_dense():
    # FP8 has no per-kernel log offsets: the clustered layer is stored as a dense FP8 conv
    fp8 = torchlns.convert(two_conv_net(), ConvertConfig(fmt=torchlns.FP8_E4M3, cluster=ClusterConfig(5)), CAL)
    rows = rows_by_layer(torchlns.size_report(fp8))
    check_row(rows["0"], {"weight codes": 108 * 8, "weight scales": 4 * 32, "input scale": 32, "bias": 4 * 32},
              F32_CL["0"])


@pytest.mark.parametrize("C, bits", [(2, 1), (3, 2), (16, 4), (17, 5), (1024, 10)])
def test_index_bits_are_ceil_log2_C(C, bits):
    layer = ClusteredConv2d(8, 8, 3, C, bias=False)
    row = torchlns.size_report(layer).rows[0]
    assert row["fields"]["indices"] == 64 * bits
    assert row["fields"]["centroids"] == C * 9 * 32


def test_spec_example_10_bit_indices_give_28_8x():
    # 3×3 fp32 kernels (36 bytes each) replaced by 10-bit indices (C = 1024): 288 / 10 = 28.8×
    layer = ClusteredConv2d(64, 64, 3, 1024, bias=False)
    row = torchlns.size_report(layer).rows[0]
    kernels = 64 * 64
    assert row["fields"]["indices"] == kernels * 10
    assert row["float32_bytes"] == kernels * 36
    assert row["float32_bytes"] * 8 / row["fields"]["indices"] == pytest.approx(28.8)
    # the same index field on the chip
    centroids = LNSTensor.from_float(torch.randn(1024, 3, 3), torchlns.LNS8)
    scales = LNSTensor.from_float(torch.rand(64, 64) + 0.5, LNSFormat(8, 3))
    lns = LNSClusteredConv2d(centroids, torch.randint(1024, (64, 64)), scales)
    lrow = torchlns.size_report(lns).rows[0]
    assert lrow["layer"] == "" and lrow["fields"]["indices"] == kernels * 10
    assert lrow["float32_bytes"] * 8 / lrow["fields"]["indices"] == pytest.approx(28.8)
    assert lrow["fields"]["kernel scales"] == kernels * 8 and lrow["fields"]["centroids codes"] == 1024 * 9 * 8


# ----------------------------------------------------------------------------------------
# BN, reference, output forms
# ----------------------------------------------------------------------------------------
def bn_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked += 10
    return model.eval()


BN_BITS = {"weight": 4 * 32, "bias": 4 * 32, "running_mean": 4 * 32, "running_var": 4 * 32}


def test_bn_in_place_counts_params_not_num_batches_tracked():
    report = torchlns.size_report(bn_net())
    rows = rows_by_layer(report)
    check_row(rows["1"], BN_BITS, 16 * 32)
    assert "num_batches_tracked" not in rows["1"]["fields"]
    check_totals(report, (108 + 16 + 325) * 32, (108 + 16 + 325) * 32)
    # a BN that convert keeps (fold_bn=False) is counted the same way
    lns = torchlns.convert(bn_net(), ConvertConfig(fold_bn=False), CAL)
    rows = rows_by_layer(torchlns.size_report(lns))
    assert rows["1"]["kind"] == "BatchNorm2d"
    check_row(rows["1"], BN_BITS, 16 * 32)
    check_row(rows["0"], {"weight codes": 108 * 8, "weight offsets": 4 * 8, "input offset": 8}, 108 * 32)


def test_reference_uses_original_float32_size():
    model = bn_net()
    lns = torchlns.convert(model, ConvertConfig(), CAL)  # BN folds: conv 0 gains a bias
    plain = torchlns.size_report(lns)
    ref = torchlns.size_report(lns, reference=model)
    conv_f32, lin_f32 = (108 + 4) * 32, (320 + 5) * 32
    original_f32 = (108 + 16 + 320 + 5) * 32  # conv without bias, BN's 4 tensors, linear
    assert plain.float32_bytes == (conv_f32 + lin_f32) / 8
    assert ref.float32_bytes == original_f32 / 8
    assert ref.rows == plain.rows and ref.total_bytes == plain.total_bytes
    bits = (108 * 8 + 32 + 8 + 128) + (320 * 8 + 40 + 8 + 160)
    check_totals(ref, bits, original_f32)


def test_str_is_a_table():
    lns = torchlns.convert(small_net(), ConvertConfig(), CAL)
    report = torchlns.size_report(lns)
    text = str(report)
    lines = text.splitlines()
    assert len(lines) == 2 + len(report.rows) + 1  # header, rule, rows, total
    for r in report.rows:
        assert any(line.split()[0] == r["layer"] and r["kind"] in line for line in lines)
    assert lines[-1].split()[0] == "total" and "334" in lines[-1] and "1,148" in lines[-1]
    assert f"{report.ratio:.2f}x" in lines[-1]
    assert "(root)" in str(torchlns.size_report(nn.Conv2d(1, 1, 3)))  # a model that is one layer


def test_to_dicts_returns_plain_dicts():
    report = torchlns.size_report(torchlns.convert(small_net(), ConvertConfig(), CAL))
    dicts = report.to_dicts()
    assert dicts == report.rows and all(type(d) is dict for d in dicts)
    assert set(dicts[0]) == {"layer", "kind", "format", "fields", "bits", "bytes", "float32_bytes", "ratio"}
    assert json.loads(json.dumps(dicts)) == dicts  # plain builtins only
    dicts[0]["bits"] = -1
    assert report.rows[0]["bits"] != -1  # a copy, not the report's own rows


def test_empty_model():
    report = torchlns.size_report(nn.Sequential(nn.ReLU()))
    assert report.rows == [] and report.total_bytes == 0


def test_the_table_prints_whole_bytes_and_says_what_the_reference_adds():
    import torchlns

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    q = torchlns.convert(net, torchlns.ConvertConfig(progress=False), [torch.rand(2, 3, 12, 12)])
    alone, against = str(torchlns.size_report(q)), str(torchlns.size_report(q, reference=net))
    assert ".0 " not in alone + " " and not any(cell.endswith(".0") for cell in alone.split())
    total = next(line for line in alone.splitlines() if line.startswith("total"))
    assert total.split() in [line.split() for line in against.splitlines()]  # convert and report agree
    extra = against.splitlines()[-1]
    assert extra.startswith("float32 model") and "batch norms" in extra
    assert f"{sum(p.numel() for p in net.parameters()) * 4 + sum(b.numel() * 4 for n, b in net.named_buffers() if 'num_batches' not in n):,}" in extra
