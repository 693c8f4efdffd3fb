"""Hand-written replicas of the blocks of torchvision's and timm's CNNs, each compacted exactly, saved,
loaded and exported: what the zoo benchmark checks on the real models."""
import importlib.util

import pytest
import torch
from torch import nn

from structsparse import GroupLasso, compact, export_onnx, load_compact, save_compact
from structsparse.graph import channel_units, trace_graph
from structsparse.report import count_macs

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


def test_reductions_over_channels_pin_them():
    class ChannelMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).mean(1)

    units = channel_units(trace_graph(ChannelMean(), torch.rand(1, 3, 6, 6)))
    assert units.reasons[int(units.of["conv"][0])] == "mean: a reduction over channels mixes them"


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


def _balanced_regnetish() -> nn.Module:
    """RegNetish whose grouped conv keeps channels only so that every group loses as many."""
    model = randomize(RegNetish())
    with torch.no_grad():
        # outputs of the grouped conv nobody reads: 2, 1, 3 and 1 in its four groups of 4 -> one per group goes
        model.block.c[0].weight[:, [0, 1, 4, 8, 9, 10, 12]] = 0
        # inputs: filters of the first conv zeroed with their BatchNorm: exact zeros, 1, 2, 1, 1 per group
        for i in (1, 5, 6, 10, 15):
            model.block.a[0].weight[i] = 0
            model.block.a[1].weight[i] = model.block.a[1].bias[i] = 0
    return model


def test_grouped_convs_lose_the_same_number_of_channels_in_every_group(tmp_path):
    model = _balanced_regnetish()
    x = torch.rand(2, 3, 8, 8)
    small = compact(model, x)
    check_exact(model, small, x)
    m = dict(small.named_modules())
    b = m["block.b.0"]
    assert b.groups == 4 and b.out_channels == 12 and b.in_channels == 12
    # the channels kept only to balance the groups are cut around the conv: the first conv does not compute
    # input 6 (a ChannelPad puts its zero back), and the last conv does not read outputs 1, 9, 10 (an IndexSelect)
    assert m["block.a.0"].out_channels == 11 and m["block.c.0"].in_channels == 9
    steps = small.steps()
    names = [n for n, _ in steps]
    assert type(steps[names.index("block.b.0") - 1][1]).__name__ == "ChannelPad"
    assert any(type(mod).__name__ == "IndexSelect" for _, mod in steps)
    _roundtrip(model, small, x, tmp_path)


def test_grouped_keep_computes_the_balance_channels_instead_of_padding_them(tmp_path):
    model = _balanced_regnetish()
    x = torch.rand(2, 3, 8, 8)
    small = compact(model, x, grouped="keep")
    check_exact(model, small, x)
    m = dict(small.named_modules())
    assert m["block.b.0"].groups == 4 and m["block.b.0"].in_channels == m["block.b.0"].out_channels == 12
    # the first conv computes input 6 (its zeros), the last conv reads outputs 1, 9, 10: nothing is copied
    assert m["block.a.0"].out_channels == 12 and m["block.c.0"].in_channels == 12
    assert not any(type(mod).__name__ in ("ChannelPad", "IndexSelect") for _, mod in small.steps())
    padded = compact(model, x)
    assert count_macs(small, x) > count_macs(padded, x)
    _roundtrip(model, small, x, tmp_path)


def test_grouped_measure_keeps_one_of_the_two_exact_forms_and_a_bad_value_is_named():
    model = _balanced_regnetish()
    x = torch.rand(2, 3, 8, 8)
    small = compact(model, x, grouped="measure")
    check_exact(model, small, x)
    pads = sum(type(mod).__name__ == "ChannelPad" for _, mod in small.steps())
    assert dict(small.named_modules())["block.a.0"].out_channels == (11 if pads else 12)
    plain = randomize(RegNetish())   # no balance channels: measure builds one model, the padded form's
    assert [n for n, _ in compact(plain, x, grouped="measure").steps()] == [n for n, _ in compact(plain, x).steps()]
    with pytest.raises(ValueError, match="grouped must be one of 'pad', 'keep', 'measure', got 'fast'"):
        compact(model, x, grouped="fast")


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


