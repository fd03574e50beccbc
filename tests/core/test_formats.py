"""Format and MAC-config construction (chip-model.md sections 1, 2, 5 and 7).

Every field is validated on construction, formats are frozen, hashable value objects with a
short repr, and the presets are what the spec names.
"""

import dataclasses
import re
from fractions import Fraction

import pytest

import torchlns
from torchlns import CHIP_MAC, FP8_E4M3, FP8_E5M2, IDEAL_MAC, INT8, LNS8, FP8Format, IntFormat, LNSFormat, MACConfig


def _lns_span_ok(bits: int, frac_bits: int) -> bool:
    """Some offset keeps all magnitudes normal: offset_min <= offset_max (section 1)."""
    e_max = (1 << (bits - 1)) - 1
    return e_max - 1 <= 253 * (1 << frac_bits)


def _valid_lns_params():
    return [(b, f) for b in range(4, 17) for f in range(0, b - 1) if _lns_span_ok(b, f)]


# ----------------------------------------------------------------------------------------
# LNSFormat
# ----------------------------------------------------------------------------------------
def test_lns_defaults_and_preset():
    assert LNSFormat() == LNSFormat(bits=8, frac_bits=3, rounding="nearest")
    assert LNS8 == LNSFormat(8, 3)
    assert (LNS8.bits, LNS8.frac_bits, LNS8.rounding) == (8, 3, "nearest")
    assert LNS8.e_max == 127
    assert LNS8.nan_code == 0x80
    assert torchlns.LNS8 is LNS8


@pytest.mark.parametrize("bits", [-1, 0, 1, 2, 3, 17, 32, 64])
def test_lns_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        LNSFormat(bits=bits, frac_bits=0)


@pytest.mark.parametrize("bits,frac_bits", [(8, 7), (8, 8), (4, 3), (16, 15), (16, 23), (8, -1), (12, -3)])
def test_lns_frac_bits_out_of_range(bits, frac_bits):
    with pytest.raises(ValueError, match="frac_bits"):
        LNSFormat(bits=bits, frac_bits=frac_bits)


@pytest.mark.parametrize("rounding", ["Nearest", "rne", "truncate", "", None, 0, "mitchel"])
def test_lns_unknown_rounding(rounding):
    with pytest.raises(ValueError, match="rounding"):
        LNSFormat(rounding=rounding)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=8.0),
        dict(bits="8"),
        dict(bits=True),
        dict(bits=None),
        dict(frac_bits=3.0),
        dict(frac_bits="3"),
        dict(frac_bits=False),
        dict(frac_bits=None),
    ],
)
def test_lns_non_int_fields(kwargs):
    with pytest.raises(TypeError):
        LNSFormat(**kwargs)


def test_every_valid_lns_format_constructs():
    for bits, frac_bits in _valid_lns_params():
        fmt = LNSFormat(bits, frac_bits)
        assert fmt.e_max == (1 << (bits - 1)) - 1
        assert fmt.nan_code == 1 << (bits - 1)


@pytest.mark.parametrize("bits", range(4, 17))
def test_lns_span_too_wide_raises_naming_needed_frac_bits(bits):
    need = next(f for f in range(0, bits - 1) if _lns_span_ok(bits, f))
    for frac_bits in range(0, need):
        with pytest.raises(ValueError) as info:
            LNSFormat(bits, frac_bits)
        msg = str(info.value)
        assert re.search(rf"frac_bits\D*\b{need}\b", msg), msg
    LNSFormat(bits, need)  # the named frac_bits works


def test_lns_span_examples():
    with pytest.raises(ValueError, match=r"frac_bits\D*8\b"):
        LNSFormat(bits=16, frac_bits=0)
    with pytest.raises(ValueError, match=r"frac_bits\D*1\b"):
        LNSFormat(bits=9, frac_bits=0)
    LNSFormat(bits=16, frac_bits=8)
    LNSFormat(bits=8, frac_bits=0)  # every format of <= 8 bits fits


