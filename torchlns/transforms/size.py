"""``torchlns.size_report``: every stored field at its own bit width (chip-model.md section 6).

# Note: size accounting
* Converted LNS layers: weight codes at ``bits``; weight offsets, the static input offset
  and ``acc_lsb`` at 8 bits each; bias at 32 bits.
* FP8/INT layers: codes at 8 (or ``bits``); scales (weight and static input) at 32 bits.
* Clustered layers: indices at ``ceil(log2 C)`` bits; centroids in the weight format (LNS
  codes plus one 8-bit offset, or float32); per-kernel scales at 8 bits in LNS (float32 in
  a float ``ClusteredConv2d``). Centroids shared across layers count once, at the first;
  so do identical LNS centroid tables (same codes and offset), which the chip would store once.
* Any other module: its own parameters and buffers at their dtype's width, except BN's
  ``num_batches_tracked`` (training bookkeeping that inference never reads).

The float32 size of a layer is what it replaces: every weight element and bias at 32 bits
(for other modules, every floating parameter and buffer at 32 bits). The ratio is float32
bytes over stored bytes; ``reference=`` takes the float32 size of the whole original model
instead (BN parameters included).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .._text import format_table
from ..core.formats import Format, LNSFormat
from ..nn.clustered import ClusteredConv2d, LNSClusteredConv2d
from ..nn.layers import _CodedLayer

__all__ = ["SizeReport", "StoredField", "size_report", "stored_fields"]

# Stored widths of the fields no format owns (a format's parameter width is Format.param_bits).
_OFFSET_BITS, _BIAS_BITS, _FLOAT_BITS = 8, 32, 32


@dataclass
class SizeReport:
    """Per-layer rows (``rows``: a list of dicts) and totals; ``print`` it for a table."""

    rows: List[dict] = field(default_factory=list)
    float32_bytes: float = 0.0

    @property
    def total_bytes(self) -> float:
        return sum(r["bytes"] for r in self.rows)

    @property
    def ratio(self) -> float:
        return self.float32_bytes / self.total_bytes if self.total_bytes else math.inf

    def to_dicts(self) -> List[dict]:
        return copy.deepcopy(self.rows)

    @property
    def layers_float32_bytes(self) -> float:
        """float32 size of what the rows replace (``float32_bytes`` may be a whole reference model's)."""
        return sum(r["float32_bytes"] for r in self.rows)

    def __str__(self) -> str:
        head = ("layer", "kind", "format", "bytes", "float32 bytes", "ratio")
        body = [(r["layer"] or "(root)", r["kind"], r["format"], _bytes(r["bytes"]), _bytes(r["float32_bytes"]),
                 f"{r['ratio']:.2f}x") for r in self.rows]
        layers = self.layers_float32_bytes
        body.append(("total", "", "", _bytes(self.total_bytes), _bytes(layers),
                     f"{layers / self.total_bytes:.2f}x" if self.total_bytes else "inf"))
        if self.float32_bytes != layers:  # reference=: the original model, folded batch norms included
            body.append(("float32 model", "all of it, batch norms too", "", "", _bytes(self.float32_bytes),
                         f"{self.ratio:.2f}x"))
        return format_table(head, body, right=(3, 4, 5))


def _bytes(v: float) -> str:
    """Whole bytes as integers; bit-packed fields can leave a fraction of a byte."""
    return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"


@dataclass(frozen=True)
class StoredField:
    """One field the chip stores: ``values`` at ``bits`` bits per element (see Note: size accounting).

    ``encoding`` says how a weight image writes it (Note: weight image format in deploy/image.py):
    ``"codes"`` (a format's code bit patterns), ``"offsets"`` (LNS offsets, 8 bits), ``"float32"``,
    ``"int"`` (two's complement), ``"index"`` (cluster indices) or ``"raw"`` (a tensor's own bytes).
    A field stored once for several layers appears again with ``values=None`` and ``same_as``
    naming the module that holds it; it counts no bits there.
    """

    name: str
    values: Optional[torch.Tensor]
    encoding: str
    bits: int
    fmt: Optional[Format] = None
    same_as: Optional[str] = None

    @property
    def total_bits(self) -> int:
        return 0 if self.values is None else self.values.numel() * self.bits


def _coded_fields(name: str, t, fields: List[StoredField]) -> None:
    fmt = t.fmt
    fields.append(StoredField(f"{name} codes", t.codes, "codes", fmt.bits, fmt))
    fields.append(StoredField(f"{name} {fmt.param_name}s", t.param, _param_encoding(fmt), fmt.param_bits, fmt))


def _param_encoding(fmt: Format) -> str:
    return "offsets" if isinstance(fmt, LNSFormat) else "float32"


def _layer(m: nn.Module, fqn: str, seen: Dict[int, str]):
    """(stored fields, float32 bits replaced, format name) of one module's own state.

    ``seen`` maps the id of every tensor already stored to the module holding it.
    """
    fields: List[StoredField] = []
    if isinstance(m, _CodedLayer):
        if isinstance(m, LNSClusteredConv2d):
            fields.append(StoredField("indices", m.indices, "index", m.index_bits))
            if id(m.centroids) in seen:  # buffers are per module; shared ones are equal objects
                holder = seen[id(m.centroids)]
                fields.append(StoredField("centroids codes", None, "codes", m.fmt.bits, m.fmt, same_as=holder))
                fields.append(StoredField(f"centroids {m.fmt.param_name}s", None, _param_encoding(m.fmt),
                                          m.fmt.param_bits, m.fmt, same_as=holder))
            else:
                seen[id(m.centroids)] = fqn
                _coded_fields("centroids", m.centroids, fields)
            scales = m.kernel_scales
            fields.append(StoredField("kernel scales", scales.codes, "codes", scales.fmt.bits, scales.fmt))
            fields.append(StoredField("kernel scale offset", scales.param, "offsets", _OFFSET_BITS, scales.fmt))
            dense = m.indices.numel() * math.prod(m.kernel_size)
        else:
            _coded_fields("weight", m.weight, fields)
            dense = m.weight.numel()
        if m.input_param is not None:
            fields.append(StoredField(f"input {m.fmt.param_name}", m.input_param, _param_encoding(m.fmt),
                                      m.fmt.param_bits, m.fmt))
        if m.acc_lsb is not None:
            fields.append(StoredField("acc_lsb", torch.tensor(m.acc_lsb, dtype=torch.int32), "int", _OFFSET_BITS))
        if m.bias is not None:
            fields.append(StoredField("bias", m.bias.detach(), "float32", _BIAS_BITS))
        return fields, (dense + (m.bias.numel() if m.bias is not None else 0)) * _FLOAT_BITS, str(m.fmt)
    if isinstance(m, ClusteredConv2d):
        fields.append(StoredField("indices", m.indices, "index", m.index_bits))
        if id(m.centroids) in seen:
            fields.append(StoredField("centroids", None, "float32", _FLOAT_BITS, same_as=seen[id(m.centroids)]))
        else:
            seen[id(m.centroids)] = fqn
            fields.append(StoredField("centroids", m.centroids.detach(), "float32", _FLOAT_BITS))
        fields.append(StoredField("kernel scales", m.scales.detach(), "float32", _FLOAT_BITS))
        if m.bias is not None:
            fields.append(StoredField("bias", m.bias.detach(), "float32", _BIAS_BITS))
        dense = m.indices.numel() * math.prod(m.kernel_size) + (m.bias.numel() if m.bias is not None else 0)
        return fields, dense * _FLOAT_BITS, f"clustered C={m.num_clusters}"
    float_bits = 0
    for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
        if t is None or name == "num_batches_tracked":
            continue
        if id(t) in seen:
            fields.append(StoredField(name, None, "raw", t.element_size() * 8, same_as=seen[id(t)]))
            continue
        seen[id(t)] = f"{fqn}.{name}" if fqn else name
        fields.append(StoredField(name, t.detach(), "raw", t.element_size() * 8))
        float_bits += t.numel() * _FLOAT_BITS if t.is_floating_point() else t.numel() * t.element_size() * 8
    dtypes = sorted({str(t.dtype).replace("torch.", "") for _, t in m.named_parameters(recurse=False)})
    return fields, float_bits, "/".join(dtypes) or "-"


def _same_coded(a, b) -> bool:
    return a is b or (a.fmt == b.fmt and a.shape == b.shape and a.device == b.device
                      and torch.equal(a.codes, b.codes) and torch.equal(a.param, b.param))


def stored_fields(model: nn.Module) -> List[tuple]:
    """``(fqn, module, fields, float32 bits replaced, format name)`` for every module that stores
    something, in ``named_modules`` order: what the chip's memory holds, field by field.

    ``size_report`` counts these fields and ``torchlns.export`` writes them, so a weight
    image's payload is the size report's total to the bit.
    """
    out = []
    seen: Dict[int, str] = {}
    tables: list = []  # (LNS centroid table, the layer that holds it) counted so far
    for fqn, m in model.named_modules():
        if isinstance(m, LNSClusteredConv2d):  # a table shared (or equal) across layers counts once
            first = next((name for t, name in tables if _same_coded(m.centroids, t)), None)
            if first is not None:
                seen.setdefault(id(m.centroids), first)
            else:
                tables.append((m.centroids, fqn))
        fields, float_bits, fmt = _layer(m, fqn, seen)
        if fields:
            out.append((fqn, m, fields, float_bits, fmt))
    return out


def size_report(model: nn.Module, reference: Optional[nn.Module] = None) -> SizeReport:
    """Stored size of ``model``, per layer and in total, against float32 (see Note: size accounting).

    Modules without stored state are left out. ``reference`` (the original float model)
    makes the float32 side of the total its full size, BN parameters included.
    """
    report = SizeReport()
    for fqn, m, fields, float_bits, fmt in stored_fields(model):
        bits = sum(f.total_bits for f in fields)
        if not bits:
            continue
        report.rows.append(dict(layer=fqn, kind=type(m).__name__, format=fmt,
                                fields={f.name: f.total_bits for f in fields if f.values is not None}, bits=bits,
                                bytes=bits / 8, float32_bytes=float_bits / 8,
                                ratio=float_bits / bits if bits else math.inf))
    if reference is not None:
        ref = size_report(reference)
        report.float32_bytes = sum(r["float32_bytes"] for r in ref.rows)
    else:
        report.float32_bytes = sum(r["float32_bytes"] for r in report.rows)
    return report
