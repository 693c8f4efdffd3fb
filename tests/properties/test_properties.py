"""Property tests of compaction (hypothesis): generated architectures with zeroed structures.

For every generated model and input ``x``:

* ``compact(model, x)`` gives the original's outputs (``RTOL``/``ATOL`` of
  :mod:`structsparse.compaction.surgery`) on ``x`` *and* on fresh random inputs of the same shape;
* the compact model never has more parameters than the original;
* ``save_compact`` / ``load_compact`` gives back a model with the same outputs.

Feed-forward chains: Conv2d (random kernel, stride, padding, dilation, padding mode, groups,
bias), BatchNorm2d with random statistics, activations, max/avg/adaptive pooling, dropout,
Flatten, Linear, BatchNorm1d, a final (log-)softmax. Residual graphs: ResNet-like blocks with
identity / option-A ``ChannelPad`` / 1×1-projection shortcuts, inception-like and dense
concatenations. Zeroed structures: filters, input channels, shape columns, Linear rows and
columns, whole convs, BatchNorm scales; biases and BatchNorm shifts stay random, so zero
filters still carry constants that compaction has to fold or keep.

Profiles (tests/conftest.py): "ci" by default, STRUCTSPARSE_HYPOTHESIS_PROFILE=long for more.
"""
from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from structsparse import LoweredConv2d, compact, load_compact, save_compact  # noqa: E402
from structsparse.compaction.surgery import ATOL, RTOL, IndexSelect  # noqa: E402
from structsparse.layers import Add, Cat, ChannelPad  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),   # random zeros may zero everything: no CollapseWarning error
              pytest.mark.filterwarnings("ignore::structsparse.compaction.CollapseWarning")]


ACTIVATIONS = {
    "ReLU": nn.ReLU, "ReLU6": nn.ReLU6, "LeakyReLU": lambda: nn.LeakyReLU(0.1), "ELU": nn.ELU, "GELU": nn.GELU,
    "SiLU": nn.SiLU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh, "Hardtanh": nn.Hardtanh, "Hardswish": nn.Hardswish,
    "Softplus": nn.Softplus, "Mish": nn.Mish, "Identity": nn.Identity,
}


# ---- shared pieces ---------------------------------------------------------------------------

def randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Random biases and BatchNorm statistics/affine parameters (in place)."""
    def u(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                u(m.running_mean, -1, 1)
                u(m.running_var, 0.5, 2)
                if m.affine:
                    u(m.weight, 0.5, 1.5)
                    u(m.bias, -1, 1)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                u(m.bias, -1, 1)


@st.composite
def zero_structures(draw, model: nn.Module) -> dict[str, int]:
    """Zero random filters, input channels, shape columns (convs), rows and columns (Linear),
    sometimes a whole layer, and random BatchNorm scales. Returns counts of what was zeroed.

    Each kind is zeroed in a drawn fraction of each layer (often none), so that most models
    keep a path from input to output and do not all collapse to a constant."""
    counts = {"filters": 0, "channels": 0, "columns": 0, "layers": 0, "bn scales": 0}

    def some(n: int) -> torch.Tensor:
        fraction = draw(st.sampled_from([0.0, 0.0, 0.0, 0.25, 0.5, 0.75]))
        chosen = draw(st.permutations(range(n)))[:min(n - 1, round(fraction * n))] if n > 1 else []
        out = torch.zeros(n, dtype=torch.bool)
        out[list(chosen)] = True
        return out

    with torch.no_grad():
        for _, m in sorted(model.named_modules(), key=lambda nm: nm[0]):
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.weight
                if draw(st.integers(0, 39)) == 39:  # the whole layer (rarely; 0 is where hypothesis starts)
                    w.zero_()
                    counts["layers"] += 1
                    continue
                rows, cols = some(w.shape[0]), some(w.shape[1])
                w[rows] = 0
                w[:, cols] = 0
                counts["filters"] += int(rows.sum())
                counts["channels"] += int(cols.sum())
                if w.dim() == 4:
                    shape = some(w[0].numel())
                    w.view(w.shape[0], -1)[:, shape] = 0
                    counts["columns"] += int(shape.sum())
                if m.bias is not None and draw(st.booleans()):  # zero filters without bias: exact zeros
                    m.bias[rows] = 0
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine and draw(st.integers(0, 3)) == 0:
                scales = some(m.num_features)
                m.weight[scales] = 0  # the channel becomes the constant BatchNorm shift
                counts["bn scales"] += int(scales.sum())
    return counts


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {list(got.shape)} != {list(want.shape)}"
    if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
        diff = (got - want).abs().max().item()
        raise AssertionError(f"{what}: compact output differs from the original by up to {diff:.3g}")


def check_compaction(model: nn.Module, x: torch.Tensor, seed: int, lowered_below: float, stats: dict,
                     label: str) -> None:
    """The three properties, plus a tally of what compaction did."""
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    fresh = [torch.randn(x.shape, generator=gen) * 3, torch.rand(x.shape, generator=gen),
             torch.randn((x.shape[0] + 2, *x.shape[1:]), generator=gen)]  # another batch size too
    with torch.no_grad():
        c = compact(model, x, lowered_below=lowered_below, check=False)  # check=False: this test checks
        assert_close(c(x), model(x), "on the example input")
        for i, y in enumerate(fresh):
            assert_close(c(y), model(y), f"on fresh random input {i}")
    before, after = count_params(model), count_params(c)
    assert after <= before, f"the compact model has more parameters ({after}) than the original ({before})"

    def tally(key: str) -> None:
        stats[f"{label}: {key}"] = stats.get(f"{label}: {key}", 0) + 1

    tally("tried")
    with tempfile.TemporaryDirectory() as tmp:
        save_compact(c, tmp)
        loaded = load_compact(tmp)
        with torch.no_grad():
            for y in [x, *fresh]:
                assert torch.equal(loaded(y), c(y)), "save_compact/load_compact changed the outputs"
    if after < before:
        tally("fewer parameters")
    kinds = {type(m) for m in c.modules()}
    if LoweredConv2d in kinds:
        tally("with a LoweredConv2d")
    if IndexSelect in kinds:
        tally("with an IndexSelect")
    if not any(isinstance(m, (nn.Conv2d, nn.Linear, LoweredConv2d)) for m in c.modules()):
        tally("constant (no weighted layer left)")


# ---- feed-forward chains ---------------------------------------------------------------------

def _fits(layer: nn.Module, probe: torch.Tensor) -> torch.Tensor | None:
    """``probe`` through ``layer`` if it runs and leaves every dimension non-empty, else None."""
    try:
        with torch.no_grad():
            out = layer.eval()(probe)
    except (RuntimeError, ValueError):
        return None
    return out if out.numel() and min(out.shape) >= 1 else None


@st.composite
def chains(draw):
    """A random feed-forward chain with its example input: (model, x, seed)."""
    seed = draw(st.integers(0, 2 ** 16))
    batch, c, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(5, 14)), draw(st.integers(5, 14))
    layers: list[nn.Module] = []
    probe = torch.zeros(2, c, h, w)

    def add(layer: nn.Module) -> bool:
        nonlocal probe
        out = _fits(layer, probe)
        if out is None:
            return False
        layers.append(layer)
        probe = out
        return True

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(draw(st.integers(0, 3))):
            cin = probe.shape[1]
            groups = draw(st.sampled_from([1, 1, 1, 2, cin]))
            out = draw(st.integers(1, 10))
            if cin % groups or out % groups:
                groups = 1
            kernel = draw(st.sampled_from([1, 2, 3, 5, (3, 1), (1, 3), (2, 3)]))
            stride = draw(st.sampled_from([1, 1, 2, (2, 1)]))
            dilation = draw(st.sampled_from([1, 1, 2]))
            padding = draw(st.sampled_from([0, 1, 2, "same"] if stride == 1 else [0, 1, 2]))
            mode = draw(st.sampled_from(["zeros"] * 6 + ["reflect", "replicate", "circular"]))
            conv = nn.Conv2d(cin, out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                             bias=draw(st.booleans()), padding_mode=mode)
            if not add(conv):
                continue
            if draw(st.booleans()):
                add(nn.BatchNorm2d(out, affine=draw(st.sampled_from([True, True, True, False]))))
            if draw(st.integers(0, 4)):
                add(ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]())
            pool = draw(st.sampled_from([None, None, "max", "avg", "adaptive_avg", "adaptive_max"]))
            k = draw(st.integers(2, 3))
            s = draw(st.integers(1, k))
            p = draw(st.integers(0, k // 2))
            if pool == "max":
                add(nn.MaxPool2d(k, s, p, ceil_mode=draw(st.booleans())))
            elif pool == "avg":
                add(nn.AvgPool2d(k, s, p, ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans())))
            elif pool == "adaptive_avg":
                add(nn.AdaptiveAvgPool2d(draw(st.integers(1, 3))))
            elif pool == "adaptive_max":
                add(nn.AdaptiveMaxPool2d(draw(st.integers(1, 3))))
            if draw(st.integers(0, 4)) == 0:
                add(draw(st.sampled_from([nn.Dropout(0.5), nn.Dropout2d(0.3)])))
        add(nn.Flatten())
        for _ in range(draw(st.integers(0, 2))):
            out = draw(st.integers(1, 12))
            add(nn.Linear(probe.shape[1], out, bias=draw(st.booleans())))
            if draw(st.booleans()):
                add(nn.BatchNorm1d(out))
            if draw(st.integers(0, 4)):
                add(ACTIVATIONS[draw(st.sampled_from(sorted(ACTIVATIONS)))]())
            if draw(st.integers(0, 4)) == 0:
                add(draw(st.sampled_from([nn.Dropout(0.5), nn.AlphaDropout(0.2)])))
        add(nn.Linear(probe.shape[1], draw(st.integers(1, 6)), bias=draw(st.booleans())))
        final = draw(st.sampled_from([None, None, "softmax", "log_softmax"]))
        if final:
            add(nn.Softmax(dim=1) if final == "softmax" else nn.LogSoftmax(dim=1))
        model = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed)
    randomize(model, gen)
    zeroed = draw(zero_structures(model))
    x = torch.randn(batch, c, h, w, generator=gen) * draw(st.sampled_from([1.0, 3.0]))
    return model.eval(), x, seed, zeroed


@given(case=chains(), lowered_below=st.sampled_from([0.0, 0.5, 1.0]))
def test_compaction_of_chains_is_exact(case, lowered_below, fuzz_stats):
    model, x, seed, _ = case
    check_compaction(model, x, seed, lowered_below, fuzz_stats, "compact, feed-forward chains")


# ---- residual and branching graphs -----------------------------------------------------------

class BasicBlock(nn.Module):
    """conv-BN-act-conv-BN plus a shortcut (identity, option-A ChannelPad, or 1×1 projection)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str, act: str, add_module: bool,
                 pad_index: list[int] | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = ACTIVATIONS[act]()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if shortcut == "identity":
            self.shortcut = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = ChannelPad.centered(cin, cout, stride) if pad_index is None else \
                ChannelPad(cout, pad_index, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.add = Add() if add_module else None
        self.act2 = ACTIVATIONS[act]()

    def forward(self, x):
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        short = self.shortcut(x)
        out = self.add(out, short) if self.add is not None else out + short
        return self.act2(out)


class InceptionBlock(nn.Module):
    """Branches (1×1; 3×3; max-pool then 1×1) concatenated along channels."""

    def __init__(self, cin: int, widths: tuple[int, int, int], cat_module: bool):
        super().__init__()
        self.b1 = nn.Conv2d(cin, widths[0], 1)
        self.b2 = nn.Sequential(nn.Conv2d(cin, widths[1], 3, padding=1), nn.BatchNorm2d(widths[1]), nn.ReLU())
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(cin, widths[2], 1))
        self.cat = Cat(1) if cat_module else None

    def forward(self, x):
        ys = [self.b1(x), self.b2(x), self.b3(x)]
        return self.cat(*ys) if self.cat is not None else torch.cat(ys, 1)


