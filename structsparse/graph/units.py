"""Channel units: the dependency graph of the channels.

:func:`channel_units` follows every channel through the graph, so that all the places where one channel
lives share one *unit*. A unit can be removed only as a whole: from every layer that writes it (filters)
and every layer that reads it (input columns).

Each tensor gets a *map*: a tensor of unit ids that broadcasts to the tensor's shape (batch dimension 1,
every dimension along which the ids do not change kept at size 1). A channel-first feature map has ids
along dim 1 (``1 × C × 1 × 1``), a channels-last one along its last dim, a flattened one along its
features. Steps that only move entries (permute, reshape, slicing, chunk) move the map the same way, so
channels are followed into channels-last blocks and token sequences; steps that combine tensors
(``a + b``, a squeeze-excite gate, a layer-scale parameter, concatenation) tie the ids they pair up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .ops import (ADD, BCAST, CAT, CHPAD, CONST, CONV, DEPTHWISE, DROPOUT, ELEMENTWISE, FLATTEN, INPUT, LAYERNORM,
                  MOVE, NORM, OPAQUE, PARAM, POOL, REDUCE, WEIGHTED, describe_step, feature_dim)
from .trace import Graph, Node

__all__ = ["ChannelUnits", "channel_units", "explain", "compress", "along", "channel_dim", "move"]


@dataclass
class ChannelUnits:
    """Which channels of all tensors are one and the same channel.

    ``maps[node]`` holds the unit of every entry of the node's output (see the module's docstring);
    ``of[node]`` lists the units along the node's channel dimension ``dims[node]`` (dim 1 of a conv's
    output, the last dim of a Linear's; for a flattened tensor, each feature has the unit of the channel it
    came from). ``pinned[u]`` is True for units that cannot be removed (they reach the model output, feed a
    step that mixes channels or that has no channel rule); ``reasons[u]`` says why, naming the step (the
    first reason found). ``readers`` lists the Conv2d/Linear nodes: each reads the units
    ``of_input[node]`` (its columns) and writes the units ``of[node]`` (its rows).
    """

    of: dict[str, torch.Tensor]
    count: int
    pinned: torch.Tensor
    readers: list[str]
    of_input: dict[str, torch.Tensor]  # reader → the units of its input
    reasons: dict[int, str] = field(default_factory=dict)  # pinned unit → why
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)

    def reader_count(self) -> torch.Tensor:
        """How many layers read each unit (a unit read by two or more layers is *coupled*)."""
        counts = torch.zeros(self.count, dtype=torch.long)
        for r in self.readers:
            counts[self.of_input[r].unique()] += 1
        return counts


# ---- maps ------------------------------------------------------------------------------------

def compress(m: torch.Tensor) -> torch.Tensor:
    """``m`` with every dimension along which it does not change cut to size 1."""
    for d in range(m.dim()):
        if m.shape[d] > 1 and bool((m == m.narrow(d, 0, 1)).all()):
            m = m.narrow(d, 0, 1)
    return m.contiguous()


def full_shape(node_shape: tuple[int, ...], batched: bool) -> tuple[int, ...]:
    """A node's shape with the batch dimension at 1 (a parameter has none)."""
    return (1, *node_shape[1:]) if batched and node_shape else tuple(node_shape)


def channel_dim(m: torch.Tensor) -> int | None:
    """The one dimension along which a map changes (None if it changes along several; the last of size > 1,
    or 1, if it changes along none)."""
    varying = [d for d in range(m.dim()) if m.shape[d] > 1]
    if len(varying) > 1:
        return None
    return varying[0] if varying else min(1, m.dim() - 1)


def along(m: torch.Tensor, shape: tuple[int, ...], dim: int, reduce=None) -> torch.Tensor:
    """The map's entries along ``dim`` of a tensor of ``shape`` (batch dimension 1): entry 0 of every other
    dim, or ``reduce``d over them (``torch.all`` says whether an entry holds at every position)."""
    moved = m.expand(shape).movedim(dim, 0).reshape(shape[dim], -1)
    return moved[:, 0] if reduce is None else reduce(moved, 1)


