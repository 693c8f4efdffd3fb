"""Small builders shared by several test files (importable because tests/ is on sys.path under pytest)."""
from pathlib import Path

import numpy as np
import torch
from torch import nn

from structsparse.compaction.surgery import ATOL, RTOL
from structsparse.zoo.models import BasicBlock as Block


def write_tiny_mnist(root: Path, sizes=(256, 100, 100), seed: int = 0) -> None:
    """A learnable stand-in for MNIST in data.py's cache format (uint8 N×28×28 images and labels):
    noise plus a bright bar whose position encodes the label."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(y):
            x[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 250
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "mnist.npz", **arrays)


class TinyResNet(nn.Module):
    """A two-stage CIFAR-style ResNet small enough for exact compaction tests."""

    def __init__(self, shortcut="A"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.layer2 = nn.Sequential(Block(8, 16, 2, shortcut), Block(16, 16))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.flatten(self.pool(x)))


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
        if isinstance(m, nn.LayerNorm) and m.weight is not None and m.bias is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model.eval()


def check_exact(model, c, x):
    model.eval()
    with torch.no_grad():
        for inp in (x, torch.rand_like(x), torch.randn_like(x) * 3):
            torch.testing.assert_close(c(inp), model(inp), rtol=RTOL, atol=ATOL)


def params(m):
    return sum(p.numel() for p in m.parameters())


def proportional_table(model, x, batch=1, *args, **kwargs):
    """A :class:`LatencyTable` for ``model`` at ``batch`` whose times are 1 ns per multiply-add and per activation
    element, with no fixed costs (a measured one depends on the machine's load: a budget test on it could not be
    relied on). Takes :meth:`LatencyTable.build`'s arguments, so it can stand in for it."""
    from structsparse import compact
    from structsparse.speed.table import LatencyTable, _leaf_inputs, _leaf_macs
    dense = compact(model, x, channels_last=False)
    xb = torch.rand(batch, *x.shape[1:])
    layers = {name: [[1, 1e-9], [macs, macs * 1e-9]] for name, macs in _leaf_macs(dense, xb).items()}
    elements = _leaf_inputs(dense, xb)[1]
    return LatencyTable(batch, "cpu", 1, torch.__version__, layers, [[1, 1e-9], [elements, elements * 1e-9]], 1e-3,
                        list(x.shape[1:]))
