"""Experiment recipes: one YAML file per run, validated strictly on load.

A recipe names a model and a data set and lists training *phases* (dense baseline →
group-Lasso training → fine-tuning with the zero structures frozen), plus how to measure
the speedup at the end::

    model: lenet                 # a name in structsparse.zoo.models.MODELS
    model_args: {}               # optional constructor arguments, e.g. {shortcut: B} for resnet20
    data: mnist                  # mnist | fashion-mnist | cifar10
    augment: null                # optional, e.g. {crop_padding: 4, flip: true} (training batches only)
    train_with_val: false        # true: train on train + val (a final run after choosing on val;
                                 # its val errors are then not held out)
    lowered_below: 0.5           # compaction: a conv keeping at most this fraction of its weight-matrix
                                 # columns becomes a LoweredConv2d (1.0: every conv with a zero column)
    seed: 0
    batch_size: 64
    phases:
      - name: dense
        epochs: 2
        lr: 0.01
      - name: ssl
        epochs: 4
        lr: 0.01
        method: prox             # prox (proximal step) | penalty (term added to the loss)
        lambdas: {conv1: {filter: 0.01}, conv2: {filter: 0.01, channel: 0.01}}
        group_threshold: 1.0e-3  # at phase end, zero the groups whose norm is below this
        relative_threshold: 0.05  # and those below 0.05 × the largest norm of their kind and layer ({kind: r}: per kind)
      - name: finetune
        epochs: 2
        lr: 0.001
        freeze: true             # zero structures stay zero, group term off
        dropout: 0.2             # optional: the rate of the model's dropout layers in this phase
    measure: {batch_sizes: [1, 64], repeats: 30, warmup: 5, threads: 1}

Any unknown key or bad value raises :class:`RecipeError`, whose message starts with the
file and the key path, e.g. ``recipes/x.yaml: phases[1].lambdas.filtr: unknown group kind``.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from ..compaction.surgery import LOWERED_BELOW
from ..sparsity.groups import KINDS
from ..zoo.models import MODELS

__all__ = ["RecipeError", "Recipe", "Phase", "LRSchedule", "MeasureConfig", "Augment", "load_recipe", "parse_recipe",
           "DATASETS", "METHODS"]

DATASETS = ("mnist", "fashion-mnist", "cifar10")
METHODS = ("penalty", "prox")
SCHEDULES = ("constant", "step", "cosine")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key path."""


@dataclass(frozen=True)
class LRSchedule:
    """How the learning rate changes within a phase.

    ``constant``; ``step``: multiply by ``gamma`` at each epoch in ``milestones`` (epochs
    counted from the start of the phase); ``cosine``: cosine decay from ``lr`` to 0 over
    the phase, updated every step.
    """

    kind: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1


@dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    lambdas: dict = field(default_factory=dict)   # GroupLasso spec; empty: no group term
    method: str = "prox"
    zero_below: float | None = 1e-4               # zero regularised |w| below this after each step
    group_threshold: float | None = None          # zero groups with norm below this at phase end
    relative_threshold: float | dict | None = None  # zero groups below this × the largest of kind and layer
    freeze: bool = False                          # freeze zero structures at phase start, term off
    dropout: float | None = None                  # this phase's rate of the model's dropout layers; None: the model's

    @property
    def sparsifying(self) -> bool:
        """Whether this phase trains with an active group-Lasso term."""
        return bool(self.lambdas)


@dataclass(frozen=True)
class MeasureConfig:
    batch_sizes: tuple[int, ...] = (1, 64)
    repeats: int = 30
    warmup: int = 5
    threads: int | None = None


@dataclass(frozen=True)
class Augment:
    """Training-batch augmentation (:func:`structsparse.zoo.data.random_crop_flip`): zero-pad by
    ``crop_padding`` and crop back to the input size at a random offset; random horizontal flips."""

    crop_padding: int = 0
    flip: bool = False


