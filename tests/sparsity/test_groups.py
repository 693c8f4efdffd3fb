import math

import pytest
import torch

from structsparse import group_norms


def conv_weight():
    # 2 filters × 2 channels × 1 × 2 with easy numbers
    return torch.tensor([[[[3.0, 4.0]], [[0.0, 0.0]]],
                         [[[0.0, 0.0]], [[1.0, 2.0]]]])


@pytest.mark.parametrize("kind, expected", [
    ("filter", [5.0, math.sqrt(5)]),
    ("channel", [5.0, math.sqrt(5)]),
    ("shape", [[3.0, 4.0], [1.0, 2.0]]),
    ("filter2d", [[5.0, 0.0], [0.0, math.sqrt(5)]]),
    ("depth", math.sqrt(30)),
])
def test_conv_group_norms_by_hand(kind, expected):
    got = group_norms(conv_weight(), kind)
    exp = torch.tensor(expected)
    if kind == "shape":
        exp = exp.view(2, 1, 2)
    assert torch.allclose(got, exp)


@pytest.mark.parametrize("kind, expected", [
    ("filter", [5.0, 13.0]),
    ("channel", [math.sqrt(9 + 25), math.sqrt(16 + 144)]),
    ("shape", [math.sqrt(9 + 25), math.sqrt(16 + 144)]),
    ("filter2d", [[3.0, 4.0], [5.0, 12.0]]),
    ("depth", math.sqrt(9 + 16 + 25 + 144)),
])
def test_linear_group_norms_by_hand(kind, expected):
    w = torch.tensor([[3.0, -4.0], [5.0, 12.0]])
    assert torch.allclose(group_norms(w, kind), torch.tensor(expected))


def test_grouped_conv_channel_groups_are_per_conv_group():
    w = torch.arange(4 * 1 * 1 * 1, dtype=torch.float).view(4, 1, 1, 1)  # groups=2: 2 filters per group
    assert torch.allclose(group_norms(w, "channel", groups=2), torch.tensor([[1.0], [math.sqrt(4 + 9)]]))


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="filtr"):
        group_norms(torch.ones(2, 2), "filtr")






















