"""Where a speed is measured: a compact model against its original, per layer and whole (:mod:`.measure`),
the per-layer latency table a latency budget counts with (:mod:`.table`), and the paper's layer benchmarks
(:mod:`.layer_bench`). All time with :mod:`structsparse.timing`."""
from .measure import SpeedReport, measure_speedup
from .table import LatencyTable

__all__ = ["measure_speedup", "SpeedReport", "LatencyTable"]
