"""Saving and loading compact models: safetensors weights plus a JSON architecture. No pickle.

A directory written by :func:`save_compact` holds ``architecture.json`` (the steps of the
:class:`~structsparse.compaction.surgery.CompactNet`, each a module type from an allow-list with its
constructor arguments, and the SHA-256 of the weights file) and ``model.safetensors``. :func:`load_compact`
checks the hash (files saved before it was recorded load without one), validates both and
names the file and the entry whenever something is wrong: every problem is a ``ValueError``
(or ``FileNotFoundError`` for a missing file) whose message starts with the file's path.

Loading never allocates what the description merely claims. The modules are built on the
``meta`` device (no memory), their parameter and buffer shapes are compared with the
safetensors header (whose sizes the file's length bounds), and a model with an
``input_shape`` is first run on a meta input, with every intermediate tensor's size bounded,
before the weights are read and it is run for real.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # sees every aten op, inside composites too

from ..checks import is_int, is_number
from ..compaction.kernels import LoweredConv2d
from ..compaction.surgery import CompactNet, IndexSelect
from ..graph import FUNCTIONS, MODULE_ROLES, Op
from ..graph.trace import Traced
from ..layers import FAST_FORMS, Add, Broadcast, Cat, ChannelPad, Constant, Param, fast_form
from .files import atomic_write

__all__ = ["save_compact", "load_compact", "ARCHITECTURE", "WEIGHTS"]

ARCHITECTURE, WEIGHTS = "architecture.json", "model.safetensors"
FORMAT, VERSION = "structsparse-compact", 1
_TYPES: dict[str, type] = {cls.__name__: cls for types, _ in MODULE_ROLES for cls in types}
_TYPES.update({"Op": Op, "IndexSelect": IndexSelect, "LoweredConv2d": LoweredConv2d, "PReLU": nn.PReLU})
# The faster forms of plain modules (see structsparse.layers.fast_form): saved as the plain module, loaded as this.
_FAST = {cls.saved_as: cls for cls in FAST_FORMS}
# A step name: a dotted path whose parts are module names PyTorch accepts (non-empty, no "."), without
# control characters. save_compact and load_compact apply the same rule (torchvision's "block1-0" passes).
_NAME = re.compile(r"^[^.\x00-\x1f\x7f]+(\.[^.\x00-\x1f\x7f]+)*$")
_MULTI_INPUT = (Add, Cat, Broadcast)  # steps that read several inputs; every other step reads exactly one
MAX_ELEMENTS = 2 ** 28           # the largest tensor a loaded model may make on its input_shape (batch of 2);
                                 # raise it to load models that need more
MAX_DIMS = 8                     # input_shape and Constant shapes: at most this many dimensions
_ERRORS = (TypeError, ValueError, KeyError, IndexError, AssertionError, RuntimeError, ArithmeticError)


# ---- saving --------------------------------------------------------------------------------

def _saved_type(m: nn.Module) -> str:
    """The type name a step is saved under: the plain module's for a faster form."""
    return type(m).saved_as if type(m) in _FAST.values() else type(m).__name__


def _jsonable(v):
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise TypeError(f"cannot describe {v!r} in JSON: its keys must be strings")
        return {k: _jsonable(x) for k, x in v.items()}
    raise TypeError(f"cannot describe {v!r} in JSON")


