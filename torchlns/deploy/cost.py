"""``torchlns.cost_report``: what a network costs on a chip, per layer and in total.

# Note: cost model
A first-order model, the kind an architect draws on a whiteboard, made exact where it can be:

* **MACs** are counted from the shapes one forward of ``example_input`` sees (forward hooks,
  so a layer called twice counts twice). Conv: ``out.numel · C_in/groups · prod(kernel)``
  (taps on padding included, as ``torch.utils.flop_counter`` counts them; the chip's
  array runs them). Linear: ``out.numel · in_features``. Transposed conv: only the
  ``(input, tap)`` pairs that land inside the output, counted per dimension; a
  zero-stuffing implementation would spend more, a chip skips them. Bias adds, scale
  multiplies, activations, pooling, concatenation and resizing are not counted.
* **Weight bytes** are the weight image's, field by field (``stored_fields``, what
  ``size_report`` counts and ``torchlns.export`` writes), so a shared centroid table counts
  once, at its first layer.
* **Activation bytes** are counted at the MAC layers, since every activation a chip moves
  goes into or out of one: the input at the layer's activation width (the format's bits, plus
  one parameter per block or per tensor when activations are dynamic; a float layer's own
  dtype) and the output at the same width (the chip encodes it in the layer's epilogue).
* **On-chip fit.** Weights are placed in the weight SRAM greedily in the order the layers
  first run; a layer that does not fit streams its weights from DRAM on every call. A layer's
  activations stay on chip when its input and output fit in the activation SRAM together;
  otherwise both cross DRAM. Resident weights are loaded once, when the model is, and cost
  nothing per inference beyond their SRAM reads. The network's own input and output are
  the host's business and not counted.
* **Each byte moves once per call**: resident weights and on-chip activations are read (or
  written) once from SRAM, streamed ones once from DRAM. Real dataflows re-read tiles, so
  SRAM traffic is a lower bound; DRAM traffic is exact for this placement.
* **Latency** is a roofline per layer call: ``max(MACs / (macs_per_cycle · clock), DRAM
  bytes / DRAM bandwidth)``, summed over the layers, which run one after another. Every
  format gets the same MAC array (a fair comparison of formats, not of silicon areas: an
  8-bit array would fit more MACs in the same area).
* **Energy** = MACs · (energy per MAC) + SRAM bits · (SRAM energy per bit) + DRAM bits ·
  (DRAM energy per bit), from ``Energies`` (Horowitz, ISSCC 2014, 45 nm; see there). One MAC
  of each format, in the same unit operations:

  - float32 (and float layers left in a converted model): fp32 multiply + fp32 add;
  - FP8: an int8 multiply (the 4x4 or 3x3 mantissa product is smaller, but normalisation
    and exponent logic are not free; int8 is the stated upper bound) + fp32 add, its
    accumulator;
  - INT8 (``IntFormat``, b bits): a b-bit integer multiply + int32 add;
  - LNS (b bits): the datapath of the layer's ``MACConfig`` (``lns_mac_energy``), in adder
    bits and 2:1-multiplexer bits (``Energies.mux2_bit``, an assumption: a third of a
    full-adder bit of Horowitz's 32-bit add):

    * the product: a b-bit integer add of the two logs;
    * the conversion: the fraction's table read, a P-bit word out of 2^F entries through an
      F-level mux tree (P·F mux bits; P = lut_bits for ``"lut"``, 23 for ``"exact"``, no table
      for ``"mitchell"``, whose fraction is r itself);
    * fixed accumulator: the shift of the product into the W1-bit adder (a barrel shifter,
      W1·ceil(log2 W1) mux bits), the product's saturation when it saturates (W1 mux bits;
      wrap costs nothing: the bits above W1 are dropped), and a W1-bit add (with its own W1-bit
      saturation); with chunks of L, one W-bit add (and saturation) per chunk, 1/L of it per
      MAC. W1 = chunk_bits with chunks, acc_bits without;
    * float32 accumulator: the product's exponent, an 8-bit add (the table gives the
      significand), and an fp32 add.

  Integer operations of other widths are interpolated log-log through Horowitz's 8- and
  32-bit figures (a multiply grows about with the square of the width, an add about
  linearly). TOPS/W is ``2 · MACs / energy`` (two operations per MAC, pJ in, TOPS/W out).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field, fields as dc_fields
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .._text import format_table
from ..core.formats import FP8Format, Format, IntFormat, LNSFormat, MACConfig
from ..nn.clustered import ClusteredConv2d
from ..nn.layers import LNSLinear, _CodedLayer, _LNSConvTransposeNd
from ..transforms.size import _bytes, stored_fields

__all__ = ["CHIPS", "ChipSpec", "CostComparison", "CostReport", "Energies", "HOROWITZ_45NM", "LayerCost",
           "compare_costs", "cost_report", "lns_mac_energy", "mac_energy", "mac_count"]

KiB, MiB = 1 << 10, 1 << 20


def _loglog(points: Sequence[Tuple[float, float]], x: float) -> float:
    """Piecewise-linear interpolation in log-log space; beyond the ends, the end segments' slope."""
    (x0, y0), (x1, y1) = points[0], points[1]
    for a, b in zip(points, points[1:]):
        (x0, y0), (x1, y1) = a, b
        if x <= x1:
            break
    slope = math.log(y1 / y0) / math.log(x1 / x0)
    return y0 * (x / x0) ** slope


