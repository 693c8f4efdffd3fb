"""Groups of residual networks: coupled channel groups (a channel read by several layers) and BatchNorm
(γ, β) groups for depth and inner channels."""
import pytest
import torch
from torch import nn

from structsparse import compact

from structsparse import GroupLasso
from structsparse.sparsity.groups import group_norms
from structsparse.zoo.models import LeNet

from helpers import TinyResNet, check_exact, randomize


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
