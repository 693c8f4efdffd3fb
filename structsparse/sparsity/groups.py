"""What one SSL group is, for each group kind, and its norms computed vectorised per layer.

A conv weight ``W`` (N filters × C channels × M × K) is viewed, as Caffe lowers it, as a
matrix with N rows and C·M·K columns:

========== ======================= ==================================
kind       one group (Conv2d)      one group (Linear, N outputs × C inputs)
========== ======================= ==================================
filter     W[n, :, :, :] (a row)   W[n, :] (an output neuron)
channel    W[:, c, :, :]           W[:, c] (an input neuron)
shape      W[:, c, m, k] (column)  W[:, c] (an input neuron)
filter2d   W[n, c, :, :]           W[n, c] (one weight)
depth      W (the whole layer)     W
========== ======================= ==================================

For a grouped conv (``groups=G``), channel and shape groups are taken within each conv
group: the weight is viewed as G × N/G × C/G × M × K and a channel group is one input
channel of one conv group.

Every group's norm is one reduction over a view of the weight, never a Python loop.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["KINDS", "NORM_KINDS", "group_norms", "group_view", "nonzero_groups", "covered_modules",
           "normalization_modules", "norm_group_norms", "group_lasso", "CoupledChannels", "coupled_channels", "safe_sqrt",
           "layernormed_units", "unit_slices", "shrink_groups_", "shrink_factor"]

KINDS = ("filter", "channel", "shape", "depth", "filter2d")

# Dimensions reduced to get one norm per group, for each weight view.
_CONV = {"filter": (1, 2, 3), "channel": (0, 2, 3), "shape": (0,), "filter2d": (2, 3), "depth": (0, 1, 2, 3)}
_GROUPED = {"filter": (2, 3, 4), "channel": (1, 3, 4), "shape": (1,), "filter2d": (3, 4), "depth": (0, 1, 2, 3, 4)}
_LINEAR = {"filter": (1,), "channel": (0,), "shape": (0,), "filter2d": None, "depth": (0, 1)}


def covered_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose weights SSL groups can cover: every ``nn.Conv2d`` and ``nn.Linear``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def safe_sqrt(sq: torch.Tensor) -> torch.Tensor:
    """√sq for sums of squares, with gradient 0 (not NaN or inf) where sq is 0."""
    return torch.where(sq > 0, sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt(), torch.zeros_like(sq))


# Group kinds of a BatchNorm layer, when a spec pattern names one: one channel's (γ_c, β_c), or all of them.
NORM_KINDS = ("filter", "depth")


def normalization_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The affine BatchNorm layers, whose (γ, β) a spec *pattern* may regularise (never model-wide kinds)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.bias is not None}


def norm_group_norms(module: nn.Module, kind: str) -> torch.Tensor:
    """Norms of a BatchNorm layer's groups: ``filter`` → ‖(γ_c, β_c)‖ per channel, ``depth`` → ‖(γ, β)‖.

    Differentiable, with gradient 0 (not NaN) at all-zero groups. A zero group makes the
    layer's output exactly zero in that channel (or everywhere), whatever its input.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"BatchNorm groups are {' and '.join(NORM_KINDS)}, got {kind!r}")
    sq = module.weight * module.weight + module.bias * module.bias
    if kind == "depth":
        sq = sq.sum()
    return safe_sqrt(sq)


