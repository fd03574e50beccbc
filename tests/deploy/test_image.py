"""The weight image: same bits after a round trip, size = size report + header, hostile files refused."""

from __future__ import annotations

import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, INT8, ClusterConfig, ConvertConfig, LNSFormat
from torchlns.deploy.image import HEADER_BYTES, ImageError, _BitWriter, _read_bits, export, load_image


class Net(nn.Module):
    """Every layer kind the image holds: conv + BN (folded), grouped conv, conv-transpose, conv1d/3d
    via reshapes, a LayerNorm that stays float, a Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1)
        self.c1d = nn.Conv1d(4, 4, 3, padding=1)
        self.c3d = nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))
        self.ln = nn.LayerNorm([4, 16, 16])
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.b1(self.c1(x)))))
        x = self.up(x)
        n, c, h, w = x.shape
        x = self.c1d(x.reshape(n, c, h * w)).reshape(n, c, h, w)
        x = self.c3d(x.unsqueeze(2)).squeeze(2)
        return self.fc(self.ln(x).flatten(1))


def float_net() -> nn.Module:
    torch.manual_seed(0)
    m = Net().eval()
    with torch.no_grad():
        m.b1.running_mean.uniform_(-0.5, 0.5)
        m.b1.running_var.uniform_(0.5, 2.0)
        m.ln.weight.uniform_(0.5, 1.5)
    return m


X = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))

CONFIGS = {
    "lns8 ideal": ConvertConfig(),
    "lns8 chip": ConvertConfig(mac=CHIP_MAC),
    "lns5 (odd width)": ConvertConfig(fmt=LNSFormat(5, 2)),
    "lns8 block weights": ConvertConfig(weight_granularity="block", weight_block_size=3),
    "lns8 dynamic": ConvertConfig(activation="dynamic", activation_block_size=8),
    "fp8": ConvertConfig(fmt=FP8_E4M3),
    "int8": ConvertConfig(fmt=INT8),
    "int5": ConvertConfig(fmt=torchlns.IntFormat(5)),
    "cluster layer": ConvertConfig(cluster=ClusterConfig(num_clusters=3), mac=CHIP_MAC),
    "cluster network": ConvertConfig(cluster=ClusterConfig(num_clusters=5, scope="network")),
    "keep fc float": ConvertConfig(module_filter_fn=lambda m, fqn: fqn != "fc"),
}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if not k.endswith("num_batches_tracked")]
    assert sorted(keys) == sorted(k for k in sb if not k.endswith("num_batches_tracked"))
    for k in keys:
        x, y = sa[k], sb[k]
        if isinstance(x, torchlns.CodedTensor):
            assert torch.equal(x.codes, y.codes) and torch.equal(x.param, y.param) and x.fmt == y.fmt, k
            assert x.block == y.block, k
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), k
        else:
            assert x == y, k


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_same_bits(name, tmp_path):
    q = torchlns.convert(float_net(), CONFIGS[name], X)
    path = tmp_path / "net.lnsimg"
    export(q, path)
    want = q(X)
    for skeleton in (Net(), q):  # the bare float architecture, or a converted model
        got = load_image(path, skeleton)
        assert torch.equal(bits(got(X)), bits(want)), name
        same_state(q, got)
        assert [type(m) for m in got.modules()] == [type(m) for m in q.modules()]


def test_size_is_the_size_report_plus_the_header(tmp_path):
    for name, cfg in CONFIGS.items():
        q = torchlns.convert(float_net(), cfg, X)
        path = tmp_path / "net.lnsimg"
        manifest = export(q, path)
        report_bits = sum(r["bits"] for r in torchlns.size_report(q).rows)
        raw = path.read_bytes()
        manifest_bytes = struct.unpack_from("<I", raw, 8)[0]
        assert manifest["payload_bits"] == report_bits
        assert len(raw) == HEADER_BYTES + manifest_bytes + math.ceil(report_bits / 8), name
        assert math.ceil(torchlns.size_report(q).total_bytes) == math.ceil(report_bits / 8)


def test_shared_centroids_stay_shared(tmp_path):
    q = torchlns.convert(float_net(), CONFIGS["cluster network"], X)
    assert q.c2.centroids is q.up.centroids if hasattr(q.up, "centroids") else True
    export(q, tmp_path / "n.lnsimg")
    got = load_image(tmp_path / "n.lnsimg", Net())
    clustered = [m for m in got.modules() if isinstance(m, torchlns.LNSClusteredConv2d)]
    assert len(clustered) >= 2 and all(m.centroids is clustered[0].centroids for m in clustered)


def test_skeleton_untouched(tmp_path):
    q = torchlns.convert(float_net(), ConvertConfig(), X)
    export(q, tmp_path / "n.lnsimg")
    skeleton = Net()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    load_image(tmp_path / "n.lnsimg", skeleton)
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())
    assert isinstance(skeleton.c1, nn.Conv2d) and isinstance(skeleton.b1, nn.BatchNorm2d)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 64), st.integers(0, 40)), min_size=1, max_size=8), st.integers(0, 2**31))
def test_bitstream_every_width(fields, seed):
    rng = np.random.default_rng(seed)
    w = _BitWriter()
    written = []
    for width, n in fields:
        v = rng.integers(0, 2**63, size=n, dtype=np.uint64, endpoint=False)
        if width < 64:
            v &= np.uint64((1 << width) - 1)
        else:
            v |= rng.integers(0, 2, size=n, dtype=np.uint64) << np.uint64(63)
        written.append((w.bits, width, v))
        w.write(v, width)
    payload = np.frombuffer(w.getvalue(), dtype=np.uint8)
    assert payload.size == (w.bits + 7) // 8
    for start, width, v in written:
        assert np.array_equal(_read_bits(payload, start, v.size, width).astype(np.uint64), v)


# ----------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "net.lnsimg"
    q = torchlns.convert(float_net(), CONFIGS["cluster layer"], X)
    export(q, path)
    return path


def parts(path):
    raw = path.read_bytes()
    n = struct.unpack_from("<I", raw, 8)[0]
    return raw, json.loads(raw[16:16 + n]), raw[16 + n:]


def write(path, manifest, payload, version=1, magic=b"TLNSWI"):
    text = json.dumps(manifest).encode()
    path.write_bytes(struct.pack("<6sHII", magic, version, len(text), zlib.crc32(payload, zlib.crc32(text)))
                     + text + payload)
    return path


def field(manifest, layer, name):
    entry = next(e for e in manifest["layers"] if e["name"] == layer)
    return next(f for f in entry["fields"] if f["name"] == name)


@pytest.mark.parametrize("cut", [0, 5, 15, 40, -1])
def test_truncated(image, tmp_path, cut):
    raw = image.read_bytes()
    bad = tmp_path / "cut.lnsimg"
    bad.write_bytes(raw[:cut] if cut >= 0 else raw[:-1])
    with pytest.raises(ImageError, match="truncated|shorter|damaged"):
        load_image(bad, Net())


def test_damaged_byte(image, tmp_path):
    raw = bytearray(image.read_bytes())
    raw[-3] ^= 0x10
    bad = tmp_path / "flip.lnsimg"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ImageError, match="CRC-32"):
        load_image(bad, Net())


def test_not_an_image(tmp_path):
    p = tmp_path / "x.pt"
    torch.save({"a": torch.ones(3)}, p)
    with pytest.raises(ImageError, match="not a torchlns weight image"):
        load_image(p, Net())
    with pytest.raises(ImageError, match="cannot read"):
        load_image(tmp_path / "missing", Net())


def test_other_version(image, tmp_path):
    _, m, payload = parts(image)
    with pytest.raises(ImageError, match="version-2"):
        load_image(write(tmp_path / "v.lnsimg", m, payload, version=2), Net())


def _crafted(image, tmp_path, change, payload_change=None):
    _, m, payload = parts(image)
    change(m)
    if payload_change is not None:
        payload = payload_change(bytearray(payload))
    return write(tmp_path / "crafted.lnsimg", m, bytes(payload))


HOSTILE = {
    "unknown kind": (lambda m: m["layers"][0].update(kind="os.system"), "unknown layer kind"),
    "offset base far out": (lambda m: field(m, "fc", "weight offsets").update(base=10**6), "base|range|offset"),
    "offset base in range of int but not the format": (lambda m: field(m, "fc", "weight offsets").update(base=2000),
                                                       "offset"),
    "unknown format": (lambda m: field(m, "fc", "weight codes").update(fmt=["pickle", 8]), "unknown format kind"),
    "stride 0": (lambda m: next(e for e in m["layers"] if e["name"] == "c1d")["config"].update(stride=[0]),
                 "stride must be >= 1"),
    "overlapping fields": (lambda m: field(m, "fc", "weight offsets").update(start=0), "tile the payload"),
    "shape": (lambda m: field(m, "fc", "weight codes").update(shape=[8, 3, 3, 4]), "tile|past the end|shape"),
    "negative shape": (lambda m: field(m, "fc", "weight codes").update(shape=[-1]), "non-negative"),
    "raw dtype": (lambda m: field(m, "ln", "weight").update(dtype="object"), "unknown dtype"),
    "string bits": (lambda m: field(m, "fc", "bias").update(bits="32"), "must be an int"),
    "shared with nothing": (lambda m: field(m, "ln", "weight").update(same_as="nowhere.weight", start=None)
                            or field(m, "ln", "weight").pop("start"), "tile|shared"),
    "acc_lsb": (lambda m: next(e for e in m["layers"] if e["name"] == "c1")["config"].update(mac=["lut", "fixed", 8, 99]),
                "acc_bits|config"),
    "payload bits": (lambda m: m.update(payload_bits=m["payload_bits"] + 64), "truncated or padded"),
    "no layers": (lambda m: m.pop("layers"), "no 'layers'"),
    "other architecture": (lambda m: next(e for e in m["layers"] if e["name"] == "c1").update(name="c9"),
                           "no module 'c9'"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_manifest(image, tmp_path, name):
    change, message = HOSTILE[name]
    with pytest.raises(ImageError, match=message):
        load_image(_crafted(image, tmp_path, change), Net())


def test_hostile_index(image, tmp_path):
    _, m, _ = parts(image)
    f = field(m, "c2", "indices")  # 3 centroids: 2-bit indices, so index 3 is out of range

    def set_all_ones(payload):
        for bit in range(f["start"], f["start"] + f["bits"]):
            payload[bit // 8] |= 1 << (bit % 8)
        return payload

    with pytest.raises(ImageError, match="out of range for 3 centroids"):
        load_image(_crafted(image, tmp_path, lambda m: None, set_all_ones), Net())


def test_hostile_int_code(tmp_path):
    q = torchlns.convert(float_net(), CONFIGS["int8"], X)
    path = tmp_path / "int.lnsimg"
    export(q, path)
    _, m, payload = parts(path)
    f = field(m, "c1", "weight codes")
    payload = bytearray(payload)
    payload[f["start"] // 8] = 0x80  # -128: INT8 codes are symmetric, +-127
    with pytest.raises(ImageError, match="out of range"):
        load_image(write(tmp_path / "bad.lnsimg", m, bytes(payload)), Net())


def test_wrong_skeleton(image):
    class Wider(Net):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 5, padding=2)

    with pytest.raises(ImageError, match="skeleton's module there is a Conv2d"):
        load_image(image, Wider())

    class Extra(Net):
        def __init__(self):
            super().__init__()
            self.extra = nn.Linear(3, 3)

    with pytest.raises(ImageError, match="state the image does not hold.*extra"):
        load_image(image, Extra())


def test_export_refuses_what_the_chip_cannot_hold(tmp_path):
    q = torchlns.convert(float_net(), ConvertConfig(fmt=LNSFormat(12, 6), weight_granularity="block",
                                                    weight_block_size=3, activation="dynamic"), X)
    with pytest.raises(ImageError, match="8-bit offset field"):
        export(q, tmp_path / "x")
    q = torchlns.convert(float_net(), ConvertConfig(mac=CHIP_MAC), X)
    q.c1.acc_lsb = 300
    with pytest.raises(ImageError, match="acc_lsb.*8-bit"):
        export(q, tmp_path / "x")
    q = torchlns.convert(float_net(), ConvertConfig(qat=True), X).train()
    with pytest.raises(ImageError, match="model.eval"):
        export(q, tmp_path / "x")

    class Custom(torchlns.LNSLinear):
        pass

    q = torchlns.convert(float_net(), ConvertConfig(), X)
    q.fc.__class__ = Custom
    with pytest.raises(ImageError, match="no layer kind"):
        export(q, tmp_path / "x")
