"""The per-layer latency table and the latency budget that counts with it."""
import json

import pytest
import torch
from torch import nn

from structsparse import GroupLasso, compact
from structsparse.budget import kept_fraction, zero_to_budget_
from structsparse.speed.table import GRID, LatencyTable

from helpers import TinyResNet, check_exact, proportional_table, randomize


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10)).eval()


def _hand_made(**layers):
    return LatencyTable(1, "cpu", 1, torch.__version__, layers, rest=[[100, 1e-5], [1000, 1e-4]], reference=5e-4,
                        input_shape=[1, 8, 8])


def test_a_curve_is_interpolated_floored_at_its_smallest_point_and_zero_without_work():
    from structsparse.speed.table import _interpolate, _monotone
    points = [[10, 1e-5], [100, 3e-5], [1000, 2e-4]]
    assert _interpolate(points, 100) == pytest.approx(3e-5)
    assert _interpolate(points, 550) == pytest.approx(3e-5 + 0.5 * 1.7e-4)
    assert _interpolate(points, 1) == 1e-5            # a layer's fixed cost stays
    assert _interpolate(points, 2000) == pytest.approx(4e-4) and _interpolate(points, 0) == 0.0
    assert _monotone([(100, 3e-5), (10, 4e-5), (100, 1e-5)]) == [[10, 4e-5], [100, 4e-5]]
    table = _hand_made(a=points)
    assert table.seconds_per_mac("a") == pytest.approx(2e-7) == table.seconds_per_mac("not in the table")
    assert table.dense_seconds() == pytest.approx(2e-4 + 1e-4)


def test_an_estimate_is_the_layers_by_their_multiply_adds_and_the_rest_by_the_activations():
    model, x = _net(), torch.rand(1, 1, 8, 8)
    outputs = 8 * 64 * 2 + 16 * 64 * 2 + 16 * 64 + 10      # conv, relu, conv, relu, flatten, linear
    table = _hand_made(**{"0": [[8 * 9 * 64, 1e-5]], "2": [[10, 1e-5], [8 * 16 * 9 * 64, 3e-5]],
                          "5": [[1024 * 10, 2e-5]]})
    assert table.estimate(model) == pytest.approx(1e-5 + 3e-5 + 2e-5 + 1e-4 * outputs / 1000)
    with torch.no_grad():
        model[2].weight[8:] = 0
        model[2].bias[8:] = 0
    small = compact(model, x, channels_last=False)
    half = 8 * 64 + 8 * 64 + 8 * 64 * 2 + 8 * 64 + 10
    assert table.estimate(small) == pytest.approx(
        1e-5 + 1e-5 + 2e-5 * (8 * 8 * 9 * 64 - 10) / (8 * 16 * 9 * 64 - 10) + 2e-5 + 1e-5 + 9e-5 * (half - 100) / 900)


def test_the_table_times_each_layer_at_every_width_and_the_dense_model_is_one():
    model, x = _net(), torch.rand(2, 1, 8, 8)
    table = LatencyTable.build(model, x, repeats=3)
    assert set(table.layers) == {"0", "2", "5"} and table.batch == 1 and table.threads == 1
    for points in table.layers.values():
        assert len(points) <= len(GRID)
        assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(points, points[1:]))  # ascending, non-decreasing
    assert table.layers["2"][-1][0] == 8 * 16 * 9 * 64                               # full width: its multiply-adds
    assert table.fraction(compact(model, x, channels_last=False)) == pytest.approx(1.0)
    assert len(table.rest) == 2 and table.rest[0][0] < table.rest[1][0]   # the thinned model computes less
    assert table.matches(1, "cpu", 1) and not table.matches(64, "cpu", 1) and not table.matches(1, "cpu", 2)


def test_a_latency_budget_lands_at_or_under_its_estimate_and_stays_exact():
    torch.manual_seed(0)
    model, x = randomize(TinyResNet()).eval(), torch.rand(2, 3, 16, 16)
    table = proportional_table(model, x)
    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3}, example_input=x)
    result = zero_to_budget_(gl, x, latency=0.6, table=table)
    small = compact(model, x, channels_last=False)
    check_exact(model, small, x)
    assert result.metric == "latency" and result.groups_zeroed > 0
    assert result.reached == pytest.approx(table.fraction(small)) and result.reached <= 0.6
    assert kept_fraction(model, x, "latency", table) == pytest.approx(result.reached)
    assert result.dense == pytest.approx(table.dense_seconds())
    with pytest.raises(ValueError, match="give one budget, flops, params or latency; got flops, latency"):
        zero_to_budget_(gl, x, flops=0.5, latency=0.5)


def test_a_latency_table_survives_a_round_trip_and_a_bad_file_names_the_key(tmp_path):
    table = _hand_made(a=[[10, 1e-5], [100, 3e-5]])
    path = tmp_path / "latency_table.json"
    table.save(path)
    assert LatencyTable.load(path) == table
    for key, value, message in (("rest", -1.0, "rest: expected"), ("batch", "1", "batch: expected int"),
                                ("layers", {"a": [[100, 1e-5], [10, 2e-5]]}, r"layers\.a: expected"),
                                ("reference", float("nan"), "reference: expected seconds"),
                                ("version", 9, "version: expected a mapping of version 1")):
        d = table.to_dict()
        d[key] = value
        path.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=f"{path}: {message}"):
            LatencyTable.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable latency table"):
        LatencyTable.load(path)


def test_a_latency_table_needs_a_device_it_can_time_on():
    model = _net().to("meta")
    with pytest.raises(ValueError, match="latency: cannot time on device 'meta'"):
        LatencyTable.build(model, torch.rand(2, 1, 8, 8, device="meta"))
