"""Compaction: a new, smaller, dense model whose eval-mode outputs equal the original's.

The model is read as a chain (see :mod:`structsparse.graph`) and cut into *segments*: a
producer (Conv2d or Linear), the channel-wise steps after it (BatchNorm, activations,
pooling, dropout, flatten), and the consumer that reads its channels. In each segment:

* a channel that the consumer never reads (its columns are all zero) is removed from the
  producer (its filter, bias and BatchNorm entries) and from the consumer;
* a channel whose producer filter is all zero carries a known value (the bias passed
  through the segment). Its contribution to the consumer is folded into the consumer's bias
  when it is the same at every output position (always for a Linear consumer; for a conv
  only where padding does not make it position-dependent); otherwise the channel stays;
* input features that a Linear (or the first conv) never reads are skipped by a gather
  right before it, so a compact MLP reads only the pixels it uses;
* convs whose remaining weight matrix has all-zero columns become :class:`LoweredConv2d`.

The result is checked against the original on ``example_input`` before it is returned.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import Graph, Node, channel_units, trace_graph
from ..graph.ops import (ADD, ATTENTION, BCAST, CAT, CHPAD, CONST, CONV, DEPTHWISE, DROPOUT, ELEMENTWISE, FLATTEN, INPUT,
                         LAYERNORM, LINEAR, MOVE, NORM, PARAM, POOL, REDUCE, WEIGHTED, feature_dim)
from ..graph.units import along, compress, full_shape, move
from ..layers import ChannelPad, Constant, IndexSelect, Param, SlicedLayerNorm, fast_form, tunable
from ..timing import pick_fastest
from .kernels import LoweredConv2d

__all__ = ["compact", "lower_conv", "CompactNet", "IndexSelect", "CollapseWarning", "RTOL", "ATOL"]

RTOL, ATOL = 1e-4, 1e-5
LOWERED_BELOW = 0.5   # default: lower a conv that keeps at most half of its weight-matrix columns


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    *parents, leaf = name.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(leaf, module)


class CompactNet(nn.Module):
    """Named steps run in order. Shrunk modules keep their original names.

    ``steps`` holds ``(name, module)`` (the step reads the previous step's output, or the
    model input for the first) or ``(name, module, inputs)`` with ``inputs`` a list of
    earlier step names or :attr:`INPUT` (residual adds and concatenations read several).
    The model returns the last step's output.
    """

    INPUT = "input"
    channels_last = False  # see use_channels_last

    def __init__(self, steps: list[tuple], input_shape: list[int] | None = None):
        super().__init__()
        self.input_shape = input_shape
        self.order, self.inputs, modules = [], [], []
        for i, step in enumerate(steps):
            name, module = step[0], step[1]
            previous = self.order[-1] if self.order else self.INPUT
            inputs = list(step[2]) if len(step) > 2 and step[2] is not None else [previous]
            if name == self.INPUT or name in self.order:
                raise ValueError(f"step {i}: name {name!r} is reserved or used twice")
            unknown = [n for n in inputs if n != self.INPUT and n not in self.order]
            if unknown or not inputs:
                raise ValueError(f"step {i} ({name}): inputs {inputs} must name earlier steps or {self.INPUT!r}")
            _set_submodule(self, name, module)
            self.order.append(name)
            self.inputs.append(inputs)
            modules.append(module)
        self._steps = modules
        self._chain = all(ins == [prev] for ins, prev in zip(self.inputs, [self.INPUT] + self.order))
        last_use = {n: i for i, ins in enumerate(self.inputs) for n in ins}
        self._free = [[n for n in set(ins) if last_use[n] == i and n != self.order[-1]]
                      for i, ins in enumerate(self.inputs)]  # outputs no later step reads

    def use_channels_last(self, on: bool = True) -> "CompactNet":
        """Run in channels-last memory format (``on``): 4-d weights are stored so, and a 4-d input is converted on
        the way in (a 4-d output back on the way out); the same values, in a layout that oneDNN runs faster on
        some models. Returns ``self``."""
        self.channels_last = bool(on)
        return self.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last or x.dim() != 4:
            return self._run(x)
        out = self._run(x.contiguous(memory_format=torch.channels_last))
        return out.contiguous() if out.dim() == 4 else out

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self._chain:
            for step in self._steps:
                x = step(x)
            return x
        values = {self.INPUT: x}
        for name, step, inputs, free in zip(self.order, self._steps, self.inputs, self._free):
            values[name] = step(*[values[i] for i in inputs])
            for n in free:  # let memory go as soon as possible, as a plain forward would
                del values[n]
        return values[self.order[-1]]

    def steps(self) -> list[tuple[str, nn.Module]]:
        return list(zip(self.order, self._steps))

    def step_inputs(self, name: str) -> list[str]:
        """The names of the steps (or :attr:`INPUT`) that step ``name`` reads."""
        return self.inputs[self.order.index(name)]


# ---- slicing modules in place -------------------------------------------------------------

def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


def _slice_rows(m: nn.Module, keep: torch.Tensor) -> None:
    m.weight = _param(m.weight[keep], m.weight)
    if m.bias is not None:
        m.bias = _param(m.bias[keep], m.bias)
    if isinstance(m, nn.Conv2d):
        m.out_channels = keep.numel()
    else:
        m.out_features = keep.numel()


def _slice_cols(m: nn.Module, keep: torch.Tensor) -> None:
    m.weight = _param(m.weight[:, keep], m.weight)
    if isinstance(m, nn.Conv2d):
        m.in_channels = keep.numel()
    else:
        m.in_features = keep.numel()


def _slice_affine(m: nn.Module, keep: torch.Tensor) -> None:
    """A norm layer's γ and β (where it has them), for the kept channels."""
    for name in ("weight", "bias"):
        p = getattr(m, name)
        if p is not None:
            setattr(m, name, _param(p[keep], p))


