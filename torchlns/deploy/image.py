"""``torchlns.export`` and ``torchlns.load_image``: the weight image, what the chip's memory holds.

# Note: weight image format (version 1)
One file, little-endian throughout:

* a 16-byte header: the magic ``b"TLNSWI"`` (6 bytes), the format version (u16, 1), the
  manifest's length in bytes (u32) and the CRC-32 of manifest and payload (u32);
* the manifest: compact UTF-8 JSON, the layer descriptors (below);
* the payload: one bitstream holding every stored field of the model (``stored_fields`` in
  transforms/size.py, the same list ``size_report`` counts), field after field in the
  manifest's order with no padding between them. Value ``i`` of a field of width ``w`` that
  starts at bit ``s`` occupies bits ``s + i·w .. s + i·w + w - 1``, least significant first;
  bit ``k`` of the stream is bit ``k mod 8`` of byte ``k // 8``. The last byte is padded
  with zeros. So the payload is ``ceil(size_report bits / 8)`` bytes, and the file is that
  plus the header and the manifest.

Fields are written by their ``encoding``:

* ``codes``: the format's code bit patterns at ``bits`` (INT codes in two's complement);
* ``offsets``: LNS offsets, 8 bits each, as unsigned deltas from an integer ``base`` in the
  field's descriptor (the layer descriptor holds it, as it holds the shapes). An offset
  tensor that spans more than 255 steps does not fit the chip's 8-bit field and is refused;
* ``float32``: IEEE binary32 bit patterns (scales, bias, float centroids);
* ``int``: two's complement at ``bits`` (``acc_lsb`` at 8);
* ``index``: cluster indices, unsigned at ``ceil(log2 C)`` bits;
* ``raw``: a tensor's own bytes (the parameters and buffers of modules that stay float).

The manifest is ``{"format", "version", "torchlns", "model", "payload_bits", "folded_bn",
"layers"}``. Each layer is ``{"name", "kind", "config", "fields"}``: ``kind`` is a chip
layer class (``LNSConv2d``, ...), ``ClusteredConv2d`` or ``"module"`` (a float module's own
tensors); ``config`` holds the format, MAC and geometry; each field is ``{"name",
"encoding", "bits", "shape", "start"}`` plus ``base`` (offsets), ``fmt`` and ``block``
(codes) or ``dtype`` (raw). A field stored once for several layers (a shared centroid
table, a tied parameter) has ``"same_as"`` (the module that holds it) instead of a start.

Loading trusts nothing in the file: the header, the CRC, the JSON's every type, that the
fields tile the payload exactly, every code, offset, index and geometry against the format
and against the skeleton's own layer, all before a module is built (``ImageError``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .._version import __version__
from ..core.formats import Format, LNSFormat, MACConfig
from ..core.geometry import InputPad, ntuple
from ..nn.clustered import ClusteredConv2d, LNSClusteredConv2d, index_bits
from ..nn.layers import (LNSConv1d, LNSConv2d, LNSConv3d, LNSConvTranspose1d, LNSConvTranspose2d, LNSConvTranspose3d,
                         LNSLinear, _CodedLayer, _LNSConvNd, _LNSConvTransposeNd,
                         atomic_load_pre_hook)
from ..tensor import Coded
from ..transforms.fold import fold_batchnorm
from ..transforms.graph import is_bn_like
from ..transforms.size import StoredField, size_report, stored_fields

__all__ = ["ImageError", "export", "load_image", "read_manifest", "HEADER_BYTES", "IMAGE_VERSION", "MAGIC"]

MAGIC = b"TLNSWI"
IMAGE_VERSION = 1
HEADER_BYTES = 16
_HEADER = struct.Struct("<6sHII")  # magic, version, manifest bytes, CRC-32 of manifest + payload
_OFFSET_SPAN = 255  # an 8-bit offset field holds base + 0..255
_CHUNK = 1 << 20  # values per step when (un)packing unaligned fields, to bound the bit arrays' memory

_CHIP_KINDS = {cls.__name__: cls for cls in (LNSLinear, LNSConv1d, LNSConv2d, LNSConv3d, LNSConvTranspose1d,
                                            LNSConvTranspose2d, LNSConvTranspose3d, LNSClusteredConv2d)}
_RAW_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.bool)}
_ENCODINGS = ("codes", "offsets", "float32", "int", "index", "raw")


class ImageError(ValueError):
    """A weight image that cannot be written or read: the message names the field and the problem."""


# ----------------------------------------------------------------------------------------
# bitstream
# ----------------------------------------------------------------------------------------
class _BitWriter:
    """Appends unsigned values of any width to one LSB-first bitstream (see Note: weight image format)."""

    def __init__(self):
        self.chunks: List[bytes] = []
        self.carry = np.zeros(0, dtype=np.uint8)  # bits after the last whole byte
        self.bits = 0

    def write(self, values: np.ndarray, width: int) -> None:
        values = np.ascontiguousarray(values.reshape(-1))
        self.bits += values.size * width
        if self.carry.size == 0 and width == 8:  # byte-aligned bytes: the common case, copied as they are
            self.chunks.append(values.astype(np.uint8).tobytes())
            return
        for i in range(0, values.size, _CHUNK):
            v = values[i:i + _CHUNK].astype(np.uint64)
            bits = ((v[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8).reshape(-1)
            bits = np.concatenate([self.carry, bits])
            whole = bits.size - bits.size % 8
            self.chunks.append(np.packbits(bits[:whole], bitorder="little").tobytes())
            self.carry = bits[whole:]

    def getvalue(self) -> bytes:
        tail = np.packbits(self.carry, bitorder="little").tobytes() if self.carry.size else b""
        return b"".join(self.chunks) + tail


def _read_bits(payload: np.ndarray, start: int, count: int, width: int) -> np.ndarray:
    """``count`` unsigned values of ``width`` bits from bit ``start`` (as uint64, or uint8 for bytes)."""
    if start % 8 == 0 and width == 8:
        return payload[start // 8:start // 8 + count]
    out = np.empty(count, dtype=np.uint64)
    weights = np.uint64(1) << np.arange(width, dtype=np.uint64)
    for i in range(0, count, _CHUNK):
        n = min(_CHUNK, count - i)
        s = start + i * width
        bits = np.unpackbits(payload[s // 8:(s + n * width + 7) // 8], bitorder="little")
        bits = bits[s % 8:s % 8 + n * width].reshape(n, width).astype(np.uint64)
        out[i:i + n] = (bits * weights).sum(axis=1)
    return out


# ----------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------
def _field_values(f: StoredField, where: str) -> Tuple[np.ndarray, int, dict]:
    """(unsigned values, width, extra descriptor keys) of one field."""
    t = f.values.detach().cpu()
    if f.encoding == "codes":
        mask = (1 << f.bits) - 1
        return (t.to(torch.int64) & mask).numpy(), f.bits, {}
    if f.encoding == "offsets":
        off = t.to(torch.int64)
        base = int(off.min()) if off.numel() else 0
        span = int(off.max()) - base if off.numel() else 0
        if span > _OFFSET_SPAN:
            raise ImageError(f"{where}: the offsets span {base}..{base + span}, {span} steps; the chip's 8-bit offset "
                             f"field holds a base plus 0..{_OFFSET_SPAN} (re-encode with a coarser granularity)")
        return (off - base).numpy(), 8, {"base": base}
    if f.encoding == "float32":
        return _bytes_of(t.to(torch.float32)), 8, {}
    if f.encoding == "int":
        lo, hi = -(1 << (f.bits - 1)), (1 << (f.bits - 1)) - 1
        v = t.to(torch.int64)
        if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
            raise ImageError(f"{where}: {int(v.min())}..{int(v.max())} does not fit the chip's {f.bits}-bit field "
                             f"({lo}..{hi})")
        return (v & ((1 << f.bits) - 1)).numpy(), f.bits, {}
    if f.encoding == "index":
        return t.to(torch.int64).numpy(), f.bits, {}
    if f.encoding == "raw":
        return _bytes_of(t), 8, {"dtype": str(t.dtype).replace("torch.", "")}
    raise AssertionError(f"unknown encoding {f.encoding!r}")


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A tensor's little-endian bytes (its in-memory bytes: every platform torch supports is little-endian)."""
    if sys.byteorder != "little":  # pragma: no cover
        raise ImageError("weight images are little-endian; this machine is big-endian")
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _config(m: nn.Module) -> dict:
    """A chip layer's settings that are not in its fields: format, MAC, geometry."""
    if isinstance(m, ClusteredConv2d):
        return _with_pad(dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=list(m.kernel_size),
                              num_clusters=m.num_clusters, stride=_jsonable(m.stride), padding=_jsonable(m.padding),
                              dilation=_jsonable(m.dilation), groups=m.groups), m)
    state = m.get_extra_state()
    cfg = dict(fmt=list(state["fmt"]), mac=list(state["mac"]), train_forward=state["train_forward"],
               input_block_size=state["input_block_size"], weight_granularity=list(state["weight_granularity"]))
    if isinstance(m, _LNSConvNd):
        cfg.update(stride=_jsonable(m.stride), padding=_jsonable(m.padding), dilation=_jsonable(m.dilation),
                   groups=m.groups, padding_mode=m.padding_mode)
    if isinstance(m, _LNSConvTransposeNd):
        cfg["output_padding"] = _jsonable(m.output_padding)
    return _with_pad(cfg, m)


