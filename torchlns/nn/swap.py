"""The swap registry: which chip layer ``torchlns.convert`` puts in place of which float layer.

# Note: swap registry
``register_swap(FloatType)`` registers a swap for modules of exactly that type. It decorates
either a chip layer class, whose ``from_float(module, config, *, input_param, acc_lsb, qat)``
is then the swap, or a function with that signature plus ``memo``: a dict that lives for one
``convert`` call, for swaps that tie layers together (clustered layers that share a centroid
table share it after conversion too). ``convert`` calibrates every module that has a swap
(its static input parameter, and ``acc_lsb`` for the fixed accumulator) and calls the swap.
Registering a type twice is an error unless ``replace=True``, so that two libraries cannot
silently fight over ``nn.Linear``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch.nn as nn

__all__ = ["register_swap", "swap_for", "swap_for_type", "swappable_types"]

Swap = Callable[..., nn.Module]
_SWAPS: Dict[type, Swap] = {}


def register_swap(*float_types: type, replace: bool = False) -> Callable:
    """Register the decorated chip layer class (or swap function) for modules of ``float_types``."""
    for t in float_types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"register_swap takes nn.Module subclasses, got {t!r}")

    def decorator(target):
        if isinstance(target, type):
            def swap(module, config, *, input_param=None, acc_lsb=None, qat=False, memo=None):
                return target.from_float(module, config, input_param=input_param, acc_lsb=acc_lsb, qat=qat)

            swap.__qualname__ = f"{target.__qualname__}.from_float"
        else:
            swap = target
        for t in float_types:
            if t in _SWAPS and not replace:
                raise ValueError(f"{t.__name__} already swaps to {_SWAPS[t].__qualname__}; pass replace=True to "
                                 "register another swap for it")
            _SWAPS[t] = swap
        return target

    return decorator


def swap_for(module: nn.Module) -> Optional[Swap]:
    """The swap registered for ``type(module)`` (exact type), or None. ``torchlns.convert`` also
    converts subclasses that compute what their base class computes (see Note: subclasses of the
    float layers in transforms/graph.py)."""
    return _SWAPS.get(type(module))


def swap_for_type(t: type) -> Optional[Swap]:
    """The swap registered for exactly the type ``t``, or None."""
    return _SWAPS.get(t)


def swappable_types() -> tuple:
    """Every float module type that has a swap."""
    return tuple(_SWAPS)
