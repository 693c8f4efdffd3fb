"""structsparse: Structured Sparsity Learning (Wen et al., NIPS 2016) for PyTorch.

Train with group-Lasso terms so whole filters, channels, filter-shape columns and layers
become exactly zero, cut them out to get a smaller dense model with the same outputs,
and measure the speedup.

The names below load on first use (PEP 562), so that ``import structsparse.cli`` does not import torch:
the command line can then answer a Ctrl-C during its start-up with one line.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_WHERE = {  # public name -> the submodule that defines it
    "BudgetError": "budget", "zero_to_budget_": "budget",
    "LoweredConv2d": "compaction", "compact": "compaction",
    "explain": "graph",
    "SparsityReport": "report", "sparsity_report": "report",
    "KINDS": "sparsity", "GroupLasso": "sparsity", "Masks": "sparsity", "group_norms": "sparsity",
    "measure_speedup": "speed", "LatencyTable": "speed",
    "export_onnx": "storage", "load_compact": "storage", "save_compact": "storage",
}

__all__ = [
    "KINDS", "group_norms", "GroupLasso", "Masks", "SparsityReport", "sparsity_report",
    "compact", "LoweredConv2d", "load_compact", "save_compact", "measure_speedup",
    "export_onnx", "explain", "zero_to_budget_", "BudgetError", "LatencyTable",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value  # once loaded, an ordinary attribute
        return value
    try:  # a submodule not imported yet: structsparse.compaction, ...
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
