"""The output folder of ``structsparse run``: what is in it, and how it is written and read back.

``DIR/checkpoint/`` (one per epoch, :mod:`structsparse.storage.checkpoint`), ``DIR/log.csv`` and
``DIR/sparsity.png`` (:mod:`.runlog`), ``DIR/compact/`` (the compact model), ``DIR/trained.safetensors``
(the trained model before compaction, same shapes as the recipe's model), ``DIR/report.md`` and
``DIR/metrics.json``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from ..storage.compact_io import load_compact
from ..storage.files import atomic_write
from ..zoo.models import build_model

__all__ = ["RunError", "TRAINED", "REPORT", "METRICS", "COMPACT", "CHECKPOINT", "save_trained", "load_run",
           "write_results"]

TRAINED = "trained.safetensors"
REPORT, METRICS, COMPACT, CHECKPOINT = "report.md", "metrics.json", "compact", "checkpoint"


class RunError(ValueError):
    """A run that cannot start or a run folder that cannot be read: one line for the user, exit status 2."""


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
    metrics = json.loads(metrics_path.read_text())
    args = metrics.get("model_args")
    if args is None and Path(metrics.get("recipe", "")).is_file():  # runs from before metrics kept them
        from .recipe import load_recipe
        args = load_recipe(metrics["recipe"]).model_args
    model = build_model(metrics["model"], **(args or {}))
    try:
        model.load_state_dict(load_file(run_dir / TRAINED))
    except (OSError, RuntimeError, ValueError) as e:
        raise RunError(f"{run_dir / TRAINED}: cannot load the trained model: {e}") from e
    return model.eval(), load_compact(run_dir / COMPACT), metrics