def _with_pad(cfg: dict, m: nn.Module) -> dict:
    """The input pad of a "same"-padding layer, only where there is one (older images have none)."""
    if getattr(m, "input_pad", None) is not None:
        cfg["input_pad"] = m.input_pad.to_json()
    return cfg


def _input_pad(cfg: dict, where: str) -> Optional[InputPad]:
    try:
        return None if cfg.get("input_pad") is None else InputPad.from_json(cfg["input_pad"])
    except (TypeError, ValueError) as e:
        raise ImageError(f"{where}: not a valid input_pad ({e})") from None


def _jsonable(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def export(qmodel: nn.Module, path: Union[str, os.PathLike]) -> dict:
    """Write ``qmodel``'s weight image to ``path`` (see Note: weight image format); returns the manifest.

    Every field ``size_report`` counts is written at its own bit width, so the file is
    ``HEADER_BYTES + len(manifest) + ceil(size_report bits / 8)`` bytes. Raises
    ``ImageError`` for what the chip cannot hold (an offset tensor spanning more than 255
    steps, an ``acc_lsb`` beyond 8 bits) or a module it has no layer kind for.
    """
    if not isinstance(qmodel, nn.Module):
        raise TypeError(f"export needs an nn.Module, got {type(qmodel).__name__}")
    stale = [fqn for fqn, m in qmodel.named_modules() if isinstance(m, _CodedLayer) and m.training
             and m._master() is not None]
    if stale:
        raise ImageError(f"{stale[0]} is training with a float master weight, so its codes may be stale; call "
                         "model.eval() first (it re-encodes the masters into the codes the image stores)")
    writer = _BitWriter()
    layers = []
    for fqn, m, fields, _, _ in stored_fields(qmodel):
        if isinstance(m, _CodedLayer):
            kind = type(m).__name__
            if _CHIP_KINDS.get(kind) is not type(m):
                raise ImageError(f"{fqn or '(root)'}: a {kind} has no layer kind in the weight image format "
                                 f"(known: {', '.join(_CHIP_KINDS)})")
        elif isinstance(m, ClusteredConv2d):
            kind = "ClusteredConv2d"
        else:
            kind = "module"
        entry = dict(name=fqn, kind=kind, config={} if kind == "module" else _config(m), fields=[])
        if kind == "module":
            entry["config"]["class"] = type(m).__name__
        for f in fields:
            desc = dict(name=f.name, encoding=f.encoding, bits=f.bits)
            if f.values is None:
                desc["same_as"] = f.same_as
            else:
                where = f"{fqn or '(root)'}: {f.name}"
                values, width, extra = _field_values(f, where)
                desc.update(shape=list(f.values.shape), start=writer.bits, **extra)
                if f.encoding == "codes":
                    desc["fmt"] = list(f.fmt.to_tuple())
                    if f.name == "weight codes" and m.weight.block is not None:
                        desc["block"] = list(m.weight.block)
                writer.write(values, width)
                if writer.bits != desc["start"] + f.total_bits:  # the layout is size_report's, to the bit
                    raise AssertionError(f"{where}: wrote {writer.bits - desc['start']} bits, counted {f.total_bits}")
            entry["fields"].append(desc)
        layers.append(entry)
    folded = getattr(qmodel, "fold_report", None)
    manifest = {
        "format": "torchlns weight image", "version": IMAGE_VERSION, "torchlns": __version__,
        "model": type(qmodel).__name__, "payload_bits": writer.bits,
        "folded_bn": [e.bn for e in folded.folded] if folded is not None else [],
        "layers": layers,
    }
    counted = sum(r["bits"] for r in size_report(qmodel).rows)
    if counted != writer.bits:
        raise AssertionError(f"the image holds {writer.bits} bits but size_report counts {counted}")
    text = json.dumps(manifest, separators=(",", ":")).encode()
    payload = writer.getvalue()
    header = _HEADER.pack(MAGIC, IMAGE_VERSION, len(text), zlib.crc32(payload, zlib.crc32(text)))
    with open(path, "wb") as fh:
        fh.write(header + text + payload)
    return manifest


# ----------------------------------------------------------------------------------------
# reading and checking
# ----------------------------------------------------------------------------------------
def _read(path) -> Tuple[dict, np.ndarray]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read weight image {path}: {e.strerror or e}") from None
    if len(data) < HEADER_BYTES:
        raise ImageError(f"{path} is {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header: not a weight "
                         "image, or truncated")
    magic, version, n_manifest, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageError(f"{path} is not a torchlns weight image (magic {magic!r}, expected {MAGIC!r})")
    if version != IMAGE_VERSION:
        raise ImageError(f"{path} is a version-{version} weight image; this torchlns reads version {IMAGE_VERSION}")
    if HEADER_BYTES + n_manifest > len(data):
        raise ImageError(f"{path} is truncated: the header announces a {n_manifest}-byte manifest, and the file has "
                         f"{len(data) - HEADER_BYTES} bytes after the header")
    body = memoryview(data)[HEADER_BYTES:]
    if zlib.crc32(body) != crc:
        raise ImageError(f"{path} is damaged or truncated: its CRC-32 does not match its contents")
    try:
        manifest = json.loads(bytes(body[:n_manifest]).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ImageError(f"{path}: the manifest is not valid JSON ({e})") from None
    payload = np.frombuffer(data, dtype=np.uint8, offset=HEADER_BYTES + n_manifest)
    _check_manifest(manifest, len(payload), path)
    return manifest, payload


def read_manifest(path: Union[str, os.PathLike]) -> dict:
    """The manifest of a weight image, after the same checks ``load_image`` makes of the file."""
    return _read(path)[0]


def _need(d, key: str, types, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ImageError(f"{where}: the manifest has no {key!r}")
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ImageError(f"{where}: {key!r} must be {_names(types)}, got {v!r}")
    if not isinstance(v, types):
        raise ImageError(f"{where}: {key!r} must be {_names(types)}, got {type(v).__name__}")
    return v


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an int", str: "a string", list: "a list", dict: "an object", bool: "a bool",
                        type(None): "null"}.get(t, t.__name__) for t in types)


def _check_manifest(manifest, payload_bytes: int, path) -> None:
    """The manifest's structure, and that its fields tile the payload exactly."""
    where = str(path)
    if _need(manifest, "format", str, where) != "torchlns weight image":
        raise ImageError(f"{where}: the manifest describes {manifest['format']!r}, not a torchlns weight image")
    bits = _need(manifest, "payload_bits", int, where)
    if bits < 0 or (bits + 7) // 8 != payload_bytes:
        raise ImageError(f"{where} is truncated or padded: the manifest announces {bits} payload bits "
                         f"({(bits + 7) // 8} bytes) and the file holds {payload_bytes} bytes after the manifest")
    folded = _need(manifest, "folded_bn", list, where)
    if not all(isinstance(n, str) for n in folded):
        raise ImageError(f"{where}: 'folded_bn' must be a list of module names")
    position = 0
    names = set()
    for i, layer in enumerate(_need(manifest, "layers", list, where)):
        here = f"{where}: layer {i}"
        name = _need(layer, "name", str, here)
        here = f"{where}: layer {name or '(root)'}"
        if name in names:
            raise ImageError(f"{here} appears twice")
        names.add(name)
        kind = _need(layer, "kind", str, here)
        if kind not in _CHIP_KINDS and kind not in ("ClusteredConv2d", "module"):
            raise ImageError(f"{here}: unknown layer kind {kind!r} (known: {', '.join([*_CHIP_KINDS, 'ClusteredConv2d', 'module'])})")
        _need(layer, "config", dict, here)
        for f in _need(layer, "fields", list, here):
            fname = _need(f, "name", str, here)
            at = f"{here}: field {fname!r}"
            if _need(f, "encoding", str, at) not in _ENCODINGS:
                raise ImageError(f"{at}: unknown encoding {f['encoding']!r}")
            width = _need(f, "bits", int, at)
            if not 1 <= width <= 64:
                raise ImageError(f"{at}: {width} bits per value is out of range 1..64")
            if "same_as" in f:
                if not isinstance(f["same_as"], str) or "start" in f:
                    raise ImageError(f"{at}: a shared field names its holder ('same_as') and has no start")
                continue
            shape = _need(f, "shape", list, at)
            if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape) or len(shape) > 8:
                raise ImageError(f"{at}: shape must be a list of at most 8 non-negative ints, got {shape!r}")
            start = _need(f, "start", int, at)
            if start != position:
                raise ImageError(f"{at} starts at bit {start}; the fields must tile the payload in order, and this "
                                 f"one should start at {position}")
            total = math.prod(shape) * width
            if position + total > bits:
                raise ImageError(f"{at} ({math.prod(shape)} values) runs past the end of the payload ({bits} bits)")
            position += total
    if position != bits:
        raise ImageError(f"{where}: the fields cover {position} of the payload's {bits} bits")


