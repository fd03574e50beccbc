"""Number formats and MAC configurations (chip-model.md sections 1, 2 and 5).

Every format is a frozen dataclass validated on construction, so an invalid format can never
reach a kernel. Offsets and scales belong to tensors, not to formats.

# Note: formats carry their behaviour
Everything the rest of torchlns needs to know about a format it asks the format object, not
an ``isinstance`` switch. ``Format`` declares the questions:

* ``kind`` names the format in serialized state (``to_tuple``/``Format.from_tuple``);
* ``param_name``, ``param_dtype``, ``param_bits``: what a tensor's parameter is called
  (offset or scale), its dtype, and its stored width in size accounting;
* ``check_param``, ``check_codes``, ``check_input``: validation of a parameter, of codes and
  of an input to encode;
* ``param_from_amax``: the default parameter for a group whose largest magnitude is ``M``;
* ``encode_op``/``encode_args`` and ``decode_op``/``decode_args``: which ``torchlns::`` op
  encodes and decodes, with the format's fields and exact tables as its extra arguments;
* ``mac_kind``: ``"log"`` (products from summed logs, as ``MACConfig`` says) or
  ``"scaled"`` (exact products of unscaled values, scaled afterwards: spec section 5);
  ``check_partner`` says which formats can be multiplied with it, ``check_mac`` which MAC
  arguments apply, ``layer_mac`` which MAC a converted layer of this format runs;
* ``magnitude``/``from_magnitude``/``max_index``: the magnitude ladder (below).

A new format is one new subclass of ``Format``; the tensor class, the layers, conversion,
size accounting and serialization pick it up from these answers.

# Note: the magnitude ladder
Every format's codes of one sign are a ladder of magnitudes: index 0 is zero, and each step
up is the next larger representable magnitude (the next log step in LNS, the next integer in
INT, the next float in FP8), up to ``max_index``. A code is ``(negative, index)``. Adaptive
rounding (``transforms/recover.py``) chooses between the two rungs around a float weight,
so it works on every format through these three answers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Dict, Literal, Optional, Tuple

import torch

from . import tables
from .checks import check_broadcast, check_int, check_values, value_range
from .fields import float32_fields, integer_log

__all__ = [
    "Format",
    "ScaledFormat",
    "LNSFormat",
    "FP8Format",
    "IntFormat",
    "MACConfig",
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
F32_MIN_NORMAL = 2.0**F32_MIN_EXP

_LNS_ROUNDINGS = ("nearest", "mitchell")
_CONVERSIONS = ("exact", "lut", "mitchell")
_ACCUMULATORS = ("float32", "fixed")


def _check_choice(name: str, value, choices, cls_name: str) -> None:
    if value not in choices:
        raise ValueError(f"{cls_name}.{name}={value!r} is unknown; expected one of {list(choices)}")


class Format:
    """Base of every number format (see Note: formats carry their behaviour)."""

    kind: ClassVar[str]
    param_name: ClassVar[str]
    param_dtype: ClassVar[torch.dtype]
    param_bits: ClassVar[int]
    mac_kind: ClassVar[str]
    encode_op: ClassVar[str]
    decode_op: ClassVar[str]
    integer: ClassVar[bool] = False  # codes are symmetric integers, products summed exactly
    bits: int

    _KINDS: ClassVar[Dict[str, type]] = {}

    def __init_subclass__(cls, kind: Optional[str] = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if kind is not None:
            known = Format._KINDS.get(kind)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise ValueError(f"format kind {kind!r} is taken by {known.__qualname__}")
            cls.kind = kind
            Format._KINDS[kind] = cls

    # -- serialization --------------------------------------------------------------------
    def to_tuple(self) -> tuple:
        """``(kind, *fields)``: plain builtins, so ``torch.load(weights_only=True)`` accepts it."""
        return (self.kind, *dataclasses.astuple(self))

    @staticmethod
    def from_tuple(t) -> "Format":
        kind, *fields = t
        if kind not in Format._KINDS:
            raise ValueError(f"unknown format kind {kind!r}; known: {sorted(Format._KINDS)}")
        return Format._KINDS[kind](*fields)

    # -- tensors ------------------------------------------------------------------------------
    @property
    def code_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def check_param(self, value, shape: torch.Size, device) -> torch.Tensor:
        """A parameter (int, float or tensor broadcasting against ``shape``) as a checked tensor."""
        raise NotImplementedError

    def check_codes(self, codes) -> torch.Tensor:
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dtype != self.code_dtype:
            raise TypeError(f"codes of {self} must have dtype {self.code_dtype}, got {codes.dtype}")
        return codes

    def check_input(self, x: torch.Tensor) -> None:
        """Refuse float32 input the format cannot encode (nothing, by default)."""

    def param_from_amax(self, m: torch.Tensor) -> torch.Tensor:
        """The default parameter of a group whose largest finite magnitude is ``m`` (0: empty group)."""
        raise NotImplementedError

    def describe_param(self, value) -> str:
        return f"{self.param_name}={value:.4g}"

    def candidate_params(self, m: float, octaves: int = 4) -> list:
        """Parameters for ranges from ``m`` down by ``octaves`` octaves at the format's own step, widest first."""
        raise NotImplementedError

    # -- magnitude ladder (see Note: the magnitude ladder) ----------------------------------
    @property
    def max_index(self) -> int:
        """The index of the largest finite magnitude."""
        raise NotImplementedError

    def magnitude(self, codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(negative, index): each code's sign and the rank of its magnitude, 0 for zero (and NaN)."""
        raise NotImplementedError

    def from_magnitude(self, negative: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Codes from signs and magnitude indices in ``0..max_index`` (index 0 is zero, unsigned)."""
        raise NotImplementedError

    # -- ops ----------------------------------------------------------------------------------
    def encode_args(self, device) -> tuple:
        """Arguments of ``encode_op`` after ``(x, param)``."""
        raise NotImplementedError

    def decode_args(self, device) -> tuple:
        """Arguments of ``decode_op`` after ``(codes, param)``."""
        raise NotImplementedError

    # -- MAC ----------------------------------------------------------------------------------
    def check_partner(self, other: "Format") -> None:
        """Raise unless activations of this format can be multiplied by weights of ``other``."""
        if type(self) is not type(other):
            raise TypeError(f"cannot multiply {self} activations by {other} weights: both operands must be of one "
                            f"kind (LNS, FP8 or INT)")

    def check_mac(self, mac: "MACConfig", acc_lsb) -> None:
        if not isinstance(mac, MACConfig):
            raise TypeError(f"mac must be a MACConfig, got {type(mac).__name__}")
        if acc_lsb is not None:
            raise ValueError(f"acc_lsb applies to the LNS fixed accumulator; {self} accumulates as spec section 5 says")

    def layer_mac(self, mac: "MACConfig") -> "MACConfig":
        """The MAC a converted layer of this format runs (spec section 5 fixes it for FP8 and INT)."""
        return IDEAL_MAC

    def needs_acc_lsb(self, mac: "MACConfig") -> bool:
        return False


@dataclass(frozen=True)
class LNSFormat(Format, kind="lns"):
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

    param_name: ClassVar[str] = "offset"
    param_dtype: ClassVar[torch.dtype] = torch.int32
    param_bits: ClassVar[int] = 8  # an LNS offset is stored in 8 bits (spec section 6)
    mac_kind: ClassVar[str] = "log"
    encode_op: ClassVar[str] = "lns_encode"
    decode_op: ClassVar[str] = "lns_decode"

    def __post_init__(self):
        check_int(self.bits, "LNSFormat.bits")
        check_int(self.frac_bits, "LNSFormat.frac_bits")
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

    def check_param(self, value, shape: torch.Size, device) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise TypeError(f"an LNS offset must be an integer tensor, got dtype {value.dtype}")
            check_broadcast(value, shape, "offset")
            if not check_values():
                return value.to(device=device, dtype=torch.int32)
            lo, hi = value_range(value)
            off = value.to(device=device, dtype=torch.int32) if lo >= -(2**31) and hi < 2**31 else None
        elif isinstance(value, int) and not isinstance(value, bool):
            lo = hi = value
            off = None
        else:
            raise TypeError(f"an LNS offset must be an int or an integer tensor, got {type(value).__name__}")
        if lo < self.offset_min or hi > self.offset_max:
            bad = lo if lo < self.offset_min else hi
            raise ValueError(
                f"offset {bad} is out of range for {self}: valid offsets are {self.offset_min}..{self.offset_max}, "
                f"which keep every value a normal float32 ((1 + offset)/2^F >= -126 and (E_max + offset)/2^F <= 127)"
            )
        if off is None:  # an int (range-checked above, so it fits int32)
            off = torch.tensor(value, dtype=torch.int32, device=device)
        return off

    def check_codes(self, codes) -> torch.Tensor:
        codes = super().check_codes(codes)
        if self.bits not in (8, 16) and codes.numel() and check_values():  # 8 and 16 bits fill their dtype
            lo, hi = value_range(codes.to(torch.int32))
            if lo < 0 or hi >= 1 << self.bits:
                raise ValueError(f"code {lo if lo < 0 else hi} is out of range for {self}: codes are "
                                 f"0..{(1 << self.bits) - 1}")
        return codes

    def param_from_amax(self, m: torch.Tensor) -> torch.Tensor:
        """``g(M) - E_max`` so that ``M`` encodes to ``E_max``, clamped to the valid range.

        ``M = 0`` (an all-zero or all-NaN group) takes the offset that puts 1.0 at ``E_max``.
        """
        return (self.integer_log(m) - self.e_max).clamp(self.offset_min, self.offset_max)

    def integer_log(self, m: torch.Tensor) -> torch.Tensor:
        """``g(m)``, the integer log of each ``m > 0`` in units of ``2^-F`` as encoding rounds it (``g(1) = 0`` for ``m <= 0``)."""
        m = torch.where(m > 0, m, 1.0).to(torch.float32).contiguous()
        _, _, e, frac = float32_fields(m)
        return integer_log(e, frac, self.frac_bits, self.rounding == "mitchell",
                           tables.buckets_tensor(self.frac_bits, m.device))

    @property
    def max_index(self) -> int:
        return self.e_max

    def magnitude(self, codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        c = codes.to(torch.int32) & ((1 << self.bits) - 1)
        index = c & self.e_max
        return ((c >> (self.bits - 1)) == 1) & (index != 0), index

    def from_magnitude(self, negative: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = index.to(torch.int32)
        c = torch.where(index == 0, 0, index | (negative.to(torch.int32) << (self.bits - 1)))
        if self.bits == 16:  # int16 holds the bit pattern
            c = torch.where(c >= 1 << 15, c - (1 << 16), c)
        return c.to(self.code_dtype)

    def describe_param(self, value) -> str:
        return f"offset={int(value)}"

    def candidate_params(self, m: float, octaves: int = 4) -> list:
        """Every offset from ``m``'s down by ``octaves`` octaves (2^F offset steps each), while valid."""
        base = self.param_from_amax(torch.tensor(m, dtype=torch.float32))
        return [base - j for j in range((octaves << self.frac_bits) + 1) if (base - j).item() >= self.offset_min]

    def encode_args(self, device) -> tuple:
        return tables.buckets_tensor(self.frac_bits, device), self.bits, self.frac_bits, self.rounding == "mitchell"

    def decode_args(self, device) -> tuple:
        return tables.decode_bits_tensor(self.frac_bits, device), self.bits, self.frac_bits

    def check_partner(self, other: Format) -> None:
        super().check_partner(other)
        if self.frac_bits != other.frac_bits:
            raise ValueError(f"LNS operands must share frac_bits so that log codes add: activations {self}, "
                             f"weights {other}")

    def check_mac(self, mac: "MACConfig", acc_lsb) -> None:
        if not isinstance(mac, MACConfig):
            raise TypeError(f"mac must be a MACConfig, got {type(mac).__name__}")
        mac.check_acc_lsb(acc_lsb)

    def layer_mac(self, mac: "MACConfig") -> "MACConfig":
        return mac

    def needs_acc_lsb(self, mac: "MACConfig") -> bool:
        return mac.fixed

    def __repr__(self) -> str:
        r = "" if self.rounding == "nearest" else f", {self.rounding}"
        return f"LNS{self.bits}(F={self.frac_bits}{r})"


class ScaledFormat(Format):
    """A format whose codes are scaled by a float32 scale (FP8 and INT; spec section 5)."""

    param_name: ClassVar[str] = "scale"
    param_dtype: ClassVar[torch.dtype] = torch.float32
    param_bits: ClassVar[int] = 32  # a float32 scale (spec section 6)
    mac_kind: ClassVar[str] = "scaled"

    @property
    def max(self) -> float:
        raise NotImplementedError

    def check_param(self, value, shape: torch.Size, device) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            if not value.dtype.is_floating_point:
                raise TypeError(f"a scale must be a floating-point tensor, got dtype {value.dtype}")
            check_broadcast(value, shape, "scale")
            s = value.to(device=device, dtype=torch.float32)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            s = torch.tensor(float(value), dtype=torch.float32, device=device)
        else:
            raise TypeError(f"a scale must be a float or a float tensor, got {type(value).__name__}")
        if check_values() and s.numel():
            ok = (s >= F32_MIN_NORMAL) & torch.isfinite(s)
            if not bool(ok.all()):
                bad = s[~ok].flatten()[0].item()
                raise ValueError(f"scale {bad!r} is invalid: a scale must be a positive, finite, normal float32")
        return s

    def param_from_amax(self, m: torch.Tensor) -> torch.Tensor:
        """``M / max`` in float32 (1.0 for ``M = 0``), kept a normal float32."""
        s = m.to(torch.float32) / self.max
        return torch.where(m > 0, s, 1.0).clamp(min=F32_MIN_NORMAL)

    def candidate_params(self, m: float, octaves: int = 4) -> list:
        """Scales for ranges ``m · 2^(-j/8)``, eight per octave, down by ``octaves`` octaves."""
        return [self.param_from_amax(torch.tensor(m * 2.0 ** (-j / 8), dtype=torch.float32)) for j in range(8 * octaves + 1)]

    def value_table(self, device) -> Optional[torch.Tensor]:
        """float32 value of every code, for the scaled MAC (None: the code is its own value)."""
        return None


@dataclass(frozen=True)
class FP8Format(ScaledFormat, kind="fp8"):
    """OCP FP8: ``"e4m3"`` (bias 7, max 448, no inf) or ``"e5m2"`` (bias 15, max 57344, inf).

    Codes are the uint8 bit patterns of ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``.
    Unlike torch's e5m2 cast, encoding saturates finite overflow to ±max, including a finite
    ``x`` whose float32 quotient ``x / scale`` overflows; e4m3 also saturates ±inf, and only
    an infinite ``x`` encodes to e5m2's ±inf.
    """

    variant: Literal["e4m3", "e5m2"] = "e4m3"

    bits: ClassVar[int] = 8
    encode_op: ClassVar[str] = "fp8_encode"
    decode_op: ClassVar[str] = "fp8_decode"
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
    def max_code(self) -> int:
        """The code of +max: 0x7E (e4m3, below the NaN code) or 0x7B (e5m2, below inf)."""
        return 0x7E if self.variant == "e4m3" else 0x7B

    @property
    def has_inf(self) -> bool:
        return self.variant == "e5m2"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.variant == "e4m3" else torch.float8_e5m2

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def max_index(self) -> int:
        return self.max_code  # FP8 codes of one sign are ordered by magnitude

    def magnitude(self, codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        c = codes.to(torch.int32)
        index = torch.where((c & 0x7F) > self.max_code, 0, c & 0x7F)  # NaN (and inf) are not on the ladder
        return ((c >> 7) == 1) & (index != 0), index

    def from_magnitude(self, negative: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = index.to(torch.int32)
        return torch.where(index == 0, 0, index | (negative.to(torch.int32) << 7)).to(torch.uint8)

    def encode_args(self, device) -> tuple:
        return self.man_bits, self.bias, self.max_code, self.has_inf

    def decode_args(self, device) -> tuple:
        return (tables.fp8_values_tensor(self.variant, device),)

    def value_table(self, device) -> Optional[torch.Tensor]:
        return tables.fp8_values_tensor(self.variant, device)

    def __repr__(self) -> str:
        return f"FP8({self.variant})"


@dataclass(frozen=True)
class IntFormat(ScaledFormat, kind="int"):
    """Symmetric integer: ``q = clamp(rne(x / scale), -(2^(b-1)-1), 2^(b-1)-1)``.

    Codes are int8 for ``bits <= 8``, int16 up to 16 bits. NaN has no code: encoding NaN is
    an error rather than a silent zero.
    """

    bits: int = 8

    encode_op: ClassVar[str] = "int_encode"
    decode_op: ClassVar[str] = "int_decode"
    integer: ClassVar[bool] = True

    def __post_init__(self):
        check_int(self.bits, "IntFormat.bits")
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

    def check_codes(self, codes) -> torch.Tensor:
        codes = super().check_codes(codes)
        if codes.numel() and check_values():
            lo, hi = value_range(codes.to(torch.int32))
            if lo < -self.qmax or hi > self.qmax:
                raise ValueError(f"code {lo if lo < -self.qmax else hi} is out of range for {self}: codes are "
                                 f"±{self.qmax}")
        return codes

    def check_input(self, x: torch.Tensor) -> None:
        if check_values() and x.numel() and bool(torch.isnan(x).any()):
            raise ValueError(f"{self} has no code for NaN, and the input contains NaN")

    @property
    def max_index(self) -> int:
        return self.qmax

    def magnitude(self, codes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        q = codes.to(torch.int32)
        return q < 0, q.abs()

    def from_magnitude(self, negative: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = index.to(torch.int32)
        return torch.where(negative, -index, index).to(self.code_dtype)

    def encode_args(self, device) -> tuple:
        return self.qmax, self.bits

    def decode_args(self, device) -> tuple:
        return ()

    def __repr__(self) -> str:
        return f"INT{self.bits}"


@dataclass(frozen=True)
class MACConfig:
    """How products are converted to the linear domain and accumulated (spec section 2).

    ``conversion``: ``"exact"`` (float32 decode table), ``"lut"`` (``lut_bits``-fraction-bit
    table) or ``"mitchell"`` (``1 + r/2^F``). ``accumulator``: ``"float32"`` or ``"fixed"``
    (``acc_bits`` two's complement; the LSB weight ``acc_lsb`` is supplied per op call, in
    ``ACC_LSB_MIN..ACC_LSB_MAX``). ``lut_bits`` and ``acc_bits`` are validated even when
    unused, so that a config means the same thing whichever mode it is switched to.
    """

    conversion: Literal["exact", "lut", "mitchell"] = "exact"
    accumulator: Literal["float32", "fixed"] = "float32"
    lut_bits: int = 8
    acc_bits: int = 32
    # Fixed mode only (spec section 2, "Overflow and two-stage accumulation"): saturate or wrap,
    # and chunks of ``chunk`` products (0: none) summed at ``chunk_bits`` (0: acc_bits) bits.
    overflow: Literal["saturate", "wrap"] = "saturate"
    chunk: int = 0
    chunk_bits: int = 0

    # Beyond this range every output of a layer saturates or vanishes.
    ACC_LSB_MIN: ClassVar[int] = -512
    ACC_LSB_MAX: ClassVar[int] = 512

    def __post_init__(self):
        _check_choice("conversion", self.conversion, _CONVERSIONS, "MACConfig")
        _check_choice("accumulator", self.accumulator, _ACCUMULATORS, "MACConfig")
        check_int(self.lut_bits, "MACConfig.lut_bits")
        check_int(self.acc_bits, "MACConfig.acc_bits")
        if not 1 <= self.lut_bits <= 23:
            raise ValueError(f"MACConfig.lut_bits={self.lut_bits} is out of range; expected 1..23")
        if not 8 <= self.acc_bits <= 48:
            raise ValueError(f"MACConfig.acc_bits={self.acc_bits} is out of range; expected 8..48")
        _check_choice("overflow", self.overflow, ("saturate", "wrap"), "MACConfig")
        check_int(self.chunk, "MACConfig.chunk")
        check_int(self.chunk_bits, "MACConfig.chunk_bits")
        if self.chunk < 0:
            raise ValueError(f"MACConfig.chunk={self.chunk} must be >= 0 (0: no chunks)")
        if self.chunk_bits and not 8 <= self.chunk_bits <= 48:
            raise ValueError(f"MACConfig.chunk_bits={self.chunk_bits} is out of range; expected 8..48 (0: acc_bits)")
        if self.chunk_bits and not self.chunk:
            raise ValueError("MACConfig.chunk_bits needs chunk (the number of products per chunk)")
        if (self.chunk or self.overflow != "saturate") and not self.fixed:
            raise ValueError("MACConfig.overflow and chunk belong to the fixed accumulator; "
                             "this MAC accumulates in float32")

    @classmethod
    def chip(cls) -> "MACConfig":
        """The chip preset: 8-bit LUT conversion, 32-bit fixed-point accumulator."""
        return cls(conversion="lut", lut_bits=8, accumulator="fixed", acc_bits=32)

    def replace(self, **changes) -> "MACConfig":
        return dataclasses.replace(self, **changes)

    @property
    def fixed(self) -> bool:
        return self.accumulator == "fixed"

    @property
    def acc_max(self) -> int:
        """``T = 2^(W-1) - 1``, the largest accumulator magnitude."""
        return 2 ** (self.acc_bits - 1) - 1

    def to_tuple(self) -> tuple:
        return dataclasses.astuple(self)

    def table(self, frac_bits: int, device) -> torch.Tensor:
        """``C[r]`` of the conversion as exact float64 values (see Note: exact tables in core/tables.py)."""
        return tables.conversion_tensor_f64(frac_bits, self.conversion, self.lut_bits, device)

    def check_acc_lsb(self, acc_lsb) -> None:
        if not self.fixed:
            if acc_lsb is not None:
                raise ValueError("acc_lsb is only used by the fixed accumulator; this MAC accumulates in float32")
            return
        if acc_lsb is None:
            raise ValueError("the fixed accumulator needs acc_lsb (the exponent of its LSB); a converted module "
                             "calibrates it")
        if isinstance(acc_lsb, bool) or not isinstance(acc_lsb, int):
            raise TypeError(f"acc_lsb must be an int, got {type(acc_lsb).__name__}")
        if not self.ACC_LSB_MIN <= acc_lsb <= self.ACC_LSB_MAX:
            raise ValueError(f"acc_lsb={acc_lsb} is out of range {self.ACC_LSB_MIN}..{self.ACC_LSB_MAX} (beyond it "
                             "every output saturates or vanishes)")

    @property
    def two_stage(self) -> bool:
        """Wrap-around or chunked accumulation (see Note: overflow and chunks in ops/reference.py)."""
        return self.fixed and (self.overflow == "wrap" or self.chunk > 0)

    @property
    def chunk_width(self) -> int:
        """W1: the bits of a product and of a chunk sum (acc_bits without chunks)."""
        return (self.chunk_bits or self.acc_bits) if self.chunk else self.acc_bits

    def check_reduction(self, K: int) -> None:
        """An exact int64 sum of K fixed-point products needs ``K * 2^(W-1) < 2^63`` (spec section 2)."""
        if self.fixed and self.chunk:
            L, W1 = self.chunk, self.chunk_width
            if min(L, K) * 2 ** (W1 - 1) >= 2**63 or -(-K // L) * 2 ** (W1 - 1) >= 2**63:
                raise ValueError(f"accumulator overflow: chunks of {L} products of up to 2^{W1 - 1}, "
                                 f"{-(-K // L)} chunks for K={K}, do not sum exactly in int64")
            return
        if self.fixed and K * 2 ** (self.acc_bits - 1) >= 2**63:
            raise ValueError(
                f"accumulator overflow: K={K} products of up to 2^{self.acc_bits - 1} need K*2^{self.acc_bits - 1} < "
                f"2^63 for an exact int64 sum; split the reduction or use fewer acc_bits"
            )

    def __repr__(self) -> str:
        conv = f"lut{self.lut_bits}" if self.conversion == "lut" else self.conversion
        acc = f"fixed{self.acc_bits}" if self.fixed else "float32"
        if self.overflow == "wrap":
            acc += " wrap"
        if self.chunk:
            acc += f" chunk{self.chunk}x{self.chunk_width}"
        return f"MAC({conv}, {acc})"


LNS8 = LNSFormat(bits=8, frac_bits=3)
FP8_E4M3 = FP8Format("e4m3")
FP8_E5M2 = FP8Format("e5m2")
INT8 = IntFormat(bits=8)
IDEAL_MAC = MACConfig()
CHIP_MAC = MACConfig.chip()