def test_a_grouped_conv_reads_another_grouped_convs_balanced_output_as_it_is():
    """Found by the property tests: no IndexSelect and ChannelPad between two grouped convs."""
    model = nn.Sequential(nn.Conv2d(1, 6, 1, bias=False), nn.ELU(), nn.Conv2d(6, 2, 1, groups=2, bias=False),
                          nn.Dropout(), nn.Conv2d(2, 4, 1, groups=2, bias=False), nn.Flatten(),
                          nn.Linear(4 * 25, 1, bias=False)).eval()
    with torch.no_grad():
        model[2].weight[0] = 0        # one group's only output is zero: kept for the balance
    x = torch.randn(2, 1, 5, 5)
    small = compact(model, x)
    check_exact(model, small, x)
    names = [n for n, _ in small.steps()]
    assert names[names.index("2") + 1] == "4"


def test_a_grouped_conv_on_the_model_input_reads_the_inputs_kept_channels():
    """Found by the property tests: a grouped conv that reads the model input, one group's filters all zero.
    The input's unread channel is gathered away, and the ChannelPad before the conv reads that gather."""
    model = nn.Sequential(nn.Conv2d(2, 4, 2, stride=2, groups=2, bias=False), nn.Flatten(),
                          nn.Linear(16, 1, bias=False)).eval()
    with torch.no_grad():
        model[0].weight[2:] = 0       # the second group's two filters: its input channel is read by zeros only
    x = torch.randn(1, 2, 5, 5)
    small = compact(model, x)
    check_exact(model, small, x)
    steps = small.steps()
    assert [type(m).__name__ for _, m in steps[:2]] == ["IndexSelect", "ChannelPad"]
    assert small.step_inputs(steps[1][0]) == [steps[0][0]]


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
    for lr, zero, computed, kept in ((17.0, [4, 5, 7], 5, 8), (18.0, [0, 2, 3, 4, 5, 6, 7], 1, 2)):
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
        assert m["g"].in_channels == kept and m["g"].groups == 2
        assert m["stem"].out_channels == computed == m["p"].in_channels  # g's balance: zeros put back before it


