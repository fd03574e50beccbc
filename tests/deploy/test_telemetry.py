"""``torchlns.telemetry`` (Note: telemetry counters in torchlns/deploy/telemetry.py): every counter
equals a brute-force count over each output's products, written here from the spec's words;
counting changes no output bit; the C++ epilogue's totals agree with the reference's."""

import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlns
from torchlns import ConvertConfig, LNSFormat, MACConfig
from torchlns.core import tables
from torchlns.deploy.telemetry import COUNTERS, Telemetry, TelemetryReport
from torchlns.ops import backend


# ----------------------------------------------------------------------------------------
# the oracle
# ----------------------------------------------------------------------------------------
def _glog(x: torch.Tensor, F_: int) -> torch.Tensor:
    """round(2^F log2|x|) in float64 (no ties: the boundaries are irrational)."""
    return torch.round(torch.log2(x.double().abs()) * 2**F_).to(torch.int64)


def _encode(x: torch.Tensor, off: torch.Tensor, fmt: LNSFormat):
    """(log value g_eff = E + off, or None for zero codes; sign; saturated; flushed) per element."""
    e_max = fmt.e_max
    nz = (x != 0) & ~torch.isnan(x)
    inf = torch.isinf(x)
    fin = nz & ~inf
    g = torch.where(fin, _glog(torch.where(fin, x, 1.0), fmt.frac_bits), 0)
    E = torch.where(inf, e_max, (g - off).clamp(max=e_max))
    keep = nz & (E >= 1)
    return torch.where(keep, E + off, 0), keep, x < 0, inf | (fin & (g - off > e_max)), fin & (g - off < 1)


