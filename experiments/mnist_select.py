"""Which candidate run becomes an MNIST row (:data:`SELECTION_RULE`), and how a row compares with the
paper's (:func:`verdict`). Test errors are never read here."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

from structsparse.paper import PAPER_MNIST

from .mnist import RESULTS, SCRIPT
from .runs import command_line, final_val, kept_summary, read_json, run_metrics, write_json

VAL_SLACK = 0.002  # candidates within 0.2 percentage points of the best validation error count as tied
ERROR_SLACK = 0.0005  # the target: test error no higher than the paper's "within its rounding: +0.05 points"

SELECTION_RULE = ("among the candidate runs whose per-layer FLOP fractions after compaction are all no higher than "
                  "the paper row's (the target), the one with the lowest final validation error; if none reaches "
                  "the target: among the candidates whose final validation error is within 0.2 points of the best "
                  "candidate's, the one whose per-layer FLOP fractions (paper's definition) are nearest the paper "
                  "row's (sum over layers of |log(ours / paper)|), ties broken by validation error. The test error "
                  "is not used.")


def flop_slack(name: str) -> float:
    """Half a unit of the last digit the paper prints for this row's FLOP (0.1% for LeNet, 0.01% for the MLP)."""
    return 0.0005 if PAPER_MNIST[name]["model"] == "lenet" else 0.00005


def layer_flops(name: str, layers: list[dict], key: str = "compact_flop_fraction") -> list[float]:
    """Our per-layer FLOP fractions for the layers the paper's row lists (conv1—conv2 or fc1—fc2—fc3)."""
    return [l[key] for l in layers][: len(PAPER_MNIST[name]["flop"])]


def at_target(name: str, flops: list[float]) -> bool:
    """Every listed FLOP fraction is no higher than the paper's (within its rounding)."""
    return all(f <= p + flop_slack(name) for f, p in zip(flops, PAPER_MNIST[name]["flop"]))


def meets_flop(name: str, layers: list[dict]) -> bool:
    """Every listed layer's FLOP fraction after compaction is no higher than the paper's (within its rounding)."""
    return at_target(name, layer_flops(name, layers))


def verdict(name: str, test_error: float, layers: list[dict]) -> str:
    """The issue's targets for one row: test error no higher than the paper's (+0.05 points, its rounding),
    per-layer FLOP no higher than the paper's; "beats" = lower error at no more FLOP, or lower FLOP (some layer
    lower, none higher) at no more error (within the same rounding, and said so)."""
    p = PAPER_MNIST[name]
    err_ok = test_error <= p["error"] + ERROR_SLACK
    flop_ok = meets_flop(name, layers)
    if name in ("lenet1", "mlp1"):   # the dense baselines: only the error target
        return "meets" if err_ok else "misses: error"
    if not (err_ok and flop_ok):
        return "misses: " + " and ".join(w for w, ok in (("error", err_ok), ("FLOP", flop_ok)) if not ok)
    lower_flop = any(f < q - flop_slack(name) for f, q in zip(layer_flops(name, layers), p["flop"]))
    if test_error < p["error"] - 1e-12:
        return "beats (lower error)" + (" and lower FLOP" if lower_flop else "")
    if lower_flop:   # "no more error" read as the target reads it: within the paper's rounding
        return "beats (lower FLOP)" + ("" if test_error <= p["error"] + 1e-12 else "; error within the +0.05 points")
    return "meets"


def structure_distance(name: str, metrics: dict) -> float:
    """Σ over the paper's layers of |log(our FLOP fraction / the paper's)| (0 for a perfect match)."""
    ours = layer_flops(name, metrics["sparsity"]["layers"], "flop_fraction")
    return sum(abs(math.log(max(x, 1e-6) / f)) for x, f in zip(ours, PAPER_MNIST[name]["flop"]))


def candidate_summary(name: str, c) -> dict:
    """What the selection reads of a candidate: a run directory, or a candidate recorded in a committed row's
    ``selection`` (a dict; its run directory may be gone). ``at_target`` is None where it cannot be told: a
    record without per-layer FLOP after compaction whose own-zeros FLOP is above the paper's (compaction never
    computes more than the own-zeros count, so at or under the paper's there means at the target)."""
    if isinstance(c, dict):
        flops = c.get("compact_layer_flops")
        own = [k["flop_fraction"] for k in c["kept"].values()][: len(PAPER_MNIST[name]["flop"])]
        at = at_target(name, flops) if flops is not None else (True if at_target(name, own) else None)
        return {"label": c["run"] + " (recorded)", "val": c["val_error"], "distance": c["structure_distance"],
                "at_target": at, "flops": flops}
    m = run_metrics(c)
    flops = layer_flops(name, m["sparsity"]["layers"])
    return {"label": str(c), "val": final_val(m), "distance": structure_distance(name, m),
            "at_target": at_target(name, flops), "flops": flops}


