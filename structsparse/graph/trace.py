"""Reading a model as a graph of steps (torch.fx), with shapes, and its channel units.

Each step is a module call (``conv1``), a function or method from a short allow-list
(``F.relu``, ``torch.flatten``, ``x.view(n, -1)``, ``a + b``, ``torch.cat`` ...), or one of
:mod:`structsparse.layers` (``Add``, ``Cat``, ``ChannelPad``, ``Constant``). Every step has
a *role* that tells compaction how channels pass through it. Anything else is an error that
names the node.

:func:`channel_units` is the dependency graph of the channels: it follows every channel
(dim 1) through channel-wise steps, residual adds, concatenation and flatten, so that all
the places where one channel lives share one *unit*. A unit can be removed only as a whole:
from every layer that writes it (filters) and every layer that reads it (input columns).
"""
from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..layers import Add, Cat, ChannelPad, Constant, WithinChannelLRN

__all__ = ["Node", "Graph", "trace_graph", "ChannelUnits", "channel_units", "Op", "FUNCTIONS",
           "UnsupportedModelError"]

# Roles: how a step treats the channel dimension (dim 1).
CONV, LINEAR, NORM, ELEMENTWISE, POOL, FLATTEN, DROPOUT, MIXING = (
    "conv", "linear", "norm", "elementwise", "pool", "flatten", "dropout", "mixing")
INPUT, ADD, CAT, CHPAD, CONST = "input", "add", "cat", "chpad", "const"
WEIGHTED = (CONV, LINEAR)
CHANNELWISE = (NORM, ELEMENTWISE, POOL, DROPOUT)


class UnsupportedModelError(ValueError):
    """The model holds an operation or a structure that this version cannot handle."""


def _scalar(fn):
    def run(x, other, reverse=False):
        return fn(other, x) if reverse else fn(x, other)
    return run


# name → (callable taking the tensor first, role). Names are what saved models store.
FUNCTIONS: dict[str, tuple[Callable, str]] = {
    "identity": (lambda x: x, ELEMENTWISE),
    "relu": (F.relu, ELEMENTWISE), "relu6": (F.relu6, ELEMENTWISE), "leaky_relu": (F.leaky_relu, ELEMENTWISE),
    "elu": (F.elu, ELEMENTWISE), "gelu": (F.gelu, ELEMENTWISE), "silu": (F.silu, ELEMENTWISE),
    "sigmoid": (torch.sigmoid, ELEMENTWISE), "tanh": (torch.tanh, ELEMENTWISE),
    "hardtanh": (F.hardtanh, ELEMENTWISE), "hardswish": (F.hardswish, ELEMENTWISE),
    "mul": (_scalar(operator.mul), ELEMENTWISE), "add": (_scalar(operator.add), ELEMENTWISE),
    "sub": (_scalar(operator.sub), ELEMENTWISE), "truediv": (_scalar(operator.truediv), ELEMENTWISE),
    "max_pool2d": (F.max_pool2d, POOL), "avg_pool2d": (F.avg_pool2d, POOL),
    "adaptive_avg_pool2d": (F.adaptive_avg_pool2d, POOL), "adaptive_max_pool2d": (F.adaptive_max_pool2d, POOL),
    "flatten": (torch.flatten, FLATTEN),
    "softmax": (F.softmax, MIXING), "log_softmax": (F.log_softmax, MIXING),
}
_FN_NAMES = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu", F.elu: "elu",
    F.gelu: "gelu", F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
    F.tanh: "tanh", F.hardtanh: "hardtanh", F.hardswish: "hardswish",
    F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d", F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    F.adaptive_max_pool2d: "adaptive_max_pool2d", torch.flatten: "flatten",
    F.softmax: "softmax", torch.softmax: "softmax", F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    F.dropout: "dropout", operator.mul: "mul", operator.add: "add", operator.sub: "sub",
    operator.truediv: "truediv",
}
_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax",
            "log_softmax": "log_softmax", "contiguous": "identity", "flatten": "flatten",
            "view": "flatten", "reshape": "flatten", "mul": "mul", "add": "add", "sub": "sub", "div": "truediv"}
