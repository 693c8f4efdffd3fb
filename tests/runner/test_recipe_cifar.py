"""Recipe keys for the CIFAR experiments (model_args, augment, cifar10) and their use by the Trainer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from structsparse.storage import checkpoint as ckpt
from structsparse.runner import trainer as train_mod
from structsparse.sparsity.penalty import resolve_spec
from structsparse.zoo.models import build_model
from structsparse.runner.recipe import Augment, RecipeError, load_recipe, parse_recipe
from structsparse.runner.trainer import Split, Trainer

ROOT = Path(__file__).resolve().parents[2]


def _base(**top) -> dict:
    return {"model": "resnet20", "data": "cifar10",
            "phases": [{"name": "dense", "epochs": 1, "lr": 0.1}], **top}


def _error(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    return msg


@pytest.mark.parametrize("name", ["resnet20_baseline.yaml", "resnet20_depth.yaml", "convnet_ssl.yaml"])
def test_shipped_cifar10_recipes_load(name):
    r = load_recipe(ROOT / "recipes" / "cifar10" / name)
    assert r.data == "cifar10"
    text = (ROOT / "recipes" / "cifar10" / name).read_text()
    assert text.startswith("# NOT RUN on this project's machines")
    if r.model == "resnet20":
        assert r.augment == Augment(crop_padding=4, flip=True) and r.batch_size == 128
        assert all(p.weight_decay == 1e-4 for p in r.phases)


def test_depth_recipe_targets_the_convs_between_shortcut_endpoints():
    r = load_recipe(ROOT / "recipes" / "cifar10" / "resnet20_depth.yaml")
    ssl = next(p for p in r.phases if p.sparsifying)
    resolved = resolve_spec(build_model(r.model, **r.model_args), ssl.lambdas)
    assert len(resolved) == 18 and all(kinds == {"depth": 0.007} for kinds in resolved.values())
    assert all(n.startswith("layer") and ".conv" in n for n in resolved)


def test_model_args_and_augment_parsed():
    r = parse_recipe(_base(model_args={"shortcut": "B", "num_classes": 10}, augment={"crop_padding": 4, "flip": True}))
    assert r.model_args == {"shortcut": "B", "num_classes": 10}
    assert r.augment == Augment(4, True)
    d = r.to_dict()
    assert d["model_args"] == {"shortcut": "B", "num_classes": 10} and d["augment"] == {"crop_padding": 4, "flip": True}


def test_defaults_keep_the_old_recipe_dict():
    r = parse_recipe({**_base(), "model": "lenet", "data": "mnist"})
    assert r.model_args == {} and r.augment is None
    assert "model_args" not in r.to_dict() and "augment" not in r.to_dict()   # old checkpoints still resume
    assert parse_recipe(_base(augment={"crop_padding": 0, "flip": False})).augment is None


@pytest.mark.parametrize("top, where, text", [
    ({"model_args": {"depth": 20}}, "model_args.depth", "not a parameter of model 'resnet20'"),
    ({"model_args": {"shortcut": "C"}}, "model_args", "unknown shortcut 'C'"),
    ({"model_args": ["B"]}, "model_args", "expected a mapping"),
    ({"model": "convnet_cifar", "model_args": {"lrn": "sometimes"}}, "model_args", "unknown lrn"),
    ({"augment": {"crop": 4}}, "augment.crop", "unknown key"),
    ({"augment": {"crop_padding": -1}}, "augment.crop_padding", ">= 0"),
    ({"augment": {"flip": "yes"}}, "augment.flip", "true or false"),
    ({"augment": True}, "augment", "expected a mapping"),
    ({"data": "imagenet"}, "data", "unknown data set"),
])
def test_validation_errors(tmp_path, top, where, text):
    msg = _error(tmp_path, _base(**top))
    assert f": {where}: " in msg and text in msg, msg


def test_lambdas_are_checked_against_the_model_built_with_its_args(tmp_path):
    phases = [{"name": "ssl", "epochs": 1, "lr": 0.1, "lambdas": {"layer2.0.shortcut.0": {"filter": 0.1}}}]
    parse_recipe(_base(model_args={"shortcut": "B"}, phases=phases))
    msg = _error(tmp_path, _base(model_args={"shortcut": "A"}, phases=phases))
    assert "phases[0].lambdas" in msg and "matches no Conv2d, Linear or BatchNorm layer" in msg


# ----------------------------------------------------------------------------- Trainer


def _splits(shape=(1, 28, 28), n=48, seed=0) -> dict[str, Split]:
    g = torch.Generator().manual_seed(seed)
    return {s: Split(torch.rand(k, *shape, generator=g), torch.randint(0, 10, (k,), generator=g))
            for s, k in (("train", n), ("val", 16), ("test", 16))}


def _recipe(augment=None, epochs=2):
    """LeNet on MNIST-shaped random data (cheap); augmentation works on any image batch."""
    return parse_recipe({"model": "lenet", "data": "mnist", "batch_size": 16, "seed": 3, "augment": augment,
                         "phases": [{"name": "dense", "epochs": epochs, "lr": 0.05}]})


def _train(recipe, **kw) -> Trainer:
    t = Trainer(recipe, _splits(), progress=False, log=lambda s: None, **kw)
    t.run(**({"resume": True} if kw.get("checkpoint_dir") else {}))
    return t


def test_trainer_builds_model_with_model_args():
    r = parse_recipe({**_base(model_args={"lrn": "across_channels"}), "model": "convnet_cifar"})
    t = Trainer(r, _splits((3, 32, 32)), progress=False, log=lambda s: None)
    assert isinstance(t.model.norm1, torch.nn.LocalResponseNorm)
    t = Trainer(parse_recipe(_base(model_args={"shortcut": "B"})), _splits((3, 32, 32)), progress=False, log=lambda s: None)
    assert isinstance(t.model.get_submodule("layer2.0.shortcut"), torch.nn.Sequential)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run without and one with augmentation (2 epochs each), recording the augmentation calls."""
    out = {"dir": tmp_path_factory.mktemp("aug")}
    real = train_mod.random_crop_flip
    seen: list = []

    def spy(x, padding, flip, generator):
        seen.append((x.shape[0], padding, flip, generator.initial_seed()))
        return real(x, padding, flip, generator=generator)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "random_crop_flip", spy)
        out["plain"] = _train(_recipe()).model.state_dict()
        out["plain_calls"] = list(seen)
        out["aug"] = _train(_recipe(AUG), checkpoint_dir=out["dir"] / "full").model.state_dict()
        out["aug_calls"] = seen[len(out["plain_calls"]):]
    return out


AUG = {"crop_padding": 2, "flip": True}


def test_trainer_augments_training_batches(runs):
    assert runs["plain_calls"] == []                                    # no augment key: no augmentation
    assert [c[:3] for c in runs["aug_calls"]] == [(16, 2, True)] * 6    # 3 batches × 2 epochs
    seeds = {c[3] for c in runs["aug_calls"]}                           # one generator per epoch, from its seed
    assert seeds == {train_mod.epoch_seed(3, 0, e) ^ train_mod._AUGMENT_SEED for e in (0, 1)}
    assert not all(torch.equal(runs["aug"][k], runs["plain"][k]) for k in runs["aug"])


class _Stop(Exception):
    pass


def test_resume_with_augmentation_is_bit_identical(runs):
    def stop(trainer, p, e):
        if e == 0:
            raise _Stop

    cut = runs["dir"] / "cut"
    with pytest.raises(_Stop):
        _train(_recipe(AUG), checkpoint_dir=cut, on_epoch_end=stop)
    resumed = _train(_recipe(AUG), checkpoint_dir=cut).model.state_dict()
    assert all(torch.equal(runs["aug"][k], resumed[k]) for k in resumed)
    assert ckpt.load_checkpoint(cut).info["recipe"]["augment"] == AUG
