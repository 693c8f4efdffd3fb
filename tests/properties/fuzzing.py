"""The harness for fuzzing the loaders with damaged files: ``load_compact`` and ``checkpoint.load_checkpoint``
(the tests are in ``test_fuzz_compact_io.py``, ``test_fuzz_checkpoint.py`` and ``test_fuzz_harness.py``).

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
then delete its entry and keep the reproducer in ``FIXED_BUGS``, where it runs as a normal
regression test. The counts are printed at the end of the run ("examples tried").
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from structsparse import load_compact  # noqa: E402
from structsparse.storage.checkpoint import CheckpointError, load_checkpoint, set_rng_state  # noqa: E402


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


@contextlib.contextmanager
def address_space_headroom(headroom: int):
    """While active, the process may map at most ``headroom`` more bytes of address space
    (RLIMIT_AS: an allocation beyond it fails at once). Linux only; elsewhere it does nothing."""
    if not sys.platform.startswith("linux"):
        yield
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as f:
        vsz = int(next(line for line in f if line.startswith("VmSize:")).split()[1]) * 1024
    cap = vsz + headroom
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


def arch_edit(saved: Saved, tmp: Path, edit: Callable[[dict], None] | None = None, raw: str | None = None) -> Path:
    arch = saved.json(ARCH)
    if edit is not None:
        edit(arch)
    return saved.write(tmp, **{ARCH: (raw if raw is not None else json.dumps(arch)).encode()})


def _step(arch: dict, kind: str) -> dict:
    return next(s for s in arch["steps"] if s["type"] == kind)


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


def _rehash_garbage(saved: Saved, tmp: Path) -> Path:
    name, data = state_name(saved.files), saved.files[state_name(saved.files)][:100]
    meta = saved.json(INDEX)
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return saved.write(tmp, **{name: data, INDEX: json.dumps(meta).encode()})


DEEP = "[" * 100_000 + "]" * 100_000

# Bugs that are known, reported and not fixed yet (see the module docstring); none at present.
KNOWN_BUGS: dict[str, KnownBug] = {}


def _clear_compact(what: str, edit: Callable[[dict], None] | None = None,
                   raw: Callable[[Saved], str | bytes] | None = None):
    """A reproducer: architecture.json after ``edit`` (or as ``raw`` makes it) must be rejected with
    load_compact's clear error, whose message also matches ``what``."""
    def reproduce(c: Saved, k: Saved, tmp: Path) -> None:
        if raw is None:
            d = arch_edit(c, tmp, edit)
        else:
            data = raw(c)
            d = c.write(tmp, **{ARCH: data.encode() if isinstance(data, str) else data})
        with pytest.raises((ValueError, FileNotFoundError), match=re.escape(str(d))) as e:
            load_compact(d)
        assert re.search(what, str(e.value)), str(e.value)
    return reproduce


def _clear_checkpoint(what: str, make: Callable[[Saved, Path], Path]):
    """A reproducer: the checkpoint ``make`` writes must be rejected with CheckpointError naming the
    directory and matching ``what`` (and not load into something the trainer cannot use)."""
    def reproduce(c: Saved, k: Saved, tmp: Path) -> None:
        d = make(k, tmp)
        with pytest.raises(CheckpointError, match=re.escape(str(d))) as e:
            usable_checkpoint(load_checkpoint(d))
            raise Unusable("accepted")
        assert re.search(what, str(e.value)), str(e.value)
    return reproduce


def _edit_step(kind: str, config: dict | None = None, **changes) -> Callable[[dict], None]:
    """Edit the first step of type ``kind``: update its keys with ``changes``; ``config`` is merged into
    its config, or replaces it when the type changes."""
    def edit(arch: dict) -> None:
        step = _step(arch, kind)
        step.update(changes)
        if config is not None:
            step["config"] = dict(config) if "type" in changes else {**step["config"], **config}
    return edit


def _name_step(i: int, name: str) -> Callable[[dict], None]:
    return lambda a: a["steps"][i].update(name=name)


def _with_index(fn: Callable[[dict], None]) -> Callable[[Saved, Path], Path]:
    return lambda k, tmp: _index_edit(k, tmp, fn)


def _with_tensors(fn: Callable[[dict], None]) -> Callable[[Saved, Path], Path]:
    return lambda k, tmp: _tensors_edit(k, tmp, fn)


def _absolute_state_file(k: Saved, tmp: Path) -> Path:
    """A valid tensor file outside the checkpoint directory, named by its absolute path."""
    d = k.write(tmp)
    outside = tmp.parent / "elsewhere.safetensors"
    outside.write_bytes(k.files[state_name(k.files)])
    meta = k.json(INDEX)
    meta["state_file"] = str(outside)
    (d / INDEX).write_text(json.dumps(meta))
    return d