def move(node: Node, m: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The map of a step that only moves entries (permute, reshape, slicing), from its input's map."""
    full = m.expand((1, *in_shape[1:]))
    return compress(node.module(full))


# ---- union-find ------------------------------------------------------------------------------

class _Sets:
    """Union-find over channel ids: ids joined by an add are one channel. A *free* id comes from a parameter
    or a constant: it may join the channel it is combined with."""

    def __init__(self):
        self.parent: list[int] = []
        self.free: list[bool] = []

    def new(self, shape: tuple[int, ...], free: bool = False) -> torch.Tensor:
        start, n = len(self.parent), 1
        for s in shape:
            n *= s
        self.parent.extend(range(start, start + n))
        self.free.extend([free] * n)
        return torch.arange(start, start + n).view(shape)

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def roots(self, m: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.find(i) for i in m.flatten().tolist()], dtype=torch.long).view(m.shape)

    def join(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[ry] = rx
            self.free[rx] = self.free[rx] and self.free[ry]

    def numbered(self) -> tuple[torch.Tensor, int]:
        """Every id's set as a number in 0 .. count - 1, and the count."""
        roots = torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)
        _, ids = torch.unique(roots, return_inverse=True)
        return ids, int(ids.max()) + 1 if len(self.parent) else 0


_LARGE = 2 ** 16  # a parameter (or a tensor made of parameters) with more entries gets one id, not one each


