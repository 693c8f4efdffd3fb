"""`structsparse run` with DistributedDataParallel: 2 CPU processes (gloo) against 1 process."""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from helpers import write_tiny_mnist
from structsparse.storage import checkpoint as ckpt
from structsparse import cli

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# 69 training images in global batches of 16: 5 steps an epoch, the last one of 5 images
# (3 + 2 between the processes). Both group-term methods, the phase-end zeroing and a
# frozen fine-tune, one epoch each.
RECIPE = {
    "model": "lenet", "data": "mnist", "seed": 3, "batch_size": 16, "eval_batch_size": 64,
    "phases": [
        {"name": "dense", "epochs": 1, "lr": 0.05, "weight_decay": 1e-4},
        {"name": "penalty", "epochs": 1, "lr": 0.05, "method": "penalty",
         "lambdas": {"conv2": {"filter": 0.02, "channel": 0.01}, "fc1": {"filter": 0.002}}},
        {"name": "prox", "epochs": 1, "lr": 0.05, "method": "prox",
         "lambdas": {"conv1": {"filter": 2.2}, "conv2": {"filter": 1.8, "channel": 0.8}}, "group_threshold": 1e-3},
        {"name": "finetune", "epochs": 1, "lr": 0.02, "freeze": True},
    ],
    "measure": {"batch_sizes": [1], "repeats": 1, "warmup": 0, "threads": 1},
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, recipe: str, out: str, reports: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then `structsparse run`; records
    every file it creates, writes, renames or removes under ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    written = []

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+"))
                    or (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))):
                return
        elif event not in ("os.mkdir", "os.rename", "os.remove", "os.rmdir"):
            return
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(out):
            written.append(f"{event} {os.fsdecode(path)}")

    sys.addaudithook(audit)
    rc = cli.main(["run", recipe, "--out", out, "--no-progress"])
    Path(reports, f"rank{rank}.json").write_text(json.dumps({"rc": rc, "written": written}))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    write_tiny_mnist(base / "data", sizes=(69, 40, 40), seed=1)
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump({**RECIPE, "data_root": str(base / "data")}))
    return path


def test_two_processes_match_one(recipe, tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    one, two, reports = tmp_path / "one", tmp_path / "two", tmp_path / "reports"
    reports.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(recipe), str(two), str(reports)), nprocs=2, join=True)
    assert cli.main(["run", str(recipe), "--out", str(one), "--no-progress"]) == 0

    r0, r1 = (json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["rc"] == 0 and r1["rc"] == 0
    assert r1["written"] == [], "only rank 0 writes"
    assert any("checkpoint.json" in w for w in r0["written"])
    for name in ("metrics.json", "log.csv", "sparsity.png", "compact", "trained.safetensors"):
        assert (two / name).exists(), name

    a, b = ckpt.load_checkpoint(one / "checkpoint").model, ckpt.load_checkpoint(two / "checkpoint").model
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, (a[k] - b[k]).abs().max().item())
        assert torch.equal(a[k] == 0, b[k] == 0), f"{k}: the zero structures differ"
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert any(k[0] < k[1] for k in mb["history"][-1]["kept"].values()), "the test should zero some structures"
    assert ma["world_size"] == 1 and mb["world_size"] == 2
    assert len(ma["history"]) == len(mb["history"]) == 4
    for ha, hb in zip(ma["history"], mb["history"]):
        assert ha["train_loss"] == pytest.approx(hb["train_loss"], rel=1e-5)
        assert ha["train_error"] == hb["train_error"] and ha["kept"] == hb["kept"]
        assert (ha["penalty"] is None) == (hb["penalty"] is None)
        if ha["penalty"] is not None:
            assert ha["penalty"] == pytest.approx(hb["penalty"], rel=1e-5)


def test_global_batch_must_split_evenly(recipe, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "odd.yaml"
    bad.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "batch_size": 15}))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "batch_size 15" in err and "not divisible" in err and str(bad) in err
    assert not (tmp_path / "o").exists()
