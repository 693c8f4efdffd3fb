"""End-to-end `structsparse run` on a tiny generated data set: outputs, checkpoints, resume."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import write_tiny_mnist
from structsparse.storage import checkpoint as ckpt
from structsparse import cli
from structsparse.runner import pipeline, rundir

ROOT = Path(__file__).resolve().parents[2]

RECIPE = {
    "model": "lenet",
    "data": "mnist",
    "seed": 1,
    "batch_size": 32,
    "eval_batch_size": 50,
    "phases": [
        {"name": "dense", "epochs": 1, "lr": 0.05, "weight_decay": 1e-4},
        {"name": "ssl", "epochs": 2, "lr": 0.05, "method": "prox", "weight_decay": 1e-4,
         "lambdas": {"conv1": {"filter": 0.7}, "conv2": {"filter": 1.05, "channel": 0.35}, "fc1": {"filter": 0.07}},
         "group_threshold": 1e-3},
        {"name": "finetune", "epochs": 2, "lr": 0.02, "lr_schedule": "cosine", "freeze": True},
    ],
    "measure": {"batch_sizes": [1, 4], "repeats": 2, "warmup": 1, "threads": 1},
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    write_tiny_mnist(base / "data")
    recipe = base / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data_root": str(base / "data")}))
    return base, recipe


@pytest.fixture(scope="module")
def full_run(env):
    base, recipe = env
    out = base / "full"
    assert cli.main(["run", str(recipe), "--out", str(out)]) == 0
    return out


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(out / "checkpoint").model


def _log_rows(out: Path) -> list[dict]:
    import csv
    with open(out / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_run_logs(full_run):
    rows = _log_rows(full_run)
    assert [(r["phase"], r["epoch"]) for r in rows] == [("dense", "1"), ("ssl", "1"), ("ssl", "2"),
                                                         ("finetune", "1"), ("finetune", "2")]
    header = list(rows[0])
    assert header[:10] == ["phase", "epoch", "lr", "train_loss", "penalty", "train_error", "val_error", "train_s",
                           "flop_fraction", "compact_flop_fraction"]
    assert header[10:14] == ["conv1_filters_kept", "conv1_filters", "conv1_channels_kept", "conv1_channels"]
    assert len(header) == 10 + 4 * 4  # conv1, conv2, fc1, fc2
    assert rows[0]["penalty"] == "" and float(rows[1]["penalty"]) > 0
    history = json.loads((full_run / "metrics.json").read_text())["history"]
    for r, h in zip(rows, history):
        assert float(r["val_error"]) == h["val_error"] and int(r["conv2_filters_kept"]) == h["kept"]["conv2"][0]
    # The group term removed structures: the FLOP fraction fell and agrees with the final report.
    assert float(rows[0]["flop_fraction"]) == 1.0 > float(rows[-1]["flop_fraction"])
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert float(rows[-1]["flop_fraction"]) == pytest.approx(metrics["sparsity"]["flop_fraction"])
    # after compaction (what the plot's thick line shows): no more than the layers' own zeros leave
    assert float(rows[-1]["compact_flop_fraction"]) == pytest.approx(metrics["sparsity"]["compact_flop_fraction"])
    assert all(float(r["compact_flop_fraction"]) <= float(r["flop_fraction"]) + 1e-9 for r in rows)
    assert (full_run / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (full_run / "tensorboard").exists()  # only with --tensorboard


def test_run_writes_outputs(full_run, capsys):
    out = full_run
    for name in ("report.md", "metrics.json", "compact", "checkpoint/checkpoint.json"):
        assert (out / name).exists(), name
    assert any((out / "compact").iterdir())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_error"]["original"] == metrics["test_error"]["compact"]
    assert set(metrics["val_error"]) == {"dense", "ssl", "finetune"}
    assert len(metrics["history"]) == 5
    for key in ("recipe", "command", "machine", "date", "sparsity", "speed"):
        assert metrics[key], key
    assert metrics["machine"]["torch"] == torch.__version__
    report = (out / "report.md").read_text()
    assert "Test error" in report and "Sparsity" in report
    # The group term really removed structures, and the compact model is smaller.
    from structsparse.storage.compact_io import load_compact
    small = load_compact(out / "compact")
    n_small = sum(p.numel() for p in small.parameters())
    n_full = sum(v.numel() for k, v in _final_weights(out).items())
    assert n_small < n_full


def test_checkpoint_is_safetensors_and_json(full_run):
    d = full_run / "checkpoint"
    info = json.loads((d / "checkpoint.json").read_text())
    assert info["info"]["phase"] == 2 and info["info"]["epoch"] == 1
    previous = json.loads((d / "checkpoint.prev.json").read_text())
    assert previous["info"]["phase"] == 2 and previous["info"]["epoch"] == 0
    files = sorted(p.name for p in d.iterdir())
    assert files == sorted(["checkpoint.json", "checkpoint.prev.json", info["state_file"], previous["state_file"]])
    from safetensors.torch import load_file
    tensors = load_file(d / info["state_file"])
    assert any(k.startswith("optimizer.") and k.endswith("momentum_buffer") for k in tensors)
    assert any(k.startswith("masks.") for k in tensors) and "rng.cpu" in tensors




class Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_at", [(1, 0), (1, 1), (2, 0)], ids=["mid-ssl", "end-of-ssl", "mid-finetune"])
def test_resume_is_bit_identical(env, full_run, stop_at):
    base, recipe = env
    out = base / f"resume-{stop_at[0]}-{stop_at[1]}"

    def stop(trainer, p, e):
        if (p, e) == stop_at:
            raise Interrupt

    with pytest.raises(Interrupt):
        pipeline.run_recipe(str(recipe), str(out), on_epoch_end=stop)
    assert not (out / "metrics.json").exists()
    assert cli.main(["run", str(recipe), "--out", str(out), "--resume"]) == 0

    a, b = _final_weights(full_run), _final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma = json.loads((full_run / "metrics.json").read_text())
    mb = json.loads((out / "metrics.json").read_text())
    assert ma["test_error"] == mb["test_error"] and ma["val_error"] == mb["val_error"]
    assert [h["val_error"] for h in ma["history"]] == [h["val_error"] for h in mb["history"]]
    # log.csv is rewritten from the checkpoint's history: each epoch once, the same numbers.
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_s"} for r in rows]  # noqa: E731
    assert strip(_log_rows(out)) == strip(_log_rows(full_run))
    assert (out / "sparsity.png").exists()


def test_diverging_run_stops_and_keeps_last_checkpoint(env, tmp_path, monkeypatch, capsys):
    base, _ = env
    recipe = tmp_path / "diverge.yaml"   # a huge lr in the second phase: the loss becomes nan
    phases = [RECIPE["phases"][0], {**RECIPE["phases"][1], "lr": 1e4}]
    recipe.write_text(yaml.safe_dump({**RECIPE, "phases": phases, "data_root": str(base / "data")}))
    out = tmp_path / "out"
    snapshots = []
    real = ckpt.save_checkpoint

    def save_and_snapshot(directory, *args, **kwargs):
        path = real(directory, *args, **kwargs)
        snapshots.append({p.name: p.read_bytes() for p in Path(directory).iterdir()})
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_and_snapshot)
    assert cli.main(["run", str(recipe), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("structsparse: error: training diverged in phase 'ssl' epoch 1/2, step ")
    assert "loss nan" in err or "loss inf" in err
    assert "after dense epoch 1/1" in err
    # One checkpoint (the dense phase's), and the directory is byte for byte as that save left it.
    assert len(snapshots) == 1
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == snapshots[0]
    assert ckpt.load_checkpoint(out / "checkpoint").info["phase_name"] == "dense"
    assert [r["phase"] for r in _log_rows(out)] == ["dense"]
    assert not (out / "metrics.json").exists()


def test_existing_checkpoint_needs_resume(env, full_run, capsys):
    _, recipe = env
    assert cli.main(["run", str(recipe), "--out", str(full_run)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "checkpoint" in err


def test_resume_with_other_recipe_is_refused(env, full_run, capsys):
    base, _ = env
    other = base / "other.yaml"
    other.write_text(yaml.safe_dump({**RECIPE, "data_root": str(base / "data"), "seed": 2}))
    assert cli.main(["run", str(other), "--out", str(full_run), "--resume"]) == 2
    assert "different recipe" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda info: info.update(phase=99), "bad phase, epoch or history"),
    (lambda info: info.update(epoch="1"), "bad phase, epoch or history"),
    (lambda info: info.update(history={"a": 1}), "bad phase, epoch or history"),
])
def test_resume_from_a_checkpoint_with_bad_info_is_one_line_error(env, full_run, tmp_path, capsys, edit, message):
    import shutil

    base, recipe = env
    out = tmp_path / "run"
    shutil.copytree(full_run / "checkpoint", out / "checkpoint")
    index = out / "checkpoint" / "checkpoint.json"
    meta = json.loads(index.read_text())
    edit(meta["info"])
    index.write_text(json.dumps(meta))
    assert cli.main(["run", str(recipe), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err




@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_is_clear_error(env, tmp_path, capsys):
    _, recipe = env
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err






def test_python_m_entry_point(env, tmp_path):
    _, recipe = env
    out = tmp_path / "sub"
    envvars = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "structsparse", "run", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, env=envvars, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Test error" in proc.stdout and (out / "metrics.json").exists()


def test_bench_model_times_a_run(full_run, tmp_path, capsys):
    original, small, metrics = rundir.load_run(full_run)
    assert metrics["model"] == "lenet"
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(small(x), original(x), rtol=1e-4, atol=1e-5)
    out = tmp_path / "bench"
    assert cli.main(["bench", "model", str(full_run), "--batch", "1,2", "--repeats", "2", "--out", str(out)]) == 0
    res = json.loads((out / "model.json").read_text())
    assert {(r["scope"], r["batch"]) for r in res["speed"]["rows"]} >= {("model", 1), ("model", 2), ("conv2", 2)}
    assert "speedup" in capsys.readouterr().out




def test_recipe_lowered_below_reaches_compaction(env, tmp_path, monkeypatch):
    """The recipe's ``lowered_below`` is what the run compacts with (default: compact()'s)."""
    from structsparse.compaction import LOWERED_BELOW, compact
    base, _ = env
    seen = []
    monkeypatch.setattr(pipeline, "compact", lambda *a, **kw: (seen.append(kw["lowered_below"]), compact(*a, **kw))[1])
    for extra, want in (({}, LOWERED_BELOW), ({"lowered_below": 1.0}, 1.0)):
        recipe = tmp_path / f"r{len(seen)}.yaml"
        recipe.write_text(yaml.safe_dump({**RECIPE, **extra, "data_root": str(base / "data"),
                                          "phases": [{"name": "dense", "epochs": 0, "lr": 0.1}]}))
        assert cli.main(["run", str(recipe), "--out", str(tmp_path / recipe.stem)]) == 0
        assert seen[-1] == want


@pytest.mark.slow
def test_smoke_recipe_on_real_mnist_end_to_end(tmp_path):
    """The shipped smoke recipe on the real MNIST (fetched and SHA-256-checked once): the whole pipeline,
    and a compact model that is smaller and makes exactly the original's test errors. About a minute."""
    out = tmp_path / "smoke"
    assert cli.main(["run", str(ROOT / "recipes" / "smoke.yaml"), "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_error"]["compact"] == metrics["test_error"]["original"] < 0.5
    assert metrics["sparsity"]["compact_flop_fraction"] < 1
    original, small, _ = rundir.load_run(out)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in original.parameters())


