"""ONNX export of compact and plain models, checked with ONNX Runtime; torch.export of compact models."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import structsparse
from structsparse import LoweredConv2d, compact, export_onnx
from structsparse.storage import export as export_mod
from structsparse.compaction.surgery import IndexSelect
from structsparse.storage.export import ONNXExportError, ort_session
from structsparse.layers import Add, Cat, ChannelPad, Constant
from structsparse.zoo.models import MLP, LeNet

onnx = pytest.importorskip("onnx")  # installed by scripts/setup.sh (the `export` extra)
ort = pytest.importorskip("onnxruntime")


def _ort(path, *xs):
    s = ort_session(path)
    return [torch.from_numpy(o) for o in s.run(None, {i.name: x.numpy() for i, x in zip(s.get_inputs(), xs)})]


def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def sparse_lenet():
    torch.manual_seed(0)
    model = LeNet().eval()
    with torch.no_grad():
        model.conv1.weight[:6] = 0                   # filters
        model.conv2.weight.view(50, -1)[:, ::3] = 0  # filter-shape columns
        model.conv2.weight[40:] = 0
        model.fc1.weight[:, :300] = 0                # input features of fc1
    return model


@pytest.fixture(scope="module")
def compact_lenet(sparse_lenet):
    small = compact(sparse_lenet, torch.rand(2, 1, 28, 28), lowered_below=1.0)
    kinds = {type(m) for _, m in small.steps()}
    assert LoweredConv2d in kinds and IndexSelect in kinds
    return small


def test_compact_lenet_with_lowered_conv_and_gather(compact_lenet, tmp_path):
    x = torch.rand(2, 1, 28, 28)
    path = export_onnx(compact_lenet, x, tmp_path / "lenet.onnx")  # check=True: ONNX Runtime agrees at batch 2 and 4
    assert path == tmp_path / "lenet.onnx" and path.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Conv") == 1 and "Gather" in ops  # conv2 is lowered: a gather and one GEMM
    x5 = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert _close(_ort(path, x5)[0], compact_lenet(x5))


def test_mlp_with_gathered_inputs_and_dynamic_batch(tmp_path):
    torch.manual_seed(1)
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[:, ::2] = 0   # half of the pixels are never read
        model.fc2.weight[:, :250] = 0
    small = compact(model, torch.rand(2, 1, 28, 28))
    assert isinstance(small.steps()[1][1], IndexSelect)
    # The TorchScript exporter here (dynamic_axes); the dynamo one in the other tests (dynamic_shapes).
    path = export_onnx(small, torch.rand(2, 1, 28, 28), tmp_path / "mlp.onnx", exporter="torchscript")
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # the batch dimension is free
    x5 = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert _close(_ort(path, x5)[0], model(x5))


class TinyResidual(nn.Module):
    """Two inputs; an option-A shortcut (ChannelPad) added to a strided conv, a concat, a constant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pad = ChannelPad.centered(3, 8, stride=2)
        self.add, self.cat = Add(), Cat(1)
        self.const = Constant([2, 4, 4])
        with torch.no_grad():
            self.const.value.normal_()
            self.bn.running_mean.uniform_(-1, 1)

    def forward(self, x, y):
        h = self.add(torch.relu(self.bn(self.conv(x))), self.pad(x), self.pad(y))
        return self.cat(h, self.const(h))


def test_residual_layers_with_two_inputs(tmp_path):
    torch.manual_seed(2)
    model = TinyResidual().train()  # exported (and checked) in eval mode, and left in train mode
    xy = (torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))
    path = export_onnx(model, xy, tmp_path / "res.onnx", check="require")
    assert model.training
    x3 = (torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8))
    with torch.no_grad():
        assert _close(_ort(path, *x3)[0], model.eval()(*x3))


def test_static_batch(compact_lenet, tmp_path):
    x1 = torch.rand(1, 1, 28, 28)
    path = export_onnx(compact_lenet, x1, tmp_path / "static.onnx", dynamic_batch=False, exporter="torchscript",
                       opset=17)
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert model.opset_import[0].version == 17


