"""LoweredConv2d: the shape-wise conv that gathers only the kept im2col rows."""
import pytest
import torch
from torch import nn

from structsparse import LoweredConv2d, compact
from structsparse.zoo.models import LeNet

from helpers import check_exact



def test_shape_columns_use_lowered_conv():
    torch.manual_seed(0)
    model = LeNet().eval()
    with torch.no_grad():
        cols = model.conv2.weight.view(50, -1)
        cols[:, torch.randperm(500)[:450]] = 0
    x = torch.rand(4, 1, 28, 28)
    c = compact(model, x)
    assert isinstance(c.conv2, LoweredConv2d) and c.conv2.weight.shape[1] <= 50
    check_exact(model, c, x)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (1, 0), 1)])
def test_lowered_conv_matches_conv2d(stride, padding, dilation):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 6, (3, 2), stride=stride, padding=padding, dilation=dilation)
    keep = torch.rand(3 * 3 * 2) < 0.5
    keep[0] = True
    with torch.no_grad():
        conv.weight.view(6, -1)[:, ~keep] = 0
    lowered = LoweredConv2d.from_conv(conv)
    x = torch.randn(5, 3, 11, 9)
    assert torch.allclose(lowered(x), conv(x), atol=1e-5)
    assert torch.allclose(lowered(x[:1]), conv(x[:1]), atol=1e-5)  # another size: index rebuilt


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("form", ["columns", "positions", "filters", "onednn", "images"])
def test_every_form_reads_any_layout_and_trains(padding, bias, form, monkeypatch):
    """Every form is exact on images inside a batch (views with an offset, read in place when unpadded),
    channels-last input (gathered in place by the positions forms), strides and dilation, after the cached
    indices move dtype, and in gradients."""
    from structsparse import layers
    if form == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    monkeypatch.setattr(layers, "TUNE", False)  # the rule, not timing, picks the form
    monkeypatch.setattr(LoweredConv2d, "_rule", lambda self, x, ho, wo: form)
    torch.manual_seed(2)
    for stride, dilation in ((1, 1), ((2, 1), 2)):
        conv = nn.Conv2d(4, 5, 3, stride=stride, padding=padding, dilation=dilation, bias=bias)
        with torch.no_grad():
            conv.weight.view(5, -1)[:, torch.randperm(36)[:20]] = 0
        lowered = LoweredConv2d.from_conv(conv)
        x = torch.randn(3, 4, 9, 8)
        assert lowered(x).is_contiguous() == (form in ("columns", "filters", "images"))  # these write N×C×H×W
        for image in (x, x[2:3], x[1:].contiguous(memory_format=torch.channels_last), x[:, :, :, 1:][1:2]):
            assert torch.allclose(lowered(image), conv(image), atol=1e-5)
            with torch.no_grad():   # the images form writes in place here
                assert torch.allclose(lowered(image), conv(image), atol=1e-5)
        x.requires_grad_(True)
        lowered(x).square().sum().backward()
        grad_x = x.grad.clone()
        x.grad = None
        conv(x).square().sum().backward()
        assert torch.allclose(grad_x, x.grad, atol=1e-4)
        kept = conv.weight.detach().view(5, -1).ne(0).any(0)
        assert torch.allclose(lowered.weight.grad, conv.weight.grad.view(5, -1)[:, kept], atol=1e-4)
    lowered.to(torch.float64)
    assert torch.allclose(lowered(x[:1].double()), conv.double()(x[:1].double()), atol=1e-9)


def test_the_rule_picks_a_form_by_batch_and_size(monkeypatch):
    """Without timing: the GEMM by filters at batch 1; at larger batches image by image where the positions
    form's index would be large, else oneDNN's GEMM from ONEDNN_FROM multiply-adds, else the GEMM by positions."""
    from structsparse import layers
    from structsparse.compaction import kernels
    monkeypatch.setattr(layers, "TUNE", False)
    lowered = LoweredConv2d(8, 16, 3, torch.arange(0, 72, 3), padding=1)   # 24 of 72 columns
    x = torch.rand(4, 8, 10, 10)
    assert lowered.form_names(x[:1])[0] == "filters" and lowered.form_names(x)[0] == "positions"
    monkeypatch.setattr(kernels, "ONEDNN_FROM", 4 * 100 * 24 * 16)
    assert lowered.form_names(x)[0] == ("onednn" if torch.backends.mkldnn.is_available() else "positions")
    monkeypatch.setattr(kernels, "LARGE_INDEX_FROM", 100 * 24 - 1)
    assert lowered.form_names(x)[0] == "images" and lowered.form_names(x[:1])[0] == "filters"
    assert lowered(x).is_contiguous()   # the images form writes N × C × H × W
    names = lowered.form_names(x)
    assert len(names) == len(set(names)) == 4 + torch.backends.mkldnn.is_available()


@pytest.mark.parametrize("kernel", [2, 3, (2, 3)])
def test_tiled_max_pool_gives_max_pool2d_values(kernel, monkeypatch):
    import torch.nn.functional as F
    from structsparse.layers import TiledMaxPool2d
    monkeypatch.setattr(TiledMaxPool2d, "SHIFTS_FROM", 0)    # the strided-view form even on small inputs
    torch.manual_seed(3)
    for shape in [(4, 5, 24, 24), (2, 3, 9, 7), (1, 2, 25, 23)]:
        x = torch.randn(*shape)
        x[0, 0, 1, 1] = float("nan")                         # NaN wins, as in max_pool2d
        x[-1, -1, :4, :4] = 0.0                              # ties
        expected = F.max_pool2d(x, kernel)
        assert torch.equal(TiledMaxPool2d(kernel)(x).isnan(), expected.isnan())
        assert torch.equal(TiledMaxPool2d(kernel)(x).nan_to_num(), expected.nan_to_num())


