"""How a channel passes through each operation: one rule per operation, grouped by family.

Every step of a traced model gets a *role* that tells channel tracking (:mod:`.units`) and compaction
how its channels relate to its inputs':

* elementwise and broadcast with a number (``relu``, ``x * 0.5`` ...): entry for entry;
* pooling, BatchNorm and depthwise convs (one filter per channel): per channel of dim 1;
* reductions (``x.mean((2, 3))``, ``amax``, ``sum``) over positions keep the channels; over channels
  they mix them;
* moves (``permute``, ``transpose``, ``view``/``reshape``/``flatten``, indexing ``x[:, 0]``, ``chunk``,
  ``split``): entries move, channels are followed to wherever they go (channels-last blocks, tokens,
  a channel shuffle);
* LayerNorm: normalises over its last dims, so those channels stay; softmax, cross-channel LRN and
  GroupNorm mix channels; attention (:class:`~structsparse.layers.SelfAttention`) keeps its channels and
  loses whole heads;
* convolution reads dim 1, Linear its last dim (columns), and both write new channels (rows);
* several inputs: ``a + b`` ties channel c of both, ``torch.cat`` stacks (or, along positions, ties),
  an elementwise op of tensors that broadcast (a squeeze-excite gate ``x * g``, a layer-scale parameter)
  ties the entries that meet;
* a parameter read as a tensor (``self.layer_scale``) is a :class:`~structsparse.layers.Param` step;
* anything else is kept as the model's own code (role ``opaque``), with its channels.

Names in :data:`FUNCTIONS` are what saved compact models store.
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layers import Add, Broadcast, Cat, ChannelPad, Constant, IndexSelect, Param, SelfAttention, SlicedLayerNorm, WithinChannelLRN

__all__ = ["UnsupportedModelError", "FUNCTIONS", "MODULE_ROLES", "Op", "module_role", "function_step",
           "multi_input_step", "is_identity", "describe", "target_name", "feature_dim", "CONV", "LINEAR", "NORM", "ELEMENTWISE", "POOL",
           "FLATTEN", "DROPOUT", "MIXING", "DEPTHWISE", "REDUCE", "INPUT", "ADD", "CAT", "CHPAD", "CONST", "BCAST", "WEIGHTED",
           "LAYERNORM", "MOVE", "PARAM", "OPAQUE", "ATTENTION", "move_step", "describe_step"]

# Roles: how a step treats the channel dimension (dim 1).
CONV, LINEAR, NORM, ELEMENTWISE, POOL, FLATTEN, DROPOUT, MIXING, DEPTHWISE, REDUCE = (
    "conv", "linear", "norm", "elementwise", "pool", "flatten", "dropout", "mixing", "depthwise", "reduce")
INPUT, ADD, CAT, CHPAD, CONST, BCAST = "input", "add", "cat", "chpad", "const", "broadcast"
LAYERNORM, MOVE, PARAM, OPAQUE, ATTENTION = "layernorm", "move", "param", "opaque", "attention"
WEIGHTED = (CONV, LINEAR)


class UnsupportedModelError(ValueError):
    """The model holds an operation or a structure that this version cannot handle."""


def _scalar(fn):
    def run(x, other, reverse=False):
        return fn(other, x) if reverse else fn(x, other)
    return run


def _reshape(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    return x.reshape(x.shape[0], *shape)


def _take(x: torch.Tensor, start: list[int], length: list[int]) -> torch.Tensor:
    """Entries ``start[d] .. start[d] + length[d]`` of dim d + 1 (length 0: entry ``start[d]``, dropping the dim)."""
    for d in reversed(range(len(start))):
        x = x.select(d + 1, start[d]) if length[d] == 0 else x.narrow(d + 1, start[d], length[d])
    return x


# name → (callable taking the tensor first, role). Names are what saved models store.
FUNCTIONS: dict[str, tuple[Callable, str]] = {
    "identity": (lambda x: x, ELEMENTWISE),
    "relu": (F.relu, ELEMENTWISE), "relu6": (F.relu6, ELEMENTWISE), "leaky_relu": (F.leaky_relu, ELEMENTWISE),
    "elu": (F.elu, ELEMENTWISE), "gelu": (F.gelu, ELEMENTWISE), "silu": (F.silu, ELEMENTWISE),
    "sigmoid": (torch.sigmoid, ELEMENTWISE), "tanh": (torch.tanh, ELEMENTWISE),
    "hardtanh": (F.hardtanh, ELEMENTWISE), "hardswish": (F.hardswish, ELEMENTWISE),
    "hardsigmoid": (F.hardsigmoid, ELEMENTWISE),
    "mul": (_scalar(operator.mul), ELEMENTWISE), "add": (_scalar(operator.add), ELEMENTWISE),
    "sub": (_scalar(operator.sub), ELEMENTWISE), "truediv": (_scalar(operator.truediv), ELEMENTWISE),
    "max_pool2d": (F.max_pool2d, POOL), "avg_pool2d": (F.avg_pool2d, POOL),
    "adaptive_avg_pool2d": (F.adaptive_avg_pool2d, POOL), "adaptive_max_pool2d": (F.adaptive_max_pool2d, POOL),
    "flatten": (torch.flatten, FLATTEN),
    "mean": (torch.mean, REDUCE), "amax": (torch.amax, REDUCE), "sum": (torch.sum, REDUCE),
    "softmax": (F.softmax, MIXING), "log_softmax": (F.log_softmax, MIXING),
    "permute": (torch.permute, MOVE), "reshape": (_reshape, MOVE), "take": (_take, MOVE),
}
_FN_NAMES = {
    F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.leaky_relu: "leaky_relu", F.elu: "elu",
    F.gelu: "gelu", F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
    F.tanh: "tanh", F.hardtanh: "hardtanh", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid",
    torch.mean: "mean", torch.amax: "amax", torch.sum: "sum",
    F.max_pool2d: "max_pool2d", F.avg_pool2d: "avg_pool2d", F.adaptive_avg_pool2d: "adaptive_avg_pool2d",
    F.adaptive_max_pool2d: "adaptive_max_pool2d", torch.flatten: "flatten",
    F.softmax: "softmax", torch.softmax: "softmax", F.log_softmax: "log_softmax", torch.log_softmax: "log_softmax",
    F.dropout: "dropout", operator.mul: "mul", operator.add: "add", operator.sub: "sub",
    operator.truediv: "truediv",
}
_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "softmax": "softmax",
            "log_softmax": "log_softmax", "contiguous": "identity", "mul": "mul", "add": "add", "sub": "sub", "div": "truediv",
            "mean": "mean", "amax": "amax", "sum": "sum"}
MODULE_ROLES: list[tuple[tuple[type, ...], str]] = [
    ((nn.Conv2d,), CONV), ((nn.Linear,), LINEAR), ((nn.BatchNorm1d, nn.BatchNorm2d), NORM),
    ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
      nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Mish, nn.Identity), ELEMENTWISE),
    ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), POOL),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout), DROPOUT),
    ((nn.Flatten,), FLATTEN), ((nn.Softmax, nn.LogSoftmax, nn.LocalResponseNorm, nn.GroupNorm), MIXING),
    ((nn.LayerNorm, SlicedLayerNorm), LAYERNORM), ((SelfAttention,), ATTENTION),
    ((WithinChannelLRN,), POOL), ((IndexSelect,), MOVE),
    ((Add,), ADD), ((Cat,), CAT), ((Broadcast,), BCAST), ((ChannelPad,), CHPAD), ((Constant,), CONST), ((Param,), PARAM),
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


def module_role(module: nn.Module) -> str | None:
    """The role of a module step, or ``None`` for a module with no rule."""
    if isinstance(module, nn.PReLU) and module.num_parameters != 1:
        return None
    if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels == module.out_channels:
        return DEPTHWISE
    for types, role in MODULE_ROLES:
        if isinstance(module, types):
            return role
    return None


def describe_step(node) -> str:
    """Why a traced step keeps its channels (a step with no channel rule, or one that mixes channels)."""
    if node.role == OPAQUE:
        return f"no channel rule for {node.module.what}"
    if node.role == ATTENTION:
        return "attention keeps its input and output channels (whole heads go)"
    return f"a {node.role} step mixes channels"


def target_name(node: fx.Node) -> str:
    """The name of what an fx node calls: a method or module path, or a function's name."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))


