"""Which backend runs each device: the native C++ extension or the pure-PyTorch reference.

The extension ``torchlns._C`` is loaded once, lazily, on the first call to
:func:`has_native` / :func:`native` / :func:`backend_info`. If it cannot be imported, a
single :class:`TorchLNSBackendWarning` explains why and how to rebuild it, and the
reference implementation (bit-identical, only slower) takes over.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from types import ModuleType

import torch

from . import library

__all__ = ["TorchLNSBackendWarning", "backend_info", "has_native", "native"]

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
            _native = _import_native()
            _native_error = None
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


def backend_info() -> dict:
    """Which implementation each device uses, and why.

    Keys: ``cpu`` (``"native"`` or ``"reference"``), ``cuda`` (``"triton"`` or
    ``"reference"``), ``triton_error`` (why Triton is not serving CUDA, or ``None``),
    ``cuda_available``, ``native_error`` (the import error text, or ``None``),
    ``torch_version``, ``build_info`` (from the extension, or ``None``).
    """
    _load()
    return {
        "cpu": "native" if _native is not None else "reference",
        "cuda": "triton" if library.TRITON_ERROR is None else "reference",
        "triton_error": library.TRITON_ERROR,
        "cuda_available": torch.cuda.is_available(),
        "native_error": _native_error,
        "torch_version": torch.__version__,
        "build_info": dict(_native.build_info()) if _native is not None else None,
    }
