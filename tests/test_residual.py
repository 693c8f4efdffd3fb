"""Compaction of residual and branching graphs: coupled channels, depth, concatenation."""
import pytest
import torch
from torch import nn

from structsparse import compact, load_compact, save_compact
from structsparse.compaction.surgery import ATOL, RTOL
from structsparse.graph import channel_units, trace_graph
from structsparse.layers import Cat, ChannelPad, Constant
from structsparse.zoo.models import BasicBlock as Block


class TinyResNet(nn.Module):
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
    return model.eval()


def check_exact(model, c, x):
    model.eval()
    with torch.no_grad():
        for inp in (x, torch.rand_like(x), torch.randn_like(x) * 3):
            torch.testing.assert_close(c(inp), model(inp), rtol=RTOL, atol=ATOL)


def params(m):
    return sum(p.numel() for p in m.parameters())


def test_dense_residual_model_compacts_to_the_same_size_and_outputs():
    model = randomize(TinyResNet())
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x)
    check_exact(model, c, x)
    assert params(c) == params(model)


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
    c = compact(model, x)
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


def test_units_couple_every_writer_and_reader_of_a_stream_channel():
    model = TinyResNet()
    units = channel_units(trace_graph(model, torch.rand(1, 3, 16, 16)))
    stem, blk = units.of["bn1"], units.of["layer1.1.bn2"]
    assert torch.equal(stem, blk) and torch.equal(units.of_input["layer2.0.conv1"], stem)
    inner = units.of["layer1.0.bn1"]
    assert not bool((inner[:, None] == stem[None, :]).any())
    assert bool(units.pinned[units.of["fc"]].all()) and not bool(units.pinned[stem].any())
    # layer1.{0,1}.conv1, layer2.0.conv1, and through the padded shortcut layer2.1.conv1 and fc
    assert int(units.reader_count()[stem[0]]) == 5


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


# ---- coupled channel groups ------------------------------------------------------------------

from structsparse import GroupLasso  # noqa: E402
from structsparse.sparsity.groups import group_norms  # noqa: E402
from structsparse.zoo.models import LeNet  # noqa: E402


def test_chains_have_no_coupled_groups_and_the_same_penalty():
    model = LeNet()
    spec = {"filter": 0.01, "channel": 0.02, "shape": 0.003}
    plain = GroupLasso(model, spec)
    traced = GroupLasso(model, spec, example_input=torch.rand(2, 1, 28, 28))
    assert traced.coupled is None
    assert torch.equal(plain.penalty(), traced.penalty())


def test_coupled_penalty_is_the_norm_of_all_readers_columns():
    model = randomize(TinyResNet("B"))
    lam = 0.1
    gl = GroupLasso(model, {"channel": lam}, example_input=torch.rand(2, 3, 16, 16))
    # stage-1 stream: read by layer1.{0,1}.conv1, layer2.0.conv1, layer2.0.shortcut.0; stage 2: layer2.1.conv1, fc
    assert len(gl.coupled) == 8 + 16
    readers1 = [model.layer1[0].conv1, model.layer1[1].conv1, model.layer2[0].conv1, model.layer2[0].shortcut[0]]
    readers2 = [model.layer2[1].conv1, model.fc]
    coupled = sum(torch.stack([group_norms(m.weight, "channel") ** 2 for m in rs]).sum(0).sqrt().sum()
                  for rs in (readers1, readers2))
    coupled_layers = {id(m) for m in readers1 + readers2}
    per_layer = sum(group_norms(m.weight, "channel").sum() for m in model.modules()
                    if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m) not in coupled_layers)
    torch.testing.assert_close(gl.penalty(), lam * (coupled + per_layer))


def test_coupled_gradient_is_finite_at_zero_groups_and_prox_zeroes_whole_units():
    model = randomize(TinyResNet("A"))
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        for m in (model.layer1[0].conv1, model.layer1[1].conv1, model.layer2[0].conv1):
            m.weight[:, 0] = 0
    gl = GroupLasso(model, {"channel": 0.05}, example_input=x)
    gl.penalty().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    before = compact(model, x).conv1.out_channels
    norms = gl.norms()["coupled"]["channel"]
    gl.prox_step(lr=float(norms.sort().values[3]) / 0.05)  # large enough to zero the 4 weakest units
    assert int((gl.coupled.norms() == 0).sum()) >= 4
    c = compact(model, x)
    check_exact(model, c, x)
    assert c.fc.in_features < 16 and c.conv1.out_channels <= before