@pytest.mark.parametrize("bits,frac_bits", _valid_lns_params())
def test_lns_offset_limits_match_spec(bits, frac_bits):
    fmt = LNSFormat(bits, frac_bits)
    n = 1 << frac_bits

    def valid(offset):  # spec section 1, evaluated exactly
        return Fraction(1 + offset, n) >= -126 and Fraction(fmt.e_max + offset, n) <= 127

    assert fmt.offset_min == -126 * n - 1
    assert fmt.offset_max == 127 * n - fmt.e_max
    assert valid(fmt.offset_min) and not valid(fmt.offset_min - 1)
    assert valid(fmt.offset_max) and not valid(fmt.offset_max + 1)
    assert fmt.offset_min <= fmt.offset_max


def test_lns8_offset_limits():
    assert (LNS8.offset_min, LNS8.offset_max) == (-1009, 889)


@pytest.mark.parametrize("bits", [4, 8, 9, 16])
def test_lns_code_dtype(bits):
    import torch

    fmt = LNSFormat(bits, bits - 2)
    assert fmt.code_dtype == (torch.uint8 if bits <= 8 else torch.int16)


# ----------------------------------------------------------------------------------------
# FP8Format / IntFormat
# ----------------------------------------------------------------------------------------
def test_fp8_presets_and_fields():
    import torch

    assert FP8Format() == FP8_E4M3 == FP8Format("e4m3")
    assert FP8_E5M2 == FP8Format(variant="e5m2")
    assert (FP8_E4M3.bias, FP8_E4M3.max, FP8_E4M3.has_inf) == (7, 448.0, False)
    assert (FP8_E5M2.bias, FP8_E5M2.max, FP8_E5M2.has_inf) == (15, 57344.0, True)
    assert FP8_E4M3.torch_dtype == torch.float8_e4m3fn
    assert FP8_E5M2.torch_dtype == torch.float8_e5m2


@pytest.mark.parametrize("variant", ["E4M3", "e3m4", "e4m3fnuz", "e5m2fnuz", "", None, 8])
def test_fp8_unknown_variant(variant):
    with pytest.raises(ValueError, match="variant"):
        FP8Format(variant)


def test_int_presets_and_fields():
    import torch

    assert IntFormat() == INT8 == IntFormat(bits=8)
    assert INT8.qmax == 127
    assert IntFormat(4).qmax == 7
    assert IntFormat(16).qmax == 32767
    assert IntFormat(8).code_dtype == torch.int8
    assert IntFormat(16).code_dtype == torch.int16


@pytest.mark.parametrize("bits", [-8, 0, 1, 17, 32])
def test_int_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits"):
        IntFormat(bits)


@pytest.mark.parametrize("bits", [8.0, "8", True, None])
def test_int_non_int_bits(bits):
    with pytest.raises(TypeError):
        IntFormat(bits)


# ----------------------------------------------------------------------------------------
# MACConfig
# ----------------------------------------------------------------------------------------
def test_mac_defaults_and_presets():
    assert (MACConfig().conversion, MACConfig().accumulator) == ("exact", "float32")
    assert IDEAL_MAC == MACConfig()
    chip = MACConfig.chip()
    assert (chip.conversion, chip.lut_bits, chip.accumulator, chip.acc_bits) == ("lut", 8, "fixed", 32)
    assert CHIP_MAC == chip
    assert CHIP_MAC == MACConfig(conversion="lut", lut_bits=8, accumulator="fixed", acc_bits=32)
    assert MACConfig().replace(conversion="mitchell") == MACConfig(conversion="mitchell")


@pytest.mark.parametrize("conversion", ["Exact", "lut8", "log", "", None])
def test_mac_unknown_conversion(conversion):
    with pytest.raises(ValueError, match="conversion"):
        MACConfig(conversion=conversion)


@pytest.mark.parametrize("accumulator", ["float16", "fixed32", "int", "", None])
def test_mac_unknown_accumulator(accumulator):
    with pytest.raises(ValueError, match="accumulator"):
        MACConfig(accumulator=accumulator)