def describe(node: fx.Node) -> str:
    """``node 'x' (call_function relu)``: how errors name a node."""
    return f"node {node.name!r} ({node.op} {target_name(node)})"


def feature_dim(node) -> int:
    """The dim whose entries a step treats as its channels: the last for a Linear (its features), dim 1 for
    a conv, a BatchNorm or a depthwise conv."""
    return len(node.in_shapes[0]) - 1 if node.role == LINEAR else 1


_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", torch.flatten, torch.reshape,
             torch.squeeze, torch.unsqueeze}


def _ints(values) -> list[int] | None:
    values = list(values[0]) if len(values) == 1 and isinstance(values[0], (list, tuple)) else list(values)
    return values if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else None


def _index(index, shape: tuple[int, ...]) -> dict | None:
    """``x[index]`` as :func:`_take` arguments, for an index that keeps the batch and slices with step 1."""
    items = list(index) if isinstance(index, tuple) else [index]
    if not items or items[0] != slice(None) or (Ellipsis in items and items.index(Ellipsis) != len(items) - 1):
        return None
    items = [i for i in items[1:] if i is not Ellipsis]
    start, length = [], []
    for item, size in zip(items, shape[1:]):
        if isinstance(item, int) and not isinstance(item, bool) and -size <= item < size:
            start.append(item % size)
            length.append(0)
        elif isinstance(item, slice) and item.step in (None, 1) and all(
                v is None or isinstance(v, int) for v in (item.start, item.stop)):
            r = range(size)[item]
            if not len(r):
                return None
            start.append(r.start)
            length.append(len(r))
        else:
            return None
    return {"start": start, "length": length} if len(items) <= len(shape) - 1 else None


