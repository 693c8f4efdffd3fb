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

import torch
from torch import nn

__all__ = ["KINDS", "group_norms", "group_view", "nonzero_groups", "covered_modules", "group_lasso"]

KINDS = ("filter", "channel", "shape", "depth", "filter2d")

# Dimensions reduced to get one norm per group, for each weight view.
_CONV = {"filter": (1, 2, 3), "channel": (0, 2, 3), "shape": (0,), "filter2d": (2, 3), "depth": (0, 1, 2, 3)}
_GROUPED = {"filter": (2, 3, 4), "channel": (1, 3, 4), "shape": (1,), "filter2d": (3, 4), "depth": (0, 1, 2, 3, 4)}
_LINEAR = {"filter": (1,), "channel": (0,), "shape": (0,), "filter2d": None, "depth": (0, 1)}


def covered_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose weights SSL groups can cover: every ``nn.Conv2d`` and ``nn.Linear``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


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


class _GroupLasso(torch.autograd.Function):
    """Σ_layers Σ_kinds λ_k Σ_g ‖w_g‖₂, fused into one autograd node: each weight is squared
    once, reduced once per distinct set of dims, and its backward is w · Σ_k λ_k/‖w_g‖
    (0 for an all-zero group) with one full-size allocation."""

    @staticmethod
    def forward(ctx, specs, *weights):
        total = weights[0].new_zeros(())
        saved = []
        for (groups, terms), weight in zip(specs, weights):
            view = group_view(weight, groups)
            sq = view * view
            for dims, lam in terms:
                n = sq.sum(dims, keepdim=True).sqrt_() if dims is not None else view.abs()
                total += lam * n.sum()
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


def _merged_terms(weight: torch.Tensor, lambdas: dict[str, float], groups: int) -> list:
    merged: dict = {}
    for kind, lam in lambdas.items():
        if lam:
            dims = _dims(weight.dim(), kind, groups)
            merged[dims] = merged.get(dims, 0.0) + float(lam)
    return list(merged.items())


def group_lasso(layers: list[tuple[torch.Tensor, dict[str, float], int]]) -> torch.Tensor:
    """Σ over ``(weight, {kind: λ}, groups)`` of Σ_kinds λ · Σ_groups ‖w_g‖₂, differentiable.

    Equal to ``sum(λ * group_norms(weight, kind, groups).sum())``, with the same gradient
    (exactly zero for an all-zero group), but computed as one fused autograd node: each
    weight is squared once, kinds that reduce the same dims (channel and shape of a Linear
    layer) are merged, and the backward is a single pass per weight.
    """
    specs, weights = [], []
    for weight, lambdas, groups in layers:
        terms = _merged_terms(weight, lambdas, groups)
        if terms:
            specs.append((groups, terms))
            weights.append(weight)
    if not weights:
        return torch.zeros(())
    return _GroupLasso.apply(specs, *weights)
