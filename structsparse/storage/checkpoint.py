"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds ``checkpoint.json`` and the ``state-*.safetensors`` file it names, and
``checkpoint.prev.json`` (the checkpoint before, with its own tensors file): when the newest is damaged,
:func:`load_checkpoint` falls back to the previous one and says so. The tensors file (model weights, optimizer state tensors such as momentum
buffers, torch RNG states, group masks) is written first, under a new name; the JSON
(progress, metrics, optimizer hyper-parameters, the file name and its SHA-256) is written
last. Both go through a temporary file in the same directory, ``fsync`` and
``os.replace``, so a crash at any point leaves the previous checkpoint intact and loadable.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..checks import is_int
from .files import atomic_write

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "has_checkpoint", "CheckpointError",
           "optimizer_state_to_flat", "optimizer_state_from_flat", "rng_state", "set_rng_state"]

FORMAT = "structsparse-checkpoint"
VERSION = 1
INDEX, PREVIOUS = "checkpoint.json", "checkpoint.prev.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    optimizer: dict | None           # a torch optimizer state_dict, or None
    masks: dict[str, torch.Tensor] | None
    rng: dict[str, Any]              # {"cpu": ByteTensor, "cuda": [ByteTensor, ...]}
    info: dict                       # whatever JSON the trainer stored (progress, metrics, ...)
    note: str | None = None          # set when the newest checkpoint was damaged and this is the previous one


# --------------------------------------------------------------------------- optimizer, RNG

