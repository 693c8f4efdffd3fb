"""Recipes that start from saved weights (``init_from``), e.g. SSL rows sharing one dense baseline."""
import pytest
import torch
from safetensors.torch import save_file

from structsparse.zoo.models import LeNet, MLP
from structsparse.runner.recipe import RecipeError, parse_recipe
from structsparse.runner.trainer import Split, Trainer

BASE = {"model": "lenet", "data": "mnist", "phases": [{"name": "dense", "epochs": 0, "lr": 0.01}]}


def splits():
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    return {s: Split(x, y) for s in ("train", "val", "test")}


def test_trainer_starts_from_the_saved_weights(tmp_path):
    torch.manual_seed(123)
    saved = LeNet()
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, tmp_path / "w.safetensors")
    recipe = parse_recipe({**BASE, "init_from": str(tmp_path / "w.safetensors")})
    trainer = Trainer(recipe, splits(), log=lambda s: None)
    for k, v in saved.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[k], v)
    fresh = Trainer(parse_recipe(BASE), splits(), log=lambda s: None)
    assert not torch.equal(fresh.model.conv1.weight, saved.conv1.weight)


def test_missing_or_mismatched_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        Trainer(parse_recipe({**BASE, "init_from": str(tmp_path / "nothere.safetensors")}), splits())
    save_file({k: v.contiguous() for k, v in MLP().state_dict().items()}, tmp_path / "mlp.safetensors")
    with pytest.raises(ValueError, match="mlp.safetensors"):
        Trainer(parse_recipe({**BASE, "init_from": str(tmp_path / "mlp.safetensors")}), splits())


def test_init_from_must_be_a_path_string():
    with pytest.raises(RecipeError, match="init_from"):
        parse_recipe({**BASE, "init_from": 3})
