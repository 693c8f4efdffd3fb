"""The committed MNIST reproductions (results/mnist/table/*/) load and give exactly their recorded test error;
the selection rule, verdicts and seed records of the experiments package behave as documented."""
import json
from pathlib import Path

import pytest

from experiments import mnist_assemble, mnist_seeds, mnist_select, mnist_tables
from experiments.mnist import PAPER_ROWS, RESULTS
from experiments.runs import verify
from structsparse.zoo.data import default_root

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"LeNet 1", "LeNet 2", "LeNet 3", "LeNet 4", "LeNet 5", "MLP 1", "MLP 2", "MLP 3"}
assert PAPER_ROWS == ROWS


def _results():
    return sorted(RESULTS.glob("*/metrics.json"))


def test_results_metrics_are_complete():
    if not _results():
        pytest.skip("no results/mnist/table/*/metrics.json committed")
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
        pytest.skip("no results/mnist/table/*/metrics.json committed")
    assert verify(RESULTS, "mnist", ROWS, "paper_row") == []


MNIST_RECIPES = ROOT / "recipes" / "mnist"   # <row>.yaml (the committed rows'), search/, seeds/


@pytest.mark.parametrize("path", sorted(MNIST_RECIPES.rglob("*.yaml")), ids=lambda p: str(p.relative_to(MNIST_RECIPES)))
def test_mnist_recipes_load(path):
    from structsparse.runner.recipe import load_recipe
    r = load_recipe(path)
    assert r.data == "mnist" and r.model in ("lenet", "mlp")


def test_every_result_names_its_recipe_and_candidates():
    for path in _results():
        m = json.loads(path.read_text())
        assert (ROOT / m["recipe"]).is_file(), m["recipe"]
        chosen = [c for c in m["selection"]["candidates"] if c["chosen"]]
        assert len(chosen) == 1, path
        final = m["selection"].get("final")
        assert (final["recipe"] if final else chosen[0]["recipe"]) == m["recipe"], path
        if final:   # the row's run is the chosen candidate's recipe with only train_with_val added
            from structsparse.runner.recipe import load_recipe
            a, b = load_recipe(ROOT / m["recipe"]).to_dict(), load_recipe(ROOT / chosen[0]["recipe"]).to_dict()
            assert a.pop("train_with_val") is True and a == b, path
            assert m["val_error"] == chosen[0]["val_error"], path


def test_each_row_runs_its_canonical_recipe():
    """recipes/mnist/<row>.yaml is the recipe of the committed row's final run (its copy in the row's folder)."""
    for path in _results():
        m = json.loads(path.read_text())
        assert m["recipe"] == f"recipes/mnist/{m['name']}.yaml", path
        assert (path.parent / "recipe.yaml").read_bytes() == (ROOT / m["recipe"]).read_bytes(), path
    for c in [c for p in _results() for c in json.loads(p.read_text())["selection"]["candidates"]]:
        assert c["recipe"].startswith("recipes/mnist/search/") and (ROOT / c["recipe"]).is_file(), c["recipe"]