# ----------------------------------------------------------------------------------------
# load
# ----------------------------------------------------------------------------------------
class _Fields:
    """The decoded fields of one layer entry, by name, checked against their descriptors."""

    def __init__(self, entry: dict, payload: np.ndarray, where: str, shared: Dict[str, "_Fields"]):
        self.where, self.entry = where, entry
        self.desc = {f["name"]: f for f in entry["fields"]}
        self.payload, self.shared = payload, shared
        self.cache: dict = {}

    def has(self, name: str) -> bool:
        return name in self.desc

    def holder(self, name: str) -> Optional[str]:
        """The layer that holds a shared field, or None when this layer holds it."""
        return self.desc[name].get("same_as")

    def get(self, name: str, encoding: str, bits: Optional[int] = None, dtype=None) -> torch.Tensor:
        if name not in self.desc:
            raise ImageError(f"{self.where}: the image has no field {name!r}")
        f = self.desc[name]
        at = f"{self.where}: field {name!r}"
        if "same_as" in f:
            holder = self.shared.get(f["same_as"])
            if holder is None or not holder.has(name) or holder.holder(name) is not None:
                raise ImageError(f"{at} is shared with {f['same_as']!r}, which comes earlier in the image and "
                                 "holds it")
            return holder.get(name, encoding, bits, dtype)
        if f["encoding"] != encoding:
            raise ImageError(f"{at}: encoding {f['encoding']!r}, expected {encoding!r}")
        if bits is not None and f["bits"] != bits:
            raise ImageError(f"{at}: {f['bits']} bits per value, expected {bits}")
        if name not in self.cache:
            self.cache[name] = self._decode(f, at, dtype)
        return self.cache[name]

    def _decode(self, f: dict, at: str, dtype) -> torch.Tensor:
        shape, n = tuple(f["shape"]), math.prod(f["shape"])
        enc, width = f["encoding"], f["bits"]
        if enc in ("float32", "raw"):
            if enc == "raw":
                name = f.get("dtype")
                if name not in _RAW_DTYPES:
                    raise ImageError(f"{at}: unknown dtype {name!r}")
                dtype = _RAW_DTYPES[name]
            else:
                dtype = torch.float32
            size = torch.empty((), dtype=dtype).element_size()
            if width != 8 * size:
                raise ImageError(f"{at}: a {dtype} field is {8 * size} bits per value, not {width}")
            raw = _read_bits(self.payload, f["start"], n * size, 8).astype(np.uint8)
            if n == 0:
                return torch.empty(shape, dtype=dtype)
            return torch.frombuffer(bytearray(raw.tobytes()), dtype=dtype).reshape(shape).clone()
        v = torch.from_numpy(_read_bits(self.payload, f["start"], n, width).astype(np.int64)).reshape(shape)
        if enc == "offsets":
            base = f.get("base")
            if isinstance(base, bool) or not isinstance(base, int) or abs(base) > 1 << 20:
                raise ImageError(f"{at}: the offset base must be an int, got {base!r}")
            if width != 8:
                raise ImageError(f"{at}: offsets are 8 bits, not {width}")
            return (v + base).to(torch.int32)
        if enc == "int":
            return torch.where(v >= 1 << (width - 1), v - (1 << width), v)
        if enc == "index":
            return v
        if enc == "codes":
            try:
                fmt = Format.from_tuple(tuple(f.get("fmt") or ()))
            except (TypeError, ValueError) as e:
                raise ImageError(f"{at}: not a format ({e})") from None
            if fmt.bits != width:
                raise ImageError(f"{at}: {width}-bit codes for {fmt}, whose codes are {fmt.bits} bits")
            code_bits = torch.empty((), dtype=fmt.code_dtype).element_size() * 8
            signed = fmt.code_dtype.is_signed and (fmt.integer or width == code_bits)
            if signed:  # the bit pattern back into the signed code dtype
                v = torch.where(v >= 1 << (width - 1), v - (1 << width), v)
            return v.to(fmt.code_dtype)
        raise ImageError(f"{at}: unknown encoding {enc!r}")

    def fmt(self, name: str) -> Format:
        f = self.desc[name]
        if "same_as" in f:
            return self.shared[f["same_as"]].fmt(name)
        return Format.from_tuple(tuple(f["fmt"]))

    def block(self, name: str):
        b = self.desc[name].get("block")
        if b is None:
            return None
        if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                             for x in b)):
            raise ImageError(f"{self.where}: field {name!r}: block must be [axis, size], got {b!r}")
        return tuple(b)

    def names(self) -> List[str]:
        return list(self.desc)


