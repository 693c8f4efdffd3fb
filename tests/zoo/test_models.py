"""The model registry: output shapes, parameter counts, layer names, torch.fx tracing."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.fx
from torch import nn

from structsparse import layers
from structsparse.speed.layer_bench import ALEXNET
from structsparse.zoo.models import MODELS, BasicBlock, CaffeNet, WithinChannelLRN, build_model


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class LeafTracer(torch.fx.Tracer):
    """Treats structsparse.layers modules as leaves, as the layers module intends."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, (layers.ChannelPad, layers.Add, layers.Cat, layers.Constant)) or super().is_leaf_module(m, qualname)


CIFAR = (2, 3, 32, 32)


@pytest.mark.parametrize("name,kwargs,shape,out", [
    ("lenet", {}, (2, 1, 28, 28), 10),
    ("mlp", {}, (2, 1, 28, 28), 10),
    ("resnet20", {}, CIFAR, 10),
    ("resnet20", {"shortcut": "B", "num_classes": 100}, CIFAR, 100),
    ("resnet32", {}, CIFAR, 10),
    ("resnet56", {"in_channels": 1}, (2, 1, 32, 32), 10),
    ("convnet_cifar", {}, CIFAR, 10),
    ("convnet_cifar", {"lrn": "across_channels"}, CIFAR, 10),
    ("convnet_cifar", {"lrn": "none", "num_classes": 7}, CIFAR, 7),
])
def test_output_shapes(name, kwargs, shape, out):
    torch.manual_seed(0)
    m = build_model(name, **kwargs).eval()
    y = m(torch.rand(shape))
    assert y.shape == (shape[0], out) and torch.isfinite(y).all()


@pytest.mark.parametrize("name,size", [("caffenet", 227), ("alexnet", 224)])
def test_imagenet_models(name, size):
    m = build_model(name, num_classes=20).eval()
    with torch.no_grad():
        assert m(torch.rand(1, 3, size, size)).shape == (1, 20)
    convs = [getattr(m, s.name) for s in ALEXNET]
    for conv, s in zip(convs, ALEXNET):
        assert (conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0]) == \
            (s.out_channels, s.kernel, s.stride, s.padding)
        assert conv.groups == (s.groups if name == "caffenet" else 1)


def test_caffenet_parameter_count():
    # CaffeNet (bvlc_reference_caffenet) has 60,965,224 parameters.
    assert n_params(CaffeNet()) == 60_965_224
    with pytest.raises(ValueError, match="groups"):
        CaffeNet(groups=4)


@pytest.mark.parametrize("name,shortcut,count", [
    ("resnet20", "A", 269_722),    # He et al.: 0.27M
    ("resnet32", "A", 464_154),    # 0.46M
    ("resnet56", "A", 853_018),    # 0.85M
    ("resnet20", "B", 272_474),    # + two 1×1 projections with BN
])
def test_resnet_parameter_counts(name, shortcut, count):
    assert n_params(build_model(name, shortcut=shortcut)) == count


def test_convnet_parameter_count():
    assert n_params(build_model("convnet_cifar")) == 89_578


