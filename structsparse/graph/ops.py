"""How a channel passes through each operation: one rule per operation, grouped by family.

Every step of a traced model gets a *role* that tells channel tracking (:mod:`.units`) and compaction
how its channel dimension (dim 1) relates to its input's:

* elementwise and broadcast with a number (``relu``, ``x * 0.5`` ...): channel c in, channel c out;
* reductions and pooling (``max_pool2d``, adaptive pooling, within-channel LRN, ``x.mean((2, 3))``
  and ``amax``/``sum`` over positions): per channel;
* reshape (``flatten``, ``view(n, -1)``): each feature keeps the channel it came from;
* normalisation (BatchNorm): per channel; cross-channel steps (softmax, LRN) mix channels;
* convolution and Linear: read channels (columns) and write new ones (rows); a depthwise conv (one
  filter per channel) maps channel c to channel c, like a normalisation layer;
* several inputs: ``a + b`` ties channel c of both, ``torch.cat`` along dim 1 stacks them, and an
  elementwise op of tensors that broadcast (a squeeze-excite gate ``x * g``, ``g`` N × C × 1 × 1) ties
  channel c of both when they have the same channels.

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

from ..layers import Add, Broadcast, Cat, ChannelPad, Constant, WithinChannelLRN

__all__ = ["UnsupportedModelError", "FUNCTIONS", "MODULE_ROLES", "Op", "module_role", "function_step",
           "multi_input_step", "is_identity", "describe", "passes_channels", "CONV", "LINEAR", "NORM", "ELEMENTWISE", "POOL",
           "FLATTEN", "DROPOUT", "MIXING", "DEPTHWISE", "REDUCE", "INPUT", "ADD", "CAT", "CHPAD", "CONST", "BCAST", "WEIGHTED", "CHANNELWISE"]

# Roles: how a step treats the channel dimension (dim 1).
CONV, LINEAR, NORM, ELEMENTWISE, POOL, FLATTEN, DROPOUT, MIXING, DEPTHWISE, REDUCE = (
    "conv", "linear", "norm", "elementwise", "pool", "flatten", "dropout", "mixing", "depthwise", "reduce")
INPUT, ADD, CAT, CHPAD, CONST, BCAST = "input", "add", "cat", "chpad", "const", "broadcast"
WEIGHTED = (CONV, LINEAR)
CHANNELWISE = (NORM, ELEMENTWISE, POOL, DROPOUT, DEPTHWISE)  # channel c in, channel c out


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
    "hardsigmoid": (F.hardsigmoid, ELEMENTWISE),
    "mul": (_scalar(operator.mul), ELEMENTWISE), "add": (_scalar(operator.add), ELEMENTWISE),
    "sub": (_scalar(operator.sub), ELEMENTWISE), "truediv": (_scalar(operator.truediv), ELEMENTWISE),
    "max_pool2d": (F.max_pool2d, POOL), "avg_pool2d": (F.avg_pool2d, POOL),
    "adaptive_avg_pool2d": (F.adaptive_avg_pool2d, POOL), "adaptive_max_pool2d": (F.adaptive_max_pool2d, POOL),
    "flatten": (torch.flatten, FLATTEN),
    "mean": (torch.mean, REDUCE), "amax": (torch.amax, REDUCE), "sum": (torch.sum, REDUCE),
    "softmax": (F.softmax, MIXING), "log_softmax": (F.log_softmax, MIXING),
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
            "log_softmax": "log_softmax", "contiguous": "identity", "flatten": "flatten",
            "view": "flatten", "reshape": "flatten", "mul": "mul", "add": "add", "sub": "sub", "div": "truediv",
            "mean": "mean", "amax": "amax", "sum": "sum"}
MODULE_ROLES: list[tuple[tuple[type, ...], str]] = [
    ((nn.Conv2d,), CONV), ((nn.Linear,), LINEAR), ((nn.BatchNorm1d, nn.BatchNorm2d), NORM),
    ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardtanh,
      nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Mish, nn.Identity), ELEMENTWISE),
    ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), POOL),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout), DROPOUT),
    ((nn.Flatten,), FLATTEN), ((nn.Softmax, nn.LogSoftmax, nn.LocalResponseNorm), MIXING),
    ((WithinChannelLRN,), POOL),
    ((Add,), ADD), ((Cat,), CAT), ((Broadcast,), BCAST), ((ChannelPad,), CHPAD), ((Constant,), CONST),
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


def passes_channels(node) -> bool:
    """Whether a graph step maps channel c of its input to channel c of its output: a channel-wise step that
    keeps the rank, or a reduction over positions."""
    return node.role in CHANNELWISE and len(node.out_shape) == len(node.in_shapes[0]) or node.role == REDUCE


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


def describe(node: fx.Node) -> str:
    """``node 'x' (call_function relu)``: how errors name a node."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return f"node {node.name!r} ({node.op} {target})"


