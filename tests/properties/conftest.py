"""Fixtures of the fuzz tests (:mod:`fuzzing` is their harness): the files they damage, and a cap on the
address space so that an absurd allocation fails at once."""
import pytest
import torch

from fuzzing import ARCH, WEIGHTS, Saved, address_space_headroom, lenet_like
from structsparse import compact, save_compact
from structsparse.storage.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def saved_compact(tmp_path_factory) -> Saved:
    model, x = lenet_like()
    directory = save_compact(compact(model, x, fold_norms=False), tmp_path_factory.mktemp("compact"))
    saved = Saved({n: (directory / n).read_bytes() for n in (ARCH, WEIGHTS)}, list(x.shape[1:]))
    types = {s["type"] for s in saved.json(ARCH)["steps"]}
    assert {"IndexSelect", "LoweredConv2d", "BatchNorm2d"} <= types, f"the fuzzed model should use both; it has {types}"
    return saved


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory) -> Saved:
    model, x = lenet_like()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(x).sum().backward()
    opt.step()
    masks = {"conv1.weight": model.conv1.weight.detach().ne(0), "fc1.weight": model.fc1.weight.detach().ne(0)}
    info = {"recipe": {"name": "fuzz"}, "phase": 0, "epoch": 1, "history": [{"loss": 1.5}]}
    directory = tmp_path_factory.mktemp("checkpoint")
    save_checkpoint(directory, model, info, optimizer=opt, masks=masks)
    return Saved({p.name: p.read_bytes() for p in directory.iterdir()}, list(x.shape[1:]))


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    """Make absurd allocations fail at once instead of swapping the (shared) machine.

    Fuzzed sizes are either small or far beyond any RAM; this cap (current address space plus
    6 GiB) is only a safety net for the byte-level edits of digits. Restored afterwards.
    """
    with address_space_headroom(6 * 2 ** 30):
        yield