def test_results_are_written_atomically(tmp_path, monkeypatch):
    """A crash while metrics.json is written leaves the previous file whole (issue 18: non-atomic results)."""
    (tmp_path / "metrics.json").write_text('{"old": true}\n')
    import structsparse.storage.files as files

    def crash(src, dst):   # the kill comes after the new bytes are written, before they replace the old file
        raise OSError("killed")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError):
        rundir.write_results(tmp_path, "# report\n", {"new": True})
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"old": True}
    rundir.write_results(tmp_path, "# report\n", {"new": True})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"new": True}


def test_a_second_run_on_a_busy_folder_fails_at_once_naming_the_holder(env, tmp_path, capsys):
    import fcntl
    _, recipe = env
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / rundir.LOCK, "w") as held:      # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        assert cli.main(["run", str(recipe), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"structsparse: error: {out} is in use by another run (pid 4242); wait for it to end, or " \
                      "choose another --out directory"
        assert not (out / "checkpoint").exists()
    # the holder ended: its lock is gone with it, and the stale file does not block
    with rundir.locked(out):
        assert (out / rundir.LOCK).read_text().strip() == str(os.getpid())


def test_sigterm_ends_a_run_like_ctrl_c_and_resume_loses_nothing(env, full_run, tmp_path, monkeypatch, capsys):
    import functools
    import signal
    _, recipe = env
    out = tmp_path / "term"

    def term(trainer, p, e):
        if (p, e) == (1, 0):
            os.kill(os.getpid(), signal.SIGTERM)   # as `kill PID` or a job scheduler would

    with monkeypatch.context() as m:
        m.setattr(pipeline, "run_recipe", functools.partial(pipeline.run_recipe, on_epoch_end=term))
        assert cli.main(["run", str(recipe), "--out", str(out)]) == 143
    assert capsys.readouterr().err.strip().endswith("structsparse: interrupted; continue with --resume")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL     # main() puts the old handler back
    assert cli.main(["run", str(recipe), "--out", str(out), "--resume"]) == 0
    a, b = _final_weights(full_run), _final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(env, full_run, tmp_path, capsys):
    base, recipe = env
    out = tmp_path / "damaged"

    def stop(trainer, p, e):
        if (p, e) == (1, 1):
            raise Interrupt

    with pytest.raises(Interrupt):
        pipeline.run_recipe(str(recipe), str(out), on_epoch_end=stop)
    index = json.loads((out / "checkpoint" / "checkpoint.json").read_text())
    state = out / "checkpoint" / index["state_file"]
    state.write_bytes(state.read_bytes()[:-7] + b"garbage")        # the newest tensors file is damaged
    (out / "checkpoint" / ".checkpoint.json.999.tmp").write_text("{")  # and a killed run left a temporary file
    capsys.readouterr()
    assert cli.main(["run", str(recipe), "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr()
    assert "SHA-256 does not match" in said.out + said.err and "checkpoint before it" in said.out + said.err
    assert not list((out / "checkpoint").glob(".*.tmp"))
    a, b = _final_weights(full_run), _final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)           # the epoch is done again, exactly


def _metrics_edit(fn):
    def edit(run: Path) -> None:
        m = json.loads((run / "metrics.json").read_text())
        fn(m)
        (run / "metrics.json").write_text(json.dumps(m))
    return edit


def _evil_recipe(run: Path) -> None:
    """metrics.json without model_args, naming as its recipe a file that is not one (its text must not leak)."""
    (run / "evil.yaml").write_text("root:x:0:0:root:/root:/bin/bash\n")
    _metrics_edit(lambda m: m.update(model_args=None, recipe=str(run / "evil.yaml")))(run)


@pytest.mark.parametrize("edit, message", [
    (lambda run: (run / "metrics.json").write_text('{"model": "le'), "metrics.json: cannot read"),
    (_metrics_edit(lambda m: m["model_args"].update(num_classes=10 ** 12)), "more than 1,073,741,824"),
    (lambda run: _evil_recipe(run), "does not load"),
    (_metrics_edit(lambda m: m.update(model="x" * 10000)), "unknown model"),
    (lambda run: (run / "compact" / "model.safetensors").write_bytes(b"\0" * 64), "model.safetensors"),
])
def test_bench_model_trusts_no_file_and_says_one_line(full_run, tmp_path, capsys, edit, message):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(full_run, run, ignore=shutil.ignore_patterns("checkpoint"))
    edit(run)
    capsys.readouterr()
    assert cli.main(["bench", "model", str(run), "--batch", "1", "--repeats", "1", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("structsparse: error: ") and "\n" not in err and len(err) < 600, err
    assert re.search(message, err) and "root:" not in err, err


def test_a_mistyped_data_root_is_an_error_not_a_download(env, tmp_path, capsys):
    base, _ = env
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "data_root": str(base / "dtaa")}))
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert "data_root" in capsys.readouterr().err and not (base / "dtaa").exists()


