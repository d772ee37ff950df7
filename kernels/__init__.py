"""Triton kernels with torch reference twins; one module per operation.

The dispatch functions below run Triton on CUDA tensors and the torch twin otherwise
(``backend="triton"`` forces Triton, e.g. on CPU under TRITON_INTERPRET=1). They shadow
their modules as package attributes: reach a module itself with
``importlib.import_module("kernels.weighted_sum")`` or ``from kernels.weighted_sum import ...``.
"""
from kernels.ties_merge import TiesStats, ties_apply, ties_majority, ties_merge, ties_stats, ties_thresholds
from kernels.weighted_sum import weighted_sum, weighted_sum_segments

__all__ = ["TiesStats", "ties_apply", "ties_majority", "ties_merge", "ties_stats", "ties_thresholds", "weighted_sum",
           "weighted_sum_segments"]