def _ctor_params(cls: type) -> dict[str, inspect.Parameter]:
    return {name: p for name, p in inspect.signature(cls.__init__).parameters.items()
            if name not in ("self", "device", "dtype") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _config(m: nn.Module) -> dict:
    if isinstance(m, Op):
        return {"fn": m.fn, "kwargs": _jsonable(m.kwargs)}
    if isinstance(m, IndexSelect):
        return {"dim": m.dim, "index": m.index.numel()}
    if isinstance(m, ChannelPad):
        return {"out_channels": m.out_channels, "index": m.index.numel(), "stride": m.stride}
    if isinstance(m, (Constant, Param)):
        return {"shape": list(m.value.shape)}
    if isinstance(m, LoweredConv2d):
        return {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": list(m.kernel_size),
                "columns": m.columns.numel(), "stride": list(m.stride), "padding": list(m.padding),
                "dilation": list(m.dilation), "bias": m.bias is not None}
    cfg = {}
    for name, p in _ctor_params(type(m)).items():
        if not hasattr(m, name):
            if p.default is None:  # a deprecated alias (Hardtanh's min_value / max_value): not stored
                continue
            raise TypeError(f"{type(m).__name__} keeps no attribute {name!r} for its constructor argument")
        value = getattr(m, name)
        cfg[name] = value is not None if name == "bias" else _jsonable(value)
    return cfg


def _check_round_trip(name: str, m: nn.Module, cfg: dict) -> None:
    """``cfg`` describes ``m`` faithfully: the module it builds (on meta: no memory) has the same
    description, and load_compact will accept it."""
    try:
        with torch.device("meta"):
            rebuilt = _module(name, _saved_type(m), json.loads(json.dumps(cfg)), "save_compact")
        again = _config(rebuilt)
    except (ValueError, TypeError) as e:
        raise TypeError(f"step {name!r}: {type(m).__name__} cannot be saved: {e}") from e
    if json.dumps(again, sort_keys=True) != json.dumps(cfg, sort_keys=True):
        raise TypeError(f"step {name!r}: {type(m).__name__} cannot be saved faithfully: its description "
                        f"{cfg} rebuilds a module described as {again}")


def save_compact(model: CompactNet, directory: str | os.PathLike) -> Path:
    """Write ``model`` (made by :func:`structsparse.compact`) to ``directory``; returns the path."""
    if not isinstance(model, CompactNet):
        raise TypeError(f"save_compact saves models made by structsparse.compact(), got {type(model).__name__}; "
                        "call compact(model, example_input) first")
    directory = Path(directory)
    steps = []
    previous = CompactNet.INPUT
    for name, m in model.steps():
        _check_step_name(name, "save_compact")
        if isinstance(m, Traced):
            raise TypeError(f"step {name!r} is kept as the model's own code ({m.what}: no channel rule), which "
                            "save_compact does not store; keep the model object itself, or export it with export_onnx")
        kind = _saved_type(m)
        if kind not in _TYPES or type(m) not in (_TYPES[kind], _FAST.get(kind)):
            raise TypeError(f"step {name!r}: {type(m).__name__} cannot be saved (not in the allow-list)")
        cfg = _config(m)
        _check_round_trip(name, m, cfg)
        step = {"name": name, "type": kind, "config": cfg}
        inputs = model.step_inputs(name)
        if inputs != [previous]:  # chains need no "inputs"
            step["inputs"] = inputs
        steps.append(step)
        previous = name
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save(tensors, metadata={"format": FORMAT})
    arch = {"format": FORMAT, "version": VERSION, "input_shape": getattr(model, "input_shape", None),
            "weights_sha256": hashlib.sha256(blob).hexdigest(), "steps": steps}
    if model.channels_last:  # optional: files without it load as before
        arch["memory_format"] = "channels_last"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS, blob)
    atomic_write(directory / ARCHITECTURE, json.dumps(arch, indent=1).encode())
    return directory


# ---- validating a description --------------------------------------------------------------

def _int(cfg: dict, key: str, low: int, default=None) -> int:
    v = cfg.get(key, default)
    if not is_int(v) or v < low:
        raise ValueError(f"{key!r} must be an integer >= {low}, got {v!r}")
    return v


def _pair(cfg: dict, key: str, low: int, default=None) -> tuple[int, int]:
    v = cfg.get(key, default)
    pair = [v, v] if is_int(v) else v
    if not (isinstance(pair, list) and len(pair) == 2 and all(is_int(x) and x >= low for x in pair)):
        raise ValueError(f"{key!r} must be an integer >= {low} or a list of two, got {v!r}")
    return pair[0], pair[1]


def _only(cfg: dict, required: set[str], optional: set[str] = frozenset()) -> None:
    missing, unknown = required - set(cfg), set(cfg) - required - optional
    if missing:
        raise ValueError(f"missing config keys {sorted(missing)}")
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")


