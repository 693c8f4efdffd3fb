"""Fuzzing the loaders with damaged files: ``load_compact`` and ``checkpoint.load_checkpoint``.

Property: a damaged directory either loads into something usable (a compact model that runs
on its ``input_shape``; a checkpoint whose parts have the types the trainer uses), or the
loader raises its clear error -- ``ValueError`` / ``FileNotFoundError`` for ``load_compact``,
``CheckpointError`` (what the CLI reports) for ``load_checkpoint`` -- whose message names the
file (or at least the directory). Any other exception (IndexError, KeyError, a RuntimeError
from torch, a safetensors or JSON internals error ...) fails the test, and so does any use
of pickle.

Damage: random byte flips, truncations, insertions, deletions and copied chunks of every
file; random JSON edits (values replaced by other types, negative and huge numbers, keys
dropped or added, wrong nesting, deep nesting, unknown module types, reserved or repeated
step names, bad ``inputs``); tensor edits (dtypes, shapes, out-of-range indices, keys).

Bugs that are known and reported are listed in ``KNOWN_BUGS``: each has a minimal
reproducer below, marked ``xfail(strict=True)``, and the fuzz tests count its hits instead
of failing on it. When a bug is fixed its reproducer XPASSes (and fails, being strict):
then delete its entry. The counts are printed at the end of the run ("examples tried").
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from structsparse import compact, load_compact, save_compact  # noqa: E402
from structsparse.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, set_rng_state  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread. With two OpenMP threads on a busy 2-core machine every
    small op waits for the other thread (~20 ms per conv instead of ~0.5 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ARCH, WEIGHTS, INDEX = "architecture.json", "model.safetensors", "checkpoint.json"


# ---- what is fuzzed --------------------------------------------------------------------------

class Saved:
    """An intact saved directory, as file name → content, and the model's input shape."""

    def __init__(self, files: dict[str, bytes], input_shape: list[int]):
        self.files, self.input_shape = files, input_shape

    def write(self, directory: Path, **replace: bytes) -> Path:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for name, data in {**self.files, **replace}.items():
            (directory / name).write_bytes(data)
        return directory

    def json(self, name: str) -> dict:
        return json.loads(self.files[name])

    def __repr__(self) -> str:  # hypothesis prints the fixtures of a failing example
        return f"Saved({sorted(self.files)})"


def lenet_like() -> tuple[nn.Module, torch.Tensor]:
    """A small LeNet-like chain whose compact form has IndexSelect and LoweredConv2d steps."""
    torch.manual_seed(0)
    model = nn.Sequential()
    for name, m in [("conv1", nn.Conv2d(3, 8, 3)), ("bn1", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)), ("conv2", nn.Conv2d(8, 12, 3, padding=1)),
                    ("act2", nn.LeakyReLU(0.1)), ("flatten", nn.Flatten()), ("fc1", nn.Linear(12 * 5 * 5, 20)),
                    ("bn3", nn.BatchNorm1d(20)), ("relu3", nn.ReLU()), ("drop", nn.Dropout(0.3)),
                    ("fc2", nn.Linear(20, 4))]:
        model.add_module(name, m)
    model.eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn3):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        model.conv1.weight[:, 1] = 0          # input channel 1 unread: an IndexSelect at the input
        model.conv1.weight[6:] = 0            # zero filters
        model.conv2.weight.view(12, -1)[:, torch.randperm(72)[:55]] = 0  # shape columns: LoweredConv2d
        model.conv2.weight[10:] = 0
        model.fc1.weight[:, ::3] = 0          # unread features: an IndexSelect before fc1
    return model, torch.rand(2, 3, 12, 12)


@pytest.fixture(scope="module")
def saved_compact(tmp_path_factory) -> Saved:
    model, x = lenet_like()
    directory = save_compact(compact(model, x), tmp_path_factory.mktemp("compact"))
    saved = Saved({n: (directory / n).read_bytes() for n in (ARCH, WEIGHTS)}, list(x.shape[1:]))
    types = {s["type"] for s in saved.json(ARCH)["steps"]}
    assert {"IndexSelect", "LoweredConv2d"} <= types, f"the fuzzed model should use both; it has {types}"
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


def state_name(files: dict[str, bytes]) -> str:
    return next(n for n in files if n.startswith("state-"))


# ---- judging one load ------------------------------------------------------------------------

class Unusable(Exception):
    """A loader returned something that the code using it cannot use."""


class PickleUsed(BaseException):  # BaseException: no `except Exception` in the library may hide it
    pass


