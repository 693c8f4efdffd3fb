"""Command line: ``structsparse run RECIPE.yaml --out DIR [--resume] [--device cpu|cuda]`` and
``structsparse bench {alexnet-table4,sweep,model} ...``.

Arguments only: ``run`` is :func:`structsparse.runner.pipeline.run_recipe`, ``bench`` is
:mod:`structsparse.runner.bench`. Errors are mapped to exit codes: bad input 2, a diverged run 1,
an interrupt 130.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Sequence

# torch and the rest load inside main(), so that a Ctrl-C while they load is answered with one line

__all__ = ["main", "build_parser", "run_bench"]


class CLIError(Exception):
    """A usage problem with the arguments, reported as one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structsparse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
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
        p.add_argument("--out", default=None, help="directory for JSON, markdown and plots (default "
                       "runs/bench/alexnet_table4, runs/bench/sweep/bBATCH or RUN_DIR/bench: never the committed "
                       "results/)")
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
    """What ``structsparse bench ...`` does: parse the arguments, run the benchmark, print its markdown."""
    import torch

    from .runner import bench
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available on this machine")
    batches, threads = _ints(args.batch, "batch"), _ints(args.threads, "threads")
    if 0 in batches:
        raise CLIError("--batch: batch sizes must be >= 1")
    show = lambda r: print(json.dumps(r), file=sys.stderr, flush=True)  # noqa: E731  progress, one line a result
    command = "structsparse " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    common = dict(repeats=args.repeats, warmup=args.warmup, device=args.device, command=command)
    if args.bench == "alexnet-table4":
        groups = [g.strip() for g in args.groups.split(",")]
        md = bench.table4(_ints(args.rows, "rows"), batches, threads, groups,
                          out=Path(args.out or "runs/bench/alexnet_table4"),
                          progress=show, **common)
    elif args.bench == "sweep":
        out = Path(args.out or f"runs/bench/sweep/b{batches[0]}")
        md = bench.sweep(args.layer, batches[0], threads[0], out=out, progress=show, **common)
    else:
        if args.onnx and args.device != "cpu":
            raise CLIError("--onnx: ONNX Runtime is timed on the CPU; use --device cpu")
        if args.onnx and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
            raise CLIError("--onnx needs onnx and onnxruntime: pip install 'structsparse[export]'")
        md = bench.model(args.run_dir, batches, threads[0], out=Path(args.out or Path(args.run_dir) / "bench"),
                         onnx=args.onnx, **common)
    print(md)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, which ends a run as Ctrl-C does."""


def _terminate(signum, frame):
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # also during start-up (imports, argument parsing)
        print("structsparse: interrupted; continue with --resume", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv: Sequence[str] | None) -> int:
    from safetensors import SafetensorError

    from .runner.distributed import env_is_main
    from .runner.pipeline import run_recipe
    from .runner.recipe import RecipeError
    from .runner.rundir import RunError
    from .runner.trainer import TrainingDiverged
    from .storage.checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    # Under torchrun every process meets these errors alike; rank 0 alone reports them.
    say = (lambda msg: print(msg, file=sys.stderr)) if env_is_main() else (lambda msg: None)
    try:
        if args.command == "run":
            run_recipe(args.recipe, args.out, resume=args.resume, device=args.device,
                       progress=False if args.no_progress else None,
                       argv=list(argv) if argv is not None else None, tensorboard=args.tensorboard)
        elif args.command == "bench":
            run_bench(args)
    except (CLIError, RunError, RecipeError, CheckpointError) as e:
        say(f"structsparse: error: {e}")
        return 2
    except TrainingDiverged as e:
        say(f"structsparse: error: {e}")
        return 1
    except (*_USER_ERRORS, SafetensorError) as e:  # a bad file, value or environment no check further in named
        if args.debug:
            raise
        say(f"structsparse: error: {_one_line(e)} (--debug shows where)")
        return 2
    return 0


# Errors a user's input or environment can cause deep inside (a loader's ValueError, a full disk, a file
# that is not UTF-8, JSON or safetensors (SafetensorError, added in _main), nesting too deep): one line each,
# the traceback under --debug.
_USER_ERRORS = (ValueError, OSError, RecursionError, UnicodeError)


def _one_line(e: BaseException) -> str:
    """The error as one bounded line; an OSError with its file name."""
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    elif isinstance(e, RecursionError):
        text = "an input nests too deeply"
    else:
        text = str(e) or type(e).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


if __name__ == "__main__":
    sys.exit(main())