def no_input_shape(edit: Callable[[dict], None]) -> Callable[[dict], None]:
    def both(arch: dict) -> None:
        arch["input_shape"] = None
        edit(arch)
    return both


def _pop(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


def _cuda_states(t: dict) -> None:
    t.update({"rng.cuda.1": torch.zeros(16, dtype=torch.uint8)})


def _dup_scalar(k: Saved, tmp: Path) -> Path:
    """An optimizer value stored both as a tensor and as a JSON scalar."""
    d = _tensors_edit(k, tmp, lambda t: None)
    meta = json.loads((d / INDEX).read_text())
    meta["optimizer"]["scalars"] = {"0": {"momentum_buffer": 1.0}}
    (d / INDEX).write_text(json.dumps(meta))
    return d


# Bugs found by fuzzing and fixed: each reproducer must raise the loader's clear error.
FIXED_BUGS: dict[str, Callable[[Saved, Saved, Path], None]] = {
    # ---- load_compact: step names that clash with attributes of CompactNet / nn.Module, or with steps
    **{f"compact-reserved-step-name-{n}": _clear_compact("bad step name|cannot also hold", _name_step(0, n))
       for n in ["training", "forward", "order", "steps", "input_shape", "inputs", "_steps", "_chain", "_modules",
                 "INPUT", "T_destination", "dump_patches", "call_super_init", "a.training", "a.forward"]},
    "compact-step-inside-step": _clear_compact("cannot also hold", _name_step(2, "conv1.weight")),
    "compact-step-inside-later-step": _clear_compact("cannot also hold", lambda a: (
        a["steps"][0].update(name="x.y"), a["steps"][1].update(name="x"))),
    "compact-step-name-input": _clear_compact("reserved", _name_step(1, "input")),
    # ---- module types, JSON
    "compact-unhashable-type": _clear_compact("not allowed", lambda a: a["steps"][0].update(type=["Linear"])),
    "compact-type-object": _clear_compact("not allowed", lambda a: a["steps"][0].update(type={"a": 1})),
    "compact-deep-json": _clear_compact("not valid JSON", raw=lambda c: DEEP),
    "compact-huge-int-literal": _clear_compact("not valid JSON", raw=lambda c: c.files[ARCH].decode().replace(
        '"version": 1', '"version": 1' + "0" * 5000)),
    "compact-not-utf8": _clear_compact("not valid JSON", raw=lambda c: b"\xff" + c.files[ARCH]),
    # ---- input_shape
    **{f"compact-input-shape-{v!r}": _clear_compact("input_shape", lambda a, v=v: a.update(input_shape=v))
       for v in [0, "x", {"a": 1}, [], [0, 12, 12], [-3, 12, 12], [3.0, 12, 12], [True, 12, 12], [[3], 12, 12],
                 [1] * 9, [2 ** 40, 2 ** 40], [3, 2 ** 20, 2 ** 20]]},
    **{f"compact-input-shape-wrong-{v}": _clear_compact("fails on an input", lambda a, v=v: a.update(input_shape=v))
       for v in [[2, 12, 12], [3], [3, 4, 4]]},
    # ---- configurations
    **{f"compact-lowered-conv-{k}-{v!r}": _clear_compact(f"bad config for LoweredConv2d: .*{k}",
                                                         _edit_step("LoweredConv2d", config={k: v}))
       for k, v in [("kernel_size", [3]), ("kernel_size", [3, 3, 3]), ("kernel_size", "3"), ("kernel_size", 0),
                    ("columns", 0), ("columns", 10 ** 6), ("columns", 2.5), ("stride", 0), ("padding", -1),
                    ("dilation", [1, 0]), ("bias", "yes"), ("in_channels", 0), ("out_channels", None)]},
    "compact-lowered-conv-unknown-key": _clear_compact("unknown config keys", _edit_step(
        "LoweredConv2d", config={"groups": 2})),
    "compact-ctor-assertion": _clear_compact("bad config for Hardtanh", _edit_step(
        "ReLU", type="Hardtanh", config={"min_val": 1.0, "max_val": -1.0})),
    "compact-config-bool-type": _clear_compact("bias", _edit_step("Linear", config={"bias": 7})),
    "compact-config-number-type": _clear_compact("negative_slope", _edit_step(
        "LeakyReLU", config={"negative_slope": "x"})),
    "compact-config-nested": _clear_compact("kernel_size", _edit_step("MaxPool2d", config={"kernel_size": [[2]]})),
    "compact-op-unknown-function": _clear_compact("unknown function", _edit_step(
        "ReLU", type="Op", config={"fn": ["relu"], "kwargs": {}})),
    "compact-op-kwargs": _clear_compact("kwargs", _edit_step("ReLU", type="Op", config={"fn": "relu", "kwargs": [1]})),
    "compact-op-unknown-argument": _clear_compact("no argument 'bogus'", _edit_step(
        "ReLU", type="Op", config={"fn": "relu", "kwargs": {"bogus": 1}})),
    "compact-index-select-dim": _clear_compact("dim", _edit_step("IndexSelect", config={"dim": "1"})),
    "compact-channel-pad-index": _clear_compact("index", _edit_step(
        "ReLU", type="ChannelPad", config={"out_channels": 4, "index": 5})),
    "compact-constant-shape": _clear_compact("shape", _edit_step("ReLU", type="Constant", config={"shape": [-1]})),
    "compact-tuple-output": _clear_compact("returns a tuple", _edit_step(
        "MaxPool2d", config={"return_indices": True})),
    # ---- structure, checked with or without an input_shape (files written before it was stored)
    **{f"compact-{label}{'-no-input-shape' if no_shape else ''}": _clear_compact(
        what, no_input_shape(edit) if no_shape else edit)
       for no_shape in (False, True) for label, what, edit in [
           ("arity", "reads exactly one input",
            lambda a: a["steps"][2].update(inputs=["input", a["steps"][1]["name"]])),
           ("later-input", "must name earlier steps",
            lambda a: a["steps"][1].update(inputs=[a["steps"][-1]["name"]])),
           ("no-inputs", "non-empty list", lambda a: a["steps"][1].update(inputs=[])),
           ("add-no-inputs", "non-empty list", lambda a: a["steps"][1].update(type="Add", config={}, inputs=[])),
           ("duplicate-name", "used twice", lambda a: a["steps"][2].update(name=a["steps"][1]["name"])),
       ]},
    # ---- load_checkpoint: checkpoint.json
    "checkpoint-deep-json": _clear_checkpoint("checkpoint.json: cannot read",
                                              lambda k, tmp: _index_edit(k, tmp, raw=DEEP)),
    "checkpoint-huge-int-literal": _clear_checkpoint("checkpoint.json: cannot read", lambda k, tmp: _index_edit(
        k, tmp, raw=json.dumps(k.json(INDEX)).replace('"version": 1', '"version": 1' + "0" * 5000))),
    **{f"checkpoint-index-{type(v).__name__}": _clear_checkpoint(
        "expected a JSON object", lambda k, tmp, v=v: _index_edit(k, tmp, raw=json.dumps(v)))
       for v in [[], "x", None, 7]},
    **{f"checkpoint-index-structure-{key}": _clear_checkpoint(f"missing fields .*{key}", _with_index(_pop(key)))
       for key in ["state_file", "sha256", "info", "optimizer", "masks"]},
    "checkpoint-index-unknown-field": _clear_checkpoint("unknown fields", _with_index(lambda m: m.update(extra=1))),
    "checkpoint-index-version": _clear_checkpoint("version", _with_index(lambda m: m.update(version=True))),
    **{f"checkpoint-state-file-{v!r}": _clear_checkpoint("state_file", _with_index(
        lambda m, v=v: m.update(state_file=v)))
       for v in [7, None, "", ".", "..", "/etc/passwd", "../state-x.safetensors", "sub/state.safetensors",
                 "a\\b.safetensors", "a\x00b"]},
    "checkpoint-state-file-absolute": _clear_checkpoint("state_file", _absolute_state_file),
    "checkpoint-state-file-missing": _clear_checkpoint("cannot read checkpoint tensors", _with_index(
        lambda m: m.update(state_file="state-gone.safetensors"))),
    **{f"checkpoint-sha256-{v!r}": _clear_checkpoint("sha256", _with_index(lambda m, v=v: m.update(sha256=v)))
       for v in [7, "abc", "A" * 64]},
    **{f"checkpoint-unusable-info-{v!r}": _clear_checkpoint("info", _with_index(lambda m, v=v: m.update(info=v)))
       for v in [7, [], None, "x"]},
    **{f"checkpoint-masks-{v!r}": _clear_checkpoint("masks", _with_index(lambda m, v=v: m.update(masks=v)))
       for v in ["x", [1], ["conv1.weight", "conv1.weight"], ["conv1.weight"], {"a": 1}]},
    **{f"checkpoint-optimizer-{label}": _clear_checkpoint("optimizer", _with_index(edit)) for label, edit in [
        ("list", lambda m: m.update(optimizer=[])),
        ("no-param-groups", lambda m: m["optimizer"].pop("param_groups")),
        ("param-groups-not-list", lambda m: m["optimizer"].update(param_groups=7)),
        ("group-not-object", lambda m: m["optimizer"].update(param_groups=[7])),
        ("group-without-params", lambda m: m["optimizer"]["param_groups"][0].pop("params")),
        ("params-not-ids", lambda m: m["optimizer"]["param_groups"][0].update(params=["a"])),
        ("params-repeated", lambda m: m["optimizer"]["param_groups"][0]["params"].append(0)),
        ("scalars-not-object", lambda m: m["optimizer"].update(scalars=7)),
        ("scalars-bad-id", lambda m: m["optimizer"].update(scalars={"x": {}})),
        ("scalars-not-objects", lambda m: m["optimizer"].update(scalars={"0": 5})),
        ("null-with-tensors", lambda m: m.update(optimizer=None)),
        ("unknown-key", lambda m: m["optimizer"].update(extra=1)),
        ("hyper-parameter-nested", lambda m: m["optimizer"]["param_groups"][0].update(momentum=[[0.9]])),
        ("hyper-parameter-object", lambda m: m["optimizer"]["param_groups"][0].update(lr={"a": 1})),
    ]},
    # ---- load_checkpoint: the tensor file
    "checkpoint-tensor-file": _clear_checkpoint("not a safetensors file", _rehash_garbage),
    **{f"checkpoint-tensor-keys-{n}": _clear_checkpoint(re.escape(repr(n)), _with_tensors(
        lambda t, n=n: t.update({n: torch.zeros(4, dtype=torch.uint8)})))
       for n in ["rng.cuda.x", "rng", "rng.cuda", "rng.cuda.01", "rng.x", "optimizer.x", "optimizer.a.b",
                 "optimizer.99.momentum_buffer", "optimizer.0.", "masks", "model.", "model", "x"]},
    "checkpoint-tensor-keys-cuda-gap": _clear_checkpoint("numbered 0 to n-1", _with_tensors(_cuda_states)),
    "checkpoint-unusable-no-rng": _clear_checkpoint("rng.cpu", _with_tensors(_pop("rng.cpu"))),
    "checkpoint-unusable-rng-size": _clear_checkpoint("rng.cpu", _with_tensors(
        lambda t: t.update({"rng.cpu": t["rng.cpu"][:100].clone()}))),
    "checkpoint-unusable-rng-dtype": _clear_checkpoint("rng.cpu", _with_tensors(
        lambda t: t.update({"rng.cpu": t["rng.cpu"].float()}))),
    "checkpoint-mask-dtype": _clear_checkpoint("masks.conv1.weight", _with_tensors(
        lambda t: t.update({"masks.conv1.weight": t["masks.conv1.weight"].float()}))),
    "checkpoint-mask-shape": _clear_checkpoint("masks.conv1.weight", _with_tensors(
        lambda t: t.update({"masks.conv1.weight": t["masks.conv1.weight"][1:].clone()}))),
    "checkpoint-mask-missing": _clear_checkpoint("do not match the masks", _with_tensors(_pop("masks.conv1.weight"))),
    "checkpoint-optimizer-duplicate-scalar": _clear_checkpoint("also stored", _dup_scalar),
}


# Sizes that architecture.json claims are checked against the weights file's header (and, with an
# input_shape, by a dry run on the meta device) before anything of that size is allocated: with
# 512 MiB of headroom, allocating any of these would fail with a different message.
CLAIMED_SIZES = {
    "index-select-index": _edit_step("IndexSelect", config={"index": 2 ** 33}),
    "lowered-conv-columns": _edit_step("LoweredConv2d", config={"in_channels": 2 ** 31, "columns": 2 ** 33}),
    "lowered-conv-out-channels": _edit_step("LoweredConv2d", config={"out_channels": 2 ** 33}),
    "conv-out-channels": _edit_step("Conv2d", config={"out_channels": 2 ** 31}),
    "linear-in-features": _edit_step("Linear", config={"in_features": 2 ** 31}),
    "batch-norm-features": _edit_step("BatchNorm2d", config={"num_features": 2 ** 33}),
    "constant-shape": _edit_step("ReLU", type="Constant", config={"shape": [2 ** 17, 2 ** 17]}),
    "channel-pad-index": _edit_step("ReLU", type="ChannelPad", config={"out_channels": 2 ** 34, "index": 2 ** 33}),
    "prelu-parameters": _edit_step("ReLU", type="PReLU", config={"num_parameters": 2 ** 33}),
}
# Configurations whose weights are small but whose activations on input_shape would not be.
HUGE_ACTIVATIONS = {
    "conv-padding": _edit_step("Conv2d", config={"padding": 10 ** 5}),
    "lowered-conv-padding": _edit_step("LoweredConv2d", config={"padding": [10 ** 5, 10 ** 4]}),
    "adaptive-pool-output": _edit_step("ReLU", type="AdaptiveAvgPool2d", config={"output_size": 2 ** 15}),
    "lrn-size": _edit_step("ReLU", type="LocalResponseNorm", config={"size": 10 ** 8}),
}


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