_watching_pickle = False


def _pickle_audit(event: str, args) -> None:
    if _watching_pickle and event == "pickle.find_class":
        raise PickleUsed(f"a loader unpickled a global: {args}")


sys.addaudithook(_pickle_audit)  # the C unpickler reports every global it resolves


@contextlib.contextmanager
def no_pickle():
    """Loading must never unpickle: torch.load and pickle.load(s) raise, and so does resolving a
    global in any unpickler (audit event ``pickle.find_class``), while this is active."""
    global _watching_pickle

    def refuse(*args, **kwargs):
        raise PickleUsed("a loader used pickle")

    with pytest.MonkeyPatch.context() as mp:
        for module, name in [(pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")]:
            mp.setattr(module, name, refuse)
        _watching_pickle = True
        try:
            yield
        finally:
            _watching_pickle = False


@pytest.fixture(scope="module", autouse=True)
def bounded_memory():
    """Make absurd allocations fail at once instead of swapping the (shared) machine.

    Fuzzed sizes are either small or far beyond any RAM; this cap (current address space plus
    6 GiB) is only a safety net for the byte-level edits of digits. Restored afterwards.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vsz = int(next(line for line in f if line.startswith("VmSize:")).split()[1]) * 1024
    cap = vsz + 6 * 2 ** 30
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass
class KnownBug:
    summary: str
    types: tuple[type, ...]
    message: str          # regex searched in str(exception)
    reproduce: Callable[[Saved, Saved, Path], None]   # (compact, checkpoint, tmp dir): must raise the clear error


def _arch_edit(saved: Saved, tmp: Path, edit: Callable[[dict], None] | None = None, raw: str | None = None) -> Path:
    arch = saved.json(ARCH)
    if edit is not None:
        edit(arch)
    return saved.write(tmp, **{ARCH: (raw if raw is not None else json.dumps(arch)).encode()})


def _step(arch: dict, kind: str) -> dict:
    return next(s for s in arch["steps"] if s["type"] == kind)


def _expect_clear_compact(directory: Path) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(directory))):
        load_compact(directory)


def _index_edit(saved: Saved, tmp: Path, edit: Callable[[dict], None] | None = None, raw: str | None = None) -> Path:
    meta = saved.json(INDEX)
    if edit is not None:
        edit(meta)
    return saved.write(tmp, **{INDEX: (raw if raw is not None else json.dumps(meta)).encode()})


def _tensors_edit(saved: Saved, tmp: Path, edit: Callable[[dict], None]) -> Path:
    """Edit the checkpoint's tensors and re-hash them (a consistent but invalid checkpoint)."""
    name = state_name(saved.files)
    tensors = st_load(saved.files[name])
    edit(tensors)
    data = st_save(tensors)
    meta = saved.json(INDEX)
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return saved.write(tmp, **{name: data, INDEX: json.dumps(meta).encode()})


def _expect_clear_checkpoint(directory: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape(str(directory))):
        c = load_checkpoint(directory)
        usable_checkpoint(c)
        raise Unusable("accepted")  # not reached when the loader rejects the checkpoint


def _rehash_garbage(saved: Saved, tmp: Path) -> Path:
    name, data = state_name(saved.files), saved.files[state_name(saved.files)][:100]
    meta = saved.json(INDEX)
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return saved.write(tmp, **{name: data, INDEX: json.dumps(meta).encode()})


DEEP = "[" * 100_000 + "]" * 100_000

KNOWN_BUGS: dict[str, KnownBug] = {
    # ---- load_compact
    "compact-reserved-step-name": KnownBug(
        "a step named like an attribute of CompactNet/nn.Module ('training', 'forward', 'conv1.weight') "
        "escapes as KeyError/TypeError from add_module",
        (KeyError, TypeError), r"already exists|cannot assign .* as child module",
        lambda c, k, tmp: _expect_clear_compact(_arch_edit(c, tmp, lambda a: a["steps"][0].update(name="training")))),
    "compact-unhashable-type": KnownBug(
        "a step whose 'type' is a list or an object escapes as TypeError: unhashable type",
        (TypeError,), r"unhashable type",
        lambda c, k, tmp: _expect_clear_compact(_arch_edit(c, tmp, lambda a: a["steps"][0].update(type=["Linear"])))),
    "compact-deep-json": KnownBug(
        "deeply nested JSON escapes as RecursionError from json.loads",
        (RecursionError,), r"recursion",
        lambda c, k, tmp: _expect_clear_compact(_arch_edit(c, tmp, raw=DEEP))),
    "compact-huge-int-literal": KnownBug(
        "an integer literal of more than 4300 digits raises a ValueError that does not name the file",
        (ValueError,), r"Exceeds the limit \(\d+ digits\)",
        lambda c, k, tmp: _expect_clear_compact(_arch_edit(c, tmp, raw=c.files[ARCH].decode().replace(
            '"version": 1', '"version": 1' + "0" * 5000)))),
    "compact-input-shape-not-a-list": KnownBug(
        "an 'input_shape' that is not a list (a number) escapes as TypeError: the error message itself "
        "evaluates [1, *input_shape]",
        (TypeError,), r"after \* must be an iterable",
        lambda c, k, tmp: _expect_clear_compact(_arch_edit(c, tmp, lambda a: a.update(input_shape=0)))),
    "compact-lowered-conv-config": KnownBug(
        "a LoweredConv2d step with a one-element kernel_size ([3]) escapes as IndexError from its constructor",
        (IndexError,), r"tuple index out of range",
        lambda c, k, tmp: _expect_clear_compact(_arch_edit(c, tmp, lambda a: _step(a, "LoweredConv2d")[
            "config"].update(kernel_size=[3])))),
    "compact-ctor-assertion": KnownBug(
        "a module constructor's assert (Hardtanh with min_val > max_val) escapes as AssertionError",
        (AssertionError,), r"must be greater than",
        lambda c, k, tmp: _expect_clear_compact(_arch_edit(c, tmp, lambda a: _step(a, "ReLU").update(
            type="Hardtanh", config={"min_val": 1.0, "max_val": -1.0})))),
    # ---- load_checkpoint
    "checkpoint-tensor-keys": KnownBug(
        "tensor names that do not follow the model./optimizer.<id>./masks./rng. scheme escape as "
        "ValueError/IndexError from int() or unpacking",
        (ValueError, IndexError), r"invalid literal for int|not enough values to unpack|list index out of range",
        lambda c, k, tmp: _expect_clear_checkpoint(_tensors_edit(k, tmp, lambda t: t.update(
            {"rng.cuda.x": torch.zeros(4, dtype=torch.uint8)})))),
    "checkpoint-deep-json": KnownBug(
        "deeply nested JSON in checkpoint.json escapes as RecursionError",
        (RecursionError,), r"recursion",
        lambda c, k, tmp: _expect_clear_checkpoint(_index_edit(k, tmp, raw=DEEP))),
    "checkpoint-tensor-file": KnownBug(
        "a tensor file that matches its SHA-256 but is not valid safetensors escapes as SafetensorError",
        (Exception,), r"Error while deserializing|SafetensorError|invalid header",
        lambda c, k, tmp: _expect_clear_checkpoint(_rehash_garbage(k, tmp))),
    "checkpoint-index-structure": KnownBug(
        "checkpoint.json that is valid JSON but not the expected object (a list, missing keys, keys of "
        "the wrong type) escapes as AttributeError/KeyError/TypeError/ValueError",
        (AttributeError, KeyError, TypeError, ValueError), r"",
        lambda c, k, tmp: _expect_clear_checkpoint(_index_edit(k, tmp, lambda m: m.pop("state_file")))),
    "checkpoint-unusable": KnownBug(
        "a checkpoint with a non-object 'info', no or a wrong RNG state, or a malformed optimizer "
        "state loads, and the trainer fails on it later with an unclear error",
        (Unusable,), r"",
        lambda c, k, tmp: _expect_clear_checkpoint(_index_edit(k, tmp, lambda m: m.update(info=7)))),
}


@pytest.mark.parametrize("bug", [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=f"known bug: {bug.summary}"))
    for name, bug in KNOWN_BUGS.items()])
