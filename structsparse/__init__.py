"""structsparse: Structured Sparsity Learning (Wen et al., NIPS 2016) for PyTorch.

Train with group-Lasso terms so whole filters, channels, filter-shape columns and layers
become exactly zero, cut them out to get a smaller dense model with the same outputs,
and measure the speedup.
"""
from .budget import BudgetError, zero_to_budget_
from .compaction import LoweredConv2d, compact
from .graph import explain
from .report import SparsityReport, sparsity_report
from .sparsity import KINDS, GroupLasso, Masks, group_norms
from .speed import measure_speedup
from .storage import export_onnx, load_compact, save_compact

__version__ = "0.1.0"

__all__ = [
    "KINDS", "group_norms", "GroupLasso", "Masks", "SparsityReport", "sparsity_report",
    "compact", "LoweredConv2d", "load_compact", "save_compact", "measure_speedup",
    "export_onnx", "explain", "zero_to_budget_", "BudgetError",
]
