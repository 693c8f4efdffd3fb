"""Masks that keep zeroed weights at zero while a model is fine-tuned."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

__all__ = ["Masks"]


class Masks:
    """Boolean masks that keep zeroed weights at zero during fine-tuning.

    Gradients of masked weights are zeroed by hooks, and :meth:`apply_` re-zeroes the
    weights themselves (call it after each optimizer step; weight decay or momentum from
    an earlier phase could otherwise move them).
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]):
        self.model = model
        modules, params = dict(model.named_modules()), dict(model.named_parameters())
        self.masks, self._params = {}, {}
        for name, mask in masks.items():  # a layer name masks its weight; a parameter name, that parameter
            if name in modules and isinstance(getattr(modules[name], "weight", None), torch.Tensor):
                weight = modules[name].weight
            elif name in params:
                weight = params[name]
            else:
                raise KeyError(f"mask for unknown layer or parameter {name!r}")
            if tuple(mask.shape) != tuple(weight.shape):
                raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight has {tuple(weight.shape)}")
            self.masks[name] = mask.to(device=weight.device, dtype=torch.bool)
            self._params[name] = weight
        self._handles = []
        self.attach()

    def attach(self) -> None:
        self.detach()
        for name, param in self._params.items():
            mask = self.masks[name]
            self._handles.append(param.register_hook(lambda g, m=mask: g * m))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @torch.no_grad()
    def apply_(self) -> None:
        for name, param in self._params.items():
            param.mul_(self.masks[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: mask.clone() for name, mask in self.masks.items()}

    def kept_fraction(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)
