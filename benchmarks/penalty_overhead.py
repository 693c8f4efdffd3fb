"""How much the group-Lasso term adds to a training step.

Times one SGD step of LeNet (or ``--model``) (batch 64, cross-entropy, momentum 0.9) with and without
``GroupLasso.penalty()`` (by default filter + channel + shape groups on every Conv2d and Linear
layer) added to the loss. The two variants run interleaved, in blocks of ``--steps``
steps, after a warm-up; the figure is the median over ``--repeats`` blocks of the ratio
(with / without) measured in the same block pair, plus the per-step medians.

    .venv/bin/python benchmarks/penalty_overhead.py [--threads N] [--repeats 30] [--method prox] [--compile] [--profile]
                                                    [--out FILE.json]
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structsparse.zoo.models import build_model  # noqa: E402
from structsparse.timing import machine_info  # noqa: E402
from structsparse.sparsity.penalty import GroupLasso  # noqa: E402


def make_step(model, gl, x, y, method="penalty", lr=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        if gl is not None and method == "penalty":
            loss = loss + gl.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gl is not None and method == "prox":
            gl.prox_step(optimizer=opt)

    return step


def time_block(step, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def image_shape(model: str, given: str | None) -> tuple[int, ...]:
    """One image's shape: ``given`` ("C,H,W"), else 1×28×28 for the MNIST models and 3×32×32 for the others."""
    return tuple(int(v) for v in (given or ("1,28,28" if model in ("lenet", "mlp") else "3,32,32")).split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lenet")
    p.add_argument("--input", default=None, metavar="C,H,W", help="one image's shape (default: see image_shape)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=30, help="interleaved block pairs")
    p.add_argument("--steps", type=int, default=20, help="steps per block")
    p.add_argument("--warmup", type=int, default=30, help="warm-up steps per variant")
    p.add_argument("--lam", type=float, default=1e-4, help="λ of every kind (does not change the cost)")
    p.add_argument("--kinds", default="filter,channel,shape", help="comma-separated group kinds on every layer")
    p.add_argument("--method", choices=("penalty", "prox"), default="penalty",
                   help="penalty: gl.penalty() added to the loss (the default); prox: gl.prox_step() after opt.step()")
    p.add_argument("--compile", action="store_true",
                   help="GroupLasso(..., compiled=True): the penalty through torch.compile (with --method penalty)")
    p.add_argument("--profile", action="store_true", help="also profile the penalty step (torch.profiler)")
    p.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())

    torch.manual_seed(0)
    base = build_model(args.model)
    x = torch.rand(args.batch, *image_shape(args.model, args.input))
    y = torch.randint(0, 10, (args.batch,))
    plain_model, pen_model = copy.deepcopy(base), copy.deepcopy(base)
    spec = {kind: args.lam for kind in args.kinds.split(",")}
    gl = GroupLasso(pen_model, spec, compiled=args.compile)
    plain = make_step(plain_model, None, x, y)
    with_pen = make_step(pen_model, gl, x, y, args.method)

    for _ in range(args.warmup):
        plain()
        with_pen()
    t_plain, t_pen, ratios = [], [], []
    for r in range(args.repeats):
        order = (plain, with_pen) if r % 2 == 0 else (with_pen, plain)
        times = {f: time_block(f, args.steps) for f in order}
        t_plain.append(times[plain])
        t_pen.append(times[with_pen])
        ratios.append(times[with_pen] / times[plain])

    mp, mq = statistics.median(t_plain), statistics.median(t_pen)
    ratio = statistics.median(ratios)
    q = statistics.quantiles(ratios, n=4)
    what = "gl.penalty() in the loss" if args.method == "penalty" else "gl.prox_step() after the step"
    what += ", compiled" if args.compile else ""
    print(f"group-term overhead ({what}): {args.model}, batch {args.batch}, SGD step, groups {'+'.join(spec)} on "
          f"{', '.join(t.name for t in gl.terms)}")
    print(f"  step without group term: {1e3 * mp:.3f} ms (median of {args.repeats} blocks of {args.steps})")
    print(f"  step with group term: {1e3 * mq:.3f} ms")
    print(f"  overhead: {100 * (ratio - 1):+.1f}%  (ratio {ratio:.3f}, q1-q3 {q[0]:.3f}-{q[2]:.3f}, "
          f"paired per block)")
    m = machine_info(measure_threads=torch.get_num_threads())
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    command = f"python benchmarks/penalty_overhead.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    print(f"  machine: {m['cpu']}, {m['platform']}, {torch.get_num_threads()} threads; torch {m['torch']}; {when}")
    print(f"  command: {command}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": command, "date": when, "machine": m, "model": args.model, "method": args.method,
            "compiled": args.compile,
            "batch": args.batch, "groups": list(spec), "step_ms": 1e3 * mp, "step_with_term_ms": 1e3 * mq,
            "overhead": ratio - 1, "ratio_quartiles": [q[0], q[2]], "ratios": ratios}, indent=1))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                with_pen()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return 0


if __name__ == "__main__":
    sys.exit(main())