@dataclass(frozen=True)
class Recipe:
    model: str
    data: str
    phases: tuple[Phase, ...]
    model_args: dict = field(default_factory=dict)   # keyword arguments of the model's constructor
    augment: Augment | None = None
    seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 1000
    data_root: str | None = None
    init_from: str | None = None   # safetensors weights to start from (e.g. a dense run's trained.safetensors)
    train_with_val: bool = False   # train on train + val (val errors are then not held out)
    lowered_below: float = LOWERED_BELOW   # compact(): convs keeping at most this fraction of their columns are lowered
    train_subset: int | None = None
    val_subset: int | None = None
    test_subset: int | None = None
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    path: str | None = None   # the file it came from (not a recipe key)

    def to_dict(self) -> dict:
        """The recipe as plain JSON-able data (without ``path``), e.g. to check a resume."""
        d = dataclasses.asdict(self)
        d.pop("path")
        # keys at their defaults are left out, as before these keys existed, so older checkpoints still resume
        for key, default in (("model_args", {}), ("augment", None), ("init_from", None), ("train_with_val", False),
                             ("lowered_below", LOWERED_BELOW)):
            if d[key] == default:
                d.pop(key)
        for phase in d["phases"]:
            for key in ("dropout", "relative_threshold"):
                if phase[key] is None:
                    phase.pop(key)
        return _jsonable(d)


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# --------------------------------------------------------------------------- YAML loading

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.2; PyYAML's 1.1 makes it a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML recipe; any problem is a :class:`RecipeError` naming the file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_Loader)
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    return parse_recipe(raw, source=path)


# --------------------------------------------------------------------------- validation

