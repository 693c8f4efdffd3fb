"""An MNIST row's ``results/mnist/table/<row>/`` from a finished ``structsparse run``: the compact model,
checked against the run's test error, its structures, and how it was chosen."""
from __future__ import annotations

from pathlib import Path

from structsparse.paper import PAPER_MNIST

from .mnist import RESULTS, SCRIPT, compact_shapes, neurons
from .mnist_figures import figures
from .mnist_select import candidate_entry
from .mnist_tables import describe
from .runs import (NO_SELECTION, command_line, copy_run, final_val, recipe_dict, reload_checked, result_layers,
                   run_metrics, write_json)

FINAL_NOTE = ("the chosen candidate's recipe trained on train + val (60,000 images); its val errors are not held out, "
              "so the row's val_error is the chosen candidate's")


def check_refit(chosen: Path, final: Path) -> None:
    """``final``'s recipe must be ``chosen``'s with only ``train_with_val: true`` added."""
    rec = {d: recipe_dict(run_metrics(d)["recipe"]) for d in (chosen, final)}
    if not rec[final].pop("train_with_val", False) or rec[final] != rec[chosen]:
        raise SystemExit(f"{final}: its recipe is not the chosen run {chosen}'s with only train_with_val: true added")


def final_record(chosen: Path, refit: Path) -> tuple[dict, dict]:
    """The final run ``refit`` (checked by :func:`check_refit`): its metrics and its record in ``selection``."""
    check_refit(chosen, refit)
    fm = run_metrics(refit)
    return fm, {"run": str(Path(refit)), "recipe": fm["recipe"], "train_with_val": True, "note": FINAL_NOTE,
                "val_error_by_phase_not_held_out": fm["val_error"]}


def candidate_records(name: str, run_dir: Path, candidates: list | None) -> list[dict]:
    """The ``selection`` candidates: runs (the chosen one is ``run_dir``), and records of the committed row as
    they were (not chosen)."""
    return [{**c, "chosen": False} if isinstance(c, dict)
            else candidate_entry(name, Path(c), Path(c).resolve() == run_dir.resolve())
            for c in candidates or [run_dir]]


def row_result(name: str, m: dict, selected: dict, test_error: float, n_test: int, shapes: dict,
               selection: dict) -> dict:
    """metrics.json of a row: the row's run ``m``, the chosen candidate's ``selected`` (its val error)."""
    paper = PAPER_MNIST[name]
    return {
        "paper_row": paper["paper_row"], "name": name,
        "test_error": test_error, "test_wrong": round(test_error * n_test), "test_images": n_test,
        "test_error_original": m["test_error"]["original"],
        "val_error": final_val(selected), "val_error_by_phase": selected["val_error"],
        "layers": result_layers(m),
        "flop_fraction": m["sparsity"]["flop_fraction"],
        "compact_flop_fraction": m["sparsity"]["compact_flop_fraction"],
        "compact_shapes": shapes, "neurons": neurons(shapes), "paper": paper,
        "recipe": m["recipe"], "command": m["command"], "machine": m["machine"], "date": m["date"],
        "train_seconds": m["train_seconds"], "speed": m.get("speed"),
        "selection": selection, "assembled_by": command_line(SCRIPT),
    }


def assemble(name: str, run_dir: Path, candidates: list | None = None, rule: str | None = None,
             refit: Path | None = None, results: Path = RESULTS) -> dict:
    """Write ``results/<name>/`` (default ``results/mnist/table/<name>/``) from a finished ``structsparse run``
    directory: ``run_dir``, or ``refit`` (``run_dir``'s recipe trained on train + val, see :func:`check_refit`)
    when given."""
    run_dir = Path(run_dir)
    selected = run_metrics(run_dir)
    m, final = (selected, None) if refit is None else final_record(run_dir, refit)
    paper = PAPER_MNIST[name]
    if m["model"] != paper["model"] or m["data"] != "mnist":
        raise SystemExit(f"{run_dir}: a {m['model']} run on {m['data']}, but {name} is {paper['model']} on mnist")
    out = results / name
    copy_run(Path(refit or run_dir), out, m["recipe"])
    model, err, test = reload_checked(out, "mnist", m["test_error"]["compact"])
    selection = {"rule": rule or NO_SELECTION, "candidates": candidate_records(name, run_dir, candidates),
                 **({"final": final} if final else {})}
    result = row_result(name, m, selected, err, len(test), compact_shapes(model), selection)
    result["figures"] = figures(name, Path(refit or run_dir), out, m["model"])
    write_json(out / "metrics.json", result)
    print(f"{out}: {paper['paper_row']} test error {100 * err:.2f}% ({result['test_wrong']}/{len(test)}), "
          f"val {100 * result['val_error']:.2f}%, {describe(result)}")
    return result
