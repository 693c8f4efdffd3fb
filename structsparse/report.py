"""Per-layer sparsity report: filters, channels and filter-shape columns kept, FLOPs, parameters.

The FLOP fraction of a layer is the paper's: (kept rows / rows) × (kept columns / columns)
of its lowered weight matrix, e.g. LeNet 2's conv2 keeps 19/50 filters and 4/20 channels:
19/50 × 100/500 = 7.6%. Whole-model multiply-adds are cross-checked against
``torch.utils.flop_counter``.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .compaction.kernels import LoweredConv2d
from .compaction.surgery import compact
from .graph import UnsupportedModelError, channel_units, trace_graph
from .graph.ops import OPAQUE
from .sparsity.groups import covered_modules, group_norms

__all__ = ["SparsityReport", "sparsity_report", "count_macs", "pinned_summary"]


def count_macs(model: nn.Module, example_input: torch.Tensor, per_module: bool = False):
    """Multiply-adds of one forward pass on ``example_input`` as torch.utils.flop_counter counts
    them; with ``per_module``, a dict ``{module name: MACs}`` ("" for the whole model)."""
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernel has no flop formula: count what it computes
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example_input)
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    if not per_module:
        return counter.get_total_flops() // 2
    root = type(model).__name__
    out = {}
    for name, ops in counter.get_flop_counts().items():
        if name == root or name.startswith(root + "."):
            out[name[len(root) + 1:]] = sum(ops.values()) // 2
    return out


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (each shared tensor once)."""
    return sum(p.numel() for p in model.parameters())


# The structure counts a run logs per layer and epoch (log.csv columns ``<layer>_<count>``), in this order.
KEPT = ("filters_kept", "filters", "channels_kept", "channels")


def _kept(norms: torch.Tensor) -> int:
    return int(norms.ne(0).sum())


