"""The output folder of ``structsparse run``: what is in it, and how it is written and read back.

``DIR/checkpoint/`` (one per epoch, :mod:`structsparse.storage.checkpoint`), ``DIR/log.csv`` and
``DIR/sparsity.png`` (:mod:`.runlog`), ``DIR/compact/`` (the compact model), ``DIR/trained.safetensors``
(the trained model before compaction, same shapes as the recipe's model), ``DIR/report.md`` and
``DIR/metrics.json``; ``DIR/.lock`` holds the pid of the run that uses the folder (:func:`locked`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..storage.compact_io import load_compact
from ..storage.files import atomic_write
from ..zoo.models import build_model

__all__ = ["RunError", "TRAINED", "REPORT", "METRICS", "COMPACT", "CHECKPOINT", "LOCK", "save_trained", "load_run",
           "write_results", "locked"]

TRAINED = "trained.safetensors"
REPORT, METRICS, COMPACT, CHECKPOINT = "report.md", "metrics.json", "compact", "checkpoint"
LOCK = ".lock"


class RunError(ValueError):
    """A run that cannot start or a run folder that cannot be read: one line for the user, exit status 2."""


@contextlib.contextmanager
def locked(out_dir: Path):
    """An exclusive lock (``fcntl.flock``) on a run folder, held while the block runs: a second run on the
    same folder fails at once, naming the folder and the pid of the run that holds it. The kernel drops the
    lock when the process ends, however it ends. Temporary files that a killed run left are removed."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"{out_dir}: cannot use this folder for the run: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunError(f"{out_dir} is in use by another run (pid {holder}); wait for it to end, or choose "
                           "another --out directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        for orphan in [*out_dir.glob(".*.tmp"), *out_dir.glob("*/.*.tmp")]:  # left by a killed run
            orphan.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


def save_trained(model: torch.nn.Module, path: Path) -> None:
    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


def write_results(out_dir: Path, report_md: str, metrics: dict) -> None:
    """``report.md`` and ``metrics.json``, each written atomically (a kill leaves the old file or the new one)."""
    atomic_write(out_dir / REPORT, report_md.encode("utf-8"))
    atomic_write(out_dir / METRICS, (json.dumps(metrics, indent=1) + "\n").encode("utf-8"))


def load_run(run_dir: str | os.PathLike) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """The trained model, its compact model and metrics of a ``structsparse run`` output directory."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS
    if not metrics_path.is_file():
        raise RunError(f"{run_dir}: no metrics.json; is it an output directory of `structsparse run`?")
    try:
        metrics = json.loads(metrics_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # unreadable, truncated, not UTF-8, nested too deep
        raise RunError(f"{metrics_path}: cannot read: {str(e)[:200]}") from None
    if not isinstance(metrics, dict):
        raise RunError(f"{metrics_path}: not the metrics of a run (expected a JSON object)")
    args = metrics.get("model_args")
    recipe = metrics.get("recipe")
    if args is None and isinstance(recipe, str) and recipe.endswith((".yaml", ".yml")) and Path(recipe).is_file():
        from .recipe import RecipeError, load_recipe  # runs from before metrics kept the arguments
        try:
            args = load_recipe(recipe).model_args
        except RecipeError:
            raise RunError(f"{metrics_path}: no model_args, and its recipe {recipe[:200]} does not load") from None
    if not isinstance(args, (dict, type(None))):
        raise RunError(f"{metrics_path}: model_args must be an object")
    try:
        model = build_model(metrics.get("model"), **(args or {}))
    except (TypeError, ValueError) as e:
        raise RunError(f"{metrics_path}: {str(e)[:300]}") from None
    try:
        model.load_state_dict(load_file(run_dir / TRAINED))
    except (OSError, RuntimeError, ValueError) as e:
        raise RunError(f"{run_dir / TRAINED}: cannot load the trained model: {e}") from e
    return model.eval(), load_compact(run_dir / COMPACT), metrics
