"""The Trainer: phases, their keys, and the hooks that peers and experiments train through."""

import pytest
import torch



def test_relative_threshold_phase_key_zeroes_at_phase_end():
    """``zero_groups_below_relative`` in a phase: at its end, groups below the fraction of their layer's largest are zero."""
    from structsparse.runner.recipe import parse_recipe
    from structsparse.runner.trainer import Split, Trainer
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    phases = [{"name": "ssl", "epochs": 1, "lr": 0.01, "lambdas": {"fc1": {"filter": 1e-3}},
               "zero_groups_below_relative": {"filter": 0.97}}]
    recipe = parse_recipe({"model": "mlp", "data": "mnist", "batch_size": 8, "phases": phases})
    lines = []
    t = Trainer(recipe, {s: Split(x, y) for s in ("train", "val", "test")}, progress=False, log=lines.append)
    t.run()
    norms = t.model.fc1.weight.detach().norm(dim=1)
    kept = norms[norms > 0]
    assert 0 < len(kept) < 500 and kept.min() >= 0.97 * kept.max()
    assert any(f"zeroed {500 - len(kept)} groups with norm < {{'filter': 0.97}}" in s for s in lines)
    assert "zero_groups_below_relative" not in parse_recipe({"model": "mlp", "data": "mnist", "phases": [
        {"name": "a", "epochs": 1, "lr": 0.1}]}).to_dict()["phases"][0]


def test_phase_dropout_sets_the_rate_for_that_phase_only():
    """A phase's ``dropout`` sets every dropout layer's rate during that phase; the others use the model's."""
    from structsparse.runner.recipe import RecipeError, parse_recipe
    from structsparse.runner.trainer import Split, Trainer
    seen = []
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    recipe = parse_recipe({"model": "mlp", "data": "mnist", "model_args": {"dropout": 0.1}, "batch_size": 4,
                           "phases": [{"name": "a", "epochs": 1, "lr": 0.01},
                                      {"name": "b", "epochs": 1, "lr": 0.01, "dropout": 0.4},
                                      {"name": "c", "epochs": 1, "lr": 0.01}]})
    assert recipe.phases[1].dropout == 0.4 and "dropout" not in recipe.to_dict()["phases"][0]
    t = Trainer(recipe, {s: Split(x, y) for s in ("train", "val", "test")}, progress=False, log=lambda s: None,
                on_epoch_end=lambda tr, p, e: seen.append((tr.model.drop1.p, tr.model.drop2.p)))
    t.run()
    assert seen == [(0.1, 0.1), (0.4, 0.4), (0.1, 0.1)]
    with pytest.raises(RecipeError, match=r"phases\[0\]\.dropout: model 'lenet' has no dropout layers"):
        parse_recipe({"model": "lenet", "data": "mnist", "phases": [{"name": "a", "epochs": 1, "lr": 0.1,
                                                                     "dropout": 0.2}]})
    with pytest.raises(RecipeError, match=r"phases\[0\]\.dropout: must be <= 0.99"):
        parse_recipe({"model": "mlp", "data": "mnist", "phases": [{"name": "a", "epochs": 1, "lr": 0.1,
                                                                   "dropout": 1.0}]})


def _tiny(phases, **extra):
    from structsparse.runner.recipe import parse_recipe
    from structsparse.runner.trainer import Split
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    recipe = parse_recipe({"model": "lenet", "data": "mnist", "batch_size": 8, "phases": phases, **extra})
    return recipe, {s: Split(x, y) for s in ("train", "val", "test")}


PHASES = [{"name": "dense", "epochs": 1, "lr": 0.05},
          {"name": "ssl", "epochs": 2, "lr": 0.05, "lambdas": {"conv2": {"filter": 0.5}}}]