_MODULES: list[tuple[tuple[type, ...], str]] = [
    ((nn.Conv2d,), CONV), ((nn.Linear,), LINEAR), ((nn.BatchNorm1d, nn.BatchNorm2d), NORM),
    ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
      nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Mish, nn.Identity), ELEMENTWISE),
    ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), POOL),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout), DROPOUT),
    ((nn.Flatten,), FLATTEN), ((nn.Softmax, nn.LogSoftmax, nn.LocalResponseNorm), MIXING),
    ((WithinChannelLRN,), POOL),
    ((Add,), ADD), ((Cat,), CAT), ((ChannelPad,), CHPAD), ((Constant,), CONST),
]


class Op(nn.Module):
    """A function step of a compact model, named in :data:`FUNCTIONS`, with constant arguments."""

    def __init__(self, fn: str, kwargs: dict[str, Any] | None = None):
        super().__init__()
        if fn not in FUNCTIONS:
            raise UnsupportedModelError(f"unknown function step {fn!r}; known: {', '.join(sorted(FUNCTIONS))}")
        self.fn, self.kwargs = fn, dict(kwargs or {})
        self._call = FUNCTIONS[fn][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(x, **self.kwargs)

    def extra_repr(self) -> str:
        return f"{self.fn}, {self.kwargs}" if self.kwargs else self.fn


def _module_role(module: nn.Module) -> str | None:
    if isinstance(module, nn.PReLU) and module.num_parameters != 1:
        return None
    for types, role in _MODULES:
        if isinstance(module, types):
            return role
    return None


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node, fx.Node) and "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape")


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return f"node {node.name!r} ({node.op} {target})"


def _function_step(node: fx.Node, gm: fx.GraphModule, x: fx.Node) -> Op:
    """Turn a call_function / call_method node into an Op with constant keyword arguments."""
    if node.op == "call_function":
        name = _FN_NAMES.get(node.target)
    else:
        name = _METHODS.get(node.target)
    if name is None:
        raise UnsupportedModelError(f"{_describe(node)} is not supported")
    in_shape = tuple(x.meta["tensor_meta"].shape)
    out_shape = tuple(node.meta["tensor_meta"].shape)
    if name == "dropout":  # compact models are inference models: dropout is the identity
        return Op("identity")
    if name in ("mul", "add", "sub", "truediv"):
        args = list(node.args) + list(node.kwargs.values())
        consts = [a for a in args if a is not x]
        if len(consts) != 1 or not isinstance(consts[0], (int, float)) or isinstance(consts[0], bool):
            raise UnsupportedModelError(f"{_describe(node)}: only arithmetic with a Python number is supported")
        return Op(name, {"other": consts[0], "reverse": node.args[0] is not x})
    if name == "identity":
        return Op("identity")
    if name == "flatten":
        if out_shape != (in_shape[0], math.prod(in_shape[1:])):
            raise UnsupportedModelError(
                f"{_describe(node)} maps {list(in_shape)} to {list(out_shape)}: only flattening to (N, features) is supported")
        return Op("flatten", {"start_dim": 1})
    if node.op == "call_method":
        kwargs = dict(node.kwargs)
        if len(node.args) > 1:
            kwargs["dim"] = node.args[1]
    else:
        normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if normalized is None:
            raise UnsupportedModelError(f"{_describe(node)}: could not read its arguments")
        kwargs = {k: v for k, v in normalized.kwargs.items() if k not in ("input", "_stacklevel")}
    for k, v in kwargs.items():
        if isinstance(v, fx.Node):
            raise UnsupportedModelError(f"{_describe(node)}: argument {k!r} is computed in the graph, not a constant")
    return Op(name, kwargs)




@dataclass
class Node:
    """One step of a traced model: ``module(*inputs)``, with its output shape (for the example input)."""

    name: str
    role: str
    module: nn.Module | None
    inputs: list[str]
    out_shape: tuple[int, ...]
    in_shapes: list[tuple[int, ...]] = field(default_factory=list)


