#!/usr/bin/env python
"""ResNet-20 on Fashion-MNIST: dense baseline, SSL depth, SSL channels, as verifiable compact models.

Run a recipe into ``runs/resnet/`` (or take a finished run) and assemble ``results/fmnist/resnet20/<row>/``::

    python scripts/reproduce_resnet.py dense --recipe recipes/fmnist/resnet20_dense.yaml
    python scripts/reproduce_resnet.py depth --candidates runs/resnet/resnet20_depth_02 runs/resnet/resnet20_depth_08

``--candidates`` lists every run tried for the row; the chosen one is recorded with all
candidates' validation errors and structures (selection on validation error only).

    python scripts/reproduce_resnet.py --verify     # every results/fmnist/resnet20/*/model gives its test_error
    python scripts/reproduce_resnet.py --table      # rewrite the table in results/fmnist/resnet20/README.md

What these do is in ``experiments/resnet.py``; this is its command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the experiments package, from a plain checkout

from experiments.resnet import DATA, RESULTS, ROWS, SELECTION_RULE, assemble, select, write_table  # noqa: E402
from experiments.runs import run_recipe, verify, verify_or_table  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("row", nargs="?", choices=list(ROWS))
    ap.add_argument("--recipe", help="run this recipe (into runs/resnet/<recipe stem>) and assemble it")
    ap.add_argument("--from-run", help="assemble from this finished run directory")
    ap.add_argument("--candidates", nargs="+", help="all runs tried for the row; without --from-run the one "
                    "with the lowest validation error is chosen")
    ap.add_argument("--verify", action="store_true", help="check every results/fmnist/resnet20/*/model against its "
                    "test_error")
    ap.add_argument("--table", action="store_true", help="rewrite the table of results/fmnist/resnet20/README.md")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    done = verify_or_table(args, lambda: verify(RESULTS, DATA, set(ROWS.values()), row_key="row"), write_table)
    if done is not None:
        return done
    if args.row is None:
        ap.error("name a row, or pass --verify or --table")
    cands = [Path(c) for c in args.candidates] if args.candidates else None
    rule = None
    if args.from_run:
        run_dir = Path(args.from_run)
    elif args.recipe:
        run_dir = Path("runs/resnet") / Path(args.recipe).stem
        run_recipe(args.recipe, run_dir)
    elif cands:
        run_dir = select(args.row, cands)
        rule = SELECTION_RULE
        print(f"{args.row}: selected {run_dir}")
    else:
        ap.error("give --recipe, --from-run or --candidates")
    assemble(args.row, run_dir, cands, rule)
    return 0


if __name__ == "__main__":
    sys.exit(main())