@dataclass(frozen=True)
class Energies:
    """Energy per operation in pJ.

    The defaults are Horowitz, "Computing's energy problem (and what we can do about it)",
    ISSCC 2014, Figure 1.1.9 (45 nm, 0.9 V): 8- and 32-bit integer add 0.03 and 0.1 pJ,
    multiply 0.2 and 3.1 pJ; 16- and 32-bit float add 0.4 and 0.9 pJ, multiply 1.1 and
    3.7 pJ; a 64-bit read of an 8 KB, 32 KB or 1 MB SRAM 10, 20 and 100 pJ; a 64-bit DRAM
    access 1.3 to 2.6 nJ (the low end is the default, which understates what staying on chip
    saves). ``mux2_bit`` is not from the paper: a 2:1 multiplexer bit, the unit of the LNS
    datapath's table reads, shifters and saturation (see Note: cost model), is assumed to
    cost a third of a full-adder bit of the 32-bit add (0.1 pJ / 32 / 3).
    """

    int8_add: float = 0.03
    int32_add: float = 0.1
    int8_mult: float = 0.2
    int32_mult: float = 3.1
    fp16_add: float = 0.4
    fp32_add: float = 0.9
    fp16_mult: float = 1.1
    fp32_mult: float = 3.7
    sram_64b: Tuple[Tuple[int, float], ...] = ((8 * KiB, 10.0), (32 * KiB, 20.0), (1 * MiB, 100.0))
    dram_64b: float = 1300.0
    mux2_bit: float = 0.001

    def __post_init__(self):
        for f in dc_fields(self):
            v = getattr(self, f.name)
            if f.name == "sram_64b":
                if len(v) < 2 or any(not (s > 0 and e > 0) for s, e in v) or \
                        any(a[0] >= b[0] for a, b in zip(v, v[1:])):
                    raise ValueError("Energies.sram_64b needs two or more (bank bytes, pJ) points, "
                                     "positive and in increasing size")
            elif not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"Energies.{f.name} must be a positive number of pJ, got {v!r}")

    def int_add(self, bits: int) -> float:
        return _loglog(((8, self.int8_add), (32, self.int32_add)), bits)

    def int_mult(self, bits: int) -> float:
        return _loglog(((8, self.int8_mult), (32, self.int32_mult)), bits)

    def sram_per_64b(self, bank_bytes: int) -> float:
        """A 64-bit read of an SRAM bank of ``bank_bytes``, interpolated in the paper's range only."""
        lo, hi = self.sram_64b[0][0], self.sram_64b[-1][0]
        if not lo <= bank_bytes <= hi:
            raise ValueError(f"SRAM bank of {bank_bytes} bytes is outside the published range "
                             f"{lo}..{hi} bytes; the access energy would be a guess")
        return _loglog(self.sram_64b, bank_bytes)


HOROWITZ_45NM = Energies()


