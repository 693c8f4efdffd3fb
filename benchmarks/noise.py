"""Does a busy machine make ``measure_speedup`` claim a speedup that is not there?

Times a model against an exact copy of itself (``--model``, random weights, eval mode) ``--runs`` times with
:func:`structsparse.measure_speedup` (whole model, batch sizes ``--batch``, its default repetitions), while
``--load`` background processes keep the machine busy: each spins for a random 5–50 ms and sleeps for a random
0–50 ms, so that the load comes and goes within a measurement, as other users' jobs do. A sound measurement
reports every such ratio "not significant" (its interval includes 1×); the figure is how many runs did.

    .venv/bin/python benchmarks/noise.py [--runs 20] [--load 2] [--model lenet] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structsparse import measure_speedup  # noqa: E402
from structsparse.timing import machine_info  # noqa: E402
from structsparse.zoo.models import build_model  # noqa: E402

INPUTS = {"lenet": (1, 28, 28), "resnet20": (3, 32, 32)}


def _busy(seed: int, stop) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        end = time.perf_counter() + rng.uniform(5e-3, 50e-3)
        while time.perf_counter() < end:
            pass
        time.sleep(rng.uniform(0.0, 50e-3))


def run(model_name: str, runs: int, load: int, batch: list[int]) -> dict:
    torch.manual_seed(0)
    model = build_model(model_name).eval()
    twin = copy.deepcopy(model)
    x = torch.rand(1, *INPUTS[model_name])
    stop = mp.get_context("spawn").Event()
    workers = [mp.get_context("spawn").Process(target=_busy, args=(i, stop), daemon=True) for i in range(load)]
    for w in workers:
        w.start()
    rows = []
    try:
        for i in range(runs):
            report = measure_speedup(model, twin, x, batch_sizes=batch, layers=False, seed=i)
            for r in report.rows:
                rows.append({"run": i, "batch": r["batch"], "speedup": r["speedup"], "ci": r["speedup_ci"],
                             "significant": r["significant"], "spread": r["spread"],
                             "busy_warning": any("busy" in w for w in report.warnings())})
                print(f"run {i + 1:2d}/{runs} batch {r['batch']:3d}: {r['speedup']:.3f}× "
                      f"[{r['speedup_ci'][0]:.3f}–{r['speedup_ci'][1]:.3f}] spread {r['spread']:.0%}"
                      f"{'  SIGNIFICANT' if r['significant'] else ''}", flush=True)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=5)
    return {"model": model_name, "runs": runs, "load": load, "batch": batch, "rows": rows,
            "not_significant": {b: sum(not r["significant"] for r in rows if r["batch"] == b) for b in batch},
            "machine": machine_info(measure_threads=1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lenet", choices=sorted(INPUTS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--load", type=int, default=2, help="background processes that keep the machine busy")
    ap.add_argument("--batch", default="1,64", help="batch sizes, comma-separated")
    ap.add_argument("--out", default=None, help="folder for noise.json (default: print only)")
    args = ap.parse_args(argv)
    res = run(args.model, args.runs, args.load, [int(b) for b in args.batch.split(",")])
    for b, n in res["not_significant"].items():
        print(f"batch {b}: {n} of {args.runs} runs report the model against itself as not significant")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "noise.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
