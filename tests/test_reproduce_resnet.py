"""The committed ResNet-20 / Fashion-MNIST results (results/fmnist/resnet20/*/) load and give exactly their test error."""
import json

import pytest

from experiments.resnet import DATA, RESULTS, ROWS
from experiments.runs import ROOT, verify


def _results():
    return sorted(RESULTS.glob("*/metrics.json"))


def test_metrics_are_complete_and_targets_are_stated():
    if not _results():
        pytest.skip("no results/fmnist/resnet20/*/metrics.json committed")
    rows = {}
    for path in _results():
        m = json.loads(path.read_text())
        for key in ("row", "test_error", "command", "machine", "date", "layers", "blocks_kept",
                    "compact_flop_fraction", "selection"):
            assert m.get(key) is not None, f"{path}: {key}"
        assert (path.parent / "model" / "architecture.json").is_file(), path
        rows[m["name"]] = m
    if {"dense", "depth"} <= set(rows):  # what the README claims must follow from the files
        removed = sum(k[1] - k[0] for k in rows["depth"]["blocks_kept"].values())
        assert rows["depth"]["conv_layers_kept"] == rows["dense"]["conv_layers_kept"] - 2 * removed


def test_committed_models_reproduce_their_test_error(one_thread):
    from structsparse.zoo.data import load_dataset

    if not _results():
        pytest.skip("no results/fmnist/resnet20/*/metrics.json committed")
    try:
        load_dataset("fashion-mnist", "test")
    except (FileNotFoundError, OSError) as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    assert verify(RESULTS, DATA, set(ROWS.values()), row_key="row") == []


def test_every_row_names_its_recipe_and_candidates():
    """The row's recipe (recipes/fmnist/resnet20_<row>.yaml, copied into its folder) and every candidate's exist."""
    for path in _results():
        m = json.loads(path.read_text())
        assert m["recipe"] == f"recipes/fmnist/resnet20_{m['name']}.yaml", path
        assert (ROOT / m["recipe"]).read_bytes() == (path.parent / "recipe.yaml").read_bytes(), path
        for c in m["selection"]["candidates"]:
            assert (ROOT / c["recipe"]).is_file(), c["recipe"]
