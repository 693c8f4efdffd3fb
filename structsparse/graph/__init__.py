"""Where a channel is followed through a model: torch.fx tracing into steps with roles (:mod:`.trace`)
and the channel units shared across adds and concatenation."""
from .trace import FUNCTIONS, ChannelUnits, Graph, Node, Op, UnsupportedModelError, channel_units, trace_graph

__all__ = ["Node", "Graph", "trace_graph", "ChannelUnits", "channel_units", "Op", "FUNCTIONS",
           "UnsupportedModelError"]
