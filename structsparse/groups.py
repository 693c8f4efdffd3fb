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

__all__ = ["KINDS", "group_norms", "group_view", "nonzero_groups", "covered_modules"]

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
    return torch.linalg.vector_norm(group_view(weight, groups), ord=2, dim=dims, keepdim=keepdim)


def nonzero_groups(weight: torch.Tensor, kind: str, groups: int = 1) -> torch.Tensor:
    """Boolean mask, same shape as ``weight``: True where the element's ``kind`` group is not all zero."""
    with torch.no_grad():
        alive = group_norms(weight, kind, groups, keepdim=True) > 0
        return alive.expand_as(group_view(weight, groups)).reshape(weight.shape)