def move_step(node: fx.Node, x: fx.Node) -> Op | None:
    """A step that only moves entries (reshape, permute, transpose, indexing) as an :data:`FUNCTIONS` op that
    works for any batch size; None if it is not one (or touches the batch dimension)."""
    in_shape, out_shape = tuple(x.meta["tensor_meta"].shape), tuple(node.meta["tensor_meta"].shape)
    target = node.target
    if not out_shape or not in_shape or out_shape[0] != in_shape[0]:
        return None
    rest = [a for a in node.args[1:]] + list(node.kwargs.values())
    if target in _RESHAPES and node.args[0] is x:
        if out_shape == (in_shape[0], math.prod(in_shape[1:])):
            return Op("flatten", {"start_dim": 1})
        return Op("reshape", {"shape": list(out_shape[1:])})
    if target in ("permute", torch.permute) and node.args[0] is x:
        dims = _ints(rest)
        if dims is None or len(dims) != len(in_shape) or dims[0] % len(in_shape) != 0:
            return None
        return Op("permute", {"dims": [d % len(in_shape) for d in dims]})
    if target in ("transpose", torch.transpose) and node.args[0] is x:
        pair = _ints(rest)
        if pair is None or len(pair) != 2 or 0 in [p % len(in_shape) for p in pair]:
            return None
        dims = list(range(len(in_shape)))
        a, b = (p % len(in_shape) for p in pair)
        dims[a], dims[b] = dims[b], dims[a]
        return Op("permute", {"dims": dims})
    if target is operator.getitem and node.args[0] is x and not isinstance(node.args[1], fx.Node):
        index = _index(node.args[1], in_shape)
        return None if index is None else Op("take", index)
    return None


