"""The training loop behind ``structsparse run``: the phases of a recipe, checkpointed per epoch.

Users with their own loop don't need this; it uses only the public API of
:mod:`structsparse.sparsity.penalty` (``GroupLasso``, ``Masks``).

Per phase: SGD with momentum (a fresh optimizer per phase), cross-entropy loss. A phase
with ``lambdas`` builds a :class:`GroupLasso` and either adds its penalty to the loss
(``method: penalty``) or takes the proximal step after ``opt.step()`` (``method: prox``),
then zeroes regularised weights below ``zero_weights_below``; at the phase end, groups below
``zero_groups_below``, or below ``zero_groups_below_relative`` times the largest group norm of their
kind in their layer, are zeroed. A ``freeze`` phase first freezes every zero structure of
the layers regularised earlier (group term off); frozen masks stay in force in all later
phases. The shuffle order of every epoch comes from a generator seeded with
(seed, phase, epoch), so a resumed run needs no generator state and ends bit-identical.
The recipe's ``augment`` (random crop and flip of each training batch) draws from a second
generator seeded from the same epoch seed, so it keeps that property.

A loss (or group term) that is not finite stops the run with :class:`TrainingDiverged`
before anything is written for that epoch: the previous epoch's checkpoint stays as it was.

In a process group (``torchrun``, see :mod:`structsparse.runner.distributed`) the model is wrapped
in ``DistributedDataParallel``: every process draws the same global batches, trains on its
slice of each, and DDP averages the gradients, so the update equals one process's at the
same global batch (up to summation order). The proximal step, the zeroing and the masks
then act on identical weights in every process, and a penalty added in every process has,
averaged by DDP, its own gradient. (BatchNorm layers use each process's slice statistics, and
DDP broadcasts rank 0's running statistics: for such models N processes match one only
approximately.) Every process evaluates the full validation set; only rank 0 writes
checkpoints and logs.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..budget import (GIVE_BACK, METRICS, BudgetError, chosen_groups, kept_fraction, layer_fractions,
                      starting_strength, weigh_by_cost_, zero_to_budget_)
from ..compaction import CollapseWarning, compact
from ..graph import UnsupportedModelError
from ..report import sparsity_report
from ..sparsity.penalty import GroupLasso, Masks, resolve_spec
from ..speed.table import LatencyTable
from ..storage import checkpoint as ckpt
from ..zoo.data import load_dataset, make_loader, random_crop_flip
from ..zoo.models import build_model
from . import distributed as dist_
from .recipe import Phase, Recipe, upgrade_keys

__all__ = ["Trainer", "TrainingDiverged", "Split", "load_splits", "evaluate", "epoch_seed", "lr_at"]

_CHECK_EVERY = 25   # steps between the (synchronising) checks that the loss is finite


def _give_back(phase) -> int:
    """How many of the groups the end cut zeroed last it may give back: :data:`GIVE_BACK` where the phase holds its
    zeros, none where it does not."""
    return GIVE_BACK if phase.hold else 0


class TrainingDiverged(RuntimeError):
    """A training loss or group term that is not finite; nothing was saved for its epoch."""


@dataclass
class Split:
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def load_splits(recipe: Recipe, device: str | torch.device = "cpu") -> dict[str, Split]:
    """train/val/test of the recipe's data set, cut to the ``*_subset`` sizes, on ``device``.

    With ``recipe.train_with_val`` the training split is train followed by val (val is still
    returned, for the per-epoch log, but is then no held-out measure).
    """
    out = {}
    for split in ("train", "val", "test"):
        x, y = load_dataset(recipe.data, split, root=recipe.data_root)
        if split == "train" and recipe.train_with_val:
            xv, yv = load_dataset(recipe.data, "val", root=recipe.data_root)
            x, y = torch.cat([x, xv]), torch.cat([y, yv])
        n = getattr(recipe, f"{split}_subset")
        if n is not None:
            x, y = x[:n], y[:n]
        out[split] = Split(x.to(device), y.to(device))
    return out


_AUGMENT_SEED = 0x5EED_A06  # XORed into the epoch seed for the augmentation generator


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors state dict (``init_from``); errors name the file and what does not fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_from: {path} does not exist (run the recipe that writes it first)")
    try:
        model.load_state_dict(load_file(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"init_from: {path} does not fit model {type(model).__name__}: {e}") from e


def _check_optimizer(opt: torch.optim.Optimizer) -> None:
    """After loading a checkpoint's optimizer state: numbers where numbers belong, buffers shaped like
    their parameters (otherwise the first step would fail far from the cause)."""
    for group in opt.param_groups:
        for key in ("lr", "momentum", "weight_decay", "dampening"):
            if isinstance(group.get(key), bool) or not isinstance(group.get(key), (int, float)):
                raise ValueError(f"optimizer {key} is {group.get(key)!r}, not a number")
        for prm in group["params"]:
            buf = opt.state.get(prm, {}).get("momentum_buffer")
            if buf is not None and buf.shape != prm.shape:
                raise ValueError(f"a momentum buffer of shape {list(buf.shape)} for a parameter of shape {list(prm.shape)}")


def epoch_seed(seed: int, phase: int, epoch: int) -> int:
    """The shuffle seed of one epoch, a function of (seed, phase, epoch) only."""
    return int(np.random.SeedSequence([seed, phase, epoch]).generate_state(1, np.uint64)[0] >> 1)


def lr_at(phase: Phase, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate of ``step`` (0-based, within ``epoch``) of ``phase``."""
    s = phase.lr_schedule
    if s.kind == "step":
        return phase.lr * s.gamma ** sum(epoch >= m for m in s.milestones)
    if s.kind == "cosine":
        t = (epoch * steps_per_epoch + step) / max(phase.epochs * steps_per_epoch, 1)
        return phase.lr * 0.5 * (1 + math.cos(math.pi * t))
    return phase.lr


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int = 1000) -> float:
    """Classification error (fraction) of ``model`` on ``split``."""
    was_training = model.training
    model.eval()
    wrong = torch.zeros((), dtype=torch.long, device=split.labels.device)
    for i in range(0, len(split), batch_size):
        logits = model(split.images[i:i + batch_size])
        wrong += (logits.argmax(1) != split.labels[i:i + batch_size]).sum()
    model.train(was_training)
    return wrong.item() / max(len(split), 1)


