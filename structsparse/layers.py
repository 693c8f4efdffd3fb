"""Small modules that residual graphs and their compact forms are made of.

``ChannelPad`` is the CIFAR ResNets' option-A shortcut (subsample, then put the channels
among zero channels); ``Add``, ``Cat`` and ``Constant`` are the multi-input steps and the
folded constants of compact graphs. All are plain modules that torch.fx treats as leaves.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ChannelPad", "Add", "Cat", "Constant"]


class ChannelPad(nn.Module):
    """``x[:, :, ::stride, ::stride]`` written into channels ``index`` of ``out_channels`` zero channels.

    ``ChannelPad.centered(in_channels, out_channels, stride)`` is the option-A shortcut of
    He et al.'s CIFAR ResNets (the input in the middle, zeros on both sides).
    """

    def __init__(self, out_channels: int, index: torch.Tensor | list[int], stride: int = 1):
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if out_channels < 1 or stride < 1:
            raise ValueError(f"ChannelPad needs out_channels >= 1 and stride >= 1, got {out_channels}, {stride}")
        self.out_channels, self.stride = int(out_channels), int(stride)
        self.register_buffer("index", index)

    @classmethod
    def centered(cls, in_channels: int, out_channels: int, stride: int = 1) -> "ChannelPad":
        before = (out_channels - in_channels) // 2
        return cls(out_channels, torch.arange(before, before + in_channels), stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        out = x.new_zeros(x.shape[0], self.out_channels, *x.shape[2:])
        return out.index_copy(1, self.index, x)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} → {self.out_channels} channels, stride={self.stride}"


class Add(nn.Module):
    """The sum of its inputs (a residual add)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Cat(nn.Module):
    """Concatenation of its inputs along ``dim``."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = int(dim)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Constant(nn.Module):
    """An input-independent tensor (one sample's worth, ``value``), repeated over the batch of its input."""

    def __init__(self, shape: list[int] | tuple[int, ...]):
        super().__init__()
        self.register_buffer("value", torch.zeros(tuple(shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], *self.value.shape)

    def extra_repr(self) -> str:
        return f"shape={list(self.value.shape)}"
