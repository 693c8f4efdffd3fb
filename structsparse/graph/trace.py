"""Reading a model as a graph of steps (torch.fx), with shapes.

Each step is a module call (``conv1``), a function or method with a rule in :mod:`.ops` (``F.relu``,
``torch.flatten``, ``x.view(n, -1)``, ``a + b``, ``torch.cat`` ...), or one of :mod:`structsparse.layers`
(``Add``, ``Cat``, ``ChannelPad``, ``Constant``). Every step has a *role* that tells compaction how
channels pass through it. Anything else is an error that names the node.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..layers import Add, Cat, ChannelPad, Constant, WithinChannelLRN
from .ops import (ADD, CAT, CONST, DEPTHWISE, FLATTEN, FUNCTIONS, INPUT, NORM, WEIGHTED, UnsupportedModelError, describe,
                  function_step, is_identity, module_role, multi_input_step)

__all__ = ["Node", "Graph", "trace_graph"]


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


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node, fx.Node) and "tensor_meta" in node.meta and hasattr(node.meta["tensor_meta"], "shape")


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """The tensor arguments in call order, repeated ones repeated (``Add()(y, y)`` reads y twice)."""
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: out.append(a) if _is_tensor(a) else None)
    return out


def trace_graph(model: nn.Module, example_input: torch.Tensor) -> Graph:
    """The model as a :class:`Graph` of steps with shapes from ``example_input``.

    The model is traced with torch.fx and run once on ``example_input`` (in eval mode; pass
    a copy if its state must not be touched). Errors name the unsupported node or module.
    """
    gm = _fx_trace(model, example_input)
    builder = _Builder(gm, {n for n, _ in model.named_modules()})
    output = None
    for node in gm.graph.nodes:
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, fx.Node) or result not in builder.names:
                raise UnsupportedModelError(f"{describe(node)}: the model must return one tensor")
            output = builder.names[result]
            break
        builder.step(node)
    if output is None or output == next(iter(builder.nodes), None):
        raise UnsupportedModelError(f"{type(model).__name__}: the model must compute its output from its input")
    return Graph(builder.nodes, output)


_LEAVES = (Add, Cat, ChannelPad, Constant, WithinChannelLRN)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _fx_trace(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """The fx graph of ``model`` in eval mode (the graph of inference: dropout, drop-path and stochastic depth
    are identities there), with every node's output shape for ``example_input``."""
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    with _eval_mode(model):
        try:
            gm = fx.GraphModule(model, _Tracer().trace(model))
        except Exception as e:  # fx raises many types for untraceable code
            raise UnsupportedModelError(f"torch.fx could not trace {type(model).__name__}: {e}") from e
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example_input)
        except Exception as e:
            raise ValueError(
                f"running the model on example_input of shape {list(example_input.shape)} failed: {e}") from e
    return gm


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode, every module's own mode restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _Builder:
    """Turns fx nodes into :class:`Node` steps, one at a time, in execution order."""

    def __init__(self, gm: fx.GraphModule, taken: set[str]):
        self.gm, self.taken = gm, taken
        self.names: dict[fx.Node, str] = {}
        self.nodes: dict[str, Node] = {}
        self.seen_modules: set[str] = set()

    def fresh(self, base: str) -> str:
        name = base
        while name in self.taken or name in self.nodes:
            name += "_"
        return name

    def add(self, node: fx.Node, name: str, role: str, module: nn.Module | None, inputs: list[fx.Node]) -> None:
        self.names[node] = name
        self.nodes[name] = Node(name, role, module, [self.names[a] for a in inputs],
                                tuple(node.meta["tensor_meta"].shape),
                                [tuple(a.meta["tensor_meta"].shape) for a in inputs])

    def step(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if self.nodes:
                raise UnsupportedModelError(f"{describe(node)}: models with several inputs are not supported")
            self.add(node, self.fresh("input"), INPUT, None, [])
            return
        if not _is_tensor(node):  # shape queries such as x.size(0)
            return
        inputs = _tensor_args(node)
        if any(a not in self.names for a in inputs):
            raise UnsupportedModelError(f"{describe(node)} reads a value that is not a traced tensor")
        if len(inputs) == 1 and is_identity(node, self.gm):  # no step: readers read its input
            self.names[node] = self.names[inputs[0]]
        elif node.op == "call_module":
            self.module_step(node, inputs)
        elif node.op in ("call_function", "call_method"):
            self.function_step(node, inputs)
        else:
            raise UnsupportedModelError(f"{describe(node)} is not supported")

    def module_step(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        module = self.gm.get_submodule(node.target)
        role = module_role(module)
        if role is None:
            raise UnsupportedModelError(f"module {node.target!r} ({type(module).__name__}) is not supported")
        if len(inputs) != 1 and role not in (ADD, CAT):
            raise UnsupportedModelError(f"module {node.target!r} is called on {len(inputs)} tensors; expected one")
        if role == FLATTEN and tuple(node.meta["tensor_meta"].shape)[1:] != \
                (math.prod(inputs[0].meta["tensor_meta"].shape[1:]),):
            raise UnsupportedModelError(f"module {node.target!r} must flatten to (N, features)")
        if node.target in self.seen_modules:
            if role in WEIGHTED + (NORM, CONST, DEPTHWISE):
                raise UnsupportedModelError(f"module {node.target!r} is called more than once (shared weights)")
            self.add(node, self.fresh(node.target), role, copy.deepcopy(module), inputs)  # a stateless step used twice
        else:
            self.seen_modules.add(node.target)
            self.add(node, node.target, role, module, inputs)

    def function_step(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        if len(inputs) > 1:
            module = multi_input_step(node, inputs)
            if module is None:
                raise UnsupportedModelError(
                    f"{describe(node)} reads {[a.name for a in inputs]}: only additions, subtractions, products and "
                    "quotients (of equal shapes or shapes that broadcast) and concatenation along channels can "
                    "combine tensors")
            self.add(node, self.fresh(node.name), module_role(module), module, inputs)
        elif len(inputs) == 1:
            op = function_step(node, self.gm, inputs[0])
            self.add(node, self.fresh(node.name), FUNCTIONS[op.fn][1], op, inputs)
        else:
            raise UnsupportedModelError(f"{describe(node)} creates a tensor from no input")
