"""Command line: ``structsparse run RECIPE.yaml --out DIR [--resume] [--device cpu|cuda]``.

Trains the recipe's phases (checkpoint after every epoch in ``DIR/checkpoint/``), then
compacts the model, checks the compact model's test error against the original's,
measures the speedup, and writes ``DIR/compact/``, ``DIR/report.md`` and ``DIR/metrics.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["main", "build_parser", "run_recipe", "machine_info"]


class CLIError(Exception):
    """A usage problem reported as one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structsparse", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="train a recipe, compact the model, measure the speedup",
                         description="Train a recipe's phases, compact the model, measure the speedup.")
    run.add_argument("recipe", help="recipe YAML file (see recipes/)")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--resume", action="store_true",
                     help="continue from the last completed epoch in OUT/checkpoint/")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="training device (default cpu)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (they are off when stderr is not a terminal)")
    return parser


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(measure_threads: int | None = None) -> dict:
    info = {"platform": platform.platform(), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "measure_threads": measure_threads}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def run_recipe(recipe_path: str, out: str, resume: bool = False, device: str = "cpu",
               progress: bool | None = None, argv: Sequence[str] | None = None,
               on_epoch_end: Callable | None = None) -> dict:
    """What ``structsparse run`` does; returns the metrics it writes to ``OUT/metrics.json``."""
    from .checkpoint import has_checkpoint
    from .compact import compact
    from .io import save_compact
    from .measure import measure_speedup
    from .recipe import load_recipe
    from .report import sparsity_report
    from .train import Trainer, evaluate, load_splits

    recipe = load_recipe(recipe_path)
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available in this PyTorch build or on this machine "
                       f"(torch {torch.__version__}); use --device cpu")
    out_dir = Path(out)
    ckpt_dir = out_dir / "checkpoint"
    if has_checkpoint(ckpt_dir) and not resume:
        raise CLIError(f"{out_dir} already holds a checkpoint ({ckpt_dir}); pass --resume to continue it, "
                       "or choose another --out directory")
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    splits = load_splits(recipe, device)
    trainer = Trainer(recipe, splits, device=device, checkpoint_dir=ckpt_dir, progress=progress,
                      on_epoch_end=on_epoch_end)
    results = trainer.run(resume=resume)
    train_s = time.perf_counter() - t0
    model = trainer.finish()

    example = splits["test"].images[:1]
    with torch.no_grad():
        small = compact(model, example)
    report = sparsity_report(model, example)
    test_original = results["test_error"]
    test_compact = evaluate(small, splits["test"], recipe.eval_batch_size)
    m = recipe.measure
    speed = measure_speedup(model, small, example, batch_sizes=m.batch_sizes, threads=m.threads,
                            repeats=m.repeats, warmup=m.warmup)
    save_compact(small, out_dir / "compact")

    n_test = len(splits["test"])
    mismatch = test_original != test_compact
    errors_md = "\n".join([
        "| model | test error |", "|---|---|",
        f"| original | {100 * test_original:.2f}% ({round(test_original * n_test)}/{n_test}) |",
        f"| compact | {100 * test_compact:.2f}% ({round(test_compact * n_test)}/{n_test}) |",
    ])
    command = "structsparse " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    machine = machine_info(m.threads)
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    val_md = "\n".join(["| phase | val error |", "|---|---|"] +
                       [f"| {name} | {100 * err:.2f}% |" for name, err in results["val_error"].items()])
    report_md = "\n\n".join([
        f"# {Path(recipe_path).name}: {recipe.model} on {recipe.data}",
        f"Command: `{command}`  \nMachine: {machine['cpu']}, {machine['platform']}, torch {machine['torch']}, "
        f"{machine['torch_threads']} threads (measure threads: {m.threads or 'default'})  \nDate: {date}",
        "## Test error\n\n" + errors_md + ("\n\n**The compact model's test error differs from the original's.**"
                                           if mismatch else ""),
        "## Validation error at the end of each phase\n\n" + val_md,
        "## Sparsity\n\n" + report.to_markdown(),
        "## Measured speed\n\n" + speed.to_markdown(),
    ]) + "\n"
    metrics = {
        "recipe": str(recipe_path), "command": command, "machine": machine, "date": date,
        "device": device, "train_seconds": train_s,
        "test_error": {"original": test_original, "compact": test_compact},
        "val_error": results["val_error"], "history": results["history"],
        "sparsity": report.to_dict(), "speed": speed.to_dict(),
    }
    (out_dir / "report.md").write_text(report_md, encoding="utf-8")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
    print(report_md)
    if mismatch:
        print(f"warning: compact test error {test_compact:.4%} differs from original {test_original:.4%}",
              file=sys.stderr)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .recipe import RecipeError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            run_recipe(args.recipe, args.out, resume=args.resume, device=args.device,
                       progress=False if args.no_progress else None,
                       argv=list(argv) if argv is not None else None)
    except (CLIError, RecipeError, CheckpointError) as e:
        print(f"structsparse: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("structsparse: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