def group_view(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The view of ``weight`` that :func:`group_norms` reduces: 5-D for a grouped conv."""
    if weight.dim() == 4 and groups > 1:
        n = weight.shape[0]
        return weight.view(groups, n // groups, *weight.shape[1:])
    return weight


def _dims(weight_dim: int, kind: str, groups: int):
    if kind not in KINDS:
        raise ValueError(f"unknown group kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if weight_dim == 2:
        return _LINEAR[kind]
    if weight_dim == 4:
        return (_GROUPED if groups > 1 else _CONV)[kind]
    raise ValueError(f"SSL groups are defined for 2-D (Linear) and 4-D (Conv2d) weights, got {weight_dim}-D")


def group_norms(weight: torch.Tensor, kind: str, groups: int = 1, keepdim: bool = False) -> torch.Tensor:
    """Euclidean norm (not squared) of every group of ``kind`` in ``weight``.

    Differentiable; the gradient of an all-zero group is exactly zero, never NaN.
    With ``keepdim=True`` the result broadcasts against ``group_view(weight, groups)``.
    Shapes without keepdim: filter → (N,), channel → (C,) or (G, C/G), shape → (C, M, K)
    or (G, C/G, M, K), filter2d → (N, C), depth → ().
    """
    dims = _dims(weight.dim(), kind, groups)
    if dims is None:  # filter2d of a Linear layer: single weights
        return weight.abs()
    view = group_view(weight, groups)
    if torch.is_grad_enabled() and weight.requires_grad:
        return torch.linalg.vector_norm(view, ord=2, dim=dims, keepdim=keepdim)
    # No gradient needed: square-then-sum is several times faster than vector_norm over dim 0.
    return (view * view).sum(dims, keepdim=keepdim).sqrt_()


def nonzero_groups(weight: torch.Tensor, kind: str, groups: int = 1) -> torch.Tensor:
    """Boolean mask, same shape as ``weight``: True where the element's ``kind`` group is not all zero."""
    with torch.no_grad():
        alive = group_norms(weight, kind, groups, keepdim=True) > 0
        return alive.expand_as(group_view(weight, groups)).reshape(weight.shape)


def shrink_factor(norms: torch.Tensor, step) -> torch.Tensor:
    """The group soft-threshold factor max(0, 1 − step/‖w_g‖) (0 for all-zero groups)."""
    return (1 - step / norms.clamp_min(torch.finfo(norms.dtype).tiny)).clamp_min_(0)


# Kinds whose groups are whole rows, whole columns or all of the (filters × columns) matrix of a weight.
_FACTORED = ("filter", "channel", "shape", "depth")
# Below this many weights, shrinking kind by kind takes fewer (tiny) tensor operations than the factored way.
_FACTORED_FROM = 1 << 16


@torch.no_grad()
def shrink_groups_(weight: torch.Tensor, steps: list[tuple[str, object]], groups: int = 1) -> None:
    """The proximal map of each kind's term, one kind after another in the order of ``steps``
    (``[(kind, lr·λ)]``; lr·λ a number, or a tensor shaped like ``group_norms(..., keepdim=True)``):
    w_g ← w_g · max(0, 1 − lr·λ/‖w_g‖₂).

    Filter, channel, shape and depth groups are whole rows, whole columns or all of the weight
    seen as a (filters × columns) matrix per conv group, so after any sequence of their steps the
    weight is W ⊙ (r ⊗ q) for a row scale r and a column scale q. For a large weight every norm
    then comes from one square of W and a matrix-vector product, and W is scaled once at the end,
    instead of a square and a scaling per kind (12% faster on LeNet's fc1 with filter, channel and
    shape steps, 21% on a 2048×512 weight). Small weights, where the count of tensor operations
    decides, and filter2d groups shrink kind by kind.
    """
    view = group_view(weight, groups)
    steps = _adjacent_merged(weight, steps, groups)
    if weight.numel() < _FACTORED_FROM or any(kind not in _FACTORED for kind, _ in steps):
        for kind, step in steps:
            view.mul_(shrink_factor(group_norms(weight, kind, groups, keepdim=True), step))
        return
    g = groups if weight.dim() == 4 and groups > 1 else 1
    channels = weight.shape[1] if weight.dim() == 2 else view.shape[-3]
    mat = view.reshape(g, weight.shape[0] // g, -1)  # a view of the weight unless it is not contiguous
    sq = mat * mat
    r, q = sq.new_ones(g, mat.shape[1], 1), sq.new_ones(g, 1, mat.shape[2])  # row and column scales
    for kind, step in steps:
        rows = kind in ("filter", "depth")
        if rows:
            norms = r * r * torch.matmul(sq, (q * q).transpose(1, 2))
            norms = norms.sum(dim=(0, 1, 2), keepdim=True) if kind == "depth" else norms
        else:
            cols = (q * q * torch.matmul((r * r).transpose(1, 2), sq)).view(g, channels, -1)
            norms = cols.sum(2, keepdim=True) if kind == "channel" else cols
        factor = shrink_factor(norms.sqrt_(), step.reshape(norms.shape) if isinstance(step, torch.Tensor) else step)
        if rows:
            r = r * factor
        else:
            q = q * factor.expand_as(cols).reshape(q.shape)
    mat.mul_(r).mul_(q)
    if mat.data_ptr() != view.data_ptr():
        view.copy_(mat.view(view.shape))


def _term_norms(specs: list, weights: tuple, root):
    """``(λ, norms)`` of every term of :func:`group_lasso`'s ``specs``: each weight squared once, reduced once per
    distinct set of dims, ``root`` taking the square root of the sums (λ is a number, or a tensor that broadcasts
    against the norms)."""
    for (groups, terms), weight in zip(specs, weights):
        view = group_view(weight, groups)
        sq = view * view
        for dims, lam in terms:
            yield lam, (root(sq.sum(dims, keepdim=True)) if dims is not None else view.abs())


def _lasso_sum(layout: tuple, scalars: torch.Tensor, tensors: list, *weights: torch.Tensor) -> torch.Tensor:
    """What :class:`_GroupLasso` computes, in plain differentiable operations (a zero group's gradient is 0 by
    :func:`safe_sqrt`): the form ``torch.compile`` fuses, forward and backward. ``layout`` is ``(groups, (dims,
    ...))`` per weight; term j's λ is ``tensors[j]`` where that is a tensor, else ``scalars[j]`` (all λ numbers in
    one tensor, so that a new λ is neither a new compilation nor many small tensors a call)."""
    specs, j = [], 0
    for groups, dims_list in layout:
        specs.append((groups, [(dims, tensors[j + i] if tensors[j + i] is not None else scalars[j + i])
                               for i, dims in enumerate(dims_list)]))
        j += len(dims_list)
    total = weights[0].new_zeros(())
    for lam, n in _term_norms(specs, weights, safe_sqrt):
        total = total + (lam * n).sum()
    return total


_COMPILED: dict = {}  # the compiled _lasso_sum, made on first use


def _compiled_sum(specs: list, weights: list) -> torch.Tensor:
    """:func:`_lasso_sum` of ``specs`` through ``torch.compile``; where compiling fails (no C++ compiler, say), a
    warning and the fused autograd node instead."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_lasso_sum)
    if _COMPILED["fn"] is not None:
        lams = [lam for _, terms in specs for _, lam in terms]
        scalars = torch.tensor([0.0 if isinstance(lam, torch.Tensor) else lam for lam in lams],
                               dtype=weights[0].dtype, device=weights[0].device)
        layout = tuple((g, tuple(dims for dims, _ in terms)) for g, terms in specs)
        try:
            return _COMPILED["fn"](layout, scalars, [lam if isinstance(lam, torch.Tensor) else None for lam in lams],
                                   *weights)
        except Exception as e:  # noqa: BLE001  compiling is an optimisation: say why it is off, and go on
            warnings.warn(f"group_lasso: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "the group term runs uncompiled", RuntimeWarning, stacklevel=3)
            _COMPILED["fn"] = None
    return _GroupLasso.apply(specs, *weights)


class _GroupLasso(torch.autograd.Function):
    """Σ_layers Σ_kinds λ_k Σ_g ‖w_g‖₂, fused into one autograd node: each weight is squared
    once, reduced once per distinct set of dims, and its backward is w · Σ_k λ_k/‖w_g‖
    (0 for an all-zero group) with one full-size allocation."""

    @staticmethod
    def forward(ctx, specs, *weights):
        total = weights[0].new_zeros(())
        saved = []
        for lam, n in _term_norms(specs, weights, torch.Tensor.sqrt_):
            total += (lam * n).sum() if isinstance(lam, torch.Tensor) else lam * n.sum()
            saved.append(n)
        ctx.specs = specs
        ctx.save_for_backward(*weights, *saved)
        return total

    @staticmethod
    def backward(ctx, grad):
        tensors = ctx.saved_tensors
        weights, norms = tensors[:len(ctx.specs)], iter(tensors[len(ctx.specs):])
        grads = []
        for (groups, terms), weight in zip(ctx.specs, weights):
            view = group_view(weight, groups)
            out = None
            for _, lam in terms:  # small coefficients, one full-size allocation
                n = next(norms)
                c = (grad * lam / n).nan_to_num_(0.0, 0.0, 0.0)  # λ/0 → 0 for all-zero groups
                out = view * c if out is None else out.addcmul_(view, c)
            grads.append(out.reshape(weight.shape))
        return (None, *grads)


def _adjacent_merged(weight: torch.Tensor, steps: list[tuple[str, object]], groups: int) -> list:
    """``steps`` with each run of kinds that are the same groups (channel and shape of a Linear layer) as one
    step of their summed lr·λ: shrinking a group by a, then by b, is shrinking it by a + b (its norm falls by a
    first), so this is exact and saves a pass over the weight (LeNet's fc1 and fc2)."""
    out: list = []
    for kind, step in steps:
        if out and _dims(weight.dim(), kind, groups) == _dims(weight.dim(), out[-1][0], groups):
            out[-1] = (out[-1][0], out[-1][1] + step)
        else:
            out.append((kind, step))
    return out


def _merged_terms(weight: torch.Tensor, lambdas: dict, groups: int) -> list:
    merged: dict = {}
    for kind, lam in lambdas.items():
        if isinstance(lam, torch.Tensor) or lam:
            dims = _dims(weight.dim(), kind, groups)
            merged[dims] = merged.get(dims, 0.0) + (lam if isinstance(lam, torch.Tensor) else float(lam))
    return list(merged.items())


def group_lasso(layers: list[tuple[torch.Tensor, dict[str, float], int]], compiled: bool = False) -> torch.Tensor:
    """Σ over ``(weight, {kind: λ}, groups)`` of Σ_kinds λ · Σ_groups ‖w_g‖₂, differentiable.

    A λ may also be a tensor of one λ per group, shaped like ``group_norms(..., keepdim=True)``.

    Equal to ``sum(λ * group_norms(weight, kind, groups).sum())``, with the same gradient
    (exactly zero for an all-zero group), but computed as one fused autograd node: each
    weight is squared once, kinds that reduce the same dims (channel and shape of a Linear
    layer) are merged, and the backward is a single pass per weight. With ``compiled``, the same sum in plain
    operations through ``torch.compile`` (fused kernels; the first call compiles, seconds).
    """
    specs, weights = [], []
    for weight, lambdas, groups in layers:
        terms = _merged_terms(weight, lambdas, groups)
        if terms:
            specs.append((groups, terms))
            weights.append(weight)
    if not weights:
        return torch.zeros(())
    return _compiled_sum(specs, weights) if compiled else _GroupLasso.apply(specs, *weights)


def _per_entry(per_group: torch.Tensor, ids: torch.Tensor, outside) -> torch.Tensor:
    """``per_group[ids]``, with ``outside`` where an entry is in no group (id -1)."""
    return torch.where(ids >= 0, per_group[ids.clamp_min(0)], torch.full_like(per_group[:1], outside))


class CoupledChannels:
    """Channel groups that span layers: one group per channel *unit* read by two or more layers.

    A channel of a residual stream is read by every block's first conv (and the classifier)
    and can only be removed when none of them reads it; its group is the input columns of
    all those readers (for a Linear after flatten, the columns of the channel's features).
    Built from :func:`structsparse.graph.channel_units`; ``lambdas[u]`` is the group's λ.
    """

    def __init__(self, members: list[tuple[str, nn.Module, torch.Tensor]], lambdas: torch.Tensor,
                 slices: list[tuple[str, nn.Parameter, int, torch.Tensor]] | None = None):
        self.members = members      # (layer name, module, unit index per input entry, -1 = not in a group)
        self.lambdas = lambdas
        self.slices = slices or []  # (parameter name, parameter, dim, unit index per entry along dim, or -1)

    kind = "channel"  # the kind whose thresholds GroupLasso.zero_groups_ applies

    def __len__(self) -> int:
        return self.lambdas.numel()

    def weights(self) -> list[torch.Tensor]:
        return [m.weight for _, m, _ in self.members] + [p for _, p, _, _ in self.slices]

    @staticmethod
    def _slice_sq(p: torch.Tensor, dim: int) -> torch.Tensor:
        return p.square().movedim(dim, 0).reshape(p.shape[dim], -1).sum(1)

    def slice_masks(self) -> dict[str, torch.Tensor]:
        """Per parameter of :attr:`slices`, False in the entries of zero groups."""
        alive = self.norms() > 0
        out = {}
        for name, p, dim, ids in self.slices:
            keep = _per_entry(alive, ids, True)
            out[name] = keep.view([-1 if d == dim else 1 for d in range(p.dim())]).expand_as(p).clone()
        return out

    @staticmethod
    def _channel_view(module: nn.Module) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The weight as :func:`group_norms` groups it, and the dims its ``channel`` groups reduce (for a
        grouped conv, input channel c is column c mod C/G of its group's filters)."""
        groups = getattr(module, "groups", 1)
        return group_view(module.weight, groups), _dims(module.weight.dim(), "channel", groups)

    @classmethod
    def _column_sq(cls, module: nn.Module) -> torch.Tensor:
        """Squared norm of the weights that read each input entry."""
        w, dims = cls._channel_view(module)
        return (w * w).sum(dims).flatten()

    def norms(self) -> torch.Tensor:
        """The groups' Euclidean norms; differentiable, with gradient 0 (not NaN) at all-zero groups."""
        device = self.lambdas.device
        sq = torch.zeros(len(self), device=device, dtype=self.members[0][1].weight.dtype if self.members else None)
        for _, module, ids in self.members:
            inside = ids >= 0
            sq = sq.index_add(0, ids[inside], self._column_sq(module)[inside])
        for _, p, dim, ids in self.slices:
            inside = ids >= 0
            sq = sq.index_add(0, ids[inside], self._slice_sq(p, dim)[inside])
        return safe_sqrt(sq)

    def penalty(self) -> torch.Tensor:
        return (self.lambdas * self.norms()).sum()

    @torch.no_grad()
    def scale_(self, scale: torch.Tensor) -> None:
        """Multiply every group's columns by its entry of ``scale``."""
        for _, module, ids in self.members:
            s = _per_entry(scale, ids, 1)
            w, dims = self._channel_view(module)
            w.mul_(s.view([1 if d in dims else n for d, n in enumerate(w.shape)]))
        for _, p, dim, ids in self.slices:
            s = _per_entry(scale, ids, 1)
            p.mul_(s.view([-1 if d == dim else 1 for d in range(p.dim())]))


def coupled_channels(model: nn.Module, example_input: torch.Tensor,
                     channel_lambdas: dict[str, float], graph=None) -> CoupledChannels | None:
    """The coupled channel groups of ``model`` (None if it has none with λ > 0).

    ``channel_lambdas`` maps layer names to their ``channel`` λ; a group's λ is the largest
    λ among the layers that read it. Pass ``graph`` (``trace_graph(model, example_input)``) if you have it.
    """
    from ..graph import channel_units, trace_graph  # graph imports nothing from here

    graph = graph if graph is not None else trace_graph(model, example_input)
    units = channel_units(graph)
    normalised = layernormed_units(graph, units)
    coupled = ((units.reader_count() >= 2) | normalised) & ~units.pinned
    lam = torch.zeros(units.count)
    for r in units.readers:
        ids = units.of_input[r][coupled[units.of_input[r]]]
        lam[ids] = torch.maximum(lam[ids], torch.tensor(float(channel_lambdas.get(r, 0.0))))
    keep = coupled & (lam > 0)
    if not bool(keep.any()):
        return None
    new_id = torch.full((units.count,), -1, dtype=torch.long)
    new_id[keep] = torch.arange(int(keep.sum()))
    members = [(r, graph.nodes[r].module, new_id[units.of_input[r]]) for r in units.readers
               if bool((new_id[units.of_input[r]] >= 0).any())]
    slices = [(n, p, dim, torch.where(normalised[ids], new_id[ids], -1)) for n, p, dim, ids
              in unit_slices(model, graph, units)]
    slices = [s for s in slices if bool((s[3] >= 0).any())]
    device = members[0][1].weight.device
    return CoupledChannels([(n, m, ids.to(device)) for n, m, ids in members], lam[keep].to(device),
                           [(n, p, dim, ids.to(device)) for n, p, dim, ids in slices])


def layernormed_units(graph, units) -> torch.Tensor:
    """True for each unit that a LayerNorm normalises over: it can only go where it is zero (constant) at every
    step, so its coupled group holds everything that writes it too (see :func:`unit_slices`)."""
    from ..graph.units import along, full_shape
    out = torch.zeros(units.count, dtype=torch.bool)
    for node in graph.nodes.values():
        if node.role == "layernorm" and len(node.module.normalized_shape) == 1:
            shape = full_shape(node.in_shapes[0], True)
            out[along(units.maps[node.inputs[0]], shape, len(shape) - 1)] = True
    return out


def unit_slices(model: nn.Module, graph, units) -> list[tuple[str, nn.Parameter, int, torch.Tensor]]:
    """The parameter entries that write each channel unit: the rows and biases of the Conv2d and Linear layers
    that write it, the γ and β of the BatchNorms and LayerNorms over it, a depthwise conv's filters and biases,
    a parameter read along it (a layer scale). One ``(parameter name, parameter, dim, unit per entry along
    dim)`` per parameter of ``model`` (parameters that are not the model's own are left out)."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for node in graph.nodes.values():
        if node.role in ("conv", "linear", "norm", "layernorm", "depthwise"):
            found = [(getattr(node.module, k, None), 0) for k in ("weight", "bias")]
        elif node.role == "param":
            found = [(node.module.value, units.dims[node.name])]
        else:
            continue
        ids = units.of[node.name]
        for p, dim in found:
            if id(p) in names and p.dim() > dim and p.shape[dim] == ids.numel() > 1:
                out.append((names[id(p)], p, dim, ids))
    return out
