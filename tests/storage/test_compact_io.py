import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from structsparse import LoweredConv2d, compact, load_compact, save_compact
from structsparse.zoo.models import LeNet, MLP


@pytest.fixture
def compacted():
    torch.manual_seed(0)
    model = LeNet().eval()
    with torch.no_grad():
        model.conv1.weight[5:] = 0
        model.conv2.weight[19:] = 0
        model.conv2.weight.view(50, -1)[:, torch.randperm(500)[:420]] = 0
    x = torch.rand(4, 1, 28, 28)
    return model, compact(model, x), x


def test_round_trip_is_exact(tmp_path, compacted):
    model, c, x = compacted
    assert isinstance(c.conv2, LoweredConv2d)
    save_compact(c, tmp_path / "m")
    loaded = load_compact(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x), c(x))
    assert [n for n, _ in loaded.named_modules()] == [n for n, _ in c.named_modules()]
    assert loaded.input_shape == c.input_shape == [1, 28, 28]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["architecture.json", "model.safetensors"]


def test_round_trip_mlp_with_gather(tmp_path):
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[:, ::3] = 0
    x = torch.rand(2, 1, 28, 28)
    c = compact(model, x)
    save_compact(c, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path)(x), c(x))
    assert load_compact(tmp_path).fc1.in_features == 784 - 262


def test_only_compact_models_are_saved(tmp_path):
    with pytest.raises(TypeError, match="compact"):
        save_compact(LeNet(), tmp_path)


def corrupt(tmp_path, compacted, edit):
    _, c, _ = compacted
    save_compact(c, tmp_path)
    edit(tmp_path)
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda d: (d / "architecture.json").write_text("{not json"), "not valid JSON"),
    (lambda d: (d / "architecture.json").unlink(), "missing"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 5), "safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200]), "safetensors"),
])
def test_damaged_files_name_the_file(tmp_path, compacted, edit, message):
    d = corrupt(tmp_path, compacted, edit)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_compact(d)


def edit_arch(fn):
    def edit(d):
        arch = json.loads((d / "architecture.json").read_text())
        fn(arch)
        (d / "architecture.json").write_text(json.dumps(arch))
    return edit


def edit_weights(fn):
    """An edited weights file, its hash removed (as in files saved before hashes): the checks behind it."""
    def edit(d):
        t = load_file(d / "model.safetensors")
        fn(t)
        save_file(t, d / "model.safetensors")
        edit_arch(lambda a: a.pop("weights_sha256"))(d)
    return edit


def flip_bytes(d):
    data = bytearray((d / "model.safetensors").read_bytes())
    for i in range(len(data) - 16, len(data) - 12):   # four bytes inside the last tensor's data
        data[i] ^= 0x5A
    (d / "model.safetensors").write_bytes(bytes(data))


def test_a_compact_model_with_flipped_bytes_is_rejected_naming_the_file(tmp_path, compacted):
    d = corrupt(tmp_path, compacted, flip_bytes)
    with pytest.raises(ValueError, match=r"model\.safetensors: its SHA-256 does not match"):
        load_compact(d)
    edit_arch(lambda a: a.update(weights_sha256="x" * 64))(d)
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        load_compact(d)


def test_a_model_saved_before_hashes_still_loads(tmp_path, compacted):
    model, c, x = compacted
    d = corrupt(tmp_path, compacted, edit_arch(lambda a: a.pop("weights_sha256")))
    with torch.no_grad():
        assert torch.equal(load_compact(d)(x), c(x))


@pytest.mark.parametrize("edit, message", [
    (edit_arch(lambda a: a["steps"][0].update(type="Eval")), "not allowed"),
    (edit_arch(lambda a: a["steps"][0]["config"].update(out_channels=7)), "shape"),
    (edit_arch(lambda a: a["steps"][0]["config"].update(evil=1)), "unknown config"),
    (edit_arch(lambda a: a["steps"][0].update(name="../x")), "bad step name"),
    (edit_arch(lambda a: a.update(version=99)), "version"),
    (edit_weights(lambda t: t.pop("fc1.weight")), "missing"),
    (edit_weights(lambda t: t.update({"conv2.columns": t["conv2.columns"] * 0})), "columns"),
])
def test_inconsistent_description_is_rejected(tmp_path, compacted, edit, message):
    d = corrupt(tmp_path, compacted, edit)
    with pytest.raises(ValueError, match=message):
        load_compact(d)


