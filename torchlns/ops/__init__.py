"""The op library and its kernels: every ``torchlns::`` op, declared once, with a kernel per backend.

* ``library.py``: the schemas, the reference and fake kernels, backend registration,
  ``reference_kernels()`` and ``cuda_kernels_on_cpu()`` (see Note: op registration there);
* ``reference.py``: the pure-PyTorch reference kernels, the oracle of every backend;
* ``autograd.py``: the straight-through estimator's backward;
* ``backend.py``: loading the C++ CPU kernels (``torchlns._C``, built from ``csrc/``) and
  ``backend_info()``;
* ``triton_kernels.py``, ``triton_mac.py``: the CUDA kernels (codecs; the LNS MAC), and
  ``mac_tables.py``, the MAC's operand algebra in plain PyTorch;
* ``dense.py``: the FP8/INT MAC as float32 products, CUDA's kernel for it.

Kernels depend on ``torchlns.core`` and on this package only, never on the public API.
"""

from . import autograd  # noqa: F401  (registers the straight-through estimator's backward)
from .library import KERNEL_OPS, REFERENCE, SCHEMAS, TRITON_ERROR, cuda_kernels_on_cpu, reference_kernels  # noqa: F401
from .backend import (ISAS, MAC_PATHS, TorchLNSBackendWarning, available_isas, backend_info,  # noqa: F401
                      clear_weight_cache, cpu_isa, force_isa, force_mac_path, has_native, isa, native, set_isa,
                      weight_cache_info, direct_kernel_counts, reset_direct_kernel_counts)
