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