class DenseLayer(nn.Module):
    """DenseNet-like: the input and a new BN-act-conv of it, concatenated."""

    def __init__(self, cin: int, growth: int, act: str, cat_module: bool):
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.act = ACTIVATIONS[act]()
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)
        self.cat = Cat(1) if cat_module else None

    def forward(self, x):
        y = self.conv(self.act(self.bn(x)))
        return self.cat(x, y) if self.cat is not None else torch.cat([x, y], 1)


class SumBlock(nn.Module):
    """Two conv branches and the input summed by one three-input Add (or two binary adds)."""

    def __init__(self, c: int, act: str, add_module: bool):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.b = nn.Conv2d(c, c, 1)
        self.add = Add() if add_module else None
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.act(self.add(a, b, x) if self.add is not None else a + b + x)


class ResidualNet(nn.Module):
    def __init__(self, stem: nn.Module, blocks: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, nn.ModuleList(blocks), head

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@st.composite
def residual_nets(draw):
    """A random residual/branching net with its example input: (model, x, seed, zeroed)."""
    seed = draw(st.integers(0, 2 ** 16))
    batch, cin, hw = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(6, 10))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        width = draw(st.integers(2, 6))
        stem = nn.Sequential(nn.Conv2d(cin, width, 3, padding=1, bias=draw(st.booleans())), nn.BatchNorm2d(width),
                             nn.ReLU())
        blocks, c, size = [], width, hw
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["basic", "basic", "inception", "dense", "sum"]))
            act = draw(st.sampled_from(["ReLU", "ReLU", "LeakyReLU", "Tanh", "Identity"]))
            if kind == "basic":
                stride = draw(st.sampled_from([1, 2])) if size >= 4 else 1
                shortcut = draw(st.sampled_from(["identity", "pad", "projection"]))
                cout = c if shortcut == "identity" else c + draw(st.integers(0, 4))
                if shortcut == "identity" and stride != 1:
                    shortcut = "pad"
                pad_index = None
                if shortcut == "pad" and draw(st.booleans()):  # channels at arbitrary places
                    pad_index = sorted(draw(st.permutations(range(cout)))[:c])
                blocks.append(BasicBlock(c, cout, stride, shortcut, act, draw(st.booleans()), pad_index))
                c, size = cout, (size - 1) // stride + 1
            elif kind == "inception":
                widths = tuple(draw(st.integers(1, 4)) for _ in range(3))
                blocks.append(InceptionBlock(c, widths, draw(st.booleans())))
                c = sum(widths)
            elif kind == "sum":
                blocks.append(SumBlock(c, act, draw(st.booleans())))
            else:
                growth = draw(st.integers(1, 4))
                blocks.append(DenseLayer(c, growth, act, draw(st.booleans())))
                c += growth
        classes = draw(st.integers(2, 5))
        if draw(st.booleans()):
            head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))
        else:
            head = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, classes))
        model = ResidualNet(stem, blocks, head)
    gen = torch.Generator().manual_seed(seed)
    randomize(model, gen)
    zeroed = draw(zero_structures(model))
    x = torch.randn(batch, cin, hw, hw, generator=gen)
    return model.eval(), x, seed, zeroed


