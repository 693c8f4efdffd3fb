"""Reading a model as a graph of steps (torch.fx), with shapes.

Each step is a module call (``conv1``), a function or method with a rule in :mod:`.ops` (``F.relu``,
``torch.flatten``, ``x.permute(0, 2, 3, 1)``, ``a + b``, ``torch.cat`` ...), a parameter read as a tensor,
or one of :mod:`structsparse.layers`. Every step has a *role* that tells compaction how channels pass
through it. A step with no rule is kept as the model's own code (:class:`Traced`, role ``opaque``): the
channels it touches stay and the rest of the model compacts. Errors are left for what cannot be a graph of
steps: several inputs, a non-tensor output, weights shared between calls.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..layers import Add, Cat, ChannelPad, Constant, IndexSelect, Param, SelfAttention, SlicedLayerNorm, WithinChannelLRN
from .ops import (ADD, ATTENTION, CAT, CONST, DEPTHWISE, FLATTEN, FUNCTIONS, INPUT, LAYERNORM, LINEAR, MIXING, MOVE, NORM,
                  OPAQUE, PARAM, WEIGHTED, Op, UnsupportedModelError, describe, target_name,
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
    batched: bool = True  # False for a parameter and what is computed from parameters only


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
    graph = Graph(builder.nodes, output)
    _permutations(graph)
    return graph


def _permutations(graph: Graph) -> None:
    """Each chain of moves that, all together, only reorders one dim (a channel shuffle: view to groups,
    transpose, view back) becomes one :class:`IndexSelect` with that order, from which any channel can be cut."""
    users = graph.consumers()
    for last in list(graph.nodes.values()):
        if last.name not in graph.nodes or last.role != MOVE or not isinstance(last.module, Op):
            continue
        chain = [last]
        while (prev := graph.nodes[chain[0].inputs[0]]).role == MOVE and isinstance(prev.module, Op) \
                and len(users[prev.name]) == 1:
            chain.insert(0, prev)
        shape = chain[0].in_shapes[0]
        if len(chain) < 2 or last.out_shape != shape or not last.batched:
            continue
        index = torch.arange(math.prod(shape[1:])).view(1, *shape[1:])
        out = index
        for node in chain:
            out = node.module(out)
        for d in range(1, len(shape)):
            order = out.movedim(d, 0).reshape(shape[d], -1)[:, 0] // index.stride(d)
            if torch.equal(index.index_select(d, order), out) and not torch.equal(order, torch.arange(shape[d])):
                for node in chain[:-1]:
                    del graph.nodes[node.name]
                graph.nodes[last.name] = Node(last.name, MOVE, IndexSelect(d, order), list(chain[0].inputs),
                                              last.out_shape, [shape], True)
                break


_LEAVES = (Add, Cat, ChannelPad, Constant, IndexSelect, Param, SlicedLayerNorm, WithinChannelLRN)


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
            gm = fx.GraphModule(model, _Tracer().trace(model, concrete_args=_defaults(model)))
        except Exception as e:  # fx raises many types for untraceable code
            raise UnsupportedModelError(f"torch.fx could not trace {type(model).__name__}: {e}") from e
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(example_input)
        except Exception as e:
            raise ValueError(
                f"running the model on example_input of shape {list(example_input.shape)} failed: {e}") from e
    return gm


def _defaults(model: nn.Module) -> dict | None:
    """The forward's optional arguments after the input (timm's ``attn_mask=None`` ...), fixed at their
    defaults: the graph is that of ``model(x)``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    fixed = {p.name: p.default for p in params if p.default is not p.empty
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return fixed or None


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


class Traced(nn.Module):
    """A step with no channel rule, kept as the model's own code: an fx graph of the node (and of the shape
    arithmetic its arguments need) that reads the step's inputs. ``compact`` keeps the channels it touches.
    ``shape_only[i]`` is True for an input read only for its batch size (``x.shape[0]``)."""

    def __init__(self, gm: fx.GraphModule, what: str, shape_only: list[bool]):
        super().__init__()
        self.gm, self.what, self.shape_only = gm, what, shape_only

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.gm(*xs)

    def extra_repr(self) -> str:
        return self.what


def _shape_only(placeholder: fx.Node) -> bool:
    """An input read only for its batch size (``x.shape[0]``, ``x.size(0)``)."""
    def batch(u: fx.Node) -> bool:
        if u.op == "call_method" and u.target == "size":
            return u.args[1:] == (0,) or u.kwargs == {"dim": 0}
        return u.op == "call_function" and u.target is getattr and u.args[1] == "shape" and all(
            v.op == "call_function" and v.target is operator.getitem and v.args[1] == 0 for v in u.users)
    return all(batch(u) for u in placeholder.users)


def _what(node: fx.Node, gm: fx.GraphModule) -> str:
    """What a step kept as code runs: its module's type, or its function or method."""
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    return target_name(node)


def _linear(p: dict, c: dict, shape) -> tuple[nn.Module, str]:
    w = p["weight"]
    return nn.Linear(w.shape[1], w.shape[0], bias="bias" in p), LINEAR


def _conv2d(p: dict, c: dict, shape) -> tuple[nn.Module, str]:
    w, groups = p["weight"], c.get("groups", 1)
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), c.get("stride", 1), c.get("padding", 0),
                     c.get("dilation", 1), groups, bias="bias" in p)
    return conv, module_role(conv)


