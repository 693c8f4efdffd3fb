"""Recipe loading and strict validation: every error names the file and the key path."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from structsparse.runner.recipe import ALIASES, LRSchedule, RecipeError, load_recipe, parse_recipe, upgrade_keys

ROOT = Path(__file__).resolve().parents[2]


def _base() -> dict:
    return {
        "model": "lenet",
        "data": "mnist",
        "phases": [
            {"name": "dense", "epochs": 1, "lr": 0.01},
            {"name": "ssl", "epochs": 2, "lr": 0.01, "method": "prox",
             "lambdas": {"conv*": {"filter": 0.01}, "conv2": {"channel": 0.02}}},
            {"name": "finetune", "epochs": 1, "lr": 0.001, "freeze": True},
        ],
    }


def _write(tmp_path: Path, data, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _error(tmp_path: Path, data) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    return msg


@pytest.mark.parametrize("name", ["lenet_mnist.yaml", "smoke.yaml"])
def test_shipped_recipes_load(name):
    r = load_recipe(ROOT / "recipes" / name)
    assert r.model == "lenet" and r.data == "mnist"
    assert any(p.sparsifying for p in r.phases) and r.phases[-1].freeze
    assert r.path == str(ROOT / "recipes" / name)


def test_defaults_and_types(tmp_path):
    r = load_recipe(_write(tmp_path, _base()))
    assert r.seed == 0 and r.batch_size == 64 and r.eval_batch_size == 1000
    assert r.train_subset is None and r.data_root is None and r.train_with_val is False
    assert "train_with_val" not in r.to_dict()   # absent at its default: older checkpoints still resume
    dense, ssl, ft = r.phases
    assert not dense.sparsifying and ssl.sparsifying and ft.freeze
    assert dense.momentum == 0.9 and dense.weight_decay == 0.0 and dense.zero_weights_below == 1e-4
    assert dense.lr_schedule == LRSchedule("constant")
    assert ssl.lambdas == {"conv*": {"filter": 0.01}, "conv2": {"channel": 0.02}}
    assert r.measure.batch_sizes == (1, 64) and r.measure.threads is None
    assert r.to_dict()["phases"][1]["lambdas"]["conv2"] == {"channel": 0.02}


def test_exponent_without_dot_is_a_float(tmp_path):
    """PyYAML reads `1e-4` as a string (YAML 1.1); recipes read it as a number."""
    text = yaml.safe_dump(_base()).replace("lr: 0.001", "lr: 1e-3")
    r = load_recipe(_write(tmp_path, text + "seed: 3\n"))
    assert r.phases[2].lr == pytest.approx(1e-3) and r.seed == 3


def test_schedules(tmp_path):
    d = _base()
    d["phases"][0]["epochs"] = 4
    d["phases"][0]["lr_schedule"] = {"kind": "step", "milestones": [2, 3], "gamma": 0.5}
    d["phases"][1]["lr_schedule"] = "cosine"
    r = load_recipe(_write(tmp_path, d))
    assert r.phases[0].lr_schedule == LRSchedule("step", (2, 3), 0.5)
    assert r.phases[1].lr_schedule.kind == "cosine"


def test_zero_lambdas_mean_dense(tmp_path):
    d = _base()
    d["phases"][1]["lambdas"] = {"filter": 0}
    d["phases"].pop()
    assert not load_recipe(_write(tmp_path, d)).phases[1].sparsifying


def test_error_is_value_error():
    assert issubclass(RecipeError, ValueError)


def _mutate(fn):
    d = _base()
    fn(d)
    return d


@pytest.mark.parametrize("mutate, where, text", [
    (lambda d: d.update(epochs=3), "epochs", "unknown key"),
    (lambda d: d["phases"][0].update(lr_decay=0.1), "phases[0].lr_decay", "unknown key"),
    (lambda d: d["phases"][1]["lambdas"].update(filtr=0.1), "phases[1].lambdas.filtr", "unknown group kind"),
    (lambda d: d["phases"][1]["lambdas"]["conv2"].update(chanel=0.1), "phases[1].lambdas.conv2.chanel",
     "unknown group kind"),
    (lambda d: d["phases"][1]["lambdas"].update(filter=-0.1), "phases[1].lambdas.filter", ">= 0"),
    (lambda d: d["phases"][1]["lambdas"]["conv2"].update(channel=-1), "phases[1].lambdas.conv2.channel", ">= 0"),
    (lambda d: d["phases"][1]["lambdas"].update({"conv9": {"filter": 0.1}}), "phases[1].lambdas.conv9", "matches no"),
    (lambda d: d["phases"][1]["lambdas"].update(filter="big"), "phases[1].lambdas.filter", "expected a number"),
    (lambda d: d.update(model="resnet"), "model", "unknown model"),
    (lambda d: d.update(data="cifar100"), "data", "unknown data set"),
    (lambda d: d["phases"][0].update(lr=0), "phases[0].lr", "> 0"),
    (lambda d: d["phases"][0].update(lr=-0.1), "phases[0].lr", "> 0"),
    (lambda d: d["phases"][0].update(epochs=-1), "phases[0].epochs", ">= 0"),
    (lambda d: d["phases"][0].update(epochs=1.5), "phases[0].epochs", "integer"),
    (lambda d: d["phases"][0].update(epochs=True), "phases[0].epochs", "integer"),
    (lambda d: d["phases"][0].update(momentum=1.5), "phases[0].momentum", "<= 1"),
    (lambda d: d["phases"][0].update(weight_decay=-1e-4), "phases[0].weight_decay", ">= 0"),
    (lambda d: d["phases"][1].update(method="adam"), "phases[1].method", "unknown method"),
    (lambda d: d["phases"][1].update(compile_penalty=True), "phases[1].compile_penalty", "needs method: penalty"),
    (lambda d: d["phases"][1].update(method="penalty", compile_penalty="yes"), "phases[1].compile_penalty",
     "true or false"),
    (lambda d: d["phases"][0].update(freeze="yes"), "phases[0].freeze", "true or false"),
    (lambda d: d["phases"][0].update(freeze=True), "phases[0].freeze", "no earlier phase has lambdas"),
    (lambda d: d["phases"][2].update(lambdas={"filter": 0.1}), "phases[2].lambdas", "freeze phase"),
    (lambda d: d["phases"][0].update(zero_groups_below=0.1), "phases[0].zero_groups_below", "needs lambdas"),
    (lambda d: d["phases"][0].update(zero_groups_below_relative=0.1), "phases[0].zero_groups_below_relative",
     "needs lambdas"),
    (lambda d: d["phases"][0].update(group_threshold=0.1), "phases[0].zero_groups_below", "needs lambdas"),  # alias
    (lambda d: d.update(lower_convs_below=1.5), "lower_convs_below", "<= 1"),
    (lambda d: d.update(lowered_below="measure"), "lower_convs_below", "expected a number"),  # alias
    (lambda d: d.update(lowered_below=0.5, lower_convs_below=0.5), "lowered_below", "keep only 'lower_convs_below'"),
    (lambda d: d["phases"][1].update(zero_below=1e-3, zero_weights_below=1e-3), "phases[1].zero_below",
     "also given"),
    (lambda d: d["phases"][1].update(zero_groups_below_relative=1.5), "phases[1].zero_groups_below_relative", "<= 1"),
    (lambda d: d["phases"][1].update(relative_threshold=0), "phases[1].zero_groups_below_relative", "> 0"),
    (lambda d: d["phases"][1].update(zero_groups_below_relative={"shap": 0.1}),
     "phases[1].zero_groups_below_relative.shap", "unknown group kind"),
    (lambda d: d["phases"][1].update(zero_groups_below_relative={}), "phases[1].zero_groups_below_relative",
     "non-empty"),
    (lambda d: d["phases"][0].update(lr_schedule={"kind": "exp"}), "phases[0].lr_schedule.kind", "unknown lr schedule"),
    (lambda d: d["phases"][0].update(lr_schedule={"kind": "step", "milestones": [1]}),
     "phases[0].lr_schedule.milestones", "not inside"),
    (lambda d: d["phases"][0].update(lr_schedule={"kind": "cosine", "gamma": 0.1}),
     "phases[0].lr_schedule.gamma", "only used by the step"),
    (lambda d: d["phases"][1].update(name="dense"), "phases[1].name", "duplicate"),
    (lambda d: d["phases"][0].pop("lr"), "phases[0].lr", "required"),
    (lambda d: d.pop("model"), "model", "required"),
    (lambda d: d.update(phases=[]), "phases", "non-empty list"),
    (lambda d: d.update(batch_size=0), "batch_size", ">= 1"),
    (lambda d: d.update(train_subset="all"), "train_subset", "integer"),
    (lambda d: d.update(train_with_val="yes"), "train_with_val", "true or false"),
    (lambda d: d.update(measure={"batch_sizes": [1, 0]}), "measure.batch_sizes[1]", ">= 1"),
    (lambda d: d.update(measure={"repeat": 3}), "measure.repeat", "unknown key"),
])
def test_validation_errors(tmp_path, mutate, where, text):
    msg = _error(tmp_path, _mutate(mutate))
    assert f": {where}: " in msg, msg
    assert text in msg, msg


def test_bad_files(tmp_path):
    assert "empty" in _error(tmp_path, "")
    assert "not valid YAML" in _error(tmp_path, "model: [lenet\n")
    assert "expected a mapping" in _error(tmp_path, "- 1\n- 2\n")
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_parse_recipe_without_file():
    with pytest.raises(RecipeError, match=r"^<recipe>: model: unknown model"):
        parse_recipe({**_base(), "model": "vgg"})


def test_old_threshold_names_are_aliases_and_old_checkpoints_still_compare_equal():
    """Recipes written with the names before the one grammar load as the new names, and a recipe dict
    stored in an old checkpoint (old names) equals today's to_dict() once upgraded (so --resume works)."""
    old = _base()
    old["lowered_below"] = 1.0
    old["phases"][1].update(zero_below=1e-3, group_threshold=1e-2, relative_threshold={"filter": 0.1})
    new = _base()
    new["lower_convs_below"] = 1.0
    new["phases"][1].update(zero_weights_below=1e-3, zero_groups_below=1e-2,
                            zero_groups_below_relative={"filter": 0.1})
    r_old, r_new = parse_recipe(old), parse_recipe(new)
    assert r_old == r_new and r_new.phases[1].zero_groups_below == 1e-2
    stored = r_new.to_dict()
    renames = {new_: old_ for place in ALIASES.values() for old_, new_ in place.items()}
    stored = {renames.get(k, k): v for k, v in stored.items()}
    stored["phases"] = [{renames.get(k, k): v for k, v in ph.items()} for ph in stored["phases"]]
    assert "lowered_below" in stored and "zero_below" in stored["phases"][1]
    assert stored != r_new.to_dict() and upgrade_keys(stored) == r_new.to_dict()


BILLION_LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
model: [*g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


@pytest.mark.parametrize("text, message", [
    (BILLION_LAUGHS, "aliases .* are not allowed"),
    ("model: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
])
def test_hostile_yaml_is_one_short_error(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message) as e:
        load_recipe(path)
    assert str(e.value).startswith(str(path)) and len(str(e.value)) < 600


def test_a_huge_value_is_quoted_short(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "lenet", "data": "mnist", "phases": [{"name": "a", "epochs": 1, "lr": ["x" * 10] * 10000}]}))
    with pytest.raises(RecipeError, match=r"phases\[0\]\.lr") as e:
        load_recipe(path)
    assert len(str(e.value)) < 400


def test_an_epoch_count_beyond_reason_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "lenet", "data": "mnist", "phases": [{"name": "a", "epochs": 10 ** 12, "lr": 0.1}]}))
    with pytest.raises(RecipeError, match=r"phases\[0\]\.epochs: must be <= 100,000"):
        load_recipe(path)
