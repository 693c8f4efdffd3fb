"""Models of the paper's experiments, as plain ``nn.Module`` s, and a name registry.

Every model takes float images in [0, 1] exactly as the data loaders return them (MNIST
``N×1×28×28``, CIFAR-10 ``N×3×32×32``, ImageNet ``N×3×227×227``); there is no separate
normalisation step, so a saved model is self-contained. Constructors share the signature
``(num_classes=10, in_channels=..., ...)``; :func:`build_model` builds one by its registry name.

* ``lenet``, ``mlp``: the MNIST models.
* ``resnet20``, ``resnet32``, ``resnet56``: He et al.'s CIFAR ResNets (``shortcut="A"`` or ``"B"``),
  written so that torch.fx sees every step as a module call (``conv``, ``bn``, ``relu``,
  ``shortcut``, ``add``).
* ``convnet_cifar``: the paper's CIFAR-10 ConvNet, Caffe's ``cifar10_full``.
* ``caffenet`` / ``alexnet``: CaffeNet for ImageNet (conv2/4/5 in two groups), and the same
  network with ``groups=1``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..layers import Add, ChannelPad, WithinChannelLRN
from ..paper import ALEXNET

__all__ = ["LeNet", "MLP", "BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet56", "ConvNetCifar",
           "WithinChannelLRN", "CaffeNet", "alexnet", "MODELS", "build_model"]


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
    """The paper's MNIST MLP 784-500-300-10 with ReLU (layers fc1, fc2, fc3).

    ``dropout`` > 0 adds dropout after each hidden ReLU (training only; the model computes the
    same function at inference, and compaction drops it).
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden: tuple[int, int] = (500, 300),
                 dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"MLP: dropout must be in [0, 1), got {dropout!r}")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.relu1 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.relu2 = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.relu1(self.fc1(self.flatten(x))))
        x = self.drop2(self.relu2(self.fc2(x)))
        return self.fc3(x)


# ----------------------------------------------------------------------------- CIFAR ResNets

class BasicBlock(nn.Module):
    """Two 3×3 conv + BN layers and a shortcut: ``relu2(add(bn2(conv2(relu1(bn1(conv1(x))))), shortcut(x)))``.

    The shortcut is ``nn.Identity`` when the shape is kept; when it changes (stride 2 or more
    channels) it is option A, a :class:`~structsparse.layers.ChannelPad` (subsample, then zero
    channels on both sides, no parameters), or option B, ``nn.Sequential(1×1 conv, BN)``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ChannelPad.centered(in_planes, planes, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        else:
            raise ValueError(f"unknown shortcut {shortcut!r}; valid: 'A' (zero-padded identity), 'B' (1×1 conv projection)")
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.shortcut(x)))


class CifarResNet(nn.Module):
    """He et al. (2016)'s CIFAR ResNet of depth ``6n + 2``.

    Stem ``conv1`` 3×3@16 + ``bn1`` + ``relu``; three stages ``layer1..3`` of ``n`` :class:`BasicBlock` s
    with 16, 32, 64 channels (the first block of stages 2 and 3 has stride 2); global average
    pool, ``fc``. ``shortcut`` is ``"A"`` (zero-padded identity, as in the paper's CIFAR
    experiments; ResNet-20 has 0.27M parameters) or ``"B"`` (projections where the shape
    changes). Conv weights are initialised as He et al. (``kaiming_normal_``, fan-out), BN to (1, 0).
    """

    def __init__(self, num_blocks: int = 3, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"unknown shortcut {shortcut!r}; valid: 'A' (zero-padded identity), 'B' (1×1 conv projection)")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(num_blocks):
                blocks.append(BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1, shortcut))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """ResNet-20 (3 blocks per stage)."""
    return CifarResNet(3, num_classes, in_channels, shortcut)


def resnet32(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """ResNet-32 (5 blocks per stage)."""
    return CifarResNet(5, num_classes, in_channels, shortcut)


def resnet56(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    """ResNet-56 (9 blocks per stage)."""
    return CifarResNet(9, num_classes, in_channels, shortcut)


# ----------------------------------------------------------------------------- CIFAR ConvNet

_LRN_KINDS = ("within_channel", "across_channels", "none")


def _lrn(kind: str, size: int, alpha: float, beta: float) -> nn.Module:
    if kind == "within_channel":
        return WithinChannelLRN(size, alpha, beta)
    if kind == "across_channels":
        return nn.LocalResponseNorm(size, alpha=alpha, beta=beta)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown lrn {kind!r}; valid: {', '.join(_LRN_KINDS)}")


class ConvNetCifar(nn.Module):
    """The paper's CIFAR-10 ConvNet, Caffe's ``cifar10_full`` (89,578 parameters):

    conv1 32@5×5 pad 2 → maxpool 3/2 → relu → LRN → conv2 32@5×5 pad 2 → relu → avgpool 3/2 →
    LRN → conv3 64@5×5 pad 2 → relu → avgpool 3/2 → fc 10.

    Pooling uses Caffe's rounding (``ceil_mode=True``: 32 → 16 → 8 → 4). ``lrn`` picks the
    normalisation: ``"within_channel"`` (default) is Caffe's ``WITHIN_CHANNEL`` LRN of that
    network (local_size 3, α 5e-5, β 0.75) as :class:`WithinChannelLRN`; ``"across_channels"``
    is ``nn.LocalResponseNorm(3, α, β)``; ``"none"`` drops it. Note that Caffe feeds this net
    mean-subtracted pixels in 0–255, where the LRN has some effect; on our [0, 1] inputs it is
    close to the identity. Weights use PyTorch's default initialisation, not Caffe's Gaussians.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, lrn: str = "within_channel"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.relu1 = nn.ReLU()
        self.norm1 = _lrn(lrn, 3, 5e-5, 0.75)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.AvgPool2d(3, 2, ceil_mode=True)
        self.norm2 = _lrn(lrn, 3, 5e-5, 0.75)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.AvgPool2d(3, 2, ceil_mode=True)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.relu1(self.pool1(self.conv1(x))))
        x = self.norm2(self.pool2(self.relu2(self.conv2(x))))
        x = self.pool3(self.relu3(self.conv3(x)))
        return self.fc(self.flatten(x))


