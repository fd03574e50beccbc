"""The README's statements about backends, checked against what the backends do (issue 14)."""

from pathlib import Path

import pytest
import torch

import torchlns
from torchlns import ops

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
pytestmark = pytest.mark.skipif(not torchlns.has_native(), reason="compares the C++ kernels with the reference")


def _operands():
    g = torch.Generator().manual_seed(0)
    x = torchlns.LNSTensor.from_float(torch.randn(128, 256, generator=g), torchlns.LNS8)
    w = torchlns.LNSTensor.from_float(torch.randn(128, 256, generator=g), torchlns.LNS8, granularity="channel")
    return x, w


def test_the_float32_accumulator_is_bound_identical_not_bit_identical():
    x, w = _operands()
    native = torchlns.lns_linear(x, w)
    with ops.reference_kernels():
        reference = torchlns.lns_linear(x, w)
    differ = (native.view(torch.int32) != reference.view(torch.int32)).sum().item()
    assert differ > native.numel() // 2  # most outputs differ in their last bits...
    products = torchlns.lns_linear(torchlns.LNSTensor(x.codes & 0x7F, x.offset, x.fmt),
                                   torchlns.LNSTensor(w.codes & 0x7F, w.offset, w.fmt))  # ~ sum |p|
    bound = 256 * 2.0**-24 * products.double() + 2.0**-23 * reference.double().abs()
    assert ((native.double() - reference.double()).abs() <= bound).all()  # ...within the spec's bound
    assert "bit-identical:" in README and "identical within the spec's bound" in README
    assert "which gives the same bits" not in README


def test_the_fixed_accumulator_is_bit_identical():
    x, w = _operands()
    lsb = -8
    native = torchlns.lns_linear(x, w, mac=torchlns.CHIP_MAC, acc_lsb=lsb)
    with ops.reference_kernels():
        reference = torchlns.lns_linear(x, w, mac=torchlns.CHIP_MAC, acc_lsb=lsb)
    assert torch.equal(native.view(torch.int32), reference.view(torch.int32))
    assert "What is reproducible where" in README
