"""An MNIST row repeated with other seeds: the same recipe with only ``seed`` changed, recorded under
``seeds`` in the row's ``metrics.json`` (seed 0 = the committed result)."""
from __future__ import annotations

import statistics
from pathlib import Path

from .mnist import RESULTS, SCRIPT, compact_shapes, neurons
from .runs import command_line, final_val, read_json, recipe_dict, run_metrics, write_json

SEED_LAYER_KEYS = ("filters_kept", "channels_kept", "columns_kept", "flop_fraction", "compact_flop_fraction")

SEEDS_NOTE = ("the same recipe with only `seed` changed (model initialisation and shuffles); seed 0 is the committed "
              "result above; the other seeds' compact models are not committed. std is the sample standard deviation.")


def seed_entry(run_dir: Path, m: dict, test_error: float, shapes: dict | None) -> dict:
    """One seed's record: where it came from and what it kept."""
    return {"seed": recipe_dict(m["recipe"])["seed"], "recipe": m["recipe"], "command": m["command"],
            "run": str(run_dir), "machine": m["machine"], "date": m["date"], "train_seconds": m["train_seconds"],
            "test_error": test_error, "val_error": None if m.get("train_with_val") else final_val(m),
            "layers": {r["name"]: {k: r.get(k) for k in SEED_LAYER_KEYS} for r in m["sparsity"]["layers"]},
            "flop_fraction": m["sparsity"]["flop_fraction"],
            "compact_flop_fraction": m["sparsity"]["compact_flop_fraction"],
            "compact_shapes": shapes, "neurons": None if shapes is None else neurons(shapes)}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def seed_summary(entries: list[dict]) -> dict:
    """Mean, sample std, min and max over the seeds of test/val error, whole-model FLOP fractions
    and, per layer, each of :data:`SEED_LAYER_KEYS` (and MLP neuron counts)."""
    out = {"n": len(entries), "seeds": [e["seed"] for e in entries],
           "test_error": spread([e["test_error"] for e in entries]),
           "val_error": (spread([e["val_error"] for e in entries])
                         if all(e["val_error"] is not None for e in entries) else None),
           "flop_fraction": spread([e["flop_fraction"] for e in entries]),
           "compact_flop_fraction": spread([e["compact_flop_fraction"] for e in entries]),
           "layers": {}}
    for layer in entries[0]["layers"]:
        out["layers"][layer] = {k: spread([e["layers"][layer][k] for e in entries])
                                for k in SEED_LAYER_KEYS if all(e["layers"][layer][k] is not None for e in entries)}
    if all(e["neurons"] for e in entries):
        out["neurons"] = [spread([e["neurons"][i] for e in entries]) for i in range(len(entries[0]["neurons"]))]
    return out


def seed0_entry(r: dict) -> dict:
    """The committed row ``r`` as seed 0: from its run's metrics where the run is still there, else from
    the row's own record."""
    sel = r["selection"]
    run0 = Path(sel["final"]["run"] if "final" in sel else next(c for c in sel["candidates"] if c["chosen"])["run"])
    if (run0 / "metrics.json").is_file():
        m0 = run_metrics(run0)
    else:
        m0 = {"recipe": r["recipe"], "command": r["command"], "machine": r["machine"], "date": r["date"],
              "train_seconds": r["train_seconds"], "val_error": r["val_error_by_phase"], "train_with_val": "final" in sel,
              "sparsity": {"layers": r["layers"], "flop_fraction": r["flop_fraction"],
                           "compact_flop_fraction": r["compact_flop_fraction"]}}
    return seed_entry(run0, m0, r["test_error"], r["compact_shapes"])


def other_seed_entry(d: Path, base: dict, base_path: str, taken: set[int]) -> dict:
    """A finished run of the row's recipe (``base``, without its seed) with another seed."""
    from structsparse import load_compact
    m = run_metrics(d)
    other = recipe_dict(m["recipe"])
    seed = other.pop("seed")
    if other != base:
        raise SystemExit(f"{d}: its recipe {m['recipe']} differs from {base_path} in more than the seed")
    if seed in taken:
        raise SystemExit(f"{d}: seed {seed} is already recorded")
    shapes = compact_shapes(load_compact(d / "compact")) if (d / "compact").is_dir() else None
    return seed_entry(d, m, m["test_error"]["compact"], shapes)


def add_seeds(name: str, run_dirs: list[Path], results: Path = RESULTS) -> dict:
    """Record the committed result (seed 0) and the runs ``run_dirs`` (other seeds of the same recipe)
    under ``seeds`` in ``results/<name>/metrics.json`` (default ``results/mnist/table/<name>/``); the rest of
    the file is left as it is."""
    path = results / name / "metrics.json"
    r = read_json(path)
    base = recipe_dict(r["recipe"])
    base.pop("seed")
    entries = [seed0_entry(r)]
    for d in run_dirs:
        entries.append(other_seed_entry(Path(d), base, r["recipe"], {e["seed"] for e in entries}))
    entries.sort(key=lambda e: e["seed"])
    r["seeds"] = {"note": SEEDS_NOTE, "assembled_by": command_line(SCRIPT), "summary": seed_summary(entries),
                  "runs": entries}
    write_json(path, r)
    s = r["seeds"]["summary"]["test_error"]
    print(f"{path}: {len(entries)} seeds, test error {100 * s['mean']:.2f}% ± {100 * s['std']:.2f} "
          f"(min {100 * s['min']:.2f}%, max {100 * s['max']:.2f}%)")
    return r["seeds"]