def _slice_norm(m: nn.Module, keep: torch.Tensor) -> None:
    _slice_affine(m, keep)
    for name in ("running_mean", "running_var"):
        b = getattr(m, name)
        if b is not None:
            setattr(m, name, b[keep].clone())
    m.num_features = keep.numel()


def _slice_layernorm(m: SlicedLayerNorm, keep: torch.Tensor) -> None:
    _slice_affine(m, keep)
    m.normalized_shape = (keep.numel(),)


def _slice_grouped(m: nn.Conv2d, keep_out: torch.Tensor, keep_in: torch.Tensor) -> None:
    """A grouped conv keeping the same number of outputs and of inputs in every group."""
    g = m.groups
    _slice_rows(m, keep_out.nonzero().flatten())
    cols = keep_in.view(g, -1).nonzero()[:, 1].view(g, -1)   # the kept columns of each group
    w = m.weight.view(g, m.out_channels // g, *m.weight.shape[1:])
    w = torch.stack([w[i][:, cols[i]] for i in range(g)]).flatten(0, 1)
    m.weight = _param(w, m.weight)
    m.in_channels = g * cols.shape[1]


def _slice_depthwise(m: nn.Conv2d, keep: torch.Tensor) -> None:
    """A depthwise conv's filters follow its channels: keep both."""
    _slice_rows(m, keep)
    m.in_channels = m.groups = m.out_channels


def _add_bias(m: nn.Module, delta: torch.Tensor) -> None:
    if not bool(delta.ne(0).any()):
        return
    if m.bias is None:
        m.bias = nn.Parameter(delta.detach().clone(), requires_grad=m.weight.requires_grad)
    else:
        with torch.no_grad():
            m.bias.add_(delta)


# ---- folding constant channels ----------------------------------------------------------

def _fold_conv(cons: nn.Conv2d, u: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidate channels contribute a position-independent amount to ``cons``, and its sum."""
    idx = cand.nonzero().flatten()
    w = cons.weight.detach()[:, idx]  # N × D × M × K
    n, d = w.shape[:2]
    x, padding = u[:, idx], cons.padding
    if cons.padding_mode != "zeros":
        x, padding = F.pad(x, cons._reversed_padding_repeated_twice, mode=cons.padding_mode), 0
    # One grouped conv gives every candidate channel's contribution map separately.
    per = F.conv2d(x, w.transpose(0, 1).reshape(d * n, 1, *w.shape[2:]), None, cons.stride, padding,
                   cons.dilation, groups=d).view(d, n, -1)
    first = per[:, :, :1]
    tol = 1e-6 * first.abs().clamp_min(1.0)
    foldable = ((per - first).abs() <= tol).all(dim=2).all(dim=1)
    return _mask(cand, idx, foldable), first[foldable, :, 0].sum(dim=0)


def _mask(like: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    out[idx[values]] = True
    return out


def lower_conv(m: nn.Module, lowered_below: float | str = LOWERED_BELOW,
               input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """``m`` as a :class:`LoweredConv2d` if it keeps at most ``lowered_below`` of its weight-matrix
    columns (and is a plain zero-padded, ungrouped Conv2d); otherwise ``m`` itself.

    With ``lowered_below="measure"``, both forms are timed on a random input of
    ``input_shape`` (interleaved, medians) and the faster one is returned.
    """
    if not isinstance(m, nn.Conv2d) or m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        return m
    keep = m.weight.detach().flatten(1).ne(0).any(dim=0)
    kept = int(keep.sum())
    if kept == keep.numel():
        return m
    if lowered_below == "measure":
        if input_shape is None:
            raise ValueError("lowered_below='measure' needs the layer's input_shape")
        lowered = LoweredConv2d.from_conv(m, keep)
        x = torch.rand(input_shape, device=m.weight.device)
        with torch.inference_mode():
            faster = pick_fastest([lambda: m(x), lambda: lowered(x)], margin=1.0, repeats=7, device=m.weight.device)
        return lowered if faster else m
    if not isinstance(lowered_below, (int, float)) or isinstance(lowered_below, bool) or not 0 <= lowered_below <= 1:
        raise ValueError(f"lowered_below must be a fraction in [0, 1] or 'measure', got {lowered_below!r}")
    if kept > lowered_below * keep.numel():
        return m
    return LoweredConv2d.from_conv(m, keep)




# ---- the graph pass ----------------------------------------------------------------------

def _run(graph: Graph, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every node's output on ``x``."""
    values = {graph.input: x}
    for node in list(graph.nodes.values())[1:]:
        values[node.name] = node.module(*[values[i] for i in node.inputs])
    return values


def _input_independent(graph: Graph) -> dict[str, torch.Tensor]:
    """Per node, a map (see :mod:`structsparse.graph.units`) that is True for each entry whose value does
    not depend on the model input: written by zero weights (or read only from such entries), a BatchNorm
    with γ = 0, a constant or parameter, or zero padding."""
    const: dict[str, torch.Tensor] = {}
    for node in graph.nodes.values():
        const[node.name] = compress(_independent(node, [const[i] for i in node.inputs]))
    return const


def _independent(node: Node, ins: list[torch.Tensor]) -> torch.Tensor:
    rank = len(node.out_shape)
    if node.role == INPUT:
        return torch.zeros((1,) * rank, dtype=torch.bool)
    if node.role in (CONST, PARAM):
        return torch.ones((1,) * rank, dtype=torch.bool)
    if node.role in (CONV, LINEAR, NORM, DEPTHWISE) and not (node.role == CONV and rank != 4):
        dim = feature_dim(node)
        if ins[0].dim() != len(node.in_shapes[0]):
            return torch.zeros((1,) * rank, dtype=torch.bool)
        fixed = along(ins[0], full_shape(node.in_shapes[0], True), dim, torch.all)  # at every position
        out = _channel_independent(node, fixed)
        shape = [1] * rank
        shape[dim] = out.numel()
        return out.view(shape)
    if node.role == POOL and rank == ins[0].dim():  # a window mixes positions
        return ins[0].all(tuple(range(2, rank)), keepdim=True) if rank > 2 else ins[0]
    if node.role == LAYERNORM and node.module.weight is not None and len(node.module.normalized_shape) == 1:
        return _follow(node, ins) | node.module.weight.detach().eq(0).view((1,) * (rank - 1) + (-1,))  # γ = 0: β
    if node.role in (ELEMENTWISE, DROPOUT, FLATTEN, MOVE, REDUCE, LAYERNORM, ADD, BCAST, CAT, CHPAD):
        return _follow(node, ins)
    values = [c for c, only in zip(ins, getattr(node.module, "shape_only", [False] * len(ins))) if not only]
    return torch.full((1,) * rank, all(bool(c.all()) for c in values))


def _channel_independent(node: Node, fixed: torch.Tensor) -> torch.Tensor:
    """Which output channels of a conv, Linear, BatchNorm or depthwise conv are input-independent, given
    which input channels are."""
    w = node.module.weight.detach() if node.module.weight is not None else None
    if node.role == CONV:
        g = node.module.groups
        reads = w.ne(0).flatten(2).any(2)  # N × C/G
        return ~(reads.view(g, -1, reads.shape[1]) & ~fixed.view(g, 1, -1)).any(2).flatten()
    if node.role == LINEAR:
        return ~(w.ne(0) & ~fixed[None, :]).any(1)
    if node.role == DEPTHWISE:  # a zero filter leaves its bias, whatever the input
        return fixed | w.flatten(1).eq(0).all(1)
    if isinstance(node.module, nn.modules.batchnorm._BatchNorm) and w is not None:
        return fixed | w.eq(0)  # γ = 0: the channel is its shift β
    return fixed


def _follow(node: Node, ins: list[torch.Tensor]) -> torch.Tensor:
    """Steps that move or combine entries: an output entry is input-independent when what it is made of is."""
    if node.role in (FLATTEN, MOVE):
        return move(node, ins[0], node.in_shapes[0])
    if node.role in (ADD, BCAST):
        out = ins[0]
        for c in ins[1:]:
            out = out & c
        return out
    if node.role == CAT:
        return torch.cat([c.expand(full_shape(s, True)) for c, s in zip(ins, node.in_shapes)], node.module.dim)
    if node.role == CHPAD:
        out = torch.ones((1, node.out_shape[1], 1, 1), dtype=torch.bool)
        out[0, node.module.index, 0, 0] = along(ins[0], full_shape(node.in_shapes[0], True), 1, torch.all)
        return out
    if node.role == REDUCE and ins[0].dim() == len(node.in_shapes[0]):
        m = ins[0]
        for d in sorted((d % m.dim() for d in node.module.kwargs["dim"]), reverse=True):
            m = m.all(d, keepdim=True)
            if not node.module.kwargs.get("keepdim"):
                m = m.squeeze(d)
        return m
    if node.role == REDUCE:  # a map that does not line up with the input: fixed only if all of it is
        return ins[0].all().view((1,) * len(node.out_shape))
    if node.role == LAYERNORM:  # normalised over its last dims: fixed only if all of them are
        dims = len(node.module.normalized_shape)
        m = ins[0]
        for d in range(m.dim() - dims, m.dim()):
            m = m.all(d, keepdim=True)
        return m
    if len(node.out_shape) != ins[0].dim():
        return ins[0].all().view((1,) * len(node.out_shape))
    return ins[0]


def _replace_constants(graph: Graph, const: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> Graph:
    """Nodes whose whole output is input-independent become :class:`Constant` s (a residual branch
    whose convs are zero leaves its BatchNorm shift, say); zero constants vanish from adds;
    steps that no longer lead to the output are dropped."""
    nodes = dict(graph.nodes)
    users = graph.consumers()
    renamed: dict[str, str] = {}
    for node in list(nodes.values()):
        node.inputs = [renamed.get(i, i) for i in node.inputs]
        if node.role == ADD:
            zero = [i for i in node.inputs if nodes[i].role == CONST and not bool(nodes[i].module.value.any())]
            node.inputs = [i for i in node.inputs if i not in zero] or node.inputs[:1]
            if len(node.inputs) == 1:  # x + 0: consumers read x itself
                renamed[node.name] = node.inputs[0]
                del nodes[node.name]
                continue
        if node.role in (INPUT, CONST, PARAM) or not bool(const[node.name].all()):
            continue
        if node.name != graph.output and all(bool(const[u].all()) for u in users[node.name]):
            continue  # only constant steps read it: they are replaced instead
        value = values[node.name]
        if not node.batched:  # computed from parameters only: a parameter of its own
            nodes[node.name] = Node(node.name, PARAM, Param(value), [graph.input], node.out_shape,
                                    [nodes[graph.input].out_shape], False)
            continue
        if not torch.equal(value, value[:1].expand_as(value)):
            continue  # not exactly one value for every sample: keep the step (safe)
        constant = Constant(value.shape[1:]).to(value.device)
        constant.value.copy_(value[0])
        nodes[node.name] = Node(node.name, CONST, constant, [graph.input], node.out_shape, [nodes[graph.input].out_shape])
    output = renamed.get(graph.output, graph.output)
    live, stack = set(), [output]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(nodes[n].inputs)
    live.add(graph.input)
    return Graph({n: node for n, node in nodes.items() if n in live}, output)


def _grouped(node: Node) -> bool:
    """A grouped conv (not depthwise): it loses the same number of channels in every group."""
    return node.role == CONV and node.module.groups != 1


def _constant_values(values: dict[str, torch.Tensor], node: Node, dim: int) -> torch.Tensor:
    """The first sample of a step's input as channels (along ``dim``) × positions."""
    x = values[node.inputs[0]][:1].movedim(dim, 0)
    return x.reshape(x.shape[0], -1)


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """Per row of channels × positions: whether the channel has one value at every position."""
    return x.eq(x[:, :1]).all(1)


def _layernorms(graph: Graph, units, values: dict[str, torch.Tensor]):
    """Each LayerNorm over one (last) dim, the units of its input entries there, and its input's first sample as
    those entries × positions."""
    for node in graph.nodes.values():
        if node.role == LAYERNORM and len(node.module.normalized_shape) == 1:
            shape = full_shape(node.in_shapes[0], True)
            yield node, along(units.maps[node.inputs[0]], shape, len(shape) - 1), \
                _constant_values(values, node, len(shape) - 1)


def _reads(node: Node) -> torch.Tensor:
    """True for each input channel (feature) of a weighted node that some nonzero weight reads."""
    w = node.module.weight.detach()
    if node.role == LINEAR:  # its features: the last dim
        return w.ne(0).any(0)
    g = node.module.groups  # input channel c is column c mod C/G of its group's filters
    return w.ne(0).flatten(2).any(2).view(g, w.shape[0] // g, -1).any(1).flatten()


def _removable_units(graph: Graph, values: dict[str, torch.Tensor]):
    """Units to remove: those nobody reads, and constant ones whose value every reader can fold
    into its bias. Returns the units, the removal mask (per unit) and, per layer, which of its
    input entries its weights read."""
    units = channel_units(graph)
    const = _input_independent(graph)
    varying = torch.zeros(units.count, dtype=torch.bool)  # input-dependent where some layer reads it
    for r in units.readers:
        node = graph.nodes[r]
        fixed = along(const[node.inputs[0]], full_shape(node.in_shapes[0], True), feature_dim(node), torch.all)
        varying[units.of_input[r][~fixed]] = True
    read = torch.zeros(units.count, dtype=torch.bool)
    reads = {r: _reads(graph.nodes[r]) for r in units.readers}
    for r, mask in reads.items():
        read[units.of_input[r][mask]] = True
    blocked = units.pinned | (read & varying)
    for node, ids, x in _layernorms(graph, units, values):  # it normalises over every entry: one it loses must
        fixed = along(const[node.inputs[0]], full_shape(node.in_shapes[0], True), -1, torch.all)
        blocked[ids[~(fixed & _uniform(x))]] = True  # be the same constant everywhere (SlicedLayerNorm)
    for r, mask in reads.items():  # constant, read units: every reader must be able to fold them
        node = graph.nodes[r]
        ids = units.of_input[r]
        cand = mask & ~blocked[ids]
        if _grouped(node):  # only zeros: nothing to fold them into
            blocked[ids[cand & ~_constant_values(values, node, 1).eq(0).all(1)]] = True
        elif node.role == LINEAR:  # a Linear on tokens or positions: one value at every position
            blocked[ids[cand & ~_uniform(_constant_values(values, node, feature_dim(node)))]] = True
        elif node.role == CONV and bool(cand.any()):
            foldable, _ = _fold_conv(node.module, values[node.inputs[0]][:1], cand)
            blocked[ids[cand & ~foldable]] = True
    return units, ~blocked, reads


class CollapseWarning(RuntimeWarning):
    """The model, or a whole layer's width, no longer depends on the input: SSL zeroed too much."""


def _realisable(graph: Graph, units, remove: torch.Tensor) -> torch.Tensor:
    """``remove`` cut back until every tensor keeps an entry and every grouped conv loses the same number of
    input and of output channels in each group (at least one stays per group), so it stays a grouped conv."""
    grouped = [(units.of[n.inputs[0]], units.of[n.name], n.module.groups) for n in graph.nodes.values()
               if _grouped(n)]
    changed = True
    while changed:
        changed = False
        for name, ids in units.of.items():  # keep one entry of every tensor, so that no shape becomes empty
            if ids.numel() and bool(remove[ids].all()):
                remove[ids[0]] = False
                changed = True
                if graph.nodes[name].role in WEIGHTED:
                    warnings.warn(f"compact: every output channel of {name} is zero or unread; one is kept so that "
                                  "the shapes stay valid", CollapseWarning, stacklevel=5)
        for ids_in, ids_out, g in grouped:
            for ids in (ids_in, ids_out):
                per = remove[ids].view(g, -1)
                k = min(int(per.sum(1).min()), per.shape[1] - 1)
                extra = per & (per.long().cumsum(1) > k)  # each group keeps all but its first k removals
                if bool(extra.any()):
                    remove[ids.view(g, -1)[extra]] = False
                    changed = True
    return remove


def _channelwise_after(graph: Graph, users: dict[str, list[str]], node: Node) -> list[Node]:
    """The BatchNorms and activations that alone read ``node``, one after another, then the last of them."""
    out = [node]
    while len(users[out[-1].name]) == 1 and (nxt := graph.nodes[users[out[-1].name][0]]).role in (NORM, ELEMENTWISE,
                                                                                                   DROPOUT):
        out.append(nxt)
    return out


def _around_grouped(graph: Graph, units, wanted: torch.Tensor, remove: torch.Tensor):
    """Channels that a grouped conv keeps only so that every group loses as many (see :func:`_realisable`) are
    still cut everywhere else: what writes its input does not compute them (a :class:`ChannelPad` puts their
    zeros back right before the conv), and an :class:`IndexSelect` drops them after the conv and the BatchNorm and
    activation that follow it. Returns the removal everywhere else and, per step between such insertions, the
    kept entries of its input and output."""
    grouped = [n for n in graph.nodes.values() if _grouped(n)]
    outside = remove | wanted
    for ids in units.of.values():  # no tensor may become empty
        if ids.numel() and bool(outside[ids].all()):
            outside[ids[~remove[ids]][0]] = False
    users, keep = graph.consumers(), {}
    for node in grouped:
        keep_out = ~remove[units.of[node.name]]
        keep[node.name] = (~remove[units.of_input[node.name]], keep_out)
        for step in _channelwise_after(graph, users, node)[1:]:
            keep[step.name] = (keep_out, keep_out)
    return outside, keep


def _regroup_steps(graph: Graph, units, remove: torch.Tensor, outside: torch.Tensor) -> list[tuple]:
    """The ChannelPads and IndexSelects of :func:`_around_grouped`, as ``(source, module, readers)``."""
    users, out = graph.consumers(), []
    grouped = [n for n in graph.nodes.values() if _grouped(n)]
    ends = {n.name: _channelwise_after(graph, users, n)[-1].name for n in grouped}
    for node in grouped:  # a grouped conv that reads another's output reads it as that one balanced it
        ids_in, ids_out = units.of_input[node.name], units.of[node.name]
        computed = ~outside[ids_in][~remove[ids_in]]  # among the conv's inputs, those written before it
        if not bool(computed.all()) and node.inputs[0] not in ends.values():
            out.append((node.inputs[0], ChannelPad(computed.numel(), computed.nonzero().flatten()), [node.name]))
        passed = ~outside[ids_out][~remove[ids_out]]
        readers = [u for u in users[ends[node.name]] if not _grouped(graph.nodes[u])]
        if not bool(passed.all()) and readers:
            out.append((ends[node.name], IndexSelect(1, passed.nonzero().flatten()), readers))
    return out


def _fold(graph: Graph, units, remove: torch.Tensor, reads: dict, values: dict[str, torch.Tensor]) -> None:
    """Add the contribution of removed constant entries to each reader's bias."""
    for r, mask in reads.items():
        node = graph.nodes[r]
        gone = remove[units.of_input[r]] & mask
        if not bool(gone.any()) or _grouped(node):
            continue
        if node.role == LINEAR:
            cols = gone.nonzero().flatten()
            delta = node.module.weight.detach()[:, cols] @ _constant_values(values, node, feature_dim(node))[cols, 0]
        else:
            _, delta = _fold_conv(node.module, values[node.inputs[0]][:1], gone)
        _add_bias(node.module, delta)
    for node, ids, x in _layernorms(graph, units, values):  # the entries a LayerNorm loses, as constants
        gone = remove[ids]
        if bool(gone.any()):
            node.module = _sliced_layernorm(node.module)
            node.module.absent_sum += float(x[gone, 0].double().sum())
            node.module.absent_sq += float(x[gone, 0].double().square().sum())


def _sliced_layernorm(m: nn.Module) -> SlicedLayerNorm:
    """``m`` as a :class:`SlicedLayerNorm` (nothing cut yet), sharing its parameters."""
    if isinstance(m, SlicedLayerNorm):
        return m
    out = SlicedLayerNorm(m.normalized_shape[0], m.normalized_shape[0], eps=m.eps,
                          elementwise_affine=m.weight is not None, bias=m.bias is not None)
    out.weight, out.bias = m.weight, m.bias  # it has no buffers: its parameters are all it holds
    return out


def _shrink(graph: Graph, units, remove: torch.Tensor, keep: dict | None = None) -> None:
    """Slice every module to the kept entries of its input and output (``keep``: ``{step: (input, output)}``
    where they differ from ``remove``)."""
    for node in graph.nodes.values():
        if node.role == ATTENTION:  # its channels stay; dead heads go (one stays)
            dead = node.module.dead_heads()
            if bool(dead.any()):
                dead[0] &= not bool(dead.all())
                node.module.keep_heads(~dead)
            continue
        keep_out = ~remove[units.of[node.name]]
        keep_in = ~remove[units.of_input.get(node.name, units.of[node.inputs[0]])] if node.inputs else None
        keep_in, keep_out = (keep or {}).get(node.name, (keep_in, keep_out))
        if bool(keep_out.all()) and (keep_in is None or bool(keep_in.all())):
            continue
        m = node.module
        if _grouped(node):
            _slice_grouped(m, keep_out, keep_in)
        elif node.role in WEIGHTED:
            _slice_rows(m, keep_out.nonzero().flatten())
            _slice_cols(m, keep_in.nonzero().flatten())
        elif node.role == NORM:
            _slice_norm(m, keep_out.nonzero().flatten())
        elif node.role == LAYERNORM:
            _slice_layernorm(m, keep_out.nonzero().flatten())
        elif node.role == DEPTHWISE:
            _slice_depthwise(m, keep_out.nonzero().flatten())
        elif node.role == CHPAD:
            position = keep_out.long().cumsum(0) - 1  # new place of each kept output channel
            m.index = position[m.index[keep_in]]
            m.out_channels = int(keep_out.sum())
        elif node.role in (CONST, PARAM):  # a constant's value has no batch dimension; nor has a parameter
            dim = units.dims[node.name] - (node.role == CONST)
            kept = m.value.detach().index_select(dim, keep_out.nonzero().flatten()).clone()
            m.value = nn.Parameter(kept, requires_grad=m.value.requires_grad) if node.role == PARAM else kept
        elif node.role == MOVE:
            _shrink_move(m, keep_out, keep_in, units.dims[node.name], units.dims[node.inputs[0]])


def _shrink_move(op, keep_out: torch.Tensor, keep_in: torch.Tensor, dim_out: int, dim_in: int) -> None:
    """A reshape's sizes, a slice's bounds and a permutation's order, for the kept channels."""
    if isinstance(op, IndexSelect):  # the kept outputs, read from the kept inputs' new places
        op.index = (keep_in.long().cumsum(0) - 1)[op.index[keep_out]]
    elif op.fn == "reshape":
        op.kwargs["shape"][dim_out - 1] = int(keep_out.sum())
    elif op.fn == "take" and 1 <= dim_in <= len(op.kwargs["start"]):
        start, length = op.kwargs["start"][dim_in - 1], op.kwargs["length"][dim_in - 1]
        op.kwargs["start"][dim_in - 1] = int(keep_in[:start].sum())
        if length:
            op.kwargs["length"][dim_in - 1] = int(keep_in[start:start + length].sum())


def _fold_norms(graph: Graph) -> Graph:
    """Each BatchNorm that alone reads a conv or Linear, folded into it (inference: the layer's rows scaled by
    γ/σ, its bias shifted): one step fewer, exactly the same function up to rounding."""
    users = graph.consumers()
    renamed: dict[str, str] = {}
    for node in list(graph.nodes.values()):
        node.inputs = [renamed.get(i, i) for i in node.inputs]
        layer = graph.nodes[node.inputs[0]] if node.inputs else None
        if node.role != NORM or not isinstance(node.module, nn.modules.batchnorm._BatchNorm) or \
                node.module.running_var is None or layer.role not in WEIGHTED + (DEPTHWISE,) or \
                users[layer.name] != [node.name] or (layer.role == CONV and len(layer.out_shape) != 4) or \
                (node.module.weight is None and layer.module.bias is None):  # a bias would add parameters
            continue
        bn, m = node.module, layer.module
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.weight is not None:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        with torch.no_grad():
            bias = m.bias * scale + shift if m.bias is not None else shift
            m.weight = _param(m.weight * scale.view(-1, *[1] * (m.weight.dim() - 1)), m.weight)
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=m.weight.requires_grad)
        renamed[node.name] = layer.name
        del graph.nodes[node.name]
    return Graph(graph.nodes, renamed.get(graph.output, graph.output))


def _gather(graph: Graph, units, remove: torch.Tensor) -> list[tuple[str, IndexSelect, list[str]]]:
    """Gathers to insert: the model input's kept channels, and the features each Linear reads."""
    out = []
    keep = ~remove[units.of[graph.input]]
    if not bool(keep.all()):
        out.append((graph.input, IndexSelect(1, keep.nonzero().flatten()), None))
    for node in graph.nodes.values():
        if node.role == LINEAR and len(node.in_shapes[0]) == 2:
            read = node.module.weight.detach().ne(0).any(0)
            if not bool(read.all()):
                if not bool(read.any()):
                    read[0] = True
                index = read.nonzero().flatten()
                with torch.no_grad():
                    _slice_cols(node.module, index)
                out.append((node.inputs[0], IndexSelect(1, index), [node.name]))
    return out


def _steps(graph: Graph, gathers: list, batch: int, lowered_below: float | str) -> list[tuple]:
    """The graph as CompactNet steps, gathers placed right after their source, convs lowered."""
    taken = set(graph.nodes) | {CompactNet.INPUT}
    after: dict[str, list[tuple[str, IndexSelect]]] = {}
    redirect: dict[tuple[str | None, str], str] = {}  # (reader or None for all, source) → gather step
    for source, gather, users in gathers:
        name = "input_gather" if users is None else f"{users[0]}_inputs"
        while name in taken:
            name += "_"
        taken.add(name)
        after.setdefault(source, []).append((name, gather))
        for user in users or [None]:
            redirect[user, source] = name

    def ref(reader: str | None, source: str) -> str:
        name = redirect.get((reader, source)) or redirect.get((None, source)) or source
        return CompactNet.INPUT if name == graph.input else name

    steps: list[tuple] = []
    for node in graph.nodes.values():
        if node.role != INPUT:
            module = node.module
            if node.role == CONV:
                module = lower_conv(module, lowered_below, (batch, module.in_channels, *node.in_shapes[0][2:]))
            module = fast_form(module)
            steps.append((node.name, module, [ref(node.name, i) for i in node.inputs]))
        for name, gather in after.get(node.name, []):  # a gather for one reader reads the one for all, if any
            whole = redirect.get((None, node.name))
            source = whole if whole not in (None, name) else node.name
            steps.append((name, gather, [CompactNet.INPUT if source == graph.input else source]))
    if steps[-1][0] != graph.output:
        raise RuntimeError("internal error: the output step is not the last")
    return steps


def _choose_layout(net: CompactNet, x: torch.Tensor, channels_last: bool | str) -> None:
    if channels_last not in (True, False, "measure"):
        raise ValueError(f"channels_last must be True, False or 'measure', got {channels_last!r}")
    if channels_last == "measure":
        if x.dim() != 4 or not tunable(x) or not any(p.dim() == 4 for p in net.parameters()):
            return
        other = copy.deepcopy(net).use_channels_last()
        channels_last = pick_fastest([lambda: net(x), lambda: other(x)]) == 1
    if channels_last:
        net.use_channels_last()


GROUPED = ("pad", "keep", "measure")


def _compacted(work: nn.Module, example_input: torch.Tensor, lowered_below: float | str, fold_norms: bool,
               grouped: str) -> tuple[CompactNet, torch.Tensor, bool]:
    """``work`` (a copy in eval mode, changed in place) as a CompactNet in NCHW, ``work``'s output before, and
    whether some grouped conv keeps channels only so that every group loses as many (the choice ``grouped``
    makes)."""
    graph = trace_graph(work, example_input)
    with torch.no_grad():
        reference = work(example_input)
        values = _run(graph, example_input)
        graph = _replace_constants(graph, _input_independent(graph), values)
        units, wanted, reads = _removable_units(graph, values)
        remove = _realisable(graph, units, wanted.clone())
        outside, keep = _around_grouped(graph, units, wanted, remove)
        balanced = bool((outside != remove).any())
        if grouped == "keep":  # computed and read as in the model: no ChannelPad, no IndexSelect
            outside, keep = remove, {}
        _fold(graph, units, outside, reads, values)
        _shrink(graph, units, outside, keep)
        if fold_norms:
            graph = _fold_norms(graph)
        gathers = _gather(graph, units, outside) + _regroup_steps(graph, units, remove, outside)
    if graph.nodes[graph.output].role == CONST:
        warnings.warn(f"compact: the output of {type(work).__name__} no longer depends on its input (its zero "
                      "structures cut every path from the input); the compact model is a constant", CollapseWarning,
                      stacklevel=3)
    net = CompactNet(_steps(graph, gathers, example_input.shape[0], lowered_below)).eval()
    net.input_shape = list(example_input.shape[1:])  # one input, without the batch dimension
    return net, reference, balanced


def compact(model: nn.Module, example_input: torch.Tensor, *, lowered_below: float | str = LOWERED_BELOW,
            check: bool = True, fold_norms: bool = True, channels_last: bool | str = "measure",
            grouped: str = "pad") -> CompactNet:
    """A new smaller dense model with the same eval-mode outputs as ``model`` (which is not changed).

    ``example_input`` (a batch of real or random inputs of the right shape) is used to
    trace shapes and to check the result. Works on chains and on residual/branching graphs
    (adds, concatenation, option-A shortcuts): whole channel units are removed from every
    layer that writes or reads them, and steps whose output no longer depends on the input
    (a residual branch with zero convs) become constants. Convs keeping at most
    ``lowered_below`` of their weight-matrix columns become :class:`LoweredConv2d`;
    ``lowered_below="measure"`` instead times both forms of each such conv at the example
    input's size and keeps the faster. With ``fold_norms`` (the default), a BatchNorm that alone reads a
    conv or Linear is folded into it, as inference engines do. Modules keep their names. ``channels_last``
    (True, False, or ``"measure"``, the default: time both layouts on ``example_input`` on the CPU and keep
    channels-last where it is over 10% faster) sets :meth:`CompactNet.use_channels_last`.

    ``grouped`` says what becomes of the channels a grouped conv keeps only so that every group loses as many:
    ``"pad"`` (the default, the fewest multiply-adds) cuts them everywhere else, a :class:`ChannelPad` putting
    their zeros back before the conv and an :class:`IndexSelect` dropping them after it; ``"keep"`` computes and
    reads them as the model does (more multiply-adds, no copies: RegNet ran faster so on the CPU); ``"measure"``
    builds both where they differ, times them on ``example_input`` on the CPU and keeps ``"keep"`` where it is
    over 10% faster.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compact expects an nn.Module, got {type(model).__name__}")
    if grouped not in GROUPED:
        raise ValueError(f"grouped must be one of {', '.join(map(repr, GROUPED))}, got {grouped!r}")
    net, reference, balanced = _compacted(copy.deepcopy(model).eval(), example_input, lowered_below, fold_norms,
                                          "pad" if grouped == "measure" else grouped)
    _choose_layout(net, example_input, channels_last)
    if grouped == "measure" and balanced and tunable(example_input):
        other, _, _ = _compacted(copy.deepcopy(model).eval(), example_input, lowered_below, fold_norms, "keep")
        _choose_layout(other, example_input, channels_last)
        if pick_fastest([lambda: net(example_input), lambda: other(example_input)]) == 1:
            net = other
    if check:
        with torch.no_grad():
            got = net(example_input)
        if got.shape != reference.shape or not torch.allclose(got, reference, rtol=RTOL, atol=ATOL):
            diff = (got - reference).abs().max().item() if got.shape == reference.shape else "shape"
            raise RuntimeError(f"internal error: the compacted model differs from the original (max diff {diff}); "
                               "please report it with the model")
    return net