def test_known_bug_reproducer(bug, saved_compact, saved_checkpoint, tmp_path):
    KNOWN_BUGS[bug].reproduce(saved_compact, saved_checkpoint, tmp_path / "d")


def known_bug(e: BaseException, prefix: str) -> str | None:
    for name, bug in KNOWN_BUGS.items():
        if name.startswith(prefix) and isinstance(e, bug.types) and re.search(bug.message, str(e)):
            return name
    return None


def usable_compact(net, stats: dict, label: str) -> None:
    if net.input_shape is None:  # nothing to check against; the loader checked nothing either
        stats[f"{label}: loaded, no input_shape"] = stats.get(f"{label}: loaded, no input_shape", 0) + 1
        return
    try:
        with torch.no_grad():
            net(torch.rand(2, *net.input_shape))
    except Exception as e:
        raise Unusable(f"the loaded model fails on its input_shape {net.input_shape}: {e}") from e


def usable_checkpoint(c) -> None:
    """What resuming needs of a loaded checkpoint (train.Trainer._position)."""
    if not isinstance(c.info, dict):
        raise Unusable(f"info is a {type(c.info).__name__}, not an object")
    for part, tensors in (("model", c.model), ("masks", c.masks or {})):
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise Unusable(f"{part} is not a dict of tensors")
    try:
        with torch.random.fork_rng(devices=[]):
            set_rng_state(c.rng)
    except Exception as e:
        raise Unusable(f"the RNG state cannot be restored: {e}") from e
    opt = c.optimizer
    if opt is not None and not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
                                and isinstance(opt.get("param_groups"), list)
                                and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                        for g in opt["param_groups"])):
        raise Unusable("the optimizer state is malformed")


