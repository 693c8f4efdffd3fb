"""How well does the per-layer latency table estimate a compact model's time?

For each ``--model`` (random weights, each filter scaled by a random factor in [0, 2) so that the groups' norms
differ, as after some SSL), a :class:`structsparse.speed.table.LatencyTable` is built at batch 1 (one thread),
then for each ``--targets`` fraction the filters and channels are zeroed to that latency budget
(``zero_to_budget_(..., latency=f)``), the model is compacted, and the compact model is timed with
:func:`structsparse.measure_speedup` against the dense model in the same forms (the table's reference) and
against the plain dense model. The figure is the table's estimate against the measured fraction.

    .venv/bin/python benchmarks/latency_table.py [--models lenet resnet20] [--targets 0.8 0.6 0.4] [--out DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structsparse import GroupLasso, compact, measure_speedup  # noqa: E402
from structsparse.budget import zero_to_budget_  # noqa: E402
from structsparse.report import count_macs  # noqa: E402
from structsparse.speed.measure import SAME_FORMS  # noqa: E402
from structsparse.speed.table import LatencyTable  # noqa: E402
from structsparse.timing import machine_info  # noqa: E402
from structsparse.zoo.models import build_model  # noqa: E402

INPUTS = {"lenet": (1, 28, 28), "resnet20": (3, 32, 32)}


def _trained_like(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(torch.rand(m.weight.shape[0], *[1] * (m.weight.dim() - 1)) * 2)
    return model


def run(name: str, targets: list[float], repeats: int) -> list[dict]:
    dense = _trained_like(name)
    x = torch.rand(2, *INPUTS[name])
    table = LatencyTable.build(dense, x)
    print(f"{name}: dense {1e3 * table.reference:.3f} ms; outside the layers {table.rest} "
          f"{len(table.layers)} layers", flush=True)
    rows = []
    for target in targets:
        model = copy.deepcopy(dense)
        gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3}, example_input=x)
        result = zero_to_budget_(gl, x, latency=target, table=table)
        small = compact(model, x, channels_last=False)
        speed = measure_speedup(model, small, x[:1], batch_sizes=(1,), repeats=repeats, layers=False)
        row = {"model": name, "target": target, "estimated": result.reached,
               "flops": count_macs(small, x) / count_macs(model, x),
               "measured_same_forms": 1 / speed.speedup(SAME_FORMS, 1),
               "measured_dense": 1 / speed.speedup("model", 1),
               "ci_same_forms": [1 / v for v in reversed(next(r["speedup_ci"] for r in speed.rows
                                                              if r["scope"] == SAME_FORMS))],
               "warnings": speed.warnings()}
        rows.append(row)
        print(f"{name} target {target:.2f}: estimated {row['estimated']:.3f}, "
              f"measured {row['measured_same_forms']:.3f} "
              f"[{row['ci_same_forms'][0]:.3f}-{row['ci_same_forms'][1]:.3f}] of the dense model in the same forms, "
              f"{row['measured_dense']:.3f} of the plain dense model; FLOPs {row['flops']:.3f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["lenet", "resnet20"], choices=sorted(INPUTS))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.8, 0.6, 0.4])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None, help="write latency_table.json here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [r for name in args.models for r in run(name, args.targets, args.repeats)]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        out = {"command": " ".join(["python", "benchmarks/latency_table.py", *(argv or sys.argv[1:])]),
               "machine": machine_info(measure_threads=1), "rows": rows}
        (args.out / "latency_table.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
