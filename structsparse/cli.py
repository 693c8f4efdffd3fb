"""Command line: ``structsparse run RECIPE.yaml --out DIR [--resume] [--device cpu|cuda]`` and
``structsparse bench {alexnet-table4,sweep,model} ...``.

Trains the recipe's phases (checkpoint after every epoch in ``DIR/checkpoint/``, one row per
epoch in ``DIR/log.csv``), then compacts the model, checks the compact model's test error
against the original's, measures the speedup, and writes ``DIR/compact/``, ``DIR/report.md``,
``DIR/metrics.json`` and ``DIR/sparsity.png``. Under ``torchrun`` (``WORLD_SIZE`` > 1) it
trains with DistributedDataParallel; rank 0 alone writes and compacts.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["main", "build_parser", "run_recipe", "run_bench", "load_run", "machine_info"]


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
    run.add_argument("--tensorboard", action="store_true",
                     help="also write TensorBoard scalars to OUT/tensorboard/ (needs the tensorboard package)")
    bench = sub.add_parser("bench", help="speed benchmarks (AlexNet Table 4 layers, a sparsity sweep, a run's model)",
                           description="Speed benchmarks. Timings are medians of interleaved repetitions; "
                                       "compare them only as the ratios printed, measured in the same run.")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    t4 = bsub.add_parser("alexnet-table4", help="CaffeNet conv1-conv5 at the paper's Table 4 sparsities")
    t4.add_argument("--rows", default="2,5,1,4", help="Table 4 rows (2, 5: SSL; 1, 4: l1), comma-separated")
    t4.add_argument("--groups", default="1,caffe", help="1 (groups=1 everywhere) and/or caffe (groups=2 as CaffeNet)")
    sw = bsub.add_parser("sweep", help="one AlexNet layer's speedup against column sparsity, structured vs CSR")
    sw.add_argument("--layer", default="conv3", help="AlexNet layer (conv1..conv5; groups=1)")
    md = bsub.add_parser("model", help="a run's compact model against its trained original, per layer and whole")
    md.add_argument("run_dir", help="output directory of `structsparse run`")
    md.add_argument("--onnx", action="store_true",
                    help="also export both models to ONNX (OUT/original.onnx, OUT/compact.onnx) and time them in "
                         "ONNX Runtime beside PyTorch, in the same interleaved repetitions (needs structsparse[export])")
    for p, batches, threads, repeats in ((t4, "1,64", "1,0", 10), (sw, "1", "1", 10), (md, "1,64", "1", 30)):
        p.add_argument("--batch", default=batches, help=f"batch sizes, comma-separated (default {batches})")
        p.add_argument("--threads", default=threads, help=f"thread counts, comma-separated; 0 = all cores (default {threads})")
        p.add_argument("--repeats", type=int, default=repeats, help=f"interleaved repetitions (default {repeats})")
        p.add_argument("--warmup", type=int, default=2, help="warm-up calls per implementation (default 2)")
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        p.add_argument("--out", default=None, help="directory for JSON, markdown and plots (default results/speed or RUN_DIR/bench)")
    return parser


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CLIError(f"--{what}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise CLIError(f"--{what}: expected non-negative integers, got {text!r}")
    return values


def run_bench(args: argparse.Namespace) -> None:
    """What ``structsparse bench ...`` does: run one benchmark, print markdown, write JSON/markdown/PNG."""
    from .speed import layer_bench as bench
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available on this machine")
    batches, threads = _ints(args.batch, "batch"), _ints(args.threads, "threads")
    if 0 in batches:
        raise CLIError("--batch: batch sizes must be >= 1")
    show = lambda r: print(json.dumps(r), file=sys.stderr, flush=True)  # noqa: E731  progress, one line a result
    if args.bench == "alexnet-table4":
        rows = _ints(args.rows, "rows")
        bad = [r for r in rows if r not in bench.PAPER_TABLE4]
        if bad:
            raise CLIError(f"--rows: no Table 4 row {bad}; rows are {sorted(bench.PAPER_TABLE4)}")
        groups = [g.strip() for g in args.groups.split(",")]
        if any(g not in ("1", "caffe") for g in groups):
            raise CLIError(f"--groups: expected 1 and/or caffe, got {args.groups!r}")
        out = Path(args.out or "results/speed")
        res = bench.alexnet_table4(rows, batches, threads, groups, args.repeats, args.warmup, args.device, show)
        res["command"] = "structsparse " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        md = bench.table4_markdown(res)
        bench.write(res, out, "alexnet_table4", md)
        for th in {r["threads"] for r in res["results"]}:
            for b in batches:
                for g in groups:
                    bench.table4_plot(res, out / f"alexnet_table4_t{th}_b{b}_groups-{g}.png", th, b, g)
    elif args.bench == "sweep":
        shape = next((s for s in bench.ALEXNET if s.name == args.layer), None)
        if shape is None:
            raise CLIError(f"--layer: unknown layer {args.layer!r}; choose from {[s.name for s in bench.ALEXNET]}")
        out = Path(args.out or "results/speed")
        res = bench.column_sweep(shape, batch=batches[0], threads=threads[0], repeats=args.repeats,
                                 warmup=args.warmup, device=args.device, progress=show)
        res["command"] = "structsparse " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        md = bench.sweep_markdown(res)
        bench.write(res, out, f"sweep_{args.layer}", md)
        bench.sweep_plot(res, out / f"sweep_{args.layer}.png")
    else:
        from .speed.measure import measure_speedup
        from .report import sparsity_report
        if args.onnx and args.device != "cpu":
            raise CLIError("--onnx: ONNX Runtime is timed on the CPU; use --device cpu")
        if args.onnx and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
            raise CLIError("--onnx needs onnx and onnxruntime: pip install 'structsparse[export]'")
        original, small, metrics = load_run(args.run_dir)
        out = Path(args.out or Path(args.run_dir) / "bench")
        example = torch.rand(1, *small.input_shape)
        original, small = original.to(args.device), small.to(args.device)
        speed = measure_speedup(original, small, example.to(args.device), batch_sizes=batches,
                                threads=threads[0], repeats=args.repeats, warmup=args.warmup)
        report = sparsity_report(original.cpu(), example, compacted=small.cpu())
        md = speed.to_markdown() + "\n\n" + report.to_markdown()
        res = {"benchmark": "model", "run_dir": str(args.run_dir), "speed": speed.to_dict(),
               "sparsity": report.to_dict(), "command": "structsparse " + " ".join(shlex.quote(a) for a in sys.argv[1:])}
        if args.onnx:
            from .storage.export import ONNXExportError
            try:
                res["onnx"] = bench.onnx_model_timing(original, small, example, out, batch_sizes=batches,
                                                      threads=threads[0], repeats=args.repeats, warmup=args.warmup)
            except ONNXExportError as e:
                raise CLIError(f"--onnx: {e}") from e
            md += "\n\n" + bench.onnx_markdown(res["onnx"])
        bench.write(res, out, "model", md)
    print(md)


def machine_info(measure_threads: int | None = None) -> dict:
    """:func:`structsparse.speed.measure.machine_info` plus the thread count used for measuring."""
    from .speed.measure import machine_info as info
    return {**info(), "measure_threads": measure_threads}


TRAINED = "trained.safetensors"  # the trained model before compaction, same shapes as the recipe's model


def save_trained(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save

    from .storage.files import atomic_write
    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


def load_run(run_dir: str | os.PathLike) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """The trained model, its compact model and metrics of a ``structsparse run`` output directory."""
    from safetensors.torch import load_file

    from .storage.compact_io import load_compact
    from .zoo.models import build_model
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise CLIError(f"{run_dir}: no metrics.json; is it an output directory of `structsparse run`?")
    metrics = json.loads(metrics_path.read_text())
    args = metrics.get("model_args")
    if args is None and Path(metrics.get("recipe", "")).is_file():  # runs from before metrics kept them
        from .runner.recipe import load_recipe
        args = load_recipe(metrics["recipe"]).model_args
    model = build_model(metrics["model"], **(args or {}))
    try:
        model.load_state_dict(load_file(run_dir / TRAINED))
    except (OSError, RuntimeError, ValueError) as e:
        raise CLIError(f"{run_dir / TRAINED}: cannot load the trained model: {e}") from e
    return model.eval(), load_compact(run_dir / "compact"), metrics


def run_recipe(recipe_path: str, out: str, resume: bool = False, device: str = "cpu",
               progress: bool | None = None, argv: Sequence[str] | None = None,
               on_epoch_end: Callable | None = None, tensorboard: bool = False) -> dict | None:
    """What ``structsparse run`` does; returns the metrics it writes to ``OUT/metrics.json``
    (``None`` in the processes other than rank 0 of a distributed run, which write nothing)."""
    from .runner import distributed
    from .storage.checkpoint import has_checkpoint
    from .compaction.surgery import compact
    from .storage.compact_io import save_compact
    from .speed.measure import measure_speedup
    from .runner.recipe import load_recipe
    from .report import sparsity_report
    from .runner.runlog import RunLog
    from .runner.trainer import Trainer, evaluate, load_splits

    recipe = load_recipe(recipe_path)
    try:
        world = distributed.env_world_size()
        if world > 1:
            distributed.local_batch_size(recipe.batch_size, world)
    except ValueError as e:
        raise CLIError(f"{recipe_path}: {e}") from None
    if device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available in this PyTorch build or on this machine "
                       f"(torch {torch.__version__}); use --device cpu")
    out_dir = Path(out)
    ckpt_dir = out_dir / "checkpoint"
    if has_checkpoint(ckpt_dir) and not resume:
        raise CLIError(f"{out_dir} already holds a checkpoint ({ckpt_dir}); pass --resume to continue it, "
                       "or choose another --out directory")

    t0 = time.perf_counter()
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

        trainer = Trainer(recipe, splits, device=dev, checkpoint_dir=ckpt_dir, progress=progress,
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
    train_s = time.perf_counter() - t0
    if not main_rank:
        return None
    model = trainer.finish()

    example = splits["test"].images[:1]
    with torch.no_grad():
        small = compact(model, example, lowered_below=recipe.lowered_below)
    report = sparsity_report(model, example, compacted=small)
    test_original = results["test_error"]
    test_compact = evaluate(small, splits["test"], recipe.eval_batch_size)
    m = recipe.measure
    speed = measure_speedup(model, small, example, batch_sizes=m.batch_sizes, threads=m.threads,
                            repeats=m.repeats, warmup=m.warmup)
    save_compact(small, out_dir / "compact")
    save_trained(model, out_dir / TRAINED)

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
        f"{machine['threads']} threads (measure threads: {m.threads or 'default'})  \nDate: {date}",
        "## Test error\n\n" + errors_md + ("\n\n**The compact model's test error differs from the original's.**"
                                           if mismatch else ""),
        "## Validation error at the end of each phase\n\n" + val_md
        + ("\n\n(train_with_val: the val images were trained on, so these are not held-out errors.)"
           if recipe.train_with_val else ""),
        "## Sparsity\n\n" + report.to_markdown(),
        "## Measured speed\n\n" + speed.to_markdown(),
    ]) + "\n"
    metrics = {
        "recipe": str(recipe_path), "model": recipe.model, "model_args": recipe.model_args, "data": recipe.data, "command": command, "machine": machine, "date": date,
        "device": device, "world_size": world, "train_seconds": train_s,
        "test_error": {"original": test_original, "compact": test_compact},
        "val_error": results["val_error"], "train_with_val": recipe.train_with_val, "history": results["history"],
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
    from .storage.checkpoint import CheckpointError
    from .runner.recipe import RecipeError
    from .runner.trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    # Under torchrun every process meets these errors alike; rank 0 alone reports them.
    say = (lambda msg: print(msg, file=sys.stderr)) if os.environ.get("RANK", "0") == "0" else (lambda msg: None)
    try:
        if args.command == "run":
            run_recipe(args.recipe, args.out, resume=args.resume, device=args.device,
                       progress=False if args.no_progress else None,
                       argv=list(argv) if argv is not None else None, tensorboard=args.tensorboard)
        elif args.command == "bench":
            run_bench(args)
    except (CLIError, RecipeError, CheckpointError) as e:
        say(f"structsparse: error: {e}")
        return 2
    except TrainingDiverged as e:
        say(f"structsparse: error: {e}")
        return 1
    except KeyboardInterrupt:
        print("structsparse: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