@pytest.mark.parametrize("path", sorted(MNIST_RECIPES.rglob("*_s[0-9].yaml")), ids=lambda p: str(p.relative_to(MNIST_RECIPES)))
def test_seed_recipes_differ_from_their_row_only_in_the_seed(path):
    """seeds/<row>_sN.yaml repeats recipes/mnist/<row>.yaml; search/<x>_sN.yaml repeats search/<x>.yaml."""
    from structsparse.runner.recipe import load_recipe
    name = path.name.rsplit("_s", 1)[0] + ".yaml"
    base = MNIST_RECIPES / name if path.parent.name == "seeds" else path.with_name(name)
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
        pytest.skip("results/mnist/table/lenet2 not committed")
    (tmp_path / "results" / "lenet2").mkdir(parents=True)
    r = json.loads(src.read_text())
    r.pop("seeds", None)
    (tmp_path / "results" / "lenet2" / "metrics.json").write_text(json.dumps(r))
    run = tmp_path / "lenet2_s1"
    run.mkdir()
    layers = [dict(l, filters_kept=l["filters_kept"] + 1) for l in r["layers"]]
    seed1 = "recipes/mnist/seeds/lenet2_s1.yaml"   # the row's recipe with seed 1
    assert r["recipe"] == "recipes/mnist/lenet2.yaml"
    (run / "metrics.json").write_text(json.dumps({
        "recipe": seed1, "command": f"structsparse run {seed1}",
        "machine": r["machine"], "date": r["date"], "train_seconds": 1.0,
        "test_error": {"original": 0.01, "compact": 0.01}, "val_error": {"finetune": 0.011},
        "sparsity": {"layers": layers, "flop_fraction": 0.3, "compact_flop_fraction": 0.12}}))
    seeds = mnist_seeds.add_seeds("lenet2", [run], tmp_path / "results")
    assert [e["seed"] for e in seeds["runs"]] == [0, 1]
    assert seeds["summary"]["test_error"]["values"] == [r["test_error"], 0.01]
    conv1 = seeds["summary"]["layers"]["conv1"]["filters_kept"]
    assert conv1["min"] == r["layers"][0]["filters_kept"] and conv1["max"] == conv1["min"] + 1
    assert "seeds" in json.loads((tmp_path / "results" / "lenet2" / "metrics.json").read_text())
    assert "Spread over three seeds" in "\n".join(mnist_tables.seeds_table({"lenet2": json.loads(
        (tmp_path / "results" / "lenet2" / "metrics.json").read_text())}))
    bad = tmp_path / "lenet3_run"
    bad.mkdir()
    (bad / "metrics.json").write_text((run / "metrics.json").read_text().replace(seed1, "recipes/mnist/lenet1.yaml"))
    with pytest.raises(SystemExit):
        mnist_seeds.add_seeds("lenet2", [bad], tmp_path / "results")


def test_check_refit_accepts_only_the_chosen_recipe_on_train_and_val(tmp_path):
    runs = {}
    recipes = {"lenet2_b": "search/lenet2_b", "lenet2_b_final": "lenet2", "lenet3": "search/lenet3", "lenet2": "search/lenet2"}
    for name, recipe in recipes.items():
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "metrics.json").write_text(json.dumps({"recipe": f"recipes/mnist/{recipe}.yaml"}))
    mnist_assemble.check_refit(runs["lenet2_b"], runs["lenet2_b_final"])
    for chosen, final in (("lenet3", "lenet2_b_final"), ("lenet2", "lenet2_b_final"), ("lenet2_b", "lenet2_b")):
        with pytest.raises(SystemExit, match="train_with_val"):
            mnist_assemble.check_refit(runs[chosen], runs[final])


def _layers(*flops):
    return [{"name": f"l{i}", "compact_flop_fraction": f, "flop_fraction": f} for i, f in enumerate(flops)]


def test_verdict_applies_the_issue_targets():
    v = mnist_select.verdict   # LeNet 2: paper 0.8% error, FLOP 25%—7.6%
    assert v("lenet2", 0.0079, _layers(0.25, 0.05)) == "beats (lower error) and lower FLOP"
    assert v("lenet2", 0.0079, _layers(0.25, 0.076)) == "beats (lower error)"
    assert v("lenet2", 0.0080, _layers(0.25, 0.05)) == "beats (lower FLOP)"
    assert v("lenet2", 0.0085, _layers(0.25, 0.05)) == "beats (lower FLOP); error within the +0.05 points"
    assert v("lenet2", 0.0085, _layers(0.25, 0.076)) == "meets"          # within the paper's rounding only
    assert v("lenet2", 0.0086, _layers(0.25, 0.05)) == "misses: error"
    assert v("lenet2", 0.0080, _layers(0.2506, 0.05)) == "misses: FLOP"
    assert v("lenet2", 0.0090, _layers(0.30, 0.05)) == "misses: error and FLOP"
    assert v("mlp1", 0.0148, _layers(1, 1, 1)) == "meets" and v("mlp1", 0.0149, _layers(1, 1, 1)) == "misses: error"


