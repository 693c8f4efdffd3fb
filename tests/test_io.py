import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from structsparse import LoweredConv2d, compact, load_compact, save_compact
from structsparse.models import LeNet, MLP


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
    def edit(d):
        t = load_file(d / "model.safetensors")
        fn(t)
        save_file(t, d / "model.safetensors")
    return edit


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
