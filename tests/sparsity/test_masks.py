"""Masks: zeroed groups stay zero while a model is fine-tuned."""

import torch

from structsparse import GroupLasso
from structsparse.zoo.models import LeNet


def test_freeze_keeps_zero_groups_at_zero_during_training():
    torch.manual_seed(0)
    model = LeNet()
    with torch.no_grad():
        model.conv2.weight[:10] = 0
        model.conv2.weight[:, :5] = 0
    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3})
    masks = gl.freeze()
    assert gl.penalty().item() == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.rand(4, 1, 28, 28)).square().mean()
        loss.backward()
        opt.step()
        masks.apply_()
    assert (model.conv2.weight[:10] == 0).all() and (model.conv2.weight[:, :5] == 0).all()
    assert (model.conv2.weight[10:, 5:] != 0).any()
    state = gl.state_dict()
    gl2 = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3})
    gl2.load_state_dict(state)
    assert not gl2.active and torch.equal(gl2.masks.masks["conv2"], masks.masks["conv2"])
