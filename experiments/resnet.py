"""ResNet-20 on Fashion-MNIST: dense baseline, SSL depth, SSL channels, committed as
``results/fmnist/resnet20/<row>/``."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from .runs import (NO_SELECTION, ROOT, command_line, copy_run, final_val, kept_summary, read_json, reload_checked,
                   result_layers, run_metrics, write_between_markers, write_json)

RESULTS = ROOT / "results" / "fmnist" / "resnet20"
SCRIPT = "scripts/reproduce_resnet.py"
ROWS = {"dense": "ResNet-20 dense", "depth": "ResNet-20 SSL depth", "channel": "ResNet-20 SSL channels"}
DATA = "fashion-mnist"
# Targets of the issue, relative to the dense row: error within these many points, FLOPs / structure.
TARGETS = {"depth": {"error_slack": 0.003, "blocks_removed": 2}, "channel": {"error_slack": 0.005, "flop_ratio": 1.8}}
SELECTION_RULE = ("among the candidates that reach the row's structural target (blocks removed / FLOP ratio), "
                  "the lowest final validation error; test errors not looked at")


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


def structure_met(row: str, m: dict, dense: dict | None) -> bool:
    """Whether a run reaches the row's structural target (blocks removed, or fewer FLOPs than dense)."""
    from structsparse import load_compact

    if row == "depth":
        kept = blocks(load_compact(Path(m["run_dir"]) / "compact"))
        return sum(k[1] - k[0] for k in kept.values()) >= TARGETS["depth"]["blocks_removed"]
    if row == "channel" and dense is not None:
        return dense["sparsity"]["compact_flop_fraction"] / m["sparsity"]["compact_flop_fraction"] >= \
            TARGETS["channel"]["flop_ratio"]
    return True


def select(row: str, candidates: list[Path], results: Path = RESULTS) -> Path:
    """:data:`SELECTION_RULE`: among the candidates that reach the row's structural target (if any does), the one
    with the lowest final validation error (ties: fewer multiply-adds). Test errors are not looked at."""
    ms = {c: {**run_metrics(c), "run_dir": str(c)} for c in candidates}
    dense_path = results / "dense" / "metrics.json"
    dense = None
    if dense_path.is_file():
        dense = {"sparsity": {"compact_flop_fraction": read_json(dense_path)["compact_flop_fraction"]}}
    ok = [c for c in candidates if structure_met(row, ms[c], dense)] or candidates
    return min(ok, key=lambda c: (round(final_val(ms[c]), 4), ms[c]["sparsity"]["compact_flop_fraction"]))


def candidate_entry(c: Path, chosen: bool) -> dict:
    """How a candidate run is recorded in its row's ``selection``."""
    cm = run_metrics(c)
    return {"run": str(c), "recipe": cm["recipe"], "val_error": final_val(cm), "kept": kept_summary(cm),
            "compact_flop_fraction": cm["sparsity"]["compact_flop_fraction"], "chosen": chosen}


def bench_speed(m: dict, run_dir: Path, out: Path) -> dict | None:
    """The run's speed: measured again by ``structsparse bench model RUN_DIR`` (quieter machine, copied into
    ``out/bench``) where it was, else the run's own."""
    speed, bench = m.get("speed"), run_dir / "bench" / "model.json"
    if bench.is_file():
        b = read_json(bench)
        speed = {**b["speed"], "command": b.get("command")}
        shutil.copytree(run_dir / "bench", out / "bench")
    return speed


def assemble(row: str, run_dir: Path, candidates: list[Path] | None = None, rule: str | None = None,
             results: Path = RESULTS) -> dict:
    """Write ``results/<row>/`` (default ``results/fmnist/resnet20/<row>/``) from a finished ``structsparse run``
    directory."""
    m = run_metrics(run_dir)
    if m["data"] != DATA:
        raise SystemExit(f"{run_dir}: a run on {m['data']}, the ResNet rows are on {DATA}")
    out = results / row
    copy_run(run_dir, out, m["recipe"], extras=("log.csv", "sparsity.png"))
    model, err, test = reload_checked(out, DATA, m["test_error"]["compact"])
    cands = [candidate_entry(c, c.resolve() == run_dir.resolve()) for c in candidates or [run_dir]]
    result = {
        "row": ROWS[row], "name": row, "data": DATA,
        "test_error": err, "test_wrong": round(err * len(test)), "test_images": len(test),
        "test_error_original": m["test_error"]["original"],
        "val_error": final_val(m), "val_error_by_phase": m["val_error"],
        "blocks_kept": blocks(model), "conv_layers_kept": conv_layers(model),
        "params_compact": sum(p.numel() for p in model.parameters()),
        "layers": result_layers(m), "flop_fraction": m["sparsity"]["flop_fraction"],
        "compact_flop_fraction": m["sparsity"]["compact_flop_fraction"],
        "recipe": m["recipe"], "command": m["command"], "machine": m["machine"], "date": m["date"],
        "train_seconds": m["train_seconds"], "speed": bench_speed(m, run_dir, out),
        "selection": {"rule": rule or NO_SELECTION, "candidates": cands},
        "assembled_by": command_line(SCRIPT),
    }
    write_json(out / "metrics.json", result)
    print(f"{out}: test error {100 * err:.2f}%, blocks {result['blocks_kept']}, "
          f"multiply-adds {100 * result['compact_flop_fraction']:.1f}%")
    return result


def speed_cell(r: dict, batch: int) -> str:
    for s in (r.get("speed") or {}).get("rows", []):
        if s["scope"] == "model" and s["batch"] == batch:
            return f"{s['speedup']:.2f}×"
    return "–"


def target_cell(name: str, r: dict, base: dict | None) -> str:
    """Whether row ``r`` meets its target against the dense row ``base``."""
    if base is None or name not in TARGETS:
        return "–"
    t = TARGETS[name]
    ok_err = r["test_error"] <= base["test_error"] + t["error_slack"]
    if name == "depth":
        removed = sum(k[1] - k[0] for k in r["blocks_kept"].values())
        ok = ok_err and removed >= t["blocks_removed"]
        return f"≥ {t['blocks_removed']} blocks removed, error ≤ dense + {100 * t['error_slack']:.1f}: " \
               f"{'met' if ok else 'MISSED'}"
    ratio = base["compact_flop_fraction"] / r["compact_flop_fraction"]
    ok = ok_err and ratio >= t["flop_ratio"]
    return f"≥ {t['flop_ratio']}× fewer FLOPs ({ratio:.2f}×), error ≤ dense + " \
           f"{100 * t['error_slack']:.1f}: {'met' if ok else 'MISSED'}"


def table(results: Path = RESULTS) -> str:
    rs = {p.parent.name: read_json(p) for p in sorted(results.glob("*/metrics.json"))}
    lines = ["| row | test error | blocks kept per stage | conv layers | multiply-adds | params | "
             "measured speedup b1 / b64 | target |", "|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = rs.get(name)
        if r is None:
            continue
        stages = ", ".join(f"{k[0]}/{k[1]}" for k in r["blocks_kept"].values())
        lines.append(f"| {ROWS[name]} | {100 * r['test_error']:.2f}% | {stages} | {r['conv_layers_kept']} | "
                     f"{100 * r['compact_flop_fraction']:.1f}% | {r['params_compact']:,} | "
                     f"{speed_cell(r, 1)} / {speed_cell(r, 64)} | {target_cell(name, r, rs.get('dense'))} |")
    return "\n".join(lines)


def write_table(readme: Path = RESULTS / "README.md", results: Path = RESULTS) -> None:
    write_between_markers(readme, table(results) + "\n")
