"""torchlns.cost_report (torchlns/deploy/cost.py): MACs, bytes, placement, latency and energy, counted by hand."""

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, INT8, ConvertConfig
from torchlns.deploy.cost import CHIPS, ChipSpec, Energies, HOROWITZ_45NM, KiB, MiB, mac_count, mac_energy

MICRO = CHIPS["micro"]


def _convert(model, x, **config):
    return torchlns.convert(model.eval(), ConvertConfig(**config), [x])


def _flop_macs(m, x):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(x)
    return counter.get_total_flops() // 2


# ----------------------------------------------------------------------------------------
# MACs
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(7, 5), (3, 7)),
    (nn.Linear(7, 5), (2, 4, 7)),  # leading dims multiply
    (nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    (nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (1, 4, 9, 7)),
    (nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), (1, 2, 3, 5, 5)),
    (nn.ConvTranspose1d(4, 2, 3, stride=2), (2, 4, 6)),  # no cropping: every (input, tap) pair lands
    (nn.ConvTranspose2d(4, 6, (2, 3), stride=(2, 1), groups=2), (1, 4, 5, 4)),
    (nn.ConvTranspose3d(2, 2, 2, stride=2), (1, 2, 2, 3, 3)),
])
def test_macs_match_torch_flop_counter(layer, shape):
    x = torch.randn(shape)
    report = torchlns.cost_report(layer, x)
    assert report.rows[0].macs == report.macs == _flop_macs(layer, x)


def test_transposed_conv_counts_only_the_taps_that_land_in_the_output():
    # L_in=4, k=3, stride 2, padding 1: L_out = 7. Tap t of input i lands at 2i - 1 + t:
    # t=0 lands for i = 1..3, t=1 for i = 0..3, t=2 for i = 0..2: 10 pairs, not 4 * 3 = 12.
    layer = nn.ConvTranspose1d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 4)
    assert layer(x).shape[-1] == 7
    assert torchlns.cost_report(layer, x).macs == 2 * 5 * 3 * 10
    assert _flop_macs(layer, x) == 2 * 5 * 3 * 12  # torch's counter charges the cropped taps too
    q = _convert(nn.Sequential(layer), x)
    assert torchlns.cost_report(q, x).macs == 2 * 5 * 3 * 10  # the LNS layer counts the same


@pytest.mark.parametrize("n_in, k, stride, padding, dilation, output_padding",
                         [(n, k, s, p, d, op) for n in (1, 3, 6) for k in (1, 2, 4) for s in (1, 2, 3)
                          for p in (0, 1, 3) for d in (1, 2) for op in (0, 1) if op < max(s, d)])
