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
    lower_convs_below: 0.5       # compaction: a conv keeping at most this fraction of its weight-matrix
                                 # columns becomes a LoweredConv2d (1.0: every conv with a zero column;
                                 # default: compact()'s)
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
        compile_penalty: false   # method penalty: the term through torch.compile (GroupLasso(compiled=True))
        lambdas: {conv1: {filter: 0.01}, conv2: {filter: 0.01, channel: 0.01}}
        zero_weights_below: 1.0e-4       # after every step, zero regularised weights below this (default)
        zero_groups_below: 1.0e-3        # at phase end, zero the groups whose norm is below this
        zero_groups_below_relative: 0.05 # and those below 0.05 × the largest norm of their kind and layer
                                         # ({kind: r}: per kind)
        target: {flops: 0.33}    # optional: at phase end, zero groups until the compacted model keeps at
                                 # most 0.33 of the dense multiply-adds (zero_to_budget_); or {params: f}, or
                                 # {latency: f}: of the dense model's time on the run's device at the first of
                                 # measure.batch_sizes, as a per-layer latency table (latency_table.json in the
                                 # run) estimates it; or
                                 # {flops: {conv1: 0.25, conv2: 0.076}}: each layer's own multiply-adds
        cost_weight: 1           # with a target: each group's λ times (its cost / the mean cost)^1 (the
                                 # default; 0: every group at its λ)
        shrink: chosen           # with a target: only the groups the end of the phase would zero now shrink,
                                 # chosen again 4 times an epoch (the default); all: every regularised group
        hold: true               # with a target: the controller steers until the target is reached, the
                                 # zeros made are then held, and the end's cut gives back what the budget
                                 # still pays for (the default); false: after its ramp the end of the phase
                                 # closes what is left, and resting zeros are left to the gradient
      - name: finetune
        epochs: 2
        lr: 0.001
        freeze: true             # zero structures stay zero, group term off
        dropout: 0.2             # optional: the rate of the model's dropout layers in this phase
    measure: {batch_sizes: [1, 64], repeats: 30, warmup: 5, threads: 1}

Every threshold key reads ``<action>_<what>_below``. The names before 2026-12-03 still load as
aliases of the new ones (:data:`ALIASES`): ``zero_below`` → ``zero_weights_below``, ``group_threshold`` →
``zero_groups_below``, ``relative_threshold`` → ``zero_groups_below_relative`` (in a phase) and
``lowered_below`` → ``lower_convs_below`` (at the top); a recipe that gives both names of one key is an error.

Any unknown key or bad value raises :class:`RecipeError`, whose message starts with the
file and the key path, e.g. ``recipes/x.yaml: phases[1].lambdas.filtr: unknown group kind``.
The model is built once, to check ``model_args``, the lambdas' layer patterns and ``dropout``.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml
from torch import nn

from .. import checks
from ..compaction import LOWERED_BELOW
from ..sparsity.groups import normalization_modules
from ..sparsity.penalty import check_kinds, check_spec, resolve_spec
from ..zoo.models import MODELS, build_model