def _coded(fields: _Fields, codes: str, param: str, block=None) -> Coded:
    """The coded operand held in fields ``codes`` and ``param``, validated as a loaded file needs."""
    fmt = fields.fmt(codes)
    values = fields.get(codes, "codes", fmt.bits)
    p = fields.get(param, "offsets" if isinstance(fmt, LNSFormat) else "float32", fmt.param_bits)
    try:
        return Coded(values, p, fmt, block).validate(f"{fields.where}: {codes}")
    except ValueError as e:
        raise ImageError(str(e)) from None


def _settings(cfg: dict, where: str):
    try:
        fmt = Format.from_tuple(tuple(cfg["fmt"]))
        mac = MACConfig(*cfg["mac"])
        granularity, block_size = tuple(cfg["weight_granularity"])
        train_forward = cfg.get("train_forward", "exact")  # checked, with the rest of the settings, once
        block = cfg["input_block_size"]  # the layer is built (_state_problems, Note: validated loading)
    except (KeyError, TypeError, ValueError) as e:
        raise ImageError(f"{where}: not a valid layer config ({e})") from None
    return fmt, mac, granularity, block_size, train_forward, block


def _geometry(cfg: dict, n: int, where: str, transposed: bool = False) -> dict:
    try:
        g = dict(stride=ntuple(cfg["stride"], n, "stride", minimum=1),
                 dilation=ntuple(cfg["dilation"], n, "dilation", minimum=1),
                 padding=cfg["padding"] if isinstance(cfg["padding"], str) else ntuple(cfg["padding"], n, "padding",
                                                                                      minimum=0),
                 groups=cfg["groups"])
        if isinstance(g["groups"], bool) or not isinstance(g["groups"], int) or g["groups"] < 1:
            raise ValueError(f"groups must be a positive int, got {g['groups']!r}")
        if isinstance(g["padding"], str) and g["padding"] not in ("same", "valid"):
            raise ValueError(f"padding must be 'same', 'valid' or ints, got {g['padding']!r}")
        if transposed:
            g["output_padding"] = ntuple(cfg["output_padding"], n, "output_padding", minimum=0)
        elif cfg.get("padding_mode", "zeros") != "zeros":
            g["padding_mode"] = cfg["padding_mode"]
    except (KeyError, TypeError, ValueError) as e:
        raise ImageError(f"{where}: not a valid conv geometry ({e})") from None
    return g


