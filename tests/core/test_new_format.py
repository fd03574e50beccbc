"""A new format is one new class (see Note: formats carry their behaviour in core/formats.py).

``Int6`` below is declared here and nowhere else: no tensor class, layer, conversion, size
accounting or serialization code knows it. It reuses the INT ops with another code width, the
way a real new format would reuse the ops of its kind. Everything downstream must still work.
"""

import io
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn as nn

import torchlns
from torchlns import ConvertConfig, CodedTensor
from torchlns.core.formats import Format, ScaledFormat


@dataclass(frozen=True)
class Int6(ScaledFormat, kind="test-int6"):
    """Symmetric 6-bit integers stored in int8 codes."""

    encode_op: ClassVar[str] = "int_encode"
    decode_op: ClassVar[str] = "int_decode"
    integer: ClassVar[bool] = True
    bits: ClassVar[int] = 6

    @property
    def qmax(self) -> int:
        return 31

    @property
    def max(self) -> float:
        return 31.0

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8

    def encode_args(self, device) -> tuple:
        return self.qmax, 8

    def decode_args(self, device) -> tuple:
        return ()


FMT = Int6()


def test_codec_and_tensor():
    x = torch.randn(8, 16)
    t = CodedTensor.from_float(x, FMT, granularity="channel")
    assert type(t) is CodedTensor and t.fmt == FMT and t.codes.dtype == torch.int8
    assert int(t.codes.abs().max()) == 31
    want = torch.round(x / t.param).clamp(-31, 31) * t.param
    assert torch.equal(t.dequantize(), want)
    assert "scale=per-channel" in repr(t)
    assert Format.from_tuple(FMT.to_tuple()) == FMT


def test_layers_conversion_size_and_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    x = torch.randn(2, 3, 6, 6)
    q = torchlns.convert(model, ConvertConfig(fmt=FMT), [x])
    assert [r["fmt"] for r in q.conversion_report] == [str(FMT)] * 2
    assert all(r["mac"] == "-" for r in q.conversion_report)  # FP8/INT-style MAC: no MACConfig
    y = q(x)
    assert torchlns.metrics.sqnr(y, model(x)) > 15
    # The chip layer is the functional op on the layer's own codes.
    conv = q[0]
    xq = CodedTensor.from_float(x, FMT, conv.input_param.reshape(1, 1, 1, 1))
    assert torch.equal(conv(x), torchlns.lns_conv2d(xq, conv.weight, conv.bias.detach(), padding=1))
    # Size: codes at 6 bits, scales at 32 (ScaledFormat.param_bits), bias at 32.
    rows = {r["layer"]: r for r in torchlns.size_report(q).rows}
    assert rows["0"]["fields"] == {"weight codes": 8 * 3 * 9 * 6, "weight scales": 8 * 32, "input scale": 32,
                                   "bias": 8 * 32}
    # state_dict and torch.save round trips, with weights_only loading.
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = torchlns.convert(model, ConvertConfig(fmt=FMT), [x * 3])
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), y)


def test_a_kind_is_registered_once():
    with pytest.raises(ValueError, match="unknown format kind"):
        Format.from_tuple(("no-such-kind", 8))
    with pytest.raises(ValueError, match="taken by LNSFormat"):
        @dataclass(frozen=True)
        class Impostor(ScaledFormat, kind="lns"):
            pass
