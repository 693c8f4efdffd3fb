"""Fuzzing ``load_checkpoint`` with damaged files (the harness and the property: :mod:`fuzzing`)."""
import hashlib
import json
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from fuzzing import (INDEX, damaged_bytes, header_size, judge_checkpoint, mutated_json,  # noqa: E402
                     mutated_tensors, save_or_reject, state_name)
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@given(data=st.data())
def test_load_checkpoint_survives_damaged_bytes(saved_checkpoint, fuzz_stats, data):
    files = saved_checkpoint.files
    state = state_name(files)
    which = data.draw(st.sampled_from(["index", "state", "state, re-hashed"]))
    name = INDEX if which == "index" else state
    damaged = data.draw(damaged_bytes(files[name], header_size(files[state]) if name == state else 0))
    replace = {name: damaged}
    if which == "state, re-hashed":  # consistent with its hash: the loader must look at the content
        meta = saved_checkpoint.json(INDEX)
        meta["sha256"] = hashlib.sha256(damaged).hexdigest()
        replace[INDEX] = json.dumps(meta).encode()
    with tempfile.TemporaryDirectory() as tmp:
        d = saved_checkpoint.write(Path(tmp) / "c", **replace)
        judge_checkpoint(fuzz_stats, f"load_checkpoint, damaged {which} bytes", d)


@given(data=st.data())
def test_load_checkpoint_survives_edited_index(saved_checkpoint, fuzz_stats, data):
    text = data.draw(mutated_json(saved_checkpoint.json(INDEX)))
    with tempfile.TemporaryDirectory() as tmp:
        d = saved_checkpoint.write(Path(tmp) / "c", **{INDEX: text.encode()})
        judge_checkpoint(fuzz_stats, "load_checkpoint, edited checkpoint.json", d)


@given(data=st.data())
def test_load_checkpoint_survives_edited_tensors(saved_checkpoint, fuzz_stats, data):
    files = saved_checkpoint.files
    state = state_name(files)
    names = ["rng", "rng.cuda", "rng.cuda.0", "rng.cuda.x", "optimizer", "optimizer.x", "optimizer.a.b",
             "optimizer.99.momentum_buffer", "optimizer.0.step", "masks.nowhere", "masks", "model.", "model", "x"]
    tensors = save_or_reject(data.draw(mutated_tensors(st_load(files[state]), names)))
    meta = saved_checkpoint.json(INDEX)
    meta["sha256"] = hashlib.sha256(tensors).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        d = saved_checkpoint.write(Path(tmp) / "c", **{state: tensors, INDEX: json.dumps(meta).encode()})
        judge_checkpoint(fuzz_stats, "load_checkpoint, edited tensors (re-hashed)", d)
