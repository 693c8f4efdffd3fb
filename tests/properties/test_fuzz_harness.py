"""The fuzzing harness itself: the reproducers of known and fixed bugs, the pickle guard, and the intact
files that the fuzz tests damage (:mod:`fuzzing`)."""
import io
import pickle
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from fuzzing import FIXED_BUGS, KNOWN_BUGS, PickleUsed, no_pickle, usable_checkpoint  # noqa: E402

from structsparse import load_compact  # noqa: E402
from structsparse.storage.checkpoint import load_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("bug", [
    *(pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"known bug: {bug.summary}"))
      for name, bug in KNOWN_BUGS.items()),
    *FIXED_BUGS])
def test_bug_reproducer(bug, saved_compact, saved_checkpoint, tmp_path):
    """Known bugs (strict xfail) and fixed ones (regression tests): the loader's clear error."""
    reproduce = KNOWN_BUGS[bug].reproduce if bug in KNOWN_BUGS else FIXED_BUGS[bug]
    reproduce(saved_compact, saved_checkpoint, tmp_path / "d")


def test_pickle_guard_works(tmp_path):
    """The guard that the fuzz tests rely on does catch unpickling."""
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pt")
    for load in (lambda: torch.load(tmp_path / "w.pt"), lambda: pickle.loads(pickle.dumps(Path("x"))),
                 lambda: pickle.Unpickler(io.BytesIO(pickle.dumps(Path("x")))).load()):
        with pytest.raises(PickleUsed), no_pickle():
            load()


def test_intact_files_load(saved_compact, saved_checkpoint, tmp_path):
    """The fuzzed files are loadable before they are damaged (so every rejection is earned)."""
    net = load_compact(saved_compact.write(tmp_path / "m"))
    assert net(torch.rand(2, *saved_compact.input_shape)).shape == (2, 4)
    usable_checkpoint(load_checkpoint(saved_checkpoint.write(tmp_path / "c")))