def test_a_full_disk_is_one_line_naming_the_file(env, tmp_path, monkeypatch, capsys):
    import errno
    _, recipe = env

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))   # as the kernel reports it: no file name

    monkeypatch.setattr(os, "fsync", full)
    assert cli.main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"structsparse: error: \S+/checkpoint/\S+\.safetensors: cannot write: No space left on "
                        r"device \(--debug shows where\)", err), err


def test_a_file_where_the_output_folder_should_be_is_one_line(env, tmp_path, capsys):
    _, recipe = env
    (tmp_path / "taken").write_text("not a folder")
    for out in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        assert cli.main(["run", str(recipe), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"structsparse: error: {out}: cannot use this folder for the run: ") and "\n" not in err


@pytest.mark.parametrize("where", ["folder", "checkpoint"])
def test_a_read_only_folder_is_one_line_naming_it(env, tmp_path, monkeypatch, capsys, where):
    """A folder the run may not write: the output folder itself (no lock file can be made), or, after the lock,
    its checkpoint folder. As root, chmod does not stop writes, so the kernel's refusal is imitated."""
    import builtins
    import errno
    _, recipe = env
    out = tmp_path / "o"
    denied = out if where == "folder" else out / "checkpoint"
    denied.mkdir(parents=True)
    real_open, real_os_open = builtins.open, os.open

    def refuse(path):
        if Path(path).parent == denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def os_open(path, *a, **k):
        refuse(path)
        return real_os_open(path, *a, **k)

    def open_(path, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            refuse(path)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    assert cli.main(["run", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"structsparse: error: {denied}") and "Permission denied" in err, err


def test_a_budget_run_reports_its_target_and_what_compaction_reached(env, capsys):
    base, _ = env
    recipe = base / "budget.yaml"
    phases = [{"name": "dense", "epochs": 1, "lr": 0.05},
              {"name": "ssl", "epochs": 1, "lr": 0.05, "target": {"flops": 0.4}},
              {"name": "finetune", "epochs": 1, "lr": 0.02, "freeze": True}]
    recipe.write_text(yaml.safe_dump({**RECIPE, "phases": phases, "data_root": str(base / "data")}))
    out = base / "budget"
    assert cli.main(["run", str(recipe), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    budget = metrics["budget"]["ssl"]
    assert budget["target"] == 0.4 and budget["reached"] <= 0.4
    kept = metrics["sparsity"]["compact_flop_fraction"]
    assert kept <= 0.4 and abs(kept - budget["reached"]) < 1e-6
    measured = 1 / next(r["speedup"] for r in metrics["speed"]["rows"] if r["scope"] == "model" and r["batch"] == 1)
    assert budget["measured"]["model"] == pytest.approx(measured) and budget["measured"]["batch"] == 1  # any budget
    assert (f"| ssl | 0.4 of the dense multiply-adds: {budget['reached']:.4f} | {measured:.3f}"
            in (out / "report.md").read_text())
    rows = _log_rows(out)   # the approach to the budget, epoch by epoch
    assert list(rows[0])[10:13] == ["budget_goal", "strength", "budget_reached"] and rows[0]["budget_goal"] == ""
    ssl = next(h for h in metrics["history"] if h["phase"] == "ssl")   # its strength: > 1, or 0 once at the budget
    assert float(rows[1]["budget_goal"]) == pytest.approx(0.4) and float(rows[1]["strength"]) == pytest.approx(
        ssl["strength"]) and (ssl["strength"] > 1 or ssl["strength"] == 0 and ssl["budget_reached"] <= 0.4)
    assert float(rows[1]["budget_reached"]) == float(rows[1]["compact_flop_fraction"])
