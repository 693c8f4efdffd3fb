"""Tracing a model into steps (graph.trace), the rule of each operation (graph.ops), and channel units
(graph.units)."""
import pytest
import torch
from torch import nn

from structsparse.graph import UnsupportedModelError, channel_units, trace_graph

from helpers import TinyResNet


def test_units_couple_every_writer_and_reader_of_a_stream_channel():
    model = TinyResNet()
    units = channel_units(trace_graph(model, torch.rand(1, 3, 16, 16)))
    stem, blk = units.of["bn1"], units.of["layer1.1.bn2"]
    assert torch.equal(stem, blk) and torch.equal(units.of_input["layer2.0.conv1"], stem)
    inner = units.of["layer1.0.bn1"]
    assert not bool((inner[:, None] == stem[None, :]).any())
    assert bool(units.pinned[units.of["fc"]].all()) and not bool(units.pinned[stem].any())
    # layer1.{0,1}.conv1, layer2.0.conv1, and through the padded shortcut layer2.1.conv1 and fc
    assert int(units.reader_count()[stem[0]]) == 5


def test_lenet_steps_have_the_roles_compaction_reads():
    from structsparse.zoo.models import LeNet
    g = trace_graph(LeNet(), torch.rand(2, 1, 28, 28))
    roles = {n.name: n.role for n in g.nodes.values()}
    assert roles["conv1"] == "conv" and roles["conv2"] == "conv" and roles["fc1"] == "linear"
    assert list(roles.values())[0] == "input" and g.output == "fc2"
    flat = next(n for n in g.nodes.values() if n.role == "flatten")
    assert flat.out_shape == (2, 800) and g.consumers()[flat.name] == ["fc1"]


def test_identity_steps_vanish_and_readers_read_their_input():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(self.drop(self.conv(x).contiguous()).flatten(1))

    g = trace_graph(Net(), torch.rand(1, 1, 8, 8))
    assert not any(n.role in ("dropout",) for n in g.nodes.values())
    flat = next(n for n in g.nodes.values() if n.role == "flatten")
    assert flat.inputs == ["conv"]


def test_an_operation_with_no_rule_is_kept_as_code_and_named():
    class Cumulative(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), 1))

    graph = trace_graph(Cumulative(), torch.rand(1, 1, 8, 8))
    assert [n.role for n in graph.nodes.values()] == ["input", "conv", "opaque", "conv"]
    units = channel_units(graph)
    why = units.reasons[int(units.of["a"][0])]
    assert "no channel rule" in why and "cumsum" in why
    assert int(units.of["input"][0]) not in units.reasons


def test_a_weighted_module_called_twice_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    with pytest.raises(UnsupportedModelError, match="more than once"):
        trace_graph(Shared(), torch.rand(1, 2, 4, 4))


def test_every_function_name_has_a_role_and_runs():
    from structsparse.graph import FUNCTIONS, Op
    x = torch.rand(2, 3, 4, 4)
    for name, (_, role) in FUNCTIONS.items():
        kwargs = {"other": 2.0} if name in ("mul", "add", "sub", "truediv") else \
            {"kernel_size": 2} if name in ("max_pool2d", "avg_pool2d") else \
            {"output_size": 1} if name.startswith("adaptive") else {"dim": 1} if "softmax" in name else \
            {"start_dim": 1} if name == "flatten" else {"dim": [2, 3]} if name in ("mean", "amax", "sum") else \
            {"dims": [0, 2, 3, 1]} if name == "permute" else {"shape": [3, 16]} if name == "reshape" else \
            {"start": [1, 0], "length": [2, 0]} if name == "take" else {}
        assert role in ("elementwise", "pool", "flatten", "mixing", "reduce", "move"), name
        assert Op(name, kwargs)(x).shape[0] == 2, name


def test_pinned_units_say_why():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.g, self.fc = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, groups=2), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.softmax(self.g(self.a(x)), 1).mean((2, 3)))

    units = channel_units(trace_graph(Net(), torch.rand(1, 3, 5, 5)))
    assert int(units.of["a"][0]) not in units.reasons   # a grouped conv loses channels evenly: see compaction
    assert units.reasons[int(units.of["softmax"][0])] == "softmax: a mixing step mixes channels"
    assert units.reasons[int(units.of["fc"][0])] == "the model's output"
    assert set(units.reasons) == set(units.pinned.nonzero().flatten().tolist())


def test_explain_lists_each_steps_kept_channels_with_the_reason():
    from structsparse import explain

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(torch.cumsum(self.a(x), 1))

    rows = {r["node"]: r for r in explain(Net(), torch.rand(1, 3, 4, 4))}
    assert rows["a"]["channels"] == 4 and rows["a"]["pinned"] == 4
    assert list(rows["a"]["reasons"]) == ["cumsum: no channel rule for cumsum"]
    assert rows["input"]["pinned"] == 0 and rows["b"]["reasons"] == {"the model's output": 2}