def _meta(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _lowered_conv(cfg: dict) -> LoweredConv2d:
    _only(cfg, {"in_channels", "out_channels", "kernel_size", "columns"}, {"stride", "padding", "dilation", "bias"})
    cin, cout = _int(cfg, "in_channels", 1), _int(cfg, "out_channels", 1)
    kernel, stride = _pair(cfg, "kernel_size", 1), _pair(cfg, "stride", 1, 1)
    padding, dilation = _pair(cfg, "padding", 0, 0), _pair(cfg, "dilation", 1, 1)
    columns, total = _int(cfg, "columns", 1), cin * kernel[0] * kernel[1]
    if columns > total:
        raise ValueError(f"'columns' ({columns}) must be at most in_channels * kernel height * width = {total}")
    bias = cfg.get("bias", True)
    if not isinstance(bias, bool):
        raise ValueError(f"'bias' must be true or false, got {bias!r}")
    # Built with one output and one column (the constructor checks column values, so it needs real
    # ones), then given its described sizes on meta; the weights file holds the columns.
    with torch.device("cpu"):  # tiny; inside load_compact's meta-device context
        m = LoweredConv2d(cin, 1, list(kernel), torch.zeros(1, dtype=torch.long), list(stride), list(padding),
                          list(dilation), bias=bias)
    m.out_channels = cout
    m.columns = _meta(columns, dtype=torch.long)
    m.weight = nn.Parameter(_meta(cout, columns))
    if bias:
        m.bias = nn.Parameter(_meta(cout))
    return m


def _check_value(key: str, p: inspect.Parameter, v) -> None:
    """A generic module's constructor argument has the JSON type its default suggests."""
    ok_none = p.default is None or "Optional" in str(p.annotation) or "None" in str(p.annotation)
    if v is None:
        if not ok_none:
            raise ValueError(f"{key!r} must not be null")
    elif isinstance(p.default, bool):
        if not isinstance(v, bool):
            raise ValueError(f"{key!r} must be true or false, got {v!r}")
    elif isinstance(v, list):  # sizes: kernel_size [3, 3], output_size [None, 7] ...
        if not (1 <= len(v) <= MAX_DIMS and all(is_number(x) or x is None for x in v)):
            raise ValueError(f"{key!r} must be a number or a short list of numbers, got {v!r}")
    elif isinstance(p.default, str) and not isinstance(v, str):
        raise ValueError(f"{key!r} must be a string, got {v!r}")
    elif is_number(p.default) and not (is_number(v) or (key == "padding" and isinstance(v, str))):
        raise ValueError(f"{key!r} must be a number, got {v!r}")
    elif not isinstance(v, (bool, int, float, str)):
        raise ValueError(f"{key!r} must be a number, a string or a list of numbers, got {v!r}")


def _op(cfg: dict) -> Op:
    _only(cfg, {"fn"}, {"kwargs"})
    fn, kwargs = cfg["fn"], cfg.get("kwargs") or {}
    if not isinstance(fn, str) or fn not in FUNCTIONS:
        raise ValueError(f"unknown function {fn!r}; known: {', '.join(sorted(FUNCTIONS))}")
    if not isinstance(kwargs, dict):
        raise ValueError(f"'kwargs' must be an object, got {kwargs!r}")
    try:
        params = inspect.signature(FUNCTIONS[fn][0]).parameters
    except (TypeError, ValueError):  # a builtin without a signature: its call checks the names
        params = None
    for key, v in kwargs.items():
        if params is not None and not any(p.kind == p.VAR_KEYWORD for p in params.values()) and (
                key not in params or key == next(iter(params))):
            raise ValueError(f"{fn} has no argument {key!r}")
        if not (v is None or isinstance(v, (bool, int, float, str))
                or (isinstance(v, list) and len(v) <= MAX_DIMS and all(is_number(x) for x in v))):
            raise ValueError(f"argument {key!r} of {fn} must be a number, a string or a list of numbers, got {v!r}")
    return Op(fn, kwargs)


def _module(name: str, kind, cfg, where: str) -> nn.Module:
    """The module a step describes, built on the current device (meta while loading)."""
    if not isinstance(kind, str) or kind not in _TYPES:
        raise ValueError(f"{where} ({name}): module type {kind!r} is not allowed; allowed: {', '.join(sorted(_TYPES))}")
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} ({name}): config must be an object")
    cls = _TYPES[kind]
    try:
        if cls is Op:
            return _op(cfg)
        if cls is IndexSelect:  # sizes only: the weights file holds the index
            _only(cfg, {"dim", "index"})
            dim = cfg["dim"]
            if not is_int(dim) or not -MAX_DIMS <= dim <= MAX_DIMS:
                raise ValueError(f"'dim' must be an integer in [-{MAX_DIMS}, {MAX_DIMS}], got {dim!r}")
            return IndexSelect(dim, _meta(_int(cfg, "index", 0), dtype=torch.long))
        if cls is ChannelPad:
            _only(cfg, {"out_channels", "index"}, {"stride"})
            out, index = _int(cfg, "out_channels", 1), _int(cfg, "index", 0)
            if index > out:
                raise ValueError(f"'index' ({index}) must be at most out_channels ({out})")
            return ChannelPad(out, _meta(index, dtype=torch.long), _int(cfg, "stride", 1, 1))
        if cls in (Constant, Param):
            _only(cfg, {"shape"})
            shape = cfg["shape"]
            if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(is_int(s) and s >= 0 for s in shape)):
                raise ValueError(f"'shape' must be a list of at most {MAX_DIMS} sizes >= 0, got {shape!r}")
            return cls(shape)
        if cls is LoweredConv2d:
            return _lowered_conv(cfg)
        params = _ctor_params(cls)
        unknown = set(cfg) - set(params)
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        for key, v in cfg.items():
            _check_value(key, params[key], v)
        return cls(**cfg)
    except _ERRORS as e:
        raise ValueError(f"{where} ({name}): bad config for {kind}: {e}") from e


