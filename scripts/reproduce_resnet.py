#!/usr/bin/env python
"""ResNet-20 on Fashion-MNIST: dense baseline, SSL depth, SSL channels, as verifiable compact models.

Run a recipe into ``runs/resnet/`` (or take a finished run) and assemble ``results/resnet/<row>/``::

    python scripts/reproduce_resnet.py dense --recipe recipes/fmnist/resnet20_dense.yaml
    python scripts/reproduce_resnet.py depth --candidates runs/resnet/depth_015 runs/resnet/depth_03

``--candidates`` lists every run tried for the row; the chosen one is recorded with all
candidates' validation errors and structures (selection on validation error only).

    python scripts/reproduce_resnet.py --verify     # every results/resnet/*/model gives its test_error
    python scripts/reproduce_resnet.py --table      # rewrite the table in results/resnet/README.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_mnist import LAYER_KEYS, _final_val, _kept_summary, _structsparse_cmd, copy_run, exit_status, verify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "resnet"
ROWS = {"dense": "ResNet-20 dense", "depth": "ResNet-20 SSL depth", "channel": "ResNet-20 SSL channels"}
DATA = "fashion-mnist"
# Targets of the issue, relative to the dense row: error within these many points, FLOPs / structure.
TARGETS = {"depth": {"error_slack": 0.003, "blocks_removed": 2}, "channel": {"error_slack": 0.005, "flop_ratio": 1.8}}


def blocks(model) -> dict[str, list[int]]:
    """Per stage: [residual blocks whose branch still computes something, blocks]."""
    names = {n for n, _ in model.named_modules()}
    out: dict[str, list[int]] = {}
    for n in sorted(names):
        m = re.fullmatch(r"(layer\d+)\.(\d+)", n)
        if m:
            kept = any(f"{n}.conv{i}" in names for i in (1, 2))
            out.setdefault(m.group(1), [0, 0])
            out[m.group(1)][0] += kept
            out[m.group(1)][1] += 1
    return out


def conv_layers(model) -> int:
    from torch import nn

    from structsparse.compaction.kernels import LoweredConv2d

    return sum(isinstance(m, (nn.Conv2d, LoweredConv2d)) for m in model.modules())


def _structure_met(row: str, m: dict, dense: dict | None) -> bool:
    """Whether a run reaches the row's structural target (blocks removed, or fewer FLOPs than dense)."""
    from structsparse import load_compact

    if row == "depth":
        kept = blocks(load_compact(Path(m["run_dir"]) / "compact"))
        return sum(k[1] - k[0] for k in kept.values()) >= TARGETS["depth"]["blocks_removed"]
    if row == "channel" and dense is not None:
        return dense["sparsity"]["compact_flop_fraction"] / m["sparsity"]["compact_flop_fraction"] >= \
            TARGETS["channel"]["flop_ratio"]
    return True


def _select(row: str, candidates: list[Path]) -> Path:
    """Among the candidates that reach the row's structural target (if any does), the one with the
    lowest final validation error (ties: fewer multiply-adds). Test errors are not looked at."""
    ms = {c: {**json.loads((c / "metrics.json").read_text()), "run_dir": str(c)} for c in candidates}
    dense_path = RESULTS / "dense" / "metrics.json"
    dense = None
    if dense_path.is_file():
        dense = {"sparsity": {"compact_flop_fraction": json.loads(dense_path.read_text())["compact_flop_fraction"]}}
    ok = [c for c in candidates if _structure_met(row, ms[c], dense)] or candidates
    return min(ok, key=lambda c: (round(_final_val(ms[c]), 4), ms[c]["sparsity"]["compact_flop_fraction"]))


def assemble(row: str, run_dir: Path, candidates: list[Path] | None = None, rule: str | None = None) -> dict:
    """Write results/resnet/<row>/ from a finished ``structsparse run`` directory."""
    from structsparse import load_compact
    from structsparse.zoo.data import load_dataset
    from structsparse.runner.trainer import Split, evaluate

    m = json.loads((run_dir / "metrics.json").read_text())
    if m["data"] != DATA:
        raise SystemExit(f"{run_dir}: a run on {m['data']}, the ResNet rows are on {DATA}")
    out = RESULTS / row
    copy_run(run_dir, out, m["recipe"], extras=("log.csv", "sparsity.png"))
    model = load_compact(out / "model").eval()
    test = Split(*load_dataset(DATA, "test"))
    err = evaluate(model, test, 1000)
    if err != m["test_error"]["compact"]:
        raise SystemExit(f"{out}/model: reloaded test error {err} differs from the run's {m['test_error']['compact']}")
    cands = []
    for c in candidates or [run_dir]:
        cm = json.loads((c / "metrics.json").read_text())
        cands.append({"run": str(c), "recipe": cm["recipe"], "val_error": _final_val(cm), "kept": _kept_summary(cm),
                      "compact_flop_fraction": cm["sparsity"]["compact_flop_fraction"],
                      "chosen": c.resolve() == run_dir.resolve()})
    params = sum(p.numel() for p in model.parameters())
    speed, bench = m.get("speed"), run_dir / "bench" / "model.json"
    if bench.is_file():  # measured again by `structsparse bench model RUN_DIR` (quieter machine)
        b = json.loads(bench.read_text())
        speed = {**b["speed"], "command": b.get("command")}
        shutil.copytree(run_dir / "bench", out / "bench")
    result = {
        "row": ROWS[row], "name": row, "data": DATA,
        "test_error": err, "test_wrong": round(err * len(test)), "test_images": len(test),
        "test_error_original": m["test_error"]["original"],
        "val_error": _final_val(m), "val_error_by_phase": m["val_error"],
        "blocks_kept": blocks(model), "conv_layers_kept": conv_layers(model), "params_compact": params,
        "layers": [{k: r.get(k) for k in LAYER_KEYS} for r in m["sparsity"]["layers"]],
        "flop_fraction": m["sparsity"]["flop_fraction"],
        "compact_flop_fraction": m["sparsity"]["compact_flop_fraction"],
        "recipe": m["recipe"], "command": m["command"], "machine": m["machine"], "date": m["date"],
        "train_seconds": m["train_seconds"], "speed": speed,
        "selection": {"rule": rule or "single run, λs fixed before training (no selection)", "candidates": cands},
        "assembled_by": "python scripts/reproduce_resnet.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"{out}: test error {100 * err:.2f}%, blocks {result['blocks_kept']}, "
          f"multiply-adds {100 * result['compact_flop_fraction']:.1f}%")
    return result


