"""The group-Lasso term of SSL, its proximal step, and the zeroing of small groups; the masks that
freeze zeroed groups are in :mod:`.masks`.

Three lines in a user's own training loop::

    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3})
    loss = criterion(model(x), y) + gl.penalty()   # or: opt.step(); gl.prox_step(lr)
    ...; opt.step(); gl.zero_small_()              # the paper's zeroing of |w| < 1e-4
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import nn

from .. import checks
from .groups import (KINDS, NORM_KINDS, CoupledChannels, coupled_channels, covered_modules, group_lasso, group_norms,
                     group_view, nonzero_groups, norm_group_norms, normalization_modules, safe_sqrt,
                     shrink_factor, shrink_groups_)
from .masks import Masks

__all__ = ["GroupLasso", "Masks", "resolve_spec", "check_spec", "check_kinds"]

# Group kinds whose zeros compaction can remove; their zeros are always frozen.
_STRUCTURAL = ("filter", "channel", "shape", "depth")


def check_kinds(mapping, where: str) -> dict[str, float]:
    """``{kind: λ}`` with every key a group kind and every λ a finite number >= 0 (as floats)."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where}: expected a mapping of group kind to λ, got {mapping!r}")
    out = {}
    for kind, lam in mapping.items():
        if kind not in KINDS:
            raise ValueError(f"{where}.{kind}: unknown group kind; known kinds: {', '.join(KINDS)}")
        out[kind] = checks.number(lam, f"{where}.{kind}", minimum=0)
    return out


