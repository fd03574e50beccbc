"""LNSTensor / FP8Tensor / IntTensor: layout ops keep codes and parameters consistent.

The invariant behind every layout test: for a layout op ``op``,
``op(T).dequantize()`` is bit-identical to ``op(T.dequantize())``, and ``op(T).codes`` is
``op(T.codes)``. If a parameter failed to follow its data, some value would change.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import torchlns
from torchlns import FP8_E4M3, INT8, LNS8, CodedTensor, FP8Tensor, IntTensor, LNSFormat, LNSTensor

FORMATS = [LNS8, LNSFormat(12, 6), FP8_E4M3, INT8]
LAYOUTS = [
    dict(granularity="tensor"),
    dict(granularity="channel"),
    dict(granularity="channel", axis=1),
    dict(granularity="block", block_size=3),
    dict(granularity="block", block_size=4, axis=0),
]

LAYOUT_OPS = {
    "detach": lambda t: t.detach(),
    "clone": lambda t: t.clone(),
    "to_cpu": lambda t: t.to("cpu"),
    "t_contiguous": lambda t: t.transpose(0, 1).contiguous(),
    "transpose": lambda t: t.transpose(0, 2),
    "permute": lambda t: t.permute(2, 0, 1),
    "view_lead": lambda t: t.view(-1, t.shape[-1]),
    "reshape_all": lambda t: t.reshape(-1),
    "reshape_split": lambda t: t.reshape(t.shape[0], 2, -1),
    "flatten": lambda t: t.flatten(1),
    "unsqueeze": lambda t: t.unsqueeze(1),
    "squeeze": lambda t: t.unsqueeze(0).squeeze(0),
    "slice0": lambda t: t[1:4],
    "slice_last_aligned": lambda t: t[..., 3:9],
    "slice_last_cut": lambda t: t[..., 2:7],
    "slice_step": lambda t: t[:, ::2],
    "slice_neg": lambda t: t[-3:, :, -5:],
    "select0": lambda t: t[2],
    "select_last": lambda t: t[..., 4],
    "select_mid": lambda t: t[:, 1],
    "narrow": lambda t: t.narrow(2, 1, 5),
    "index_tensor": lambda t: t[torch.tensor([4, 0, 2])],
    "index_bool": lambda t: t[:, torch.tensor([True, False, True])],
    "expand": lambda t: t[:1].expand(3, -1, -1),
}


def _data(shape=(6, 3, 10)):
    # Rows and columns on very different scales, so that a parameter which does not follow
    # its data changes values visibly.
    x = torch.randn(shape)
    x = x * torch.logspace(-3, 3, shape[0]).view(-1, *[1] * (len(shape) - 1))
    return x * torch.logspace(0, 2, shape[-1])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _assert_same_values(got: CodedTensor, expected_float: torch.Tensor, what: str):
    assert isinstance(got, CodedTensor), f"{what}: result is {type(got).__name__}, not a coded tensor"
    assert got.shape == expected_float.shape, f"{what}: shape {got.shape} != {expected_float.shape}"
    deq = got.dequantize()
    if not torch.equal(_bits(deq), _bits(expected_float)):
        i = (_bits(deq) != _bits(expected_float)).nonzero()[0].tolist()
        raise AssertionError(f"{what}: first mismatch at {i}: {deq[tuple(i)]} != {expected_float[tuple(i)]}")


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("op_name", list(LAYOUT_OPS))
def test_layout_op_keeps_values(fmt, layout, op_name):
    x = _data()
    T = CodedTensor.from_float(x, fmt, **layout)
    op = LAYOUT_OPS[op_name]
    got = op(T)
    _assert_same_values(got, op(T.dequantize()), f"{op_name} on {T!r}")
    assert torch.equal(got.codes, op(T.codes).contiguous().view(got.codes.shape) if op_name != "expand" else op(T.codes))
    assert got.fmt == fmt
    # The parameter stays compact: it never grows beyond the data.
    assert got.param.dim() == got.codes.dim()
    assert all(p in (1, c) or got.block and d == got.block[0] for d, (p, c) in enumerate(zip(got.param.shape, got.codes.shape)))


def test_per_channel_offsets_stay_compact_under_transpose_and_reshape():
    W = LNSTensor.from_float(torch.randn(8, 4, 3, 3), LNS8, granularity="channel")
    assert W.offset.shape == (8, 1, 1, 1)
    assert W.reshape(8, -1).offset.shape == (8, 1)
    assert W.permute(1, 0, 2, 3).offset.shape == (1, 8, 1, 1)
    assert W.t().offset.shape == (1, 1, 1, 8) if W.dim() == 2 else True
    assert W[2:5].offset.shape == (3, 1, 1, 1)


def test_block_layout_survives_aligned_slices_and_leading_reshapes():
    X = LNSTensor.from_float(torch.randn(4, 5, 10), LNS8, granularity="block", block_size=4)
    # One offset per run of 4 along the last axis, in every row; the last run is 2 long.
    assert X.block == (2, 4) and X.offset.shape == (4, 5, 3)
    Y = X[..., 4:10]
    assert Y.block == (2, 4) and Y.offset.shape == (4, 5, 2)
    Z = X.reshape(20, 10)
    assert Z.block == (1, 4) and Z.offset.shape == (20, 3)
    assert X.transpose(0, 2).block == (0, 4)
    # A cut through a block materializes the offsets along that axis, values unchanged.
    C = X[..., 2:7]
    assert C.block is None and C.offset.shape[-1] == 5


def test_block_of_calibrated_activations_has_per_block_offsets():
    x = torch.ones(2, 8)
    x[:, 4:] *= 1000
    X = LNSTensor.from_float(x, LNS8, granularity="block", block_size=4)
    assert X.offset[0, 0] < X.offset[0, 1]
    assert torch.equal(X.codes, torch.full_like(X.codes, LNS8.e_max))


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("weights_only", [True, False])
def test_save_load_round_trip(fmt, weights_only):
    T = CodedTensor.from_float(_data(), fmt, granularity="block", block_size=3)
    module = torch.nn.Module()
    module.register_buffer("w", T)
    buf = io.BytesIO()
    torch.save({"tensor": T, "state": module.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=weights_only)
    for got in (loaded["tensor"], loaded["state"]["w"]):
        assert type(got) is type(T) and got.fmt == T.fmt and got.block == T.block
        assert torch.equal(got.codes, T.codes) and torch.equal(got.param, T.param)
        assert torch.equal(_bits(got.dequantize()), _bits(T.dequantize()))


def test_deepcopy():
    T = LNSTensor.from_float(_data(), LNS8, granularity="channel")
    C = copy.deepcopy(T)
    assert C is not T and C.codes.data_ptr() != T.codes.data_ptr()
    assert torch.equal(C.codes, T.codes) and torch.equal(C.offset, T.offset)


def test_subclass_per_format_and_field_names():
    x = torch.randn(4, 4)
    assert type(LNSTensor.from_float(x, LNS8)) is LNSTensor
    assert type(CodedTensor.from_float(x, FP8_E4M3)) is FP8Tensor
    assert type(CodedTensor.from_float(x, INT8)) is IntTensor
    T = LNSTensor.from_float(x, LNS8)
    assert T.offset is T.param and T.dtype == torch.float32 and not T.requires_grad
    assert CodedTensor.from_float(x, INT8).scale.dtype == torch.float32
    with pytest.raises(TypeError, match="FP8Tensor"):
        LNSTensor.from_float(x, FP8_E4M3)


def test_explicit_offsets():
    x = torch.randn(3, 8)
    T = LNSTensor.from_float(x, LNS8, -100)
    assert T.offset.shape == (1, 1) and int(T.offset) == -100
    assert torch.equal(T.codes, torchlns.encode(x, LNS8, -100))
    per_row = torch.tensor([-100, -90, -80])
    T = LNSTensor.from_float(x, LNS8, per_row, granularity="channel")
    assert torch.equal(T.codes, torchlns.encode(x, LNS8, per_row[:, None]))
    with pytest.raises(ValueError, match="needs"):
        LNSTensor.from_float(x, LNS8, torch.tensor([1, 2]), granularity="channel")
    with pytest.raises(ValueError, match="out of range"):
        LNSTensor.from_float(x, LNS8, 5000)
    with pytest.raises(ValueError, match="block_size"):
        LNSTensor.from_float(x, LNS8, granularity="block")
    with pytest.raises(ValueError, match="block_size"):
        LNSTensor.from_float(x, LNS8, granularity="channel", block_size=4)
    with pytest.raises(TypeError, match="already encoded"):
        LNSTensor.from_float(T, LNS8)


def test_repr_is_short_and_names_the_layout():
    T = LNSTensor.from_float(torch.randn(8, 16), LNS8, granularity="channel")
    r = repr(T)
    assert r.startswith("LNSTensor(LNS8(F=3), shape=(8, 16), offset=per-channel") and len(r) < 120
    assert "offset=" in repr(LNSTensor.from_float(torch.randn(3), LNS8))
    assert "per-block(axis=1, size=4)" in repr(LNSTensor.from_float(torch.randn(2, 8), LNS8, granularity="block", block_size=4))
    assert "scale=" in repr(CodedTensor.from_float(torch.randn(3), INT8))


@pytest.mark.parametrize(
    "op",
    [
        lambda t: t + 1,
        lambda t: t * 2,
        lambda t: torch.relu(t),
        lambda t: t.sum(),
        lambda t: torch.cat([t, t]),
        lambda t: t.exp(),
        lambda t: t.mean(0),
    ],
)
def test_other_ops_raise_naming_the_op(op):
    T = LNSTensor.from_float(torch.randn(4, 4), LNS8)
    with pytest.raises(NotImplementedError, match=r"aten\.\w+.*dequantize"):
        op(T)


def test_to_another_dtype_refuses_to_silently_dequantize():
    T = LNSTensor.from_float(torch.randn(4, 4), LNS8)
    with pytest.raises(TypeError, match="dequantize"):
        T.to(torch.float64)
    assert T.to(torch.float32) is T or torch.equal(T.to(torch.float32).codes, T.codes)


def test_layer_functions_route_to_the_mac():
    x, w, b = torch.randn(5, 16), torch.randn(7, 16), torch.randn(7)
    X = LNSTensor.from_float(x, LNS8)
    W = LNSTensor.from_float(w, LNS8, granularity="channel")
    y = torchlns.lns_linear(X, W, b)
    assert torch.equal(_bits(F.linear(X, W, b)), _bits(y))
    assert torch.equal(_bits(torch.matmul(X, W.t())), _bits(torchlns.lns_linear(X, W)))
    assert torch.equal(_bits(X @ W.t()), _bits(torchlns.lns_linear(X, W)))
    xc, wc = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3)
    Wc = LNSTensor.from_float(wc, LNS8, granularity="channel")
    assert torch.equal(_bits(F.conv2d(xc, Wc, None, 1, 1)), _bits(torchlns.lns_conv2d(xc, Wc, padding=1)))
    W1 = LNSTensor.from_float(torch.randn(8, 4, 3), LNS8, granularity="channel")
    x1 = torch.randn(2, 4, 9)
    assert torch.equal(_bits(F.conv1d(x1, W1, stride=2)), _bits(torchlns.lns_conv1d(x1, W1, stride=2)))


def test_empty_and_zero_dim_tensors():
    T = LNSTensor.from_float(torch.empty(0, 4), LNS8, granularity="channel")
    assert T.shape == (0, 4) and T.dequantize().shape == (0, 4)
    S = LNSTensor.from_float(torch.tensor(3.0), LNS8)
    assert S.shape == () and S.dequantize().item() == pytest.approx(3.0, rel=0.05)


# ----------------------------------------------------------------------------------------
# the coded operand (see Note: coded operands in tensor.py)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_coded_is_the_tensor_s_operand(fmt, layout):
    from torchlns import Coded
    from torchlns.tensor import as_coded

    x = torch.randn(6, 8, 10)
    T = CodedTensor.from_float(x, fmt, **layout)
    c = as_coded(T)
    assert c == T.coded and isinstance(c, Coded) and as_coded(c) is c and as_coded(x) is None
    assert c.fmt == T.fmt and c.block == T.block and c.codes is T.codes and c.param is T.param
    back = c.tensor()
    assert type(back) is type(T) is CodedTensor.class_for(fmt)
    assert torch.equal(c.dequantize().view(torch.int32), T.dequantize().view(torch.int32))
    again = Coded.encode(x, fmt, **layout)
    assert torch.equal(again.codes, T.codes) and torch.equal(again.param, T.param) and again.block == T.block


def test_functional_ops_take_either_face_of_an_operand():
    x, w = torch.randn(5, 32), torch.randn(7, 32)
    xq, wq = LNSTensor.from_float(x, LNS8), LNSTensor.from_float(w, LNS8, granularity="channel")
    want = torchlns.lns_linear(xq, wq, mac=torchlns.CHIP_MAC, acc_lsb=-20)
    got = torchlns.lns_linear(xq.coded, wq.coded, mac=torchlns.CHIP_MAC, acc_lsb=-20)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_tensor_classes_come_from_the_format():
    assert CodedTensor.class_for(LNS8) is LNSTensor
    assert CodedTensor.class_for(FP8_E4M3) is FP8Tensor and CodedTensor.class_for(INT8) is IntTensor
    with pytest.raises(TypeError, match="fmt must be"):
        CodedTensor.class_for("lns8")
