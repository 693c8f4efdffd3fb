"""Shrinking to a FLOP or parameter budget: the compacted model lands at or under it, never over, without
collapsing."""
import copy

import pytest
import torch
from torch import nn

from structsparse import GroupLasso, compact
from structsparse.budget import BudgetError, group_costs, zero_to_budget_
from structsparse.report import count_macs, count_params

from helpers import TinyResNet, check_exact, randomize


def _trained_like(seed=0):
    """A TinyResNet whose groups have uneven norms, as after some SSL."""
    torch.manual_seed(seed)
    model = randomize(TinyResNet())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand(m.weight.shape[0], 1, 1, 1) * 2)
    return model.eval()


@pytest.mark.parametrize("target", [0.6, 0.3])
def test_the_compacted_model_lands_at_or_just_under_the_budget(target):
    model = _trained_like()
    x = torch.rand(2, 3, 16, 16)
    dense = count_macs(model, x)
    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3}, example_input=x)
    result = zero_to_budget_(gl, x, flops=target)
    small = compact(model, x)
    check_exact(model, small, x)
    macs = count_macs(small, x)
    assert macs == result.kept and result.dense == dense and result.metric == "flops"
    assert target - 0.1 <= macs / dense <= target     # never over; this small model moves in coarse steps
    assert result.groups_zeroed > 0 and result.target == target
    assert model(x).std(0).mean() > 0                 # not collapsed to a constant


def test_fewer_groups_would_not_do():
    model = _trained_like(1)
    x = torch.rand(2, 3, 16, 16)
    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3}, example_input=x)
    before = copy.deepcopy(model)
    result = zero_to_budget_(gl, x, flops=0.5)
    gl2 = GroupLasso(before, {"filter": 1e-3, "channel": 1e-3}, example_input=x)
    from structsparse.budget import _Probes
    probe = _Probes(gl2, x, "flops")
    macs, collapsed = probe(result.groups_zeroed + result.given_back - 1)
    assert collapsed or macs > 0.5 * result.dense   # one group fewer (in the same order) is over