def optimizer_state_to_flat(state: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into tensors (``optimizer.<param>.<name>``) and JSON."""
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{pid}.{name}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> dict:
    """Inverse of :func:`optimizer_state_to_flat`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": [dict(g) for g in meta["param_groups"]]}


def rng_state() -> dict[str, Any]:
    """The torch RNG states (CPU, and every CUDA device once CUDA is initialised)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load

def has_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / INDEX).is_file() or (Path(directory) / PREVIOUS).is_file()


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, info: Mapping,
                    optimizer: torch.optim.Optimizer | None = None,
                    masks: Mapping[str, torch.Tensor] | None = None, tag: str = "") -> Path:
    """Write a checkpoint into ``directory`` atomically; returns the path of ``checkpoint.json``.

    ``info`` must be JSON-able; it is returned as :attr:`Checkpoint.info` by
    :func:`load_checkpoint`. ``tag`` becomes part of the tensor file's name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "optimizer": None, "masks": None}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = optimizer_state_to_flat(optimizer.state_dict())
        tensors.update({k: v.cpu() for k, v in opt_tensors.items()})
    if masks is not None:
        meta["masks"] = sorted(masks)
        tensors.update({f"masks.{k}": v.detach().cpu().to(torch.bool).contiguous() for k, v in masks.items()})
    rng = rng_state()
    tensors["rng.cpu"] = rng["cpu"]
    for i, s in enumerate(rng.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = s
    data = st_save(tensors)

    # A new name every time, so the file the current JSON points to is never overwritten.
    digest = hashlib.sha256(data).hexdigest()
    state_name = f"state-{tag + '-' if tag else ''}{digest[:12]}.safetensors"
    atomic_write(directory / state_name, data)
    meta.update(state_file=state_name, sha256=digest, info=dict(info))
    keep = {state_name}
    if (directory / INDEX).is_file():  # the newest so far becomes the previous one
        current = (directory / INDEX).read_bytes()
        atomic_write(directory / PREVIOUS, current)
        keep.add(_state_file(current))
    atomic_write(directory / INDEX, json.dumps(meta, indent=1, sort_keys=True).encode())
    # Only now are older tensor files unreferenced.
    for old in directory.glob("state-*.safetensors"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return directory / INDEX


def _state_file(index_bytes: bytes) -> str | None:
    """The tensors file an index names (None if it cannot be read: nothing to keep for it)."""
    try:
        name = json.loads(index_bytes.decode("utf-8")).get("state_file")
    except (ValueError, AttributeError, RecursionError):
        return None
    return name if isinstance(name, str) else None


_INDEX_KEYS = {"format", "version", "optimizer", "masks", "state_file", "sha256", "info"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"0|[1-9][0-9]*")  # a parameter id or a device index, as str(int) writes it


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def _check_index(meta, index: Path) -> None:
    """``checkpoint.json`` has the schema :func:`save_checkpoint` writes; else a CheckpointError
    naming the file and the field."""
    def bad(field: str, what: str) -> CheckpointError:
        return CheckpointError(f"{index}: {field}: {what}")

    if not isinstance(meta, dict):
        raise CheckpointError(f"{index}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT or not is_int(meta.get("version")) or meta["version"] != VERSION:
        raise CheckpointError(f"{index}: not a {FORMAT} version {VERSION} file")
    missing, unknown = sorted(_INDEX_KEYS - set(meta)), sorted(set(meta) - _INDEX_KEYS)
    if missing:
        raise CheckpointError(f"{index}: missing fields {missing}")
    if unknown:
        raise CheckpointError(f"{index}: unknown fields {unknown}")
    name = meta["state_file"]
    if not (isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name
            and not any(c in name for c in "/\\\0")):
        raise bad("state_file", f"must be the name of a file in the checkpoint directory, got {name!r}")
    if not (isinstance(meta["sha256"], str) and _SHA256.fullmatch(meta["sha256"])):
        raise bad("sha256", f"must be 64 lowercase hex digits, got {meta['sha256']!r}")
    if not isinstance(meta["info"], dict):
        raise bad("info", f"must be an object, got {type(meta['info']).__name__}")
    masks = meta["masks"]
    if masks is not None and not (isinstance(masks, list) and all(isinstance(m, str) and m for m in masks)
                                  and len(set(masks)) == len(masks)):
        raise bad("masks", "must be null or a list of distinct names")
    opt = meta["optimizer"]
    if opt is None:
        return
    if not isinstance(opt, dict) or "param_groups" not in opt or not set(opt) <= {"param_groups", "scalars"}:
        raise bad("optimizer", "must be null or an object with 'param_groups' and 'scalars'")
    groups, ids = opt["param_groups"], []
    if not isinstance(groups, list):
        raise bad("optimizer.param_groups", "must be a list")
    for i, g in enumerate(groups):
        if not (isinstance(g, dict) and isinstance(g.get("params"), list)
                and all(is_int(p) and p >= 0 for p in g["params"])):
            raise bad(f"optimizer.param_groups[{i}]", "must be an object whose 'params' is a list of parameter ids")
        for key, value in g.items():  # hyper-parameters: lr, momentum, betas, nesterov, foreach ...
            if key != "params" and not (_is_scalar(value) or (isinstance(value, list)
                                                              and all(_is_scalar(v) for v in value))):
                raise bad(f"optimizer.param_groups[{i}].{key}", f"must be a number, string, boolean, null or a "
                          f"list of them, got {value!r}"[:300])
        ids += g["params"]
    if len(set(ids)) != len(ids):
        raise bad("optimizer.param_groups", "a parameter id is listed twice")
    scalars = opt.get("scalars", {})
    if not isinstance(scalars, dict):
        raise bad("optimizer.scalars", "must be an object")
    for pid, values in scalars.items():
        if not (_ID.fullmatch(pid) and int(pid) in ids):
            raise bad("optimizer.scalars", f"{pid!r} is not a parameter id of param_groups")
        if not isinstance(values, dict):
            raise bad(f"optimizer.scalars.{pid}", "must be an object")


def _split_tensors(tensors: Mapping[str, torch.Tensor], meta: dict, path: Path) -> tuple[dict, dict, dict, dict]:
    """Model, optimizer, mask and RNG tensors by name; a CheckpointError naming ``path`` and the
    tensor for a name outside the scheme (model.*, optimizer.<id>.*, masks.*, rng.cpu, rng.cuda.<i>)
    or a tensor that cannot be what its name says."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor {key!r}: {what}")

    opt_meta = meta["optimizer"]
    ids = {p for g in opt_meta["param_groups"] for p in g["params"]} if opt_meta is not None else set()
    scalars = opt_meta.get("scalars", {}) if opt_meta is not None else {}
    model, opt, masks, rng, cuda = {}, {}, {}, None, {}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head == "model" and rest:
            model[rest] = value
        elif head == "optimizer":
            pid, _, name = rest.partition(".")
            if opt_meta is None:
                raise bad(key, f"optimizer state, but the optimizer field of {INDEX} is null")
            if not (_ID.fullmatch(pid) and int(pid) in ids and name):
                raise bad(key, "not optimizer.<parameter id of param_groups>.<name>")
            if name in scalars.get(pid, {}):
                raise bad(key, f"also stored in {INDEX} optimizer.scalars")
            opt[key] = value
        elif head == "masks" and rest:
            masks[rest] = value
        elif key == "rng.cpu":
            rng = value
        elif head == "rng" and rest.startswith("cuda.") and _ID.fullmatch(rest[5:]):
            if value.dtype != torch.uint8 or value.dim() != 1 or not value.numel():
                raise bad(key, f"a CUDA RNG state is a non-empty 1-D uint8 tensor, got {value.dtype} "
                          f"{list(value.shape)}")
            cuda[int(rest[5:])] = value
        else:
            raise bad(key, "not a model., optimizer., masks. or rng. tensor of a checkpoint")
    if rng is None:
        raise CheckpointError(f"{path}: no tensor 'rng.cpu' (the CPU random number generator state)")
    try:
        with torch.random.fork_rng(devices=[]):  # restores the current state afterwards
            torch.set_rng_state(rng)
    except (RuntimeError, TypeError, ValueError) as e:
        raise bad("rng.cpu", f"not a CPU random number generator state: {e}") from None
    if sorted(cuda) != list(range(len(cuda))):
        raise CheckpointError(f"{path}: CUDA RNG states rng.cuda.<i> must be numbered 0 to n-1, got {sorted(cuda)}")
    if meta["masks"] is None:
        if masks:
            raise bad(f"masks.{next(iter(masks))}", f"a mask, but the masks field of {INDEX} is null")
    else:
        if set(masks) != set(meta["masks"]):
            raise CheckpointError(f"{path}: mask tensors {sorted(masks)} do not match the masks listed in "
                                  f"{INDEX}: {sorted(meta['masks'])}")
        for name, mask in masks.items():  # a layer name masks its weight; a parameter name, that parameter
            target = model.get(name, model.get(f"{name}.weight"))
            if mask.dtype != torch.bool:
                raise bad(f"masks.{name}", f"a mask must be bool, got {mask.dtype}")
            if target is None or target.shape != mask.shape:
                raise bad(f"masks.{name}", f"shape {list(mask.shape)} does not match a model tensor "
                          f"{name!r} or {name + '.weight'!r}")
    return model, opt, masks, {"cpu": rng, "cuda": [cuda[i] for i in sorted(cuda)]}


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read the checkpoint in ``directory`` (verifying the tensor file's SHA-256).

    Anything wrong -- an unreadable or malformed ``checkpoint.json``, a missing, corrupt or
    inconsistent tensor file -- raises :class:`CheckpointError` naming the file and the field
    or tensor, unless the previous checkpoint (``checkpoint.prev.json``) reads: then that one is
    returned, with :attr:`Checkpoint.note` saying why. Nothing is unpickled.
    """
    directory = Path(directory)
    try:
        return _load(directory / INDEX, map_location)
    except CheckpointError as newest:
        if not (directory / PREVIOUS).is_file():
            raise
        try:
            c = _load(directory / PREVIOUS, map_location)
        except CheckpointError:
            raise newest from None
        c.note = f"{newest}; continuing from the checkpoint before it ({directory / PREVIOUS})"
        return c


def _load(index: Path, map_location) -> Checkpoint:
    directory = index.parent
    try:
        meta = json.loads(index.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, not JSON/UTF-8, huge ints, deep nesting
        raise CheckpointError(f"{index}: cannot read checkpoint index: {str(e)[:200]}") from None
    _check_index(meta, index)
    path = directory / meta["state_file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint tensors: {e}") from None
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 does not match {index}; the checkpoint is corrupt")
    try:
        tensors = st_load(data)
    except Exception as e:  # the safetensors parser's errors (SafetensorError, unknown dtypes ...)
        raise CheckpointError(f"{path}: not a safetensors file: {e}") from None
    model, opt, masks, rng = _split_tensors(tensors, meta, path)
    model, opt, masks = ({k: v.to(map_location) for k, v in part.items()} for part in (model, opt, masks))
    optimizer = None if meta["optimizer"] is None else optimizer_state_from_flat(opt, meta["optimizer"])
    return Checkpoint(model=model, optimizer=optimizer, masks=None if meta["masks"] is None else masks,
                      rng=rng, info=meta["info"])