def test_after_step_hook_runs_after_every_step_with_the_trainer_and_optimizer():
    from structsparse.runner.trainer import Trainer
    recipe, splits = _tiny(PHASES)
    seen = []
    t = Trainer(recipe, splits, progress=False, log=lambda s: None,
                after_step=lambda trainer, opt: seen.append((trainer, opt.param_groups[0]["lr"])))
    t.run()
    assert len(seen) == 3 * 4 and all(tr is t for tr, _ in seen) and {lr for _, lr in seen} == {0.05}


def test_a_compiled_penalty_phase_trains_as_the_uncompiled_one():
    """``compile_penalty: true`` (method penalty) reaches GroupLasso(compiled=True): the same steps, up to rounding."""
    from structsparse.runner.trainer import Trainer
    models = []
    for compiled in (False, True):
        phases = [PHASES[0], {**PHASES[1], "method": "penalty", "compile_penalty": compiled}]
        recipe, splits = _tiny(phases)
        assert recipe.phases[1].compile_penalty is compiled
        t = Trainer(recipe, splits, progress=False, log=lambda s: None)
        t.run()
        models.append(t.model.state_dict())
    assert all(torch.allclose(models[0][k], models[1][k], atol=1e-5) for k in models[0])


def test_run_phase_on_a_callers_model_takes_the_same_steps_as_run():
    """A peer that trains its own model through ``run_phase(p)`` sees phase p's batches, as ``run()`` does."""
    from structsparse.runner.trainer import Trainer
    from structsparse.zoo.models import LeNet
    recipe, splits = _tiny(PHASES)
    whole = Trainer(recipe, splits, progress=False, log=lambda s: None)
    start = {k: v.clone() for k, v in whole.model.state_dict().items()}
    whole.run()
    model = LeNet()
    model.load_state_dict(start)
    part = Trainer(recipe, splits, progress=False, log=lambda s: None, model=model)
    part.run_phase(0)
    part.run_phase(1)
    assert part.model is model
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    assert [h["epoch"] for h in part.history] == [1, 1, 2]


@pytest.mark.parametrize("target, message", [
    ({"flops": 0}, r"phases\[1\]\.target\.flops: must be > 0"),
    ({"flops": 1.5}, r"phases\[1\]\.target\.flops: must be <= 1"),
    ({"latency": 2}, r"phases\[1\]\.target\.latency: must be <= 1"),
    ({"flop": 0.5}, r"phases\[1\]\.target\.flop"),
    ({}, r"phases\[1\]\.target: expected one budget, \{flops: f\}, \{params: f\} or \{latency: f\}"),
    ({"flops": 0.5, "params": 0.5}, r"phases\[1\]\.target: expected one budget"),
    ({"params": 0}, r"phases\[1\]\.target\.params: must be > 0"),
])
def test_bad_budgets_name_the_key(target, message):
    from structsparse.runner.recipe import RecipeError
    with pytest.raises(RecipeError, match=message):
        _tiny([PHASES[0], {**PHASES[1], "target": target}])


def test_cost_weight_shrink_and_hold_need_a_target_and_good_values():
    from structsparse.runner.recipe import RecipeError
    for key, value in (("cost_weight", 1), ("shrink", "chosen"), ("hold", True)):
        with pytest.raises(RecipeError, match=rf"phases\[1\]\.{key}: steers the group term .* needs a target"):
            _tiny([PHASES[0], {**PHASES[1], key: value}])
    with pytest.raises(RecipeError, match=r"phases\[1\]\.shrink: unknown shrink 'some' \(str\); known: chosen, all"):
        _tiny([PHASES[0], {**PHASES[1], "target": {"flops": 0.5}, "shrink": "some"}])
    with pytest.raises(RecipeError, match=r"phases\[1\]\.cost_weight: must be >= 0"):
        _tiny([PHASES[0], {**PHASES[1], "target": {"flops": 0.5}, "cost_weight": -1}])
    with pytest.raises(RecipeError, match=r"phases\[1\]\.hold: expected true or false"):
        _tiny([PHASES[0], {**PHASES[1], "target": {"flops": 0.5}, "hold": "yes"}])