def test_the_cut_gives_back_the_groups_the_budget_still_pays_for():
    """Its fixed order took a weak channel, three weak filters and another channel to get under 0.34 of the
    layer (0.25); one of the filters fits again (1/3)."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Flatten(),
                          nn.Linear(6 * 6 * 6, 2)).eval()
    with torch.no_grad():
        chain[2].weight.fill_(1.0)
        chain[2].weight[:3] *= 0.4     # three weak filters
        chain[2].weight[:, 0] *= 0.3   # and a weak channel
    x = torch.rand(2, 3, 8, 8)
    before = copy.deepcopy(chain)
    for budget in ({"flops": {"2": 0.34}}, {"flops": 0.5}):
        model = copy.deepcopy(before)
        gl = GroupLasso(model, {"2": {"filter": 1e-3, "channel": 1e-3}}, example_input=x)
        result = zero_to_budget_(gl, x, **budget)
        check_exact(model, compact(model, x), x)
        assert result.given_back >= 1
        if isinstance(budget["flops"], dict):
            assert result.reached == {"2": pytest.approx(1 / 3)} and result.groups_zeroed == 4
            assert model[2].weight[2].abs().sum() > 0 and model[2].weight[:2].abs().sum() == 0
        else:
            assert result.reached <= 0.5 and count_macs(compact(model, x), x) == result.kept
    gl = GroupLasso(copy.deepcopy(before), {"2": {"filter": 1e-3, "channel": 1e-3}}, example_input=x)
    off = zero_to_budget_(gl, x, flops={"2": 0.34}, give_back=0)
    assert off.given_back == 0 and off.reached == {"2": 0.25}
    with torch.no_grad():   # the weak channel unread (its conv 0 filter zero): zeroed for free, it stays zero
        before[0].weight[0] = 0.0
        before[0].bias[0] = 0.0
    gl = GroupLasso(before, {"2": {"filter": 1e-3, "channel": 1e-3}}, example_input=x)
    zero_to_budget_(gl, x, flops={"2": 0.34})
    assert before[2].weight[:, 0].abs().sum() == 0


def test_a_parameter_budget_counts_the_compacted_models_parameters():
    model = _trained_like(2)
    x = torch.rand(2, 3, 16, 16)
    dense = count_params(model)
    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3}, example_input=x)
    result = zero_to_budget_(gl, x, params=0.4)
    small = compact(model, x)
    check_exact(model, small, x)
    assert result.metric == "params" and result.dense == dense and result.kept == count_params(small)
    assert 0.3 <= count_params(small) / dense <= 0.4
    costs = {(f.name, f.kind): c.flatten() for f, c in zip(gl.families(), group_costs(gl, x, "params"))}
    assert torch.allclose(costs["conv1", "filter"], torch.full((8,), 3 * 9.0))   # a filter: its 27 weights
    with pytest.raises(ValueError, match="give one budget, flops, params or latency; got flops, params"):
        zero_to_budget_(gl, x, flops=0.5, params=0.5)
    with pytest.raises(ValueError, match=r"params: the budget is a fraction of the dense parameters"):
        zero_to_budget_(gl, x, params=2)


def test_an_unreachable_budget_names_the_closest_and_leaves_the_model_alone():
    model = _trained_like()
    x = torch.rand(2, 3, 16, 16)
    state = copy.deepcopy(model.state_dict())
    gl = GroupLasso(model, {"layer2.1.conv2": {"filter": 1e-3}}, example_input=x)  # one layer's filters only
    with pytest.raises(BudgetError, match=r"flops: 0.1 of the dense multiply-adds cannot be reached: .* keeps 0\.\d+"):
        zero_to_budget_(gl, x, flops=0.1)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, "half", float("nan")])
def test_bad_budgets_name_the_key(bad):
    model = _trained_like()
    x = torch.rand(2, 3, 16, 16)
    gl = GroupLasso(model, {"filter": 1e-3}, example_input=x)
    with pytest.raises(ValueError, match="flops"):
        zero_to_budget_(gl, x, flops=bad)


def test_a_groups_cost_is_the_multiply_adds_its_weights_do():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(),
                          nn.Linear(5 * 6 * 6, 2))
    x = torch.rand(1, 3, 8, 8)
    gl = GroupLasso(model, {"filter": 1.0, "channel": 1.0})
    w = model[0].weight.detach().clone()
    costs = {(f.name, f.kind): c.flatten() for f, c in zip(gl.families(), group_costs(gl, x))}
    assert torch.allclose(costs["0", "filter"], torch.full((4,), 3 * 9 * 64.0))   # a filter: C·k·k per pixel
    assert torch.allclose(costs["2", "channel"], torch.full((4,), 5 * 9 * 36.0))  # a column: N·k·k per pixel
    assert torch.allclose(costs["4", "filter"], torch.full((2,), 180.0))
    assert torch.equal(model[0].weight, w)   # the weights are back


def test_the_committed_budget_run_is_at_or_under_its_target():
    import json
    from pathlib import Path

    from structsparse import load_compact
    from structsparse.zoo.models import build_model
    root = Path(__file__).resolve().parents[1] / "results" / "mnist" / "budget10"
    if not (root / "metrics.json").is_file():
        pytest.skip("results/mnist/budget10 not committed")
    metrics = json.loads((root / "metrics.json").read_text())
    small = load_compact(root / "compact")
    x = torch.rand(1, *small.input_shape)
    fraction = count_macs(small, x) / count_macs(build_model("lenet"), x)
    budget = metrics["budget"]["ssl"]
    assert fraction == pytest.approx(metrics["sparsity"]["compact_flop_fraction"]) and fraction <= budget["target"]
    assert budget["target"] - 0.02 <= budget["reached"] <= budget["target"]


def test_the_starting_strength_shrinks_one_in_twenty_of_the_groups_to_zero_over_the_given_steps():
    from structsparse.budget import starting_strength
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 9, dtype=torch.float32).view(8, 1).expand(8, 4) / 2)  # norms 1..8
    gl = GroupLasso(model, {"0": {"filter": 0.5}})
    strength = starting_strength(gl, lr=0.1, steps=10)
    assert strength == pytest.approx(torch.tensor([1., 2, 3, 4, 5, 6, 7, 8]).quantile(0.05).item() / 0.5 / 1.0)
    gl.strength = strength
    for _ in range(10):
        gl.prox_step(lr=0.1)
    alive = gl.norms()["0"]["filter"].gt(0)
    assert int(alive.sum()) == 7          # the smallest of eight is gone, the rest are not


def test_a_batchnorm_channel_costs_what_the_filter_before_it_costs():
    model = _trained_like()
    x = torch.rand(1, 3, 16, 16)
    gl = GroupLasso(model, {"bn1": {"filter": 1e-3}, "layer1.0.bn2": {"filter": 1e-3}}, example_input=x)
    costs = {f.name: c.flatten() for f, c in zip(gl.families(), group_costs(gl, x))}
    assert torch.allclose(costs["bn1"], torch.full((8,), 3 * 9 * 256.0))            # conv1: 3×3×3 per pixel
    assert torch.allclose(costs["layer1.0.bn2"], torch.full((8,), 8 * 9 * 256.0))   # the block's conv2
    result = zero_to_budget_(gl, x, flops=0.8)   # zeroing (γ, β) is what removes the filters
    assert result.reached <= 0.8 and result.groups_zeroed > 0


def test_a_per_layer_budget_holds_each_named_layer_to_its_own_fraction_of_its_multiply_adds():
    from structsparse.budget import layer_fractions
    model = _trained_like(3)
    x = torch.rand(2, 3, 16, 16)
    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3, "shape": 1e-3}, example_input=x)
    targets = {"layer1.0.conv1": 0.3, "layer2.0.conv2": 0.5}
    result = zero_to_budget_(gl, x, flops=targets)
    small = compact(model, x)
    check_exact(model, small, x)
    fractions = layer_fractions(model, x)
    assert result.target == targets and result.reached == {n: fractions[n] for n in targets}
    assert all(fractions[n] <= t for n, t in targets.items()) and result.groups_zeroed > 0
    assert fractions["conv1"] == 1.0                     # a layer without a target loses nothing of its own
    with pytest.raises(ValueError, match=r"flops\.nope: not a Conv2d or Linear layer of TinyResNet"):
        zero_to_budget_(gl, x, flops={"nope": 0.5})
    with pytest.raises(ValueError, match=r"flops: the budget is a fraction"):
        zero_to_budget_(gl, x, flops={"conv1": 1.5})
    chain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(),
                          nn.Linear(5 * 14 * 14, 2))
    one = GroupLasso(chain, {"0": {"filter": 1e-3}}, example_input=x)   # its filters alone: one must stay
    with pytest.raises(BudgetError, match=r"flops\.0: 0\.01 of 0's dense multiply-adds cannot be reached: .* "
                                          r"keeps 0\.2500"):
        zero_to_budget_(one, x, flops={"0": 0.01})


def test_a_per_layer_budget_in_a_batchnorm_model_zeroes_the_filters_with_their_batchnorm_channels():
    torch.manual_seed(0)
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))).eval()
    x = torch.rand(2, 3, 8, 8)
    gl = GroupLasso(model, {"filter": 1e-3}, example_input=x)   # model-wide: γ, β join the filters
    result = zero_to_budget_(gl, x, flops={"0": 0.5})
    small = compact(model, x)
    check_exact(model, small, x)
    gone = model[1].weight.eq(0) & model[1].bias.eq(0)
    assert result.reached["0"] <= 0.5 and int(gone.sum()) >= 4 and model[0].weight[gone].eq(0).all()


def test_the_budget_counts_the_model_compacted_as_the_run_compacts_it():
    """A conv keeping few columns runs lowered (its multiply-adds: the kept columns only) when ``lowered_below``
    says so; the budget then counts that, as the run's final compaction will."""
    from structsparse.budget import layer_fractions
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2)).eval()
    with torch.no_grad():
        model[2].weight[:, :, 0] = 0                  # a third of conv 2's columns (one kernel row) gone
    x = torch.rand(2, 2, 8, 8)
    assert layer_fractions(model, x, lowered_below=0.0)["2"] == 1.0     # a plain conv: every multiply-add
    assert layer_fractions(model, x, lowered_below=1.0)["2"] == pytest.approx(2 / 3)


