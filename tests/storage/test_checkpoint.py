"""Checkpoints: safetensors + JSON, written atomically, checked by SHA-256 on load, never pickled.
(Damaged files are fuzzed in ``tests/properties/test_fuzz_checkpoint.py``.)"""
import json
from pathlib import Path

import pytest
import torch

from structsparse.storage import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[2]


def test_no_pickle_in_the_library():
    """Nothing a user might load from someone else is pickled; the one unpickling in the library reads
    MNIST's pickle after its SHA-256 is checked (zoo/data.py)."""
    files = sorted((ROOT / "structsparse").rglob("*.py"))
    assert len(files) > 20
    for path in files:
        if path.relative_to(ROOT).as_posix() == "structsparse/zoo/data.py":
            continue
        text = path.read_text()
        for bad in ("torch.save", "torch.load", "import pickle"):
            assert bad not in text, (path, bad)


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path, model, {"step": 1}, optimizer=opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1)

    real = ckpt.atomic_write

    def crash_on_index(path, data):
        if path.name == ckpt.INDEX:
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write", crash_on_index)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(tmp_path, model, {"step": 2}, optimizer=opt)
    monkeypatch.undo()
    c = ckpt.load_checkpoint(tmp_path)
    assert c.info == {"step": 1}
    assert all(torch.equal(c.model[k], before[k]) for k in before)
    assert torch.equal(c.optimizer["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    # The next successful save cleans up the orphaned tensor file; the one before it stays, as the fallback.
    ckpt.save_checkpoint(tmp_path, model, {"step": 3}, optimizer=opt)
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 2


def test_the_two_newest_checkpoints_are_kept_and_a_damaged_newest_falls_back(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in (1, 2, 3):
        with torch.no_grad():
            model.bias.fill_(step)       # tensor files are named by their content
        ckpt.save_checkpoint(tmp_path, model, {"step": step})
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 2
    assert ckpt.load_checkpoint(tmp_path).note is None
    newest = tmp_path / json.loads((tmp_path / ckpt.INDEX).read_text())["state_file"]
    newest.write_bytes(newest.read_bytes()[:-1] + b"!")
    c = ckpt.load_checkpoint(tmp_path)
    assert c.info == {"step": 2} and "SHA-256 does not match" in c.note and ckpt.PREVIOUS in c.note
    (tmp_path / ckpt.PREVIOUS).write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="SHA-256 does not match"):   # both damaged: the newest's error
        ckpt.load_checkpoint(tmp_path)


def test_corrupt_checkpoint_is_detected(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckpt.save_checkpoint(tmp_path, model, {})
    state = next(tmp_path.glob("state-*.safetensors"))
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="SHA-256"):
        ckpt.load_checkpoint(tmp_path)