# ----------------------------------------------------------------------------- ImageNet

class CaffeNet(nn.Module):
    """CaffeNet (Caffe's ``bvlc_reference_caffenet``, AlexNet with pooling before LRN) for 227×227 inputs.

    conv1 96@11×11/4 → relu → maxpool 3/2 → LRN → conv2 256@5×5 → relu → maxpool → LRN →
    conv3 384@3×3 → relu → conv4 384@3×3 → relu → conv5 256@3×3 → relu → maxpool → fc6 4096 →
    relu → dropout → fc7 4096 → relu → dropout → fc8. The conv shapes are those of
    :data:`structsparse.speed.layer_bench.ALEXNET`; conv2, conv4 and conv5 are split into ``groups``
    groups (2 in CaffeNet, 1 gives the single-GPU AlexNet). LRN is Caffe's
    ``ACROSS_CHANNELS`` (``nn.LocalResponseNorm(5, 1e-4, 0.75)``). Pools round up as Caffe
    does, so 224×224 inputs give the same 6×6 maps as 227×227.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, groups: int = 2, dropout: float = 0.5):
        super().__init__()
        if groups not in (1, 2):
            raise ValueError(f"groups must be 1 or 2, got {groups}")
        for i, s in enumerate(ALEXNET):
            cin = in_channels if i == 0 else s.in_channels
            setattr(self, s.name, nn.Conv2d(cin, s.out_channels, s.kernel, s.stride, s.padding,
                                            groups=groups if s.groups > 1 else 1))
            setattr(self, f"relu{i + 1}", nn.ReLU())
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.norm1 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.norm2 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)
        self.pool5 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.flatten = nn.Flatten()
        self.fc6 = nn.Linear(ALEXNET[-1].out_channels * 6 * 6, 4096)
        self.relu6 = nn.ReLU()
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(4096, 4096)
        self.relu7 = nn.ReLU()
        self.drop7 = nn.Dropout(dropout)
        self.fc8 = nn.Linear(4096, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.pool1(self.relu1(self.conv1(x))))
        x = self.norm2(self.pool2(self.relu2(self.conv2(x))))
        x = self.relu4(self.conv4(self.relu3(self.conv3(x))))
        x = self.pool5(self.relu5(self.conv5(x)))
        x = self.drop6(self.relu6(self.fc6(self.flatten(x))))
        x = self.drop7(self.relu7(self.fc7(x)))
        return self.fc8(x)


def alexnet(num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> CaffeNet:
    """:class:`CaffeNet` with ``groups=1`` (no two-GPU split)."""
    return CaffeNet(num_classes, in_channels, groups=1, dropout=dropout)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet, "mlp": MLP,
    "resnet20": resnet20, "resnet32": resnet32, "resnet56": resnet56,
    "convnet_cifar": ConvNetCifar, "caffenet": CaffeNet, "alexnet": alexnet,
}


MAX_PARAMETERS = 2 ** 30  # a model with more (over 4 GB of float weights) is refused before it is built


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name; an unknown name is an error listing the known ones, and arguments
    that would make more than :data:`MAX_PARAMETERS` parameters are refused (counted on the meta device)."""
    if not isinstance(name, str) or name not in MODELS:
        raise ValueError(f"unknown model {str(name)[:60]!r}; known models: {', '.join(sorted(MODELS))}")
    factory = MODELS[name]
    try:
        with torch.device("meta"):
            size = sum(t.numel() for t in factory(**kwargs).state_dict().values())
    except (RuntimeError, OverflowError, MemoryError) as e:
        raise ValueError(f"model {name!r} cannot be built with these arguments: {str(e)[:200]}") from None
    if size > MAX_PARAMETERS:
        raise ValueError(f"model {name!r} with these arguments would hold {size:,} numbers, more than "
                         f"{MAX_PARAMETERS:,}")
    return factory(**kwargs)
