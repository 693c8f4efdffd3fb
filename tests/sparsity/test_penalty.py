"""GroupLasso: the penalty and its gradient, the proximal step, zeroing, and the spec of λs."""

import pytest
import torch
from torch import nn

from structsparse import GroupLasso
from structsparse.zoo.models import LeNet, MLP
from structsparse.sparsity.penalty import resolve_spec


@pytest.mark.parametrize("compiled", [False, True])
def test_penalty_gradient_matches_formula_and_is_finite_at_zero(compiled):
    torch.manual_seed(0)
    model = LeNet()
    with torch.no_grad():
        model.conv2.weight[3] = 0          # zero filter
        model.conv2.weight[:, 7] = 0       # zero channel
        model.fc1.weight[:, 11] = 0        # zero column
    spec = {"filter": 0.1, "channel": 0.2, "shape": 0.05, "filter2d": 0.01, "depth": 0.3}
    gl = GroupLasso(model, spec, compiled=compiled)
    gl.penalty().backward()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        w = dict(model.named_modules())[name].weight
        assert torch.isfinite(w.grad).all()
        # formula: Σ λ w / ||w_g|| over kinds, with 0 for zero groups, written independently
        expected = torch.zeros_like(w)
        for kind, lam in spec.items():
            if w.dim() == 4:
                dims = {"filter": (1, 2, 3), "channel": (0, 2, 3), "shape": (0,), "filter2d": (2, 3),
                        "depth": (0, 1, 2, 3)}[kind]
            else:
                dims = {"filter": (1,), "channel": (0,), "shape": (0,), "filter2d": None, "depth": (0, 1)}[kind]
            wd = w.detach()
            norm = wd.abs() if dims is None else wd.pow(2).sum(dims, keepdim=True).sqrt()
            expected += lam * torch.where(norm > 0, wd / norm.clamp_min(1e-30), torch.zeros_like(wd))
        assert torch.allclose(w.grad, expected, atol=1e-6), name
    assert model.conv2.weight.grad[3].abs().sum() == 0  # all-zero filter: no shape/filter pull, no NaN


def test_the_compiled_penalty_follows_new_lambdas_and_says_when_it_cannot_compile(monkeypatch):
    from structsparse.sparsity import groups
    torch.manual_seed(0)
    model = LeNet()
    eager, compiled = GroupLasso(model, {"filter": 0.1, "channel": 0.2}), \
        GroupLasso(model, {"filter": 0.1, "channel": 0.2}, compiled=True)
    for gl in (eager, compiled):  # λ that a budget steers: strength, a layer's, one per group
        gl.strength, gl.layer_strength = 3.0, {"conv2": 0.5}
        gl.group_weights = {("fc1", "filter"): torch.linspace(0.5, 2.0, 500).view(500, 1)}
    assert torch.allclose(compiled.penalty(), eager.penalty(), rtol=1e-5)
    monkeypatch.setitem(groups._COMPILED, "fn", lambda *a: (_ for _ in ()).throw(RuntimeError("no compiler")))
    with pytest.warns(RuntimeWarning, match="torch.compile failed .RuntimeError: no compiler.; the group term runs"):
        assert torch.allclose(compiled.penalty(), eager.penalty(), rtol=1e-5)
    assert groups._COMPILED["fn"] is None  # and it stays off, without a warning each step


def test_penalty_value_is_sum_of_unsquared_norms():
    model = MLP()
    gl = GroupLasso(model, {"filter": 0.5})
    expected = sum(0.5 * m.weight.detach().norm(dim=1).sum() for m in (model.fc1, model.fc2, model.fc3))
    assert torch.allclose(gl.penalty(), expected)


def test_biases_and_norm_layers_never_regularised():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4, 2))
    gl = GroupLasso(model, {"filter": 1.0, "channel": 1.0})
    gl.penalty().backward()
    assert model[0].bias.grad is None and model[1].weight.grad is None and model[3].bias.grad is None