def test_cost_weights_multiply_each_groups_lambda_by_its_cost_over_the_mean_cost():
    from structsparse.budget import weigh_by_cost_
    from structsparse.sparsity.groups import group_norms
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.Flatten(),
                          nn.Linear(5 * 6 * 6, 2))
    x = torch.rand(1, 3, 8, 8)
    gl = GroupLasso(model, {"filter": 0.1})
    plain = gl.penalty().item()
    weigh_by_cost_(gl, x)
    costs = [3 * 9 * 64.0] * 4 + [4 * 9 * 36.0] * 5 + [180.0] * 2   # each filter's multiply-adds
    mean = sum(costs) / len(costs)
    expected = sum(0.1 * c / mean * n for c, n in zip(costs, torch.cat(
        [group_norms(m.weight, "filter") for m in (model[0], model[2], model[4])]).tolist()))
    assert gl.penalty().item() == pytest.approx(expected, rel=1e-5) and expected != pytest.approx(plain)
    before = [m.weight.detach().clone() for m in (model[0], model[4])]
    gl.prox_step(lr=1.0)   # the proximal step shrinks by the same weighted λs
    for m, w, c in zip((model[0], model[4]), before, (costs[0], costs[-1])):
        n = group_norms(w, "filter")
        assert torch.allclose(group_norms(m.weight, "filter"), (n - 0.1 * c / mean).clamp_min(0), atol=1e-6)
    weigh_by_cost_(gl, x, power=0)
    assert gl.group_weights == {}
    with pytest.raises(ValueError, match="power"):
        weigh_by_cost_(gl, x, power=-1)