def near_best(val: float, best: float) -> bool:
    """Within the rule's slack of the best validation error."""
    return val <= best + VAL_SLACK + 1e-12


def pick(cands: list[dict], targets: list[bool]) -> int:
    """:data:`SELECTION_RULE` on candidate summaries with the given target flags: the index chosen."""
    idx = range(len(cands))
    if any(targets):
        return min((i for i in idx if targets[i]), key=lambda i: cands[i]["val"])
    best = min(c["val"] for c in cands)
    ok = [i for i in idx if near_best(cands[i]["val"], best)]
    return min(ok, key=lambda i: (round(cands[i]["distance"], 6), cands[i]["val"]))


def print_candidates(cands: list[dict]) -> None:
    """One line per candidate summary: validation error, FLOP after compaction, structure distance."""
    best = min(c["val"] for c in cands)
    for c in cands:
        where = ("after compaction " + "—".join(f"{100 * f:.2f}%" for f in c["flops"])) if c["flops"] else \
            "after compaction not recorded"
        print(f"  {c['label']}: val {100 * c['val']:.2f}%"
              f"{'' if near_best(c['val'], best) else ' (0.2+ above the best)'}, per-layer FLOP {where}"
              + {True: "", False: " (above the paper's)", None: " (at the paper's: unknown)"}[c["at_target"]]
              + f", structure distance {c['distance']:.3f}")


def select(name: str, candidates: list, prior: list[dict] | None = None):
    """The candidate :data:`SELECTION_RULE` picks among ``candidates`` (run directories, and candidates recorded
    in a committed row, see :func:`candidate_summary`; validation error and structure only). Where a record's
    place at the target is unknown, every possibility is tried, less those under which the same rule would not
    have made the committed row's choice among ``prior`` (all candidates recorded in it); if the choice still
    depends on it, the record must be rerun."""
    cands = [candidate_summary(name, c) for c in candidates]
    print_candidates(cands)
    old = [candidate_summary(name, r) for r in prior or []]
    old_choice = next((i for i, r in enumerate(prior or []) if r["chosen"]), None)
    unknown = sorted({c["label"] for c in cands + old if c["at_target"] is None})
    picks = set()
    for flags in itertools.product((False, True), repeat=len(unknown)):
        value = dict(zip(unknown, flags))
        at = lambda cs: [value.get(c["label"], c["at_target"]) for c in cs]  # noqa: E731
        if old_choice is not None and pick(old, at(old)) != old_choice:
            continue   # the committed row's choice rules this out
        picks.add(pick(cands, at(cands)))
    if len(picks) != 1:
        raise SystemExit(f"{name}: the choice depends on whether " + ", ".join(unknown) + " met the paper's FLOP "
                         "after compaction, which is not recorded: rerun it and pass its run directory")
    return candidates[picks.pop()]


def candidate_entry(name: str, run: Path, chosen: bool) -> dict:
    """How a candidate run is recorded in its row's ``selection``."""
    cm = run_metrics(run)
    return {"run": str(run), "recipe": cm["recipe"], "val_error": final_val(cm),
            "structure_distance": structure_distance(name, cm),
            "val_error_by_phase": cm["val_error"], "kept": kept_summary(cm),
            "compact_flop_fraction": cm["sparsity"]["compact_flop_fraction"],
            "compact_layer_flops": layer_flops(name, cm["sparsity"]["layers"]), "chosen": chosen}


def not_given(records: list[dict], given: list) -> list[dict]:
    """The ``records`` whose run directories are not among ``given`` (a run given replaces its record)."""
    runs = {str(Path(g)) for g in given}
    return [c for c in records if c["run"] not in runs]


def recorded_candidates(name: str, given: list, results: Path = RESULTS) -> list[dict]:
    """The candidates recorded in the committed row ``name`` whose run directories are not among ``given``."""
    path = results / name / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"--recorded: {path} does not exist")
    return not_given(read_json(path)["selection"]["candidates"], given)


def add_candidates(name: str, runs: list[Path], prior: list[dict], results: Path = RESULTS) -> None:
    """The committed row's choice stands among ``runs`` and ``prior``: record ``runs`` as candidates not chosen
    (a run given for a recorded candidate replaces its record) and leave the row's model as it is."""
    path = results / name / "metrics.json"
    m = read_json(path)
    m["selection"]["candidates"] = not_given(prior, runs) + [candidate_entry(name, r, False) for r in runs]
    m["selection"].setdefault("added_later", []).append(
        {"runs": sorted(str(r) for r in runs), "command": command_line(SCRIPT)})
    write_json(path, m)
    print(f"{name}: the committed choice {next(c['run'] for c in prior if c['chosen'])} stands; "
          f"{len(runs)} more candidate{'s' if len(runs) != 1 else ''} recorded in {path}")