__all__ = ["RecipeError", "Recipe", "Phase", "LRSchedule", "MeasureConfig", "Augment", "load_recipe", "parse_recipe",
           "DATASETS", "METHODS", "ALIASES", "upgrade_keys"]

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
    compile_penalty: bool = False                 # method "penalty": the term through torch.compile
    zero_weights_below: float | None = 1e-4       # zero regularised |w| below this after each step
    zero_groups_below: float | None = None        # zero groups with norm below this at phase end
    zero_groups_below_relative: float | dict | None = None  # ... below this × the largest of kind and layer
    freeze: bool = False                          # freeze zero structures at phase start, term off
    dropout: float | None = None                  # this phase's rate of the model's dropout layers; None: the model's
    target: dict | None = None                    # {"flops": f}, {"params": f} or {"latency": f}: at phase end,
                                                  # zero groups until the compacted model keeps at most f of the
                                                  # dense count (latency: estimated, speed.table.LatencyTable);
                                                  # {"flops": {layer: f}}: per layer, of its own multiply-adds
    cost_weight: float = 0.0                      # a target phase: each group's λ × (its cost / the mean)^this
                                                  # (a recipe's target phase: 1 unless it says otherwise)
    shrink: str = "all"                           # a target phase: "chosen" shrinks only the groups the end of
                                                  # the phase would zero now (a recipe's target phase: chosen)
    hold: bool = False                            # a target phase: steer on after the ramp while over the target,
                                                  # hold the zeros once at it, the cut gives back (a recipe's
                                                  # target phase: true)

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

    @property
    def latency_batch(self) -> int:
        """The batch size a latency budget is measured at, and every budget's measured latency reported at: the
        first of ``batch_sizes``."""
        return self.batch_sizes[0]


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
    lower_convs_below: float | None = None   # compact(): convs keeping at most this fraction of their columns are
                                             # lowered (None: compact()'s default)
    train_subset: int | None = None
    val_subset: int | None = None
    test_subset: int | None = None
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    path: str | None = None   # the file it came from (not a recipe key)

    @property
    def lowered_below(self) -> float:
        """What every compaction of the run takes as ``lowered_below``: ``lower_convs_below``, or compact()'s
        default."""
        return LOWERED_BELOW if self.lower_convs_below is None else self.lower_convs_below

    def to_dict(self) -> dict:
        """The recipe as plain JSON-able data (without ``path``), e.g. to check a resume."""
        d = dataclasses.asdict(self)
        d.pop("path")
        # keys at their defaults are left out, as before these keys existed, so older checkpoints still resume
        for key, default in (("model_args", {}), ("augment", None), ("init_from", None), ("train_with_val", False),
                             ("lower_convs_below", None)):
            if d[key] == default:
                d.pop(key)
        for phase in d["phases"]:
            for key in ("dropout", "zero_groups_below_relative", "target"):
                if phase[key] is None:
                    phase.pop(key)
        return _jsonable(d)


# Old key → new key, per place: a recipe's top level, and each phase.
ALIASES = {"top": {"lowered_below": "lower_convs_below"},
           "phase": {"zero_below": "zero_weights_below", "group_threshold": "zero_groups_below",
                     "relative_threshold": "zero_groups_below_relative"}}
# Phase keys added later, at the value that was the behaviour before they existed (a checkpoint without them).
ADDED = {"cost_weight": 0.0, "shrink": "all", "hold": False, "compile_penalty": False}


def upgrade_keys(d: Mapping) -> dict:
    """A recipe dict (as :meth:`Recipe.to_dict` wrote it, e.g. into a checkpoint before the keys were
    renamed, or before a phase key of :data:`ADDED` existed) with the new key names, so that it compares equal to
    today's ``to_dict()``."""
    d = {ALIASES["top"].get(k, k): v for k, v in d.items()}
    if "phases" in d and isinstance(d["phases"], list):
        d["phases"] = [{**ADDED, **{ALIASES["phase"].get(k, k): v for k, v in p.items()}} if isinstance(p, Mapping)
                       else p for p in d["phases"]]
    return d


