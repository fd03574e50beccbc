"""Model transforms: the conversion pipeline and its parts.

* ``fold.py``: ``fold_batchnorm``;
* ``cluster.py``: ``cluster_kernels`` (k-means on normalised kernels);
* ``calibration.py``: observers, calibrators and ``acc_lsb`` calibration;
* ``convert.py``: ``convert`` (fold, cluster, calibrate, swap) and ``enable_qat``;
* ``size.py``: ``size_report``.
"""

from .cluster import cluster_kernels  # noqa: F401
from .convert import convert, enable_qat  # noqa: F401
from .fold import FoldReport, TorchLNSFoldWarning, fold_batchnorm  # noqa: F401
from .size import SizeReport, size_report  # noqa: F401