def _batch_norm(p: dict, c: dict, shape) -> tuple[nn.Module, str]:
    if c.get("training") or set(p) != {"running_mean", "running_var", "weight", "bias"} or len(shape) not in (2, 4):
        raise ValueError("not an affine BatchNorm in eval mode")
    cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    return cls(shape[1], eps=c.get("eps", 1e-5)), NORM


def _layer_norm(p: dict, c: dict, shape) -> tuple[nn.Module, str]:
    dims = c["normalized_shape"]
    if not all(isinstance(d, int) for d in dims):
        raise ValueError("a computed shape")
    return nn.LayerNorm(list(dims), c.get("eps", 1e-5), "weight" in p, bias="bias" in p), LAYERNORM


def _share(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make the model's own parameters and buffers ``module``'s, so that what is done to the graph's step (a
    penalty, a zeroed group) is done to the model."""
    for name, value in tensors.items():
        if isinstance(value, nn.Parameter):
            setattr(module, name, value)
        else:
            module.register_buffer(name, value)


# The functional layers that become modules when their weights are the model's parameters.
_FUNCTIONAL = {F.linear: _linear, F.conv2d: _conv2d, F.batch_norm: _batch_norm, F.layer_norm: _layer_norm}

_SPLITS = {"chunk", "split", "tensor_split", torch.chunk, torch.split, torch.tensor_split}


class _Builder:
    """Turns fx nodes into :class:`Node` steps, one at a time, in execution order. A node with no channel
    rule becomes a :class:`Traced` step (role ``opaque``): the model still compacts around it."""

    def __init__(self, gm: fx.GraphModule, taken: set[str]):
        self.gm, self.taken = gm, taken
        self.names: dict[fx.Node, str] = {}
        self.nodes: dict[str, Node] = {}
        self.seen_modules: set[str] = set()
        self.input: fx.Node | None = None

    def fresh(self, base: str) -> str:
        name = base
        while name in self.taken or name in self.nodes:
            name += "_"
        return name

    def add(self, node: fx.Node, name: str, role: str, module: nn.Module | None, inputs: list[fx.Node]) -> None:
        self.names[node] = name
        batched = role == INPUT or any(self.nodes[self.names[a]].batched for a in inputs)
        self.nodes[name] = Node(name, role, module, [self.names[a] for a in inputs],
                                tuple(node.meta["tensor_meta"].shape),
                                [tuple(a.meta["tensor_meta"].shape) for a in inputs], batched)

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        """The traced tensors a node reads; a parameter read for the first time becomes a step."""
        inputs = _tensor_args(node)
        for a in inputs:
            if a not in self.names and a.op == "get_attr":
                self.param(a)
        return inputs

    def param(self, a: fx.Node) -> None:
        """A parameter or buffer that the graph reads as a tensor: a :class:`Param` step (no batch dimension)."""
        value = fx.graph_module._get_attr(self.gm, a.target)
        owner = self.gm.get_submodule(a.target.rpartition(".")[0]) if "." in a.target else self.gm
        name = self.fresh(a.target if any(True for _ in owner.children()) else a.target.replace(".", "_"))
        self.names[a] = name
        source = self.nodes[self.names[self.input]]
        self.nodes[name] = Node(name, PARAM, Param(value), [source.name], tuple(value.shape), [source.out_shape], False)

    def step(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            if self.nodes and node.args:  # an optional argument fixed at its default (see _defaults)
                return
            if self.nodes:
                raise UnsupportedModelError(f"{describe(node)}: models with several inputs are not supported")
            self.input = node
            self.add(node, self.fresh("input"), INPUT, None, [])
            return
        if not _is_tensor(node) or node.op == "get_attr":  # shape queries such as x.size(0); tuples; parameters
            return
        values = [a for a in _tensor_args(node) if a.op != "get_attr"]
        if node.op == "call_function" and node.target in _FUNCTIONAL and values:  # parameters become the module's
            self.functional(node, values)
            return
        inputs = self.tensor_args(node)
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] not in self.names:
            if not self.attention(node):
                self.split_step(node)
        elif len(inputs) == 1 and is_identity(node, self.gm):  # no step: readers read its input
            self.names[node] = self.names[inputs[0]]
        elif node.op == "call_module":
            self.module_step(node, inputs)
        elif node.op in ("call_function", "call_method") and inputs:
            self.function_step(node, inputs)
        else:
            self.opaque(node)

    def module_step(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        module = self.gm.get_submodule(node.target)
        role = module_role(module)
        if role is None or (len(inputs) != 1 and role not in (ADD, CAT)) or node.kwargs or any(
                isinstance(a, fx.Node) and not _is_tensor(a) for a in node.args):
            self.opaque(node)
            return
        if role == FLATTEN and tuple(node.meta["tensor_meta"].shape)[1:] != \
                (math.prod(inputs[0].meta["tensor_meta"].shape[1:]),):
            self.opaque(node)
            return
        if node.target in self.seen_modules:
            if role in WEIGHTED + (NORM, CONST, DEPTHWISE, LAYERNORM, MIXING):
                raise UnsupportedModelError(f"module {node.target!r} is called more than once (shared weights)")
            self.add(node, self.fresh(node.target), role, copy.deepcopy(module), inputs)  # a stateless step used twice
        else:
            self.seen_modules.add(node.target)
            self.add(node, node.target, role, module, inputs)

    def function_step(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        module = multi_input_step(node, inputs) if len(inputs) > 1 else function_step(node, self.gm, inputs[0])
        if module is None:
            self.opaque(node)
        else:
            role = FUNCTIONS[module.fn][1] if isinstance(module, Op) else module_role(module)
            self.add(node, self.fresh(node.name), role, module, inputs)

    def functional(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        """A functional layer whose weights are the model's parameters -- ``F.linear``, ``F.conv2d``,
        ``F.batch_norm`` (eval), ``F.layer_norm``, as timm and torchvision write them -- as the module it is.
        Arguments computed in the graph keep it as code."""
        normalized = node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True)  # builtins too
        bound = normalized.kwargs if normalized is not None else \
            inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
        tensors = {k: v for k, v in bound.items() if isinstance(v, fx.Node)}
        consts = {k: v for k, v in bound.items() if not isinstance(v, fx.Node)}
        if tensors.pop("input", None) is not inputs[0] or not all(v.op == "get_attr" for v in tensors.values()):
            self.opaque(node)
            return
        params = {k: fx.graph_module._get_attr(self.gm, v.target) for k, v in tensors.items()}
        try:
            module, role = _FUNCTIONAL[node.target](params, consts, inputs[0].meta["tensor_meta"].shape)
        except (KeyError, TypeError, ValueError):   # a form the module cannot express (training BatchNorm ...)
            self.opaque(node)
            return
        _share(module, params)
        module.eval()  # the graph is the model's inference
        owner = next(iter(tensors.values())).target.rpartition(".")[0] if tensors else ""
        leaf = owner and not any(True for _ in self.gm.get_submodule(owner).children())
        name = owner if leaf and owner not in self.nodes else self.fresh(f"{owner}.{node.target.__name__}"
                                                                         if owner else node.name)
        self.add(node, name, role, module, [inputs[0]])

    def attention(self, node: fx.Node) -> bool:
        """``mha(x, x, x, need_weights=False)[0]`` of a batch-first ``nn.MultiheadAttention`` without masks:
        a :class:`SelfAttention` step (whole heads can go). False for other uses."""
        source, i = node.args
        if source.op != "call_module" or i != 0:
            return False
        mha = self.gm.get_submodule(source.target)
        x = source.args[0] if source.args else None
        if not isinstance(mha, nn.MultiheadAttention) or not mha.batch_first or not mha._qkv_same_embed_dim \
                or mha.bias_k is not None or mha.add_zero_attn or len(source.args) != 3 \
                or any(a is not x for a in source.args) or x not in self.names \
                or source.kwargs not in ({}, {"need_weights": False}) or source.target in self.seen_modules:
            return False
        self.seen_modules.add(source.target)
        self.add(node, source.target, ATTENTION, SelfAttention.from_mha(mha), [x])
        return True

    def split_step(self, node: fx.Node) -> None:
        """Piece i of ``x.chunk(n, d)`` / ``x.split(s, d)`` as ``take``; other tuples stay code."""
        source, i = node.args
        x = source.args[0] if source.args else None
        metas = source.meta.get("tensor_meta")
        if source.target not in _SPLITS or not isinstance(i, int) or x not in self.names \
                or not isinstance(metas, (tuple, list)):
            self.opaque(node)
            return
        dim = source.kwargs.get("dim", source.args[2] if len(source.args) > 2 else 0)
        shape = tuple(x.meta["tensor_meta"].shape)
        if not isinstance(dim, int) or dim % len(shape) == 0:
            self.opaque(node)
            return
        dim %= len(shape)
        begin = sum(m.shape[dim] for m in metas[:i])
        start = [begin if d == dim else 0 for d in range(1, dim + 1)]
        length = [metas[i].shape[dim] if d == dim else shape[d] for d in range(1, dim + 1)]
        self.add(node, self.fresh(node.name), MOVE, Op("take", {"start": start, "length": length}), [x])

    def opaque(self, node: fx.Node) -> None:
        """``node`` kept as code (:class:`Traced`), with the shape arithmetic its arguments need."""
        graph, env, inputs = fx.Graph(), {}, []

        def copy_arg(a: fx.Node) -> fx.Node:
            if a not in env:
                if a in self.names or (a.op == "get_attr" and _is_tensor(a)):
                    if a not in self.names:
                        self.param(a)
                    inputs.append(a)
                    env[a] = graph.placeholder(f"x{len(inputs) - 1}")
                elif a.op == "placeholder":
                    raise UnsupportedModelError(f"{describe(node)} reads a value that is not a traced tensor")
                else:
                    env[a] = graph.node_copy(a, copy_arg)
            return env[a]

        graph.output(graph.node_copy(node, copy_arg))
        gm = fx.GraphModule(self.gm, graph)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        module = Traced(gm, _what(node, self.gm), [_shape_only(p) for p in placeholders])
        own = node.op == "call_module" and node.target not in self.seen_modules and node.target not in self.nodes
        if own:
            self.seen_modules.add(node.target)
        self.add(node, node.target if own else self.fresh(node.name), OPAQUE, module, inputs)
