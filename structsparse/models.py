"""Models of the paper's MNIST experiments, as plain ``nn.Module`` s, and a name registry.

MNIST models take ``N×1×28×28`` float tensors in [0, 1], exactly as the data loaders
return them; there is no separate normalisation step, so a saved model is self-contained.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["LeNet", "MLP", "MODELS", "build_model"]


class LeNet(nn.Module):
    """Caffe's LeNet: conv1 20@5×5 → maxpool 2 → conv2 50@5×5 → maxpool 2 → fc1 500 → ReLU → fc2.

    As in Caffe, there is no non-linearity after the convolutions.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.relu(self.fc1(self.flatten(x)))
        return self.fc2(x)


class MLP(nn.Module):
    """The paper's MNIST MLP 784-500-300-10 with ReLU (layers fc1, fc2, fc3)."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: tuple[int, int] = (500, 300)):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


MODELS: dict[str, Callable[..., nn.Module]] = {"lenet": LeNet, "mlp": MLP}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; an unknown name is an error listing the known ones."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None
    return factory(**kwargs)
