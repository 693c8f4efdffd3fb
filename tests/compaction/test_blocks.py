"""Hand-written replicas of the blocks of torchvision's and timm's CNNs, each compacted exactly, saved,
loaded and exported: what the zoo benchmark checks on the real models."""
import pytest
import torch
from torch import nn

from structsparse import compact, load_compact, save_compact
from structsparse.graph import channel_units, trace_graph

from helpers import check_exact, randomize

pytestmark = pytest.mark.usefixtures("one_thread")


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expand, 3×3 depthwise, 1×1 project, with a residual add."""

    def __init__(self, c=8, expand=4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(), InvertedResidual())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def _roundtrip(model, small, x, tmp_path):
    loaded = load_compact(save_compact(small, tmp_path / "m"))
    check_exact(model, loaded, x)
    return loaded


def test_depthwise_convs_pass_channels_through_and_lose_the_unread_ones(tmp_path):
    model = randomize(MobileNetish())
    with torch.no_grad():
        model.blocks[0].project[0].weight[:, 5:20] = 0        # 15 hidden channels nobody reads
        model.blocks[1].dw[0].weight[3:9] = 0                 # 6 depthwise filters zero: their bias (BN shift) only
    x = torch.rand(2, 3, 16, 16)
    units = channel_units(trace_graph(model, x))
    hidden = units.of["blocks.0.dw.0"]
    assert torch.equal(hidden, units.of["blocks.0.expand.0"]) and not bool(units.pinned[hidden].any())
    small = compact(model, x)
    check_exact(model, small, x)
    m = dict(small.named_modules())
    assert m["blocks.0.dw.0"].weight.shape[0] == m["blocks.0.dw.0"].groups == 32 - 15
    assert m["blocks.0.expand.0"].out_channels == 17 and m["blocks.0.project.0"].in_channels == 17
    assert m["blocks.1.dw.0"].out_channels == 32 - 6 and m["blocks.1.expand.0"].out_channels == 26
    _roundtrip(model, small, x, tmp_path)


def test_a_conv_with_a_channel_multiplier_is_not_depthwise_and_keeps_its_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 8, 3, groups=4), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    with torch.no_grad():
        model[3].weight[:, :16] = 0
    x = torch.rand(2, 3, 6, 6)
    small = compact(model, x)
    check_exact(model, small, x)
    layers = dict(small.named_modules())
    assert layers["1"].groups == 4 and layers["0"].out_channels == 4


def test_group_lasso_on_depthwise_blocks_zeroes_what_compaction_removes():
    """Proximal steps on the projections' channel groups zero hidden channels; compaction removes them from
    the expand conv, its BatchNorm and the depthwise conv alike."""
    from structsparse import GroupLasso
    torch.manual_seed(0)
    model = randomize(MobileNetish())
    x = torch.rand(2, 3, 16, 16)
    gl = GroupLasso(model, {"blocks.*.project.0": {"channel": 0.25}}, example_input=x)
    gl.penalty().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    gl.prox_step(lr=1.0)
    zero = model.blocks[0].project[0].weight.detach().flatten(1).ne(0).any(0).logical_not().sum()
    assert 0 < int(zero) < 32
    small = compact(model, x)
    check_exact(model, small, x)
    assert dict(small.named_modules())["blocks.0.dw.0"].out_channels == 32 - int(zero)