def _build_chip_layer(kind: str, fields: _Fields, where: str, shared_layers: Dict[str, nn.Module]) -> nn.Module:
    cls = _CHIP_KINDS[kind]
    cfg = fields.entry["config"]
    fmt, mac, granularity, block_size, train_forward, input_block = _settings(cfg, where)
    kw = dict(input_block_size=input_block)
    if fields.has(f"input {fmt.param_name}"):
        kw["input_param"] = fields.get(f"input {fmt.param_name}", "offsets" if isinstance(fmt, LNSFormat)
                                       else "float32", fmt.param_bits).reshape(())
        kw["input_block_size"] = None
    if fields.has("acc_lsb"):
        kw["acc_lsb"] = int(fields.get("acc_lsb", "int", 8).reshape(()))
    bias = fields.get("bias", "float32", 32) if fields.has("bias") else None
    if issubclass(cls, _LNSConvNd):
        kw.update(_geometry(cfg, cls._n, where, transposed=issubclass(cls, _LNSConvTransposeNd)))
    try:
        if cls is LNSClusteredConv2d:
            indices = fields.get("indices", "index")
            centroids_holder = fields.holder("centroids codes")
            centroids = _coded(fields, "centroids codes", "centroids offsets").tensor()
            if centroids.dim() != 3 or not centroids.shape[0]:
                raise ValueError(f"centroids must be (C, kh, kw), got {tuple(centroids.shape)}")
            want = index_bits(centroids.shape[0])
            if fields.desc["indices"]["bits"] != want:
                raise ValueError(f"{centroids.shape[0]} centroids take {want}-bit indices, not "
                                 f"{fields.desc['indices']['bits']}")
            if indices.numel() and int(indices.max()) >= centroids.shape[0]:
                raise ValueError(f"index {int(indices.max())} is out of range for {centroids.shape[0]} centroids")
            scales = _coded(fields, "kernel scales", "kernel scale offset").tensor()
            m = cls(centroids, indices, scales, bias, mac, **kw)
            if centroids_holder is not None:  # one table on the chip: one tensor here, as convert made it
                if not isinstance(shared_layers.get(centroids_holder), LNSClusteredConv2d):
                    raise ValueError(f"its centroids are shared with {centroids_holder!r}, not an earlier "
                                     "LNSClusteredConv2d")
                m.share_centroids(shared_layers[centroids_holder])
        else:
            if granularity not in ("tensor", "channel", "block"):
                raise ValueError(f"unknown weight granularity {granularity!r}")
            weight = _coded(fields, "weight codes", f"weight {fmt.param_name}s", fields.block("weight codes")).tensor()
            m = cls(weight, bias, mac, weight_granularity=granularity, weight_block_size=block_size, **kw)
        if m.fmt != fmt:
            raise ValueError(f"the weight is {m.fmt} and the config says {fmt}")
        m.set_train_forward(train_forward)
        m.set_input_pad(_input_pad(cfg, where))
        problems = m._state_problems(m.state_dict(), "")  # every coded field and the settings (validated loading)
        if problems:
            raise ValueError("; ".join(problems))
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        raise ImageError(f"{where}: {' '.join(str(e).split())}") from None
    return m.eval()


