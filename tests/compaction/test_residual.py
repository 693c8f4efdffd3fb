"""Compaction of residual and branching graphs: coupled channels, depth, concatenation."""
import pytest
import torch
from torch import nn

from structsparse import compact, load_compact, save_compact
from structsparse.layers import Cat, ChannelPad, Constant

pytestmark = pytest.mark.filterwarnings("ignore::structsparse.compaction.CollapseWarning")  # random zeros may zero everything

from helpers import TinyResNet, check_exact, params, randomize










def test_dense_residual_model_compacts_to_the_same_size_and_outputs():
    model = randomize(TinyResNet())
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x, fold_norms=False)
    check_exact(model, c, x)
    assert params(c) == params(model)


def test_batchnorms_fold_into_the_layers_they_alone_read():
    model = randomize(TinyResNet())
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x)
    check_exact(model, c, x)
    kinds = {type(m).__name__ for _, m in c.steps()}
    assert "BatchNorm2d" not in kinds and c.conv1.bias is not None
    assert params(c) == params(model) - sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_whole_branch_zero_becomes_a_constant_and_its_convs_vanish(shortcut):
    model = randomize(TinyResNet(shortcut))
    with torch.no_grad():
        model.layer1[1].conv1.weight.zero_()
        model.layer1[1].conv2.weight.zero_()
        model.layer2[1].conv2.weight.zero_()  # only the second conv: the branch is still constant
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x)
    check_exact(model, c, x)
    names = dict(c.named_modules())
    for gone in ("layer1.1.conv1", "layer1.1.conv2", "layer2.1.conv1", "layer2.1.conv2", "layer2.1.bn1"):
        assert gone not in names
    constants = [m for m in c.modules() if isinstance(m, Constant)]
    assert len(constants) == 2 and isinstance(names["layer2.1.bn2"], Constant)  # named after the step it replaces
    # the constant is bn2's shift, the same at every position
    shift = model.layer1[1].bn2.bias - model.layer1[1].bn2.running_mean * model.layer1[1].bn2.weight / \
        torch.sqrt(model.layer1[1].bn2.running_var + model.layer1[1].bn2.eps)
    assert any(torch.allclose(k.value[:, 0, 0], shift.detach(), atol=1e-6) for k in constants)


def test_first_conv_of_a_branch_zero_leaves_an_exact_position_dependent_constant():
    model = randomize(TinyResNet())
    with torch.no_grad():
        model.layer1[0].conv1.weight.zero_()
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x)
    check_exact(model, c, x)
    assert "layer1.0.conv2" not in dict(c.named_modules())


def test_zero_branch_without_batchnorm_vanishes_from_the_add():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(2, 4, 3, padding=1)
            self.branch = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.head = nn.Conv2d(4, 3, 1)

        def forward(self, x):
            x = self.stem(x)
            return self.head(x + self.branch(x))

    model = Net().eval()
    with torch.no_grad():
        model.branch.weight.zero_()
    x = torch.rand(2, 2, 8, 8)
    c = compact(model, x)
    check_exact(model, c, x)
    assert [n for n, _ in c.steps()] == ["stem", "head"]


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_stream_channel_unread_everywhere_is_removed_from_every_writer(shortcut):
    model = randomize(TinyResNet(shortcut))
    gone = [1, 5]  # channels of the stage-1 stream
    with torch.no_grad():
        for blk in model.layer1:
            blk.conv1.weight[:, gone] = 0
        model.layer2[0].conv1.weight[:, gone] = 0
        if shortcut == "B":
            model.layer2[0].shortcut[0].weight[:, gone] = 0
        else:  # option A carries stage-1 channel c on as stage-2 channel 4 + c: the same unit
            model.layer2[1].conv1.weight[:, [4 + g for g in gone]] = 0
            model.fc.weight[:, [4 + g for g in gone]] = 0
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x, fold_norms=False)
    check_exact(model, c, x)
    assert c.conv1.out_channels == 6 and c.bn1.num_features == 6
    for i in range(2):
        assert c.get_submodule(f"layer1.{i}.conv2").out_channels == 6
        assert c.get_submodule(f"layer1.{i}.conv1").in_channels == 6
    if shortcut == "A":  # the padded shortcut now places 6 channels among 14
        pad = c.get_submodule("layer2.0.shortcut")
        assert pad.index.numel() == 6 and pad.out_channels == 14 and c.fc.in_features == 14