def _reserved(name: str) -> str | None:
    """Why a dotted step name cannot be used: a part of it is already an attribute of the model
    (the first part) or of the plain module that holds the next part; None if it can."""
    root, container = CompactNet([]), nn.Module()
    for i, part in enumerate(name.split(".")):
        if hasattr(root if i == 0 else container, part):
            return f"{part!r} is an attribute of {'the model' if i == 0 else 'every module'}"
    return None


def _check_step_name(name, where: str) -> None:
    """A ValueError naming ``where`` unless ``name`` is a step name that saves and loads (:data:`_NAME`)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: bad step name {name!r} (names are dotted paths of module names: no empty "
                         "part, no control characters)")
    clash = _reserved(name)
    if clash is not None:
        raise ValueError(f"{where}: bad step name {name!r}: {clash} (reserved names include training, forward, "
                         f"order, steps, input_shape)")


def _build(step, where: str) -> tuple[str, nn.Module, list[str] | None]:
    if not isinstance(step, dict) or not {"name", "type", "config"} <= set(step) <= {"name", "type", "config", "inputs"}:
        raise ValueError(f"{where}: a step must be an object with 'name', 'type', 'config' and optionally 'inputs'")
    name, kind, cfg, inputs = step["name"], step["type"], step["config"], step.get("inputs")
    _check_step_name(name, where)
    if inputs is not None and (not isinstance(inputs, list) or not inputs
                               or not all(isinstance(i, str) and _NAME.match(i) for i in inputs)):
        raise ValueError(f"{where} ({name}): 'inputs' must be a non-empty list of step names")
    module = fast_form(_module(name, kind, cfg, where))
    if inputs is not None and len(inputs) != 1 and not isinstance(module, _MULTI_INPUT):
        raise ValueError(f"{where} ({name}): a {kind} step reads exactly one input, got inputs {inputs}")
    return name, module, inputs


def _check_names(names: list[str], where: Path) -> None:
    """No step is also the parent of another (``a`` and ``a.b``): a step's module holds no steps."""
    steps = set(names)
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in steps:
                raise ValueError(f"{where}: step {parent!r} cannot also hold step {name!r}")


