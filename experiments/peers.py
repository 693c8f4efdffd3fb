"""Shared pieces of the MNIST peer benchmarks (``benchmarks/peer_torch_pruning.py``, ``benchmarks/l1_lenet.py``).

* :func:`train_phase`: one recipe phase on any LeNet-shaped model, trained by structsparse's
  :class:`~structsparse.runner.trainer.Trainer` at the phase's own index in the recipe (so with
  the epoch shuffles of ``(seed, phase index, epoch)``: a peer's fine-tuning sees the same batches
  in the same order as ours), with hooks before and after each optimizer step (a peer's gradient term, an ℓ1
  proximal step, masks) and the peer's own optimizer.
* :func:`lenet_from_state`: rebuild a LeNet whose layers were shrunk (by Torch-Pruning) from
  its safetensors state dict alone (no pickled modules).
* :func:`layer_macs`, :func:`total_flops`: multiply-adds of every Conv2d / Linear of a plain model,
  and its FLOPs, at one input.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from structsparse.runner.recipe import Phase, Recipe
from structsparse.runner.trainer import Split, Trainer
from structsparse.zoo.models import LeNet

HISTORY_KEYS = ("phase", "epoch", "epochs", "train_loss", "val_error", "train_s")


def train_phase(model: nn.Module, splits: dict[str, Split], recipe: Recipe, phase_index: int,
                phase: Phase | None = None, after_step: Callable[[torch.optim.Optimizer], None] | None = None,
                log: Callable[[str], None] = print,
                before_step: Callable[[torch.optim.Optimizer], None] | None = None,
                make_optimizer: Callable[[Phase], torch.optim.Optimizer] | None = None) -> list[dict]:
    """Train ``model`` for ``phase`` (default: the recipe's phase ``phase_index``) as ``structsparse run``
    trains that phase of ``recipe``; returns per-epoch records (:data:`HISTORY_KEYS`).

    The phase runs at ``phase_index`` of a copy of the recipe whose earlier phases are there only for the
    index (they are not trained), and never freezes (the caller's ``after_step`` applies its own masks);
    a phase with ``lambdas`` would build a group Lasso: peers pass theirs without.
    """
    phase = recipe.phases[phase_index] if phase is None else phase
    phases = tuple(recipe.phases[:phase_index]) + (dataclasses.replace(phase, freeze=False),)
    drop = lambda f: None if f is None else (lambda trainer, arg: f(arg))  # noqa: E731  the hooks without trainer
    trainer = Trainer(dataclasses.replace(recipe, phases=phases), splits, model=model, after_step=drop(after_step),
                      before_step=drop(before_step), make_optimizer=drop(make_optimizer),
                      checkpoint_dir=None, progress=False, log=log)
    trainer.run_phase(phase_index)
    return [{k: rec[k] for k in HISTORY_KEYS} for rec in trainer.history]


def lenet_from_state(sd: dict[str, torch.Tensor]) -> LeNet:
    """A :class:`~structsparse.zoo.models.LeNet` with the layer sizes of ``sd`` (e.g. after structured pruning)."""
    model = LeNet()
    w1, w2, f1, f2 = (sd[f"{n}.weight"] for n in ("conv1", "conv2", "fc1", "fc2"))
    model.conv1 = nn.Conv2d(w1.shape[1], w1.shape[0], w1.shape[2])
    model.conv2 = nn.Conv2d(w2.shape[1], w2.shape[0], w2.shape[2])
    model.fc1 = nn.Linear(f1.shape[1], f1.shape[0])
    model.fc2 = nn.Linear(f2.shape[1], f2.shape[0])
    model.load_state_dict(sd)
    return model


def layer_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-adds per sample of each Conv2d / Linear of ``model`` on input ``x`` (one sample)."""
    out: dict[str, int] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=name, k=k: out.__setitem__(n, o[0].numel() * k)))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, n=name: out.__setitem__(n, mod.in_features * mod.out_features)))
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    finally:
        for h in hooks:
            h.remove()
    return out


def total_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs (2 × multiply-adds) of one sample, counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.eval()(x[:1])
    return int(fc.get_total_flops())