def budget_ramp(epochs: int) -> int:
    """The epochs over which a budget phase goes from the dense model to its target: three quarters of them."""
    return max(1, round(0.75 * epochs))


def budget_goal(target: float, epoch: int, epochs: int) -> float:
    """The fraction of the dense multiply-adds a budget phase aims at after ``epoch`` (0-based): from 1 down to the
    target in a straight line over :func:`budget_ramp`, then the target."""
    return 1 - (1 - target) * min(1.0, (epoch + 1) / budget_ramp(epochs))


STEER_UP, STEER_MAX, STEER_BAND, STEER_RANGE = 1.5, 2.0, 0.02, (1e-3, 1e3)
STEER_BAND_HELD = 0.1  # with hold, after the ramp: the band is at most this fraction of the target
BRAKE_EVERY = 1 / 8  # of an epoch: how often a budget phase checks whether it reached its target
CHOOSE_EVERY = 1 / 4  # of an epoch: how often a budget phase with shrink: chosen chooses its groups again


REACHED = {"flops": "compact_flop_fraction", "params": "compact_params_fraction",  # an epoch's record, per budget
           "latency": "compact_latency_fraction"}
LATENCY_TABLE = "latency_table.json"  # in the checkpoint directory: a latency budget's table, built once


def budget_of(phase: Phase) -> tuple[str, float | dict[str, float]]:
    """A budget phase's ``(metric, fraction)``: ``("flops", 0.33)`` for ``target: {flops: 0.33}``, and
    ``("flops", {"conv1": 0.25, ...})`` for a per-layer budget."""
    (metric, fraction), = phase.target.items()
    return metric, fraction


def steer(level: float, phase: Phase, epoch: int, reached: float | None, target: float | None = None) -> dict:
    """The budget's controller, once per epoch, from the fraction of the dense multiply-adds (or parameters: the
    phase's budget) the compacted model keeps (``reached``). Its level multiplies every λ: while the model keeps
    more than the goal (:func:`budget_goal`) plus ``STEER_BAND``, the level grows ``STEER_UP``-fold for each 0.1
    of the gap (at least once, at most ``STEER_MAX``-fold an epoch; with ``phase.hold`` on to the phase's end,
    the brake keeping it from overshooting, and after the ramp with a band of at most ``STEER_BAND_HELD`` of the
    target, so that a small target is not left to the end's cut; else only until the goal reaches the target:
    after that the end of the phase closes what is left); while it keeps less than the goal minus the band, it
    shrinks the same way. At or under the target itself the group term rests (strength 0; with ``phase.hold``
    the zeros made are held, see :meth:`Trainer._hold`) until the model is over it again: the end of the phase
    holds the budget exactly. Returns what the epoch's record keeps. ``target``: one layer's, under a per-layer
    budget (see :func:`steer_layers`)."""
    target = budget_of(phase)[1] if target is None else target
    goal = budget_goal(target, epoch, phase.epochs)
    ramping = epoch + 1 < budget_ramp(phase.epochs)
    band = STEER_BAND if ramping or not phase.hold else min(STEER_BAND, STEER_BAND_HELD * target)
    if reached is not None and abs(reached - goal) > band and (ramping or reached < goal or phase.hold):
        factor = min(STEER_MAX, STEER_UP ** max(1.0, abs(reached - goal) / 0.1))
        level = level * factor if reached > goal else level / factor
        level = min(max(level, STEER_RANGE[0]), STEER_RANGE[1])
    resting = reached is not None and reached <= target
    return {"budget_goal": goal, "budget_reached": reached, "next_level": level,
            "next_strength": 0.0 if resting else level}