def _block_offsets(x_rows: torch.Tensor, block: int, fmt: LNSFormat) -> torch.Tensor:
    """Per element of (M, K) rows, its block's offset: g(max|x| of the block) - E_max, clamped."""
    M, K = x_rows.shape
    R = 1 << fmt.frac_bits
    lo, hi = -126 * R - 1, 127 * R - fmt.e_max
    a = torch.where(torch.isfinite(x_rows), x_rows.abs(), 0.0)
    nb = -(-K // block)
    m = F.pad(a, (0, nb * block - K)).reshape(M, nb, block).amax(-1)
    off = torch.where(m > 0, _glog(torch.where(m > 0, m, 1.0), fmt.frac_bits) - fmt.e_max, -fmt.e_max)
    return off.clamp(lo, hi).repeat_interleave(block, 1)[:, :K]


def _oracle(layer, x: torch.Tensor) -> dict:
    """Every counter of one call of chip layer ``layer`` on float input ``x``, by brute force."""
    fmt, mac = layer.fmt, layer.mac
    w = layer.weight.coded
    wc = w.codes.to(torch.int64) & ((1 << fmt.bits) - 1)
    wmag, wneg = wc & fmt.e_max, wc > fmt.e_max
    wlog = torch.where(wmag > 0, wmag + w.expanded_param().to(torch.int64), 0)
    groups = getattr(layer, "groups", 1)
    conv = isinstance(layer, torchlns.nn.LNSConv2d) or isinstance(layer, torchlns.nn.LNSConv1d)
    block = layer.input_block_size if layer.input_param is None else None
    out = {k: 0 for k in ("act_values", "act_saturated", "act_flushed")}
    if conv:  # receptive fields in (channel, row, column) order, padding as zeros
        x4, w4 = (x, wlog) if x.dim() == 4 else (x.unsqueeze(2), wlog.unsqueeze(2))
        k = w4.shape[2:]
        def pair(v, one=1):
            return tuple(v) if x.dim() == 4 else (one, *v)
        rows = F.unfold(x4, k, dilation=pair(layer.dilation), padding=pair(layer.padding, 0),
                        stride=pair(layer.stride))
        rows = rows.transpose(1, 2).reshape(-1, rows.shape[1])
        wl, wn, wm = w4.reshape(w4.shape[0], -1), wneg.reshape(wneg.shape[0], -1), wmag.reshape(wmag.shape[0], -1)
    else:
        rows = x.reshape(-1, x.shape[-1])
        wl, wn, wm = wlog, wneg, wmag
    M, K = rows.shape
    Kg = K // groups
    if layer.input_param is not None:
        off = layer.input_param.to(torch.int64).expand(M, K)
    elif block is None:
        a = x[torch.isfinite(x)].abs()
        off = (_glog(a.max(), fmt.frac_bits) - fmt.e_max).expand(M, K)
    else:
        off = torch.cat([_block_offsets(rows[:, g * Kg:(g + 1) * Kg], block, fmt) for g in range(groups)], 1)
    alog, akeep, aneg, sat, flush = _encode(rows, off, fmt)
    if conv and block is not None:  # each receptive field's codes count
        out.update(act_values=int(((rows != 0) & ~torch.isnan(rows)).sum()), act_saturated=int(sat.sum()),
                   act_flushed=int(flush.sum()))
    else:  # each element once
        xo = layer.input_param.to(torch.int64) if layer.input_param is not None else off[0, 0]
        if block is not None:
            xo = _block_offsets(x.reshape(-1, x.shape[-1]), block, fmt).reshape(x.shape)
        _, _, _, s, f = _encode(x, xo, fmt)
        out.update(act_values=int(((x != 0) & ~torch.isnan(x)).sum()), act_saturated=int(s.sum()),
                   act_flushed=int(f.sum()))
    if not mac.fixed:
        return out
    C = tables.conversion_tensor_f64(fmt.frac_bits, mac.conversion, mac.lut_bits, torch.device("cpu"))
    lsb, R = layer.acc_lsb, 1 << fmt.frac_bits
    W, W1 = mac.acc_bits, mac.chunk_width
    wrap = mac.overflow == "wrap"

    def fit(v, bits):
        h = 1 << (bits - 1)
        return (v + h) % (2 * h) - h if wrap else v.clamp(-(h - 1), h - 1)

    def beyond(v, bits):
        h = 1 << (bits - 1)
        return (v > h - 1) | (v < (-h if wrap else -(h - 1)))

    N = wl.shape[0]
    Ng = N // groups
    counts = dict(products=0, prod_truncated=0, prod_overflow=0, chunks=0, chunk_overflow=0, totals=0,
                  total_overflow=0, max_total=0, max_chunk=0)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(N, dtype=torch.float64)
    for n in range(N):
        g = n // Ng
        ks = slice(g * Kg, (g + 1) * Kg)
        both = akeep[:, ks] & (wm[n] > 0)[None, :]
        G = alog[:, ks] + wl[n][None, :]
        mag = torch.floor(torch.ldexp(C[G % R], (G // R - lsb).double()))
        mag = torch.where(both, mag, 0.0).to(torch.int64)
        negative = aneg[:, ks] ^ wn[n][None, :]
        signed = torch.where(negative, -mag, mag)
        counts["products"] += int(both.sum())
        counts["prod_truncated"] += int((both & (mag == 0)).sum())
        counts["prod_overflow"] += int((both & beyond(signed, W1)).sum())
        p = fit(signed, W1)
        if mac.chunk:
            L = mac.chunk
            p = F.pad(p, (0, (-Kg) % L)).reshape(M, -1, L).sum(-1)
            counts["chunks"] += p.numel()
            counts["chunk_overflow"] += int(beyond(p, W1).sum())
            counts["max_chunk"] = max(counts["max_chunk"], int(p.abs().max()))
            p = fit(p, W1)
        total = p.sum(-1) + int(torch.round(bias[n] * 2.0**-lsb))
        counts["totals"] += M
        counts["total_overflow"] += int(beyond(total, W).sum())
        counts["max_total"] = max(counts["max_total"], int(total.abs().max()))
    out.update(counts)
    return out


def _inputs(model: nn.Module, data) -> dict:
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, f=f: seen.setdefault(f, []).append(args[0].clone()))
             for f, m in model.named_modules() if isinstance(m, torchlns.nn.layers._CodedLayer)]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    return seen


def _check(q, data, report: TelemetryReport):
    for fqn, xs in _inputs(q, data).items():
        layer = q.get_submodule(fqn)
        want: dict = {}
        for x in xs:
            for k, v in _oracle(layer, x).items():
                want[k] = max(want.get(k, 0), v) if k.startswith("max_") else want.get(k, 0) + v
        row = report[fqn]
        got = {k: getattr(row, k) for k in want}
        assert got == want, (fqn, layer.mac)
        assert row.calls == len(xs)


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------
def _net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5)).eval()
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(4, 6, 3, padding=1, stride=2), nn.ReLU(), nn.Conv1d(6, 6, 3, groups=3)).eval()
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3, stride=2, groups=2), nn.Flatten(), nn.LazyLinear(3)).eval()