class FunctionsAndHardtanh(torch.nn.Module):
    """Function steps with arguments (F.relu, F.max_pool2d, torch.flatten(x, 1)) and Hardtanh / ReLU6,
    whose constructors take deprecated aliases (min_value, max_value) that are not attributes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.clip = torch.nn.Hardtanh(-0.5, 2.0)
        self.six = torch.nn.ReLU6()
        self.fc = torch.nn.Linear(6 * 6 * 6, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = self.six(self.clip(x))
        x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


def test_round_trip_function_steps_and_hardtanh(tmp_path):
    torch.manual_seed(0)
    model = FunctionsAndHardtanh().eval()
    with torch.no_grad():
        model.conv.weight[4:] = 0
    x = torch.randn(2, 3, 14, 14)
    c = compact(model, x)
    save_compact(c, tmp_path)
    steps = {s["name"]: s for s in json.loads((tmp_path / "architecture.json").read_text())["steps"]}
    assert steps["clip"]["config"] == {"min_val": -0.5, "max_val": 2.0, "inplace": False}
    assert any(s["type"] == "Op" and s["config"]["kwargs"] == {"start_dim": 1} for s in steps.values())
    loaded = load_compact(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x), c(x))
        assert torch.allclose(loaded(x), model(x), rtol=1e-4, atol=1e-5)
    assert (loaded.clip.min_val, loaded.clip.max_val) == (-0.5, 2.0)


def test_files_without_input_shape_still_load(tmp_path, compacted):
    """Files written before input_shape was stored: checked for structure, then loaded."""
    _, c, x = compacted
    d = corrupt(tmp_path, compacted, edit_arch(lambda a: a.pop("input_shape")))
    loaded = load_compact(d)
    assert loaded.input_shape is None
    with torch.no_grad():
        assert torch.equal(loaded(x), c(x))


@pytest.mark.parametrize("edit, message", [
    (lambda a: a["steps"][2].update(inputs=["input", a["steps"][1]["name"]]), "reads exactly one input"),
    (lambda a: a["steps"][1].update(inputs=["nowhere"]), "must name earlier steps"),
    (lambda a: a["steps"][1].update(name="training"), "bad step name"),
    (lambda a: a["steps"][2].update(name=a["steps"][1]["name"] + ".sub"), "cannot also hold"),
])
def test_structure_is_checked_without_input_shape(tmp_path, compacted, edit, message):
    def both(a):
        a["input_shape"] = None
        edit(a)
    d = corrupt(tmp_path, compacted, edit_arch(both))
    with pytest.raises(ValueError, match=message) as e:
        load_compact(d)
    assert str(d / "architecture.json") in str(e.value)


def test_loaded_weights_are_real_tensors(tmp_path, compacted):
    """Built on the meta device, loaded by assignment: nothing is left on meta, dtypes are the usual."""
    _, c, _ = compacted
    save_compact(c, tmp_path)
    loaded = load_compact(tmp_path)
    tensors = dict(loaded.state_dict())
    assert tensors and not any(t.is_meta for t in tensors.values())
    assert all(t.dtype == c.state_dict()[k].dtype for k, t in tensors.items())
    assert all(p.requires_grad == q.requires_grad for p, q in zip(loaded.parameters(), c.parameters()))


def test_unsavable_function_arguments_are_refused(tmp_path, compacted):
    from structsparse.compaction.surgery import CompactNet
    from structsparse.graph import Op
    net = CompactNet([("flat", Op("flatten", {1: 2}))])
    with pytest.raises(TypeError, match="keys must be strings"):
        save_compact(net, tmp_path)
    assert not (tmp_path / "architecture.json").exists()


def test_every_module_name_pytorch_allows_round_trips(tmp_path):
    """torchvision names steps like ``trunk_output.block1.block1-0.proj.0``: what save accepts, load accepts."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("proj-0", torch.nn.Conv2d(3, 4, 1))
            self.add_module("act 1", torch.nn.ReLU())

        def forward(self, x):
            return getattr(self, "act 1")(getattr(self, "proj-0")(x))

    model = torch.nn.Sequential()
    model.add_module("block1-0", Block())
    model.add_module("head", torch.nn.Flatten())
    x = torch.rand(2, 3, 4, 4)
    small = compact(model, x)
    assert "block1-0.proj-0" in [n for n, _ in small.steps()]
    loaded = load_compact(save_compact(small, tmp_path / "m"))
    assert torch.equal(loaded(x), small(x)) and torch.allclose(loaded(x), model(x), atol=1e-6)