class _Pass:
    """One walk through the graph: each node's map from its inputs' maps."""

    def __init__(self, graph: Graph):
        self.graph, self.sets = graph, _Sets()
        self.maps: dict[str, torch.Tensor] = {}
        self.pins: list[tuple[torch.Tensor, str]] = []
        self.readers: list[str] = []

    def pin(self, m: torch.Tensor, why: str) -> None:
        self.pins.append((m.flatten(), why))

    def fresh(self, node: Node, dim: int | None) -> torch.Tensor:
        """New ids along ``dim`` of the node's output (one id for the whole tensor if None)."""
        shape = [1] * len(node.out_shape)
        if dim is not None:
            shape[dim] = node.out_shape[dim]
        return self.sets.new(tuple(shape))

    def free(self, m: torch.Tensor) -> bool:
        """Whether every id of a map comes from parameters or constants only."""
        return all(self.sets.free[r] for r in self.sets.roots(m).flatten().tolist())

    def only_along(self, m: torch.Tensor, dim: int, node: Node, what: str) -> bool:
        """Pin the ids of a map that changes along a dim other than ``dim`` (the step treats that dim only);
        False if it had to."""
        roots = compress(self.sets.roots(m))
        if any(s > 1 and d != dim % roots.dim() for d, s in enumerate(roots.shape)):
            self.pin(m, f"{node.name}: {what}")
            return False
        return True

    def run(self) -> None:
        for node in self.graph.nodes.values():
            self.maps[node.name] = self.step(node, [self.maps[i] for i in node.inputs])

    def step(self, node: Node, ins: list[torch.Tensor]) -> torch.Tensor:
        role, rank = node.role, len(node.out_shape)
        if role == INPUT:
            return self.fresh(node, 1 if rank > 1 else None)
        if role == CONST:  # a folded feature map: a channel per dim-1 entry, free to join the one it meets
            shape = [1] * rank
            shape[min(1, rank - 1)] = node.out_shape[min(1, rank - 1)]
            return self.sets.new(tuple(shape), free=True)
        if role == PARAM:  # an id per entry, to join the channels it meets; one for a large one (a weight)
            small = math.prod(node.out_shape) <= _LARGE
            return self.sets.new(tuple(node.out_shape) if small else (1,) * rank, free=True)
        if role in WEIGHTED:
            return self.weighted(node, ins[0])
        if role in (NORM, POOL, DEPTHWISE):
            if self.only_along(ins[0], 1, node, f"a {role} step works on dim 1 only") and rank == ins[0].dim():
                return ins[0]
            out = self.fresh(node, None)
            self.pin(out, f"{node.name}: a {role} step works on dim 1 only")
            return out
        if role in (ELEMENTWISE, DROPOUT):
            return ins[0]
        if role in (FLATTEN, MOVE):
            return move(node, ins[0], node.in_shapes[0])
        if role == REDUCE:
            return self.reduce(node, ins[0])
        if role in (ADD, BCAST):
            return self.combine(node, ins)
        if role == CAT:
            return self.cat(node, ins)
        if role == CHPAD:
            out = self.sets.new((1, node.out_shape[1], 1, 1))
            out[0, node.module.index, 0, 0] = ins[0].expand(1, node.in_shapes[0][1], 1, 1)[0, :, 0, 0]
            return out
        if role == LAYERNORM:  # over its last dim: a channel that is constant wherever it reads it can go
            if len(node.module.normalized_shape) > 1:
                self.pin(ins[0], f"{node.name}: LayerNorm normalises over several dims")
            else:
                self.only_along(ins[0], rank - 1, node, "LayerNorm's channels are not its last dim")
            return ins[0]
        values = [m for m, only in zip(ins, getattr(node.module, "shape_only", [False] * len(ins))) if not only]
        shape = full_shape(node.out_shape, node.batched)
        if role == OPAQUE and all(self.free(m) for m in values) and math.prod(shape) <= _LARGE:
            return self.sets.new(shape, free=True)  # made of parameters only: a constant, like a parameter
        why = f"{node.name}: {describe_step(node)}"  # attention, a mixing step, or one with no channel rule
        for m in values:  # an input read for its batch size keeps no channel
            self.pin(m, why)
        out = self.fresh(node, None)
        self.pin(out, why)
        return out

    def weighted(self, node: Node, m: torch.Tensor) -> torch.Tensor:
        """A conv reads and writes dim 1 of 4-D tensors, a Linear the last dim."""
        self.readers.append(node.name)
        if node.role == CONV and len(node.out_shape) != 4:
            why = f"{node.name}: a conv on a {len(node.out_shape)}-D tensor"
            self.pin(m, why)
            out = self.fresh(node, None)
            self.pin(out, why)
            return out
        dim = feature_dim(node)
        self.only_along(m, dim, node, "its input's channels are not its features")
        return self.fresh(node, dim)

    def reduce(self, node: Node, m: torch.Tensor) -> torch.Tensor:
        dims = sorted(d % len(node.in_shapes[0]) for d in node.module.kwargs["dim"])
        if any(m.shape[d] > 1 for d in dims):
            self.pin(m, f"{node.name}: a reduction over channels mixes them")
            return self.fresh(node, None)
        if node.module.kwargs.get("keepdim"):
            return m
        for d in reversed(dims):
            m = m.squeeze(d)
        return m

    def shapes(self, node: Node) -> list[tuple[int, ...]]:
        """The shapes of a node's inputs as their maps see them (batch 1; a parameter has no batch)."""
        return [full_shape(s, self.graph.nodes[i].batched) for s, i in zip(node.in_shapes, node.inputs)]

    def combine(self, node: Node, ins: list[torch.Tensor]) -> torch.Tensor:
        """``a + b``, ``a * g``: pair up the entries that meet and tie their ids (see :meth:`tie`)."""
        shapes = self.shapes(node)
        for other, shape in zip(ins[1:], shapes[1:]):
            self.tie(node, (ins[0], shapes[0]), (other, shape))
        roots = [self.sets.roots(m) for m in torch.broadcast_tensors(*ins)]
        return compress(max(roots, key=lambda r: r.unique().numel()))  # the first of the widest

    def tie(self, node: Node, *sides: tuple[torch.Tensor, tuple[int, ...]]) -> None:
        """Tie the ids of two maps (of tensors of the given shapes) where their entries meet. An entry that
        meets several channels is not tied but pinned: a gate broadcast over channels (the channels stay
        free), or a channel repeated where the other tensor has distinct ones (those stay too)."""
        rank = max(m.dim() for m, _ in sides)
        (a, sa), (b, sb) = [(m.reshape((1,) * (rank - m.dim()) + tuple(m.shape)), (1,) * (rank - len(s)) + tuple(s))
                            for m, s in sides]
        ra, rb = (self.sets.roots(m).flatten() for m in torch.broadcast_tensors(a, b))
        pairs = torch.unique(torch.stack([ra, rb], 1), dim=0).tolist()
        free = self.sets.free
        partners: dict[tuple[int, int], set[int]] = {}
        for x, y in pairs:
            if not free[y]:
                partners.setdefault((0, x), set()).add(y)
            if not free[x]:
                partners.setdefault((1, y), set()).add(x)
        shared = {key for key, p in partners.items() if len(p) > 1}
        why = f"{node.name}: broadcast over several channels"
        for side, r in shared:
            self.pin(torch.tensor([r]), why)
            own_shape, other = (sa, b) if side == 0 else (sb, a)
            if any(own_shape[d] > 1 for d in range(rank) if other.shape[d] > 1):  # not a broadcast: equal sizes
                self.pin(torch.tensor(sorted(partners[side, r])), f"{node.name}: adds a channel repeated in "
                                                                   "the other input")
        for x, y in pairs:
            if (0, x) not in shared and (1, y) not in shared:
                self.sets.join(x, y)

    def cat(self, node: Node, ins: list[torch.Tensor]) -> torch.Tensor:
        dim = node.module.dim % len(node.out_shape)
        shapes = self.shapes(node)
        if all(m.shape[dim] == 1 for m in ins):  # along positions or tokens: entry c of each is channel c
            for m, shape in zip(ins[1:], shapes[1:]):
                self.tie(node, (ins[0], shapes[0]), (m, shape))
        full = [m.expand(s) for m, s in zip(ins, shapes)]
        return compress(self.sets.roots(torch.cat(full, dim)))


