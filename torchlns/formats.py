"""Number formats and MAC configurations (chip-model.md sections 1, 2 and 5).

Every format is a frozen dataclass validated on construction, so an invalid format can never
reach a kernel. Offsets and scales belong to tensors, not to formats.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal, Union

import torch

__all__ = [
    "LNSFormat",
    "FP8Format",
    "IntFormat",
    "MACConfig",
    "Format",
    "LNS8",
    "FP8_E4M3",
    "FP8_E5M2",
    "INT8",
    "IDEAL_MAC",
    "CHIP_MAC",
]

# float32 normal exponents: 2^-126 .. 2^127 (max < 2^128).
F32_MIN_EXP = -126
F32_MAX_EXP = 127

_LNS_ROUNDINGS = ("nearest", "mitchell")
_CONVERSIONS = ("exact", "lut", "mitchell")
_ACCUMULATORS = ("float32", "fixed")


def _check_int(name: str, value, cls_name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{cls_name}.{name} must be an int, got {type(value).__name__} {value!r}")


def _check_choice(name: str, value, choices, cls_name: str) -> None:
    if value not in choices:
        raise ValueError(f"{cls_name}.{name}={value!r} is unknown; expected one of {list(choices)}")


@dataclass(frozen=True)
class LNSFormat:
    """A sign/log-magnitude code of ``bits`` bits with ``frac_bits`` fractional log bits.

    Code layout: sign in the top bit, magnitude field ``E`` in the low ``bits-1`` bits.
    ``E=0, s=0`` is zero, ``E=0, s=1`` is NaN, anything else is
    ``(-1)^s * 2^((E + offset) / 2^F)``.

    A format is rejected when no offset can keep all of its magnitudes normal float32
    numbers, i.e. when its span ``2^((E_max-1)/2^F)`` is wider than float32's normal range
    ``2^253`` (for example ``bits=16, frac_bits=0``). Such a format could encode nothing.
    """

    bits: int = 8
    frac_bits: int = 3
    rounding: Literal["nearest", "mitchell"] = "nearest"

    kind: ClassVar[str] = "lns"

    def __post_init__(self):
        _check_int("bits", self.bits, "LNSFormat")
        _check_int("frac_bits", self.frac_bits, "LNSFormat")
        if not 4 <= self.bits <= 16:
            raise ValueError(f"LNSFormat.bits={self.bits} is out of range; expected 4 <= bits <= 16")
        if not 0 <= self.frac_bits <= self.bits - 2:
            raise ValueError(
                f"LNSFormat.frac_bits={self.frac_bits} is out of range for bits={self.bits}; "
                f"expected 0 <= frac_bits <= bits-2 = {self.bits - 2}"
            )
        _check_choice("rounding", self.rounding, _LNS_ROUNDINGS, "LNSFormat")
        if self.offset_min > self.offset_max:
            need = next(f for f in range(self.bits - 1) if self.e_max - 1 <= 253 << f)
            raise ValueError(
                f"LNSFormat(bits={self.bits}, frac_bits={self.frac_bits}) spans "
                f"2^{(self.e_max - 1) / (1 << self.frac_bits):g}, wider than the float32 normal "
                f"range 2^253, so no offset is valid; use frac_bits >= {need}"
            )

    @property
    def e_max(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def nan_code(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.bits <= 8 else torch.int16

    @property
    def offset_min(self) -> int:
        """Smallest valid offset: ``(1 + offset) / 2^F >= -126``."""
        return F32_MIN_EXP * (1 << self.frac_bits) - 1

    @property
    def offset_max(self) -> int:
        """Largest valid offset: ``(E_max + offset) / 2^F <= 127``."""
        return F32_MAX_EXP * (1 << self.frac_bits) - self.e_max

    def __repr__(self) -> str:
        r = "" if self.rounding == "nearest" else f", {self.rounding}"
        return f"LNS{self.bits}(F={self.frac_bits}{r})"


@dataclass(frozen=True)
class FP8Format:
    """OCP FP8: ``"e4m3"`` (bias 7, max 448, no inf) or ``"e5m2"`` (bias 15, max 57344, inf).

    Codes are the uint8 bit patterns of ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``.
    Unlike torch's e5m2 cast, encoding saturates finite overflow to ±max, including a finite
    ``x`` whose float32 quotient ``x / scale`` overflows; e4m3 also saturates ±inf, and only
    an infinite ``x`` encodes to e5m2's ±inf.
    """

    variant: Literal["e4m3", "e5m2"] = "e4m3"

    kind: ClassVar[str] = "fp8"
    bits: ClassVar[int] = 8
    _LAYOUT: ClassVar[dict] = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15)}

    def __post_init__(self):
        _check_choice("variant", self.variant, tuple(self._LAYOUT), "FP8Format")

    @property
    def exp_bits(self) -> int:
        return self._LAYOUT[self.variant][0]

    @property
    def man_bits(self) -> int:
        return self._LAYOUT[self.variant][1]

    @property
    def bias(self) -> int:
        return self._LAYOUT[self.variant][2]

    @property
    def max(self) -> float:
        return 448.0 if self.variant == "e4m3" else 57344.0

    @property
    def has_inf(self) -> bool:
        return self.variant == "e5m2"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.variant == "e4m3" else torch.float8_e5m2

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    def __repr__(self) -> str:
        return f"FP8({self.variant})"


@dataclass(frozen=True)
class IntFormat:
    """Symmetric integer: ``q = clamp(rne(x / scale), -(2^(b-1)-1), 2^(b-1)-1)``.

    Codes are int8 for ``bits <= 8``, int16 up to 16 bits. NaN has no code: encoding NaN is
    an error rather than a silent zero.
    """

    bits: int = 8

    kind: ClassVar[str] = "int"

    def __post_init__(self):
        _check_int("bits", self.bits, "IntFormat")
        if not 2 <= self.bits <= 16:
            raise ValueError(f"IntFormat.bits={self.bits} is out of range; expected 2 <= bits <= 16")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def max(self) -> float:
        return float(self.qmax)

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.bits <= 8 else torch.int16

    def __repr__(self) -> str:
        return f"INT{self.bits}"


Format = Union[LNSFormat, FP8Format, IntFormat]


@dataclass(frozen=True)
class MACConfig:
    """How products are converted to the linear domain and accumulated (spec section 2).

    ``conversion``: ``"exact"`` (float32 decode table), ``"lut"`` (``lut_bits``-fraction-bit
    table) or ``"mitchell"`` (``1 + r/2^F``). ``accumulator``: ``"float32"`` or ``"fixed"``
    (``acc_bits`` two's complement; the LSB weight ``acc_lsb`` is supplied per op call).
    ``lut_bits`` and ``acc_bits`` are validated even when unused, so that a config means the
    same thing whichever mode it is switched to.
    """

    conversion: Literal["exact", "lut", "mitchell"] = "exact"
    accumulator: Literal["float32", "fixed"] = "float32"
    lut_bits: int = 8
    acc_bits: int = 32

    def __post_init__(self):
        _check_choice("conversion", self.conversion, _CONVERSIONS, "MACConfig")
        _check_choice("accumulator", self.accumulator, _ACCUMULATORS, "MACConfig")
        _check_int("lut_bits", self.lut_bits, "MACConfig")
        _check_int("acc_bits", self.acc_bits, "MACConfig")
        if not 1 <= self.lut_bits <= 23:
            raise ValueError(f"MACConfig.lut_bits={self.lut_bits} is out of range; expected 1..23")
        if not 8 <= self.acc_bits <= 48:
            raise ValueError(f"MACConfig.acc_bits={self.acc_bits} is out of range; expected 8..48")

    @classmethod
    def chip(cls) -> "MACConfig":
        """The chip preset: 8-bit LUT conversion, 32-bit fixed-point accumulator."""
        return cls(conversion="lut", lut_bits=8, accumulator="fixed", acc_bits=32)

    def replace(self, **changes) -> "MACConfig":
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        conv = f"lut{self.lut_bits}" if self.conversion == "lut" else self.conversion
        acc = f"fixed{self.acc_bits}" if self.accumulator == "fixed" else "float32"
        return f"MAC({conv}, {acc})"


LNS8 = LNSFormat(bits=8, frac_bits=3)
FP8_E4M3 = FP8Format("e4m3")
FP8_E5M2 = FP8Format("e5m2")
INT8 = IntFormat(bits=8)
IDEAL_MAC = MACConfig()
CHIP_MAC = MACConfig.chip()