def _speed(r: dict, batch: int) -> str:
    for s in (r.get("speed") or {}).get("rows", []):
        if s["scope"] == "model" and s["batch"] == batch:
            return f"{s['speedup']:.2f}×"
    return "–"


def table(results: Path = RESULTS) -> str:
    rs = {p.parent.name: json.loads(p.read_text()) for p in sorted(results.glob("*/metrics.json"))}
    lines = ["| row | test error | blocks kept per stage | conv layers | multiply-adds | params | "
             "measured speedup b1 / b64 | target |", "|---|---|---|---|---|---|---|---|"]
    base = rs.get("dense")
    for name in ROWS:
        r = rs.get(name)
        if r is None:
            continue
        stages = ", ".join(f"{k[0]}/{k[1]}" for k in r["blocks_kept"].values())
        target = "–"
        if base is not None and name in TARGETS:
            t = TARGETS[name]
            ok_err = r["test_error"] <= base["test_error"] + t["error_slack"]
            if name == "depth":
                removed = sum(k[1] - k[0] for k in r["blocks_kept"].values())
                ok = ok_err and removed >= t["blocks_removed"]
                target = f"≥ {t['blocks_removed']} blocks removed, error ≤ dense + {100 * t['error_slack']:.1f}: " \
                         f"{'met' if ok else 'MISSED'}"
            else:
                ratio = base["compact_flop_fraction"] / r["compact_flop_fraction"]
                ok = ok_err and ratio >= t["flop_ratio"]
                target = f"≥ {t['flop_ratio']}× fewer FLOPs ({ratio:.2f}×), error ≤ dense + " \
                         f"{100 * t['error_slack']:.1f}: {'met' if ok else 'MISSED'}"
        lines.append(f"| {ROWS[name]} | {100 * r['test_error']:.2f}% | {stages} | {r['conv_layers_kept']} | "
                     f"{100 * r['compact_flop_fraction']:.1f}% | {r['params_compact']:,} | "
                     f"{_speed(r, 1)} / {_speed(r, 64)} | {target} |")
    return "\n".join(lines)


def write_table(readme: Path = RESULTS / "README.md") -> None:
    text = readme.read_text(encoding="utf-8")
    start, end = "<!-- table -->", "<!-- /table -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: add the markers {start} and {end} where the table goes")
    head, rest = text.split(start, 1)
    readme.write_text(head + start + "\n" + table() + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("row", nargs="?", choices=list(ROWS))
    ap.add_argument("--recipe", help="run this recipe (into runs/resnet/<recipe stem>) and assemble it")
    ap.add_argument("--from-run", help="assemble from this finished run directory")
    ap.add_argument("--candidates", nargs="+", help="all runs tried for the row; without --from-run the one "
                    "with the lowest validation error is chosen")
    ap.add_argument("--verify", action="store_true", help="check every results/resnet/*/model against its test_error")
    ap.add_argument("--table", action="store_true", help="rewrite the table of results/resnet/README.md")
    args = ap.parse_args(argv)
    os.chdir(ROOT)
    if args.verify:
        return exit_status(verify(RESULTS, DATA, set(ROWS.values()), row_key="row"))
    if args.table:
        write_table()
        return 0
    if args.row is None:
        ap.error("name a row, or pass --verify or --table")
    cands = [Path(c) for c in args.candidates] if args.candidates else None
    rule = None
    if args.from_run:
        run_dir = Path(args.from_run)
    elif args.recipe:
        run_dir = Path("runs/resnet") / Path(args.recipe).stem
        cmd = _structsparse_cmd() + ["run", args.recipe, "--out", str(run_dir), "--no-progress"]
        if (run_dir / "checkpoint").exists():
            cmd.append("--resume")
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        subprocess.run(cmd, check=True)
    elif cands:
        run_dir = _select(args.row, cands)
        rule = ("among the candidates that reach the row's structural target (blocks removed / FLOP ratio), "
                "the lowest final validation error; test errors not looked at")
        print(f"{args.row}: selected {run_dir}")
    else:
        ap.error("give --recipe, --from-run or --candidates")
    assemble(args.row, run_dir, cands, rule)
    return 0


if __name__ == "__main__":
    sys.exit(main())
