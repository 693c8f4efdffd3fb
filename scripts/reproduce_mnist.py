#!/usr/bin/env python
"""Reproduce the paper's MNIST rows (LeNet 1-5, MLP 1-3) as verifiable compact models.

Run a recipe into ``runs/mnist/`` and assemble ``results/mnist/table/<name>/``::

    python scripts/reproduce_mnist.py lenet2                      # structsparse run recipes/mnist/lenet2.yaml ...
    python scripts/reproduce_mnist.py lenet2 --recipe recipes/mnist/search/lenet2_b.yaml --run-dir runs/mnist/lenet2_b
    python scripts/reproduce_mnist.py lenet3 --from-run runs/mnist/lenet3_b --candidates runs/mnist/lenet3 runs/mnist/lenet3_b

Without ``--recipe`` the row's committed recipe ``recipes/mnist/<name>.yaml`` is run (a final run on
train + val: assembled alone, its val error is not held out; the committed rows were assembled with
``--candidates ... --refit``, as ``results/mnist/README.md`` shows). ``--from-run`` assembles from a
finished run without training. ``--candidates`` lists every run tried for the row (the chosen one
included); the chosen run is recorded with all candidates' validation errors and kept structures,
so the choice can be checked.

``--refit`` names a final run: the recipe of the run chosen among ``--candidates`` with only
``train_with_val: true`` added (all 60,000 training images, as the paper's Caffe LeNet and MLP
were trained); the row is then that run, and its validation error the chosen candidate's::

    python scripts/reproduce_mnist.py lenet2 --candidates runs/mnist/lenet2 runs/mnist/lenet2_b --refit runs/mnist/lenet2_b_final

Check every committed result (load the compact model, evaluate on the 10k MNIST test
images, compare with the recorded ``test_error``)::

    python scripts/reproduce_mnist.py --verify

Repeat a row with other seeds (recipes ``recipes/mnist/seeds/<name>_s1.yaml``, ``_s2.yaml``: the row's
recipe with only ``seed`` changed), then record all seeds (seed 0 = the committed result) under
``seeds`` in ``results/mnist/table/<name>/metrics.json``: per seed the command, run directory, test
error, kept structures and FLOP fractions; over the seeds mean, std, min and max::

    python scripts/reproduce_mnist.py lenet2 --seeds runs/mnist/lenet2_b_final_s1 runs/mnist/lenet2_b_final_s2

Rewrite the tables of ``results/mnist/README.md`` (between the ``<!-- table -->`` markers)::

    python scripts/reproduce_mnist.py --table

What these do is in the ``experiments`` package (``experiments/mnist_*.py``); this is its command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the experiments package, from a plain checkout

from experiments.mnist import ORDER, PAPER_ROWS, RECIPES, RESULTS  # noqa: E402
from experiments.mnist_assemble import assemble  # noqa: E402
from experiments.mnist_seeds import add_seeds  # noqa: E402
from experiments.mnist_select import (SELECTION_RULE, add_candidates, not_given, recorded_candidates,  # noqa: E402
                                      select)
from experiments.mnist_tables import write_tables  # noqa: E402
from experiments.runs import run_recipe, verify, verify_or_table  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", choices=ORDER, help="the row to run and assemble")
    ap.add_argument("--recipe", help=f"recipe (default {RECIPES}/NAME.yaml, the row's committed recipe)")
    ap.add_argument("--run-dir", help="structsparse run output directory (default runs/mnist/<recipe stem>)")
    ap.add_argument("--from-run", help="assemble from this finished run directory instead of training")
    ap.add_argument("--candidates", nargs="+", help="all runs tried for this row (recorded with their val errors); "
                    "without --from-run or --recipe, the selection rule picks the run to assemble among them")
    ap.add_argument("--recorded", action="store_true", help="with --candidates: also the candidates recorded in "
                    "the committed results/mnist/table/NAME/metrics.json whose run directories are not given (they "
                    "may be gone); the rule is applied to all, and they stay recorded")
    ap.add_argument("--refit", metavar="RUN_DIR", help="the final run: the selected run's recipe with "
                    "train_with_val: true; the row is assembled from it")
    ap.add_argument("--rule", help="how the chosen run was selected (recorded in metrics.json)")
    ap.add_argument("--verify", action="store_true", help="check every results/mnist/table/*/model against its "
                    "test_error")
    ap.add_argument("--table", action="store_true", help="rewrite the tables of results/mnist/README.md")
    ap.add_argument("--seeds", nargs="+", metavar="RUN_DIR", help="finished runs of NAME's recipe with other seeds: "
                    "record them with the committed result (seed 0) under `seeds` in its metrics.json")
    return ap


def row_run(args, records: list[dict], prior: list[dict] | None) -> Path | None:
    """The run to assemble the row from: given, selected among the candidates, or trained now; None where
    the committed choice stands (the new candidates are then only recorded)."""
    if args.from_run:
        return Path(args.from_run)
    if args.candidates and not args.recipe:
        run_dir = select(args.name, [Path(c) for c in args.candidates] + records, prior)
        if isinstance(run_dir, dict):
            add_candidates(args.name, [Path(c) for c in args.candidates], prior)
            return None
        args.rule = args.rule or SELECTION_RULE
        print(f"{args.name}: selected {run_dir}")
        return run_dir
    recipe = args.recipe or f"{RECIPES}/{args.name}.yaml"
    run_dir = Path(args.run_dir or f"runs/mnist/{Path(recipe).stem}")
    run_recipe(recipe, run_dir)
    return run_dir


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    done = verify_or_table(args, lambda: verify(RESULTS, "mnist", PAPER_ROWS, "paper_row"), write_tables)
    if done is not None:
        return done
    if args.name is None:
        ap.error("name a row, or pass --verify or --table")
    prior = recorded_candidates(args.name, []) if args.recorded else None
    records = not_given(prior, args.candidates or []) if args.recorded else []
    if args.seeds:
        add_seeds(args.name, [Path(d) for d in args.seeds])
        return 0
    run_dir = row_run(args, records, prior)
    if run_dir is None:
        return 0
    cands = [Path(c) for c in args.candidates] if args.candidates else None
    if cands and run_dir.resolve() not in {c.resolve() for c in cands}:
        cands.append(run_dir)
    if cands:
        cands += records
    assemble(args.name, run_dir, cands, args.rule, Path(args.refit) if args.refit else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