def test_a_cost_weighted_target_phase_weighs_its_groups_by_cost(monkeypatch):
    from structsparse.runner import trainer
    phases = [PHASES[0], {"name": "ssl", "epochs": 1, "lr": 0.05, "target": {"flops": 0.5}, "cost_weight": 1,
                          "shrink": "all"}]
    recipe, splits = _tiny(phases)
    seen, weigh = [], trainer.weigh_by_cost_
    monkeypatch.setattr(trainer, "weigh_by_cost_", lambda gl, *a: (weigh(gl, *a), seen.append(gl)))
    trainer.Trainer(recipe, splits, progress=False, log=lambda s: None).run()
    weights = seen[-1].group_weights
    conv1, fc1 = weights["conv1", "filter"].flatten(), weights["fc1", "filter"].flatten()
    assert conv1.min() > 1 > fc1.max()   # a conv1 filter does more multiply-adds than an fc1 row


def test_a_chosen_shrink_phase_weighs_only_the_groups_the_budget_would_zero(monkeypatch):
    from structsparse.runner import trainer
    phases = [PHASES[0], {"name": "ssl", "epochs": 1, "lr": 0.05, "target": {"flops": 0.5}}]
    recipe, splits = _tiny(phases)
    assert (recipe.phases[1].shrink, recipe.phases[1].cost_weight) == ("chosen", 1.0)   # a target phase's defaults
    seen, choose = [], trainer.chosen_groups
    monkeypatch.setattr(trainer, "chosen_groups", lambda gl, *a, **k: seen.append((gl, choose(gl, *a, **k)))
                        or seen[-1][1])
    t = trainer.Trainer(recipe, splits, progress=False, log=lambda s: None)
    t.run()
    gl, chosen = seen[-1]
    assert 0 < sum(int(c.sum()) for c in chosen) < sum(c.numel() for c in chosen)
    for fam, c in zip(gl.families(), chosen):   # the chosen keep their weight by cost, the others rest
        w = gl.group_weights[fam.name, fam.kind]
        assert torch.equal(w, t._cost_weights[fam.name, fam.kind] * c) and bool((w[c] > 0).all())


def test_a_target_phase_ends_at_or_under_its_budget_and_says_so():
    from structsparse import compact
    from structsparse.report import count_macs
    from structsparse.runner.trainer import Trainer
    phases = [PHASES[0], {"name": "ssl", "epochs": 1, "lr": 0.05, "target": {"flops": 0.3}},
              {"name": "tune", "epochs": 1, "lr": 0.01, "freeze": True}]
    recipe, splits = _tiny(phases)
    assert recipe.phases[1].lambdas == {"filter": 1e-4, "channel": 1e-4}   # the model-wide default groups
    lines = []
    t = Trainer(recipe, splits, progress=False, log=lines.append)
    out = t.run()
    model, x = t.finish(), splits["train"].images[:2]
    fraction = count_macs(compact(model, x), x) / count_macs(model, x)
    budget = out["budget"]["ssl"]
    assert fraction <= 0.3 and abs(budget["reached"] - fraction) < 1e-9 and budget["target"] == 0.3
    assert any("budget 0.3 of the dense multiply-adds" in line for line in lines)


def test_a_target_phase_without_lambdas_regularises_the_batchnorm_channels_of_a_batchnorm_model():
    from structsparse.runner.recipe import parse_recipe
    phases = [{"name": "ssl", "epochs": 1, "lr": 0.05, "target": {"flops": 0.5}}]
    resnet = parse_recipe({"model": "resnet20", "model_args": {"in_channels": 1}, "data": "fashion-mnist",
                           "phases": phases})
    lambdas = resnet.phases[0].lambdas   # a conv's own groups are scale-free under the BatchNorm after it
    assert len(lambdas) == 19 and lambdas["bn1"] == lambdas["layer3.2.bn2"] == {"filter": 1e-4}
    lenet = parse_recipe({"model": "lenet", "data": "mnist", "phases": phases})
    assert lenet.phases[0].lambdas == {"filter": 1e-4, "channel": 1e-4}


