"""Model transforms: the conversion pipeline and its parts.

* ``fold.py``: ``fold_batchnorm``;
* ``cluster.py``: ``cluster_kernels`` (k-means on normalised kernels);
* ``calibration.py``: observers, calibrators and ``acc_lsb`` calibration;
* ``graph.py``: the fx tracer that keeps layers whole, and what a subclass's forward computes;
* ``convert.py``: ``convert`` (fold, cluster, calibrate, swap), its ``ConversionReport``
  (coverage in MACs), ``Inputs`` (multi-input calibration items) and ``enable_qat``;
* ``sensitivity.py``: ``sensitivity`` (per-layer SQNR, and what keeping layers wider buys);
* ``size.py``: ``size_report``;
* ``recover.py``: ``recover`` and its methods ``bias_correction``, ``adaptive_rounding`` and
  ``distill`` (accuracy recovery from unlabelled data), and ``error_split`` (what weights,
  activations and the MAC each cost).
"""

from .cluster import cluster_kernels  # noqa: F401
from .convert import ConversionReport, Inputs, convert, enable_qat  # noqa: F401
from .fold import FoldReport, TorchLNSFoldWarning, fold_batchnorm  # noqa: F401
from .size import SizeReport, size_report  # noqa: F401
from .sensitivity import LayerSensitivity, SensitivityReport, Suggestion, sensitivity  # noqa: F401
from .recover import (ErrorSplit, RecoveryReport, adaptive_rounding, bias_correction, distill, error_split,  # noqa: F401
                      recover)