def judge(stats: dict, label: str, directory: Path, load: Callable, clear: tuple[type, ...],
          usable: Callable, bug_prefix: str) -> None:
    """Load ``directory``; tally the outcome; fail on anything but success or a clear error."""
    def tally(key: str) -> None:
        stats[f"{label}: {key}"] = stats.get(f"{label}: {key}", 0) + 1

    tally("tried")
    try:
        with no_pickle():
            loaded = load(directory)
        usable(loaded)
    except clear as e:
        if str(directory) in str(e):
            tally("rejected (clear error)")
            return
        error = e
    except Exception as e:
        error = e
    else:
        tally("loaded")
        return
    bug = known_bug(error, bug_prefix)
    if bug is None:
        raise AssertionError(f"{label}: unclear {type(error).__name__} for a damaged file: {error}") from error
    tally(f"known bug {bug}")
    if os.environ.get("STRUCTSPARSE_FUZZ_VERBOSE"):  # which errors each known bug was hit with
        tally(f"known bug {bug}: {type(error).__name__}: {re.sub(r'[0-9]+', 'N', str(error))[:70]}")


def judge_compact(stats, label, directory):
    judge(stats, label, directory, load_compact, (ValueError, FileNotFoundError),
          lambda net: usable_compact(net, stats, label), "compact-")


def judge_checkpoint(stats, label, directory):
    judge(stats, label, directory, load_checkpoint, (CheckpointError,), usable_checkpoint, "checkpoint-")


# ---- damage ----------------------------------------------------------------------------------