@pytest.mark.parametrize("acc_bits", [-32, 0, 7, 49, 64])
def test_mac_acc_bits_out_of_range(acc_bits):
    with pytest.raises(ValueError, match="acc_bits"):
        MACConfig(accumulator="fixed", acc_bits=acc_bits)
    with pytest.raises(ValueError, match="acc_bits"):  # validated even when unused
        MACConfig(accumulator="float32", acc_bits=acc_bits)


@pytest.mark.parametrize("lut_bits", [-1, 0, 24, 32])
def test_mac_lut_bits_out_of_range(lut_bits):
    with pytest.raises(ValueError, match="lut_bits"):
        MACConfig(conversion="lut", lut_bits=lut_bits)
    with pytest.raises(ValueError, match="lut_bits"):
        MACConfig(conversion="exact", lut_bits=lut_bits)


def test_mac_field_limits_inclusive():
    for w in (8, 48):
        assert MACConfig(accumulator="fixed", acc_bits=w).acc_bits == w
    for p in (1, 23):
        assert MACConfig(conversion="lut", lut_bits=p).lut_bits == p


@pytest.mark.parametrize("kwargs", [dict(acc_bits=32.0), dict(acc_bits="32"), dict(acc_bits=True),
                                    dict(lut_bits=8.0), dict(lut_bits="8"), dict(lut_bits=True)])
def test_mac_non_int_fields(kwargs):
    with pytest.raises(TypeError):
        MACConfig(**kwargs)


# ----------------------------------------------------------------------------------------
# frozen, hashable, repr
# ----------------------------------------------------------------------------------------
ALL_OBJECTS = [
    LNS8,
    LNSFormat(8, 3, "mitchell"),
    LNSFormat(4, 0),
    LNSFormat(4, 2),
    LNSFormat(12, 7),
    LNSFormat(16, 14),
    LNSFormat(16, 14, "mitchell"),
    FP8_E4M3,
    FP8_E5M2,
    INT8,
    IntFormat(4),
    IntFormat(16),
    IDEAL_MAC,
    CHIP_MAC,
    MACConfig(conversion="mitchell"),
    MACConfig(conversion="lut", lut_bits=12),
    MACConfig(accumulator="fixed", acc_bits=24),
]


@pytest.mark.parametrize("obj", ALL_OBJECTS, ids=repr)
def test_frozen(obj):
    assert dataclasses.is_dataclass(obj)
    field = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, getattr(obj, field))
    assert hash(obj) == hash(dataclasses.replace(obj))
    assert obj == dataclasses.replace(obj)


def test_replace_revalidates():
    with pytest.raises(ValueError):
        dataclasses.replace(LNS8, frac_bits=7)
    with pytest.raises(ValueError):
        CHIP_MAC.replace(acc_bits=64)


def test_formats_usable_as_dict_keys():
    d = {obj: i for i, obj in enumerate(ALL_OBJECTS)}
    assert len(d) == len(ALL_OBJECTS)
    assert d[LNSFormat(8, 3)] == 0


@pytest.mark.parametrize("obj", ALL_OBJECTS, ids=repr)
def test_repr_short_and_readable(obj):
    r = repr(obj)
    assert "\n" not in r and len(r) <= 32, r
    assert "ClassVar" not in r and "kind" not in r and "object at" not in r
    if isinstance(obj, LNSFormat):
        assert str(obj.bits) in r and str(obj.frac_bits) in r
        assert ("mitchell" in r) == (obj.rounding == "mitchell")
    if isinstance(obj, FP8Format):
        assert obj.variant in r
    if isinstance(obj, IntFormat):
        assert str(obj.bits) in r
    if isinstance(obj, MACConfig):
        assert obj.conversion in r and obj.accumulator in r
        if obj.conversion == "lut":
            assert str(obj.lut_bits) in r
        if obj.accumulator == "fixed":
            assert str(obj.acc_bits) in r


def test_reprs_distinguish_objects():
    reprs = [repr(o) for o in ALL_OBJECTS]
    assert len(set(reprs)) == len(reprs), reprs