def _input_shape(value, where: Path) -> list[int] | None:
    if value is None:
        return None
    if not (isinstance(value, list) and 1 <= len(value) <= MAX_DIMS and all(is_int(s) and s >= 1 for s in value)):
        raise ValueError(f"{where}: 'input_shape' must be null or a list of 1 to {MAX_DIMS} sizes >= 1 "
                         f"(one input, without the batch dimension), got {value!r}")
    n = 1
    for s in value:
        n *= s
    if 2 * n > MAX_ELEMENTS:
        raise ValueError(f"{where}: 'input_shape' {value} has {n} elements; at most {MAX_ELEMENTS // 2} are allowed "
                         "(raise structsparse.storage.compact_io.MAX_ELEMENTS for larger models)")
    return value


# ---- checking the model before and after the weights are read ------------------------------

class _SizeLimit(TorchDispatchMode):
    """Refuses any op result with more than MAX_ELEMENTS elements (a dry run on meta tensors). A
    dispatch mode sees the aten ops inside composite functions too (F.local_response_norm's padding)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > MAX_ELEMENTS:
                raise ValueError(f"it would make a tensor of shape {list(t.shape)} ({t.numel()} elements; at most "
                                 f"{MAX_ELEMENTS} are allowed: raise structsparse.storage.compact_io.MAX_ELEMENTS for larger models)")
        return out


def _step_check(module: nn.Module, args: tuple, output) -> None:
    """Forward hook of the dry run: every step returns a tensor."""
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"a {type(module).__name__} step returns a {type(output).__name__}, not a tensor")


def _dry_run(net: CompactNet, input_shape: list[int], arch_path: Path) -> None:
    """Run the meta-device model on a meta input: shapes and sizes are checked, nothing is allocated."""
    handles = [m.register_forward_hook(_step_check) for _, m in net.steps()]
    try:
        with torch.no_grad(), _SizeLimit():
            net(_meta(2, *input_shape))
    except Exception as e:  # anything the model's code raises: the description does not run
        raise ValueError(f"{arch_path}: the model it describes fails on an input of shape {[2, *input_shape]}: "
                         f"{e}") from e
    finally:
        for h in handles:
            h.remove()
        for _, m in net.steps():
            if isinstance(m, LoweredConv2d):
                m.clear_caches()  # meta indices from the dry run


def _check_sha256(digest, present: bool, path: Path, arch_path: Path) -> None:
    """The weights file is the one saved beside the description (files saved before hashes load unchecked)."""
    if not present:
        return
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"{arch_path}: 'weights_sha256' must be 64 hexadecimal digits")
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from e
    if h.hexdigest() != digest:
        raise ValueError(f"{path}: its SHA-256 does not match the one {ARCHITECTURE} records: the file is damaged "
                         "or was changed after it was saved")


def _read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``path``, after checking names and shapes in its header against ``expected``
    (so that sizes claimed by architecture.json are never allocated), converted to the expected dtypes."""
    problem = None
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
            missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
            if missing or unexpected:
                problem = f"weights do not match {ARCHITECTURE}: missing {missing}, unexpected {unexpected}"
            else:
                wrong = [k for k in shapes if shapes[k] != list(expected[k].shape)]
                if wrong:
                    k = wrong[0]
                    problem = f"{k} has shape {shapes[k]}, {ARCHITECTURE} implies {list(expected[k].shape)}"
            tensors = {} if problem else {k: f.get_tensor(k) for k in shapes}
    except Exception as e:  # the safetensors parser's errors (SafetensorError, OSError, dtype errors ...)
        raise ValueError(f"{path}: cannot read safetensors weights: {e}") from e
    if problem:
        raise ValueError(f"{path}: {problem}")
    for key, t in tensors.items():
        want = expected[key].dtype
        if list(t.shape) != list(expected[key].shape):  # the file changed while it was read
            raise ValueError(f"{path}: {key} has shape {list(t.shape)}, {ARCHITECTURE} implies "
                             f"{list(expected[key].shape)}")
        if t.is_complex() or t.dtype.is_floating_point != want.is_floating_point:
            raise ValueError(f"{path}: {key} has dtype {t.dtype}, expected {want}")
        # a copy in memory of the allocator's alignment: a tensor read from the file can sit at any byte offset,
        # and some BLAS kernels (seen on AMD EPYC) round differently for unaligned data, so the loaded model
        # would not compute exactly what the saved one did
        tensors[key] = t.to(want, copy=True)
    return tensors