class LayerNorm2d(nn.LayerNorm):
    """torchvision's: a LayerNorm over the channels of an N × C × H × W tensor (permute, F.layer_norm, permute)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: 7×7 depthwise, channels-last LayerNorm and MLP (Linear on the last dim), a learned
    layer scale (C × 1 × 1), drop-path, residual add."""

    def __init__(self, c=8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        y = self.fc2(self.act(self.fc1(self.norm(self.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return x + stochastic_depth(self.layer_scale * y, 0.1, "row", self.training)


class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 2, stride=2), LayerNorm2d(8))
        self.blocks = nn.Sequential(ConvNeXtBlock(), ConvNeXtBlock())
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_channels_last_blocks_lose_hidden_units_and_keep_a_stream_that_varies(tmp_path):
    model = randomize(ConvNeXtish())
    with torch.no_grad():
        model.blocks[0].fc1.weight[:12] = 0       # 12 of 32 hidden units write zero (GELU(0) = 0)
        model.blocks[0].fc1.bias[:12] = 0
        model.blocks[1].fc2.weight[:, 20:] = 0    # 12 hidden units nobody reads
        model.head.weight[:, 2] = 0               # stream channel 2 unread by the head, but the LayerNorms read it
    x = torch.rand(2, 3, 16, 16)
    units = channel_units(trace_graph(model, x))
    assert not bool(units.pinned[units.of["stem.0"]].any())
    assert units.dims["blocks.0.fc1"] == 3 and not bool(units.pinned[units.of["blocks.0.fc1"]].any())
    small = compact(model, x)
    check_exact(model, small, x)
    steps = dict(small.steps())
    assert steps["blocks.0.fc1"].out_features == 20 and steps["blocks.1.fc2"].in_features == 20
    assert steps["blocks.0.dw"].out_channels == 8        # the residual stream stays whole: it varies
    _roundtrip(model, small, x, tmp_path)


def _stream_channels_constant(model, channels):
    """Make stream channels of a ConvNeXtish constant at every step: zero everything that writes or reads them,
    but leave the shifts (LayerNorm β, the depthwise bias) that make them nonzero constants."""
    with torch.no_grad():
        model.stem[0].weight[channels] = 0
        model.stem[0].bias[channels] = 0
        model.stem[1].weight[channels] = 0            # the stem's LayerNorm: its β only
        for b in model.blocks:
            b.dw.weight[channels] = 0                 # the depthwise bias only
            b.norm.weight[channels] = 0               # β only, read by fc1 (folded into its bias)
            b.fc2.weight[channels] = 0
            b.fc2.bias[channels] = 0


def test_layernormed_stream_channels_that_are_constant_are_removed_exactly(tmp_path):
    model = randomize(ConvNeXtish())
    _stream_channels_constant(model, [1, 4, 6])
    x = torch.rand(2, 3, 16, 16)
    small = compact(model, x)
    check_exact(model, small, x)
    steps = dict(small.steps())
    assert steps["stem.0"].out_channels == 5 and steps["blocks.1.dw"].out_channels == 5
    assert steps["blocks.0.fc1"].in_features == 5 and steps["head"].in_features == 5
    norm = steps["blocks.0.norm"]
    assert type(norm).__name__ == "SlicedLayerNorm" and norm.full_size == 8 and norm.normalized_shape == (5,)
    assert float(norm.absent_sum) != 0      # the removed channels were nonzero constants there
    _roundtrip(model, small, x, tmp_path)


def test_group_lasso_gives_layernormed_stream_channels_groups_that_compact_removes():
    model = randomize(ConvNeXtish())
    x = torch.rand(2, 3, 16, 16)
    gl = GroupLasso(model, {"channel": 1e-3}, example_input=x)
    assert len(gl.coupled) == 8     # the stream's channels; the hidden units keep their per-layer groups
    names = {n for n, _, _, _ in gl.coupled.slices}
    assert {"stem.0.weight", "stem.0.bias", "stem.1.weight", "stem.1.bias", "blocks.0.dw.weight", "blocks.0.dw.bias",
            "blocks.1.norm.bias", "blocks.1.fc2.weight", "blocks.1.fc2.bias", "blocks.1.layer_scale"} <= names
    gl.penalty().backward()
    assert model.blocks[0].layer_scale.grad is not None and model.stem[1].bias.grad.ne(0).any()
    scale = torch.ones(len(gl.coupled))
    scale[[1, 5]] = 0
    gl.coupled.scale_(scale)
    masks = gl.freeze()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # fine-tuning: the zero groups stay zero
        opt.zero_grad()
        model.train()(x).square().mean().backward()
        opt.step()
        masks.apply_()
    model.eval()
    assert int((gl.coupled.norms() == 0).sum()) == 2
    small = compact(model, x)
    check_exact(model, small, x)
    steps = dict(small.steps())
    assert steps["stem.0"].out_channels == 6 and steps["head"].in_features == 6


def test_a_stream_channel_that_is_constant_only_somewhere_stays():
    model = randomize(ConvNeXtish())
    _stream_channels_constant(model, [3])
    with torch.no_grad():
        model.blocks[1].dw.weight[3] = 1.0      # the second block's depthwise conv makes it vary again
    x = torch.rand(2, 3, 16, 16)
    small = compact(model, x)
    check_exact(model, small, x)
    assert dict(small.steps())["stem.0"].out_channels == 8


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit (stride 1): split the channels in two, transform one half, concatenate, shuffle."""

    def __init__(self, c=8):
        super().__init__()
        h = c // 2
        self.branch = nn.Sequential(nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
                                    nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
                                    nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), dim=1)
        n, c, h, w = y.size()
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.units = nn.Sequential(ShuffleUnit(), ShuffleUnit())
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean([2, 3]))


def test_channel_shuffle_is_a_permutation_from_which_stream_channels_go(tmp_path):
    model = randomize(ShuffleNetish())
    with torch.no_grad():
        model.units[0].branch[0].weight[1:3] = 0       # two of the branch's four hidden channels write zero
        model.units[0].branch[1].weight[1:3] = 0
        model.units[0].branch[1].bias[1:3] = 0
        model.stem[0].weight[[0, 5]] = 0               # two stream channels zero from the stem (5 feeds the branch) ...
        model.stem[0].bias[[0, 5]] = 0
        model.units[0].branch[5].weight[1] = 0         # ... and one the first unit's branch writes (zero BN shift)
        model.units[0].branch[6].bias[1] = 0
    x = torch.rand(2, 3, 8, 8)
    graph = trace_graph(model, x)
    shuffles = [n for n in graph.nodes.values() if type(n.module).__name__ == "IndexSelect"]
    assert len(shuffles) == 2 and shuffles[0].module.index.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    units = channel_units(graph)
    assert not bool(units.pinned[units.of["stem.0"]].any())
    small = compact(model, x)
    check_exact(model, small, x)
    steps = dict(small.steps())
    assert steps["units.0.branch.0"].out_channels == 2 and steps["units.0.branch.3"].out_channels == 2
    assert steps["stem.0"].out_channels == 6 and steps["units.0.branch.0"].in_channels == 3   # stem channel 5
    assert steps["units.0.branch.5"].out_channels == 3 and steps["fc"].in_features == 6  # 0 and the branch's 1
    _roundtrip(model, small, x, tmp_path)


class EncoderBlock(nn.Module):
    """A ViT encoder block: pre-norm multi-head self-attention and MLP, both residual."""

    def __init__(self, d=16, heads=4):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * d, d))

    def forward(self, inp):
        x = self.ln_1(inp)
        x, _ = self.attention(x, x, x, need_weights=False)
        x = x + inp
        return x + self.mlp(self.ln_2(x))


class ViTish(nn.Module):
    """Patches (a strided conv, reshaped to tokens), a class token, a position embedding, two blocks."""

    def __init__(self, d=16):
        super().__init__()
        self.d = d
        self.proj = nn.Conv2d(3, d, 4, stride=4)
        self.class_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        self.blocks = nn.Sequential(EncoderBlock(d), EncoderBlock(d))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        n = x.shape[0]
        x = self.proj(x).reshape(n, self.d, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos
        return self.head(self.ln(self.blocks(x))[:, 0])


def test_transformer_blocks_lose_whole_heads_and_mlp_units(tmp_path):
    model = ViTish().eval()
    with torch.no_grad():
        model.blocks[0].attention.out_proj.weight[:, 4:12] = 0   # heads 1 and 2 (4 wide) write nothing
        model.blocks[1].mlp[0].weight[5:15] = 0                  # 10 of 32 MLP units write zero
        model.blocks[1].mlp[0].bias[5:15] = 0
    x = torch.rand(2, 3, 8, 8)
    small = compact(model, x)
    check_exact(model, small, x)
    att = dict(small.steps())["blocks.0.attention"]
    assert att.num_heads == 2 and dict(small.steps())["blocks.1.mlp.0"].out_features == 22
    units = channel_units(trace_graph(model, x))
    assert units.pinned[units.of["proj"]].all()                  # the residual stream, read by attention, stays
    assert units.reasons[int(units.of["proj"][0])] == \
        "blocks.0.attention: attention keeps its input and output channels (whole heads go)"
    loaded = _roundtrip(model, small, x, tmp_path)
    assert dict(loaded.steps())["blocks.0.attention"].num_heads == 2


def test_an_operation_with_no_rule_keeps_its_channels_and_the_rest_compacts(tmp_path):
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.c(torch.relu(self.b(torch.cumsum(self.a(x), 1))))

    model = Cumulative().eval()
    with torch.no_grad():
        model.a.weight[:2] = 0            # pinned: cumsum mixes the channels it reads
        model.b.weight[:3] = 0            # free: three of b's channels write their bias only
    x = torch.rand(2, 3, 8, 8)
    small = compact(model, x)
    check_exact(model, small, x)
    steps = dict(small.steps())
    assert steps["a"].out_channels == 6 and steps["b"].out_channels == 3
    with pytest.raises(TypeError, match="cumsum"):
        save_compact(small, tmp_path / "m")


def test_group_lasso_makes_attention_heads_groups_that_compaction_removes():
    from structsparse import GroupLasso
    model = ViTish().eval()
    x = torch.rand(2, 3, 8, 8)
    out_proj = model.blocks[0].attention.out_proj
    with torch.no_grad():
        out_proj.weight[:, 4:8] *= 1e-3                   # head 1 (columns 4..7) is nearly silent
    gl = GroupLasso(model, {"blocks.0.attention.out_proj": {"filter": 0.01}}, example_input=x)
    assert [(h.name, h.heads) for h in gl.heads] == [("blocks.0.attention.out_proj", 4)]
    norms = gl.norms()["blocks.0.attention.out_proj"]["head"]
    gl.prox_step(lr=1.0)
    assert (gl.norms()["blocks.0.attention.out_proj"]["head"] == 0).tolist() == [False, True, False, False]
    assert norms[1] < 0.01 and bool((norms[[0, 2, 3]] > 0.01).all())   # only head 1 was under lr · λ
    masks = gl.freeze()
    assert not masks.masks["blocks.0.attention.out_proj"][:, 4:8].any()
    small = compact(model, x)
    check_exact(model, small, x)
    assert dict(small.steps())["blocks.0.attention"].num_heads == 3


class GhostModule(nn.Module):
    """GhostNet's module: a conv's channels and a depthwise copy of them, concatenated, then sliced."""

    def __init__(self, cin, cout, act=True):
        super().__init__()
        self.out_chs, init = cout, (cout + 1) // 2
        self.primary = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init),
                                     nn.ReLU() if act else nn.Identity())
        self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, padding=1, groups=init, bias=False), nn.BatchNorm2d(init),
                                   nn.ReLU() if act else nn.Identity())

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.out_chs, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.ghost1, self.ghost2 = GhostModule(c, 16), GhostModule(16, c, act=False)

    def forward(self, x):
        return self.ghost2(self.ghost1(x)) + x


def test_a_channel_repeated_in_an_add_keeps_the_other_inputs_channels(tmp_path):
    """ghost2 writes each of its 4 channels twice; the residual stream it is added to has 8 distinct ones:
    those cannot go one by one (the add needs equal widths), while ghost1's inner channels still can."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), GhostBottleneck(), nn.AdaptiveAvgPool2d(1),
                                    nn.Flatten(), nn.Linear(8, 3)))
    with torch.no_grad():
        model[0].weight[:2] = 0                                  # two stream channels: written as zero ...
        model[1].ghost1.primary[0].weight[:3] = 0                # three of ghost1's 8 channels write zero
        model[1].ghost1.primary[1].weight[:3] = 0
        model[1].ghost1.primary[1].bias[:3] = 0
    x = torch.rand(2, 3, 8, 8)
    units = channel_units(trace_graph(model, x))
    assert units.reasons[int(units.of["0"][0])] == "add: adds a channel repeated in the other input"
    small = compact(model, x)
    check_exact(model, small, x)
    steps = dict(small.steps())
    assert steps["0"].out_channels == 8 and steps["1.ghost1.primary.0"].out_channels == 5   # ... but they stay
    _roundtrip(model, small, x, tmp_path)


class BatchNormAct(nn.BatchNorm2d):
    """timm's BatchNormAct2d: F.batch_norm on its own parameters, then an activation child."""

    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        x = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                     self.training, self.momentum, self.eps)
        return self.act(x)


class Head(nn.Linear):
    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class TimmLike(nn.Module):
    """Functional layers on parameters, and a forward with an optional argument (fixed at its default)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 1, bias=False), BatchNormAct(8)
        self.head = Head(8, 4)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask
        return self.head(self.bn2(self.conv2(self.bn1(self.conv1(x)))).mean((2, 3)))


def test_functional_layers_on_parameters_become_modules_and_compact(tmp_path):
    model = randomize(TimmLike())
    with torch.no_grad():
        model.conv1.weight[:3] = 0                  # three channels: their BatchNorm shift, then ReLU
        model.head.weight[:, 6:] = 0                # two channels nobody reads
    x = torch.rand(2, 3, 8, 8)
    graph = trace_graph(model, x)
    roles = {n.name: n.role for n in graph.nodes.values()}
    assert roles["bn1.batch_norm"] == "norm" and roles["bn1.act"] == "elementwise" and roles["head"] == "linear"
    small = compact(model, x)
    check_exact(model, small, x)
    steps = dict(small.steps())
    assert steps["conv1"].out_channels == 5 and steps["conv2"].out_channels == 6
    _roundtrip(model, small, x, tmp_path)
