"""Where a speed is measured: a compact model against its original, per layer and whole (:mod:`.measure`),
and the paper's layer benchmarks (:mod:`.layer_bench`). Both time with :mod:`structsparse.timing`."""
from .measure import SpeedReport, measure_speedup

__all__ = ["measure_speedup", "SpeedReport"]
