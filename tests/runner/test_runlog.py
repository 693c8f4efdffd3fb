"""Run logs from a trainer history: log.csv, sparsity.png, TensorBoard (optional)."""
from __future__ import annotations

import csv
import importlib.util
import sys

import pytest

from structsparse.runner.runlog import CSV_NAME, PLOT_NAME, RunLog, csv_table


def _history(n: int = 3) -> list[dict]:
    out = []
    for i in range(n):
        phase = "dense" if i == 0 else "ssl"
        out.append({"phase": phase, "phase_index": int(i > 0), "epoch": 1 if i == 0 else i, "epochs": max(n - 1, 1),
                    "lr": 0.1, "train_loss": 2.0 - i / 10, "penalty": None if i == 0 else 3.0 / i,
                    "train_error": 0.5, "val_error": 0.4 - i / 100, "train_s": 1.5, "flop_fraction": 1.0 - i / 10,
                    "kept": {"conv1": [20 - i, 20, 1, 1], "fc1": [500, 500, 800 - 10 * i, 800]}})
    return out


def test_csv_table_columns_and_missing_values():
    history = _history()
    del history[0]["flop_fraction"]       # a history from a checkpoint written before the column existed
    header, rows = csv_table(history)
    assert header[-8:] == ["conv1_filters_kept", "conv1_filters", "conv1_channels_kept", "conv1_channels",
                           "fc1_filters_kept", "fc1_filters", "fc1_channels_kept", "fc1_channels"]
    assert len(rows) == 3 and all(len(r) == len(header) for r in rows)
    col = dict(zip(header, rows[0]))
    assert col["penalty"] == "" and col["flop_fraction"] == "" and col["conv1_filters_kept"] == 20
    assert csv_table([]) == (list(header[:10]), [])


def test_update_rewrites_instead_of_appending(tmp_path):
    log = RunLog(tmp_path, plot_every_s=float("inf"))
    history = _history(2)
    log.update(history)
    log.update(history)                   # the same epochs again (as after a resume): no duplicates
    history = _history(3)
    log.update(history)
    with open(tmp_path / CSV_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "1", "2"]
    assert not (tmp_path / PLOT_NAME).exists()   # throttled during training
    log.close()
    assert (tmp_path / PLOT_NAME).read_bytes()[:4] == b"\x89PNG"


def test_tensorboard_missing_is_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    log = RunLog(tmp_path, tensorboard=True, plot_every_s=float("inf"))
    log.update(_history(1))
    log.update(_history(2))
    log.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tensorboard" in err and "tensorboard package" in err
    assert (tmp_path / CSV_NAME).exists() and not (tmp_path / "tensorboard").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_scalars(tmp_path):
    log = RunLog(tmp_path, tensorboard=True, plot_every_s=float("inf"))
    log.update(_history(2))
    log.close(_history(3))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("error/val")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("loss/penalty")] == [2, 3]
    assert "kept_filters/conv1" in acc.Tags()["scalars"]