@pytest.mark.parametrize("bad", ["not a tensor", [torch.rand(1, 4), 3], None, ()])
def test_non_tensor_input_is_an_error(bad, tmp_path):
    with pytest.raises(TypeError, match=r"export_onnx\(MLP\).*example_input"):
        export_onnx(MLP(), bad, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        export_onnx(lambda x: x, torch.rand(1, 3), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="check"):
        export_onnx(nn.Linear(3, 2), torch.rand(1, 3), tmp_path / "x.onnx", check="maybe")
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(nn.Linear(3, 2), torch.rand(1, 3), tmp_path / "x.onnx", exporter="tvm")
    with pytest.raises(ONNXExportError, match=r"export_onnx\(LeNet\): the model fails on example_input"):
        export_onnx(LeNet(), torch.rand(1, 3, 28, 28), tmp_path / "x.onnx")  # 3 channels, LeNet reads 1
    assert not list(tmp_path.iterdir())


class TracesDifferently(nn.Module):
    """Adds 1 only while being traced: the exported graph disagrees with eager PyTorch."""

    def forward(self, x):
        return x + 1 if torch.compiler.is_compiling() or torch.jit.is_tracing() else x


def test_disagreement_is_an_error_and_writes_nothing(tmp_path):
    with pytest.raises(ONNXExportError, match=r"TracesDifferently.*differs from PyTorch"):
        export_onnx(TracesDifferently(), torch.rand(2, 3), tmp_path / "x.onnx", exporter="torchscript")
    assert not list(tmp_path.iterdir())


def test_check_without_onnxruntime(monkeypatch, tmp_path):
    monkeypatch.setattr(export_mod, "_has", lambda name: name != "onnxruntime")
    with pytest.raises(ImportError, match="onnxruntime"):
        export_onnx(nn.Linear(3, 2), torch.rand(2, 3), tmp_path / "x.onnx", check="require")
    with pytest.warns(UserWarning, match="not checked"):
        export_onnx(nn.Linear(3, 2), torch.rand(2, 3), tmp_path / "x.onnx", exporter="torchscript")
    assert (tmp_path / "x.onnx").is_file()


def test_torch_export_of_compact_model(compact_lenet):
    small = LoweredConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1))  # no cached index yet
    for model, x in ((compact_lenet, torch.rand(2, 1, 28, 28)), (small, torch.rand(2, 3, 6, 6))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        assert not [w for w in caught if "_index_cache" in str(w.message)]  # no traced value assigned to the cache
        x5 = torch.rand(5, *x.shape[1:])
        with torch.no_grad():
            assert _close(ep.module()(x5), model(x5))
    # Tracing kept no traced value in the eager index cache.
    assert all(type(v) is torch.Tensor for m in (compact_lenet, small) for v in _caches(m))


def _caches(model):
    return [v for m in model.modules() if isinstance(m, LoweredConv2d) for entry in m._index_cache.values()
            for v in entry if v is not None]   # (index, entries in the padding)


def test_bench_model_onnx(sparse_lenet, compact_lenet, tmp_path, capsys):
    from structsparse import cli
    from structsparse.runner import rundir
    from structsparse.storage.compact_io import save_compact
    run = tmp_path / "run"
    run.mkdir()
    rundir.save_trained(sparse_lenet, run / rundir.TRAINED)
    save_compact(compact_lenet, run / "compact")
    (run / "metrics.json").write_text(json.dumps({"model": "lenet"}))
    out = tmp_path / "bench"
    argv = ["bench", "model", str(run), "--onnx", "--batch", "2", "--repeats", "2", "--warmup", "1", "--out", str(out)]
    assert cli.main(argv) == 0
    res = json.loads((out / "model.json").read_text())
    (row,) = res["onnx"]["rows"]
    assert row["batch"] == 2 and row["speedup_ort"] > 0 and row["ort_vs_torch_compact"] > 0
    assert (out / "compact.onnx").is_file() and (out / "original.onnx").is_file()
    assert "ORT compact" in capsys.readouterr().out


def test_exported_at_top_level():
    assert structsparse.export_onnx is export_onnx and "export_onnx" in structsparse.__all__