def test_report_counts_removed_branches_as_no_work():
    from structsparse import sparsity_report

    model = randomize(TinyResNet())
    with torch.no_grad():
        model.layer1[1].conv2.weight.zero_()
    rep = sparsity_report(model, torch.rand(2, 3, 16, 16))
    rows = {r["name"]: r for r in rep.layers}
    assert rows["layer1.1.conv1"]["compact_flop_fraction"] == 0 and rows["layer1.1.conv2"]["compact_flop_fraction"] == 0
    assert rows["layer1.1.conv1"]["flop_fraction"] == 1  # its own weights are not zero
    assert rows["layer1.0.conv1"]["compact_flop_fraction"] == pytest.approx(1.0)
    assert rep.compact_flop_fraction < rep.flop_fraction < 1


def test_report_on_a_model_whose_layers_are_all_zero():
    from structsparse import sparsity_report

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.zero_()
    rep = sparsity_report(model, torch.rand(2, 1, 8, 8))
    assert rep.compact_macs == 0 and rep.compact_flop_fraction == 0


# ---- BatchNorm groups (γ, β): depth and channels of BatchNorm networks --------------------------

def test_batchnorm_groups_need_a_pattern_and_only_filter_or_depth():
    model = TinyResNet()
    gl = GroupLasso(model, {"filter": 0.1})
    assert not gl.norm_terms  # model-wide kinds never touch BatchNorm
    gl = GroupLasso(model, {"layer*.bn2": {"depth": 0.1}, "layer1.0.bn1": {"filter": 0.2}})
    assert sorted(t.name for t in gl.norm_terms) == ["layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn2",
                                                      "layer2.0.bn2", "layer2.1.bn2"]
    bn = model.layer1[0].bn2
    expected = 0.1 * torch.sqrt((bn.weight ** 2 + bn.bias ** 2).sum())
    assert torch.isclose(GroupLasso(model, {"layer1.0.bn2": {"depth": 0.1}}).penalty(), expected)
    with pytest.raises(ValueError, match="BatchNorm"):
        GroupLasso(model, {"layer1.0.bn2": {"channel": 0.1}})


def test_batchnorm_depth_group_removes_the_branch_and_freezes():
    model = randomize(TinyResNet())
    x = torch.rand(2, 3, 16, 16)
    gl = GroupLasso(model, {"layer*.bn2": {"depth": 1.0}})
    bn = model.layer1[1].bn2
    gl.prox_step(lr=float(torch.sqrt((bn.weight ** 2 + bn.bias ** 2).sum()).detach()) * 1.01)  # large enough for this one
    assert bool((bn.weight == 0).all()) and bool((bn.bias == 0).all())
    gl.penalty().backward()
    assert torch.isfinite(bn.weight.grad).all() and torch.isfinite(bn.bias.grad).all()
    c = compact(model, x)
    check_exact(model, c, x)
    names = dict(c.named_modules())
    assert "layer1.1.conv1" not in names and "layer1.1.conv2" not in names and "layer1.1.bn2" not in names
    masks = gl.freeze()
    with torch.no_grad():
        bn.weight.add_(1.0)
        bn.bias.add_(1.0)
    masks.apply_()
    assert bool((bn.weight == 0).all()) and bool((bn.bias == 0).all())


def test_batchnorm_channel_groups_remove_inner_channels():
    model = randomize(TinyResNet())
    with torch.no_grad():
        model.layer2[0].bn1.weight[[1, 4]] = 0
        model.layer2[0].bn1.bias[[1, 4]] = 0
        model.layer1[0].bn1.weight[3] = 0  # γ alone: a constant relu(β) = 1 channel, read through padding: kept
        model.layer1[0].bn1.bias[3] = 1.0
        model.layer1[1].bn1.weight[5] = 0  # γ = 0 and β < 0: relu makes it a zero channel: removed
        model.layer1[1].bn1.bias[5] = -0.5
    x = torch.rand(2, 3, 16, 16)
    c = compact(model, x)
    check_exact(model, c, x)
    assert c.get_submodule("layer2.0.conv1").out_channels == 14 and c.get_submodule("layer2.0.conv2").in_channels == 14
    assert c.get_submodule("layer1.0.conv1").out_channels == 8
    assert c.get_submodule("layer1.1.conv1").out_channels == 7
    assert c.get_submodule("layer1.1.conv1").out_channels == 7