def test_the_brake_rests_the_group_term_within_the_epoch_the_target_is_reached(monkeypatch):
    from structsparse.runner import trainer as trainer_module
    from structsparse.runner.trainer import Trainer
    seen = iter([1.0, 0.95, 0.85] + [0.85] * 100)
    monkeypatch.setattr(trainer_module, "kept_fraction", lambda model, x, metric, table, lowered_below: next(seen))
    phases = [{"name": "ssl", "epochs": 2, "lr": 0.05, "target": {"flops": 0.9}}]
    recipe, splits = _tiny(phases)   # 4 steps an epoch: checked after every step
    lines = []
    t = Trainer(recipe, splits, progress=False, log=lines.append)
    t.run()
    assert ("[ssl 1/2] step 3/4: at the budget (0.8500 of the dense multiply-adds); the group term rests, "
            "its zeros held") in lines
    assert t.history[0]["strength"] == 0.0   # what the term had at the end of the epoch


@pytest.mark.parametrize("hold", [True, False])
def test_a_held_budget_keeps_its_zeros_while_the_term_rests(monkeypatch, hold):
    from structsparse.runner import trainer as trainer_module
    from structsparse.runner.trainer import Trainer
    monkeypatch.setattr(trainer_module, "kept_fraction", lambda *a: 0.85)   # at the target from the first check
    cuts, cut = [], trainer_module.zero_to_budget_
    monkeypatch.setattr(trainer_module, "zero_to_budget_", lambda *a, **kw: (cuts.append(kw["give_back"]),
                                                                             cut(*a, **kw))[1])
    phases = [{"name": "ssl", "epochs": 2, "lr": 0.05, "target": {"flops": 0.9}, "hold": hold,
               "lambdas": {"conv2": {"filter": 1e-4}}, "zero_weights_below": None}]
    recipe, splits = _tiny(phases)
    after_epoch_1 = []
    t = Trainer(recipe, splits, progress=False, log=lambda s: None,
                on_epoch_end=lambda tr, p, e: after_epoch_1.append(tr.model.conv2.weight[0].abs().sum().item()))
    with torch.no_grad():   # a zero filter whose output the loss still reads (its bias passes the ReLU)
        t.model.conv2.weight[0] = 0.0
        t.model.conv2.bias[0] = 0.5
    t.run()
    assert (after_epoch_1[0] == 0.0) == hold   # held; else the gradient brings it back while the term rests
    assert (t.masks is not None) == hold
    assert cuts == [32 if hold else 0]   # the end's cut gives back only when the phase holds


def test_a_parameter_budget_steers_on_the_compacted_models_parameters():
    from structsparse import compact
    from structsparse.report import count_params
    from structsparse.runner.trainer import Trainer
    phases = [PHASES[0], {"name": "ssl", "epochs": 2, "lr": 0.05, "target": {"params": 0.2}},
              {"name": "tune", "epochs": 1, "lr": 0.01, "freeze": True}]
    recipe, splits = _tiny(phases)
    lines = []
    t = Trainer(recipe, splits, progress=False, log=lines.append)
    out = t.run()
    model, x = t.finish(), splits["train"].images[:2]
    fraction = count_params(compact(model, x)) / count_params(model)
    budget = out["budget"]["ssl"]
    assert budget["metric"] == "params" and fraction <= 0.2 and abs(budget["reached"] - fraction) < 1e-9
    ssl = [r for r in t.history if r["phase"] == "ssl"]
    assert [r["budget_reached"] for r in ssl] == [r["compact_params_fraction"] for r in ssl]
    assert ssl[-1]["compact_params_fraction"] == pytest.approx(fraction)
    assert any("budget 0.2 of the dense parameters" in line for line in lines)


