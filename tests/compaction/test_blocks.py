"""Hand-written replicas of the blocks of torchvision's and timm's CNNs, each compacted exactly, saved,
loaded and exported: what the zoo benchmark checks on the real models."""
import importlib.util

import pytest
import torch
from torch import nn

from structsparse import compact, export_onnx, load_compact, save_compact
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
    """Saved and loaded, the compact model still gives the original's outputs; it exports to ONNX, checked
    against ONNX Runtime where that is installed."""
    loaded = load_compact(save_compact(small, tmp_path / "m"))
    check_exact(model, loaded, x)
    if importlib.util.find_spec("onnxscript") or importlib.util.find_spec("onnx"):
        export_onnx(loaded, x, tmp_path / "m.onnx")
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


class SqueezeExcite(nn.Module):
    """torchvision's SqueezeExcitation: pool, reduce, expand, gate, ``scale * x``."""

    def __init__(self, c, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.activation, self.scale_activation = nn.SiLU(), nn.Hardsigmoid()

    def forward(self, x):
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class MBConv(nn.Module):
    """EfficientNet's block: expand, depthwise, squeeze-excite, project; pooled by ``mean`` in the head."""

    def __init__(self, c=8, expand=4):
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.se = SqueezeExcite(h, 4)
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.se(self.dw(self.expand(x))))


class EfficientNetish(nn.Module):
    def __init__(self, keepdim=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(), MBConv())
        self.fc = nn.Linear(8, 5)
        self.keepdim = keepdim

    def forward(self, x):
        x = torch.cat([self.blocks(self.stem(x))], 1)        # a one-tensor cat, as densenet writes it
        x = x.mean((2, 3), keepdim=self.keepdim)
        return self.fc(x.flatten(1) if self.keepdim else x)


@pytest.mark.parametrize("keepdim", [False, True])
def test_squeeze_excite_gates_tie_each_channel_to_its_gate(keepdim, tmp_path):
    model = randomize(EfficientNetish(keepdim))
    with torch.no_grad():
        model.blocks[0].project[0].weight[:, 4:14] = 0      # 10 hidden channels that neither the projection
        model.blocks[0].se.fc1.weight[:, 4:14] = 0          # nor the squeeze reads: gone with their gates
    x = torch.rand(2, 3, 16, 16)
    units = channel_units(trace_graph(model, x))
    hidden = units.of["blocks.0.dw.0"]
    assert torch.equal(units.of["blocks.0.se.fc2"], hidden) and not bool(units.pinned[hidden].any())
    small = compact(model, x)
    check_exact(model, small, x)
    m = dict(small.named_modules())
    assert m["blocks.0.dw.0"].out_channels == 22 and m["blocks.0.se.fc2"].out_channels == 22
    assert m["blocks.0.se.fc1"].in_channels == 22 and m["blocks.0.expand.0"].out_channels == 22
    _roundtrip(model, small, x, tmp_path)


def test_a_gate_broadcast_over_channels_keeps_the_gates_channel():
    class SpatialGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gate, self.fc = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 1, 1), nn.Linear(6, 2)

        def forward(self, x):
            y = self.conv(x)
            return self.fc((y * torch.sigmoid(self.gate(y))).amax((2, 3)))

    model = SpatialGate().eval()
    with torch.no_grad():
        model.fc.weight[:, 1:3] = 0
        model.gate.weight[:, 4] = 0
    x = torch.rand(2, 3, 8, 8)
    small = compact(model, x)
    check_exact(model, small, x)
    m = dict(small.named_modules())
    assert m["gate"].out_channels == 1 and m["conv"].out_channels == 6   # channels 1, 2 feed the gate: kept


def test_reductions_over_channels_are_named():
    class ChannelMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean(1)

    from structsparse.graph import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="only reductions over positions"):
        compact(ChannelMean(), torch.rand(1, 3, 6, 6))