def _layer_row(name: str, m: nn.Module, out_shape: torch.Size) -> dict:
    w = m.weight.detach()
    groups = getattr(m, "groups", 1)
    if isinstance(m, LoweredConv2d):  # columns were already removed: count against the full conv
        kh, kw = m.kernel_size
        channels_kept = int(torch.unique(m.columns[w.ne(0).any(dim=0)] // (kh * kw)).numel())
        row = dict(type="LoweredConv2d", filters=m.out_channels, channels=m.in_channels,
                   columns=m.in_channels * kh * kw, filters_kept=_kept(group_norms(w, "filter")),
                   channels_kept=channels_kept, columns_kept=_kept(group_norms(w, "channel")),
                   positions=out_shape[2] * out_shape[3], filter2d=None, filter2d_kept=None)
    else:
        conv = isinstance(m, nn.Conv2d)
        row = dict(type=type(m).__name__, filters=w.shape[0], channels=w.shape[1] * (groups if conv else 1),
                   columns=w[0].numel(), filters_kept=_kept(group_norms(w, "filter", groups)),
                   channels_kept=_kept(group_norms(w, "channel", groups)),
                   columns_kept=_kept(group_norms(w, "shape", groups)) // (groups if conv else 1),
                   positions=out_shape[2] * out_shape[3] if conv else math.prod(out_shape[1:-1]),
                   filter2d=w.shape[0] * w.shape[1], filter2d_kept=_kept(group_norms(w, "filter2d", groups)))
    row["name"] = name
    row["params"], row["params_kept"] = w.numel(), int(w.ne(0).sum())
    row["flop_fraction"] = row["filters_kept"] / row["filters"] * row["columns_kept"] / row["columns"]
    row["macs"] = row["filters"] * row["columns"] * row["positions"]
    row["macs_kept"] = round(row["macs"] * row["flop_fraction"])
    return row


@dataclass
class SparsityReport:
    """Per-layer structure counts and FLOPs. ``layers`` is a list of dicts (see :meth:`to_markdown`)."""

    layers: list[dict]
    macs: int
    macs_kept: int
    counter_macs: int
    input_shape: list[int] = field(default_factory=list)
    compact_macs: int | None = None
    pinned: dict | None = None  # channel units that stay whatever the weights, and why (see pinned_summary)
    params: int = 0                    # parameters of the model
    compact_params: int | None = None  # ... and of the compacted model

    @property
    def compact_params_fraction(self) -> float | None:
        """Parameters of the compacted model, as a fraction of the model's."""
        return None if self.compact_params is None or not self.params else self.compact_params / self.params

    @property
    def compact_flop_fraction(self) -> float | None:
        """Whole-model multiply-adds of the compacted model (coupled removals included), as a fraction."""
        return None if self.compact_macs is None else self.compact_macs / self.macs

    @property
    def flop_fraction(self) -> float:
        """Whole-model multiply-adds kept (Conv2d and Linear layers), as a fraction."""
        return self.macs_kept / self.macs if self.macs else 1.0

    @property
    def counter_agrees(self) -> bool:
        """Whether torch.utils.flop_counter counts the same dense multiply-adds as this report."""
        return self.counter_macs == self.macs

    def kept(self) -> dict[str, list[int]]:
        """``{layer: [filters kept, filters, channels kept, channels]}`` (the counts of :data:`KEPT`)."""
        return {r["name"]: [r[k] for k in KEPT] for r in self.layers}

    def to_dict(self) -> dict:
        return {"layers": self.layers, "macs": self.macs, "macs_kept": self.macs_kept,
                "flop_fraction": self.flop_fraction, "flop_counter_macs": self.counter_macs,
                "compact_macs": self.compact_macs, "compact_flop_fraction": self.compact_flop_fraction,
                "params": self.params, "compact_params": self.compact_params,
                "compact_params_fraction": self.compact_params_fraction,
                "input_shape": self.input_shape, "pinned": self.pinned}

    def to_markdown(self) -> str:
        lines = ["| layer | type | filters kept | channels kept | columns kept | FLOP | after compact: filters, "
                 "channels, FLOP | params kept |", "|---|---|---|---|---|---|---|---|"]
        for r in self.layers:
            after = "–" if r.get("compact_flop_fraction") is None else \
                f"{r['filters_after']}, {r['channels_after']}, {100 * r['compact_flop_fraction']:.1f}%"
            lines.append(f"| {r['name']} | {r['type']} | {r['filters_kept']}/{r['filters']} | "
                         f"{r['channels_kept']}/{r['channels']} | {r['columns_kept']}/{r['columns']} | "
                         f"{100 * r['flop_fraction']:.1f}% | {after} | {r['params_kept']}/{r['params']} |")
        check = "agrees" if self.counter_agrees else f"DISAGREES ({self.counter_macs:,})"
        lines.append(f"\nWhole model: {self.macs_kept:,} of {self.macs:,} multiply-adds kept per input "
                     f"({100 * self.flop_fraction:.1f}%, from each layer's own zeros); torch.utils.flop_counter {check}.")
        if self.compact_macs == 0:
            lines.append("**Warning: the compact model does no multiply-add: its output no longer depends on its "
                         "input (the zero structures cut every path from the input).**")
        if self.pinned and self.pinned["pinned"]:
            why = "; ".join(f"{k}: {v}" for k, v in self.pinned["reasons"].items())
            lines.append(f"Channels that stay whatever their weights: {self.pinned['pinned']:,} of "
                         f"{self.pinned['units']:,} ({why}).")
        if self.pinned and self.pinned["as_code"]:
            lines.append(f"**Kept as the model's own code (no channel rule), with every channel they touch: "
                         f"{', '.join(self.pinned['as_code'])}.**")
        if self.compact_macs is not None:
            lines.append(f"After compact (zeros of one layer also remove work in its neighbours): {self.compact_macs:,} "
                         f"multiply-adds per input ({100 * self.compact_flop_fraction:.1f}%), counted by "
                         f"torch.utils.flop_counter on the compacted model; {self.compact_params:,} of {self.params:,} "
                         f"parameters ({100 * self.compact_params_fraction:.1f}%).")
        return "\n".join(lines)


def _sizes(net: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (filters, input channels it reads)}`` of a compacted model (its layers keep their names)."""
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, LoweredConv2d):
            out[name] = (m.out_channels, int(torch.unique(m.columns // (m.kernel_size[0] * m.kernel_size[1])).numel()))
        elif isinstance(m, nn.Conv2d):
            out[name] = (m.out_channels, m.in_channels)
        elif isinstance(m, nn.Linear):
            out[name] = (m.out_features, m.in_features)
    return out


def pinned_summary(model: nn.Module, example_input: torch.Tensor) -> dict:
    """``{"units", "pinned", "reasons": {why: units}, "as_code": [step]}``: how many channel units stay whatever
    the weights (commonest reasons first, without the step names), and the steps with no channel rule."""
    graph = trace_graph(model, example_input)
    units = channel_units(graph)
    why = Counter(r.split(": ", 1)[-1] for r in units.reasons.values())
    as_code = [f"{n.name} ({n.module.what})" for n in graph.nodes.values() if n.role == OPAQUE]
    return {"units": units.count, "pinned": int(units.pinned.sum()), "reasons": dict(why.most_common()),
            "as_code": as_code}


def sparsity_report(model: nn.Module, example_input: torch.Tensor, with_compact: bool = True,
                    compacted: nn.Module | None = None) -> SparsityReport:
    """Report kept structures of every Conv2d and Linear (and LoweredConv2d) of ``model``.

    ``example_input`` gives output sizes for the multiply-add counts; counts are per input
    (per sample of the batch). Per layer, ``flop_fraction`` is the paper's, from the layer's
    own zeros. With ``with_compact`` (and a model :func:`~structsparse.compact` supports),
    ``compact_flop_fraction`` adds what compaction really keeps, where a zero filter of
    one layer also removes input channels of the next, and so on. Pass ``compacted`` (the
    result of ``compact(model, ...)``) when you already have it, so it is not built again.
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2:
        raise ValueError(f"example_input must be a batched tensor (N × ...), got "
                         f"{type(example_input).__name__} {list(getattr(example_input, 'shape', []))}")
    layers = dict(covered_modules(model))
    layers.update({n: m for n, m in model.named_modules() if isinstance(m, LoweredConv2d)})
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to report on")
    shapes = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, o.shape))
             for n, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as e:
        raise ValueError(f"running {type(model).__name__} on example_input of shape "
                         f"{list(example_input.shape)} failed: {e}") from e
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    rows = [_layer_row(n, m, shapes[n]) for n, m in layers.items() if n in shapes]
    batch = example_input.shape[0]
    compact_macs = pinned = compact_params = None
    if with_compact:
        try:
            if compacted is None:
                compacted = compact(model, example_input, channels_last=False)  # for counting only
            per_module = count_macs(compacted, example_input, per_module=True)
            pinned = pinned_summary(model, example_input)
        except UnsupportedModelError:
            per_module = pinned = None
        if per_module is not None:
            compact_macs = per_module.get("", 0) // batch  # no entry: the compact model multiplies nothing
            sizes = _sizes(compacted)
            compact_params = count_params(compacted)
            for r in rows:  # a layer compaction removed (a branch that became a constant) does no work
                r["compact_flop_fraction"] = per_module.get(r["name"], 0) / batch / r["macs"]
                r["filters_after"], r["channels_after"] = sizes.get(r["name"], (0, 0))
    return SparsityReport(rows, sum(r["macs"] for r in rows), sum(r["macs_kept"] for r in rows),
                          count_macs(model, example_input) // batch, list(example_input.shape), compact_macs, pinned,
                          count_params(model), compact_params)