def check_spec(spec, where: str = "spec") -> dict:
    """A spec with its λs checked and made floats: group kinds → λ for all layers, and layer-name patterns
    → ``{kind: λ}``. Errors name the key path from ``where`` (``spec.conv2.chanel: unknown group kind``)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a mapping of group kinds or layer patterns, got {type(spec).__name__}")
    out = {}
    for key, value in spec.items():
        if not isinstance(key, str):
            raise ValueError(f"{where}.{key}: keys must be group kinds or layer-name patterns")
        if isinstance(value, Mapping):   # a layer pattern
            out[key] = check_kinds(value, f"{where}.{key}")
        elif key in KINDS:
            out[key] = checks.number(value, f"{where}.{key}", minimum=0)
        else:
            raise ValueError(f"{where}.{key}: unknown group kind; known kinds: {', '.join(KINDS)} "
                             "(or a layer-name pattern mapping kinds to λ)")
    return out


def resolve_spec(model: nn.Module, spec: Mapping, where: str = "spec") -> dict[str, dict[str, float]]:
    """Turn a spec into ``{layer name: {kind: λ}}`` for every layer with some λ > 0.

    ``spec`` keys that are group kinds set λ for every Conv2d and Linear layer; any other key
    is a module-name pattern (``fnmatch``: ``"conv*"``, ``"features.*"``) whose value maps
    kinds to λ for the matching layers, overriding the model-wide values. Patterns apply in
    order, so a later pattern overrides an earlier one. A pattern that matches no layer is an
    error. Patterns may also name affine BatchNorm layers, with the kinds ``filter`` (one
    channel's γ and β) and ``depth`` (all of them); model-wide kinds never touch BatchNorm.
    """
    spec = check_spec(spec, where)
    layers = covered_modules(model)
    norms = normalization_modules(model)
    resolved = {name: {k: v for k, v in spec.items() if k in KINDS} for name in layers}
    for pattern, kinds in spec.items():
        if pattern in KINDS:
            continue
        matched = [name for name in list(layers) + list(norms) if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"{where}.{pattern}: matches no Conv2d, Linear or BatchNorm layer; "
                             f"layers: {', '.join(list(layers) + list(norms)) or 'none'}")
        for name in matched:
            if name in norms and set(kinds) - set(NORM_KINDS):
                raise ValueError(f"{where}.{pattern}: {name} is a BatchNorm layer; its group kinds are "
                                 f"{' and '.join(NORM_KINDS)}, not {', '.join(sorted(set(kinds) - set(NORM_KINDS)))}")
            resolved.setdefault(name, {}).update(kinds)
    return {name: {k: v for k, v in kinds.items() if v > 0} for name, kinds in resolved.items()
            if any(v > 0 for v in kinds.values())}


def _groups(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def _small(norms: torch.Tensor, threshold: float) -> torch.Tensor:
    """Groups that are not zero yet but whose norm is below ``threshold``."""
    return (norms < threshold) & (norms > 0)


@torch.no_grad()
def _scale_norm_(module: nn.Module, scale: torch.Tensor) -> None:
    """Multiply a BatchNorm layer's γ and β by ``scale`` (one number per channel, or one for all)."""
    module.weight.mul_(scale)
    module.bias.mul_(scale)


@dataclass
class _Term:
    name: str
    module: nn.Module
    lambdas: dict[str, float]
    channel_scale: torch.Tensor | None = None  # 0 for the columns that a coupled group covers instead
    norm: nn.Module | None = None  # the BatchNorm right after the layer: (γ_n, β_n) join filter n's group

    def effective(self) -> dict:
        """λ per kind for the fused term: the channel λ as one value per column when some columns are coupled;
        without ``filter`` when the filter groups include a BatchNorm's (γ, β) (see :meth:`filter_norms`)."""
        out = dict(self.lambdas)
        if self.norm is not None:
            out.pop("filter", None)
        if self.channel_scale is not None and "channel" in out:
            out["channel"] = out["channel"] * self.channel_scale
        return out

    def filter_norms(self) -> torch.Tensor:
        """‖(W[n], γ_n, β_n)‖ per filter n: the group that decides output channel n under BatchNorm."""
        sq = self.module.weight.flatten(1).square().sum(1) + self.norm.weight.square() + self.norm.bias.square()
        return safe_sqrt(sq)

    @torch.no_grad()
    def scale_filters_(self, scale: torch.Tensor) -> None:
        self.module.weight.mul_(scale.view(-1, *[1] * (self.module.weight.dim() - 1)))
        _scale_norm_(self.norm, scale)


@dataclass
class _Heads:
    """The heads of a multi-head attention as groups: head h is the ``head_dim`` columns of the output
    projection that read it (zero, the head writes nothing and ``compact`` removes it)."""
    name: str            # the output projection's name
    module: nn.Module    # the output projection (Linear, embed_dim × heads·head_dim)
    heads: int
    lambdas: float
    kind = "filter"      # the kind whose thresholds zero_groups_ applies

    def weights(self) -> list[torch.Tensor]:
        return [self.module.weight]

    def _view(self) -> torch.Tensor:
        w = self.module.weight
        return w.view(w.shape[0], self.heads, -1)

    def norms(self) -> torch.Tensor:
        return safe_sqrt(self._view().square().sum((0, 2)))

    @torch.no_grad()
    def scale_(self, scale: torch.Tensor) -> None:
        self._view().mul_(scale.view(1, -1, 1))


@dataclass
class _Family:
    """Groups whose norms one computation gives (see :meth:`GroupLasso.families`)."""
    name: str                 # the layer, or "coupled"
    kind: str                 # the group kind ("head" for attention heads)
    norms: Callable[[], torch.Tensor]
    zero: Callable[[torch.Tensor], None]  # zero the groups where the mask (shaped like norms()) is True
    lam: float | torch.Tensor = 0.0       # the groups' λ (a tensor broadcasting to norms() where they differ)
    threshold_kind: str = ""  # the kind whose relative threshold zero_groups_ applies (default: kind)

    def __post_init__(self):
        self.threshold_kind = self.threshold_kind or self.kind


class GroupLasso:
    """The SSL regulariser: Σ_layers Σ_kinds λ · Σ_groups ‖w_g‖₂ over Conv2d and Linear weights.

    ``spec`` maps group kinds (``filter``, ``channel``, ``shape``, ``depth``, ``filter2d``) to
    λ for the whole model, and/or module-name patterns to such mappings (see
    :func:`resolve_spec`). Biases and normalisation parameters are never regularised.

    With ``example_input`` the model is traced (torch.fx) and ``channel`` groups follow the
    graph: a channel read by several layers (a residual stream, a fork) is one *coupled*
    group made of the input columns of all its readers, with the largest of their channel
    λs, since it can only be removed when none of them reads it (see
    :class:`~structsparse.sparsity.groups.CoupledChannels`). Channels read by one layer keep the
    paper's per-layer groups, so chains behave the same with or without ``example_input``.

    With ``compiled``, :meth:`penalty` computes the layers' terms through ``torch.compile`` (fused kernels, forward
    and backward; the first call compiles, seconds, and needs a C++ compiler on the CPU: where compiling fails a
    warning says so and the uncompiled term runs). On LeNet it took the term's share of a training step from
    +11–13% to +2–8% (``benchmarks/penalty_overhead.py --compile``, README). :meth:`prox_step` is not compiled.
    """

    def __init__(self, model: nn.Module, spec: Mapping, example_input: torch.Tensor | None = None, *,
                 compiled: bool = False):
        self.model = model
        self.compiled = bool(compiled)  # see penalty
        self.spec = spec
        modules, norms = dict(model.named_modules()), normalization_modules(model)
        resolved = resolve_spec(model, spec)
        self.terms = [_Term(n, modules[n], lam) for n, lam in resolved.items() if n not in norms]
        self.norm_terms = [_Term(n, modules[n], lam) for n, lam in resolved.items() if n in norms]  # (γ, β) groups
        self.coupled: CoupledChannels | None = None
        graph = None
        if example_input is not None:
            from ..graph import trace_graph  # graph imports nothing from here
            graph = trace_graph(model, example_input)
            self.coupled = coupled_channels(model, example_input,
                                            {t.name: t.lambdas.get("channel", 0.0) for t in self.terms}, graph)
        self.heads: list[_Heads] = []
        if graph is not None:
            self._join_norms(graph, spec)
            self._attention_heads(graph)
        if self.coupled is not None:
            by_name = {t.name: t for t in self.terms}
            for name, module, ids in self.coupled.members:
                t = by_name.get(name)
                if t is not None and "channel" in t.lambdas and _groups(module) == 1:
                    scale = (ids < 0).to(module.weight.dtype)
                    t.channel_scale = scale.view(1, -1, 1, 1) if module.weight.dim() == 4 else scale.view(1, -1)
        self.active = True
        self.masks: Masks | None = None
        self.strength = 1.0  # multiplies every λ: what a budget controller steers
        self.layer_strength: dict[str, float] = {}  # further multiplies a layer's λs (per-layer budgets; default 1)
        # (family name, kind) of :meth:`families` → one weight per group, shaped like the family's norms, that
        # multiplies the groups' λs (budget.weigh_by_cost_: each group's λ by its cost); absent: 1
        self.group_weights: dict[tuple[str, str], torch.Tensor] = {}

    def _join_norms(self, graph, spec: Mapping) -> None:
        """A layer with a model-wide ``filter`` λ whose output only an affine BatchNorm reads: its filter groups
        take in that BatchNorm's (γ_n, β_n), which decide channel n (the conv's own groups are scale-free
        under it). Layers whose filter λ a pattern sets, and BatchNorms a pattern regularises, are left alone."""
        if "filter" not in spec:
            return
        patterned = resolve_spec(self.model, {k: v for k, v in spec.items() if k not in KINDS})
        users = graph.consumers()
        regularised = {t.name for t in self.norm_terms}
        for t in self.terms:
            if "filter" in patterned.get(t.name, {}) or t.name not in graph.nodes or len(users[t.name]) != 1:
                continue
            after = graph.nodes[users[t.name][0]]
            if after.role == "norm" and after.name not in regularised and getattr(after.module, "weight", None) \
                    is not None and getattr(after.module, "bias", None) is not None:
                t.norm = after.module

    def _attention_heads(self, graph) -> None:
        """Each self-attention's heads, with its output projection's ``filter`` λ (heads are what it writes)."""
        by_name = {t.name: t for t in self.terms}
        for node in graph.nodes.values():
            t = by_name.get(f"{node.name}.out_proj")
            if node.role == "attention" and t is not None and "filter" in t.lambdas:
                self.heads.append(_Heads(t.name, t.module, node.module.num_heads, t.lambdas["filter"]))

    def _cross(self) -> list:
        """The groups that are not one layer's kind: coupled channels, attention heads."""
        return ([self.coupled] if self.coupled is not None else []) + self.heads

    @property
    def lambdas(self) -> dict[str, dict[str, float]]:
        """``{layer: {kind: λ}}`` for every regularised layer."""
        return {t.name: dict(t.lambdas) for t in self.terms + self.norm_terms}

    def penalty(self) -> torch.Tensor:
        """The differentiable group-Lasso term (zero once :meth:`freeze` turned it off)."""
        p = next(self.model.parameters(), None)
        total = torch.zeros((), device=p.device if p is not None else None)
        if not self.active:
            return total
        if self.terms:
            total = group_lasso([(t.module.weight, self._term_lambdas(t), _groups(t.module)) for t in self.terms],
                                compiled=self.compiled)
        for t in self.terms:
            if t.norm is not None:
                total = total + (self._lam(t.name, "filter", t.lambdas["filter"]) * t.filter_norms()).sum()
        for name, kind, grp in self._cross_named():
            total = total + (self._lam(name, kind, grp.lambdas) * grp.norms()).sum()
        for t in self.norm_terms:
            total = total + sum((self._lam(t.name, k, lam) * norm_group_norms(t.module, k)).sum()
                                for k, lam in t.lambdas.items())
        return total * self.strength if self.strength != 1.0 else total

    def _weighted(self, name: str, kind: str, lam):
        """The λ (a number, or one per group) of family ``(name, kind)``'s groups, times their
        :attr:`group_weights`."""
        w = self.group_weights.get((name, kind))
        return lam if w is None else lam * w

    def _lam(self, name: str, kind: str, lam):
        """:meth:`_weighted`, times layer ``name``'s strength (:attr:`layer_strength`)."""
        return self._weighted(name, kind, lam) * self.layer_strength.get(name, 1.0)

    def _term_lambdas(self, t: _Term) -> dict:
        """λ per kind of a layer's fused term and proximal step (see :meth:`_Term.effective`), weighted."""
        return {k: self._lam(t.name, k, v) for k, v in t.effective().items()}

    def _cross_named(self) -> list:
        """:meth:`_cross` as ``(family name, kind, groups)`` (the names and kinds of :meth:`families`)."""
        return [("coupled", grp.kind, grp) if grp is self.coupled else (grp.name, "head", grp)
                for grp in self._cross()]

    @torch.no_grad()
    def norms(self) -> dict[str, dict[str, torch.Tensor]]:
        """Detached group norms ``{layer: {kind: norms}}`` of the regularised kinds (the coupled
        groups' norms under the key ``"coupled"``, as ``{"channel": norms}``)."""
        out = {t.name: {k: t.filter_norms() if k == "filter" and t.norm is not None
                        else group_norms(t.module.weight, k, _groups(t.module)) for k in t.lambdas} for t in self.terms}
        out.update({t.name: {k: norm_group_norms(t.module, k) for k in t.lambdas} for t in self.norm_terms})
        if self.coupled is not None:
            out["coupled"] = {"channel": self.coupled.norms()}
        for h in self.heads:
            out[h.name]["head"] = h.norms()
        return out

    @torch.no_grad()
    def prox_step(self, lr: float | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Proximal map of the group term: w_g ← w_g · max(0, 1 − lr·λ/‖w_g‖₂), one kind after another.

        Gives exact zeros. Pass the step's ``lr``, or the ``optimizer`` to use each
        parameter's own learning rate.
        """
        if not self.active:
            return
        lrs = {}
        if optimizer is not None:
            lrs = {id(p): group["lr"] * self.strength for group in optimizer.param_groups for p in group["params"]}
        elif lr is None:
            raise ValueError("prox_step needs lr or optimizer")
        lr = None if lr is None else lr * self.strength  # the step's λ·lr, every λ times the strength
        for t in self.terms:
            w, g = t.module.weight, _groups(t.module)
            step = lrs.get(id(w), lr)
            if step is None:
                continue
            if t.norm is not None:
                t.scale_filters_(shrink_factor(t.filter_norms(), step * self._lam(t.name, "filter",
                                                                                   t.lambdas["filter"])))
            shrink_groups_(w, [(kind, step * lam) for kind, lam in self._term_lambdas(t).items()], g)
        for name, kind, grp in self._cross_named():
            steps = [v for v in (lrs.get(id(w), lr) for w in grp.weights()) if v is not None]
            if steps:  # one step size per group: the smallest of its layers'
                grp.scale_(shrink_factor(grp.norms(), min(steps) * self._lam(name, kind, grp.lambdas)))
        for t in self.norm_terms:
            m = t.module
            step = lrs.get(id(m.weight), lr)
            for kind, lam in ([] if step is None else t.lambdas.items()):
                _scale_norm_(m, shrink_factor(norm_group_norms(m, kind), step * self._lam(t.name, kind, lam)))

    @torch.no_grad()
    def zero_small_(self, threshold: float = 1e-4) -> None:
        """The paper's step after every update: regularised weights with |w| < threshold become 0."""
        for t in self.terms:
            w = t.module.weight
            w.masked_fill_(w.abs() < threshold, 0.0)
            if t.norm is not None:  # γ, β of the filter groups: channel n is zero once both are, so is W[n]
                for p in (t.norm.weight, t.norm.bias):
                    p.masked_fill_(p.abs() < threshold, 0.0)
                dead = t.norm.weight.eq(0) & t.norm.bias.eq(0)
                w[dead] = 0.0

    def families(self) -> list["_Family"]:
        """Every regularised group, as families of groups that one norm computation covers: a layer's groups of
        one kind (with a BatchNorm's γ/β where they join its filters), the coupled channels, a self-attention's
        heads, a BatchNorm's own groups. Each family can give its norms and zero some of its groups; its ``lam`` is
        the groups' λ times their :attr:`group_weights` (not times the strengths)."""
        out = []
        for t in self.terms:
            w, g = t.module.weight, _groups(t.module)
            if t.norm is not None:
                out.append(_Family(t.name, "filter", t.filter_norms, lambda s, t=t: t.scale_filters_((~s).to(
                    t.module.weight.dtype)), t.lambdas["filter"]))
            for kind, lam in t.effective().items():
                out.append(_Family(t.name, kind, lambda w=w, kind=kind, g=g: group_norms(w, kind, g, keepdim=True),
                                   lambda s, w=w, g=g: (v := group_view(w, g)).masked_fill_(s.expand_as(v), 0.0),
                                   lam))
        for name, kind, grp in self._cross_named():
            out.append(_Family(name, kind, grp.norms, lambda s, grp=grp: grp.scale_((~s).to(grp.weights()[0].dtype)),
                               grp.lambdas, grp.kind))
        for t in self.norm_terms:
            for kind, lam in t.lambdas.items():
                out.append(_Family(t.name, kind, lambda m=t.module, kind=kind: norm_group_norms(m, kind),
                                   lambda s, m=t.module: _scale_norm_(m, (~s).to(m.weight.dtype)), lam))
        for fam in out:  # each group's λ times its weight
            fam.lam = self._weighted(fam.name, fam.kind, fam.lam)
        return out

    @torch.no_grad()
    def zero_groups_(self, threshold: float | None = None,
                     relative: float | Mapping[str, float] | None = None) -> int:
        """Set every regularised group exactly to zero whose norm is below ``threshold``, or below
        ``relative`` times the largest norm of the same kind in the same layer (one fraction for
        every kind, or ``{kind: fraction}``; the coupled channel groups count as one layer).
        Returns how many groups it zeroed."""
        count = 0
        for fam in self.families():
            norms = fam.norms()
            s = _small(norms, threshold) if threshold is not None else torch.zeros_like(norms, dtype=torch.bool)
            r = relative.get(fam.threshold_kind) if isinstance(relative, Mapping) else relative
            if r and norms.numel():
                s |= _small(norms, r * norms.max())
            count += int(s.sum())
            fam.zero(s)
        return count

    def zero_masks(self) -> dict[str, torch.Tensor]:
        """Per layer, True where the weight lies in no zero structure (filter, channel, shape, depth,
        and filter2d where it is regularised); for a regularised BatchNorm, masks of its weight
        (γ, key: the layer name) and bias (β, key: ``name.bias``) that are False in zero groups."""
        out = {}
        for t in self.norm_terms:
            alive = torch.ones_like(t.module.weight, dtype=torch.bool)
            for kind in t.lambdas:
                alive &= (norm_group_norms(t.module, kind) > 0).expand_as(alive)
            out[t.name], out[f"{t.name}.bias"] = alive, alive.clone()
        names = {m: n for n, m in self.model.named_modules()}
        for t in self.terms:
            if t.norm is not None:  # the BatchNorm entries of a zero filter group stay zero too
                alive = t.filter_norms() > 0
                out[names[t.norm]], out[f"{names[t.norm]}.bias"] = alive, alive.clone()
        for t in self.terms:
            w, g = t.module.weight, _groups(t.module)
            kinds = _STRUCTURAL + (("filter2d",) if "filter2d" in t.lambdas else ())
            mask = torch.ones_like(w, dtype=torch.bool)
            for kind in kinds:
                mask &= nonzero_groups(w, kind, g)
            out[t.name] = mask
        for h in self.heads:  # a zero head's columns stay zero
            alive = h.norms() > 0
            out[h.name] &= alive.view(1, -1, 1).expand_as(h._view()).reshape(h.module.weight.shape)
        if self.coupled is not None:  # what writes a zero LayerNorm-ed channel stays zero (layer name: its weight)
            for name, alive in self.coupled.slice_masks().items():
                key = name[:-len(".weight")] if name.endswith(".weight") and name[:-len(".weight")] in out else name
                out[key] = out[key] & alive if key in out else alive
        return out

    def freeze(self) -> Masks:
        """Turn the group term off and freeze every zeroed structure at zero (for fine-tuning)."""
        self.active = False
        if self.masks is not None:
            self.masks.detach()
        self.masks = Masks(self.model, self.zero_masks())
        return self.masks

    def state_dict(self) -> dict:
        """λs, whether the term is on, and the masks (tensors), for checkpoints."""
        return {"lambdas": self.lambdas, "active": self.active,
                "masks": None if self.masks is None else self.masks.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        if state["lambdas"] != self.lambdas:
            raise ValueError(f"checkpoint λs {state['lambdas']} differ from this GroupLasso's {self.lambdas}")
        self.active = bool(state["active"])
        if self.masks is not None:
            self.masks.detach()
        self.masks = None if state.get("masks") is None else Masks(self.model, state["masks"])
