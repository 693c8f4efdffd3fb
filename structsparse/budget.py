"""Shrinking to a budget: what each SSL group costs, and the zeroing of groups, cheapest norm per unit of cost
first, until the *compacted* model is at or under a budget the user names: a fraction of the dense model's
multiply-adds (``flops``), of its parameters (``params``), or of its latency (``latency``, as a per-layer
:class:`~structsparse.speed.table.LatencyTable` estimates it).

::

    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3}, example_input=x)
    weigh_by_cost_(gl, x)                      # optional: each group's λ times its cost over the mean
    ...                                        # SSL training (now and then, to shrink only what the budget
                                               # would cut: chosen_groups(gl, x, flops=0.33) into gl.group_weights)
    result = zero_to_budget_(gl, x, flops=0.33)
    small = compact(model, x)                  # at most a third of the dense multiply-adds
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import checks
from .compaction import LOWERED_BELOW, CollapseWarning, compact
from .graph import channel_units, trace_graph
from .report import count_macs, count_params
from .sparsity import GroupLasso
from .speed.table import LatencyTable

__all__ = ["BudgetError", "BudgetResult", "METRICS", "group_costs", "kept_fraction", "layer_fractions",
           "zero_to_budget_", "starting_strength", "weigh_by_cost_", "chosen_groups"]

START_QUANTILE = 0.05  # the share of groups the starting strength alone would shrink to zero over the ramp
GIVE_BACK = 32  # after a budget's cut, how many of the groups it zeroed (the most valuable) it tries to give back

# What a budget counts, and in what unit (for messages).
METRICS = {"flops": "multiply-adds", "params": "parameters", "latency": "latency"}


def _count(metric: str, model: nn.Module, example_input: torch.Tensor, table: LatencyTable | None = None,
           compacted: bool = False, layer: str | None = None) -> float:
    """Multiply-adds (of layer ``layer`` alone, when given) or parameters of ``model``; for ``"latency"``, the
    seconds ``table`` estimates for ``model`` when it is ``compacted``, else the table's dense model's."""
    if layer is not None:
        return count_macs(model, example_input, per_module=True).get(layer, 0)
    if metric == "latency":
        return table.estimate(model) if compacted else table.dense_seconds()
    return count_macs(model, example_input) if metric == "flops" else count_params(model)


@torch.no_grad()
def _compacted(model: nn.Module, example_input: torch.Tensor, metric: str, table: LatencyTable | None = None,
               layer: str | None = None, lowered_below: float | str = LOWERED_BELOW) -> tuple[float, bool]:
    """(multiply-adds, parameters or estimated seconds of ``compact(model, example_input, lowered_below=...)``,
    whether the model or a layer's whole width collapsed); the collapse is returned, not warned about."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CollapseWarning)
        small = compact(model, example_input, check=False, channels_last=False, lowered_below=lowered_below)
    return (_count(metric, small, example_input, table, compacted=True, layer=layer),
            any(issubclass(w.category, CollapseWarning) for w in caught))


def kept_fraction(model: nn.Module, example_input: torch.Tensor, metric: str = "flops",
                  table: LatencyTable | None = None, lowered_below: float | str = LOWERED_BELOW) -> float:
    """The fraction of ``model``'s multiply-adds (``"flops"``), parameters (``"params"``) or latency
    (``"latency"``, estimated by ``table``) that ``compact(model, example_input, lowered_below=...)`` keeps (a
    collapse is not warned about here)."""
    return (_compacted(model, example_input, metric, table, lowered_below=lowered_below)[0]
            / max(1e-12, _count(metric, model, example_input, table)))


class BudgetError(ValueError):
    """The budget cannot be reached: even with every regularised group zeroed the model costs more."""


@dataclass
class BudgetResult:
    """What :func:`zero_to_budget_` did: the target and reached fractions of the dense model's multiply-adds,
    parameters or latency (``metric``; as the compacted model counts them, latency in estimated seconds), the dense
    and the reached counts, how many groups it zeroed (on top of those already zero) and how many of those its cut
    first took it gave back (the budget still kept). A per-layer budget gives ``target``, ``reached``, ``dense``
    and ``kept`` as ``{layer: value}``."""
    target: float | dict[str, float]
    reached: float | dict[str, float]
    dense: float | dict[str, float]
    kept: float | dict[str, float]
    groups_zeroed: int
    probes: int
    metric: str = "flops"
    given_back: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@torch.no_grad()
def group_costs(gl: GroupLasso, example_input: torch.Tensor, metric: str = "flops",
                table: LatencyTable | None = None) -> list[torch.Tensor]:
    """The multiply-adds that each group's own weights do on one sample (``metric="flops"``), the seconds they
    take (``"latency"``: those multiply-adds at their layer's full-width time per multiply-add in ``table``), or
    the number of its weights (``"params"``), one tensor per family of :meth:`GroupLasso.families` (a weight of a
    layer does that layer's multiply-adds divided by its number of weights; biases cost nothing; a BatchNorm
    channel's (γ, β) group costs what the filter of the conv or Linear before it costs, when that BatchNorm alone
    reads the layer).
    Removing a group can save more (the channel it feeds goes unread): this is the cost that orders the groups,
    not the saving."""
    model = gl.model
    batch = example_input.shape[0]
    per_module = count_macs(model, example_input, per_module=True)
    uses = {}  # parameter → multiply-adds per weight and sample, or 1 (one parameter)
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and per_module.get(name) and isinstance(module, (nn.Conv2d, nn.Linear)):
            uses[w] = per_module[name] / batch / w.numel() if metric != "params" else 1.0
            if metric == "latency":
                uses[w] *= table.seconds_per_mac(name)
    saved = {p: p.detach().clone() for p in model.parameters()}
    try:  # each weight set to √(its uses), every other parameter to 0: a group's squared norm is its cost
        for p in model.parameters():
            p.fill_(math.sqrt(uses[p]) if p in uses else 0.0)
        costs = [fam.norms().detach().square() for fam in gl.families()]
    finally:
        for p, value in saved.items():
            p.copy_(value)
    producers = _norm_producers(gl, example_input)
    for fam, cost in zip(gl.families(), costs):  # a BatchNorm channel's (γ, β): its producer's filter
        w = producers.get(fam.name)
        if fam.kind == "filter" and w is not None and w in uses and cost.numel() == w.shape[0]:
            cost.fill_(uses[w] * w[0].numel())
    return costs


def _norm_producers(gl: GroupLasso, example_input: torch.Tensor) -> dict[str, nn.Parameter]:
    """For each regularised BatchNorm that reads a Conv2d or Linear output alone, that layer's weight."""
    if not gl.norm_terms:
        return {}
    graph = trace_graph(gl.model, example_input)
    users = graph.consumers()
    out = {}
    for t in gl.norm_terms:
        node = graph.nodes.get(t.name)
        if node is None or len(node.inputs) != 1:
            continue
        source = graph.nodes[node.inputs[0]]
        if isinstance(source.module, (nn.Conv2d, nn.Linear)) and users[source.name] == [t.name]:
            out[t.name] = source.module.weight
    return out


@torch.no_grad()
def starting_strength(gl: GroupLasso, lr: float, steps: int) -> float:
    """A strength for ``gl`` that needs no λ tuning: the one at which ``steps`` proximal steps of size ``lr``
    (gradients aside) shrink the smallest :data:`START_QUANTILE` of the regularised groups (one in twenty), relative
    to their λ, to zero. The λs then only say how the kinds and layers weigh against each other."""
    ratios = []
    for fam in gl.families():
        norms = fam.norms().detach()
        lam = torch.as_tensor(fam.lam, dtype=norms.dtype, device=norms.device).expand_as(norms)
        live = (norms > 0) & (lam > 0)
        ratios.append((norms[live] / lam[live]).flatten())
    ratios = torch.cat(ratios) if ratios else torch.zeros(0)
    if not ratios.numel() or lr <= 0 or steps < 1:
        return 1.0
    return float(ratios.quantile(START_QUANTILE)) / (lr * steps)


@torch.no_grad()
def weigh_by_cost_(gl: GroupLasso, example_input: torch.Tensor, metric: str = "flops",
                   table: LatencyTable | None = None, power: float = 1.0) -> None:
    """Weigh each regularised group's λ by what it costs (:func:`group_costs`), so that the group term shrinks
    expensive structures first: ``gl.group_weights`` ← (cost / mean cost)^``power`` for every group that costs
    something (the mean over those groups), 1 for the others (``power`` 0: no weighting)."""
    if power < 0:
        raise ValueError(f"power: the cost weighting's exponent is at least 0, got {power!r}")
    gl.group_weights = {}
    if power == 0:
        return
    costs = group_costs(gl, example_input, metric, table)
    paid = torch.cat([c.flatten()[c.flatten() > 0] for c in costs]) if costs else torch.zeros(0)
    if not paid.numel():
        return
    mean = paid.mean()
    for fam, c in zip(gl.families(), costs):
        gl.group_weights[(fam.name, fam.kind)] = torch.where(c > 0, (c / mean).pow(power), torch.ones_like(c))


def _stays(gl: GroupLasso, example_input: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer, its filters whose channels stay whatever the weights (the model's output, say): zeroing
    them saves nothing, or collapses the model."""
    units = channel_units(trace_graph(gl.model, example_input))
    return {name: units.pinned[units.of[name]] for name in units.readers}


def _order(gl: GroupLasso, example_input: torch.Tensor, metric: str, table: LatencyTable | None = None,
           layer: str | None = None) -> list[tuple[int, int]]:
    """The nonzero groups (of layer ``layer`` alone, when given) that cost something and whose zeros compaction can
    use, by norm per unit of cost (smallest first), as (family, index)."""
    families = gl.families()
    norms = [fam.norms().detach().flatten() for fam in families]
    costs = [c.flatten() for c in group_costs(gl, example_input, metric, table)]
    stays = _stays(gl, example_input)
    keys, where = [], []
    for f, (fam, n, c) in enumerate(zip(families, norms, costs)):
        live = (n > 0) & (c > 0) & (layer is None or fam.name == layer)
        pinned = stays.get(fam.name)
        if fam.kind == "filter" and pinned is not None and pinned.numel() == n.numel():
            live &= ~pinned.to(live.device)
        keys.append(n[live] / c[live])
        where.extend((f, int(i)) for i in live.nonzero().flatten())
    if not where:
        return []
    order = torch.cat(keys).argsort(stable=True)
    return [where[i] for i in order.tolist()]


def _zero(gl: GroupLasso, groups: list[tuple[int, int]]) -> None:
    """Zero the ``groups`` (family, index) of ``gl``."""
    families = gl.families()
    norms = [fam.norms() for fam in families]
    masks = [torch.zeros(n.numel(), dtype=torch.bool, device=n.device) for n in norms]
    for f, i in groups:
        masks[f][i] = True
    for fam, n, mask in zip(families, norms, masks):
        if bool(mask.any()):
            fam.zero(mask.view(n.shape))


class _Probes:
    """The compacted model's multiply-adds, parameters or estimated seconds with the first k groups of an order
    zeroed (but those of ``back``, the positions in the order given back), each from the model's saved state."""

    def __init__(self, gl: GroupLasso, example_input: torch.Tensor, metric: str, table: LatencyTable | None = None,
                 layer: str | None = None, lowered_below: float | str = LOWERED_BELOW):
        self.gl, self.x, self.metric, self.table, self.layer, self.count = gl, example_input, metric, table, layer, 0
        self.lowered_below = lowered_below
        self.order = _order(gl, example_input, metric, table, layer)
        self.saved = {k: v.clone() for k, v in gl.model.state_dict().items()}

    @torch.no_grad()
    def set(self, k: int, back: frozenset[int] = frozenset()) -> None:
        self.gl.model.load_state_dict(self.saved)
        _zero(self.gl, [g for j, g in enumerate(self.order[:k]) if j not in back])

    def __call__(self, k: int) -> tuple[float, bool]:
        """(multiply-adds, parameters or seconds, whether the model or a layer's whole width collapsed)."""
        self.count += 1
        self.set(k)
        # a collapse: k is too many
        return _compacted(self.gl.model, self.x, self.metric, self.table, self.layer, self.lowered_below)


def _give_back(probe: _Probes, k: int, spend: Callable[[], float | None], limit: int = GIVE_BACK) -> int:
    """After the cut of the first ``k`` groups of ``probe.order``: give back (their weights as saved), the most
    valuable first, those among the last ``limit`` of them whose return the budget still pays for and
    that the compacted model uses: ``spend()``, on the model as it then is, is what the budget counts, or None
    over it (or collapsed); a group is given back when that grows. The cut's fixed order overshoots where a whole
    channel goes that a few filters would have paid for; a group whose return costs nothing (its channel goes
    unread anyway) stays zero, where the trainer's chosen groups shrink it. Returns how many; the model is left
    with the others zeroed."""
    back: frozenset[int] = frozenset()
    probe.set(k)
    if limit <= 0:
        return 0
    spent = spend()
    for j in range(k - 1, max(k - limit, 0) - 1, -1):
        probe.set(k, back | {j})
        probe.count += 1
        more = spend()
        if more is not None and spent is not None and more > spent:
            back, spent = back | {j}, more
    probe.set(k, back)
    return len(back)


def _which(flops, params, latency) -> tuple[str, float]:
    given = {k: v for k, v in (("flops", flops), ("params", params), ("latency", latency)) if v is not None}
    if len(given) != 1:
        raise ValueError(f"give one budget, flops, params or latency; got {', '.join(given) or 'none'}")
    (metric, value), = given.items()
    target = checks.number(value, metric, minimum=0)
    if not 0 < target <= 1:
        raise ValueError(f"{metric}: the budget is a fraction of the dense {METRICS[metric]} in (0, 1], got {value!r}")
    return metric, target


@torch.no_grad()
def zero_to_budget_(gl: GroupLasso, example_input: torch.Tensor, *, flops: float | Mapping[str, float] | None = None,
                    params: float | None = None, latency: float | None = None, table: LatencyTable | None = None,
                    lowered_below: float | str = LOWERED_BELOW, give_back: int = GIVE_BACK) -> BudgetResult:
    """Zero the fewest regularised groups of ``gl`` -- cheapest norm per unit of cost first (see
    :func:`group_costs`) -- so that ``compact(gl.model, example_input)`` does at most ``flops`` times the
    dense model's multiply-adds, as ``torch.utils.flop_counter`` counts them (or has at most ``params`` times its
    parameters, or takes at most ``latency`` times the dense model's time as ``table`` estimates it, a
    :class:`~structsparse.speed.table.LatencyTable` built here at batch 1 when not given; give one of the three).
    ``flops={layer: f, ...}`` is a budget per layer instead: each named layer of the compacted model does at most f
    of that layer's dense multiply-adds, the layers taken in turn, each zeroing only its own groups (filters,
    channels, shapes; the paper's per-layer FLOP). The count is of the compacted model itself (compacted with
    ``lowered_below``, as :func:`~structsparse.compact` takes it), so the budget is never exceeded; a group whose
    zeros would collapse the model or a layer's whole width is passed over. Then, of the last ``give_back`` groups
    it zeroed, those the budget still pays for are given back (see :func:`_give_back`; 0: none). Raises
    :class:`BudgetError`, naming the closest reachable fraction, when zeroing every other group is not enough (and
    leaves the model as it was)."""
    model, was_training = gl.model, gl.model.training
    if isinstance(flops, Mapping):
        return _zero_layers_to_budget_(gl, example_input, flops, lowered_below, give_back)
    metric, target = _which(flops, params, latency)
    if metric == "latency" and table is None:
        table = LatencyTable.build(model, example_input)
    dense = _count(metric, model, example_input, table) or 1
    probe = _Probes(gl, example_input, metric, table, lowered_below=lowered_below)
    try:
        lo, _ = _fewest(probe, target, dense, metric, f"the dense {METRICS[metric]}")

        def spend() -> float | None:
            count, collapsed = _compacted(model, example_input, metric, table, lowered_below=lowered_below)
            return None if collapsed or count > target * dense else count

        back = _give_back(probe, lo, spend, give_back)
        found = _compacted(model, example_input, metric, table, lowered_below=lowered_below)[0]
    except BaseException:
        model.load_state_dict(probe.saved)
        raise
    finally:
        model.train(was_training)
    return BudgetResult(target, found / dense, dense, found, lo - back, probe.count, metric, back)


@torch.no_grad()
def chosen_groups(gl: GroupLasso, example_input: torch.Tensor, *, table: LatencyTable | None = None,
                  lowered_below: float | str = LOWERED_BELOW, give_back: int = GIVE_BACK,
                  **budget) -> list[torch.Tensor]:
    """The groups that :func:`zero_to_budget_` ``(gl, example_input, **budget)`` would leave zero now (those zero
    already among them): one boolean tensor per family of :meth:`GroupLasso.families`, shaped like its norms. The
    model is left as it was. A budget that cannot be reached chooses every group."""
    saved = {k: v.clone() for k, v in gl.model.state_dict().items()}
    try:
        zero_to_budget_(gl, example_input, table=table, lowered_below=lowered_below, give_back=give_back, **budget)
        return [fam.norms().detach().eq(0) for fam in gl.families()]
    except BudgetError:
        return [torch.ones_like(fam.norms(), dtype=torch.bool) for fam in gl.families()]
    finally:
        gl.model.load_state_dict(saved)


def _fewest(probe: "_Probes", target: float, dense: float, key: str, of: str) -> tuple[int, float]:
    """The fewest groups of ``probe``'s order to zero for a count at most ``target × dense`` without a collapse, and
    that count; the model is left with them zeroed. ``key`` and ``of`` name the budget in a :class:`BudgetError`."""
    lo = 0
    while True:  # the fewest groups that reach the budget or collapse (both only grow with k)
        hi = len(probe.order)
        while lo < hi:
            mid = (lo + hi) // 2
            count, collapsed = probe(mid)
            if collapsed or count <= target * dense:
                hi = mid
            else:
                lo = mid + 1
        count, collapsed = probe(lo)
        if not collapsed and count <= target * dense:
            return lo, count
        if collapsed and lo == 0:
            raise BudgetError(f"{key}: the model's output does not depend on its input even before zeroing")
        if not collapsed:  # every group zeroed, and still over
            raise BudgetError(f"{key}: {target:g} of {of} cannot be reached: with every regularised group "
                              f"zeroed the compact model keeps {count / dense:.4f}")
        del probe.order[lo - 1]  # the group that collapses it stays; go on from there
        lo -= 1


def layer_fractions(model: nn.Module, example_input: torch.Tensor,
                    lowered_below: float | str = LOWERED_BELOW) -> dict[str, float]:
    """Per layer that does multiply-adds, the fraction of them ``compact(model, example_input, lowered_below=...)``
    keeps (a layer compaction removed keeps 0; a collapse is not warned about here)."""
    return _layer_fractions(model, example_input, lowered_below)[0]


def _layer_fractions(model: nn.Module, example_input: torch.Tensor,
                     lowered_below: float | str) -> tuple[dict[str, float], bool]:
    """:func:`layer_fractions`, and whether the model or a layer's whole width collapsed."""
    dense = _layer_macs(model, example_input)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CollapseWarning)
        small = compact(model, example_input, check=False, channels_last=False, lowered_below=lowered_below)
    kept = count_macs(small, example_input, per_module=True)
    return ({name: kept.get(name, 0) / macs for name, macs in dense.items()},
            any(issubclass(w.category, CollapseWarning) for w in caught))


def _layer_macs(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """The multiply-adds of each Conv2d and Linear layer of ``model`` that does any."""
    per_module = count_macs(model, example_input, per_module=True)
    return {n: per_module[n] for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and per_module.get(n)}


def _zero_layers_to_budget_(gl: GroupLasso, example_input: torch.Tensor, flops: Mapping[str, float],
                            lowered_below: float | str, give_back: int) -> BudgetResult:
    """:func:`zero_to_budget_` with ``flops={layer: f}``."""
    model, was_training = gl.model, gl.model.training
    dense = _layer_macs(model, example_input)
    targets = {}
    for name, value in flops.items():
        if name not in dense:
            raise ValueError(f"flops.{name}: not a Conv2d or Linear layer of {type(model).__name__} that does "
                             f"multiply-adds (layers: {', '.join(dense)})")
        targets[name] = _which(value, None, None)[1]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    zeroed, probes, given_back, done = 0, 0, 0, {}

    def spend() -> float | None:  # the layers cut so far, each within its budget (a later one's give-back can
        reached, collapsed = _layer_fractions(model, example_input, lowered_below)  # revive their channels)
        fits = not collapsed and all(reached[n] <= t for n, t in done.items())
        return sum(reached[n] * dense[n] for n in done) if fits else None

    try:
        for name, target in targets.items():
            probe = _Probes(gl, example_input, "flops", layer=name, lowered_below=lowered_below)
            lo, _ = _fewest(probe, target, dense[name], f"flops.{name}", f"{name}'s dense multiply-adds")
            done[name] = target
            back = _give_back(probe, lo, spend, give_back)
            zeroed, probes, given_back = zeroed + lo - back, probes + probe.count, given_back + back
    except BaseException:
        model.load_state_dict(saved)
        raise
    finally:
        model.train(was_training)
    reached = layer_fractions(model, example_input, lowered_below)  # a later layer's zeros can remove an earlier
    return BudgetResult(targets, {n: reached[n] for n in targets}, {n: dense[n] for n in targets},  # one's work
                        {n: round(reached[n] * dense[n]) for n in targets}, zeroed, probes, "flops", given_back)