class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, msg: str):
        raise RecipeError(f"{self.source}: {where}: {msg}" if where else f"{self.source}: {msg}")

    def mapping(self, value, where, allowed, required=()):
        if not isinstance(value, Mapping):
            self.fail(where, f"expected a mapping, got {_show(value)}")
        for key in value:
            if key not in allowed:
                self.fail(_join(where, key), f"unknown key; allowed keys: {', '.join(allowed)}")
        for key in required:
            if key not in value:
                self.fail(_join(where, key), "required key is missing")
        return value

    def integer(self, value, where, minimum=None, optional=False):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(where, f"expected an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            self.fail(where, f"must be >= {minimum}, got {value}")
        return value

    def number(self, value, where, minimum=None, positive=False, maximum=None, optional=False):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(where, f"expected a number, got {_show(value)}")
        value = float(value)
        if not math.isfinite(value):
            self.fail(where, f"must be finite, got {value}")
        if positive and value <= 0:
            self.fail(where, f"must be > 0, got {value:g}")
        if minimum is not None and value < minimum:
            self.fail(where, f"must be >= {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            self.fail(where, f"must be <= {maximum:g}, got {value:g}")
        return value

    def choice(self, value, where, choices, what):
        if not isinstance(value, str) or value not in choices:
            self.fail(where, f"unknown {what} {_show(value)}; known: {', '.join(choices)}")
        return value

    def boolean(self, value, where):
        if not isinstance(value, bool):
            self.fail(where, f"expected true or false, got {_show(value)}")
        return value

    def string(self, value, where, optional=False):
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            self.fail(where, f"expected a non-empty string, got {_show(value)}")
        return value


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def _show(value) -> str:
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"


_TOP = ("model", "model_args", "data", "data_root", "init_from", "augment", "seed", "batch_size", "eval_batch_size",
        "train_with_val", "lowered_below", "train_subset", "val_subset", "test_subset", "phases", "measure")
_AUGMENT = ("crop_padding", "flip")
_PHASE = ("name", "epochs", "lr", "momentum", "weight_decay", "lr_schedule", "lambdas", "method", "zero_below",
          "group_threshold", "relative_threshold", "freeze", "dropout")
_SCHEDULE = ("kind", "milestones", "gamma")
_MEASURE = ("batch_sizes", "repeats", "warmup", "threads")


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Validate recipe data (as loaded from YAML) and return a :class:`Recipe`."""
    c = _Checker(source)
    if raw is None:
        c.fail("", "the recipe is empty")
    c.mapping(raw, "", _TOP, required=("model", "data", "phases"))
    model = c.choice(raw["model"], "model", tuple(sorted(MODELS)), "model")
    model_args = _parse_model_args(c, raw.get("model_args"), "model_args", model)
    kw = dict(
        model=model,
        model_args=model_args,
        data=c.choice(raw["data"], "data", DATASETS, "data set"),
        augment=_parse_augment(c, raw.get("augment"), "augment"),
        data_root=c.string(raw.get("data_root"), "data_root", optional=True),
        init_from=c.string(raw.get("init_from"), "init_from", optional=True),
        seed=c.integer(raw.get("seed", 0), "seed", minimum=0),
        batch_size=c.integer(raw.get("batch_size", 64), "batch_size", minimum=1),
        eval_batch_size=c.integer(raw.get("eval_batch_size", 1000), "eval_batch_size", minimum=1),
        train_with_val=c.boolean(raw.get("train_with_val", False), "train_with_val"),
        lowered_below=c.number(raw.get("lowered_below", LOWERED_BELOW), "lowered_below", minimum=0, maximum=1),
        path=None if source == "<recipe>" else source,
    )
    for key in ("train_subset", "val_subset", "test_subset"):
        kw[key] = c.integer(raw.get(key), key, minimum=1, optional=True)

    phases_raw = raw["phases"]
    if not isinstance(phases_raw, list) or not phases_raw:
        c.fail("phases", f"expected a non-empty list of phases, got {_show(phases_raw)}")
    phases = []
    names = set()
    for i, p in enumerate(phases_raw):
        phase = _parse_phase(c, p, f"phases[{i}]", model, model_args)
        if phase.name in names:
            c.fail(f"phases[{i}].name", f"duplicate phase name {phase.name!r}")
        names.add(phase.name)
        if phase.freeze and not any(q.sparsifying for q in phases):
            c.fail(f"phases[{i}].freeze", "nothing to freeze: no earlier phase has lambdas")
        phases.append(phase)
    with_dropout = [i for i, q in enumerate(phases) if q.dropout is not None]
    if with_dropout:
        import torch.nn as nn
        from ..zoo.models import build_model
        if not any(isinstance(m, nn.Dropout) for m in build_model(model, **model_args).modules()):
            c.fail(f"phases[{with_dropout[0]}].dropout", f"model {model!r} has no dropout layers to set")
    kw["phases"] = tuple(phases)
    kw["measure"] = _parse_measure(c, raw.get("measure", {}), "measure")
    return Recipe(**kw)


def _parse_model_args(c: _Checker, args, where: str, model: str) -> dict:
    """Keyword arguments for the model's constructor: names it accepts, values it accepts."""
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        c.fail(where, f"expected a mapping of {model} constructor arguments, got {_show(args)}")
    params = [n for n, p in inspect.signature(MODELS[model]).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in args:
        if key not in params:
            c.fail(_join(where, key), f"not a parameter of model {model!r}; its parameters: {', '.join(params)}")
    args = dict(args)
    from ..zoo.models import build_model
    try:
        build_model(model, **args)
    except (TypeError, ValueError) as e:
        c.fail(where, f"model {model!r} cannot be built with {args}: {e}")
    return args


def _parse_augment(c: _Checker, a, where: str) -> Augment | None:
    if a is None:
        return None
    c.mapping(a, where, _AUGMENT)
    aug = Augment(crop_padding=c.integer(a.get("crop_padding", 0), f"{where}.crop_padding", minimum=0),
                  flip=c.boolean(a.get("flip", False), f"{where}.flip"))
    return aug if aug != Augment() else None


def _parse_phase(c: _Checker, p, where: str, model: str, model_args: Mapping | None = None) -> Phase:
    c.mapping(p, where, _PHASE, required=("name", "epochs", "lr"))
    at = lambda key: f"{where}.{key}"  # noqa: E731
    kw = dict(
        name=c.string(p["name"], at("name")),
        epochs=c.integer(p["epochs"], at("epochs"), minimum=0),
        lr=c.number(p["lr"], at("lr"), positive=True),
        momentum=c.number(p.get("momentum", 0.9), at("momentum"), minimum=0, maximum=1),
        weight_decay=c.number(p.get("weight_decay", 0.0), at("weight_decay"), minimum=0),
        method=c.choice(p.get("method", "prox"), at("method"), METHODS, "method"),
        zero_below=c.number(p.get("zero_below", 1e-4), at("zero_below"), minimum=0, optional=True),
        group_threshold=c.number(p.get("group_threshold"), at("group_threshold"), minimum=0, optional=True),
        relative_threshold=_parse_relative(c, p.get("relative_threshold"), at("relative_threshold")),
        freeze=c.boolean(p.get("freeze", False), at("freeze")),
        dropout=c.number(p.get("dropout"), at("dropout"), minimum=0, maximum=0.99, optional=True),
        lr_schedule=_parse_schedule(c, p.get("lr_schedule"), at("lr_schedule"), p.get("epochs")),
        lambdas=_parse_lambdas(c, p.get("lambdas"), at("lambdas"), model, model_args),
    )
    if kw["freeze"] and kw["lambdas"]:
        c.fail(at("lambdas"), "a freeze phase fine-tunes with the group term off; leave lambdas out "
                              "(it freezes the zeros of the earlier phases' lambdas)")
    for key in ("group_threshold", "relative_threshold"):
        if kw[key] is not None and not kw["lambdas"]:
            c.fail(at(key), "needs lambdas in this phase (it zeroes the regularised groups)")
    return Phase(**kw)


def _kind_numbers(c: _Checker, mapping: Mapping, where: str, **bounds) -> dict[str, float]:
    """``{kind: number}`` with every key a group kind and every value within ``bounds`` (see ``_Checker.number``)."""
    out = {}
    for kind, value in mapping.items():
        if kind not in KINDS:
            c.fail(f"{where}.{kind}", f"unknown group kind; known kinds: {', '.join(KINDS)}")
        out[kind] = c.number(value, f"{where}.{kind}", **bounds)
    return out


def _parse_relative(c: _Checker, r, where: str) -> float | dict | None:
    """A fraction in (0, 1) for every group kind, or ``{kind: fraction}``."""
    if r is None:
        return None
    if not isinstance(r, Mapping):
        return c.number(r, where, positive=True, maximum=1)
    out = _kind_numbers(c, r, where, positive=True, maximum=1)
    if not out:
        c.fail(where, "expected a fraction or a non-empty mapping of group kinds to fractions")
    return out


def _parse_schedule(c: _Checker, s, where: str, epochs) -> LRSchedule:
    if s is None:
        return LRSchedule()
    if isinstance(s, str):
        s = {"kind": s}
    c.mapping(s, where, _SCHEDULE, required=("kind",))
    kind = c.choice(s["kind"], f"{where}.kind", SCHEDULES, "lr schedule")
    if kind != "step":
        for key in ("milestones", "gamma"):
            if key in s:
                c.fail(f"{where}.{key}", f"only used by the step schedule, not {kind}")
        return LRSchedule(kind)
    ms = s.get("milestones")
    if not isinstance(ms, list) or not ms:
        c.fail(f"{where}.milestones", f"expected a non-empty list of epochs, got {_show(ms)}")
    milestones = tuple(c.integer(m, f"{where}.milestones[{i}]", minimum=1) for i, m in enumerate(ms))
    if list(milestones) != sorted(set(milestones)):
        c.fail(f"{where}.milestones", f"must be strictly increasing, got {list(milestones)}")
    if isinstance(epochs, int) and milestones[-1] >= epochs:
        c.fail(f"{where}.milestones", f"milestone {milestones[-1]} is not inside the phase's {epochs} epochs")
    gamma = c.number(s.get("gamma", 0.1), f"{where}.gamma", positive=True)
    return LRSchedule("step", milestones, gamma)


def _parse_lambdas(c: _Checker, spec, where: str, model: str, model_args: Mapping | None = None) -> dict:
    """A GroupLasso spec: kinds → λ for all layers, and/or layer patterns → {kind: λ}."""
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        c.fail(where, f"expected a mapping of group kinds or layer patterns, got {_show(spec)}")
    out = {}
    for key, value in spec.items():
        if not isinstance(key, str):
            c.fail(_join(where, key), "keys must be group kinds or layer-name patterns")
        if isinstance(value, Mapping):   # a layer pattern
            out[key] = _kind_numbers(c, value, f"{where}.{key}", minimum=0)
        elif key in KINDS:
            out[key] = c.number(value, _join(where, key), minimum=0)
        else:
            c.fail(_join(where, key), f"unknown group kind; known kinds: {', '.join(KINDS)} "
                                      "(or a layer-name pattern mapping kinds to λ)")
    # Layer patterns must match layers of the model: check against a freshly built one.
    from ..zoo.models import build_model
    from ..sparsity.penalty import resolve_spec
    try:
        resolve_spec(build_model(model, **(model_args or {})), out)
    except ValueError as e:
        c.fail(where, str(e))
    if not any(_positive(v) for v in out.values()):
        return {}
    return out


def _positive(v) -> bool:
    return any(x > 0 for x in v.values()) if isinstance(v, Mapping) else v > 0


def _parse_measure(c: _Checker, m, where: str) -> MeasureConfig:
    if m is None:
        return MeasureConfig()
    c.mapping(m, where, _MEASURE)
    bs = m.get("batch_sizes", [1, 64])
    if not isinstance(bs, list) or not bs:
        c.fail(f"{where}.batch_sizes", f"expected a non-empty list of integers, got {_show(bs)}")
    return MeasureConfig(
        batch_sizes=tuple(c.integer(b, f"{where}.batch_sizes[{i}]", minimum=1) for i, b in enumerate(bs)),
        repeats=c.integer(m.get("repeats", 30), f"{where}.repeats", minimum=1),
        warmup=c.integer(m.get("warmup", 5), f"{where}.warmup", minimum=0),
        threads=c.integer(m.get("threads"), f"{where}.threads", minimum=1, optional=True),
    )