def _build_clustered(fields: _Fields, where: str, shared_layers: Dict[str, nn.Module]) -> ClusteredConv2d:
    cfg = fields.entry["config"]
    try:
        geometry = _geometry(cfg, 2, where)
        geometry.pop("padding_mode", None)
        centroids = fields.get("centroids", "float32", 32)
        C = cfg["num_clusters"]
        m = ClusteredConv2d(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), C,
                            bias=fields.has("bias"), **geometry)
        m.input_pad = _input_pad(cfg, where)
        indices = fields.get("indices", "index", m.index_bits)
        if indices.numel() and int(indices.max()) >= C:
            raise ValueError(f"index {int(indices.max())} is out of range for {C} centroids")
        holder = fields.holder("centroids")
        if holder is not None:
            if not isinstance(shared_layers.get(holder), ClusteredConv2d):
                raise ValueError(f"its centroids are shared with {holder!r}, not an earlier ClusteredConv2d")
            m.centroids = shared_layers[holder].centroids
        _copy_into(m.centroids, centroids, "centroids")
        _copy_into(m.scales, fields.get("kernel scales", "float32", 32), "kernel scales")
        _copy_into(m.indices, indices, "indices")
        if m.bias is not None:
            _copy_into(m.bias, fields.get("bias", "float32", 32), "bias")
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ImageError(f"{where}: {' '.join(str(e).split())}") from None
    return m.eval()


