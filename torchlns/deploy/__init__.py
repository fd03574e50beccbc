"""What goes onto the chip: the weight image and the cost model of a converted network.

* ``image.py``: ``export`` / ``load_image`` (the versioned weight image; see Note: weight
  image format);
* ``cost.py``: ``ChipSpec`` and ``cost_report`` (MACs, bytes, on-chip fit, DRAM traffic,
  latency and energy per layer, in several formats);
* ``explore.py``: ``explore``, a sweep of chip designs (format x datapath) with its Pareto
  fronts of fidelity against energy and bytes;
* ``telemetry.py``: ``telemetry``, what the datapath does inside a network (saturation,
  flushes, truncated and overflowing products, accumulator headroom), counted exactly.
"""

from .cost import (CHIPS, ChipSpec, CostComparison, CostReport, Energies, HOROWITZ_45NM, LayerCost,  # noqa: F401
                   compare_costs, cost_report)
from .image import ImageError, export, load_image, read_manifest  # noqa: F401
from .mixed import MixedPrecisionResult, default_candidates, mixed_precision  # noqa: F401
from .telemetry import LayerTelemetry, Telemetry, TelemetryReport, telemetry  # noqa: F401
from .explore import CHIP_PRESET, Design, DesignSpace, ExploreResult, explore  # noqa: F401