def test_prox_step_gives_exact_zeros_and_shrinks_others():
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[:10] *= 1e-3     # small rows: must become exactly zero
    big_before = model.fc2.weight[10:].detach().norm(dim=1)
    gl = GroupLasso(model, {"fc2": {"filter": 0.05}})
    gl.prox_step(lr=1.0)
    w = model.fc2.weight.detach()
    assert (w[:10] == 0).all()
    after = w[10:].norm(dim=1)
    survived = after > 0
    # surviving groups shrink by exactly lr·λ in norm
    assert torch.allclose(after[survived], big_before[survived] - 0.05, atol=1e-5)
    assert (model.fc1.weight != 0).all()  # untouched layer


def test_prox_step_uses_each_params_lr():
    model = MLP()
    opt = torch.optim.SGD([{"params": [model.fc1.weight], "lr": 0.0},
                           {"params": [p for n, p in model.named_parameters() if n != "fc1.weight"], "lr": 100.0}])
    before = model.fc1.weight.detach().clone()
    GroupLasso(model, {"filter": 1.0}).prox_step(optimizer=opt)
    assert torch.equal(model.fc1.weight.detach(), before)
    assert (model.fc2.weight == 0).all()


def test_zero_small_matches_paper_threshold():
    model = MLP()
    with torch.no_grad():
        model.fc1.weight[0, 0] = 5e-5
        model.fc1.weight[0, 1] = 2e-4
    GroupLasso(model, {"filter": 1e-3}).zero_small_()
    assert model.fc1.weight[0, 0] == 0 and model.fc1.weight[0, 1] == 2e-4


def test_zero_groups_relative_threshold_is_per_layer_and_kind():
    model = LeNet()
    with torch.no_grad():
        w = model.conv2.weight
        w.fill_(1.0)
        w[:, 0, 0, 0] = 0.05     # column norm 0.05·√50 against the largest √50: below 0.1 of it
        w[:, 1, 0, 0] = 0.2      # 0.2 of the largest: kept
        w[:, 2, 0, 0] = 0.0      # already zero: not counted again
        model.conv1.weight.fill_(1.0)
        model.conv1.weight[3] *= 1e-3   # a small conv1 filter: its kind is not in the mapping
    gl = GroupLasso(model, {"conv1": {"filter": 0.1}, "conv2": {"shape": 0.1, "filter": 0.1}})
    assert gl.zero_groups_(relative={"shape": 0.1}) == 1
    assert (model.conv2.weight[:, 0, 0, 0] == 0).all()
    assert (model.conv2.weight[:, 1, 0, 0] == 0.2).all()
    assert (model.conv1.weight[3] != 0).all()
    # a single fraction applies to every kind; an absolute threshold still works beside it
    assert gl.zero_groups_(relative=0.01) == 1 and (model.conv1.weight[3] == 0).all()
    with torch.no_grad():
        model.conv2.weight[:, 4, 2, 2] = 1e-3
    assert gl.zero_groups_(threshold=0.1, relative=1e-6) == 1 and (model.conv2.weight[:, 4, 2, 2] == 0).all()
    assert (model.conv2.weight[:, 5] == 1).all()


def test_spec_patterns_override_defaults():
    lam = resolve_spec(LeNet(), {"filter": 1e-3, "conv*": {"channel": 2e-3}, "fc2": {"filter": 0}})
    assert lam == {"conv1": {"filter": 1e-3, "channel": 2e-3}, "conv2": {"filter": 1e-3, "channel": 2e-3},
                   "fc1": {"filter": 1e-3}}


@pytest.mark.parametrize("spec, message", [
    ({"filtr": 1e-3}, "filtr"),
    ({"conv*": {"chanel": 1.0}}, "chanel"),
    ({"filter": -1.0}, "filter"),
    ({"filter": float("nan")}, "filter"),
    ({"filter": "big"}, "filter"),
    ({"nothing*": {"filter": 1.0}}, "nothing"),
])
def test_bad_specs_name_the_key(spec, message):
    with pytest.raises(ValueError, match=message):
        GroupLasso(LeNet(), spec)


