"""Exact compaction of the registered residual and ImageNet/CIFAR models with random zeroed structures."""
import pytest
import torch
from torch import nn

from structsparse import compact
from structsparse.compaction.surgery import ATOL, RTOL
from structsparse.zoo.models import build_model

pytestmark = pytest.mark.filterwarnings("ignore::structsparse.compaction.CollapseWarning")  # random zeros may zero everything


def zero_random_structures(model, seed):
    """Random BatchNorm statistics, then random zero filters, channels, shape columns and whole layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                for dim in (0, 1):
                    drop = (torch.rand(w.shape[dim], generator=g) < 0.25).nonzero().flatten()
                    w.index_fill_(dim, drop, 0.0)
                if w.dim() == 4 and float(torch.rand(1, generator=g)) < 0.3:
                    w.view(w.shape[0], -1)[:, torch.rand(w[0].numel(), generator=g) < 0.5] = 0
                if float(torch.rand(1, generator=g)) < 0.1:
                    w.zero_()
    return model.eval()


def assert_exact(model, c, x):
    with torch.no_grad():
        for inp in (x, torch.rand_like(x)):
            torch.testing.assert_close(c(inp), model(inp), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnets_compact_exactly(name, shortcut):
    torch.manual_seed(0)
    model = zero_random_structures(build_model(name, shortcut=shortcut), seed=len(name) + ord(shortcut))
    x = torch.rand(2, 3, 32, 32)
    c = compact(model, x)
    assert_exact(model, c, x)
    assert sum(p.numel() for p in c.parameters()) < sum(p.numel() for p in model.parameters())


def test_resnet20_with_one_channel_stem_compacts_exactly():
    model = zero_random_structures(build_model("resnet20", in_channels=1), seed=5)
    x = torch.rand(2, 1, 28, 28)
    assert_exact(model, compact(model, x), x)


def test_cifar_convnet_compacts_exactly():
    model = zero_random_structures(build_model("convnet_cifar"), seed=3)
    x = torch.rand(2, 3, 32, 32)
    assert_exact(model, compact(model, x), x)


@pytest.mark.parametrize("name", ["caffenet", "alexnet"])
def test_alexnet_compacts_exactly(name):
    torch.manual_seed(0)
    model = zero_random_structures(build_model(name, num_classes=20), seed=7)
    x = torch.rand(1, 3, 227, 227)
    assert_exact(model, compact(model, x), x)