def steer_layers(levels: dict[str, float], phase: Phase, epoch: int, reached: dict[str, float]) -> dict:
    """:func:`steer` for each layer of a per-layer budget, from each layer's fraction of its multiply-adds after
    compaction (``reached``): each layer's λs have their own level (``GroupLasso.layer_strength``), so a layer at its
    target rests while the others go on. Returns what the epoch's record keeps, each entry ``{layer: value}``."""
    parts = {name: steer(levels[name], phase, epoch, reached.get(name), target)
             for name, target in budget_of(phase)[1].items()}
    return {key: {name: part[key] for name, part in parts.items()}
            for key in ("budget_goal", "budget_reached", "next_level", "next_strength")}


def budget_text(budget: dict) -> str:
    """What a budget (:meth:`BudgetResult.as_dict`) aimed at and reached: ``0.1 of the dense multiply-adds:
    0.0950``, or per layer ``conv1 0.25 of its multiply-adds: 0.1000, conv2 ...``."""
    unit = METRICS[budget.get("metric", "flops")]
    if isinstance(budget["target"], dict):
        return ", ".join(f"{name} {t:g} of its {unit}: {budget['reached'][name]:.4f}"
                         for name, t in budget["target"].items())
    return f"{budget['target']:g} of the dense {unit}: {budget['reached']:.4f}"


def set_strength(gl: GroupLasso, strength: float | dict[str, float]) -> None:
    """A budget controller's strength into ``gl``: one for every λ, or one per targeted layer (a per-layer budget:
    the other regularised layers rest; with model-wide λs, a conv's filter groups then take in the BatchNorm after
    it, so its groups are not scale-free)."""
    if isinstance(strength, dict):
        gl.strength, gl.layer_strength = 1.0, {**dict.fromkeys(gl.lambdas, 0.0), **strength}
    else:
        gl.strength = strength


def term_works(gl: GroupLasso) -> bool:
    """Whether ``gl``'s group term shrinks anything (its strength, or some layer's, is not 0)."""
    return bool(gl.strength) and (not gl.layer_strength or any(gl.layer_strength.values()))