@torch.no_grad()
def _copy_into(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: the image holds shape {tuple(src.shape)}, the model {tuple(dst.shape)}")
    if dst.dtype != src.dtype and not (src.dtype == torch.int64 and not dst.dtype.is_floating_point):
        raise ValueError(f"{what}: the image holds {src.dtype}, the model {dst.dtype}")
    dst.copy_(src)


def _signature(m: nn.Module) -> Optional[tuple]:
    """What a layer's slot in the architecture fixes: the kind of MAC layer and its shapes."""
    if isinstance(m, (nn.Linear, LNSLinear)):
        return ("linear", m.in_features, m.out_features)
    if isinstance(m, (nn.modules.conv._ConvNd, _LNSConvNd, ClusteredConv2d)):
        transposed = isinstance(m, (_LNSConvTransposeNd, nn.modules.conv._ConvTransposeNd))
        k = tuple(m.kernel_size)
        n = len(k)
        return ("conv_transpose" if transposed else "conv", n, m.in_channels, m.out_channels, k,
                ntuple(m.stride, n, "stride"), m.padding if isinstance(m.padding, str) else ntuple(m.padding, n, "padding"),
                ntuple(m.dilation, n, "dilation"), m.groups)
    return None


def _describe(sig: Optional[tuple]) -> str:
    if sig is None:
        return "no MAC layer"
    if sig[0] == "linear":
        return f"Linear {sig[1]}->{sig[2]}"
    return (f"{sig[0]}{sig[1]}d {sig[2]}->{sig[3]}, kernel {sig[4]}, stride {sig[5]}, padding {sig[6]}, dilation "
            f"{sig[7]}, groups {sig[8]}")


def load_image(path: Union[str, os.PathLike], model_skeleton: nn.Module) -> nn.Module:
    """The converted model a weight image holds, built on ``model_skeleton``'s architecture.

    ``model_skeleton`` is the float model's architecture (its weights do not matter: batch
    norms are folded and layers swapped as the image says) or a converted model of the
    same architecture. Returns a new model in eval mode that computes exactly what the
    exported one did; the skeleton is untouched. Every field is checked first (see Note:
    weight image format); a damaged, truncated or crafted image raises ``ImageError``, as
    does a skeleton whose layers do not match the image.
    """
    if not isinstance(model_skeleton, nn.Module):
        raise TypeError(f"load_image needs an nn.Module skeleton, got {type(model_skeleton).__name__}")
    manifest, payload = _read(path)
    model = copy.deepcopy(model_skeleton).eval().float()  # float layers compute in float32, as convert makes them
    folded = manifest["folded_bn"]
    modules = dict(model.named_modules())
    if any(is_bn_like(modules.get(n)) for n in folded if n in modules):
        model = fold_batchnorm(model, inplace=True)
        done = {e.bn for e in model.fold_report.folded}
        missing = [n for n in folded if n not in done and is_bn_like(dict(model.named_modules()).get(n))]
        if missing:
            raise ImageError(f"{path}: the image folded batch norms {missing[:5]} into the layers before them, and "
                             "the skeleton's do not fold: the skeleton is another architecture")
    shared_fields: Dict[str, _Fields] = {}
    shared_layers: Dict[str, nn.Module] = {}
    loaded = set()
    for entry in manifest["layers"]:
        fqn, kind = entry["name"], entry["kind"]
        where = f"{path}: layer {fqn or '(root)'}"
        try:
            old = model.get_submodule(fqn)
        except AttributeError:
            raise ImageError(f"{where}: the skeleton has no module {fqn!r}") from None
        fields = _Fields(entry, payload, where, shared_fields)
        if kind == "module":
            _load_module_state(old, fields, where, model)
            new = old
        else:
            new = _build_clustered(fields, where, shared_layers) if kind == "ClusteredConv2d" \
                else _build_chip_layer(kind, fields, where, shared_layers)
            if _signature(old) != _signature(new):
                raise ImageError(f"{where}: the image holds a {kind} ({_describe(_signature(new))}); the skeleton's "
                                 f"module there is a {type(old).__name__} ({_describe(_signature(old))})")
            if fqn:
                model.set_submodule(fqn, new)
            else:
                model = new
        shared_fields[fqn] = fields
        shared_layers[fqn] = new
        loaded.add(fqn)
    extra = [fqn for fqn, _, fields, _, _ in stored_fields(model)
             if fqn not in loaded and any(f.values is not None and f.values.numel() for f in fields)]
    if extra:
        raise ImageError(f"{path}: the skeleton has state the image does not hold, in {extra[:5]}: the skeleton is "
                         "another architecture")
    model.register_load_state_dict_pre_hook(atomic_load_pre_hook)  # Note: validated loading
    return model.eval()


def _load_module_state(m: nn.Module, fields: _Fields, where: str, root: nn.Module) -> None:
    """A float module's own parameters and buffers, copied into the skeleton's tensors (ties kept)."""
    if isinstance(m, (_CodedLayer, ClusteredConv2d)):
        raise ImageError(f"{where}: the image holds a float module here; the skeleton's is a {type(m).__name__}")
    own = {**dict(m.named_parameters(recurse=False)), **dict(m.named_buffers(recurse=False))}
    for name in fields.names():
        if own.get(name) is None:
            raise ImageError(f"{where}: the skeleton's {type(m).__name__} has no tensor {name!r}")
        desc = fields.desc[name]
        if "same_as" in desc:  # a tied tensor: the holder's bits (the skeleton usually ties them itself)
            try:
                value = _tensor_at(root, desc["same_as"]).detach()
            except AttributeError:
                raise ImageError(f"{where}: field {name!r} is shared with {desc['same_as']!r}, which the skeleton "
                                 "does not have") from None
        else:
            value = fields.get(name, "raw")
        try:
            _copy_into(own[name], value, name)
        except ValueError as e:
            raise ImageError(f"{where}: {e}") from None


def _tensor_at(root: nn.Module, target: str) -> torch.Tensor:
    try:
        return root.get_parameter(target)
    except AttributeError:
        return root.get_buffer(target)
