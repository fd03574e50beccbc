"""torchlns: bit-exact emulation of a logarithmic-number-system inference chip."""

from .formats import (  # noqa: F401
    CHIP_MAC,
    FP8_E4M3,
    FP8_E5M2,
    IDEAL_MAC,
    INT8,
    LNS8,
    FP8Format,
    IntFormat,
    LNSFormat,
    MACConfig,
)
from . import ops as _ops  # noqa: F401  (declares the torchlns:: ops first)
from .codec import amax, calibrate, decode, default_offset, default_scale, encode, expand_param  # noqa: F401

__version__ = "0.1.0"
from .mac import lns_conv1d, lns_conv2d, lns_linear  # noqa: F401,E402
from .tensor import CodedTensor, FP8Tensor, IntTensor, LNSTensor  # noqa: F401,E402
from ._backend import TorchLNSBackendWarning, backend_info, has_native  # noqa: F401,E402
from .fold import FoldReport, fold_batchnorm  # noqa: F401,E402
from .cluster import ClusteredConv2d, cluster_kernels  # noqa: F401,E402
from .modules import LNSClusteredConv2d, LNSConv1d, LNSConv2d, LNSLinear  # noqa: F401,E402
from .convert import ClusterConfig, ConvertConfig, convert, enable_qat  # noqa: F401,E402
from .size import SizeReport, size_report  # noqa: F401,E402
from . import metrics  # noqa: F401,E402

has_native()  # a missing extension is reported once, at import, not at the first op
