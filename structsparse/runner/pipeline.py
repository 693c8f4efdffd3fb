"""What ``structsparse run`` does: train a recipe's phases, compact the model, check the compact model's
test error against the original's, measure the speedup, and write the run folder (:mod:`.rundir`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel; rank 0 alone compacts
and writes.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..compaction import compact
from ..report import SparsityReport, sparsity_report
from ..speed.measure import SAME_FORMS, SpeedReport, measure_speedup
from ..storage.checkpoint import has_checkpoint
from ..storage.compact_io import save_compact
from ..timing import machine_info
from . import distributed
from .recipe import Recipe, load_recipe
from .rundir import CHECKPOINT, COMPACT, TRAINED, RunError, locked, save_trained, write_results
from .runlog import RunLog
from .trainer import Split, Trainer, budget_text, evaluate, load_splits

__all__ = ["run_recipe"]


def run_recipe(recipe_path: str, out: str, resume: bool = False, device: str = "cpu",
               progress: bool | None = None, argv: Sequence[str] | None = None,
               on_epoch_end: Callable | None = None, tensorboard: bool = False) -> dict | None:
    """What ``structsparse run`` does; returns the metrics it writes to ``OUT/metrics.json``
    (``None`` in the processes other than rank 0 of a distributed run, which write nothing)."""
    recipe = load_recipe(recipe_path)
    # Rank 0 of a distributed run writes the folder; it alone holds the lock.
    world = _check_start(recipe, recipe_path, device)
    with locked(Path(out)) if distributed.env_is_main() else contextlib.nullcontext():
        ckpt_dir = Path(out) / CHECKPOINT
        if has_checkpoint(ckpt_dir) and not resume:
            raise RunError(f"{out} already holds a checkpoint ({ckpt_dir}); pass --resume to continue it, "
                           "or choose another --out directory")
        t0 = time.perf_counter()
        trained = _train(recipe, recipe_path, Path(out), resume, device, world, progress, on_epoch_end, tensorboard)
        if trained is None:
            return None
        trainer, splits, results = trained
        command = "structsparse " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        run = {"recipe": str(recipe_path), "command": command, "device": device, "world_size": world,
               "train_seconds": time.perf_counter() - t0}
        return _finish(recipe, trainer.finish(), splits, results, Path(out), run)


def _check_start(recipe: Recipe, recipe_path: str, device: str) -> int:
    """The world size, once the recipe and the device are found fit for a run."""
    try:
        world = distributed.env_world_size()
        if world > 1:
            distributed.local_batch_size(recipe.batch_size, world)
    except ValueError as e:
        raise RunError(f"{recipe_path}: {e}") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda: CUDA is not available in this PyTorch build or on this machine "
                       f"(torch {torch.__version__}); use --device cpu")
    if recipe.data_root is not None and not Path(recipe.data_root).is_dir():
        raise RunError(f"{recipe_path}: data_root {recipe.data_root} is not a directory; fix the path, or create "
                       "it first (data is fetched into it)")
    return world


def _train(recipe: Recipe, recipe_path: str, out_dir: Path, resume: bool, device: str, world: int,
           progress: bool | None, on_epoch_end: Callable | None, tensorboard: bool):
    """Train every phase (in a process group when ``world`` > 1); ``(trainer, splits, results)`` on
    rank 0, ``None`` elsewhere."""
    dev = distributed.init_from_env(device) if world > 1 else torch.device(device)
    try:
        main_rank = distributed.is_main()
        if main_rank:
            out_dir.mkdir(parents=True, exist_ok=True)
        else:
            distributed.barrier()   # rank 0 fills the data cache first
        splits = load_splits(recipe, dev)
        if main_rank:
            distributed.barrier()
        runlog = RunLog(out_dir, tensorboard=tensorboard, title=f"{Path(recipe_path).name}: {recipe.model} on "
                        f"{recipe.data}") if main_rank else None

        def epoch_end(trainer: Trainer, p: int, e: int) -> None:
            if runlog is not None:
                runlog.update(trainer.history)
            if on_epoch_end is not None:
                on_epoch_end(trainer, p, e)

        trainer = Trainer(recipe, splits, device=dev, checkpoint_dir=out_dir / CHECKPOINT, progress=progress,
                          on_epoch_end=epoch_end)
        try:
            results = trainer.run(resume=resume)
        except BaseException:
            if runlog is not None:   # the logs of the epochs that were checkpointed
                try:
                    runlog.close(trainer.history)
                except Exception:  # noqa: BLE001  never hide the error that stopped training
                    pass
            raise
        if runlog is not None:
            runlog.close(trainer.history)
        distributed.barrier()
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return (trainer, splits, results) if main_rank else None


def _finish(recipe: Recipe, model: torch.nn.Module, splits: dict[str, Split], results: dict, out_dir: Path,
            run: dict) -> dict:
    """Compact, evaluate, measure, save and report (rank 0); each step says what it does on stderr."""
    start = time.perf_counter()
    example = splits["test"].images[:1]
    _say("compacting the trained model")
    with torch.no_grad():
        small = compact(model, example, lowered_below=recipe.lowered_below)
    report = sparsity_report(model, example, compacted=small)
    _say(f"test error of the compact model ({len(splits['test']):,} images)")
    test = {"original": results["test_error"], "compact": evaluate(small, splits["test"], recipe.eval_batch_size)}
    m = recipe.measure
    _say(f"measuring the speedup: batch {', '.join(map(str, m.batch_sizes))}, {m.repeats} interleaved repetitions")
    speed = measure_speedup(model, small, example, batch_sizes=m.batch_sizes, threads=m.threads,
                            repeats=m.repeats, warmup=m.warmup)
    if "budget" in results:
        results = {**results, "budget": _measured_latency(results["budget"], speed, m.latency_batch)}
    save_compact(small, out_dir / COMPACT)
    save_trained(model, out_dir / TRAINED)
    run = {**run, "total_seconds": run["train_seconds"] + time.perf_counter() - start}
    machine = machine_info(measure_threads=m.threads)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    report_md = _report_markdown(recipe, run, machine, date, test, len(splits["test"]), results, report, speed)
    metrics = {
        "recipe": run["recipe"], "model": recipe.model, "model_args": recipe.model_args, "data": recipe.data,
        "command": run["command"], "machine": machine, "date": date, "device": run["device"],
        "world_size": run["world_size"], "train_seconds": run["train_seconds"],
        "total_seconds": run["total_seconds"], "test_error": test,
        "val_error": results["val_error"], "train_with_val": recipe.train_with_val, "history": results["history"],
        "sparsity": report.to_dict(), "speed": speed.to_dict(),
        **({"budget": results["budget"]} if "budget" in results else {}),
    }
    write_results(out_dir, report_md, metrics)
    print(report_md)
    if test["original"] != test["compact"]:
        print(f"warning: compact test error {test['compact']:.4%} differs from original {test['original']:.4%}",
              file=sys.stderr)
    return metrics


def _latency_cell(measured: dict | None) -> str:
    if not measured or "model" not in measured:
        return "-"
    same = measured.get(SAME_FORMS)
    return f"{measured['model']:.3f}" + ("" if same is None else f" ({same:.3f})")


def _measured_latency(budgets: dict[str, dict], speed: SpeedReport, batch: int) -> dict[str, dict]:
    """``budgets`` (phase → what its budget reached), each with ``measured``: the compact model's time at batch
    ``batch`` over the dense model's and over the dense model's in the same forms, as measured at the end of the
    run (a latency budget itself counts with the run's latency table, at that batch size)."""
    measured = {"batch": batch}
    for scope in ("model", SAME_FORMS):
        with contextlib.suppress(KeyError):  # a row the run did not measure
            measured[scope] = 1 / speed.speedup(scope, batch)
    return {name: {**b, "measured": measured} for name, b in budgets.items()}


def _say(what: str) -> None:
    """A progress line on stderr (stdout carries the report)."""
    print(f"structsparse: {what} ...", file=sys.stderr, flush=True)


def _report_markdown(recipe: Recipe, run: dict, machine: dict, date: str, test: dict, n_test: int, results: dict,
                     report: SparsityReport, speed: SpeedReport) -> str:
    errors_md = "\n".join(["| model | test error |", "|---|---|"] + [
        f"| {k} | {100 * v:.2f}% ({round(v * n_test)}/{n_test}) |" for k, v in test.items()])
    val_md = "\n".join(["| phase | val error |", "|---|---|"] +
                       [f"| {name} | {100 * err:.2f}% |" for name, err in results["val_error"].items()])
    return "\n\n".join([
        f"# {Path(run['recipe']).name}: {recipe.model} on {recipe.data}",
        f"Command: `{run['command']}`  \nMachine: {machine['cpu']}, {machine['platform']}, torch {machine['torch']}, "
        f"{machine['threads']} threads (measure threads: {recipe.measure.threads or 'default'})  \nDate: {date}  \n"
        f"Time: {run['total_seconds']:.0f} s in all, {run['train_seconds']:.0f} s of it training",
        "## Test error\n\n" + errors_md + ("\n\n**The compact model's test error differs from the original's.**"
                                           if test["original"] != test["compact"] else ""),
        "## Validation error at the end of each phase\n\n" + val_md
        + ("\n\n(train_with_val: the val images were trained on, so these are not held-out errors.)"
           if recipe.train_with_val else ""),
        *(["## Budget\n\n" + "\n".join(
            ["| phase | target and reached after compaction (of the dense model's) | measured: of the dense "
             f"model's latency at batch {recipe.measure.latency_batch} (in the same forms) |", "|---|---|---|"]
            + [f"| {name} | {budget_text(b)}{' (estimated)' if b.get('metric') == 'latency' else ''} | "
               f"{_latency_cell(b.get('measured'))} |" for name, b in results["budget"].items()])]
          if "budget" in results else []),
        "## Sparsity\n\n" + report.to_markdown(),
        "## Measured speed\n\n" + speed.to_markdown(),
    ]) + "\n"
