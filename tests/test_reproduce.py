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


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "mnist").glob("*_s[0-9].yaml")), ids=lambda p: p.name)
def test_seed_recipes_differ_from_their_row_only_in_the_seed(path):
    from structsparse.recipe import load_recipe
    base = path.with_name(path.name.rsplit("_s", 1)[0] + ".yaml")
    a, b = load_recipe(path).to_dict(), load_recipe(base).to_dict()
    assert a.pop("seed") == int(path.stem.rsplit("_s", 1)[1]) and b.pop("seed") == 0
    assert a == b


def test_results_seeds_are_consistent():
    for path in _results():
        m = json.loads(path.read_text())
        if "seeds" not in m:
            continue
        runs, s = m["seeds"]["runs"], m["seeds"]["summary"]
        assert [r["seed"] for r in runs] == sorted({r["seed"] for r in runs}) and runs[0]["seed"] == 0, path
        assert runs[0]["test_error"] == m["test_error"], path
        errs = [r["test_error"] for r in runs]
        assert s["test_error"]["min"] == min(errs) and s["test_error"]["max"] == max(errs), path
        assert abs(s["test_error"]["mean"] - sum(errs) / len(errs)) < 1e-12, path
        for r in runs:
            assert r["command"] and r["run"] and 0 <= r["compact_flop_fraction"] <= 1, path


def test_add_seeds_records_every_seed(tmp_path, monkeypatch):
    """--seeds on a copy of a committed row, with a synthetic finished run of its seed-1 recipe."""
    src = RESULTS / "lenet2" / "metrics.json"
    if not src.is_file():
        pytest.skip("results/mnist/lenet2 not committed")
    mod = _script()
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    (tmp_path / "results" / "lenet2").mkdir(parents=True)
    r = json.loads(src.read_text())
    r.pop("seeds", None)
    (tmp_path / "results" / "lenet2" / "metrics.json").write_text(json.dumps(r))
    run = tmp_path / "lenet2_s1"
    run.mkdir()
    layers = [dict(l, filters_kept=l["filters_kept"] + 1) for l in r["layers"]]
    (run / "metrics.json").write_text(json.dumps({
        "recipe": "recipes/mnist/lenet2_s1.yaml", "command": "structsparse run recipes/mnist/lenet2_s1.yaml",
        "machine": r["machine"], "date": r["date"], "train_seconds": 1.0,
        "test_error": {"original": 0.01, "compact": 0.01}, "val_error": {"finetune": 0.011},
        "sparsity": {"layers": layers, "flop_fraction": 0.3, "compact_flop_fraction": 0.12}}))
    seeds = mod.add_seeds("lenet2", [run])
    assert [e["seed"] for e in seeds["runs"]] == [0, 1]
    assert seeds["summary"]["test_error"]["values"] == [r["test_error"], 0.01]
    conv1 = seeds["summary"]["layers"]["conv1"]["filters_kept"]
    assert conv1["min"] == r["layers"][0]["filters_kept"] and conv1["max"] == conv1["min"] + 1
    assert "seeds" in json.loads((tmp_path / "results" / "lenet2" / "metrics.json").read_text())
    assert "Spread over three seeds" in "\n".join(mod.seeds_table({"lenet2": json.loads(
        (tmp_path / "results" / "lenet2" / "metrics.json").read_text())}))
    bad = tmp_path / "lenet3_run"
    bad.mkdir()
    (bad / "metrics.json").write_text((run / "metrics.json").read_text().replace("lenet2_s1", "lenet3_s1"))
    with pytest.raises(SystemExit):
        mod.add_seeds("lenet2", [bad])