def _renamed(c: "_Checker", raw: Mapping, where: str, place: str) -> dict:
    """``raw`` with its old key names replaced by the new ones; both names of one key is an error."""
    if not isinstance(raw, Mapping):
        return raw
    out = dict(raw)
    for old, new in ALIASES[place].items():
        if old in out:
            if new in out:
                c.fail(_join(where, old), f"an old name of {new!r}, which is also given; keep only {new!r}")
            out[new] = out.pop(old)
    return out


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# --------------------------------------------------------------------------- YAML loading

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.2; PyYAML's 1.1 makes it a string) and refuses
    aliases (``*name``): a recipe needs none, and nested aliases expand exponentially ("billion laughs")."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in recipes",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


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
        raise RecipeError(f"{path}: not valid YAML: {str(e)[:500]}") from None
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
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

    def call(self, check, *args):
        """``check(*args)`` with its ``ValueError`` (a message starting with the key path) as this file's
        :class:`RecipeError`."""
        try:
            return check(*args)
        except ValueError as e:
            self.fail("", str(e))

    def integer(self, value, where, minimum=None, optional=False, maximum=None):
        if value is None and optional:
            return None
        if not checks.is_int(value):
            self.fail(where, f"expected an integer, got {_show(value)}")
        if minimum is not None and value < minimum:
            self.fail(where, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(where, f"must be <= {maximum:,}, got {value:,}")
        return value

    def number(self, value, where, minimum=None, positive=False, maximum=None, optional=False):
        if value is None and optional:
            return None
        return self.call(checks.number, value, where, minimum, positive, maximum)

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


_show = checks.show


MAX_EPOCHS = 100_000  # more in one phase is a typo, not a plan

_TOP = ("model", "model_args", "data", "data_root", "init_from", "augment", "seed", "batch_size", "eval_batch_size",
        "train_with_val", "lower_convs_below", "train_subset", "val_subset", "test_subset", "phases", "measure")
_AUGMENT = ("crop_padding", "flip")
_PHASE = ("name", "epochs", "lr", "momentum", "weight_decay", "lr_schedule", "lambdas", "method",
          "zero_weights_below", "zero_groups_below", "zero_groups_below_relative", "freeze", "dropout", "target",
          "cost_weight", "shrink", "hold", "compile_penalty")
# A phase's budget: the fraction of the dense multiply-adds (flops), parameters (params) or latency its compacted
# model may keep.
_TARGET = ("flops", "params", "latency")
SHRINK = ("chosen", "all")  # a target phase's groups that shrink: those the budget would zero now, or all
DEFAULT_TARGET_LAMBDAS = {"filter": 1e-4, "channel": 1e-4}  # a target phase without lambdas


def default_target_lambdas(net: nn.Module) -> dict:
    """The groups a target phase without ``lambdas`` regularises: filters and channels model-wide; in a model with
    BatchNorm, each BatchNorm channel's (γ, β) instead (network slimming's channels, as groups). A conv's own groups
    are scale-free under the BatchNorm after it: the proximal steps shrink them without the loss resisting, while the
    gradient steps, larger as the weights get smaller, keep them off zero; the zeros never come, and the norms that
    would rank the groups mean nothing. A (γ, β) group zeroed makes its channel zero, and costs what its conv's
    filter costs."""
    norms = normalization_modules(net)
    if norms:
        return {name: {"filter": DEFAULT_TARGET_LAMBDAS["filter"]} for name in norms}
    return dict(DEFAULT_TARGET_LAMBDAS)
_SCHEDULE = ("kind", "milestones", "gamma")
_MEASURE = ("batch_sizes", "repeats", "warmup", "threads")


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Validate recipe data (as loaded from YAML) and return a :class:`Recipe`."""
    c = _Checker(source)
    if raw is None:
        c.fail("", "the recipe is empty")
    raw = c.mapping(_renamed(c, raw, "", "top"), "", _TOP, required=("model", "data", "phases"))
    model = c.choice(raw["model"], "model", tuple(sorted(MODELS)), "model")
    model_args, net = _parse_model_args(c, raw.get("model_args"), "model_args", model)
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
        lower_convs_below=c.number(raw.get("lower_convs_below"), "lower_convs_below", minimum=0, maximum=1,
                                   optional=True),
        path=None if source == "<recipe>" else source,
    )
    for key in ("train_subset", "val_subset", "test_subset"):
        kw[key] = c.integer(raw.get(key), key, minimum=1, optional=True)
    kw["phases"] = _parse_phases(c, raw["phases"], model, net)
    kw["measure"] = _parse_measure(c, raw.get("measure", {}), "measure")
    return Recipe(**kw)


def _parse_phases(c: _Checker, phases_raw, model: str, net: nn.Module) -> tuple[Phase, ...]:
    if not isinstance(phases_raw, list) or not phases_raw:
        c.fail("phases", f"expected a non-empty list of phases, got {_show(phases_raw)}")
    phases: list[Phase] = []
    for i, p in enumerate(phases_raw):
        phase = _parse_phase(c, p, f"phases[{i}]", net)
        if any(q.name == phase.name for q in phases):
            c.fail(f"phases[{i}].name", f"duplicate phase name {phase.name!r}")
        if phase.freeze and not any(q.sparsifying for q in phases):
            c.fail(f"phases[{i}].freeze", "nothing to freeze: no earlier phase has lambdas")
        if phase.dropout is not None and not any(isinstance(m, nn.Dropout) for m in net.modules()):
            c.fail(f"phases[{i}].dropout", f"model {model!r} has no dropout layers to set")
        phases.append(phase)
    return tuple(phases)


def _parse_model_args(c: _Checker, args, where: str, model: str) -> tuple[dict, nn.Module]:
    """Keyword arguments for the model's constructor (names it accepts, values it accepts), and the
    model built with them, the one model every other check of the recipe uses."""
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        c.fail(where, f"expected a mapping of {model} constructor arguments, got {_show(args)}")
    params = [n for n, p in inspect.signature(MODELS[model]).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in args:
        if key not in params:
            c.fail(_join(where, key), f"not a parameter of model {model!r}; its parameters: {', '.join(params)}")
    args = dict(args)
    try:
        return args, build_model(model, **args)
    except (TypeError, ValueError) as e:
        c.fail(where, f"model {model!r} cannot be built with {args}: {e}")


def _parse_augment(c: _Checker, a, where: str) -> Augment | None:
    if a is None:
        return None
    c.mapping(a, where, _AUGMENT)
    aug = Augment(crop_padding=c.integer(a.get("crop_padding", 0), f"{where}.crop_padding", minimum=0),
                  flip=c.boolean(a.get("flip", False), f"{where}.flip"))
    return aug if aug != Augment() else None


def _parse_phase(c: _Checker, p, where: str, net: nn.Module) -> Phase:
    p = c.mapping(_renamed(c, p, where, "phase"), where, _PHASE, required=("name", "epochs", "lr"))
    at = lambda key: f"{where}.{key}"  # noqa: E731
    kw = dict(
        name=c.string(p["name"], at("name")),
        epochs=c.integer(p["epochs"], at("epochs"), minimum=0, maximum=MAX_EPOCHS),
        lr=c.number(p["lr"], at("lr"), positive=True),
        momentum=c.number(p.get("momentum", 0.9), at("momentum"), minimum=0, maximum=1),
        weight_decay=c.number(p.get("weight_decay", 0.0), at("weight_decay"), minimum=0),
        method=c.choice(p.get("method", "prox"), at("method"), METHODS, "method"),
        zero_weights_below=c.number(p.get("zero_weights_below", 1e-4), at("zero_weights_below"), minimum=0,
                                    optional=True),
        zero_groups_below=c.number(p.get("zero_groups_below"), at("zero_groups_below"), minimum=0, optional=True),
        zero_groups_below_relative=_parse_relative(c, p.get("zero_groups_below_relative"),
                                                   at("zero_groups_below_relative")),
        freeze=c.boolean(p.get("freeze", False), at("freeze")),
        dropout=c.number(p.get("dropout"), at("dropout"), minimum=0, maximum=0.99, optional=True),
        lr_schedule=_parse_schedule(c, p.get("lr_schedule"), at("lr_schedule"), p.get("epochs")),
        lambdas=_parse_lambdas(c, p.get("lambdas"), at("lambdas"), net),
        target=_parse_target(c, p.get("target"), at("target"), net),
        cost_weight=c.number(p.get("cost_weight", 1.0 if p.get("target") is not None else 0.0), at("cost_weight"),
                             minimum=0, maximum=4),
    )
    kw["shrink"] = c.choice(p.get("shrink", "chosen" if kw["target"] is not None else "all"), at("shrink"), SHRINK,
                            "shrink")
    kw["hold"] = c.boolean(p.get("hold", kw["target"] is not None), at("hold"))
    kw["compile_penalty"] = c.boolean(p.get("compile_penalty", False), at("compile_penalty"))
    if kw["compile_penalty"] and kw["method"] != "penalty":
        c.fail(at("compile_penalty"), "compiles the term added to the loss; needs method: penalty")
    for key, off in (("cost_weight", 0.0), ("shrink", "all"), ("hold", False)):
        if kw[key] != off and kw["target"] is None:
            c.fail(at(key), "steers the group term towards the phase's budget; needs a target")
    if kw["target"] is not None and kw["freeze"]:
        c.fail(at("target"), "a freeze phase fine-tunes; put the target on the phase that sparsifies")
    if kw["target"] is not None and not kw["lambdas"]:  # per layer: model-wide, and the untargeted layers rest
        kw["lambdas"] = (dict(DEFAULT_TARGET_LAMBDAS) if isinstance(kw["target"].get("flops"), dict)
                         else default_target_lambdas(net))
    if kw["freeze"] and kw["lambdas"]:
        c.fail(at("lambdas"), "a freeze phase fine-tunes with the group term off; leave lambdas out "
                              "(it freezes the zeros of the earlier phases' lambdas)")
    for key in ("zero_groups_below", "zero_groups_below_relative"):
        if kw[key] is not None and not kw["lambdas"]:
            c.fail(at(key), "needs lambdas in this phase (it zeroes the regularised groups)")
    return Phase(**kw)


def _parse_target(c: _Checker, t, where: str, net: nn.Module) -> dict | None:
    """``{flops: f}``, ``{params: f}`` or ``{latency: f}`` with f in (0, 1], or ``{flops: {layer: f, ...}}`` for
    Conv2d and Linear layers of ``net``."""
    if t is None:
        return None
    t = c.mapping(t, where, _TARGET)
    if len(t) != 1:
        c.fail(where, "expected one budget, {flops: f}, {params: f} or {latency: f}: the fraction of the dense "
                      "multiply-adds, parameters or latency to keep")
    (key, value), = t.items()
    if key == "flops" and isinstance(value, Mapping):  # the paper's per-layer FLOP
        layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for name in value:
            if name not in layers:
                c.fail(f"{where}.flops.{name}", f"not a Conv2d or Linear layer of the model; its layers: "
                                                f"{', '.join(layers)}")
        if not value:
            c.fail(f"{where}.flops", "expected a fraction, or {layer: fraction} for at least one layer")
        ordered = [n for n in layers if n in value]  # in the model's order: the budget takes them in turn
        return {key: {n: c.number(value[n], f"{where}.flops.{n}", positive=True, maximum=1) for n in ordered}}
    return {key: c.number(value, f"{where}.{key}", positive=True, maximum=1)}


def _parse_relative(c: _Checker, r, where: str) -> float | dict | None:
    """A fraction in (0, 1] for every group kind, or ``{kind: fraction}``."""
    if r is None:
        return None
    if not isinstance(r, Mapping):
        return c.number(r, where, positive=True, maximum=1)
    kinds = c.call(check_kinds, r, where)
    out = {k: c.number(v, f"{where}.{k}", positive=True, maximum=1) for k, v in kinds.items()}
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


def _parse_lambdas(c: _Checker, spec, where: str, net: nn.Module) -> dict:
    """A GroupLasso spec (kinds → λ for all layers, and/or layer patterns → {kind: λ}), checked by
    :func:`structsparse.sparsity.penalty.resolve_spec` on the recipe's model, the one check of a λ."""
    if spec is None:
        return {}
    out = c.call(check_spec, spec, where)
    c.call(resolve_spec, net, out, where)
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
