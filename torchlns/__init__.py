"""torchlns: bit-exact emulation of a logarithmic-number-system inference chip.

The package is layered; each layer imports only from the ones above it in this list (the
README's Architecture section walks through them):

* ``core``: formats, exact tables, bit fields, parameter layout, conv geometry;
* ``ops``: the ``torchlns::`` op library and its kernels (reference, C++ via ``torchlns._C``,
  Triton);
* ``codec``, ``tensor``, ``functional``: encode/decode, the coded operand and its tensor,
  the chip's layers as functions;
* ``config``, ``nn``: conversion settings, the chip layers and the swap registry;
* ``transforms``: fold, cluster, calibrate, convert, size;
* ``deploy``: the weight image (``export``/``load_image``) and the cost model;
* ``metrics``; ``apps`` (the command line and the demo).
"""

from .core.formats import (  # noqa: F401
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
from . import ops  # noqa: F401  (declares the torchlns:: ops first)
from .codec import amax, calibrate, decode, default_offset, default_scale, encode, expand_param  # noqa: F401
from .tensor import Coded, CodedTensor, FP8Tensor, IntTensor, LNSTensor  # noqa: F401
from .functional import (  # noqa: F401
    lns_conv1d,
    lns_conv2d,
    lns_conv3d,
    lns_conv_transpose1d,
    lns_conv_transpose2d,
    lns_conv_transpose3d,
    lns_linear,
)
from .ops import TorchLNSBackendWarning, backend_info, has_native  # noqa: F401
from .config import ClusterConfig, ConvertConfig  # noqa: F401
from .nn import (  # noqa: F401
    ClusteredConv2d,
    LNSClusteredConv2d,
    LNSConv1d,
    LNSConv2d,
    LNSConv3d,
    LNSConvTranspose1d,
    LNSConvTranspose2d,
    LNSConvTranspose3d,
    LNSLinear,
    register_swap,
)
from .transforms import (  # noqa: F401
    ConversionReport,
    ErrorSplit,
    FoldReport,
    Inputs,
    SensitivityReport,
    SizeReport,
    RecoveryReport,
    TorchLNSFoldWarning,
    adaptive_rounding,
    bias_correction,
    cluster_kernels,
    convert,
    distill,
    enable_qat,
    error_split,
    fold_batchnorm,
    recover,
    sensitivity,
    size_report,
)
from .deploy import (CHIPS, ChipSpec, CostReport, ImageError, MixedPrecisionResult, compare_costs,  # noqa: F401
                     cost_report, explore, export, load_image, mixed_precision, read_manifest, telemetry)
from .deploy import Design, DesignSpace  # noqa: F401
from . import metrics  # noqa: F401

from ._version import __version__  # noqa: F401

has_native()  # a missing extension is reported once, at import, not at the first op