def test_select_prefers_candidates_at_the_flop_target(tmp_path):
    runs = []
    for name, val, flops in (("a", 0.010, (0.25, 0.08)), ("b", 0.011, (0.20, 0.07)), ("c", 0.012, (0.1, 0.05))):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"val_error": {"finetune": val},
                                                    "sparsity": {"layers": _layers(*flops)}}))
        runs.append(d)
    assert mnist_select.select("lenet2", runs) == runs[1]          # a is above the paper's conv2 FLOP; b has the lower val
    assert mnist_select.select("lenet2", runs[:1]) == runs[0]      # none at the target: the nearest structure


def _record(run, val, own, compact=None):
    r = {"run": run, "val_error": val, "structure_distance": 0.5,
         "kept": {f"l{i}": {"flop_fraction": f} for i, f in enumerate(own)}}
    return r if compact is None else {**r, "compact_layer_flops": list(compact)}


def test_select_weighs_recorded_candidates_and_refuses_to_guess(tmp_path):
    d = tmp_path / "new"
    d.mkdir()
    (d / "metrics.json").write_text(json.dumps({"val_error": {"finetune": 0.011},
                                                "sparsity": {"layers": _layers(0.20, 0.07)}}))
    at = _record("old_at", 0.010, (0.20, 0.05))                  # own-zeros FLOP at the target: so is compact
    assert mnist_select.select("lenet2", [d, at]) is at
    unknown_worse = _record("old_unknown", 0.012, (0.30, 0.05))  # whatever its place, the new run wins
    assert mnist_select.select("lenet2", [d, unknown_worse]) == d
    unknown_better = _record("old_unknown", 0.010, (0.30, 0.05))
    with pytest.raises(SystemExit, match="old_unknown"):
        mnist_select.select("lenet2", [d, unknown_better])
    known = _record("old_known", 0.010, (0.30, 0.05), compact=(0.26, 0.05))   # recorded after compaction: above
    assert mnist_select.select("lenet2", [d, known]) == d


def test_recorded_candidates_leave_out_the_runs_given(tmp_path):
    row = tmp_path / "lenet2"
    row.mkdir()
    recs = [_record("runs/mnist/a", 0.01, (0.2, 0.05)), _record("runs/mnist/b", 0.01, (0.2, 0.05))]
    (row / "metrics.json").write_text(json.dumps({"selection": {"candidates": recs}}))
    assert [r["run"] for r in mnist_select.recorded_candidates("lenet2", [Path("runs/mnist/a")], tmp_path)] == ["runs/mnist/b"]


def test_select_infers_a_record_from_the_committed_choice(tmp_path):
    """A record whose FLOP after compaction is unknown, but which the committed row chose although a nearer
    structure was within the slack, was at the target: the new choice can rest on that."""
    d = tmp_path / "new"
    d.mkdir()
    keys = ("filters_kept", "filters", "channels_kept", "channels", "columns_kept", "columns")
    layers = [{**layer, **dict.fromkeys(keys, 1)} for layer in _layers(0.20, 0.07)]
    (d / "metrics.json").write_text(json.dumps({"val_error": {"finetune": 0.011}, "recipe": "recipes/x.yaml",
                                                "sparsity": {"layers": layers, "compact_flop_fraction": 0.1}}))
    chosen = {**_record("old_chosen", 0.010, (0.30, 0.05)), "chosen": True}
    near = {**_record("old_near", 0.011, (0.30, 0.05)), "structure_distance": 0.1, "chosen": False}
    prior = [chosen, near]
    with pytest.raises(SystemExit):
        mnist_select.select("lenet2", [d, chosen, near])                 # without the committed choice: unknown
    assert mnist_select.select("lenet2", [d, chosen, near], prior) is chosen
    row = tmp_path / "lenet2"
    row.mkdir()
    (row / "metrics.json").write_text(json.dumps({"selection": {"candidates": prior}}))
    mnist_select.add_candidates("lenet2", [d], prior, tmp_path)
    runs = [c["run"] for c in json.loads((row / "metrics.json").read_text())["selection"]["candidates"]]
    assert runs == ["old_chosen", "old_near", str(d)]