def stochastic_depth(x, p: float, mode: str, training: bool = True):
    """A drop-path function as torchvision writes one (``torch.fx.wrap``-ed, a ``training`` flag)."""
    if not training or p == 0:
        return x
    keep = torch.empty([x.shape[0]] + [1] * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


torch.fx.wrap("stochastic_depth")


class DropPathBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Linear(4, 2)

    def forward(self, x):
        x = x + stochastic_depth(self.conv2(torch.relu(self.conv1(x))), 0.2, "row", self.training)
        return self.fc(x.mean((2, 3)))


def test_drop_path_is_the_identity_of_inference_even_when_the_model_trains():
    from structsparse import GroupLasso
    model = DropPathBlock().train()
    with torch.no_grad():
        model.conv1.weight[1] = 0
        model.conv2.weight[:, 1] = 0
    x = torch.rand(2, 4, 6, 6)
    GroupLasso(model, {"channel": 1e-3}, example_input=x).penalty().backward()   # traced in train mode
    assert model.training and model.conv1.training
    small = compact(model, x)
    check_exact(model, small, x)
    assert dict(small.named_modules())["conv1"].out_channels == 3


class GroupedBottleneck(nn.Module):
    """RegNet's / ResNeXt's block: 1×1, grouped 3×3, 1×1, with BatchNorm and a residual add."""

    def __init__(self, c=8, width=16, groups=4):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=groups, bias=False),
                               nn.BatchNorm2d(width), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.c(self.b(self.a(x))))


class RegNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = GroupedBottleneck()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean((2, 3)))


def test_grouped_convs_lose_the_same_number_of_channels_in_every_group(tmp_path):
    model = randomize(RegNetish())
    with torch.no_grad():
        # outputs of the grouped conv nobody reads: 2, 1, 3 and 1 in its four groups of 4 -> one per group goes
        model.block.c[0].weight[:, [0, 1, 4, 8, 9, 10, 12]] = 0
        # inputs: filters of the first conv zeroed with their BatchNorm: exact zeros, 1, 2, 1, 1 per group
        for i in (1, 5, 6, 10, 15):
            model.block.a[0].weight[i] = 0
            model.block.a[1].weight[i] = model.block.a[1].bias[i] = 0
    x = torch.rand(2, 3, 8, 8)
    small = compact(model, x)
    check_exact(model, small, x)
    m = dict(small.named_modules())
    b = m["block.b.0"]
    assert b.groups == 4 and b.out_channels == 12 and b.in_channels == 12 and m["block.a.0"].out_channels == 12
    assert m["block.c.0"].in_channels == 12
    _roundtrip(model, small, x, tmp_path)


def test_group_lasso_reads_a_grouped_convs_columns_per_input_channel():
    from structsparse import GroupLasso, group_norms
    model = randomize(RegNetish())
    x = torch.rand(2, 3, 8, 8)
    gl = GroupLasso(model, {"channel": 0.1}, example_input=x)
    gl.penalty().backward()
    assert torch.isfinite(model.block.b[0].weight.grad).all()
    before = group_norms(model.block.b[0].weight.detach(), "channel", 4)
    gl.prox_step(lr=3.0)
    after = group_norms(model.block.b[0].weight.detach(), "channel", 4)
    assert after.numel() == 16 and bool((after < before).all())   # one group per (conv group, column)
    small = compact(model, x)   # (a collapse to a constant would warn, and fail this test: see pyproject.toml)
    check_exact(model, small, x)


def test_a_channel_read_by_a_grouped_conv_and_another_layer_is_one_coupled_group():
    from structsparse import GroupLasso
    from structsparse.sparsity.groups import CoupledChannels

    class Fork(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 1)
            self.g, self.p, self.fc = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 1), nn.Linear(8, 2)

        def forward(self, x):
            y = self.stem(x)
            return self.fc((self.g(y) + self.p(y)).mean((2, 3)))

    x = torch.rand(2, 3, 6, 6)
    for lr, zero, kept in ((17.0, [4, 5, 7], 8), (18.0, [0, 2, 3, 4, 5, 6, 7], 2)):
        torch.manual_seed(0)
        model = Fork().eval()
        gl = GroupLasso(model, {"p": {"channel": 0.05}}, example_input=x)   # the coupled groups take p's λ
        assert gl.coupled is not None and {n for n, _, _ in gl.coupled.members} == {"g", "p"}
        w = model.g.weight.detach()
        assert torch.allclose(CoupledChannels._column_sq(model.g)[5], (w[4:, 1] ** 2).sum())  # column 1 of group 2
        gl.penalty().backward()
        gl.prox_step(lr=lr)
        assert (gl.coupled.norms() == 0).nonzero().flatten().tolist() == zero
        small = compact(model, x)
        check_exact(model, small, x)
        m = dict(small.named_modules())   # uneven zeros (0 and 3 per group) keep all; 3 and 4 lose 3 per group
        assert m["stem"].out_channels == kept and m["g"].in_channels == kept and m["g"].groups == 2
