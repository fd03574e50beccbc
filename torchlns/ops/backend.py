"""Which backend runs each device: the native C++ extension or the pure-PyTorch reference.

The extension ``torchlns._C`` is loaded once, lazily, on the first call to
:func:`has_native` / :func:`native` / :func:`backend_info`. If it cannot be imported, a
single :class:`TorchLNSBackendWarning` explains why and how to rebuild it, and the
reference implementation (bit-identical, only slower) takes over.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import warnings
from types import ModuleType
from typing import Iterator, List

import torch

from . import library

__all__ = ["TorchLNSBackendWarning", "backend_info", "has_native", "native", "ISAS", "isa", "cpu_isa", "set_isa",
           "force_isa", "available_isas", "MAC_PATHS", "force_mac_path", "weight_cache_info", "clear_weight_cache",
           "direct_kernel_counts", "reset_direct_kernel_counts"]

# Instruction-set levels of the native kernels, lowest first (see Note: instruction sets in
# csrc/common.h). TORCHLNS_ISA=<level> forces one for a whole process; set_isa/force_isa
# change it at run time, which is how the tests run every path on one machine.
ISAS = ("baseline", "avx2", "avx512")

REBUILD_COMMAND = 'pip install --no-build-isolation -e .'


class TorchLNSBackendWarning(UserWarning):
    """The native extension is missing; torchlns falls back to its pure-PyTorch reference."""


_lock = threading.Lock()
_loaded = False
_native: ModuleType | None = None
_native_error: str | None = None


def _import_native() -> ModuleType:
    """Import the compiled extension. Kept separate so tests can simulate its absence."""
    return importlib.import_module("torchlns._C")


def _load() -> None:
    global _loaded, _native, _native_error
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        try:
            module = _import_native()
        except ImportError as e:
            _native = None
            _native_error = f"{type(e).__name__}: {e}"
            warnings.warn(
                "torchlns: the C++ extension torchlns._C is missing or failed to load "
                f"({_native_error}). Rebuild it from the repository root with "
                f"`{REBUILD_COMMAND}` (after installing torch). Until then the "
                "pure-PyTorch reference implementation takes over: results are the same, "
                "only slower.",
                TorchLNSBackendWarning,
                stacklevel=3,
            )
        else:
            refused = module.isa_env_error() if hasattr(module, "isa_env_error") else ""
            if refused:  # a wrong answer is never silent: an unusable TORCHLNS_ISA stops here
                raise RuntimeError(f"torchlns: {refused}")
            _native, _native_error = module, None
        _loaded = True


def _reset() -> None:
    """Forget the load attempt so the next call retries (for tests)."""
    global _loaded, _native, _native_error
    with _lock:
        _loaded = False
        _native = None
        _native_error = None


def has_native() -> bool:
    """Whether the native C++ extension is loaded."""
    _load()
    return _native is not None


def native() -> ModuleType | None:
    """The loaded extension module, or ``None`` when the reference is in use."""
    _load()
    return _native


def isa() -> str:
    """The instruction-set level the native kernels use now ("baseline", "avx2" or "avx512"; "none" without them)."""
    return _native.isa() if has_native() else "none"


def cpu_isa() -> str:
    """The best instruction-set level this CPU supports ("none" without the native kernels)."""
    return _native.cpu_isa() if has_native() else "none"


def available_isas() -> List[str]:
    """Every level this CPU can run, lowest first: the paths a test should check."""
    if not has_native():
        return []
    return list(ISAS[: ISAS.index(_native.cpu_isa()) + 1])


def set_isa(level: str) -> None:
    """Make the native kernels use ``level`` (one of ``ISAS``, at most ``cpu_isa()``)."""
    if level not in ISAS:
        raise ValueError(f"unknown instruction-set level {level!r}; expected one of {ISAS}")
    if not has_native():
        raise RuntimeError("the native kernels are not loaded, so there is no instruction-set level to set")
    if ISAS.index(level) > ISAS.index(_native.cpu_isa()):
        raise ValueError(f"cannot run {level} kernels: this CPU supports at most {_native.cpu_isa()}")
    _native.set_isa(level)


@contextlib.contextmanager
def force_isa(level: str) -> Iterator[None]:
    """Run the native kernels at ``level`` inside the block; the previous level comes back on exit."""
    before = isa()
    set_isa(level)
    try:
        yield
    finally:
        set_isa(before)


# The LNS MAC kernels of the CPU backend (see MacPath in csrc/common.h): chosen per call
# ("auto") or forced, so that tests run every kernel on the same inputs.
MAC_PATHS = ("auto", "direct", "classes", "scalar")


@contextlib.contextmanager
def force_mac_path(path: str) -> Iterator[None]:
    """Run the CPU's LNS MAC through one kernel inside the block (cases it cannot run fall back)."""
    if path not in MAC_PATHS:
        raise ValueError(f"unknown MAC kernel {path!r}; expected one of {MAC_PATHS}")
    if not has_native():
        raise RuntimeError("the native kernels are not loaded")
    before = _native.mac_path()
    _native.set_mac_path(path)
    try:
        yield
    finally:
        _native.set_mac_path(before)


def direct_kernel_counts() -> dict:
    """How often the CPU's direct LNS kernels ran with tables (``table``), with product pairs
    (``pairs``; see Note: product pairs in csrc/lns_direct.h), or declined a call (``declined``:
    another kernel ran), since the last :func:`reset_direct_kernel_counts`."""
    return dict(_native.direct_counts()) if has_native() else {"table": 0, "pairs": 0, "declined": 0}


def reset_direct_kernel_counts() -> None:
    if has_native():
        _native.reset_direct_counts()


def weight_cache_info() -> dict:
    """Counters of the prepared-weight cache (see Note: prepared weights in csrc/weight_cache.h)."""
    return dict(_native.weight_cache_stats()) if has_native() else {}


def clear_weight_cache() -> None:
    """Drop every prepared weight and reset the counters."""
    if has_native():
        _native.clear_weight_cache()


def backend_info() -> dict:
    """Which implementation each device uses, and why.

    Keys: ``cpu`` (``"native"`` or ``"reference"``), ``cuda`` (``"triton"`` or
    ``"reference"``), ``triton_error`` (why Triton is not serving CUDA, or ``None``),
    ``cuda_available``, ``native_error`` (the import error text, or ``None``),
    ``torch_version``, ``build_info`` (from the extension, or ``None``), ``isa`` (the
    instruction-set level in use) and ``cpu_isa`` (the best the CPU has).
    """
    _load()
    return {
        "isa": isa(),
        "cpu_isa": cpu_isa(),
        "cpu": "native" if _native is not None else "reference",
        "cuda": "triton" if library.TRITON_ERROR is None else "reference",
        "triton_error": library.TRITON_ERROR,
        "cuda_available": torch.cuda.is_available(),
        "native_error": _native_error,
        "torch_version": torch.__version__,
        "build_info": dict(_native.build_info()) if _native is not None else None,
    }
