"""Triton codec kernels against the reference, on a GPU compiled, in CI under TRITON_INTERPRET=1.

The MAC kernels are tested in test_triton_mac.py.

tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is present, before this module imports
the kernels. Shapes stay small: the interpreter runs every program in Python.
"""


import pytest
import torch

triton = pytest.importorskip("triton")

from test_kernels import assert_same, random_floats  # noqa: E402

from torchlns import ops  # noqa: E402
from torchlns.core import tables  # noqa: E402
from torchlns.ops import triton_kernels as tk  # noqa: E402
from torchlns.core.formats import FP8Format, LNSFormat  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy NaN arithmetic in the interpreter


def on_device(args):
    return tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)


def check(name, args, what):
    args = on_device(args)
    got = tk.KERNELS[name](*args)
    want = ops.REFERENCE[name](*args)
    assert_same(got.cpu(), want.cpu(), f"triton {name} {what}")


@pytest.mark.parametrize("fmt", [LNSFormat(8, 3), LNSFormat(4, 2), LNSFormat(12, 6), LNSFormat(16, 14),
                                 LNSFormat(8, 3, "mitchell"), LNSFormat(16, 10, "mitchell")], ids=str)
def test_lns_codec(fmt):
    x = random_floats(700, seed=fmt.bits)
    thr, dbits = tables.buckets_tensor(fmt.frac_bits, "cpu"), tables.decode_bits_tensor(fmt.frac_bits, "cpu")
    for off in [torch.tensor(fmt.offset_min, dtype=torch.int32), torch.tensor([fmt.offset_max], dtype=torch.int32),
                torch.randint(fmt.offset_min, fmt.offset_max + 1, x.shape, dtype=torch.int32)]:
        check("lns_encode", (x, off, thr, fmt.bits, fmt.frac_bits, fmt.rounding == "mitchell"), f"{fmt}")
        codes = ops.REFERENCE["lns_encode"](x, off, thr, fmt.bits, fmt.frac_bits, fmt.rounding == "mitchell")
        check("lns_decode", (codes, off, dbits, fmt.bits, fmt.frac_bits), f"{fmt}")


def test_codec_layouts_and_empty():
    thr, dbits = tables.buckets_tensor(3, "cpu"), tables.decode_bits_tensor(3, "cpu")
    x = torch.randn(9, 13) * 50
    per_col = torch.randint(-120, -80, (13,), dtype=torch.int32)
    for xv, off in [(x.t(), per_col[:, None]), (x[:, ::3], per_col[::3]), (torch.empty(0, 5), torch.tensor(-100))]:
        check("lns_encode", (xv, off.to(torch.int32), thr, 8, 3, False), f"layout {tuple(xv.shape)}")
        codes = ops.REFERENCE["lns_encode"](xv, off.to(torch.int32), thr, 8, 3, False)
        check("lns_decode", (codes, off.to(torch.int32), dbits, 8, 3), f"layout {tuple(xv.shape)}")


@pytest.mark.parametrize("variant", ["e4m3", "e5m2"])
def test_fp8_codec(variant):
    fmt = FP8Format(variant)
    x = random_floats(700, seed=5)
    for scale in [torch.tensor(1.0), torch.tensor([0.37]), torch.rand(x.shape) + 0.5]:
        check("fp8_encode", (x, scale, *fmt.encode_args("cpu")), f"{variant}")
        codes = ops.REFERENCE["fp8_encode"](x, scale, *fmt.encode_args("cpu"))
        check("fp8_decode", (codes, scale, fmt.value_table("cpu")), f"{variant}")


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_int_codec(bits):
    x = random_floats(700, seed=6)
    x = torch.cat([x[~torch.isnan(x)], torch.tensor([0.5, 1.5, 2.5, -2.5])])
    qmax = (1 << (bits - 1)) - 1
    for scale in [torch.tensor(1.0), torch.rand(x.shape) + 0.1]:
        check("int_encode", (x, scale, qmax, bits), f"int{bits}")
        codes = ops.REFERENCE["int_encode"](x, scale, qmax, bits)
        check("int_decode", (codes, scale), f"int{bits}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the CUDA registration is exercised there")
def test_cuda_dispatch_uses_triton():
    from torchlns import backend_info

    assert backend_info()["cuda"] == "triton"
    x = torch.randn(1000, device="cuda")
    thr = tables.buckets_tensor(3, "cuda")
    off = torch.tensor(-100, dtype=torch.int32, device="cuda")
    got = torch.ops.torchlns.lns_encode(x, off, thr, 8, 3, False)
    assert torch.equal(got.cpu(), ops.REFERENCE["lns_encode"](x.cpu(), off.cpu(), thr.cpu(), 8, 3, False))
