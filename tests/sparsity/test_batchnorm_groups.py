"""Filter groups on BatchNorm networks: with ``example_input``, a model-wide ``filter`` λ groups each conv
filter with the (γ, β) of the BatchNorm right after it, which is what decides the channel."""
import torch
import torch.nn.functional as F
from torch import nn

import structsparse as ss

from helpers import check_exact


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))


def _train(model, gl, x, y, steps=60):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gl.prox_step(optimizer=opt)
    return model.eval()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8, generator=g)
    return x, (x[:, 0].mean((1, 2)) > 0).long()


def test_conv_batchnorm_filters_are_zeroed_with_their_gamma_and_beta_and_compaction_removes_them():
    x, y = _data()
    model = _net()
    gl = ss.GroupLasso(model, {"filter": 0.2}, example_input=x)
    assert gl.terms[0].norm is model[1] and gl.terms[1].norm is model[4] and gl.terms[2].norm is None
    _train(model, gl, x, y)
    kept = ss.sparsity_report(model, x).kept()
    assert 0 < kept["3"][0] < 16                                # some of conv 2's filters are zero ...
    dead = model[3].weight.flatten(1).eq(0).all(1)
    assert model[4].weight[dead].eq(0).all() and model[4].bias[dead].eq(0).all()   # ... with their γ, β
    small = ss.compact(model, x)
    check_exact(model, small, x)
    assert dict(small.steps())["3"].out_channels == kept["3"][0]     # the report agrees with compaction
    masks = gl.freeze()
    assert not masks.masks["4"][dead].any()                    # fine-tuning keeps γ, β of zero groups at zero


def test_a_pattern_keeps_its_own_groups():
    x, _ = _data()
    gl = ss.GroupLasso(_net(), {"filter": 0.05, "3": {"filter": 0.1}, "1": {"filter": 0.01}}, example_input=x)
    assert all(t.norm is None for t in gl.terms)   # layer 3: a pattern set its λ; layer 0: its BatchNorm has one