def test_a_latency_budget_measures_its_table_once_saves_it_with_the_run_and_steers_on_it(tmp_path, monkeypatch):
    from helpers import proportional_table
    from structsparse import compact
    from structsparse.runner.trainer import LATENCY_TABLE, Trainer
    from structsparse.speed.table import LatencyTable
    monkeypatch.setattr(LatencyTable, "build", proportional_table)   # the budget's plumbing, not the machine's load
    phases = [PHASES[0], {"name": "ssl", "epochs": 2, "lr": 0.05, "target": {"latency": 0.7}},
              {"name": "tune", "epochs": 1, "lr": 0.01, "freeze": True}]
    recipe, splits = _tiny(phases, measure={"threads": 1, "batch_sizes": [4, 1]})   # timed at the first
    lines = []

    def stop(trainer, p, e):
        if p == 1 and e == 0:
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(recipe, splits, checkpoint_dir=tmp_path, progress=False, log=lines.append, on_epoch_end=stop).run()
    table = LatencyTable.load(tmp_path / LATENCY_TABLE)
    assert any("ssl: measuring the latency table (batch 4, 1 threads)" in line for line in lines) and table.batch == 4
    lines.clear()
    t = Trainer(recipe, splits, checkpoint_dir=tmp_path, progress=False, log=lines.append)
    out = t.run(resume=True)
    assert any(f"the latency table of {tmp_path / LATENCY_TABLE}" in line for line in lines)
    assert t.latency_table == table                            # reused, not measured again
    model, x = t.finish(), splits["train"].images[:2]
    budget = out["budget"]["ssl"]
    reached = table.fraction(compact(model, x, channels_last=False))
    assert budget["metric"] == "latency" and reached <= 0.7 and budget["reached"] == pytest.approx(reached)
    ssl = [r for r in t.history if r["phase"] == "ssl"]
    assert [r["budget_reached"] for r in ssl] == [r["compact_latency_fraction"] for r in ssl]
    assert any("budget 0.7 of the dense latency" in line for line in lines)


def test_a_per_layer_budget_steers_each_layer_to_its_own_target(tmp_path):
    from structsparse.budget import layer_fractions
    from structsparse.runner.runlog import csv_table, plot_history
    from structsparse.runner.trainer import Trainer
    phases = [PHASES[0], {"name": "ssl", "epochs": 2, "lr": 0.05, "target": {"flops": {"conv2": 0.3, "conv1": 0.5}}},
              {"name": "tune", "epochs": 1, "lr": 0.01, "freeze": True}]
    recipe, splits = _tiny(phases)
    assert recipe.phases[1].target == {"flops": {"conv1": 0.5, "conv2": 0.3}}          # in the model's order
    assert recipe.phases[1].lambdas == {"filter": 1e-4, "channel": 1e-4}   # model-wide; untargeted layers rest
    lines = []
    t = Trainer(recipe, splits, progress=False, log=lines.append)
    out = t.run()
    model, x = t.finish(), splits["train"].images[:2]
    fractions = layer_fractions(model, x)
    budget = out["budget"]["ssl"]
    assert fractions["conv1"] <= 0.5 and fractions["conv2"] <= 0.3 and budget["reached"] == {
        "conv1": pytest.approx(fractions["conv1"]), "conv2": pytest.approx(fractions["conv2"])}
    ssl = [r for r in t.history if r["phase"] == "ssl"]
    assert set(ssl[0]["budget_goal"]) == set(ssl[0]["next_level"]) == {"conv1", "conv2"}
    assert ssl[0]["strength"]["fc1"] == ssl[0]["strength"]["fc2"] == 0.0 < ssl[0]["next_level"]["conv2"]
    for w in (t.model.fc1.weight, t.model.fc2.weight):   # no group of theirs was zeroed
        assert w.abs().sum(0).ne(0).all() and w.abs().sum(1).ne(0).all()
    assert ssl[-1]["compact_layer_flop_fractions"]["conv2"] == pytest.approx(fractions["conv2"])
    assert any("budget conv1 0.5 of its multiply-adds: " in line for line in lines)
    header, rows = csv_table(t.history)
    assert {"budget_goal_conv1", "next_strength_conv2"} - set(header) == {"next_strength_conv2"}
    assert rows[1][header.index("budget_goal_conv2")] == ssl[0]["budget_goal"]["conv2"]
    plot_history(tmp_path / "sparsity.png", t.history)