def test_resnet_layer_names():
    m = build_model("resnet20")
    names = dict(m.named_modules())
    for n in ("conv1", "bn1", "fc", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2", "layer1.0.bn2",
              "layer1.0.shortcut", "layer1.0.add", "layer3.2.conv2"):
        assert n in names, n
    convs = [n for n, mod in names.items() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 19 and convs[0] == "conv1"                      # 20 weighted layers with fc
    assert all(n.startswith("layer") for n in convs[1:])
    assert isinstance(names["layer1.0.add"], layers.Add)
    assert all(type(mod) is nn.ReLU for n, mod in names.items() if "relu" in n)


def test_shortcut_options():
    a, b = build_model("resnet20", shortcut="A"), build_model("resnet20", shortcut="B")
    for stage in ("layer2", "layer3"):
        sa, sb = a.get_submodule(f"{stage}.0.shortcut"), b.get_submodule(f"{stage}.0.shortcut")
        assert isinstance(sa, layers.ChannelPad) and sa.stride == 2
        assert isinstance(sb, nn.Sequential) and isinstance(sb[0], nn.Conv2d) and isinstance(sb[1], nn.BatchNorm2d)
        assert sb[0].kernel_size == (1, 1) and sb[0].stride == (2, 2)
    for m in (a, b):   # blocks that keep the shape have an identity shortcut
        assert isinstance(m.get_submodule("layer1.0.shortcut"), nn.Identity)
        assert isinstance(m.get_submodule("layer2.1.shortcut"), nn.Identity)
    with pytest.raises(ValueError, match="unknown shortcut 'C'"):
        build_model("resnet20", shortcut="C")
    with pytest.raises(ValueError, match="unknown shortcut"):
        BasicBlock(16, 32, 2, shortcut="b")


def test_option_a_shortcut_is_zero_padded_identity():
    block = BasicBlock(16, 32, 2, "A").eval()
    x = torch.randn(2, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert not s[:, :8].any() and not s[:, 24:].any()


@pytest.mark.parametrize("name,kwargs", [
    ("resnet20", {"shortcut": "B"}), ("convnet_cifar", {}), ("convnet_cifar", {"lrn": "across_channels"}),
    ("lenet", {}), ("mlp", {}),
])
def test_fx_symbolic_trace(name, kwargs):
    m = build_model(name, **kwargs).eval()
    x = torch.rand(2, 1, 28, 28) if name in ("lenet", "mlp") else torch.rand(CIFAR)
    gm = torch.fx.symbolic_trace(m)
    torch.testing.assert_close(gm(x), m(x))


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_fx_graph_with_layer_leaves(shortcut):
    m = build_model("resnet20", shortcut=shortcut).eval()
    gm = torch.fx.GraphModule(m, LeafTracer().trace(m))
    x = torch.rand(CIFAR)
    torch.testing.assert_close(gm(x), m(x))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "layer1.0.conv1" in targets and "layer2.0.shortcut" in targets or "layer2.0.shortcut.0" in targets
    adds = [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith(".add")]
    assert len(adds) == 9 and all(len(n.args) == 2 for n in adds)
    assert all(n.op in ("placeholder", "call_module", "output") for n in gm.graph.nodes)


def test_caffenet_fx_trace():
    m = CaffeNet(num_classes=5).eval()
    gm = torch.fx.symbolic_trace(m)
    x = torch.rand(1, 3, 227, 227)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x))


def test_within_channel_lrn_matches_caffe_formula():
    lrn = WithinChannelLRN(3, alpha=0.5, beta=0.75)
    x = torch.randn(2, 4, 5, 6)
    padded = torch.nn.functional.pad(x * x, (1, 1, 1, 1))
    mean = sum(padded[:, :, i:i + 5, j:j + 6] for i in range(3) for j in range(3)) / 9
    torch.testing.assert_close(lrn(x), x / (1 + 0.5 * mean) ** 0.75)
    # never mixes channels: a zero channel stays zero, the others do not see it
    x2 = x.clone()
    x2[:, 1] = 0
    torch.testing.assert_close(lrn(x2)[:, [0, 2, 3]], lrn(x)[:, [0, 2, 3]])
    with pytest.raises(ValueError, match="odd size"):
        WithinChannelLRN(2)
    with pytest.raises(ValueError, match="unknown lrn"):
        build_model("convnet_cifar", lrn="within")


def test_convnet_pooling_sizes():
    m = build_model("convnet_cifar").eval()
    sizes = []
    x = torch.rand(1, 3, 32, 32)
    for name in ("conv1", "pool1", "relu1", "norm1", "conv2", "relu2", "pool2", "norm2", "conv3", "relu3", "pool3"):
        x = getattr(m, name)(x)
        if name.startswith("pool"):
            sizes.append(x.shape[-1])
    assert sizes == [16, 8, 4]


def test_consistent_constructor_signatures():
    for name, factory in MODELS.items():
        params = inspect.signature(factory).parameters
        assert "num_classes" in params, name
        assert "in_channels" in params or name == "mlp", name


def test_unknown_model():
    with pytest.raises(ValueError, match=r"unknown model 'resnet18'; known models: .*resnet20") as e:
        build_model("resnet18")
    assert all(n in str(e.value) for n in MODELS)


def test_mlp_dropout_trains_only_and_compacts_away():
    """MLP(dropout=p): dropout in training, the plain MLP at inference; compaction removes it exactly."""
    from structsparse.compaction.surgery import compact
    torch.manual_seed(0)
    plain, drop = build_model("mlp"), build_model("mlp", dropout=0.5)
    drop.load_state_dict(plain.state_dict())   # dropout adds no parameters
    x = torch.rand(8, 1, 28, 28)
    assert torch.equal(drop.eval()(x), plain.eval()(x))
    assert not torch.equal(drop.train()(x), plain.train()(x))
    with torch.no_grad():
        drop.fc2.weight[:120] = 0
        drop.fc2.bias[:120] = 0
        small = compact(drop.eval(), x[:1])
    assert small.fc2.out_features == 180 and not any(isinstance(m, nn.Dropout) for m in small.modules())
    torch.testing.assert_close(small(x), drop(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="dropout"):
        build_model("mlp", dropout=1.0)


