import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from structsparse import LoweredConv2d, compact, sparsity_report
from structsparse.compaction.surgery import ATOL, RTOL, CompactNet, IndexSelect
from structsparse.zoo.models import LeNet, MLP

pytestmark = pytest.mark.filterwarnings("ignore::structsparse.compaction.CollapseWarning")  # random zeros may zero everything

ACTS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, lambda: nn.LeakyReLU(0.1)]


def random_chain(rng: random.Random) -> tuple[nn.Module, torch.Tensor]:
    """A random feed-forward chain: convs (+BN, activation, pooling), flatten, linears (+BN1d, dropout)."""
    layers, c, hw = [], rng.choice([1, 3]), rng.choice([12, 16])
    x = torch.rand(4, c, hw, hw)
    for _ in range(rng.randint(1, 3)):
        k = rng.choice([1, 3, 5])
        pad = rng.choice([0, k // 2])
        out = rng.randint(3, 9)
        if hw + 2 * pad < k + 2:
            break
        layers.append(nn.Conv2d(c, out, k, stride=rng.choice([1, 1, 2]), padding=pad, bias=rng.random() < 0.8))
        hw = (hw + 2 * pad - k) // layers[-1].stride[0] + 1
        if rng.random() < 0.5:
            layers.append(nn.BatchNorm2d(out))
        layers.append(rng.choice(ACTS)())
        if rng.random() < 0.4 and hw >= 4:
            layers.append(rng.choice([nn.MaxPool2d(2), nn.AvgPool2d(2)]))
            hw //= 2
        c = out
    layers.append(nn.Flatten())
    f = c * hw * hw
    for _ in range(rng.randint(1, 2)):
        out = rng.randint(4, 12)
        layers.append(nn.Linear(f, out, bias=rng.random() < 0.8))
        if rng.random() < 0.4:
            layers.append(nn.BatchNorm1d(out))
        layers.append(rng.choice(ACTS)())
        if rng.random() < 0.3:
            layers.append(nn.Dropout(0.5))
        f = out
    layers.append(nn.Linear(f, 5))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.uniform_(-1, 1)
    return model, x


def zero_structures(model: nn.Module, rng: random.Random) -> None:
    """Zero random filters, channels, shape columns and input features of every weighted layer."""
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            w = m.weight
            n, c = w.shape[:2]
            for i in rng.sample(range(n), rng.randint(0, n - 1)):
                w[i] = 0
            for j in rng.sample(range(c), rng.randint(0, c - 1)):
                w[:, j] = 0
            if w.dim() == 4:
                cols = w.view(n, -1)
                for j in rng.sample(range(cols.shape[1]), rng.randint(0, cols.shape[1] - 1)):
                    cols[:, j] = 0


def assert_same_outputs(model, compacted, x):
    model.eval()
    with torch.no_grad():
        assert torch.allclose(compacted(x), model(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("seed", range(40))
def test_compaction_is_exact_on_random_chains(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model, x = random_chain(rng)
    zero_structures(model, rng)
    c = compact(model, x, check=False)  # check=False: this test is the check
    assert_same_outputs(model, c, x)
    assert_same_outputs(model, c, torch.randn_like(x) * 3)  # also away from the example input
    assert sum(p.numel() for p in c.parameters()) <= sum(p.numel() for p in model.parameters())


def test_compaction_removes_lenet2_structures():
    model = LeNet().eval()
    with torch.no_grad():
        model.conv1.weight[5:] = 0
        model.conv2.weight[19:] = 0
        model.conv2.weight[:, 4:] = 0
    x = torch.rand(8, 1, 28, 28)
    c = compact(model, x)
    # conv1 filters 5..19 are zero but biased: conv2 ignores channels 4.. so they go; filter 4 feeds
    # a read channel but has nonzero weights, so it stays.
    assert (c.conv1.out_channels, c.conv2.in_channels, c.conv2.out_channels) == (4, 4, 19)
    assert c.fc1.in_features == 19 * 16 and c.fc2.out_features == 10
    assert [n for n, _ in c.named_children()][:2] == ["conv1", "pool1"]
    assert_same_outputs(model, c, x)
    assert c(x).shape == model(x).shape


def test_zero_filter_with_bias_folds_into_next_layer():
    model = LeNet().eval()
    with torch.no_grad():
        model.conv2.weight[:25] = 0
        model.conv2.bias[:25] = torch.linspace(-2, 2, 25)
    x = torch.rand(4, 1, 28, 28)
    c = compact(model, x)
    assert c.conv2.out_channels == 25 and c.fc1.in_features == 25 * 16
    assert_same_outputs(model, c, x)


def test_zero_biased_filter_before_padded_conv_is_kept_not_dropped():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1), nn.Flatten())
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 1.5          # relu(1.5) is a nonzero constant, padding makes it position-dependent
        model[0].weight[2] = 0
        model[0].bias[2] = -1.0         # relu(-1) = 0: removable
    x = torch.rand(2, 2, 8, 8)
    c = compact(model, x)
    assert c.get_submodule("0").out_channels == 3  # filter 2 removed, filter 1 kept
    assert_same_outputs(model, c, x)


def test_zero_biased_filter_before_unpadded_conv_is_folded():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 3, 3), nn.Flatten())
    model.eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[0].weight[1] = 0
    x = torch.rand(2, 2, 8, 8)
    c = compact(model, x, fold_norms=False)
    assert c.get_submodule("0").out_channels == 3 and c.get_submodule("1").num_features == 3
    assert_same_outputs(model, c, x)


def test_mlp_reads_only_used_pixels():
    model = MLP().eval()
    with torch.no_grad():
        model.fc1.weight[:, 300:] = 0
        model.fc2.weight[100:] = 0
    x = torch.rand(4, 1, 28, 28)
    c = compact(model, x)
    assert isinstance(c.fc1_inputs, IndexSelect) and c.fc1.in_features == 300
    assert c.fc2.out_features == 100 and c.fc3.in_features == 100
    assert_same_outputs(model, c, x)






def test_functional_forward_with_hardcoded_view():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 6, 3)
            self.fc = nn.Linear(6 * 26 * 26, 4)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv(x)), 1)
            x = x.view(x.size(0), -1)
            return F.log_softmax(self.fc(x), dim=1)

    model = Net().eval()
    with torch.no_grad():
        model.conv.weight[:3] = 0
    x = torch.rand(3, 1, 28, 28)
    c = compact(model, x)
    assert c.conv.out_channels < 6
    assert_same_outputs(model, c, x)