def channel_units(graph: Graph) -> ChannelUnits:
    """Follow every channel through the graph; see :class:`ChannelUnits`."""
    walk = _Pass(graph)
    walk.run()
    walk.pin(walk.maps[graph.output], "the model's output")
    ids, count = walk.sets.numbered()
    maps, of, dims = {}, {}, {}
    for name, m in walk.maps.items():
        node = graph.nodes[name]
        maps[name] = compress(ids[m])
        dim = channel_dim(maps[name])
        if dim is None:
            walk.pins.append((m.flatten(), f"{name}: its channels are spread over several dimensions"))
            dim = 1
        shape = full_shape(node.out_shape, node.batched)
        dims[name] = dim if len(shape) > 1 else 0
        of[name] = along(maps[name], shape, dims[name]) if len(shape) > 1 else maps[name].reshape(-1)[:1]
    pinned = torch.zeros(count, dtype=torch.bool)
    reasons: dict[int, str] = {}
    for raw, why in walk.pins:
        pinned[ids[raw]] = True
        for u in ids[raw].tolist():
            reasons.setdefault(u, why)
    of_input = {}
    for r in walk.readers:
        node = graph.nodes[r]
        src = node.inputs[0]
        of_input[r] = along(maps[src], full_shape(node.in_shapes[0], True), feature_dim(node))
    return ChannelUnits(of, count, pinned, walk.readers, of_input, reasons, maps, dims)


def explain(model, example_input: torch.Tensor) -> list[dict]:
    """Which channels of each step stay whatever the weights, and why: one dict per step of the traced model,
    ``{"node", "role", "channels", "pinned", "reasons": {reason: channels}}``, in execution order. A step with
    no channel rule (role ``opaque``) is named in the reasons of the channels it touches."""
    from .trace import trace_graph
    graph = trace_graph(model, example_input)
    units = channel_units(graph)
    rows = []
    for name, node in graph.nodes.items():
        ids = units.of[name]
        pinned = units.pinned[ids]
        reasons: dict[str, int] = {}
        for u in ids[pinned].tolist():
            reasons[units.reasons[u]] = reasons.get(units.reasons[u], 0) + 1
        rows.append({"node": name, "role": node.role, "channels": ids.numel(), "pinned": int(pinned.sum()),
                     "reasons": reasons})
    return rows
