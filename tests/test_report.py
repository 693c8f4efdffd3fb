"""sparsity_report: per-layer kept structures and FLOPs, cross-checked with torch.utils.flop_counter."""
import pytest
import torch
from torch import nn

from structsparse import compact, sparsity_report
from structsparse.zoo.models import LeNet, MLP

from helpers import TinyResNet, randomize


def lenet2():
    model = LeNet()
    with torch.no_grad():
        model.conv1.weight[5:] = 0
        model.conv2.weight[19:] = 0
        model.conv2.weight[:, 4:] = 0
    return model


def test_lenet2_flop_fractions_match_paper():
    report = sparsity_report(lenet2(), torch.rand(2, 1, 28, 28))
    rows = {r["name"]: r for r in report.layers}
    assert rows["conv1"]["flop_fraction"] == pytest.approx(0.25)
    assert rows["conv2"]["flop_fraction"] == pytest.approx(0.076)
    assert (rows["conv1"]["filters_kept"], rows["conv2"]["filters_kept"], rows["conv2"]["channels_kept"]) == (5, 19, 4)
    assert rows["fc1"]["flop_fraction"] == 1.0
    assert report.counter_agrees
    md = report.to_markdown()
    assert "| conv2 | Conv2d | 19/50 | 4/20 | 100/500 | 7.6% |" in md


def test_whole_model_macs_match_flop_counter():
    for model, x in ((LeNet(), torch.rand(3, 1, 28, 28)), (MLP(), torch.rand(3, 1, 28, 28))):
        report = sparsity_report(model, x)
        assert report.counter_agrees and report.flop_fraction == 1.0
    # LeNet: conv1 20·25·24² + conv2 50·500·8² + fc1 800·500 + fc2 500·10
    assert sparsity_report(LeNet(), torch.rand(1, 1, 28, 28)).macs == 288000 + 1600000 + 400000 + 5000


def test_compact_model_macs_match_report_of_original():
    model = lenet2()
    x = torch.rand(2, 1, 28, 28)
    report = sparsity_report(model, x)
    after = sparsity_report(compact(model, x), x)
    rows = {r["name"]: r for r in after.layers}
    # conv2 of the compact model does exactly the kept multiply-adds of the original's report
    assert rows["conv2"]["macs"] == {r["name"]: r for r in report.layers}["conv2"]["macs_kept"]


def test_shape_sparsity_columns_counted():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten())
    with torch.no_grad():
        model[0].weight[:, 0, 0, :] = 0  # 3 of 18 columns
    row = sparsity_report(model, torch.rand(1, 2, 5, 5)).layers[0]
    assert (row["columns_kept"], row["columns"], row["channels_kept"]) == (15, 18, 2)
    assert row["flop_fraction"] == pytest.approx(15 / 18)


def test_report_needs_batched_tensor():
    with pytest.raises(ValueError, match="batched"):
        sparsity_report(LeNet(), torch.rand(28))


def test_report_counts_what_compaction_removes_in_neighbours():
    report = sparsity_report(lenet2(), torch.rand(2, 1, 28, 28))
    rows = {r["name"]: r for r in report.layers}
    # conv2 reads 4 channels, so conv1 keeps 4 filters; its 19 filters leave fc1 19·16 of 800 inputs
    assert rows["conv1"]["compact_flop_fraction"] == pytest.approx(4 / 20)
    assert rows["conv2"]["compact_flop_fraction"] == pytest.approx(0.076)
    assert rows["fc1"]["compact_flop_fraction"] == pytest.approx(19 * 16 / 800)
    assert report.compact_flop_fraction < report.flop_fraction
    assert "After compact" in report.to_markdown()


def test_report_counts_removed_branches_as_no_work():
    from structsparse import sparsity_report

    model = randomize(TinyResNet())
    with torch.no_grad():
        model.layer1[1].conv2.weight.zero_()
    rep = sparsity_report(model, torch.rand(2, 3, 16, 16))
    rows = {r["name"]: r for r in rep.layers}
    assert rows["layer1.1.conv1"]["compact_flop_fraction"] == 0 and rows["layer1.1.conv2"]["compact_flop_fraction"] == 0
    assert rows["layer1.1.conv1"]["flop_fraction"] == 1  # its own weights are not zero
    assert rows["layer1.0.conv1"]["compact_flop_fraction"] == pytest.approx(1.0)
    assert rep.compact_flop_fraction < rep.flop_fraction < 1


@pytest.mark.filterwarnings("ignore::structsparse.compaction.CollapseWarning")
def test_report_on_a_model_whose_layers_are_all_zero():
    from structsparse import sparsity_report

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.zero_()
    rep = sparsity_report(model, torch.rand(2, 1, 8, 8))
    assert rep.compact_macs == 0 and rep.compact_flop_fraction == 0