def test_compact_does_not_modify_original():
    model = LeNet()
    with torch.no_grad():
        model.conv2.weight[:10] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compact(model, torch.rand(2, 1, 28, 28))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


class Gate(nn.Module):
    def __init__(self, combine=torch.mul):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.combine = combine

    def forward(self, x):
        return self.combine(x, self.conv(x))


def test_elementwise_product_of_equal_shapes_ties_channels():
    model = Gate().eval()
    x = torch.rand(2, 3, 8, 8)
    assert_same_outputs(model, compact(model, x), x)


def test_a_combination_with_no_rule_keeps_its_channels_and_compacts_the_rest():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 3, 1), Gate(torch.maximum))
    with torch.no_grad():
        model[0].weight[:2] = 0
        model[0].bias[:2] = 0
    x = torch.rand(2, 3, 8, 8)
    c = compact(model, x)
    assert torch.allclose(c(x), model.eval()(x), rtol=RTOL, atol=ATOL)
    assert c.steps()[0][1].out_channels == 4                  # the zero filters go
    assert any(type(m).__name__ == "Traced" for _, m in c.steps())  # torch.maximum stays as code


def test_a_module_with_no_rule_keeps_its_channels():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Upsample(scale_factor=2), nn.Flatten())
    x = torch.rand(1, 1, 8, 8)
    c = compact(model, x)
    assert torch.allclose(c(x), model(x)) and c.steps()[0][1].out_channels == 2
    report = sparsity_report(model, x)
    assert report.pinned["as_code"] == ["1 (Upsample)"] and report.pinned["pinned"] == 3  # 2 channels, its output
    assert "Kept as the model's own code" in report.to_markdown() and "Upsample" in report.to_markdown()


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[2, 3, 28, 28\]"):
        compact(LeNet(), torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\[2, 3, 28, 28\]"):
        sparsity_report(LeNet(), torch.rand(2, 3, 28, 28))


def test_compact_of_dense_model_is_identity_shaped():
    model = MLP()
    c = compact(model, torch.rand(2, 1, 28, 28))
    assert isinstance(c, CompactNet) and c.fc1.in_features == 784 and c.fc2.out_features == 300


def test_lowering_chosen_by_measurement_stays_exact():
    torch.manual_seed(0)
    model = LeNet().eval()
    with torch.no_grad():
        model.conv2.weight.view(50, -1)[:, torch.randperm(500)[:300]] = 0
    x = torch.rand(4, 1, 28, 28)
    c = compact(model, x, lowered_below="measure")
    assert isinstance(c.conv2, (nn.Conv2d, LoweredConv2d))
    assert_same_outputs(model, c, x)
    assert isinstance(compact(model, x, lowered_below=1.0).conv2, LoweredConv2d)
    assert isinstance(compact(model, x, lowered_below=0.0).conv2, nn.Conv2d)
    with pytest.raises(ValueError, match="lowered_below"):
        compact(model, x, lowered_below="fast")


def test_a_model_that_collapses_to_a_constant_is_reported_loudly():
    from structsparse.compaction import CollapseWarning
    model = LeNet().eval()
    with torch.no_grad():
        model.conv2.weight.zero_()
    x = torch.rand(2, 1, 28, 28)
    with pytest.warns(CollapseWarning, match="no longer depends on its input"):
        small = compact(model, x)
    assert_same_outputs(model, small, x)
    assert "**Warning: the compact model does no multiply-add" in sparsity_report(model, x, compacted=small).to_markdown()