def _data(kind: str, scale: float = 1.0, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = {"linear": (5, 12), "conv1d": (2, 4, 11), "conv2d": (2, 3, 7, 7)}[kind]
    out = []
    for _ in range(2):
        x = torch.randn(shape, generator=g) * scale
        x[0, 0] = 0.0  # a zero, and a tiny value that flushes
        x.view(-1)[1] = 1e-30
        out.append(x)
    return out


MACS = {
    "chip": MACConfig.chip(),
    "fixed12": MACConfig(conversion="lut", lut_bits=6, accumulator="fixed", acc_bits=12),
    "mitchell16-wrap": MACConfig(conversion="mitchell", accumulator="fixed", acc_bits=16, overflow="wrap"),
    "chunk4x10": MACConfig(conversion="exact", accumulator="fixed", acc_bits=20, chunk=4, chunk_bits=10),
    "chunk5x12-wrap": MACConfig(conversion="lut", lut_bits=8, accumulator="fixed", acc_bits=24, overflow="wrap",
                                chunk=5, chunk_bits=12),
    "float32": MACConfig(),
}


def _convert(kind, fmt, mac, activation):
    model = _net(kind)
    model(_data(kind)[0])  # materialize lazy layers
    cfg = ConvertConfig(fmt=fmt, mac=mac, activation=activation, activation_block_size=4, acc_headroom_bits=0)
    return model, torchlns.convert(model, cfg, calibration_data=_data(kind, seed=7))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("mac", list(MACS), ids=str)
@pytest.mark.parametrize("activation", ["static", "dynamic"])
@pytest.mark.parametrize("fmt", [LNSFormat(8, 3), LNSFormat(6, 2), LNSFormat(10, 5)], ids=str)
def test_counts_equal_brute_force(kind, mac, activation, fmt):
    model, q = _convert(kind, fmt, MACS[mac], activation)
    data = _data(kind, scale=6.0)  # beyond calibration: activations saturate, totals overflow
    plain = [q(x) for x in data]
    report = torchlns.telemetry(q, data, reference=model)
    _check(q, data, report)
    with torchlns.telemetry(q):  # counting changes no bit
        counted = [q(x) for x in data]
    for a, b in zip(plain, counted):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("mac", ["fixed12", "chunk5x12-wrap", "mitchell16-wrap"])
def test_both_weight_layouts(layout, mac, monkeypatch):
    from torchlns.deploy.telemetry import _ProductCounter

    monkeypatch.setattr(_ProductCounter, "layout", layout)
    for kind in ("linear", "conv2d"):
        _, q = _convert(kind, LNSFormat(8, 3), MACS[mac], "static")
        data = _data(kind, scale=6.0)
        _check(q, data, torchlns.telemetry(q, data))


def test_the_counters_see_events():
    """The brute-force test would pass on all-zero counters; the forced cases must show each event."""
    _, q = _convert("conv2d", LNSFormat(8, 3), MACS["fixed12"], "static")
    r = torchlns.telemetry(q, _data("conv2d", scale=6.0)).total
    assert r.act_saturated and r.act_flushed and r.prod_truncated and r.total_overflow and r.headroom > 1
    _, q = _convert("conv2d", LNSFormat(8, 3), MACS["chunk4x10"], "static")
    r = torchlns.telemetry(q, _data("conv2d", scale=6.0)).total
    assert r.chunk_overflow and r.chunks and r.chunk_headroom > 1


@pytest.mark.skipif(not backend.has_native(), reason="needs the C++ kernels")
@pytest.mark.parametrize("path", ["direct", "scalar"])
def test_native_totals_equal_the_references(path):
    """The C++ epilogue's totals (every kernel, dynamic blocks of depthwise convs included) against the reference's."""
    _, q = _convert("conv2d", LNSFormat(8, 3), MACS["fixed12"], "dynamic")
    data = _data("conv2d", scale=6.0)
    with backend.force_mac_path(path):
        native = torchlns.telemetry(q, data)
    with backend.force_mac_path(path), pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "has_native", lambda: False)  # the observer then counts totals with the reference
        ref = torchlns.telemetry(q, data)
    for a, b in zip(native.rows, ref.rows):
        assert (a.totals, a.total_overflow, a.max_total) == (b.totals, b.total_overflow, b.max_total)


