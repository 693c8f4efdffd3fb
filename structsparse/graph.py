"""Reading a feed-forward model as a chain of steps (torch.fx), with shapes.

Each step is a module call (``conv1``), or a function or method from a short allow-list
(``F.relu``, ``torch.flatten``, ``x.view(n, -1)`` ...). Every step has a *role* that tells
compaction how channels pass through it. Anything else is an error that names the node.
Residual and branching graphs are not chains: they get an error naming the node that
reads two tensors.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["Step", "trace_chain", "Op", "FUNCTIONS", "UnsupportedModelError"]

# Roles: how a step treats the channel dimension (dim 1).
CONV, LINEAR, NORM, ELEMENTWISE, POOL, FLATTEN, DROPOUT, MIXING = (
    "conv", "linear", "norm", "elementwise", "pool", "flatten", "dropout", "mixing")
WEIGHTED = (CONV, LINEAR)


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
    ((nn.Flatten,), FLATTEN), ((nn.Softmax, nn.LogSoftmax), MIXING),
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


@dataclass
class Step:
    """One step of a chain: a module (``module`` set) or an :class:`Op`."""

    name: str
    role: str
    module: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


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
        raise UnsupportedModelError(f"{_describe(node)} is not supported in a chain")
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


def trace_chain(model: nn.Module, example_input: torch.Tensor) -> list[Step]:
    """The model as a list of :class:`Step` s with input/output shapes from ``example_input``.

    The model is traced with torch.fx and run once on ``example_input`` (in eval mode; pass
    a copy if its state must not be touched). Errors name the unsupported node or module.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    try:
        gm = fx.symbolic_trace(model)
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

    steps: list[Step] = []
    current: fx.Node | None = None
    seen_modules: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if current is not None:
                raise UnsupportedModelError(f"{_describe(node)}: models with several inputs are not supported")
            current = node
            continue
        if node.op == "output":
            if node.args[0] is not current:
                raise UnsupportedModelError(f"{_describe(node)}: the model must return one tensor, the chain's last")
            break
        if not _is_tensor(node):  # shape queries such as x.size(0)
            continue
        inputs = [a for a in node.all_input_nodes if _is_tensor(a)]
        if inputs != [current]:
            raise UnsupportedModelError(
                f"{_describe(node)} reads {[a.name for a in inputs]}: branching graphs (residual adds, "
                f"concatenation) are not supported yet; feed-forward chains are")
        in_shape = tuple(current.meta["tensor_meta"].shape)
        out_shape = tuple(node.meta["tensor_meta"].shape)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            role = _module_role(module)
            if role is None:
                raise UnsupportedModelError(
                    f"module {node.target!r} ({type(module).__name__}) is not supported in a chain")
            if role in WEIGHTED + (NORM,) and node.target in seen_modules:
                raise UnsupportedModelError(f"module {node.target!r} is called more than once")
            if role == FLATTEN and out_shape != (in_shape[0], math.prod(in_shape[1:])):
                raise UnsupportedModelError(f"module {node.target!r} must flatten to (N, features)")
            seen_modules.add(node.target)
            steps.append(Step(node.target, role, module, in_shape, out_shape))
        elif node.op in ("call_function", "call_method"):
            op = _function_step(node, gm, current)
            steps.append(Step(node.name, FUNCTIONS[op.fn][1], op, in_shape, out_shape))
        else:
            raise UnsupportedModelError(f"{_describe(node)} is not supported")
        current = node
    return steps
