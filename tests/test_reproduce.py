"""The committed MNIST reproductions (results/mnist/*/) load and give exactly their recorded test error."""
import importlib.util
import json
from pathlib import Path

import pytest

from structsparse.data import default_root

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "mnist"
ROWS = {"LeNet 1", "LeNet 2", "LeNet 3", "LeNet 4", "LeNet 5", "MLP 1", "MLP 2", "MLP 3"}


def _script():
    spec = importlib.util.spec_from_file_location("reproduce_mnist", ROOT / "scripts" / "reproduce_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _results():
    return sorted(RESULTS.glob("*/metrics.json"))


def test_results_metrics_are_complete():
    if not _results():
        pytest.skip("no results/mnist/*/metrics.json committed")
    seen = set()
    for path in _results():
        m = json.loads(path.read_text())
        assert m["paper_row"] in ROWS, path
        assert m["paper_row"] not in seen, f"{path}: a second folder for {m['paper_row']}"
        seen.add(m["paper_row"])
        assert 0 <= m["test_error"] < 0.05, path
        for key in ("command", "machine", "date", "layers", "compact_flop_fraction"):
            assert m.get(key) is not None, f"{path}: {key}"
        for layer in m["layers"]:
            assert 0 <= layer["flop_fraction"] <= 1 and "compact_flop_fraction" in layer, path
        assert (path.parent / "model" / "architecture.json").is_file(), path


@pytest.mark.skipif(not (default_root() / "mnist.npz").is_file(), reason="MNIST is not cached")
def test_verify_reproduces_recorded_test_errors():
    if not _results():
        pytest.skip("no results/mnist/*/metrics.json committed")
    assert _script().verify(RESULTS) == []


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "mnist").glob("*.yaml")), ids=lambda p: p.name)
def test_mnist_recipes_load(path):
    from structsparse.recipe import load_recipe
    r = load_recipe(path)
    assert r.data == "mnist" and r.model in ("lenet", "mlp")


def test_every_result_names_its_recipe_and_candidates():
    for path in _results():
        m = json.loads(path.read_text())
        assert (ROOT / m["recipe"]).is_file(), m["recipe"]
        chosen = [c for c in m["selection"]["candidates"] if c["chosen"]]
        assert len(chosen) == 1 and chosen[0]["recipe"] == m["recipe"], path
