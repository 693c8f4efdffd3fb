"""measure_speedup: interleaved timings of a compact model against its original, end to end and per layer.
(Only what the figures are made of is tested here; speeds themselves are measured in benchmarks.)"""
import pytest
import torch

from structsparse import compact, measure_speedup
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
        {(s, b) for s in ("model", "conv1", "conv2", "fc1", "fc2") for b in (1, 3)}
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
