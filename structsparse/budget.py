"""Shrinking to a budget: the multiply-adds each SSL group costs, and the zeroing of groups, cheapest norm per
unit of cost first, until the *compacted* model is at or under a FLOP budget the user names.

::

    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3}, example_input=x)
    ...                                        # SSL training
    result = zero_to_budget_(gl, x, flops=0.33)
    small = compact(model, x)                  # at most a third of the dense multiply-adds
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import checks
from .compaction import CollapseWarning, compact
from .graph import channel_units, trace_graph
from .report import count_macs
from .sparsity import GroupLasso

__all__ = ["BudgetError", "BudgetResult", "group_costs", "zero_to_budget_", "starting_strength"]


class BudgetError(ValueError):
    """The budget cannot be reached: even with every regularised group zeroed the model costs more."""


@dataclass
class BudgetResult:
    """What :func:`zero_to_budget_` did: the target and reached fractions of the dense multiply-adds (as the
    compacted model counts them), and how many groups it zeroed (on top of those already zero)."""
    target: float
    reached: float
    dense_macs: int
    macs: int
    groups_zeroed: int
    probes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def group_costs(gl: GroupLasso, example_input: torch.Tensor) -> list[torch.Tensor]:
    """The multiply-adds that each group's own weights do on one sample, one tensor per family of
    :meth:`GroupLasso.families` (a weight of a layer does that layer's multiply-adds divided by its number
    of weights; biases and BatchNorm entries cost nothing). Removing a group can save more (the channel it
    feeds goes unread): this is the cost that orders the groups, not the saving."""
    model = gl.model
    batch = example_input.shape[0]
    per_module = count_macs(model, example_input, per_module=True)
    uses = {}  # parameter → multiply-adds per weight and sample
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and per_module.get(name) and isinstance(module, (nn.Conv2d, nn.Linear)):
            uses[w] = per_module[name] / batch / w.numel()
    saved = {p: p.detach().clone() for p in model.parameters()}
    try:  # each weight set to √(its uses), every other parameter to 0: a group's squared norm is its cost
        for p in model.parameters():
            p.fill_(math.sqrt(uses[p]) if p in uses else 0.0)
        return [fam.norms().detach().square() for fam in gl.families()]
    finally:
        for p, value in saved.items():
            p.copy_(value)


@torch.no_grad()
def starting_strength(gl: GroupLasso, lr: float, steps: int) -> float:
    """A strength for ``gl`` that needs no λ tuning: the one at which ``steps`` proximal steps of size ``lr``
    (gradients aside) shrink the smallest quarter of the regularised groups, relative to their λ, to zero. The
    λs then only say how the kinds and layers weigh against each other."""
    ratios = []
    for fam in gl.families():
        norms = fam.norms().detach()
        lam = torch.as_tensor(fam.lam, dtype=norms.dtype, device=norms.device).expand_as(norms)
        live = (norms > 0) & (lam > 0)
        ratios.append((norms[live] / lam[live]).flatten())
    ratios = torch.cat(ratios) if ratios else torch.zeros(0)
    if not ratios.numel() or lr <= 0 or steps < 1:
        return 1.0
    return float(ratios.quantile(0.25)) / (lr * steps)


def _stays(gl: GroupLasso, example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer, its filters whose channels stay whatever the weights (the model's output, say): zeroing
    them saves nothing, or collapses the model."""
    units = channel_units(trace_graph(gl.model, example_input))
    return {name: units.pinned[units.of[name]] for name in units.readers}


def _order(gl: GroupLasso, example_input: torch.Tensor) -> list[tuple[int, int]]:
    """The nonzero groups that cost something and whose zeros compaction can use, by norm per unit of cost
    (smallest first), as (family, index)."""
    families = gl.families()
    norms = [fam.norms().detach().flatten() for fam in families]
    costs = [c.flatten() for c in group_costs(gl, example_input)]
    stays = _stays(gl, example_input)
    keys, where = [], []
    for f, (fam, n, c) in enumerate(zip(families, norms, costs)):
        live = (n > 0) & (c > 0)
        pinned = stays.get(fam.name)
        if fam.kind == "filter" and pinned is not None and pinned.numel() == n.numel():
            live &= ~pinned.to(live.device)
        keys.append(n[live] / c[live])
        where.extend((f, int(i)) for i in live.nonzero().flatten())
    if not where:
        return []
    order = torch.cat(keys).argsort(stable=True)
    return [where[i] for i in order.tolist()]