def function_step(node: fx.Node, gm: fx.GraphModule, x: fx.Node) -> Op | None:
    """A call_function / call_method node of one tensor as an Op with constant keyword arguments; None for
    a node with no channel rule (the caller keeps it as code)."""
    move = move_step(node, x)
    if move is not None:
        return move
    name = _FN_NAMES.get(node.target) if node.op == "call_function" else _METHODS.get(node.target)
    if name is None:
        return None
    if name == "dropout":  # compact models are inference models: dropout is the identity
        return Op("identity")
    if name in ("mul", "add", "sub", "truediv"):
        args = list(node.args) + list(node.kwargs.values())
        consts = [a for a in args if a is not x]
        if len(consts) != 1 or not isinstance(consts[0], (int, float)) or isinstance(consts[0], bool):
            return None
        return Op(name, {"other": consts[0], "reverse": node.args[0] is not x})
    if name == "identity":
        return Op("identity")
    if node.op == "call_method":
        kwargs = dict(node.kwargs)
        if len(node.args) > 1:
            kwargs["dim"] = node.args[1]
    else:
        normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if normalized is None:
            return None
        kwargs = {k: v for k, v in normalized.kwargs.items() if k not in ("input", "_stacklevel")}
    if any(isinstance(v, fx.Node) for v in kwargs.values()):  # computed in the graph, not a constant
        return None
    if FUNCTIONS[name][1] == REDUCE:
        kwargs = _spatial_reduction(node, kwargs, len(x.meta["tensor_meta"].shape))
        if kwargs is None:
            return None
    return Op(name, kwargs)


def _spatial_reduction(node: fx.Node, kwargs: dict, rank: int) -> dict | None:
    """The arguments of a reduction that keeps the batch (over positions, or over channels, which channel
    tracking then pins); None for others."""
    if node.op == "call_method" and len(node.args) > 2:
        kwargs["keepdim"] = node.args[2]
    dim = kwargs.get("dim")
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else []
    if not dims or not all(isinstance(d, int) for d in dims) or 0 in {d % rank for d in dims}:
        return None
    return {k: v for k, v in kwargs.items() if k != "dtype" or v is not None} | {"dim": dims}


# Elementwise arithmetic of two tensors: the names of _FN_NAMES and _METHODS that Broadcast runs, and torch's
# own functions (which, with a Python number, have no rule).
_ARITHMETIC = {**{f: n for f, n in _FN_NAMES.items() if n in Broadcast.OPS},
               torch.mul: "mul", torch.add: "add", torch.sub: "sub", torch.div: "truediv"}
_ARITHMETIC_METHODS = {m: n for m, n in _METHODS.items() if n in Broadcast.OPS}


def multi_input_step(node: fx.Node, inputs: list[fx.Node]) -> nn.Module | None:
    """``a + b``, ``torch.cat([a, b], d)`` (not along the batch) and ``a * g`` (shapes that broadcast: a
    squeeze-excite gate, a layer-scale parameter) as :class:`Add`, :class:`Cat` and :class:`Broadcast`; None
    for other nodes."""
    target = node.target
    op = _ARITHMETIC.get(target) if node.op == "call_function" else _ARITHMETIC_METHODS.get(target) \
        if node.op == "call_method" else None
    if op is not None and len(inputs) == 2 and not node.kwargs and list(node.args) == inputs:
        shapes = [tuple(a.meta["tensor_meta"].shape) for a in inputs]
        if op == "add" and shapes[0] == shapes[1]:
            return Add()
        return Broadcast(op)  # the shapes broadcast: the node ran
    if node.op == "call_function" and target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = len(node.meta["tensor_meta"].shape)
        if not isinstance(dim, int) or dim % rank == 0:
            return None
        return Cat(dim % rank)
    return None


def _training_off(node: fx.Node) -> bool:
    """A function with a ``training`` argument, called with ``training=False``: dropout's family (drop-path,
    stochastic depth) in eval mode, where it passes its input through. ``compact`` checks the outputs."""
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return False
    return bound.arguments.get("training", None) is False


def is_identity(node: fx.Node, gm: fx.GraphModule) -> bool:
    """nn.Identity, dropout (compact models are inference models), ``x.contiguous()``, a one-tensor ``cat``,
    a function called with ``training=False``."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                                            nn.AlphaDropout))
    if node.op == "call_function":
        return node.target is F.dropout or (node.target is torch.cat and isinstance(node.args[0], (list, tuple))
                                            and len(node.args[0]) == 1) or _training_off(node)
    return node.op == "call_method" and node.target == "contiguous"