@dataclass
class Graph:
    """The steps of a model in execution order; ``nodes[0]`` is the input, ``output`` the returned node."""

    nodes: dict[str, Node]
    output: str

    @property
    def input(self) -> str:
        return next(iter(self.nodes))

    def consumers(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in self.nodes}
        for node in self.nodes.values():
            for i in node.inputs:
                out[i].append(node.name)
        return out


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """The tensor arguments in call order, repeated ones repeated (``Add()(y, y)`` reads y twice)."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if _is_tensor(a) else None)
    return out


def _multi_input_step(node: fx.Node, inputs: list[fx.Node]) -> nn.Module | None:
    """``a + b`` and ``torch.cat([a, b], 1)`` as :class:`Add` / :class:`Cat`; None for other nodes."""
    target = node.target
    if node.op == "call_function" and target in (operator.add, torch.add) or \
            node.op == "call_method" and target == "add":
        if len(inputs) == 2 and not node.kwargs:
            shapes = [tuple(a.meta["tensor_meta"].shape) for a in inputs]
            if shapes[0] != shapes[1]:
                raise UnsupportedModelError(f"{_describe(node)} adds tensors of shapes {shapes}: only equal shapes")
            return Add()
    if node.op == "call_function" and target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = len(node.meta["tensor_meta"].shape)
        if not isinstance(dim, int) or dim % rank != 1:
            raise UnsupportedModelError(f"{_describe(node)}: only concatenation along dim 1 (channels) is supported")
        return Cat(1)
    return None


def _is_identity(node: fx.Node, gm: fx.GraphModule) -> bool:
    """nn.Identity, dropout (compact models are inference models), ``x.contiguous()``."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                                            nn.AlphaDropout))
    if node.op == "call_function":
        return node.target is F.dropout
    return node.op == "call_method" and node.target == "contiguous"


def trace_graph(model: nn.Module, example_input: torch.Tensor) -> Graph:
    """The model as a :class:`Graph` of steps with shapes from ``example_input``.

    The model is traced with torch.fx and run once on ``example_input`` (in eval mode; pass
    a copy if its state must not be touched). Errors name the unsupported node or module.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    leaves = (Add, Cat, ChannelPad, Constant, WithinChannelLRN)

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # fx raises many types for untraceable code
        raise UnsupportedModelError(f"torch.fx could not trace {type(model).__name__}: {e}") from e
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as e:
        raise ValueError(
            f"running the model on example_input of shape {list(example_input.shape)} failed: {e}") from e
    finally:
        model.train(was_training)

    taken = {n for n, _ in model.named_modules()}
    names: dict[fx.Node, str] = {}
    nodes: dict[str, Node] = {}
    seen_modules: set[str] = set()

    def fresh(base: str) -> str:
        name = base
        while name in taken or name in nodes:
            name += "_"
        return name

    def add(node: fx.Node, name: str, role: str, module: nn.Module, inputs: list[fx.Node]) -> None:
        names[node] = name
        nodes[name] = Node(name, role, module, [names[a] for a in inputs],
                           tuple(node.meta["tensor_meta"].shape), [tuple(a.meta["tensor_meta"].shape) for a in inputs])

    output = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if nodes:
                raise UnsupportedModelError(f"{_describe(node)}: models with several inputs are not supported")
            name = fresh("input")
            names[node] = name
            nodes[name] = Node(name, INPUT, None, [], tuple(node.meta["tensor_meta"].shape))
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node) or result not in names:
                raise UnsupportedModelError(f"{_describe(node)}: the model must return one tensor")
            output = names[result]
            break
        if not _is_tensor(node):  # shape queries such as x.size(0)
            continue
        inputs = _tensor_args(node)
        if any(a not in names for a in inputs):
            raise UnsupportedModelError(f"{_describe(node)} reads a value that is not a traced tensor")
        if len(inputs) == 1 and _is_identity(node, gm):  # no step: readers read its input
            names[node] = names[inputs[0]]
            continue
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            role = _module_role(module)
            if role is None:
                raise UnsupportedModelError(f"module {node.target!r} ({type(module).__name__}) is not supported")
            if len(inputs) != 1 and role not in (ADD, CAT):
                raise UnsupportedModelError(f"module {node.target!r} is called on {len(inputs)} tensors; expected one")
            if role == FLATTEN and tuple(node.meta["tensor_meta"].shape)[1:] != (math.prod(inputs[0].meta["tensor_meta"].shape[1:]),):
                raise UnsupportedModelError(f"module {node.target!r} must flatten to (N, features)")
            if node.target in seen_modules:
                if role in WEIGHTED + (NORM, CONST):
                    raise UnsupportedModelError(f"module {node.target!r} is called more than once (shared weights)")
                add(node, fresh(node.target), role, copy.deepcopy(module), inputs)  # a stateless step used twice
            else:
                seen_modules.add(node.target)
                add(node, node.target, role, module, inputs)
        elif node.op in ("call_function", "call_method"):
            if len(inputs) > 1:
                module = _multi_input_step(node, inputs)
                if module is None:
                    raise UnsupportedModelError(
                        f"{_describe(node)} reads {[a.name for a in inputs]}: only additions of equal shapes and "
                        "concatenation along channels can combine tensors")
                add(node, fresh(node.name), ADD if isinstance(module, Add) else CAT, module, inputs)
            elif len(inputs) == 1:
                op = _function_step(node, gm, inputs[0])
                add(node, fresh(node.name), FUNCTIONS[op.fn][1], op, inputs)
            else:
                raise UnsupportedModelError(f"{_describe(node)} creates a tensor from no input")
        else:
            raise UnsupportedModelError(f"{_describe(node)} is not supported")
    if output is None or output == next(iter(nodes), None):
        raise UnsupportedModelError(f"{type(model).__name__}: the model must compute its output from its input")
    return Graph(nodes, output)


# ---- channel units -------------------------------------------------------------------------

@dataclass
class ChannelUnits:
    """Which channels (dim-1 entries) of all tensors are one and the same channel.

    ``of[node]`` holds the unit of each dim-1 entry of the node's output (for a flattened
    tensor, each feature has the unit of the channel it came from). ``pinned[u]`` is True
    for units that cannot be removed (they reach the model output, feed a step that mixes
    channels, or touch a grouped conv). ``readers`` lists the Conv2d/Linear nodes: each reads
    the units ``of_input[node]`` (its columns) and writes the units ``of[node]`` (its rows).
    """

    of: dict[str, torch.Tensor]
    count: int
    pinned: torch.Tensor
    readers: list[str]
    of_input: dict[str, torch.Tensor]  # reader → the units of its input

    def reader_count(self) -> torch.Tensor:
        """How many layers read each unit (a unit read by two or more layers is *coupled*)."""
        counts = torch.zeros(self.count, dtype=torch.long)
        for r in self.readers:
            counts[self.of_input[r].unique()] += 1
        return counts


def _pin_all(node: Node) -> bool:
    """Whether a weighted node's channels cannot be removed (grouped conv, Linear not on (N, features))."""
    if node.role == CONV:
        return node.module.groups != 1 or len(node.out_shape) != 4
    if node.role == LINEAR:
        return len(node.out_shape) != 2 or len(node.in_shapes[0]) != 2
    return False