def test_sqnr_against_the_reference_layer():
    model, q = _convert("linear", LNSFormat(8, 3), MACS["chip"], "static")
    data = _data("linear")
    r = torchlns.telemetry(q, data, reference=model)
    first = r["0"]
    with torch.no_grad():
        y = torch.cat([q[0](x) for x in data]).double()
        f = torch.cat([model[0](x) for x in data]).double()
    assert first.sqnr_db == pytest.approx(10 * math.log10(float((f ** 2).sum() / ((y - f) ** 2).sum())), rel=1e-5)
    without = torchlns.telemetry(q, data)["0"]  # against the decoded weights: no weight rounding in it
    assert without.sqnr_db > first.sqnr_db


def test_report_table_plot_and_dicts(tmp_path):
    _, q = _convert("conv2d", LNSFormat(8, 3), MACS["chunk4x10"], "dynamic")
    r = torchlns.telemetry(q, _data("conv2d", scale=6.0))
    text = str(r)
    assert "chunk ovf" in text and "total" in text.splitlines()[-2]
    assert [d["layer"] for d in r.to_dicts()] == [*(x.layer for x in r.rows), "total"]
    png = r.plot(tmp_path / "t.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 100 and im.size[1] > 16 * len(r.rows)
    assert set(COUNTERS) <= set(r.to_dicts()[0])


def test_context_manager_and_errors():
    _, q = _convert("linear", LNSFormat(8, 3), MACS["chip"], "static")
    with torchlns.telemetry(q) as t:
        q(_data("linear")[0])
    assert isinstance(t, Telemetry) and t.report().rows[0].calls == 1
    with pytest.raises(ValueError, match="no LNS chip layers"):
        torchlns.telemetry(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        torchlns.telemetry("model")
    with pytest.raises(RuntimeError, match="bad"), torchlns.telemetry(q):
        raise RuntimeError("bad")
    y = q(_data("linear")[0])  # the observer is gone after an error
    assert torch.isfinite(y).all()
    from torchlns import functional

    assert functional._observer is None


def test_weight_histograms_follow_a_reloaded_weight():
    """The per-layer cache of weight histograms lives across passes; a new weight replaces it."""
    _, q = _convert("conv2d", LNSFormat(8, 3), MACS["fixed12"], "static")
    data = _data("conv2d", scale=6.0)
    torchlns.telemetry(q, data)  # fills the cache
    torch.manual_seed(5)
    other = _net("conv2d")
    other(data[0])
    cfg = ConvertConfig(mac=MACS["fixed12"], acc_headroom_bits=0)
    q2 = torchlns.convert(other, cfg, calibration_data=_data("conv2d", seed=7))
    q.load_state_dict(q2.state_dict())
    _check(q, data, torchlns.telemetry(q, data))


@pytest.mark.parametrize("mac", ["chip", "fixed12", "float32"])
def test_dynamic_blocks_with_codes_below_the_group_bound(mac):
    """Dynamic blocks of a convolution: a channel 1e6 larger than the others puts their codes
    below its (image, group) bound, yet blocks that hold only them keep them; ±inf saturates."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1, groups=2)).eval()
    cfg = ConvertConfig(mac=MACS[mac], activation="dynamic", activation_block_size=9, acc_headroom_bits=0)
    q = torchlns.convert(model, cfg, calibration_data=[torch.randn(2, 4, 6, 6)])
    x = torch.randn(2, 4, 6, 6)
    x[:, 0] *= 1e6
    x[0, 2, 3, 3] = float("inf")
    x[1, 3, 0, 0] = -float("inf")
    x[1, 1, 2, 2] = 1e-30
    data = [x]
    report = torchlns.telemetry(q, data)
    _check(q, data, report)
    assert report.total.act_saturated >= 2


@pytest.mark.skipif(not backend.has_native(), reason="needs the C++ kernels")
@pytest.mark.parametrize("geometry", [
    dict(kernel_size=3, padding=1), dict(kernel_size=3, padding=1, groups=6), dict(kernel_size=3, stride=2),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=3), dict(kernel_size=1),
    dict(kernel_size=5, stride=3, padding=4, groups=2), dict(kernel_size=3, padding=2, dilation=2, groups=6)], ids=str)
@pytest.mark.parametrize("block", [1, 4, 9, 64])
def test_native_block_histograms_equal_torch(geometry, block, monkeypatch):
    """The C++ per-(channel, tap) logs of dynamic blocks equal the torch form's, bit for bit, with
    codes below the group bound, ±inf, flushes and every kind of geometry."""
    tm = sys.modules["torchlns.deploy.telemetry"]  # the package's name `telemetry` is the function
    seen, native = [], tm._blocks_hist

    def both(args, Ho, Wo, counts):
        mine: dict = {}
        want = tm._blocks_hist_torch(args, Ho, Wo, mine)
        got = native(args, Ho, Wo, counts)
        assert got[1] == want[1] and torch.equal(got[0], want[0])
        assert {k: counts[k] for k in mine} == mine  # counts started empty for this call
        seen.append(int(want[0].sum()))
        return got

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 6, **geometry)).eval()
    cfg = ConvertConfig(mac=MACS["fixed12"], activation="dynamic", activation_block_size=block, acc_headroom_bits=0)
    q = torchlns.convert(model, cfg, calibration_data=[torch.randn(2, 6, 9, 8)])
    x = torch.randn(3, 6, 9, 8)
    x[:, 1] *= 1e6  # the others fall below their group's bound
    x[:, 4] *= 1e-3
    x[0, 2, 3, 3] = float("inf")
    x[1, 3, 0, 0] = -float("inf")
    x[2, 5, 8, 7] = 1e-30
    x[2, 0] = 0.0
    monkeypatch.setattr(tm, "_blocks_hist", both)
    report = torchlns.telemetry(q, [x])
    assert seen and report.total.act_values
    _check(q, [x], report)
    # near float32's top the offsets clamp and cap codes (products beyond int64: no brute force)
    torchlns.telemetry(q, [x[:2] * 1e38])
    assert len(seen) == 2


@pytest.mark.skipif(not backend.has_native(), reason="needs the C++ kernels")
@pytest.mark.parametrize("geometry", [
    ((9, 8), 3, 1, 1, 1), ((9, 8), 1, 1, 0, 1), ((9, 8), 3, 2, 0, 1), ((9, 8), (2, 3), (2, 1), (1, 0), (1, 2)),
    ((9, 8), 5, 3, 4, 1), ((9, 8), 3, 1, 2, 2), ((1, 1), 3, 3, 2, 1), ((17, 40), 3, 2, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype,bits", [(torch.uint8, 8), (torch.uint8, 4), (torch.int16, 12), (torch.int16, 16)])
def test_native_code_histograms_equal_torch(geometry, dtype, bits):
    """The C++ per-(channel, tap) code counts of per-tensor codes equal the torch form's, bit for
    bit, for every kind of geometry (taps that read only padding among them) and code width; runs
    of one code (a ReLU's zeros) exercise the interleaved counters."""
    tm = sys.modules["torchlns.deploy.telemetry"]
    (H, W), kernel, stride, pad, dil = geometry
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    kernel, stride, pad, dil = map(pair, (kernel, stride, pad, dil))
    Ho, Wo = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip((H, W), kernel, stride, pad, dil))
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, H, W), generator=g, dtype=torch.int32)
    codes[:, :, :, : W // 2] *= torch.rand(3, 5, H, 1, generator=g) < 0.5  # runs of zeros
    codes = codes.to(torch.uint8) if dtype == torch.uint8 else (codes - (codes >> 15 << 16)).to(torch.int16)
    got = tm._code_hist(codes, bits, kernel, stride, pad, dil, Ho, Wo)
    want = tm._code_hist_torch(codes, bits, kernel, stride, pad, dil, Ho, Wo)
    assert got.dtype == want.dtype == torch.int64 and torch.equal(got, want)
    assert int(want.sum()) == 3 * sum(  # every read of an input position, counted by brute force
        1 for c in range(5) for oh in range(Ho) for ow in range(Wo) for i in range(kernel[0])
        for j in range(kernel[1]) if 0 <= oh * stride[0] - pad[0] + i * dil[0] < H
        and 0 <= ow * stride[1] - pad[1] + j * dil[1] < W)


@pytest.mark.parametrize("activation", ["static", "dynamic"])
@pytest.mark.parametrize("mac", ["fixed12", "chunk5x12-wrap"])
def test_torch_forms_count_the_same(activation, mac, monkeypatch):
    """Without the C++ kernels (another device), the torch forms of the tap histograms and the
    reference's totals count what the brute force counts."""
    _, q = _convert("conv2d", LNSFormat(8, 3), MACS[mac], activation)
    data = _data("conv2d", scale=6.0)
    with_native = torchlns.telemetry(q, data)
    monkeypatch.setattr(backend, "has_native", lambda: False)
    without = torchlns.telemetry(q, data)
    _check(q, data, without)
    assert [r.to_dict() for r in with_native.rows] == [r.to_dict() for r in without.rows]