@pytest.mark.parametrize("target, message", [
    ({"flops": {"pool1": 0.5}}, r"phases\[1\]\.target\.flops\.pool1: not a Conv2d or Linear layer of the model; "
                                r"its layers: conv1, conv2, fc1, fc2"),
    ({"flops": {"conv1": 0}}, r"phases\[1\]\.target\.flops\.conv1: must be > 0"),
    ({"flops": {}}, r"phases\[1\]\.target\.flops: expected a fraction, or \{layer: fraction\}"),
])
def test_bad_per_layer_budgets_name_the_layer(target, message):
    from structsparse.runner.recipe import RecipeError
    with pytest.raises(RecipeError, match=message):
        _tiny([PHASES[0], {**PHASES[1], "target": target}])


def test_an_unreachable_budget_ends_the_phase_with_one_line_naming_the_target():
    from structsparse.budget import BudgetError
    from structsparse.runner.trainer import Trainer
    phases = [{"name": "ssl", "epochs": 1, "lr": 0.05, "lambdas": {"fc2": {"filter": 0.01}}, "target": {"flops": 0.05}}]
    recipe, splits = _tiny(phases)
    with pytest.raises(BudgetError, match=r"phase 'ssl' target\.flops: 0\.05 of the dense multiply-adds cannot be "
                                          r"reached: .* keeps \d\.\d+"):
        Trainer(recipe, splits, progress=False, log=lambda s: None).run()


def test_the_budget_goal_runs_from_one_to_the_target_over_three_quarters_of_the_phase():
    from structsparse.runner.trainer import budget_goal
    assert [budget_goal(0.25, e, 4) for e in range(4)] == [0.75, 0.5, 0.25, 0.25]
    assert budget_goal(0.4, 0, 1) == pytest.approx(0.4)


@pytest.mark.parametrize("reached, level, strength", [
    (0.8, 3.0, 3.0), (0.95, 4.0, 4.0),           # over the goal (0.75): 1.5x per 0.1 of the gap, at most 2x
    (0.7, 2 / 1.5, 2 / 1.5), (0.45, 1.0, 1.0),   # under it: the same, down
    (0.74, 2.0, 2.0), (None, 2.0, 2.0),          # within the band, or nothing measured: as it was
    (0.2, 1.0, 0.0)])                            # at or under the target itself: the group term rests
def test_the_controller_steers_every_lambda_towards_the_goal_and_rests_at_the_target(reached, level, strength):
    from structsparse.runner.recipe import Phase
    from structsparse.runner.trainer import steer
    phase = Phase("ssl", 4, 0.1, target={"flops": 0.25})
    out = steer(2.0, phase, 0, reached)      # the goal after epoch 1 of 4 is 0.75
    assert out == {"budget_goal": 0.75, "budget_reached": reached, "next_level": pytest.approx(level),
                   "next_strength": pytest.approx(strength)}


def test_a_stronger_group_term_shrinks_more():
    from structsparse import GroupLasso
    from structsparse.zoo.models import build_model
    torch.manual_seed(0)
    a = build_model("lenet")
    b = build_model("lenet")
    b.load_state_dict(a.state_dict())
    ga, gb = GroupLasso(a, {"filter": 0.01}), GroupLasso(b, {"filter": 0.01})
    gb.strength = 3.0
    assert float(gb.penalty().detach()) == pytest.approx(3 * float(ga.penalty().detach()))
    ga.prox_step(lr=0.3)
    gb.prox_step(lr=0.1)         # three times the strength at a third of the step: the same shrinkage
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


class _Stop(Exception):
    pass


