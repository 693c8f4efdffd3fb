"""measure_speedup: interleaved timings of a compact model against its original, end to end and per layer.
(Only what the figures are made of is tested here; speeds themselves are measured in benchmarks.)"""
import pytest
import torch

from structsparse import compact, measure_speedup
from structsparse.speed.measure import SAME_FORMS, same_forms_baseline
from structsparse.timing import machine_info, summarize, time_interleaved
from structsparse.zoo.models import LeNet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    model = LeNet().eval()
    with torch.no_grad():
        model.conv2.weight[10:] = 0
    x = torch.rand(1, 1, 28, 28)
    return model, compact(model, x), x


def test_rows_cover_the_model_and_every_layer_at_every_batch(pair):
    model, small, x = pair
    threads = torch.get_num_threads()
    rep = measure_speedup(model, small, x, batch_sizes=(1, 3), threads=1, repeats=3, warmup=1)
    assert torch.get_num_threads() == threads and not model.training
    assert {(r["scope"], r["batch"]) for r in rep.rows} == \
        {(s, b) for s in ("model", SAME_FORMS, "conv1", "conv2", "fc1", "fc2") for b in (1, 3)}
    for r in rep.rows:
        assert r["speedup"] == pytest.approx(r["original"]["median_ms"] / r["compact"]["median_ms"])
        assert r["original"]["q1_ms"] <= r["original"]["median_ms"] <= r["original"]["q3_ms"]
    assert rep.speedup("model", 3) == next(r["speedup"] for r in rep.rows if r["scope"] == "model" and r["batch"] == 3)
    assert rep.machine["measure_threads"] == 1 and "1 thread(s)" in rep.to_markdown()


def test_bad_batch_sizes_are_named(pair):
    model, small, x = pair
    with pytest.raises(ValueError, match="batch sizes"):
        measure_speedup(model, small, x, batch_sizes=(0,))


def test_interleaved_samples_and_their_summary():
    calls = []
    samples = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], repeats=4, warmup=1,
                               min_time=0)
    assert [len(s) for s in samples] == [4, 4] and calls.count("a") == calls.count("b")
    s = summarize([0.001, 0.002, 0.003, 0.004])
    assert s["median_ms"] == pytest.approx(2.5) and s["q1_ms"] < s["median_ms"] < s["q3_ms"]
    assert summarize([0.002]) == {"median_ms": 2.0, "q1_ms": 2.0, "q3_ms": 2.0}
    assert machine_info(measure_threads=3)["measure_threads"] == 3 and machine_info()["torch"] == torch.__version__


def test_a_ratio_gets_a_bootstrap_interval_that_says_whether_noise_explains_it():
    from structsparse.timing import ratio_interval
    g = torch.Generator().manual_seed(0)
    noise = lambda: (1 + 0.05 * torch.rand(40, generator=g)).tolist()  # noqa: E731
    slow, fast = [2 * t for t in noise()], noise()
    lo, hi = ratio_interval(slow, fast)
    assert 1.8 < lo <= hi < 2.2
    lo, hi = ratio_interval(noise(), noise())       # the same thing twice: 1× lies inside
    assert lo < 1 < hi
    with pytest.raises(ValueError, match="paired"):
        ratio_interval([1.0, 2.0], [1.0])


def test_busy_machines_and_insignificant_ratios_are_flagged():
    from structsparse.speed.measure import SpeedReport
    t = {"median_ms": 1.0, "q1_ms": 0.8, "q3_ms": 1.5}
    rows = [{"scope": "model", "batch": 1, "original": t, "compact": t, "speedup": 1.9, "speedup_ci": [0.7, 3.1],
             "significant": False, "spread": 0.7},
            {"scope": "conv2", "batch": 1, "original": t, "compact": t, "speedup": 2.0, "speedup_ci": [1.9, 2.1],
             "significant": True, "spread": 0.1}]
    rep = SpeedReport(rows, threads=1, repeats=5)
    warnings = rep.warnings()
    assert "busy" in warnings[0] and "70%" in warnings[0] and "1 of 2 rows" in warnings[0]
    assert warnings[1] == "not significant (the 95% interval reaches within 5% of 1×): model (batch 1)"
    md = rep.to_markdown()
    assert "1.90× [0.70–3.10] (not significant)" in md and "**Warning:** the machine looks busy" in md
    assert rep.to_dict()["warnings"] == warnings


def test_rows_carry_their_interval_and_one_thread_is_the_default(pair):
    model, small, x = pair
    rep = measure_speedup(model, small, x, batch_sizes=(2,), repeats=4, warmup=1, layers=False)
    assert rep.threads == 1
    row, _ = rep.rows                               # the model, and the model against the same forms
    lo, hi = row["speedup_ci"]
    assert lo <= hi and row["significant"] == (lo > 1.05 or hi < 1 / 1.05) and row["spread"] >= 0


def test_a_ratio_is_significant_only_beyond_five_percent_of_one():
    from structsparse.speed.measure import significant
    assert significant((1.06, 1.3)) and significant((0.5, 0.9))
    assert not significant((1.01, 1.08)) and not significant((0.94, 0.99)) and not significant((0.9, 1.1))


def test_the_same_forms_baseline_is_the_original_run_as_compact_models_run_it(pair):
    from structsparse.layers import TiledMaxPool2d, TunedConv2d
    model, _, x = pair
    small, small_cl = (compact(model, x, channels_last=layout) for layout in (False, True))  # not left to timing
    for c in (small, small_cl):
        baseline = same_forms_baseline(model, c)
        assert torch.allclose(baseline(x), model(x), atol=1e-5)
    fast = same_forms_baseline(model, small)
    assert type(fast.conv1) is TunedConv2d and type(fast.pool1) is TiledMaxPool2d and type(model.conv1) is torch.nn.Conv2d
    assert same_forms_baseline(torch.nn.Sequential(torch.nn.Linear(3, 2)), small) is None   # nothing to change
    rep = measure_speedup(model, small, x, batch_sizes=(1,), repeats=3, warmup=1, layers=False, same_forms=False)
    assert [r["scope"] for r in rep.rows] == ["model"]