def function_step(node: fx.Node, gm: fx.GraphModule, x: fx.Node) -> Op:
    """Turn a call_function / call_method node into an Op with constant keyword arguments."""
    if node.op == "call_function":
        name = _FN_NAMES.get(node.target)
    else:
        name = _METHODS.get(node.target)
    if name is None:
        raise UnsupportedModelError(f"{describe(node)} is not supported")
    in_shape = tuple(x.meta["tensor_meta"].shape)
    out_shape = tuple(node.meta["tensor_meta"].shape)
    if name == "dropout":  # compact models are inference models: dropout is the identity
        return Op("identity")
    if name in ("mul", "add", "sub", "truediv"):
        args = list(node.args) + list(node.kwargs.values())
        consts = [a for a in args if a is not x]
        if len(consts) != 1 or not isinstance(consts[0], (int, float)) or isinstance(consts[0], bool):
            raise UnsupportedModelError(f"{describe(node)}: only arithmetic with a Python number is supported")
        return Op(name, {"other": consts[0], "reverse": node.args[0] is not x})
    if name == "identity":
        return Op("identity")
    if name == "flatten":
        if out_shape != (in_shape[0], math.prod(in_shape[1:])):
            raise UnsupportedModelError(
                f"{describe(node)} maps {list(in_shape)} to {list(out_shape)}: only flattening to (N, features) is supported")
        return Op("flatten", {"start_dim": 1})
    if node.op == "call_method":
        kwargs = dict(node.kwargs)
        if len(node.args) > 1:
            kwargs["dim"] = node.args[1]
    else:
        normalized = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if normalized is None:
            raise UnsupportedModelError(f"{describe(node)}: could not read its arguments")
        kwargs = {k: v for k, v in normalized.kwargs.items() if k not in ("input", "_stacklevel")}
    for k, v in kwargs.items():
        if isinstance(v, fx.Node):
            raise UnsupportedModelError(f"{describe(node)}: argument {k!r} is computed in the graph, not a constant")
    if FUNCTIONS[name][1] == REDUCE:
        kwargs = _spatial_reduction(node, kwargs, len(in_shape))
    return Op(name, kwargs)


def _spatial_reduction(node: fx.Node, kwargs: dict, rank: int) -> dict:
    """The arguments of a reduction over positions only (global pooling): channel c in, channel c out."""
    if node.op == "call_method" and len(node.args) > 2:
        kwargs["keepdim"] = node.args[2]
    dim = kwargs.get("dim")
    dims = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else []
    if not dims or not all(isinstance(d, int) for d in dims) or {d % rank for d in dims} & {0, 1}:
        raise UnsupportedModelError(f"{describe(node)}: only reductions over positions (dims 2 and up, not the "
                                    f"channels or the batch) are supported, got dim={dim!r}")
    return {k: v for k, v in kwargs.items() if k != "dtype" or v is not None} | {"dim": dims}


# Elementwise arithmetic of two tensors: the names of _FN_NAMES and _METHODS that Broadcast runs, and torch's
# own functions (which, with a Python number, have no rule).
_ARITHMETIC = {**{f: n for f, n in _FN_NAMES.items() if n in Broadcast.OPS},
               torch.mul: "mul", torch.add: "add", torch.sub: "sub", torch.div: "truediv"}
_ARITHMETIC_METHODS = {m: n for m, n in _METHODS.items() if n in Broadcast.OPS}


def multi_input_step(node: fx.Node, inputs: list[fx.Node]) -> nn.Module | None:
    """``a + b``, ``torch.cat([a, b], 1)`` and ``a * g`` (shapes that broadcast) as :class:`Add`, :class:`Cat`
    and :class:`Broadcast`; None for other nodes."""
    target = node.target
    op = _ARITHMETIC.get(target) if node.op == "call_function" else _ARITHMETIC_METHODS.get(target) \
        if node.op == "call_method" else None
    if op is not None and len(inputs) == 2 and not node.kwargs and list(node.args) == inputs:
        shapes = [tuple(a.meta["tensor_meta"].shape) for a in inputs]
        if op == "add" and shapes[0] == shapes[1]:
            return Add()
        if len(shapes[0]) == len(shapes[1]) and len(shapes[0]) >= 2 and all(
                a == b or 1 in (a, b) for a, b in zip(shapes[0][2:], shapes[1][2:])) \
                and shapes[0][0] == shapes[1][0] and (shapes[0][1] == shapes[1][1] or 1 in (shapes[0][1], shapes[1][1])):
            return Broadcast(op)
        raise UnsupportedModelError(f"{describe(node)} combines tensors of shapes {shapes}: only equal shapes, or "
                                    "shapes that broadcast over positions (N × C × 1 × 1) or channels (N × 1 × ...)")
    if node.op == "call_function" and target is torch.cat:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        rank = len(node.meta["tensor_meta"].shape)
        if not isinstance(dim, int) or dim % rank != 1:
            raise UnsupportedModelError(f"{describe(node)}: only concatenation along dim 1 (channels) is supported")
        return Cat(1)
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