@st.composite
def damaged_bytes(draw, data: bytes, hot: int = 0) -> bytes:
    """``data`` after 1-4 random edits; ``hot`` > 0 aims half of them at the first ``hot`` bytes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        end = len(out)
        if hot and draw(st.booleans()):
            end = min(end, hot)
        pos = draw(st.integers(0, max(end - 1, 0)))
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "copy"]))
        if kind == "flip" and out:
            out[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del out[pos:pos + draw(st.integers(1, 64))]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[pos:pos + len(chunk)] = chunk
        elif kind == "copy" and out:
            start = draw(st.integers(0, len(out) - 1))
            out[pos:pos] = out[start:start + draw(st.integers(1, 64))]
    return bytes(out)


def header_size(safetensors: bytes) -> int:
    return 8 + struct.unpack("<Q", safetensors[:8])[0]


# JSON values to put anywhere. Sizes are small or far beyond any RAM: nothing in between, so
# that a value which *is* allocated stays cheap (see bounded_memory).
HUGE = [2 ** 40, -(2 ** 40), 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30]
INTS = st.one_of(st.integers(-3, 40), st.sampled_from(HUGE))
FLOATS = st.one_of(st.floats(-50, 50), st.sampled_from([1e-300, 1e300, -1e300, math.inf, -math.inf, math.nan]))
TEXT = st.one_of(st.sampled_from(["", "7", "-1", "1e3", "zeros", "Conv2d", "__class__", "../x", "a.b", "None",
                                  "true", "x" * 300, "é", "\x00", "training"]), st.text(max_size=6))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=6)
MODULE_TYPES = ["Conv2d", "Linear", "BatchNorm1d", "BatchNorm2d", "ReLU", "LeakyReLU", "Hardtanh", "Softplus",
                "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Dropout", "Flatten", "Softmax", "Identity", "Op",
                "IndexSelect", "LoweredConv2d", "PReLU", "ChannelPad", "Constant", "Add", "Cat",
                # not allowed
                "Module", "Sequential", "Upsample", "Eval", "os.system", "__import__", "Conv2d.__init__"]
STEP_NAMES = ["training", "forward", "order", "steps", "input_shape", "_modules", "_steps", "T_destination",
              "dump_patches", "call_super_init", "conv1.weight", "conv1.sub", "a.b", "0", "input", "INPUT", "_"]
DEEP_MARK, BIG_MARK = "\x01deep\x01", "\x01bigint\x01"


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(node, path):
    for p in path:
        node = node[p]
    return node


def _retype(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return [v]
    if isinstance(v, list):
        return {str(i): x for i, x in enumerate(v)}
    if isinstance(v, dict):
        return list(v.values())
    return 0


@st.composite
def mutated_json(draw, doc: dict) -> str:
    """``doc`` after 1-3 random edits, serialised (NaN/Infinity literals, deep nesting and
    over-long integer literals included)."""
    doc = json.loads(json.dumps(doc))
    root = {"doc": doc}
    deep, big = draw(st.sampled_from([2, 50, 500, 5_000, 100_000])), draw(st.sampled_from([20, 400, 5_000]))
    for _ in range(draw(st.integers(1, 3))):
        doc = root["doc"]
        path = ("doc",) + draw(st.sampled_from(list(_paths(doc))))
        parent, key = _get(root, path[:-1]), path[-1]
        value = parent[key]
        steps = doc.get("steps") if isinstance(doc, dict) else None
        kind = draw(st.sampled_from(["replace", "replace", "number", "delete", "add", "retype", "wrap", "unwrap",
                                     "deep", "bigint", "step"]))
        if kind == "replace":
            parent[key] = draw(VALUES)
        elif kind == "number":
            parent[key] = draw(INTS | FLOATS) if not isinstance(value, int) or isinstance(value, bool) else \
                draw(st.sampled_from([-value, -1, 0, value + 1, value - 1, value * 10 + 7, *HUGE]))
        elif kind == "delete" and len(path) > 1:
            del parent[key]
        elif kind == "add" and isinstance(value, dict):
            value[draw(TEXT | st.sampled_from(["inputs", "bias", "columns", "index", "name", "type", "config",
                                                 "device", "dtype", "padding_mode"]))] = draw(VALUES)
        elif kind == "add" and isinstance(value, list):
            value.insert(draw(st.integers(0, len(value))), draw(VALUES) if not value or draw(st.booleans())
                         else json.loads(json.dumps(value[draw(st.integers(0, len(value) - 1))])))
        elif kind == "retype":
            parent[key] = _retype(value)
        elif kind == "wrap":
            parent[key] = draw(st.sampled_from([[value], {"value": value}, [[value]]]))
        elif kind == "unwrap" and isinstance(value, (list, dict)) and value:
            parent[key] = value[0] if isinstance(value, list) else next(iter(value.values()))
        elif kind == "deep":
            parent[key] = DEEP_MARK
        elif kind == "bigint":
            parent[key] = BIG_MARK
        elif kind == "step" and isinstance(steps, list) and steps and all(isinstance(s, dict) for s in steps):
            i, j = draw(st.integers(0, len(steps) - 1)), draw(st.integers(0, len(steps) - 1))
            what = draw(st.sampled_from(["type", "name", "duplicate", "swap", "inputs"]))
            if what == "type":
                steps[i]["type"] = draw(st.sampled_from(MODULE_TYPES))
            elif what == "name":
                steps[i]["name"] = draw(st.sampled_from(STEP_NAMES + [str(s.get("name")) for s in steps]))
            elif what == "duplicate":
                steps.insert(j, json.loads(json.dumps(steps[i])))
            elif what == "swap":
                steps[i], steps[j] = steps[j], steps[i]
            else:
                names = [str(s.get("name")) for s in steps]
                steps[i]["inputs"] = draw(st.lists(st.sampled_from(names + ["input", "nowhere", "a.b"]), max_size=3))
    text = json.dumps(root["doc"], indent=1)
    return text.replace(json.dumps(DEEP_MARK), "[" * deep + "]" * deep).replace(json.dumps(BIG_MARK), "7" * big)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


@st.composite
def mutated_tensors(draw, tensors: dict[str, torch.Tensor], extra_names: list[str]) -> dict[str, torch.Tensor]:
    """``tensors`` after 1-3 edits of keys, dtypes, shapes and values."""
    tensors = {k: v.clone() for k, v in tensors.items()}
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(tensors)
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        t = tensors[key]
        kind = draw(st.sampled_from(["drop", "add", "rename", "dtype", "shape", "value", "empty"]))
        if kind == "drop":
            del tensors[key]
        elif kind == "add":
            tensors[draw(st.sampled_from(extra_names + [key + ".x", "x" + key]))] = t.clone()
        elif kind == "rename":
            tensors[draw(st.sampled_from(extra_names + [key.rsplit(".", 1)[0], key.upper()]))] = tensors.pop(key)
        elif kind == "dtype":
            tensors[key] = t.to(draw(st.sampled_from(DTYPES)))
        elif kind == "shape":
            change = draw(st.sampled_from(["flat", "unsqueeze", "transpose", "shorter", "longer", "scalar"]))
            if change == "flat":
                t = t.flatten()
            elif change == "unsqueeze":
                t = t.unsqueeze(0)
            elif change == "transpose" and t.dim() >= 2:
                t = t.transpose(0, 1)
            elif change == "shorter" and t.dim() and t.shape[0] > 1:
                t = t[1:]
            elif change == "longer" and t.dim():
                t = torch.cat([t, t[:1]])
            elif change == "scalar" and t.numel():
                t = t.flatten()[:1].reshape(())
            tensors[key] = t.contiguous()
        elif kind == "value" and t.numel():
            flat = t.flatten().clone()
            i = draw(st.integers(0, flat.numel() - 1))
            if flat.dtype.is_floating_point:
                flat[i] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e38, -0.0, 0.0]))
            elif flat.dtype == torch.bool:
                flat[i] = not bool(flat[i])
            else:  # out of range, or a duplicate
                v = draw(st.sampled_from([-1, 0, 2 ** 62, -(2 ** 62), int(flat.max()) + 1,
                                          int(flat[(i + 1) % flat.numel()])]))
                info = torch.iinfo(flat.dtype)
                flat[i] = min(max(v, info.min), info.max)
            tensors[key] = flat.view(t.shape)
        elif kind == "empty":
            tensors[key] = t.flatten()[:0].contiguous()
    return tensors


def save_or_reject(tensors: dict[str, torch.Tensor]) -> bytes:
    try:
        return st_save(tensors)
    except Exception:  # safetensors refuses to write it (a reserved name ...): not a file to test
        assume(False)


# ---- load_compact ----------------------------------------------------------------------------

@given(data=st.data())
def test_load_compact_survives_damaged_bytes(saved_compact, fuzz_stats, data):
    which = data.draw(st.sampled_from([ARCH, WEIGHTS]))
    hot = header_size(saved_compact.files[WEIGHTS]) if which == WEIGHTS else 0
    damaged = data.draw(damaged_bytes(saved_compact.files[which], hot))
    with tempfile.TemporaryDirectory() as tmp:
        d = saved_compact.write(Path(tmp) / "m", **{which: damaged})
        judge_compact(fuzz_stats, f"load_compact, damaged {which} bytes", d)


@given(data=st.data())
def test_load_compact_survives_edited_description(saved_compact, fuzz_stats, data):
    text = data.draw(mutated_json(saved_compact.json(ARCH)))
    with tempfile.TemporaryDirectory() as tmp:
        d = saved_compact.write(Path(tmp) / "m", **{ARCH: text.encode()})
        judge_compact(fuzz_stats, "load_compact, edited architecture.json", d)


@given(data=st.data())
def test_load_compact_survives_edited_weights(saved_compact, fuzz_stats, data):
    original = saved_compact.files[WEIGHTS]
    if data.draw(st.booleans()):  # tensors: keys, dtypes, shapes, indices out of range
        names = ["fc1.weight", "conv2.columns.x", "bn1.num_batches_tracked", "__metadata__", ""]
        weights = save_or_reject(data.draw(mutated_tensors(st_load(original), names)))
    else:  # the safetensors header itself: dtypes, shapes, data offsets, metadata
        n = header_size(original)
        header = json.loads(original[8:n])
        text = data.draw(mutated_json(header)).encode()
        weights = struct.pack("<Q", len(text)) + text + original[n:]
    with tempfile.TemporaryDirectory() as tmp:
        d = saved_compact.write(Path(tmp) / "m", **{WEIGHTS: weights})
        judge_compact(fuzz_stats, "load_compact, edited model.safetensors", d)


# ---- load_checkpoint -------------------------------------------------------------------------

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
