"""Channel units: the dependency graph of the channels.

:func:`channel_units` follows every channel (dim 1) through channel-wise steps, residual adds,
concatenation and flatten, so that all the places where one channel lives share one *unit*. A unit
can be removed only as a whole: from every layer that writes it (filters) and every layer that reads
it (input columns).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ops import ADD, BCAST, CAT, CHPAD, CONST, CONV, FLATTEN, INPUT, LINEAR, WEIGHTED, passes_channels
from .trace import Graph, Node

__all__ = ["ChannelUnits", "channel_units"]


@dataclass
class ChannelUnits:
    """Which channels (dim-1 entries) of all tensors are one and the same channel.

    ``of[node]`` holds the unit of each dim-1 entry of the node's output (for a flattened
    tensor, each feature has the unit of the channel it came from). ``pinned[u]`` is True
    for units that cannot be removed (they reach the model output, feed a step that mixes
    channels); ``reasons[u]`` says why, naming the step (the first reason
    found). ``readers`` lists the Conv2d/Linear nodes: each reads the units ``of_input[node]`` (its
    columns) and writes the units ``of[node]`` (its rows).
    """

    of: dict[str, torch.Tensor]
    count: int
    pinned: torch.Tensor
    readers: list[str]
    of_input: dict[str, torch.Tensor]  # reader → the units of its input
    reasons: dict[int, str] = field(default_factory=dict)  # pinned unit → why

    def reader_count(self) -> torch.Tensor:
        """How many layers read each unit (a unit read by two or more layers is *coupled*)."""
        counts = torch.zeros(self.count, dtype=torch.long)
        for r in self.readers:
            counts[self.of_input[r].unique()] += 1
        return counts


def _pin_all(node: Node) -> str | None:
    """Why a weighted node's channels cannot be removed (a conv or Linear whose channels are not its input's
    dim 1), or None. (Grouped convs lose the same number of channels in every group: see compaction.)"""
    if node.role == CONV and len(node.out_shape) != 4:
        return f"{node.name}: a conv on a {len(node.out_shape)}-D tensor"
    if node.role == LINEAR and (len(node.out_shape) != 2 or len(node.in_shapes[0]) != 2):
        return f"{node.name}: a Linear on a {len(node.in_shapes[0])}-D tensor (channels are not its features)"
    return None


class _Sets:
    """Union-find over channel ids: ids joined by an add are one channel."""

    def __init__(self):
        self.parent: list[int] = []

    def new(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(self, a: torch.Tensor, b: torch.Tensor) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx

    def numbered(self) -> tuple[torch.Tensor, int]:
        """Every id's set as a number in 0 .. count - 1, and the count."""
        roots = torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)
        _, ids = torch.unique(roots, return_inverse=True)
        return ids, int(ids.max()) + 1 if len(self.parent) else 0


def channel_units(graph: Graph) -> ChannelUnits:
    """Follow every channel through the graph; see :class:`ChannelUnits`."""
    sets = _Sets()
    of: dict[str, torch.Tensor] = {}
    pinned_ids: list[tuple[torch.Tensor, str]] = []
    readers = []
    for node in graph.nodes.values():
        width = node.out_shape[1] if len(node.out_shape) > 1 else 1
        ins = [of[i] for i in node.inputs]
        if passes_channels(node):
            of[node.name] = ins[0]
        elif node.role == FLATTEN:
            src = ins[0]
            of[node.name] = src.repeat_interleave(width // src.numel()) if len(node.in_shapes[0]) > 2 else src
        elif node.role == BCAST and ins[0].numel() != ins[1].numel():  # one operand is broadcast over channels
            narrow = 0 if ins[0].numel() < ins[1].numel() else 1
            pinned_ids.append((ins[narrow], f"{node.name}: broadcast over every channel"))
            of[node.name] = ins[1 - narrow]
        elif node.role in (ADD, BCAST):
            for other in ins[1:]:
                sets.join(ins[0], other)
            of[node.name] = ins[0]
        elif node.role == CAT:
            of[node.name] = torch.cat(ins)
        elif node.role == CHPAD:
            out = sets.new(width)
            out[node.module.index] = ins[0]
            of[node.name] = out
        else:  # input, const, conv, linear, mixing, and anything that makes new channels
            of[node.name] = sets.new(width)
            if node.role in WEIGHTED:
                readers.append(node.name)
                why = _pin_all(node)
                if why:
                    pinned_ids += [(ins[0], why), (of[node.name], why)]
            elif node.role != INPUT and node.role != CONST:
                why = f"{node.name}: a {node.role} step mixes channels"
                pinned_ids += [(i, why) for i in ins] + [(of[node.name], why)]
    pinned_ids.append((of[graph.output], "the model's output"))
    ids, count = sets.numbered()
    of = {k: ids[v] for k, v in of.items()}
    pinned = torch.zeros(count, dtype=torch.bool)
    reasons: dict[int, str] = {}
    for raw, why in pinned_ids:
        pinned[ids[raw]] = True
        for u in ids[raw].tolist():
            reasons.setdefault(u, why)
    return ChannelUnits(of, count, pinned, readers, {r: of[graph.nodes[r].inputs[0]] for r in readers}, reasons)