def test_compact_tiles_only_the_max_pools_whose_windows_tile():
    from structsparse.layers import TiledMaxPool2d
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.MaxPool2d(3, 2),
                          nn.Conv2d(4, 4, 1), nn.MaxPool2d(2, padding=1), nn.Flatten(), nn.LazyLinear(3))
    x = torch.rand(2, 1, 20, 20)
    model(x)
    small = compact(model.eval(), x)
    check_exact(model, small, x)
    pools = [type(m) for _, m in small.steps() if isinstance(m, nn.MaxPool2d)]
    assert pools == [TiledMaxPool2d, nn.MaxPool2d, nn.MaxPool2d]


def test_compact_models_save_plain_pools_and_load_tiled_ones(tmp_path):
    import json
    from structsparse import load_compact, save_compact
    from structsparse.layers import TiledMaxPool2d
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 81, 2)).eval()
    x = torch.rand(2, 1, 20, 20)
    small = compact(model, x)
    assert type(small.steps()[1][1]) is TiledMaxPool2d
    path = save_compact(small, tmp_path / "m")      # the file names the plain module; loading picks the form
    assert json.loads((path / "architecture.json").read_text())["steps"][1]["type"] == "MaxPool2d"
    assert type(load_compact(path).steps()[1][1]) is TiledMaxPool2d


def test_fastest_keeps_a_clearly_faster_form_and_remembers_it():
    import time
    from structsparse.timing import fastest
    calls = []
    slow, quick = (lambda: time.sleep(2e-3)), (lambda: calls.append(1))
    key = ("test", object())
    assert fastest(key, (slow, quick)) == 1
    assert fastest(key, (slow, lambda: time.sleep(1.0))) == 1      # remembered: not timed again
    assert fastest(("test", object()), (quick, slow)) == 0
    assert fastest(("test", object()), (quick, quick), margin=0.0) == 0  # the first unless another beats the margin


@pytest.mark.parametrize("choice", [0, 1])
@pytest.mark.parametrize("groups", [1, 2])
def test_tuned_conv_gives_conv2d_values_in_either_form(choice, groups, monkeypatch):
    from structsparse import layers
    from structsparse.layers import TunedConv2d, fast_form
    seen = []
    monkeypatch.setattr(layers, "fastest", lambda key, forms, **kw: seen.append(key) or choice)
    torch.manual_seed(4)
    conv = nn.Conv2d(4, 6, 3, stride=(2, 1), padding=1, groups=groups)
    tuned = fast_form(conv)
    assert type(tuned) is TunedConv2d and tuned.weight is conv.weight and tuned.bias is conv.bias
    for x in (torch.randn(3, 4, 9, 8), torch.randn(1, 4, 9, 8).contiguous(memory_format=torch.channels_last)):
        assert torch.allclose(tuned(x), conv(x), atol=1e-5)
    assert len(seen) == 2 and torch._C._get_mkldnn_enabled()        # PyTorch's own conv puts oneDNN back
    x = torch.randn(2, 4, 9, 8, requires_grad=True)
    tuned(x).square().sum().backward()
    grad = x.grad.clone()
    x.grad = None
    conv(x).square().sum().backward()
    assert torch.allclose(grad, x.grad, atol=1e-4)
    monkeypatch.setattr(TunedConv2d, "TUNE_BELOW", 1)                 # large calls: oneDNN, untimed
    tuned(torch.randn(1, 4, 9, 8))
    assert len(seen) == 3


def test_the_flop_counter_does_not_count_the_timing_of_a_first_call():
    from structsparse.layers import fast_form
    from structsparse.report import count_macs
    conv, x = nn.Conv2d(3, 5, 3), torch.rand(1, 3, 7, 6)
    assert count_macs(fast_form(conv), x) == count_macs(conv, x) == 5 * 27 * 5 * 4


def test_a_channels_last_compact_model_computes_the_same_and_saves_its_layout(tmp_path):
    import json
    from structsparse import load_compact, save_compact
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1)).eval()
    with torch.no_grad():
        model[0].weight[:3] = 0
    x = torch.rand(2, 3, 9, 9)
    small = compact(model, x, channels_last=True)
    assert small.channels_last and small.steps()[0][1].weight.is_contiguous(memory_format=torch.channels_last)
    out = small(x)
    assert out.is_contiguous() and torch.allclose(out, model(x), atol=1e-5)   # NCHW out, as the original's
    path = save_compact(small, tmp_path / "m")
    arch = json.loads((path / "architecture.json").read_text())
    assert arch["memory_format"] == "channels_last"
    loaded = load_compact(path)
    assert loaded.channels_last and torch.equal(loaded(x), out)
    assert "memory_format" not in json.loads(
        (save_compact(compact(model, x, channels_last=False), tmp_path / "n") / "architecture.json").read_text())
    arch["memory_format"] = "nhwc"
    (path / "architecture.json").write_text(json.dumps(arch))
    with pytest.raises(ValueError, match="architecture.json: 'memory_format' must be"):
        load_compact(path)
    with pytest.raises(ValueError, match="channels_last must be True, False or 'measure', got 'yes'"):
        compact(model, x, channels_last="yes")
