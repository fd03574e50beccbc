"""The chip model's pure parts: formats, exact tables, bit fields, parameter layout, conv geometry.

Nothing here imports from the rest of torchlns, and nothing here calls an op: every layer
above (the op library, the kernels, the public API) builds on these definitions.
"""

from .formats import (  # noqa: F401
    CHIP_MAC,
    FP8_E4M3,
    FP8_E5M2,
    IDEAL_MAC,
    INT8,
    LNS8,
    FP8Format,
    Format,
    IntFormat,
    LNSFormat,
    MACConfig,
)
