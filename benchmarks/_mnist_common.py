"""Shared pieces of the MNIST peer benchmarks (peer_torch_pruning.py, l1_lenet.py).

* :func:`train_phase`: one recipe phase on any LeNet-shaped model, step for step as
  ``structsparse run`` trains it (SGD with momentum and weight decay, the phase's lr schedule
  updated every step, cross-entropy, the epoch shuffles of :func:`structsparse.runner.trainer.epoch_seed`
  for the same ``(seed, phase index, epoch)``), with a hook after each optimizer step (an ℓ1
  proximal step, masks). Given the phase index of our fine-tuning phase, a peer's fine-tuning
  sees the same batches in the same order as ours.
* :func:`lenet_from_state`: rebuild a LeNet whose layers were shrunk (by Torch-Pruning) from
  its safetensors state dict alone (no pickled modules).
* :func:`layer_macs`: multiply-adds of every Conv2d / Linear of a plain model at one input.
* :func:`row_metrics`, :func:`row_recipe_path`: a committed row's ``results/mnist/<row>/metrics.json``
  and its recipe (the final run's, or the chosen candidate's).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from structsparse.zoo.data import make_loader
from structsparse.zoo.models import LeNet
from structsparse.runner.recipe import Phase
from structsparse.runner.trainer import Split, epoch_seed, evaluate, lr_at

ROOT = Path(__file__).resolve().parents[1]


def row_metrics(row: str) -> dict:
    """The committed row's ``results/mnist/<row>/metrics.json``."""
    return json.loads((ROOT / "results" / "mnist" / row / "metrics.json").read_text())


def row_recipe_path(metrics: dict, final: bool = True) -> str:
    """A row's recipe, relative to the repository: its final run's (train + val), or with ``final=False``
    its chosen candidate's (the 50k training images)."""
    if final:
        return metrics["recipe"]
    return next(c for c in metrics["selection"]["candidates"] if c["chosen"])["recipe"]


def train_phase(model: nn.Module, splits: dict[str, Split], phase: Phase, seed: int, phase_index: int,
                batch_size: int = 64, after_step: Callable[[torch.optim.Optimizer], None] | None = None,
                eval_batch_size: int = 1000, log: Callable[[str], None] = print) -> list[dict]:
    """Train ``model`` for ``phase`` as structsparse's Trainer would at ``phase_index``; returns per-epoch records."""
    opt = torch.optim.SGD(model.parameters(), lr=phase.lr, momentum=phase.momentum, weight_decay=phase.weight_decay)
    train = splits["train"]
    history = []
    for e in range(phase.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(epoch_seed(seed, phase_index, e))
        loader = make_loader(train.images, train.labels, batch_size, shuffle=True, generator=gen)
        steps = len(loader)
        model.train()
        loss_sum, seen = 0.0, 0
        for i, (x, y) in enumerate(loader):
            for group in opt.param_groups:
                group["lr"] = lr_at(phase, e, i, steps)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(opt)
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        val = evaluate(model, splits["val"], eval_batch_size)
        rec = {"phase": phase.name, "epoch": e + 1, "epochs": phase.epochs, "train_loss": loss_sum / seen,
               "val_error": val, "train_s": time.perf_counter() - t0}
        history.append(rec)
        log(f"[{phase.name} {e + 1}/{phase.epochs}] loss {rec['train_loss']:.4f} val err {100 * val:.2f}% "
            f"({rec['train_s']:.1f}s)")
    return history


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
