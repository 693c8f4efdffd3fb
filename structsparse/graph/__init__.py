"""Where a channel is followed through a model: the rule of each operation (:mod:`.ops`), torch.fx
tracing into steps with roles (:mod:`.trace`), and the channel units shared across adds and concatenation
(:mod:`.units`)."""
from .ops import FUNCTIONS, MODULE_ROLES, Op, UnsupportedModelError
from .trace import Graph, Node, trace_graph
from .units import ChannelUnits, channel_units, explain

__all__ = ["Node", "Graph", "trace_graph", "ChannelUnits", "channel_units", "explain", "Op", "FUNCTIONS", "MODULE_ROLES",
           "UnsupportedModelError"]