@dataclass(frozen=True)
class ChipSpec:
    """The chip a network is costed on (see Note: cost model in deploy/cost.py).

    ``weight_sram_bytes`` and ``activation_sram_bytes``: the on-chip memories; a 64-bit access
    costs what Horowitz gives a ``sram_bank_bytes`` SRAM (8 KiB .. 1 MiB). ``macs_per_cycle``
    at ``clock_hz``: the MAC array's peak. ``dram_bytes_per_s``: the DRAM bandwidth. The
    presets (``CHIPS``, ``ChipSpec.preset(name)``) state their assumptions in ``note``.
    """

    name: str = "edge"
    weight_sram_bytes: int = 8 * MiB
    activation_sram_bytes: int = 2 * MiB
    sram_bank_bytes: int = 32 * KiB
    macs_per_cycle: int = 4096
    clock_hz: float = 800e6
    dram_bytes_per_s: float = 25.6e9
    energies: Energies = HOROWITZ_45NM
    note: str = ("an edge accelerator: 8 MiB of weight SRAM (the reference design's 3-D detector, compressed "
                 "to 8.2 MB, fits), 2 MiB of activation SRAM in 32 KiB banks, a 64x64 MAC array at 800 MHz "
                 "(6.6 TMAC/s), one LPDDR4X-3200 x64 channel (25.6 GB/s)")

    def __post_init__(self):
        for name in ("weight_sram_bytes", "activation_sram_bytes", "sram_bank_bytes", "macs_per_cycle"):
            v = getattr(self, name)
            least = 0 if name.endswith("sram_bytes") and name != "sram_bank_bytes" else 1  # a chip may have no SRAM
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ValueError(f"ChipSpec.{name} must be an int >= {least}, got {v!r}")
        for name in ("clock_hz", "dram_bytes_per_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"ChipSpec.{name} must be a positive number, got {v!r}")
        if not isinstance(self.energies, Energies):
            raise TypeError(f"ChipSpec.energies must be an Energies, got {type(self.energies).__name__}")
        self.energies.sram_per_64b(self.sram_bank_bytes)  # in the published range

    @property
    def macs_per_s(self) -> float:
        return self.macs_per_cycle * self.clock_hz

    @property
    def sram_pj_per_byte(self) -> float:
        return self.energies.sram_per_64b(self.sram_bank_bytes) / 8

    @property
    def dram_pj_per_byte(self) -> float:
        return self.energies.dram_64b / 8

    def replace(self, **changes) -> "ChipSpec":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "ChipSpec":
        if name not in CHIPS:
            raise ValueError(f"unknown chip preset {name!r}; choose from {', '.join(CHIPS)}")
        return CHIPS[name]

    def describe(self) -> str:
        return (f"{self.name}: {_size(self.weight_sram_bytes)} weight SRAM, {_size(self.activation_sram_bytes)} "
                f"activation SRAM ({_size(self.sram_bank_bytes)} banks, {self.energies.sram_per_64b(self.sram_bank_bytes):.1f} "
                f"pJ per 64-bit access), {self.macs_per_cycle} MACs/cycle at {self.clock_hz / 1e6:g} MHz, DRAM "
                f"{self.dram_bytes_per_s / 1e9:g} GB/s at {self.energies.dram_64b / 1000:g} nJ per 64 bits")


CHIPS: Dict[str, ChipSpec] = {
    "edge": ChipSpec(),
    "micro": ChipSpec(
        name="micro", weight_sram_bytes=64 * KiB, activation_sram_bytes=512 * KiB, sram_bank_bytes=8 * KiB,
        macs_per_cycle=256, clock_hz=500e6, dram_bytes_per_s=3.2e9,
        note="a microcontroller-class accelerator: 64 KiB of weight SRAM and 512 KiB of activation SRAM in 8 KiB "
             "banks, a 16x16 MAC array at 500 MHz (128 GMAC/s), one 16-bit LPDDR4-1600 channel (3.2 GB/s)"),
}


def _size(n: float) -> str:
    for unit, scale in (("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


# ----------------------------------------------------------------------------------------
# per-layer arithmetic
# ----------------------------------------------------------------------------------------
_MAC_TYPES = (nn.Linear, nn.modules.conv._ConvNd, _CodedLayer, ClusteredConv2d)


def _is_mac_layer(m: nn.Module) -> bool:
    return isinstance(m, _MAC_TYPES)


def _transposed(m: nn.Module) -> bool:
    return isinstance(m, _LNSConvTransposeNd) or (isinstance(m, nn.modules.conv._ConvNd) and m.transposed)


def _landing(n_in: int, n_out: int, k: int, stride: int, padding: int, dilation: int) -> int:
    """``(i, t)`` pairs with ``0 <= i < n_in``, ``0 <= t < k`` and ``0 <= i·stride - padding + t·dilation < n_out``."""
    total = 0
    for t in range(k):
        shift = t * dilation - padding  # the tap's output position is i·stride + shift
        lo = max(0, -(shift // stride))  # ceil(-shift / stride)
        hi = min(n_in - 1, -((shift - n_out) // stride) - 1)  # ceil((n_out - shift) / stride) - 1
        total += max(0, hi - lo + 1)
    return total


def mac_count(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """The MACs of one call of MAC layer ``m`` on input ``x`` giving ``out`` (see Note: cost model)."""
    if isinstance(m, (nn.Linear, LNSLinear)):
        return out.numel() * x.shape[-1]
    groups = m.groups
    cin = x.shape[1]
    ks = tuple(m.kernel_size)
    if _transposed(m):
        n = len(ks)
        pairs = math.prod(_landing(x.shape[2 + d], out.shape[2 + d], ks[d], _nt(m.stride, n)[d],
                                   _nt(m.padding, n)[d], _nt(m.dilation, n)[d]) for d in range(n))
        return x.shape[0] * out.shape[1] * (cin // groups) * pairs
    return out.numel() * (cin // groups) * math.prod(ks)


def _nt(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _fmt_of(m: nn.Module) -> Optional[Format]:
    return m.fmt if isinstance(m, _CodedLayer) else None


def mac_energy(m: nn.Module, energies: Energies = HOROWITZ_45NM) -> Tuple[float, str]:
    """(pJ per MAC, how it adds up) for MAC layer ``m`` (see Note: cost model)."""
    e = energies
    fmt = _fmt_of(m)
    if fmt is None:
        dtype = _float_dtype(m)
        if dtype in (torch.float16, torch.bfloat16):
            return e.fp16_mult + e.fp16_add, "fp16 mult + fp16 add"
        return e.fp32_mult + e.fp32_add, "fp32 mult + fp32 add"
    if isinstance(fmt, LNSFormat):
        return lns_mac_energy(fmt, m.mac, e)
    if isinstance(fmt, FP8Format):
        return e.int8_mult + e.fp32_add, "int8 mult + fp32 add"
    if isinstance(fmt, IntFormat):
        return e.int_mult(fmt.bits) + e.int32_add, f"int{fmt.bits} mult + int32 add"
    raise ValueError(f"no MAC energy for format {fmt}")


def lns_mac_energy(fmt: LNSFormat, mac: MACConfig, energies: Energies = HOROWITZ_45NM) -> Tuple[float, str]:
    """(pJ per MAC, how it adds up) of an LNS MAC's datapath (see Note: cost model)."""
    e = energies
    F = fmt.frac_bits
    P = {"lut": mac.lut_bits, "exact": 23, "mitchell": 0}[mac.conversion]
    parts = [(e.int_add(fmt.bits), f"int{fmt.bits} add")]
    mux = P * F  # the table read
    if mac.fixed:
        W, W1 = mac.acc_bits, mac.chunk_width
        saturate = mac.overflow == "saturate"
        mux += W1 * math.ceil(math.log2(W1)) + (2 * W1 if saturate else 0)  # shifter; product and sum saturation
        parts.append((e.int_add(W1), f"int{W1} add"))
        if mac.chunk:
            parts.append(((e.int_add(W) + (W * e.mux2_bit if saturate else 0)) / mac.chunk,
                          f"int{W} add / {mac.chunk}"))
    else:
        parts += [(e.int_add(8), "int8 add"), (e.fp32_add, "fp32 add")]
    parts.insert(1, (mux * e.mux2_bit, f"{mux} mux bits"))
    return sum(p for p, _ in parts), " + ".join(name for _, name in parts)


def _float_dtype(m: nn.Module) -> torch.dtype:
    for t in m.parameters(recurse=False):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _act_bits(m: nn.Module, x: torch.Tensor) -> float:
    """Bits of the activation ``x`` in the layer's input encoding (see Note: cost model)."""
    fmt = _fmt_of(m)
    if fmt is None:
        return x.numel() * x.element_size() * 8
    bits = x.numel() * fmt.bits
    if m.input_param is None:  # dynamic: parameters travel with the codes
        block = m.input_block_size
        if block is None:
            params = 1
        else:
            channels = x.shape[-1] if isinstance(m, LNSLinear) else x.shape[1]
            params = (x.numel() // max(channels, 1)) * math.ceil(channels / block)
        bits += params * fmt.param_bits
    return bits


def _format_name(m: nn.Module) -> str:
    fmt = _fmt_of(m)
    if fmt is None:
        return str(_float_dtype(m)).replace("torch.", "")
    if isinstance(fmt, LNSFormat):
        return f"{fmt} {m.mac!r}"
    return str(fmt)


# ----------------------------------------------------------------------------------------
# reports
# ----------------------------------------------------------------------------------------
@dataclass
class LayerCost:
    """One layer's costs for one forward (all calls of it together)."""

    layer: str
    kind: str
    format: str
    calls: int = 0
    macs: int = 0
    weight_bytes: float = 0.0
    act_in_bytes: float = 0.0
    act_out_bytes: float = 0.0
    weights_on_chip: Optional[bool] = None  # None: the layer stores nothing
    acts_on_chip: Optional[bool] = None  # None: no activations counted here; False if any call spilled
    dram_bytes: float = 0.0
    sram_bytes: float = 0.0
    compute_s: float = 0.0
    memory_s: float = 0.0
    latency_s: float = 0.0
    mac_pj: float = 0.0
    mac_formula: str = ""
    energy_mac_pj: float = 0.0
    energy_sram_pj: float = 0.0
    energy_dram_pj: float = 0.0

    @property
    def energy_pj(self) -> float:
        return self.energy_mac_pj + self.energy_sram_pj + self.energy_dram_pj


@dataclass
class CostReport:
    """Per-layer ``rows`` (``LayerCost``) of one forward on ``chip``; ``print`` it for a table."""

    chip: ChipSpec
    rows: List[LayerCost] = field(default_factory=list)

    def _sum(self, name: str) -> float:
        return sum(getattr(r, name) for r in self.rows)

    macs = property(lambda self: self._sum("macs"))
    weight_bytes = property(lambda self: self._sum("weight_bytes"))
    act_in_bytes = property(lambda self: self._sum("act_in_bytes"))
    act_out_bytes = property(lambda self: self._sum("act_out_bytes"))
    dram_bytes = property(lambda self: self._sum("dram_bytes"))
    sram_bytes = property(lambda self: self._sum("sram_bytes"))
    compute_s = property(lambda self: self._sum("compute_s"))
    memory_s = property(lambda self: self._sum("memory_s"))
    latency_s = property(lambda self: self._sum("latency_s"))
    energy_mac_pj = property(lambda self: self._sum("energy_mac_pj"))
    energy_sram_pj = property(lambda self: self._sum("energy_sram_pj"))
    energy_dram_pj = property(lambda self: self._sum("energy_dram_pj"))
    energy_pj = property(lambda self: self._sum("energy_pj"))

    @property
    def weights_fit(self) -> bool:
        """Every stored byte resident in the weight SRAM."""
        return all(r.weights_on_chip is not False for r in self.rows)

    @property
    def resident_weight_bytes(self) -> float:
        return sum(r.weight_bytes for r in self.rows if r.weights_on_chip)

    @property
    def tops_per_w(self) -> float:
        return 2 * self.macs / self.energy_pj if self.energy_pj else math.inf

    def totals(self) -> dict:
        keys = ("macs", "weight_bytes", "resident_weight_bytes", "act_in_bytes", "act_out_bytes", "dram_bytes",
                "sram_bytes", "compute_s", "memory_s", "latency_s", "energy_mac_pj", "energy_sram_pj",
                "energy_dram_pj", "energy_pj", "tops_per_w", "weights_fit")
        return {k: getattr(self, k) for k in keys}

    def to_dicts(self) -> List[dict]:
        return [dict(asdict(r), energy_pj=r.energy_pj) for r in self.rows]

    def __str__(self) -> str:
        head = ("layer", "format", "MACs", "weights", "w on chip", "act in", "act out", "a on chip", "DRAM",
                "latency us", "bound", "pJ/MAC", "energy nJ")
        body = [(r.layer or "(root)", r.format, f"{r.macs:,}", _bytes(r.weight_bytes), _yes(r.weights_on_chip),
                 _bytes(r.act_in_bytes), _bytes(r.act_out_bytes), _yes(r.acts_on_chip), _bytes(r.dram_bytes),
                 f"{r.latency_s * 1e6:.2f}", _bound(r.compute_s, r.memory_s) if r.calls else "-",
                 f"{r.mac_pj:.2f}" if r.macs else "-", f"{r.energy_pj / 1e3:.1f}") for r in self.rows]
        body.append(("total", "", f"{self.macs:,}", _bytes(self.weight_bytes), _yes(self.weights_fit),
                     _bytes(self.act_in_bytes), _bytes(self.act_out_bytes), "", _bytes(self.dram_bytes),
                     f"{self.latency_s * 1e6:.2f}", _bound(self.compute_s, self.memory_s), "",
                     f"{self.energy_pj / 1e3:.1f}"))
        e = self.energy_pj or 1.0
        tail = (f"energy: MAC {self.energy_mac_pj / 1e6:.3f} uJ ({100 * self.energy_mac_pj / e:.0f}%), SRAM "
                f"{self.energy_sram_pj / 1e6:.3f} uJ ({100 * self.energy_sram_pj / e:.0f}%), DRAM "
                f"{self.energy_dram_pj / 1e6:.3f} uJ ({100 * self.energy_dram_pj / e:.0f}%); "
                f"{self.tops_per_w:.2f} TOPS/W\nchip: {self.chip.describe()}")
        return format_table(head, body, right=(2, 3, 5, 6, 8, 9, 11, 12)) + "\n" + tail


def _yes(v: Optional[bool]) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _bound(compute_s: float, memory_s: float) -> str:
    return "DRAM" if memory_s > compute_s else "compute"


def cost_report(qmodel: nn.Module, example_input, chip: Optional[ChipSpec] = None, *,
                forward_fn=None) -> CostReport:
    """The cost of one forward of ``qmodel`` on ``example_input`` on ``chip`` (see Note: cost model).

    ``qmodel`` is a converted model, a float one or anything in between; each MAC layer is
    costed in its own format. ``example_input`` is what ``torchlns.convert`` takes as one
    calibration item (a tensor, a tuple of positional inputs or a dict of keyword inputs);
    ``forward_fn(model, item)`` runs other models. The model runs once, in eval mode and
    without gradients; its mode is restored afterwards.
    """
    from ..transforms.convert import call_model

    chip = CHIPS["edge"] if chip is None else chip
    if not isinstance(chip, ChipSpec):
        raise TypeError(f"chip must be a ChipSpec, got {type(chip).__name__}")
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"cost_report needs an nn.Module, got {type(qmodel).__name__}")

    rows: Dict[str, LayerCost] = {}
    stored = {fqn: sum(f.total_bits for f in fs) / 8 for fqn, _, fs, _, _ in stored_fields(qmodel)}
    modules = dict(qmodel.named_modules())
    for fqn, m in modules.items():
        mac = _is_mac_layer(m)
        if mac or fqn in stored:
            mac_pj, formula = mac_energy(m, chip.energies) if mac else (0.0, "")
            rows[fqn] = LayerCost(fqn, type(m).__name__, _format_name(m) if mac else "-",
                                  weight_bytes=stored.get(fqn, 0.0), mac_pj=mac_pj, mac_formula=formula)
    calls: Dict[str, List[tuple]] = {}  # (MACs, input bytes, output bytes) per call, keys in first-call order

    def hook(fqn, m):
        def record(module, args, kwargs, out):
            x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if x is None or not isinstance(out, torch.Tensor):
                raise ValueError(f"{fqn}: cannot cost a call without a tensor input and output")
            calls.setdefault(fqn, []).append((mac_count(m, x, out), _act_bits(m, x) / 8, _act_bits(m, out) / 8))
        return record

    handles = [modules[fqn].register_forward_hook(hook(fqn, modules[fqn]), with_kwargs=True)
               for fqn in rows if _is_mac_layer(modules[fqn])]
    modes = {m: m.training for m in qmodel.modules()}
    try:
        qmodel.eval()
        with torch.no_grad():
            call_model(qmodel, example_input, forward_fn)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    ordered = [*calls, *(f for f in rows if f not in calls)]  # called layers first, in first-call order
    free = chip.weight_sram_bytes
    for fqn in ordered:  # greedy placement
        r = rows[fqn]
        if r.weight_bytes:
            r.weights_on_chip = r.weight_bytes <= free
            if r.weights_on_chip:
                free -= r.weight_bytes
    sram_pj, dram_pj = chip.sram_pj_per_byte, chip.dram_pj_per_byte
    for fqn, per_call in calls.items():
        r = rows[fqn]
        for macs, a_in, a_out in per_call:
            r.calls += 1
            r.macs += macs
            r.act_in_bytes += a_in
            r.act_out_bytes += a_out
            acts_here = a_in + a_out <= chip.activation_sram_bytes
            r.acts_on_chip = acts_here if r.acts_on_chip is None else (r.acts_on_chip and acts_here)
            dram = (0.0 if r.weights_on_chip is not False else r.weight_bytes) + (0.0 if acts_here else a_in + a_out)
            sram = (r.weight_bytes if r.weights_on_chip else 0.0) + (a_in + a_out if acts_here else 0.0)
            compute, memory = macs / chip.macs_per_s, dram / chip.dram_bytes_per_s
            r.dram_bytes += dram
            r.sram_bytes += sram
            r.compute_s += compute
            r.memory_s += memory
            r.latency_s += max(compute, memory)
        r.energy_mac_pj = r.macs * r.mac_pj
        r.energy_sram_pj = r.sram_bytes * sram_pj
        r.energy_dram_pj = r.dram_bytes * dram_pj
    return CostReport(chip, [rows[f] for f in ordered])


@dataclass
class CostComparison:
    """``cost_report`` of several models (one network in several formats) on one chip."""

    chip: ChipSpec
    reports: Dict[str, CostReport]

    def to_dicts(self) -> List[dict]:
        return [dict(model=name, **r.totals()) for name, r in self.reports.items()]

    def table(self, markdown: bool = False) -> str:
        head = ("model", "weight bytes", "weights on chip", "DRAM bytes/inference", "MMACs", "pJ/MAC",
                "latency us", "bound", "energy uJ", "MAC / SRAM / DRAM %", "TOPS/W", "energy saving vs first")
        first = next(iter(self.reports.values()), None)
        body = []
        for name, r in self.reports.items():
            e = r.energy_pj or 1.0
            body.append((
                name, f"{r.weight_bytes:,.0f}",
                "all" if r.weights_fit else f"{r.resident_weight_bytes / r.weight_bytes:.0%}" if r.weight_bytes else "-",
                f"{r.dram_bytes:,.0f}", f"{r.macs / 1e6:,.2f}", f"{r.energy_mac_pj / r.macs:.2f}" if r.macs else "-",
                f"{r.latency_s * 1e6:,.1f}", _bound(r.compute_s, r.memory_s), f"{r.energy_pj / 1e6:,.2f}",
                f"{100 * r.energy_mac_pj / e:.0f} / {100 * r.energy_sram_pj / e:.0f} / {100 * r.energy_dram_pj / e:.0f}",
                f"{r.tops_per_w:.2f}", f"{first.energy_pj / r.energy_pj:.1f}x" if r.energy_pj else "-"))
        if markdown:
            return ("| " + " | ".join(head) + " |\n|" + "|".join("---" if i == 0 else "---:" for i in range(len(head)))
                    + "|\n" + "".join("| " + " | ".join(row) + " |\n" for row in body))
        return format_table(head, body, right=tuple(range(1, len(head))))

    def __str__(self) -> str:
        return self.table() + f"\nchip: {self.chip.describe()}"


def compare_costs(models: Mapping[str, nn.Module], example_input, chip: Optional[ChipSpec] = None, *,
                  forward_fn=None) -> CostComparison:
    """``cost_report`` of each of ``models`` (name -> model) on the same input and chip, in one table."""
    if not models:
        raise ValueError("compare_costs needs at least one model")
    reports = {name: cost_report(m, example_input, chip, forward_fn=forward_fn) for name, m in models.items()}
    return CostComparison(next(iter(reports.values())).chip, reports)
