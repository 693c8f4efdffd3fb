"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds ``checkpoint.json`` and the one ``state-*.safetensors`` file
it names. The tensors file (model weights, optimizer state tensors such as momentum
buffers, torch RNG states, group masks) is written first, under a new name; the JSON
(progress, metrics, optimizer hyper-parameters, the file name and its SHA-256) is written
last. Both go through a temporary file in the same directory, ``fsync`` and
``os.replace``, so a crash at any point leaves the previous checkpoint intact and loadable.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .files import atomic_write

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "has_checkpoint", "CheckpointError",
           "optimizer_state_to_flat", "optimizer_state_from_flat", "rng_state", "set_rng_state"]

FORMAT = "structsparse-checkpoint"
VERSION = 1
INDEX = "checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not belong to this run."""


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]
    optimizer: dict | None           # a torch optimizer state_dict, or None
    masks: dict[str, torch.Tensor] | None
    rng: dict[str, Any]              # {"cpu": ByteTensor, "cuda": [ByteTensor, ...]}
    info: dict                       # whatever JSON the trainer stored (progress, metrics, ...)


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
    return (Path(directory) / INDEX).is_file()


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
    atomic_write(directory / INDEX, json.dumps(meta, indent=1, sort_keys=True).encode())
    # Only now are older tensor files unreferenced.
    for old in directory.glob("state-*.safetensors"):
        if old.name != state_name:
            old.unlink(missing_ok=True)
    return directory / INDEX


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read the checkpoint in ``directory`` (verifying the tensor file's SHA-256)."""
    directory = Path(directory)
    index = directory / INDEX
    try:
        meta = json.loads(index.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{index}: cannot read checkpoint index: {e}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{index}: not a {FORMAT} version {VERSION} file")
    path = directory / meta["state_file"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read checkpoint tensors: {e}") from None
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 does not match {index}; the checkpoint is corrupt")
    tensors = st_load(data)
    model, opt, masks, rng = {}, {}, {}, {"cpu": None, "cuda": []}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head == "model":
            model[rest] = value.to(map_location)
        elif head == "optimizer":
            opt[key] = value.to(map_location)
        elif head == "masks":
            masks[rest] = value.to(map_location)
        elif key == "rng.cpu":
            rng["cpu"] = value
        elif head == "rng":
            rng["cuda"].append((int(rest.rsplit(".", 1)[1]), value))
    rng["cuda"] = [v for _, v in sorted(rng["cuda"])]
    optimizer = None if meta["optimizer"] is None else optimizer_state_from_flat(opt, meta["optimizer"])
    return Checkpoint(model=model, optimizer=optimizer, masks=None if meta["masks"] is None else masks,
                      rng=rng, info=meta["info"])
