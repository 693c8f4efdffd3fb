"""Saving and loading compact models: safetensors weights plus a JSON architecture. No pickle.

A directory written by :func:`save_compact` holds ``architecture.json`` (the steps of the
:class:`~structsparse.compact.CompactNet`, each a module type from an allow-list with its
constructor arguments) and ``model.safetensors``. :func:`load_compact` validates both and
names the file and the entry whenever something is wrong.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from .compact import CompactNet, IndexSelect
from .files import atomic_write
from .graph import _MODULES, Op
from .kernels import LoweredConv2d
from .layers import ChannelPad, Constant

__all__ = ["save_compact", "load_compact", "ARCHITECTURE", "WEIGHTS"]

ARCHITECTURE, WEIGHTS = "architecture.json", "model.safetensors"
FORMAT, VERSION = "structsparse-compact", 1
_TYPES: dict[str, type] = {cls.__name__: cls for types, _ in _MODULES for cls in types}
_TYPES.update({"Op": Op, "IndexSelect": IndexSelect, "LoweredConv2d": LoweredConv2d, "PReLU": nn.PReLU})
_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    raise TypeError(f"cannot describe {v!r} in JSON")


def _ctor_params(cls: type) -> list[str]:
    return [name for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "device", "dtype") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _config(m: nn.Module) -> dict:
    if isinstance(m, Op):
        return {"fn": m.fn, "kwargs": _jsonable(m.kwargs)}
    if isinstance(m, IndexSelect):
        return {"dim": m.dim, "index": m.index.numel()}
    if isinstance(m, ChannelPad):
        return {"out_channels": m.out_channels, "index": m.index.numel(), "stride": m.stride}
    if isinstance(m, Constant):
        return {"shape": list(m.value.shape)}
    if isinstance(m, LoweredConv2d):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
                "columns": m.columns.numel(), "stride": list(m.stride), "padding": list(m.padding),
                "dilation": list(m.dilation), "bias": m.bias is not None}
    cfg = {}
    for p in _ctor_params(type(m)):
        value = getattr(m, p)
        cfg[p] = value is not None if p == "bias" else _jsonable(value)
    return cfg


def save_compact(model: CompactNet, directory: str | os.PathLike) -> Path:
    """Write ``model`` (made by :func:`structsparse.compact`) to ``directory``; returns the path."""
    if not isinstance(model, CompactNet):
        raise TypeError(f"save_compact saves models made by structsparse.compact(), got {type(model).__name__}; "
                        "call compact(model, example_input) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    steps = []
    previous = CompactNet.INPUT
    for name, m in model.steps():
        if type(m).__name__ not in _TYPES or _TYPES[type(m).__name__] is not type(m):
            raise TypeError(f"step {name!r}: {type(m).__name__} cannot be saved (not in the allow-list)")
        step = {"name": name, "type": type(m).__name__, "config": _config(m)}
        inputs = model.step_inputs(name)
        if inputs != [previous]:  # chains need no "inputs"
            step["inputs"] = inputs
        steps.append(step)
        previous = name
    arch = {"format": FORMAT, "version": VERSION, "input_shape": getattr(model, "input_shape", None),
            "steps": steps}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS, save(tensors, metadata={"format": FORMAT}))
    atomic_write(directory / ARCHITECTURE, json.dumps(arch, indent=1).encode())
    return directory


def _build(step: dict, where: str) -> tuple[str, nn.Module, list[str] | None]:
    if not isinstance(step, dict) or not {"name", "type", "config"} <= set(step) <= {"name", "type", "config", "inputs"}:
        raise ValueError(f"{where}: a step must be an object with 'name', 'type', 'config' and optionally 'inputs'")
    name, kind, cfg, inputs = step["name"], step["type"], step["config"], step.get("inputs")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: bad step name {name!r}")
    if inputs is not None and (not isinstance(inputs, list) or not inputs
                               or not all(isinstance(i, str) and _NAME.match(i) for i in inputs)):
        raise ValueError(f"{where} ({name}): 'inputs' must be a non-empty list of step names")
    return (name, _module(name, kind, cfg, where), inputs)


def _module(name: str, kind, cfg, where: str) -> nn.Module:
    if kind not in _TYPES:
        raise ValueError(f"{where} ({name}): module type {kind!r} is not allowed; allowed: {', '.join(sorted(_TYPES))}")
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} ({name}): config must be an object")
    cls = _TYPES[kind]
    try:
        if cls is IndexSelect:
            return IndexSelect(int(cfg["dim"]), torch.zeros(int(cfg["index"]), dtype=torch.long))
        if cls is ChannelPad:  # the weights file holds the index
            return ChannelPad(int(cfg["out_channels"]), torch.zeros(int(cfg["index"]), dtype=torch.long),
                              int(cfg["stride"]))
        if cls is LoweredConv2d:
            cfg = dict(cfg)
            cfg["columns"] = torch.arange(int(cfg["columns"]))  # placeholder; the weights file holds them
            return LoweredConv2d(**cfg)
        unknown = set(cfg) - set(_ctor_params(cls))
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**cfg)
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{where} ({name}): bad config for {kind}: {e}") from e


def load_compact(directory: str | os.PathLike) -> CompactNet:
    """Load a model written by :func:`save_compact`, validating its description and weights."""
    directory = Path(directory)
    arch_path, weights_path = directory / ARCHITECTURE, directory / WEIGHTS
    for path in (arch_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (is {directory} a directory written by save_compact?)")
    try:
        arch = json.loads(arch_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{arch_path}: not valid JSON: {e}") from e
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise ValueError(f"{arch_path}: not a structsparse compact model description (format != {FORMAT!r})")
    if arch.get("version") != VERSION:
        raise ValueError(f"{arch_path}: unsupported version {arch.get('version')!r} (this library reads {VERSION})")
    steps = arch.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"{arch_path}: 'steps' must be a non-empty list")
    try:
        net = CompactNet([_build(s, f"{arch_path}: steps[{i}]") for i, s in enumerate(steps)])
    except ValueError as e:
        if str(arch_path) in str(e):
            raise
        raise ValueError(f"{arch_path}: {e}") from e
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights_path}: cannot read safetensors weights: {e}") from e
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: weights do not match {ARCHITECTURE}: missing {missing}, unexpected {unexpected}")
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ValueError(f"{weights_path}: {key} has shape {list(t.shape)}, {ARCHITECTURE} implies "
                             f"{list(expected[key].shape)}")
        if t.dtype.is_floating_point != expected[key].dtype.is_floating_point:
            raise ValueError(f"{weights_path}: {key} has dtype {t.dtype}, expected {expected[key].dtype}")
    net.load_state_dict(tensors)
    for name, m in net.steps():
        if isinstance(m, LoweredConv2d):
            total = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            cols = m.columns
            if int(cols.min()) < 0 or int(cols.max()) >= total or cols.unique().numel() != cols.numel():
                raise ValueError(f"{weights_path}: {name}.columns must be distinct indices in [0, {total})")
        if isinstance(m, IndexSelect) and m.index.numel() and int(m.index.min()) < 0:
            raise ValueError(f"{weights_path}: {name}.index holds negative indices")
        if isinstance(m, ChannelPad) and m.index.numel() and (
                int(m.index.min()) < 0 or int(m.index.max()) >= m.out_channels or m.index.unique().numel() != m.index.numel()):
            raise ValueError(f"{weights_path}: {name}.index must be distinct channels in [0, {m.out_channels})")
    net.input_shape = arch.get("input_shape")
    if net.input_shape is not None:
        try:
            with torch.no_grad():
                net.eval()(torch.zeros(1, *net.input_shape))
        except Exception as e:
            raise ValueError(f"{directory}: the loaded model fails on an input of shape {[1, *net.input_shape]}: {e}") from e
    return net.eval()