def _check_indices(net: CompactNet, tensors: dict[str, torch.Tensor], path: Path) -> None:
    for name, m in net.steps():
        if isinstance(m, LoweredConv2d):
            total = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            cols = tensors[f"{name}.columns"]
            if int(cols.min()) < 0 or int(cols.max()) >= total or cols.unique().numel() != cols.numel():
                raise ValueError(f"{path}: {name}.columns must be distinct indices in [0, {total})")
        if isinstance(m, IndexSelect):
            index = tensors[f"{name}.index"]
            if index.numel() and int(index.min()) < 0:
                raise ValueError(f"{path}: {name}.index holds negative indices")
        if isinstance(m, ChannelPad):
            index = tensors[f"{name}.index"]
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= m.out_channels
                                  or index.unique().numel() != index.numel()):
                raise ValueError(f"{path}: {name}.index must be distinct channels in [0, {m.out_channels})")


# ---- loading -------------------------------------------------------------------------------

def load_compact(directory: str | os.PathLike) -> CompactNet:
    """Load a model written by :func:`save_compact`, validating its description and weights.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for anything wrong in
    either file; both name the file. A description with an ``input_shape`` is checked by
    running the model (on an input of zeros); one without (older files) is checked for
    structure only: names, types, configurations, inputs, and the weights' names and shapes.
    """
    directory = Path(directory)
    arch_path, weights_path = directory / ARCHITECTURE, directory / WEIGHTS
    for path in (arch_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (is {directory} a directory written by save_compact?)")
    try:
        arch = json.loads(arch_path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, over-long integer literals, deep nesting
        raise ValueError(f"{arch_path}: not valid JSON: {str(e)[:200]}") from e
    except OSError as e:
        raise ValueError(f"{arch_path}: cannot read: {e}") from e
    if not isinstance(arch, dict) or arch.get("format") != FORMAT:
        raise ValueError(f"{arch_path}: not a structsparse compact model description (format != {FORMAT!r})")
    version = arch.get("version")
    if not is_int(version) or version != VERSION:
        raise ValueError(f"{arch_path}: unsupported version {version!r} (this library reads {VERSION})")
    input_shape = _input_shape(arch.get("input_shape"), arch_path)
    memory_format = arch.get("memory_format", "contiguous")
    if memory_format not in ("contiguous", "channels_last"):
        raise ValueError(f"{arch_path}: 'memory_format' must be 'contiguous' or 'channels_last', got "
                         f"{str(memory_format)[:60]!r}")
    _check_sha256(arch.get("weights_sha256", None), "weights_sha256" in arch, weights_path, arch_path)
    steps = arch.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ValueError(f"{arch_path}: 'steps' must be a non-empty list")
    with torch.device("meta"):  # sizes are claims until the weights file confirms them
        built = [_build(s, f"{arch_path}: steps[{i}]") for i, s in enumerate(steps)]
    _check_names([name for name, _, _ in built], arch_path)
    try:
        net = CompactNet(built).eval()
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{arch_path}: {e}") from e
    if input_shape is not None:
        _dry_run(net, input_shape, arch_path)
    tensors = _read_weights(weights_path, net.state_dict())
    _check_indices(net, tensors, weights_path)
    net.load_state_dict(tensors, assign=True)
    left = [k for k, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:  # every parameter and buffer is in the state dict, so this is a bug, not a bad file
        raise RuntimeError(f"load_compact left {left} unloaded")
    net.input_shape = input_shape
    if memory_format == "channels_last":
        net.use_channels_last()
    if input_shape is not None:
        try:
            with torch.no_grad():
                net(torch.zeros(2, *input_shape, device="cpu"))
        except Exception as e:  # value-dependent failures: an index beyond its dimension ...
            raise ValueError(f"{directory}: the loaded model fails on an input of shape {[2, *input_shape]}: "
                             f"{e}") from e
    return net.eval()