def channel_units(graph: Graph) -> ChannelUnits:
    """Follow every channel through the graph; see :class:`ChannelUnits`."""
    parent: list[int] = []

    def new(n: int) -> torch.Tensor:
        start = len(parent)
        parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    of: dict[str, torch.Tensor] = {}
    pinned_ids: list[torch.Tensor] = []
    readers = []
    for node in graph.nodes.values():
        width = node.out_shape[1] if len(node.out_shape) > 1 else 1
        ins = [of[i] for i in node.inputs]
        if node.role in CHANNELWISE and len(node.out_shape) == len(node.in_shapes[0]):
            of[node.name] = ins[0]
        elif node.role == FLATTEN:
            src = ins[0]
            of[node.name] = src.repeat_interleave(width // src.numel()) if len(node.in_shapes[0]) > 2 else src
        elif node.role == ADD:
            for other in ins[1:]:
                for a, b in zip(ins[0].tolist(), other.tolist()):
                    ra, rb = find(a), find(b)
                    if ra != rb:
                        parent[rb] = ra
            of[node.name] = ins[0]
        elif node.role == CAT:
            of[node.name] = torch.cat(ins)
        elif node.role == CHPAD:
            out = new(width)
            out[node.module.index] = ins[0]
            of[node.name] = out
        else:  # input, const, conv, linear, mixing, and anything that makes new channels
            of[node.name] = new(width)
            if node.role in WEIGHTED:
                readers.append(node.name)
                if _pin_all(node):
                    pinned_ids += [ins[0], of[node.name]]
            elif node.role != INPUT and node.role != CONST:
                pinned_ids += ins + [of[node.name]]
    pinned_ids.append(of[graph.output])
    roots = torch.tensor([find(i) for i in range(len(parent))], dtype=torch.long)
    _, compact_ids = torch.unique(roots, return_inverse=True)
    count = int(compact_ids.max()) + 1 if len(parent) else 0
    of = {k: compact_ids[v] for k, v in of.items()}
    pinned = torch.zeros(count, dtype=torch.bool)
    for ids in pinned_ids:
        pinned[compact_ids[ids]] = True
    return ChannelUnits(of, count, pinned, readers, {r: of[graph.nodes[r].inputs[0]] for r in readers})