def test_transposed_taps_brute_force(n_in, k, stride, padding, dilation, output_padding):
    n_out = (n_in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1
    if n_out < 1:
        return
    layer = nn.ConvTranspose1d(1, 1, k, stride, padding, output_padding, dilation=dilation)
    x = torch.randn(1, 1, n_in)
    expect = sum(1 for i in range(n_in) for t in range(k) if 0 <= i * stride - padding + t * dilation < n_out)
    assert mac_count(layer, x, layer(x)) == expect


# ----------------------------------------------------------------------------------------
# bytes, by hand
# ----------------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny().eval(), torch.randn(1, 2, 5, 5)


def test_hand_counted_float_net(tiny):
    model, x = tiny
    r = torchlns.cost_report(model, x, MICRO)
    conv, fc = r.rows
    assert (conv.layer, fc.layer) == ("conv", "fc")
    assert conv.macs == 4 * 5 * 5 * 2 * 9 and fc.macs == 3 * 100 and r.macs == 2100
    assert conv.weight_bytes == (72 + 4) * 4 and fc.weight_bytes == (300 + 3) * 4
    assert (conv.act_in_bytes, conv.act_out_bytes) == (50 * 4, 100 * 4)
    assert (fc.act_in_bytes, fc.act_out_bytes) == (100 * 4, 3 * 4)
    assert r.weights_fit and r.dram_bytes == 0
    assert conv.mac_pj == pytest.approx(3.7 + 0.9)


def test_hand_counted_lns8_chip_net(tiny):
    model, x = tiny
    q = _convert(model, x, mac=CHIP_MAC)
    r = torchlns.cost_report(q, x, MICRO)
    conv, fc = r.rows
    assert r.macs == 2100
    # codes at 8 bits, one 8-bit offset per output channel, the input offset and acc_lsb at 8, float32 bias
    assert conv.weight_bytes == 72 + 4 + 1 + 1 + 4 * 4
    assert fc.weight_bytes == 300 + 3 + 1 + 1 + 3 * 4
    assert r.weight_bytes == torchlns.size_report(q).total_bytes
    assert (conv.act_in_bytes, conv.act_out_bytes, fc.act_in_bytes, fc.act_out_bytes) == (50, 100, 100, 3)
    assert conv.format == "LNS8(F=3) MAC(lut8, fixed32)"


def test_dynamic_activations_carry_their_parameters():
    lin = nn.Linear(16, 2, bias=False)
    x = torch.randn(3, 16)
    per_block = _convert(nn.Sequential(lin), x, activation="dynamic", activation_block_size=8)
    row = torchlns.cost_report(per_block, x).rows[0]
    assert row.act_in_bytes == 3 * 16 + 3 * 2  # 48 codes and an 8-bit offset per block of 8
    fp8 = _convert(nn.Sequential(lin), x, fmt=FP8_E4M3, activation="dynamic", activation_block_size=8)
    assert torchlns.cost_report(fp8, x).rows[0].act_in_bytes == 3 * 16 + 3 * 2 * 4  # float32 scales


def test_a_layer_called_twice_counts_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.fc(self.fc(x))

    r = torchlns.cost_report(Twice(), torch.randn(2, 4), MICRO)
    (row,) = r.rows
    assert row.calls == 2 and row.macs == 2 * 2 * 16 and row.weight_bytes == 64
    assert row.sram_bytes == 2 * (64 + 32 + 32)  # the weights are read and activations moved on each call


def test_unfolded_batch_norm_counts_bytes_not_macs():
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval()
    r = torchlns.cost_report(model, torch.randn(1, 3, 2, 2))
    bn = next(row for row in r.rows if row.layer == "1")
    assert bn.macs == 0 and bn.calls == 0 and bn.weight_bytes == 4 * 4 * 4  # weight, bias, mean, var
    assert r.weight_bytes == torchlns.size_report(model).total_bytes


def test_shared_centroid_tables_count_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    x = torch.randn(2, 4, 6, 6)
    q = torchlns.convert(model, ConvertConfig(cluster=torchlns.ClusterConfig(4, "network")), [x])
    r = torchlns.cost_report(q, x)
    assert r.weight_bytes == torchlns.size_report(q).total_bytes
    sizes = {row["layer"]: row for row in torchlns.size_report(q).rows}
    assert {row.layer: row.weight_bytes for row in r.rows} == {k: v["bytes"] for k, v in sizes.items()}
    assert "centroids codes" in sizes["0"]["fields"] and "centroids codes" not in sizes["2"]["fields"]
    # the second layer: 64 indices at 2 bits, 64 8-bit kernel scales, their offset, the input offset, bias
    assert r.rows[-1].weight_bytes == 64 * 2 / 8 + 64 + 1 + 1 + 8 * 4


# ----------------------------------------------------------------------------------------
# placement, latency and energy
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_layer():
    """LNS8 chip Linear(4 -> 2), no bias: 8 MACs, 8 codes + 2 offsets + input offset + acc_lsb = 12 bytes."""
    torch.manual_seed(0)
    x = torch.randn(1, 4)
    return _convert(nn.Sequential(nn.Linear(4, 2, bias=False)), x, mac=CHIP_MAC), x


def test_one_layer_energy_by_hand(one_layer):
    q, x = one_layer
    r = torchlns.cost_report(q, x, MICRO)
    (row,) = r.rows
    assert (row.macs, row.weight_bytes, row.act_in_bytes, row.act_out_bytes) == (8, 12, 4, 2)
    # MAC: int8 add of the logs 0.03 + conversion and saturation (8·3 table + 32·5 shifter + 2·32) mux bits
    # at 0.001 pJ = 0.248 + int32 accumulate 0.1 = 0.378 pJ
    assert row.mac_pj == pytest.approx(0.378)
    assert row.energy_mac_pj == pytest.approx(8 * 0.378)
    # SRAM: 12 weight bytes + 6 activation bytes = 18 bytes = 2.25 64-bit accesses of an 8 KiB bank (10 pJ)
    assert row.sram_bytes == 18 and row.energy_sram_pj == pytest.approx(18 / 8 * 10)
    assert row.dram_bytes == 0 and row.energy_dram_pj == 0
    assert r.energy_pj == pytest.approx(8 * 0.378 + 22.5)
    assert r.tops_per_w == pytest.approx(2 * 8 / (8 * 0.378 + 22.5))
    assert row.latency_s == pytest.approx(8 / (256 * 500e6)) and row.memory_s == 0


def test_one_layer_streamed_and_spilled_by_hand(one_layer):
    q, x = one_layer
    chip = MICRO.replace(weight_sram_bytes=0, activation_sram_bytes=5)
    (row,) = torchlns.cost_report(q, x, chip).rows
    assert row.weights_on_chip is False and row.acts_on_chip is False
    assert row.dram_bytes == 12 + 6 and row.sram_bytes == 0
    assert row.energy_dram_pj == pytest.approx(18 / 8 * 1300)
    assert row.memory_s == pytest.approx(18 / 3.2e9)
    assert row.latency_s == pytest.approx(max(18 / 3.2e9, 8 / (256 * 500e6)))


def test_greedy_placement_in_call_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Linear(4, 4, bias=False)  # defined first, runs last
            self.a = nn.Linear(4, 8, bias=False)  # 128 bytes
            self.b = nn.Linear(8, 4, bias=False)  # 128 bytes

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    r = torchlns.cost_report(Net(), torch.randn(1, 4), MICRO.replace(weight_sram_bytes=128 + 64))
    assert [row.layer for row in r.rows] == ["a", "b", "c"]
    placed = {row.layer: row.weights_on_chip for row in r.rows}
    assert placed == {"a": True, "b": False, "c": True}  # b does not fit after a; c (64 bytes) still does
    assert not r.weights_fit and r.resident_weight_bytes == 192
    assert r.dram_bytes == 128


def test_mac_energy_per_format(tiny):
    model, x = tiny
    e = HOROWITZ_45NM
    expect = {
        "float32": e.fp32_mult + e.fp32_add,
        "fp8": e.int8_mult + e.fp32_add,
        "int8": e.int8_mult + e.int32_add,
        # the log add, the F=3 table read (23- or 8-bit words: P·F mux bits), then an 8-bit exponent add
        # and an fp32 add, or a 32-bit shifter (32·5), the product's and the sum's saturation (2·32) and an int32 add
        "lns8 ideal": e.int8_add + 23 * 3 * e.mux2_bit + e.int8_add + e.fp32_add,
        "lns8 chip": e.int8_add + (8 * 3 + 32 * 5 + 2 * 32) * e.mux2_bit + e.int32_add,
    }
    models = {"float32": model, "fp8": _convert(model, x, fmt=FP8_E4M3), "int8": _convert(model, x, fmt=INT8),
              "lns8 ideal": _convert(model, x), "lns8 chip": _convert(model, x, mac=CHIP_MAC)}
    got = {name: mac_energy(m.conv)[0] for name, m in models.items()}
    assert got == pytest.approx(expect)
    table = torchlns.compare_costs(models, x, MICRO)
    assert list(table.reports) == list(models)
    energies = [r.energy_mac_pj for r in table.reports.values()]
    assert energies == pytest.approx([2100 * v for v in expect.values()])
    text = table.table(markdown=True)
    assert text.count("\n") == 2 + len(models) and "| lns8 chip |" in text
    assert {d["model"] for d in table.to_dicts()} == set(models)


def test_lns_mac_energy_follows_the_datapath():
    """LUT entries and width, accumulator width, saturation and chunks each move the MAC's energy."""
    from torchlns.deploy.cost import lns_mac_energy

    e = HOROWITZ_45NM
    chip = torchlns.MACConfig.chip()

    def pj(fmt=torchlns.LNS8, **changes):
        return lns_mac_energy(fmt, chip.replace(**changes), e)[0]

    assert pj(lut_bits=6) < pj() < pj(lut_bits=12)  # narrower table words
    assert pj(torchlns.LNSFormat(8, 2)) < pj()  # fewer entries (the log add is the same 8 bits)
    assert pj(acc_bits=16) < pj(acc_bits=24) < pj()  # narrower shifter and adder
    assert pj(overflow="wrap") == pytest.approx(pj() - 2 * 32 * e.mux2_bit)  # wrap needs no saturation
    assert pj(conversion="mitchell") == pytest.approx(pj() - 8 * 3 * e.mux2_bit)  # no table
    chunked = pj(chunk=16, chunk_bits=16)
    assert chunked == pytest.approx(e.int8_add + (24 + 16 * 4 + 32) * e.mux2_bit + e.int_add(16) +
                                    (e.int32_add + 32 * e.mux2_bit) / 16)
    assert chunked < pj()
    value, formula = lns_mac_energy(torchlns.LNS8, chip.replace(chunk=16, chunk_bits=16), e)
    assert formula == "int8 add + 120 mux bits + int16 add + int32 add / 16"


def test_energies_interpolate_through_horowitz():
    e = HOROWITZ_45NM
    assert e.int_add(8) == pytest.approx(0.03) and e.int_add(32) == pytest.approx(0.1)
    assert e.int_mult(8) == pytest.approx(0.2) and e.int_mult(32) == pytest.approx(3.1)
    assert e.int_mult(4) < e.int_mult(8) < e.int_mult(16) < e.int_mult(32)
    assert e.sram_per_64b(8 * KiB) == pytest.approx(10) and e.sram_per_64b(1 * MiB) == pytest.approx(100)
    assert 10 < e.sram_per_64b(16 * KiB) < 20
    with pytest.raises(ValueError, match="outside the published range"):
        e.sram_per_64b(4 * KiB)


@pytest.mark.parametrize("changes, match", [
    (dict(macs_per_cycle=0), "macs_per_cycle"),
    (dict(clock_hz=-1.0), "clock_hz"),
    (dict(dram_bytes_per_s=math.inf), "dram_bytes_per_s"),
    (dict(weight_sram_bytes=-1), "weight_sram_bytes"),
    (dict(weight_sram_bytes=1.5), "weight_sram_bytes"),
    (dict(sram_bank_bytes=2 * MiB), "published range"),
])
def test_chip_spec_rejects_bad_fields(changes, match):
    with pytest.raises(ValueError, match=match):
        ChipSpec(**changes)


def test_energies_and_presets_reject_bad_input():
    with pytest.raises(ValueError, match="fp32_add"):
        Energies(fp32_add=0)
    with pytest.raises(ValueError, match="sram_64b"):
        Energies(sram_64b=((8 * KiB, 10.0),))
    with pytest.raises(ValueError, match="unknown chip preset"):
        ChipSpec.preset("huge")
    assert ChipSpec.preset("micro") is MICRO
    with pytest.raises(TypeError, match="ChipSpec"):
        torchlns.cost_report(nn.Linear(2, 2), torch.randn(1, 2), chip="edge")


def test_cost_report_restores_modes_and_leaves_batch_norm_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torchlns.cost_report(model, torch.randn(2, 3, 4, 4))
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_report_prints_every_layer_and_the_chip(tiny):
    model, x = tiny
    text = str(torchlns.cost_report(_convert(model, x, mac=CHIP_MAC), x, MICRO))
    assert "conv" in text and "fc" in text and "total" in text and "2,100" in text
    assert "TOPS/W" in text and "micro" in text