def _shrink_kind_by_kind(weight, steps, groups):
    """Reference: each kind's proximal map on the weight as the last one left it, norms written independently."""
    view = weight.clone()
    if groups > 1:
        view = view.view(groups, view.shape[0] // groups, *view.shape[1:])
    conv = weight.dim() == 4
    dims = {"filter": (-3, -2, -1) if conv else (1,), "channel": (-4, -2, -1) if conv else (0,),
            "shape": (-4,) if conv else (0,), "depth": tuple(range(view.dim()))}
    for kind, step in steps:
        norm = view.pow(2).sum(dims[kind], keepdim=True).sqrt()
        view = view * (1 - step / norm.clamp_min(1e-30)).clamp_min(0)
    return view.reshape(weight.shape)


@pytest.mark.parametrize("shape,groups", [((12, 6, 3, 3), 1), ((12, 3, 3, 3), 2), ((9, 14), 1), ((8, 1, 3, 3), 8)])
@pytest.mark.parametrize("order", [("filter", "channel", "shape"), ("shape", "filter", "depth", "channel")])
@pytest.mark.parametrize("factored_from", [0, 1 << 30])   # the factored way, and kind by kind
def test_shrink_groups_matches_kind_by_kind(shape, groups, order, factored_from, monkeypatch):
    from structsparse.sparsity import groups as groups_module
    from structsparse.sparsity.groups import group_norms, shrink_groups_
    monkeypatch.setattr(groups_module, "_FACTORED_FROM", factored_from)
    torch.manual_seed(1)
    w = torch.randn(*shape)
    w[2] *= 1e-3                             # a weak filter, zeroed by the first step that reaches it
    steps = []
    for kind in order:                       # each step zeroes some groups and shrinks the others
        norms = group_norms(_shrink_kind_by_kind(w, steps, groups), kind, groups, keepdim=True)
        ranked = norms.flatten().sort().values
        k = max(1, norms.numel() // 3)         # between two norms, so that rounding cannot decide a zero
        upper = ranked[k] if k < ranked.numel() else 0.0  # the one depth group: shrunk to half, not zeroed
        steps.append((kind, float(ranked[k - 1] + upper) / 2))
    if shape == (12, 6, 3, 3):               # a λ per channel group (as coupled columns give)
        steps[1] = ("channel", torch.linspace(0, 2, 6).view(1, -1, 1, 1) * steps[1][1])
    expected = _shrink_kind_by_kind(w, steps, groups)
    got = w.clone()
    shrink_groups_(got, steps, groups)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(got == 0, expected.abs() < 1e-12)    # the same exact zeros
    assert (got == 0).any() and (got != 0).any()
    transposed = w.clone().transpose(0, -1).contiguous().transpose(0, -1)  # a weight that is not contiguous
    shrink_groups_(transposed, steps, groups)
    assert torch.allclose(transposed, expected, atol=1e-6)


def test_a_layers_strength_multiplies_its_lambdas_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3))
    x = torch.rand(1, 2, 8, 8)
    gl = GroupLasso(model, {"filter": 0.5, "channel": 0.5}, example_input=x)
    whole = gl.penalty().item()
    gl.layer_strength = {"0": 0.0}
    only_second = gl.penalty().item()
    gl.layer_strength = {"2": 0.0}
    assert only_second + gl.penalty().item() == pytest.approx(whole) and 0 < only_second < whole
    gl.layer_strength = {"0": 0.0, "2": 3.0}
    first, second = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    gl.prox_step(lr=0.01)
    assert torch.equal(model[0].weight, first) and not torch.equal(model[2].weight, second)
    shrunk = GroupLasso(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3)), {"filter": 0.5,
                                                                                          "channel": 0.5})
    shrunk.model[2].weight.data.copy_(second)
    shrunk.model[0].weight.data.copy_(first)
    shrunk.layer_strength = {"0": 0.0}
    shrunk.prox_step(lr=0.03)        # λ·lr·3 = λ·(3·lr): the layer's strength scales its step
    assert torch.allclose(shrunk.model[2].weight, model[2].weight)
