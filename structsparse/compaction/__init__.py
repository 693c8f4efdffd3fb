"""Making a layer smaller: graph surgery (:mod:`.surgery`) and the shape-wise conv (:mod:`.kernels`)."""
from .kernels import LoweredConv2d
from .surgery import LOWERED_BELOW, CollapseWarning, CompactNet, IndexSelect, compact, lower_conv

__all__ = ["compact", "lower_conv", "CompactNet", "IndexSelect", "LoweredConv2d", "LOWERED_BELOW", "CollapseWarning"]