def came_back(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per layer, how many more filters and channels are nonzero in ``after`` than in ``before`` (kept structures as
    :meth:`SparsityReport.kept` gives them; net: others may have gone to zero meanwhile), for the layers where the
    count grew. Proximal SGD is not monotone: a zero group leaves zero when its gradient outweighs its λ, and a
    filter that comes back makes every channel group it crosses nonzero again."""
    out = {}
    for name, now in after.items():
        was = before.get(name)
        if was is not None:
            grown = [max(0, now[0] - was[0]), max(0, now[2] - was[2])]
            if any(grown):
                out[name] = grown
    return out


def _kept_summary(kept: dict[str, list[int]]) -> str:
    return " ".join(f"{n}:{k[0]}/{k[1]}f,{k[2]}/{k[3]}c" for n, k in kept.items())


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class _EpochSums:
    """An epoch's loss and accuracy sums, and the first step whose loss or penalty is not finite with
    both values, all kept on the device so that a GPU is synchronised only every ``_CHECK_EVERY`` steps."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_values = torch.zeros(2, device=device)
        self.no_penalty = torch.zeros((), device=device)
        self.seen = self.seen_here = 0

    @torch.no_grad()
    def add(self, i: int, n: int, batch_loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
            pen: torch.Tensor | None) -> None:
        self.loss += batch_loss * n
        self.correct += (logits.argmax(1) == y).sum()
        values = torch.stack([batch_loss, self.no_penalty if pen is None else pen.detach()])
        first = (self.bad_step < 0) & ~torch.isfinite(values).all()
        self.bad_step = torch.where(first, i, self.bad_step)
        self.bad_values = torch.where(first, values, self.bad_values)
        self.seen += n
        self.seen_here += len(y)


class Trainer:
    """Runs a recipe's phases on ``model``, checkpointing into ``checkpoint_dir`` after every epoch.

    Hooks, so that experiments and peers train through this loop instead of copying it:

    * ``before_step(trainer, optimizer)``: after the backward pass, before the optimizer step (e.g. a peer's own
      gradient term, such as Torch-Pruning's ``regularize``);
    * ``after_step(trainer, optimizer)``: after every optimizer step, once the proximal step, the
      zeroing and the masks are applied (e.g. a peer's own proximal step or masks);
    * ``make_optimizer(trainer, phase)``: the optimizer of a phase (default: SGD with the phase's lr, momentum and
      weight decay), e.g. a peer's own; the phase's lr schedule still sets its ``lr``;
    * ``on_epoch_end(trainer, phase_index, epoch)``: after each epoch's checkpoint (tests use it to
      simulate an interruption).

    ``model`` trains a model of the caller's (e.g. a pruned one) instead of building the recipe's;
    :meth:`run_phase` trains one phase of the recipe, with that phase's shuffles.
    """

    def __init__(self, recipe: Recipe, splits: dict[str, Split], device: str | torch.device = "cpu",
                 checkpoint_dir: str | Path | None = None, progress: bool | None = None,
                 log: Callable[[str], None] | None = None,
                 on_epoch_end: Callable[["Trainer", int, int], None] | None = None,
                 after_step: Callable[["Trainer", torch.optim.Optimizer], None] | None = None,
                 model: nn.Module | None = None,
                 before_step: Callable[["Trainer", torch.optim.Optimizer], None] | None = None,
                 make_optimizer: Callable[["Trainer", Phase], torch.optim.Optimizer] | None = None):
        self.recipe = recipe
        self.splits = splits
        self.device = torch.device(device)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.log = log or (lambda s: print(s, flush=True))
        self.on_epoch_end = on_epoch_end
        self.after_step, self.before_step, self.make_optimizer = after_step, before_step, make_optimizer
        self.world, self.rank = dist_.world_size(), dist_.rank()
        if self.world > 1:
            dist_.local_batch_size(recipe.batch_size, self.world)  # the global batch must split evenly
            if self.rank:
                self.progress, self.log = False, lambda s: None
        torch.manual_seed(recipe.seed)
        if model is None:
            model = build_model(recipe.model, **recipe.model_args)
            if recipe.init_from is not None:
                load_weights(model, recipe.init_from)
        self.model = model.to(self.device)
        self._dropouts = {m: m.p for m in self.model.modules() if isinstance(m, nn.Dropout)}   # phase.dropout
        self.masks: Masks | None = None
        self.history: list[dict] = []
        self.budgets: dict[str, dict] = {}  # phase → what zero_to_budget_ reached (also in its last history record)
        self._cost_weights: dict = {}  # a budget phase's group weights by cost (see _choose)
        self._budget_start: dict[int, float] = {}  # budget phase → its controller's starting strength
        self.latency_table: LatencyTable | None = None  # a latency budget's (see _latency_table)

    # ------------------------------------------------------------------ phases

    def _masks_for_freeze(self, p: int) -> dict[str, torch.Tensor]:
        """Masks of the zero structures of the layers regularised by the latest phase before ``p``
        with lambdas, combined with the masks already in force."""
        source = next(q for q in reversed(self.recipe.phases[:p]) if q.sparsifying)
        return self._in_force(GroupLasso(self.model, source.lambdas,
                                         example_input=self.splits["train"].images[:2]).zero_masks())

    def _in_force(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``masks`` combined with the masks already in force."""
        if self.masks is not None:
            for name, old in self.masks.state_dict().items():
                masks[name] = masks[name] & old if name in masks else old
        return masks

    def _hold(self, phase: Phase, gl: GroupLasso, reached: float | dict[str, float]) -> bool:
        """With ``phase.hold``, once the group term rests at its budget: the zeros made so far stay zero, as masks
        like a freeze's (kept in the checkpoint, in force in the later phases), so that the gradient does not bring
        them back while the term rests. ``reached``: the compacted model's fraction, or ``{layer: fraction}`` of
        the resting layers under a per-layer budget (only their zeros are held). A collapse (0) is not held: the
        gradient may yet undo it. Returns whether anything is held."""
        if not phase.hold:
            return False
        masks = gl.zero_masks()
        if isinstance(reached, dict):
            masks = {name: m for name, m in masks.items() if reached.get(name)}
        if not masks or not reached:
            return False
        self._set_masks(self._in_force(masks))
        return True

    def _set_masks(self, masks: dict[str, torch.Tensor] | None) -> None:
        if self.masks is not None:
            self.masks.detach()
        self.masks = None if masks is None else Masks(self.model, masks)
        if self.masks is not None:
            self.masks.apply_()

    def _position(self, resume: bool) -> tuple[int, int, dict | None]:
        """(phase, epoch) to start at, and the optimizer state to load (mid-phase resume)."""
        if not resume or self.checkpoint_dir is None:
            return 0, 0, None
        if not ckpt.has_checkpoint(self.checkpoint_dir):
            self.log(f"no checkpoint in {self.checkpoint_dir}; starting from the beginning")
            return 0, 0, None
        c = ckpt.load_checkpoint(self.checkpoint_dir, map_location=self.device)
        if c.note:
            self.log(c.note)
        info = c.info
        stored = info.get("recipe")
        if not isinstance(stored, dict) or upgrade_keys(stored) != self.recipe.to_dict():
            raise ckpt.CheckpointError(
                f"{self.checkpoint_dir}: the checkpoint was written by a different recipe; "
                "resume with the recipe it was started with, or choose another output directory")
        p, e, history = info.get("phase"), info.get("epoch"), info.get("history")
        phases = self.recipe.phases
        if not (type(p) is int and 0 <= p < len(phases) and type(e) is int and 0 <= e < max(phases[p].epochs, 1)
                and isinstance(history, list) and all(isinstance(h, dict) for h in history)):
            raise ckpt.CheckpointError(f"{self.checkpoint_dir}: checkpoint.json info has a bad phase, epoch or "
                                       f"history (phase={p!r}, epoch={e!r}) for this recipe")
        try:
            self.model.load_state_dict(c.model)
            self._set_masks(c.masks)
        except (RuntimeError, KeyError, ValueError) as err:
            raise ckpt.CheckpointError(f"{self.checkpoint_dir}: the checkpoint does not fit the model: {err}") from err
        self.history = list(history)
        ckpt.set_rng_state(c.rng)
        e += 1
        self.log(f"resuming after phase {self.recipe.phases[p].name!r} epoch {e}/{self.recipe.phases[p].epochs}")
        if e >= self.recipe.phases[p].epochs:
            return p + 1, 0, None
        return p, e, c.optimizer

    def run(self, resume: bool = False) -> dict:
        """Train all phases (from the last checkpoint if ``resume``); returns the final metrics."""
        start_p, start_e, opt_state = self._position(resume)
        if not dist_.same_on_all([start_p, start_e, len(self.history)], self.device):
            raise ckpt.CheckpointError(f"{self.checkpoint_dir}: the processes found different checkpoints; "
                                       "the output directory must be one directory that all nodes share")
        self.net = self._data_parallel()
        for p in range(start_p, len(self.recipe.phases)):
            mid = p == start_p and start_e > 0
            self.run_phase(p, start_e if mid else 0, opt_state if mid else None)
        return self.results()

    def run_phase(self, p: int, start_epoch: int = 0, opt_state: dict | None = None) -> None:
        """Train phase ``p`` of the recipe from ``start_epoch`` (with ``opt_state``, the optimizer
        state of a checkpoint, when resuming mid-phase)."""
        if not hasattr(self, "net"):
            self.net = self._data_parallel()
        phase = self.recipe.phases[p]
        mid = start_epoch > 0
        for m, rate in self._dropouts.items():
            m.p = rate if phase.dropout is None else phase.dropout
        if phase.freeze and not mid:
            self._set_masks(self._masks_for_freeze(p))
        gl = (GroupLasso(self.model, phase.lambdas, example_input=self.splits["train"].images[:2],
                         compiled=phase.compile_penalty)
              if phase.sparsifying else None)  # traced: channels coupled across residual adds
        if phase.target is not None and "latency" in phase.target:
            self._latency_table(phase)
        if gl is not None and phase.target is not None:  # the controller starts λ-free, or goes on where it was
            weigh_by_cost_(gl, self.splits["train"].images[:2], budget_of(phase)[0], self.latency_table,
                           phase.cost_weight)
            self._cost_weights = dict(gl.group_weights)
            steps = max(1, len(self.splits["train"]) // self.recipe.batch_size) * budget_ramp(phase.epochs)
            self._budget_start[p] = starting_strength(gl, phase.lr, steps)
            set_strength(gl, self._budget_state(p)[1])
        opt = (self.make_optimizer(self, phase) if self.make_optimizer is not None else
               torch.optim.SGD(self.model.parameters(), lr=phase.lr, momentum=phase.momentum,
                               weight_decay=phase.weight_decay))
        if mid:
            try:
                opt.load_state_dict(opt_state)
                _check_optimizer(opt)
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                raise ckpt.CheckpointError(f"{self.checkpoint_dir}: the checkpoint's optimizer state does "
                                           f"not fit phase {phase.name!r}: {err}") from err
        for e in range(start_epoch, phase.epochs):
            stats = self._train_epoch(p, e, opt, gl)
            if e == phase.epochs - 1:
                self._end_phase(phase, gl)
            self._finish_epoch(p, e, opt, stats, gl)
        if phase.epochs == 0:
            self._end_phase(phase, gl)

    def _latency_table(self, phase: Phase) -> None:
        """The latency budget's :class:`LatencyTable`: the one saved in the checkpoint directory when it was measured
        here (same batch, device type, threads and torch), else built now (with every structure kept, so the
        zeros so far do not matter) and saved there."""
        threads = self.recipe.measure.threads or torch.get_num_threads()
        batch = self.recipe.measure.latency_batch
        path = None if self.checkpoint_dir is None else self.checkpoint_dir / LATENCY_TABLE
        where = f"{self.recipe.path or 'the recipe'}: phase {phase.name!r} target.latency"
        if self.world > 1:
            raise ValueError(f"{where}: a latency budget runs in one process (its table is timed, and processes "
                             f"would time it differently); give flops or params, or run it without torchrun")
        if self.latency_table is None and path is not None and path.exists():
            table = LatencyTable.load(path)
            if table.matches(batch, self.device, threads):
                self.latency_table = table
                self.log(f"{phase.name}: the latency table of {path} ({len(table.layers)} layers)")
            else:
                self.log(f"{phase.name}: {path} was measured elsewhere ({table.device}, {table.threads} threads, "
                         f"torch {table.torch}); measuring again")
        if self.latency_table is not None:
            return
        self.log(f"{phase.name}: measuring the latency table (batch {batch}, {threads} threads)")
        try:
            self.latency_table = LatencyTable.build(self.model, self.splits["train"].images[:2], batch, threads)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if path is not None and self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.latency_table.save(path)
        self.log(f"{phase.name}: dense model {1e3 * self.latency_table.reference:.3f} ms a call, "
                 f"{1e3 * self.latency_table.rest[-1][1]:.3f} ms of it outside the {len(self.latency_table.layers)} "
                 "layers")

    def _budget_state(self, p: int) -> tuple[float | dict, float | dict]:
        """The budget controller's level and strength after the last epoch of phase ``p`` (before any: the
        phase's starting strength; per layer under a per-layer budget)."""
        rec = next((r for r in reversed(self.history) if r["phase_index"] == p and "next_level" in r), None)
        if rec is not None:
            return rec["next_level"], rec["next_strength"]
        start, target = self._budget_start.get(p, 1.0), budget_of(self.recipe.phases[p])[1]
        start = dict.fromkeys(target, start) if isinstance(target, dict) else start
        return start, start

    def _data_parallel(self) -> nn.Module:
        """The model the training steps call: DDP around it in a process group, else itself."""
        if self.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return DistributedDataParallel(self.model, device_ids=[index])
        return DistributedDataParallel(self.model)

    def _diverged(self, p: int, e: int, where: str, what: str) -> TrainingDiverged:
        phase = self.recipe.phases[p]
        if self.checkpoint_dir is None:
            kept = "no checkpoint directory"
        elif self.history:
            last = self.history[-1]
            kept = (f"the last good checkpoint ({self.checkpoint_dir}, after {last['phase']} epoch "
                    f"{last['epoch']}/{last['epochs']}) is kept as it was")
        else:
            kept = "no checkpoint was written"
        return TrainingDiverged(f"training diverged in phase {phase.name!r} epoch {e + 1}/{phase.epochs}, {where}: "
                                f"{what}; {kept}. Try a lower lr.")

    def _end_phase(self, phase: Phase, gl: GroupLasso | None) -> None:
        absolute, relative = phase.zero_groups_below, phase.zero_groups_below_relative
        if gl is not None and (absolute is not None or relative is not None):
            n = gl.zero_groups_(absolute, relative)
            if self.masks is not None:
                self.masks.apply_()
            below = [f"< {absolute:g}"] if absolute is not None else []
            if relative is not None:
                below.append(f"< {relative} × the largest of their kind and layer")
            self.log(f"{phase.name}: zeroed {n} groups with norm {' or '.join(below)}")
        if gl is not None and phase.target is not None:
            was_training = self.model.training
            try:
                result = zero_to_budget_(gl, self.splits["train"].images[:2], **phase.target,
                                         table=self.latency_table, lowered_below=self.recipe.lowered_below,
                                         give_back=_give_back(phase))
            except BudgetError as e:
                raise BudgetError(f"{self.recipe.path or 'the recipe'}: phase {phase.name!r} target.{e}") from e
            self.model.train(was_training)
            if self.masks is not None:
                self.masks.apply_()
            self.budgets[phase.name] = result.as_dict()
            self.log(f"{phase.name}: budget {budget_text(result.as_dict())} after compaction "
                     f"({result.groups_zeroed} more groups zeroed, {result.probes} compactions)")

    def _train_epoch(self, p: int, e: int, opt: torch.optim.Optimizer, gl: GroupLasso | None) -> dict:
        phase = self.recipe.phases[p]
        train = self.splits["train"]
        gen = torch.Generator().manual_seed(epoch_seed(self.recipe.seed, p, e))
        loader = make_loader(train.images, train.labels, self.recipe.batch_size, shuffle=True, generator=gen)
        aug_gen = (torch.Generator().manual_seed(epoch_seed(self.recipe.seed, p, e) ^ _AUGMENT_SEED)
                   if self.recipe.augment else None)
        steps = len(loader)
        use_penalty = gl is not None and phase.method == "penalty"
        per_step_lr = phase.lr_schedule.kind == "cosine"
        if not per_step_lr:
            _set_lr(opt, lr_at(phase, e, 0, steps))
        self.model.train()
        sums = _EpochSums(self.device)
        t0 = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc=f"{phase.name} {e + 1}/{phase.epochs}", leave=False, dynamic_ncols=True)
        try:
            for i, (x, y) in enumerate(loader):
                if per_step_lr:
                    _set_lr(opt, lr_at(phase, e, i, steps))
                self._choose(phase, gl, i, steps)
                sums.add(i, *self._step(x, y, opt, gl, phase, aug_gen, use_penalty))
                self._brake(phase, gl, e, i, steps)
                if (i % _CHECK_EVERY == 0 or i == steps - 1) and sums.bad_step.item() >= 0:
                    v = sums.bad_values.tolist()
                    what = f"loss {v[0]:.6g}" + (f", penalty {v[1]:.6g}" if use_penalty else "")
                    raise self._diverged(p, e, f"step {int(sums.bad_step) + 1}/{steps}", what)
                if bar is not None:
                    bar.update(1)
                    if i % 25 == 0 or i == steps - 1:
                        post = {"loss": f"{sums.loss.item() / sums.seen:.4f}",
                                "acc": f"{sums.correct.item() / sums.seen_here:.4f}"}
                        if gl is not None:
                            post["pen"] = f"{self._penalty(gl):.4g}"
                        bar.set_postfix(post, refresh=False)
        finally:
            if bar is not None:
                bar.close()
        dist_.all_reduce_sum(sums.correct)
        penalty = None if gl is None else self._penalty(gl)
        if penalty is not None and not math.isfinite(penalty):
            raise self._diverged(p, e, "at its end", f"group term {penalty:.6g}")
        seen = max(sums.seen, 1)
        return {"train_loss": sums.loss.item() / seen, "train_error": 1 - sums.correct.item() / seen,
                "penalty": penalty, "lr": opt.param_groups[0]["lr"], "train_s": time.perf_counter() - t0}

    def _choose(self, phase: Phase, gl: GroupLasso | None, i: int, steps: int) -> None:
        """In a budget phase with ``shrink: chosen``, at the start of each epoch and every ``CHOOSE_EVERY`` of it while
        the group term works: only the groups the end of the phase would zero now (:func:`chosen_groups`) keep their
        λs (by cost); the others rest, so the term does not shrink what the budget keeps."""
        if (phase.target is None or phase.shrink != "chosen" or gl is None or not term_works(gl)
                or i % max(1, round(steps * CHOOSE_EVERY))):
            return
        chosen = chosen_groups(gl, self.splits["train"].images[:1], table=self.latency_table,
                               lowered_below=self.recipe.lowered_below, give_back=_give_back(phase),
                               **phase.target)
        self.model.train()
        gl.group_weights = {(f.name, f.kind): self._cost_weights.get((f.name, f.kind), 1.0) * c
                            for f, c in zip(gl.families(), chosen)}  # a weight times a boolean: 0 where not chosen

    def _brake(self, phase: Phase, gl: GroupLasso | None, e: int, i: int, steps: int) -> None:
        """In a budget phase, every ``BRAKE_EVERY`` of an epoch while the group term works: once the compacted model
        is at or under the target, the term rests for the rest of the epoch (the controller decides again at its end).
        Zeros come in bursts; checked once an epoch, the last epochs overshot the target by half of it."""
        if phase.target is None or gl is None or not term_works(gl) or (i + 1) % max(1, round(steps * BRAKE_EVERY)):
            return
        metric, target = budget_of(phase)
        x = self.splits["train"].images[:1]
        if isinstance(target, dict):  # per layer: a layer at its target rests
            reached = layer_fractions(self.model, x, self.recipe.lowered_below)
            self.model.train()
            for name, t in target.items():
                if gl.layer_strength.get(name) and reached.get(name, 0.0) <= t:
                    gl.layer_strength[name] = 0.0
                    held = self._hold(phase, gl, {name: reached.get(name, 0.0)})
                    self.log(f"[{phase.name} {e + 1}/{phase.epochs}] step {i + 1}/{steps}: {name} at its budget "
                             f"({reached.get(name, 0.0):.4f} of its multiply-adds); its group term rests"
                             + ", its zeros held" * held)
            return
        reached = kept_fraction(self.model, x, metric, self.latency_table, self.recipe.lowered_below)
        self.model.train()
        if reached <= target:
            gl.strength = 0.0
            held = self._hold(phase, gl, reached)
            self.log(f"[{phase.name} {e + 1}/{phase.epochs}] step {i + 1}/{steps}: at the budget "
                     f"({reached:.4f} of the dense {METRICS[metric]}); the group term rests"
                     + ", its zeros held" * held)

    def _step(self, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, gl: GroupLasso | None,
              phase: Phase, aug_gen: torch.Generator | None, use_penalty: bool):
        """One optimizer step on the global batch ``(x, y)``; returns what :class:`_EpochSums` adds up."""
        n = len(y)
        aug = self.recipe.augment
        if aug is not None:  # the whole global batch, identically in every process
            x = random_crop_flip(x, aug.crop_padding, aug.flip, generator=aug_gen)
        if self.world > 1:  # this process's slice of the global batch; DDP averages the gradients
            x, y = x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]
            logits = self.net(x)
            loss = F.cross_entropy(logits, y, reduction="sum") * (self.world / n)
        else:
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
        pen = gl.penalty() if use_penalty else None
        opt.zero_grad(set_to_none=True)
        (loss + pen if use_penalty else loss).backward()
        if self.before_step is not None:
            self.before_step(self, opt)
        opt.step()
        if gl is not None and phase.method == "prox":
            gl.prox_step(optimizer=opt)
        if gl is not None and phase.zero_weights_below is not None:
            gl.zero_small_(phase.zero_weights_below)
        if self.masks is not None:
            self.masks.apply_()
        if self.after_step is not None:
            self.after_step(self, opt)
        with torch.no_grad():  # the global batch's mean loss (the same in every process)
            batch_loss = (dist_.all_reduce_sum(loss.detach().clone()) / self.world if self.world > 1
                          else loss.detach())
        return n, batch_loss, logits, y, pen

    @staticmethod
    @torch.no_grad()
    def _penalty(gl: GroupLasso) -> float:
        return float(gl.penalty())

    def _finish_epoch(self, p: int, e: int, opt: torch.optim.Optimizer, stats: dict,
                      gl: GroupLasso | None = None) -> None:
        phase = self.recipe.phases[p]
        val_error = evaluate(self.model, self.splits["val"], self.recipe.eval_batch_size)
        fractions, kept = self._sparsity()
        rec = {"phase": phase.name, "phase_index": p, "epoch": e + 1, "epochs": phase.epochs, **stats,
               "val_error": val_error, **fractions, "kept": kept}
        if phase.target is not None and gl is not None:
            metric, target = budget_of(phase)
            level = self._budget_state(p)[0]
            if isinstance(target, dict):
                rec.update(strength=dict(gl.layer_strength),
                           **steer_layers(level, phase, e, fractions.get("compact_layer_flop_fractions") or {}))
            else:
                rec.update(strength=gl.strength, **steer(level, phase, e, fractions[REACHED[metric]]))
            set_strength(gl, rec["next_strength"])
            if isinstance(target, dict):   # the resting layers', or the model's zeros are held
                self._hold(phase, gl, {n: rec["budget_reached"][n] for n, v in rec["next_strength"].items() if not v})
            elif not rec["next_strength"]:
                self._hold(phase, gl, rec["budget_reached"])
        back = came_back(self.history[-1].get("kept", {}), kept) if self.history and phase.sparsifying else {}
        if back:
            rec["came_back"] = back
        if e == phase.epochs - 1 and phase.name in self.budgets:  # kept in the checkpoint's history
            rec["budget"] = self.budgets[phase.name]
        self.history.append(rec)
        pen = "" if stats["penalty"] is None else f" penalty {stats['penalty']:.4g}"
        self.log(f"[{phase.name} {e + 1}/{phase.epochs}] loss {stats['train_loss']:.4f} "
                 f"train err {100 * stats['train_error']:.2f}% val err {100 * val_error:.2f}%{pen} "
                 f"lr {stats['lr']:.3g} ({stats['train_s']:.1f}s) {_kept_summary(kept)}")
        if back:
            self.log(f"[{phase.name} {e + 1}/{phase.epochs}] came back since the last epoch (net; a group whose "
                     f"gradient outweighs its λ leaves zero): " + ", ".join(f"{n} {f} filters, {c} channels"
                                                                  for n, (f, c) in back.items()))
        if self.checkpoint_dir is not None and self.rank == 0:
            info = {"phase": p, "epoch": e, "phase_name": phase.name, "history": self.history,
                    "recipe": self.recipe.to_dict(),
                    "group_lasso": None if not phase.sparsifying else
                    {"lambdas": resolve_spec(self.model, phase.lambdas), "active": True,
                     "method": phase.method},
                    "frozen": self.masks is not None}
            ckpt.save_checkpoint(self.checkpoint_dir, self.model, info, optimizer=opt,
                                 masks=None if self.masks is None else self.masks.state_dict(),
                                 tag=f"p{p}-e{e + 1}")
        dist_.barrier()
        if self.on_epoch_end is not None:
            self.on_epoch_end(self, p, e)

    @torch.no_grad()
    def _sparsity(self) -> tuple[dict[str, float | None], dict[str, list[int]]]:
        """Whole-model multiply-adds kept, from each layer's own zeros and after compaction, and parameters kept
        after compaction (``flop_fraction``, ``compact_flop_fraction``, ``compact_params_fraction``; with a latency
        budget's table, ``compact_latency_fraction``, estimated; per layer, ``compact_layer_flop_fractions``), and
        the kept structures per layer: the report's figures (``None`` and ``{}`` for a model the report cannot run).
        A collapse here is reported at the end of the run, not every epoch."""
        x = self.splits["train"].images[:1]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CollapseWarning)
                try:
                    small = compact(self.model, x, channels_last=False, lowered_below=self.recipe.lowered_below)
                except UnsupportedModelError:
                    small = None
                report = sparsity_report(self.model, x, with_compact=small is not None, compacted=small)
        except ValueError:
            return dict.fromkeys(("flop_fraction", *REACHED.values())), {}
        fractions = {"flop_fraction": report.flop_fraction, "compact_flop_fraction": report.compact_flop_fraction,
                     "compact_params_fraction": report.compact_params_fraction}
        if self.latency_table is not None and small is not None:
            fractions["compact_latency_fraction"] = self.latency_table.fraction(small)
        if small is not None:
            fractions["compact_layer_flop_fractions"] = {r["name"]: r.get("compact_flop_fraction")
                                                         for r in report.layers}
        return fractions, report.kept()

    # ------------------------------------------------------------------ results

    def results(self) -> dict:
        """Test error of the current model, last val error of every phase, the history."""
        val = {}
        for rec in self.history:
            val[rec["phase"]] = rec["val_error"]
        out = {"test_error": evaluate(self.model, self.splits["test"], self.recipe.eval_batch_size),
               "val_error": val, "history": self.history}
        budgets = {rec["phase"]: rec["budget"] for rec in self.history if "budget" in rec}
        if budgets:
            out["budget"] = budgets
        return out

    def finish(self) -> nn.Module:
        """Detach the mask hooks and return the trained model in eval mode."""
        if self.masks is not None:
            self.masks.detach()
        return self.model.eval()