def test_a_resumed_budget_phase_goes_on_with_the_strength_it_had(tmp_path):
    from structsparse.runner.trainer import Trainer
    # unweighted λs: this tiny phase then does not reach its target early, and no brake rests the strengths
    phases = [{"name": "ssl", "epochs": 3, "lr": 0.05, "target": {"flops": 0.3}, "cost_weight": 0}]
    recipe, splits = _tiny(phases)
    whole = Trainer(recipe, splits, progress=False, log=lambda s: None).run()["history"]
    assert whole[0]["strength"] > 1.0      # the starting strength, from the groups' norms (λ = 1e-4 is tiny)
    assert [r["strength"] for r in whole[1:]] == [r["next_strength"] for r in whole[:-1]]

    def stop(trainer, p, e):
        if e == 0:
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(recipe, splits, checkpoint_dir=tmp_path, progress=False, log=lambda s: None, on_epoch_end=stop).run()
    resumed = Trainer(recipe, splits, checkpoint_dir=tmp_path, progress=False, log=lambda s: None).run(resume=True)
    assert [r["strength"] for r in resumed["history"]] == [r["strength"] for r in whole]


def test_after_the_ramp_the_controller_strengthens_only_when_it_holds():
    from structsparse.runner.recipe import Phase
    from structsparse.runner.trainer import steer
    phase = Phase("ssl", 4, 0.1, target={"flops": 0.25})   # the ramp is 3 epochs: the goal is 0.25 from epoch 3
    assert steer(2.0, phase, 2, 0.5)["next_level"] == 2.0   # over: the end of the phase closes the gap
    assert steer(2.0, phase, 1, 0.8)["next_level"] == 4.0   # still ramping (goal 0.5): stronger
    held = Phase("ssl", 4, 0.1, target={"flops": 0.25}, hold=True)
    assert steer(2.0, held, 2, 0.5)["next_level"] == 4.0    # over: on towards the target
    assert steer(2.0, held, 3, 0.26)["next_level"] == 2.0   # within the band
    small = Phase("ssl", 4, 0.1, target={"flops": 0.08}, hold=True)
    assert steer(2.0, small, 3, 0.095)["next_level"] == 3.0  # a tenth of a small target is the band
    assert steer(2.0, small, 1, 0.40)["next_level"] == 2.0   # while ramping (goal 0.387): 0.02



def test_structures_that_come_back_during_ssl_are_logged_and_recorded(monkeypatch):
    """Proximal SGD is not monotone: when more filters or channels are nonzero than the epoch before, the log says
    so and the epoch's record keeps the net counts (not in a phase without a group term)."""
    from structsparse.runner.trainer import Trainer, came_back
    assert came_back({"a": [5, 20, 9, 20]}, {"a": [6, 20, 13, 20], "b": [1, 1, 1, 1]}) == {"a": [1, 4]}
    assert came_back({"a": [5, 20, 9, 20]}, {"a": [4, 20, 9, 20]}) == {}
    counts = iter([[20, 20, 1, 1], [12, 20, 1, 1], [14, 20, 1, 1], [15, 20, 1, 1]])
    monkeypatch.setattr(Trainer, "_sparsity", lambda self: ({}, {"conv1": next(counts)}))
    recipe, splits = _tiny([{"name": "dense", "epochs": 1, "lr": 0.01},
                            {"name": "ssl", "epochs": 2, "lr": 0.01, "lambdas": {"conv1": {"filter": 1e-3}}},
                            {"name": "tune", "epochs": 1, "lr": 0.01}])
    lines = []
    t = Trainer(recipe, splits, progress=False, log=lines.append)
    t.run()
    assert [r.get("came_back") for r in t.history] == [None, None, {"conv1": [2, 0]}, None]
    assert sum("came back" in s for s in lines) == 1
    assert "[ssl 2/2] came back since the last epoch (net; a group whose gradient outweighs its λ leaves zero): " \
           "conv1 2 filters, 0 channels" in lines