def test_stream_channel_read_by_one_block_only_is_kept():
    model = randomize(TinyResNet())
    with torch.no_grad():
        model.layer1[0].conv1.weight[:, 3] = 0  # the other readers still read channel 3
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x)
    check_exact(model, c, x)
    assert c.conv1.out_channels == 8


def test_inner_channels_and_last_stage_stream_shrink():
    model = randomize(TinyResNet())
    with torch.no_grad():
        model.layer2[0].conv1.weight[[0, 2, 3]] = 0  # inner filters: bn1 shift through relu, padded conv2
        model.layer2[0].conv2.weight[:, [0, 2, 3]] = 0  # ... so conv2 must stop reading them too
        model.layer2[1].conv1.weight[:, 15] = 0
        model.fc.weight[:, 15] = 0  # stage-2 stream channel 15 (a zero channel of the padded shortcut): unread
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x)
    check_exact(model, c, x)
    assert c.get_submodule("layer2.0.conv1").out_channels == 13
    assert c.fc.in_features == 15 and c.get_submodule("layer2.1.conv2").out_channels == 15


def test_inner_filter_zero_with_nonzero_columns_is_kept_because_padding_makes_it_position_dependent():
    model = randomize(TinyResNet())
    with torch.no_grad():
        model.layer1[0].bn1.bias.fill_(1.0)  # relu(shift) > 0: a nonzero constant channel
        model.layer1[0].conv1.weight[2] = 0
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x)
    check_exact(model, c, x)
    assert c.get_submodule("layer1.0.conv1").out_channels == 8


def test_random_structures_stay_exact():
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        model = randomize(TinyResNet("AB"[seed % 2]), seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    w = m.weight
                    for dim in (0, 1):
                        drop = torch.rand(w.shape[dim], generator=g) < 0.3
                        w.index_fill_(dim, drop.nonzero().flatten(), 0.0)
                    if w.dim() == 4 and torch.rand(1, generator=g) < 0.3:
                        cols = torch.rand(w[0].numel(), generator=g) < 0.5
                        w.view(w.shape[0], -1)[:, cols] = 0
                    if torch.rand(1, generator=g) < 0.15:
                        w.zero_()
        x = torch.rand(3, 3, 16, 16)
        c = compact(model, x)
        check_exact(model, c, x)
        assert params(c) <= params(model)


class Inception(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.functional = functional
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.cat = Cat(1)
        self.relu = nn.ReLU()
        self.c = nn.Conv2d(10, 5, 3, padding=1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1) if self.functional else self.cat(self.a(x), self.b(x))
        return self.c(self.relu(y))


@pytest.mark.parametrize("functional", [True, False])
def test_concatenated_branches_lose_the_channels_the_consumer_ignores(functional):
    model = Inception(functional).eval()
    with torch.no_grad():
        model.c.weight[:, [1, 6, 7]] = 0  # a's channel 1, b's channels 2 and 3
    x = torch.rand(2, 3, 8, 8)
    c = compact(model, x)
    check_exact(model, c, x)
    assert c.a.out_channels == 3 and c.b.out_channels == 4 and c.c.in_channels == 7




def test_residual_compact_model_round_trips(tmp_path):
    model = randomize(TinyResNet())
    with torch.no_grad():
        model.layer1[1].conv2.weight.zero_()
        for blk in model.layer1:
            blk.conv1.weight[:, 2] = 0
        model.layer2[0].conv1.weight[:, 2] = 0
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x)
    save_compact(c, tmp_path / "m")
    loaded = load_compact(tmp_path / "m")
    check_exact(model, loaded, x)
    assert any(isinstance(m, ChannelPad) for m in loaded.modules())