def _zero_first(gl: GroupLasso, order: list[tuple[int, int]], k: int) -> None:
    families = gl.families()
    norms = [fam.norms() for fam in families]
    masks = [torch.zeros(n.numel(), dtype=torch.bool, device=n.device) for n in norms]
    for f, i in order[:k]:
        masks[f][i] = True
    for fam, n, mask in zip(families, norms, masks):
        if bool(mask.any()):
            fam.zero(mask.view(n.shape))


class _Probes:
    """Compacted multiply-adds with the first k groups of an order zeroed, each from the model's saved state."""

    def __init__(self, gl: GroupLasso, example_input: torch.Tensor, order: list[tuple[int, int]]):
        self.gl, self.x, self.order, self.count = gl, example_input, order, 0
        self.saved = {k: v.clone() for k, v in gl.model.state_dict().items()}

    @torch.no_grad()
    def set(self, k: int) -> None:
        self.gl.model.load_state_dict(self.saved)
        _zero_first(self.gl, self.order, k)

    def __call__(self, k: int) -> tuple[int, bool]:
        """(multiply-adds, whether the model or a layer's whole width collapsed)."""
        self.count += 1
        self.set(k)
        with warnings.catch_warnings(record=True) as caught:  # a collapse is what makes k too many
            warnings.simplefilter("always", CollapseWarning)
            small = compact(self.gl.model, self.x, check=False)
        return count_macs(small, self.x), any(issubclass(w.category, CollapseWarning) for w in caught)


@torch.no_grad()
def zero_to_budget_(gl: GroupLasso, example_input: torch.Tensor, *, flops: float) -> BudgetResult:
    """Zero the fewest regularised groups of ``gl`` -- cheapest norm per unit of cost first (see
    :func:`group_costs`) -- so that ``compact(gl.model, example_input)`` does at most ``flops`` times the
    dense model's multiply-adds, as ``torch.utils.flop_counter`` counts them. The count is of the compacted
    model itself, so the budget is never exceeded; a group whose zeros would collapse the model or a layer's
    whole width is passed over. Raises :class:`BudgetError`, naming the closest reachable fraction, when
    zeroing every other group is not enough (and leaves the model as it was)."""
    target = checks.number(flops, "flops", minimum=0)
    if not 0 < target <= 1:
        raise ValueError(f"flops: the budget is a fraction of the dense multiply-adds in (0, 1], got {flops!r}")
    model, was_training = gl.model, gl.model.training
    dense = count_macs(model, example_input) or 1
    probe = _Probes(gl, example_input, _order(gl, example_input))
    try:
        lo = 0
        while True:  # the fewest groups that reach the budget or collapse (both only grow with k)
            hi, found = len(probe.order), None
            while lo < hi:
                mid = (lo + hi) // 2
                macs, collapsed = probe(mid)
                if collapsed or macs <= target * dense:
                    hi = mid
                else:
                    lo = mid + 1
            macs, collapsed = probe(lo)
            if not collapsed and macs <= target * dense:
                found = macs
                break
            if collapsed and lo == 0:
                raise BudgetError("flops: the model's output does not depend on its input even before zeroing")
            if not collapsed:  # every group zeroed, and still over
                raise BudgetError(f"flops: {target:g} of the dense multiply-adds cannot be reached: with every "
                                  f"regularised group zeroed the compact model keeps {macs / dense:.4f}")
            del probe.order[lo - 1]  # the group that collapses it stays; go on from there
            lo -= 1
        probe.set(lo)
    except BaseException:
        model.load_state_dict(probe.saved)
        raise
    finally:
        model.train(was_training)
    return BudgetResult(target, found / dense, dense, found, lo, probe.count)