@given(case=residual_nets(), lowered_below=st.sampled_from([0.0, 0.5, 1.0]))
def test_compaction_of_residual_graphs_is_exact(case, lowered_below, fuzz_stats):
    model, x, seed, _ = case
    check_compaction(model, x, seed, lowered_below, fuzz_stats, "compact, residual graphs")


@given(case=residual_nets())
def test_residual_generator_makes_valid_models(case):
    """The generated residual nets run (so a failure above is compact()'s, not the generator's)."""
    model, x, _, _ = case
    with torch.no_grad():
        assert model(x).shape[0] == x.shape[0]


# ---- once known bugs (fixed; kept as regression tests) -------------------------------------

def test_functional_forward_round_trip(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            return self.fc(torch.flatten(F.relu(self.conv(x)), 1))

    model = Net().eval()
    with torch.no_grad():
        model.conv.weight[:2] = 0
    x = torch.rand(2, 1, 8, 8)
    c = compact(model, x)
    save_compact(c, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path)(x), c(x))


def test_hardtanh_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.Hardtanh(), nn.Linear(3, 2)).eval()
    x = torch.rand(2, 4)
    c = compact(model, x)
    save_compact(c, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_compact(tmp_path)(x), c(x))


class _SameTensorTwice(nn.Module):
    def __init__(self, join: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.join = join

    def forward(self, x):
        y = self.conv(x)
        return self.join(y, y)


@pytest.mark.parametrize("join", [Add, lambda: Cat(1)], ids=["Add", "Cat"])
def test_step_reading_one_tensor_twice(join):
    model = _SameTensorTwice(join()).eval()
    x = torch.randn(1, 2, 3, 3)
    c = compact(model, x, check=False)
    with torch.no_grad():
        assert_close(c(x), model(x), "y joined with itself")
