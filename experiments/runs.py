"""Run folders (``structsparse run`` output) and result folders (``results/<data>/<experiment>/<row>/``),
shared by every experiment."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

# the per-layer fields of a run's sparsity report that a result keeps
LAYER_KEYS = ("name", "type", "filters", "filters_kept", "channels", "channels_kept", "columns", "columns_kept",
              "params", "params_kept", "macs", "macs_kept", "flop_fraction", "compact_flop_fraction")

NO_SELECTION = "single run, λs fixed before training (no selection)"


def repo_path(path: str | Path) -> Path:
    """``path`` as recorded in a result (relative to the repository root, or absolute)."""
    path = Path(path)
    return path if path.is_absolute() else ROOT / path


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def recipe_dict(path: str | Path) -> dict:
    """The recipe at ``path`` (as recorded in a result) as plain data (:meth:`Recipe.to_dict`)."""
    from structsparse.runner.recipe import load_recipe
    return load_recipe(repo_path(path)).to_dict()


def run_metrics(run_dir: str | Path) -> dict:
    """A finished run's ``metrics.json``."""
    return read_json(Path(run_dir) / "metrics.json")


def final_val(metrics: dict) -> float:
    """The validation error at the end of a run's last phase."""
    return list(metrics["val_error"].values())[-1]


def kept_summary(metrics: dict) -> dict:
    """Per layer of a run: kept and all filters, channels and columns, and its FLOP fraction."""
    return {r["name"]: {k: r[k] for k in ("filters_kept", "filters", "channels_kept", "channels", "columns_kept",
                                          "columns", "flop_fraction")}
            for r in metrics["sparsity"]["layers"]}


def result_layers(metrics: dict) -> list[dict]:
    """A run's per-layer report, cut to :data:`LAYER_KEYS`."""
    return [{k: r.get(k) for k in LAYER_KEYS} for r in metrics["sparsity"]["layers"]]


def command_line(script: str) -> str:
    """How this process was started, as recorded in a result (``python SCRIPT ARGS``)."""
    return f"python {script} " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def structsparse_cmd() -> list[str]:
    """The ``structsparse`` command of this interpreter's environment."""
    exe = Path(sys.executable).with_name("structsparse")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "structsparse"]


def run_recipe(recipe: str, run_dir: Path) -> None:
    """``structsparse run RECIPE --out RUN_DIR`` (resumed where it has a checkpoint)."""
    cmd = structsparse_cmd() + ["run", recipe, "--out", str(run_dir), "--no-progress"]
    if (run_dir / "checkpoint").exists():
        cmd.append("--resume")
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def copy_run(run_dir: Path, out: Path, recipe: str, extras: tuple[str, ...] = ()) -> None:
    """(Re)make ``out`` with the run's compact model (``model/``), ``report.md``, ``recipe.yaml``
    and the ``extras`` files the run has."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(run_dir / "compact", out / "model")
    shutil.copyfile(run_dir / "report.md", out / "report.md")
    shutil.copyfile(repo_path(recipe), out / "recipe.yaml")
    for extra in extras:
        if (run_dir / extra).exists():
            shutil.copyfile(run_dir / extra, out / extra)


def load_test_split(data: str):
    """The ``data`` set's test images as a :class:`structsparse.runner.trainer.Split`."""
    from structsparse.runner.trainer import Split
    from structsparse.zoo.data import load_dataset
    return Split(*load_dataset(data, "test"))


def reload_checked(out: Path, data: str, recorded: float):
    """Load ``out/model`` (just copied from a run) and check that it gives the run's test error
    ``recorded``; returns ``(model, test error, test split)``."""
    from structsparse import load_compact
    from structsparse.runner.trainer import evaluate
    model = load_compact(out / "model").eval()
    test = load_test_split(data)
    err = evaluate(model, test, 1000)
    if err != recorded:
        raise SystemExit(f"{out}/model: reloaded test error {err} differs from the run's {recorded}")
    return model, err, test


def verify(results: Path, data: str, rows: set[str], row_key: str) -> list[str]:
    """Load every ``RESULTS/*/model``, evaluate on the ``data`` test images, compare with metrics.json
    (whose ``row_key`` must be one of ``rows``); returns the problems found."""
    from structsparse import load_compact
    from structsparse.runner.trainer import evaluate

    test = load_test_split(data)
    problems, seen = [], 0
    for metrics_path in sorted(results.glob("*/metrics.json")):
        m = read_json(metrics_path)
        where = metrics_path.parent
        problems += [f"{metrics_path}: missing {key!r}" for key in (row_key, "test_error", "command", "machine",
                                                                    "date", "layers") if key not in m]
        if m.get(row_key) not in rows:
            problems.append(f"{metrics_path}: unknown {row_key} {m.get(row_key)!r}")
        try:
            model = load_compact(where / "model").eval()
        except Exception as e:  # noqa: BLE001  report and go on with the other rows
            problems.append(f"{where}/model: cannot load: {e}")
            continue
        err = evaluate(model, test, 1000)
        seen += 1
        ok = err == m.get("test_error")
        print(f"{where.name:8s} {m.get(row_key, '?'):8s} recorded {100 * m.get('test_error', float('nan')):.2f}% "
              f"reproduced {100 * err:.2f}% ({round(err * len(test))}/{len(test)}) {'ok' if ok else 'MISMATCH'}")
        if not ok:
            problems.append(f"{where}: test error {err} != recorded {m.get('test_error')}")
    if seen == 0:
        problems.append(f"{results}: no results to verify")
    return problems


def verify_or_table(args, check: Callable[[], list[str]], write: Callable[[], None]) -> int | None:
    """``--verify`` (``check``: the problems found) and ``--table`` (``write``) of the command lines, run from
    the repository root: their exit status, or None where neither was asked for."""
    os.chdir(ROOT)
    if args.verify:
        return exit_status(check())
    if args.table:
        write()
        return 0
    return None


def exit_status(problems: list[str]) -> int:
    """Print each problem found by :func:`verify`; 1 if there were any."""
    for p in problems:
        print("FAIL:", p, file=sys.stderr)
    return 1 if problems else 0


def write_between_markers(readme: Path, body: str, start: str = "<!-- table -->", end: str = "<!-- /table -->") -> None:
    """Replace what stands between the ``start`` and ``end`` lines of ``readme`` by ``body`` (ending in a newline)."""
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: add the markers {start} and {end} where the table goes")
    i, j = text.index(start) + len(start), text.index(end)
    readme.write_text(text[:i] + "\n" + body + text[j:], encoding="utf-8")
    print(f"wrote the tables of {readme}")