def test_cost_weights_reach_batchnorm_coupled_and_joined_groups():
    from structsparse.budget import weigh_by_cost_
    model = _trained_like()
    x = torch.rand(1, 3, 16, 16)
    for spec in ({"bn1": {"filter": 1e-3}, "channel": 1e-3}, {"filter": 1e-3}):
        gl = GroupLasso(model, spec, example_input=x)
        plain = gl.penalty().item()
        weigh_by_cost_(gl, x)
        fams = gl.families()
        assert {(f.name, f.kind) for f in fams} == set(gl.group_weights)
        expected = sum((f.lam * f.norms()).sum().item() for f in fams)   # lam: the weighted λ
        assert gl.penalty().item() == pytest.approx(expected, rel=1e-5) and expected != pytest.approx(plain)


def test_the_fewest_groups_pass_over_each_collapsing_group_and_find_the_same_answer_as_trying_every_count():
    from structsparse.budget import _fewest

    class Probe:   # group g saves g + 1; zeroing a group in `pins` collapses the model
        def __init__(self, n, pins):
            self.order, self.pins, self.count = list(range(n)), pins, 0

        def __call__(self, k):
            self.count += 1
            chosen = self.order[:k]
            return 1000 - sum(g + 1 for g in chosen), any(g in self.pins for g in chosen)

    for pins in (set(), {3}, {3, 4, 5, 30}, set(range(0, 40, 3))):
        probe = Probe(45, pins)
        k, count = _fewest(probe, 0.5, 1000, "flops", "x")
        order = [g for g in range(45) if g not in pins]   # trying every count of the groups that do not collapse
        expected = next(j for j in range(len(order) + 1) if 1000 - sum(g + 1 for g in order[:j]) <= 500)
        assert (k, probe.order[:k]) == (expected, order[:expected]) and count <= 500
