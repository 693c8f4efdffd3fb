"""Measured speedup of a compact model against its dense original, per layer and end to end.

Timings are only ever compared as ratios measured in the same run: the two models (or the
two versions of a layer) are timed in interleaved repetitions after a warm-up, with the
thread count pinned, and medians are compared.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ..compaction.surgery import CompactNet, IndexSelect
from ..layers import fast_form
from ..sparsity.groups import covered_modules
from ..timing import machine_info, ratio_interval, spread, summarize, time_interleaved

__all__ = ["measure_speedup", "SpeedReport", "BUSY_SPREAD", "MIN_EFFECT", "significant", "SAME_FORMS"]

SAME_FORMS = "model, dense in the same forms"  # the scope of the row against same_forms_baseline(original, ...)

BUSY_SPREAD = 0.25   # a run-to-run spread (interquartile range / median) above this: the machine looks busy
MIN_EFFECT = 0.05    # a ratio is significant when its whole interval lies beyond 1× ± this (see significant)


def significant(interval: tuple[float, float] | list[float]) -> bool:
    """Whether a speedup's 95% interval lies wholly beyond 1× ± :data:`MIN_EFFECT` (above 1.05× or below
    1/1.05×). An interval that merely excludes 1× is not enough: timed against an exact copy of itself on a busy
    machine, a model came out "significant" in 3 of 20 runs that way, at 1.03–1.13× (``benchmarks/noise.py``),
    and two copies of one model can differ by a few percent from where their memory lies."""
    lo, hi = interval
    return lo > 1 + MIN_EFFECT or hi < 1 / (1 + MIN_EFFECT)


@dataclass
class SpeedReport:
    """Rows of {scope, batch, original, compact (median/q1/q3 in ms), speedup}; scope is 'model' or a layer."""

    rows: list[dict]
    threads: int
    repeats: int
    machine: dict = field(default_factory=machine_info)

    def speedup(self, scope: str = "model", batch: int | None = None) -> float:
        for r in self.rows:
            if r["scope"] == scope and (batch is None or r["batch"] == batch):
                return r["speedup"]
        raise KeyError(f"no timing for {scope!r} at batch {batch}")

    def warnings(self) -> list[str]:
        """What makes these figures weak: a busy machine (high run-to-run spread), ratios that noise explains."""
        out = []
        busy = [r for r in self.rows if r.get("spread", 0.0) > BUSY_SPREAD]
        if busy:
            worst = max(busy, key=lambda r: r["spread"])
            out.append(f"the machine looks busy: run-to-run spread up to {worst['spread']:.0%} of the median "
                       f"({worst['scope']}, batch {worst['batch']}; above {BUSY_SPREAD:.0%} in {len(busy)} of "
                       f"{len(self.rows)} rows); measure again on an idle machine")
        weak = [f"{r['scope']} (batch {r['batch']})" for r in self.rows if r.get("significant") is False]
        if weak:
            out.append(f"not significant (the 95% interval reaches within {MIN_EFFECT:.0%} of 1×): {', '.join(weak)}")
        return out

    def to_dict(self) -> dict:
        return {"rows": self.rows, "threads": self.threads, "repeats": self.repeats, "machine": self.machine,
                "warnings": self.warnings()}

    def to_markdown(self) -> str:
        m = self.machine
        lines = [f"Measured on {m['cpu']}, {self.threads} thread(s), torch {m['torch']}, {m['date']}; "
                 f"median of {self.repeats} interleaved repetitions (q1–q3 in brackets); speedup with its 95% "
                 "bootstrap interval over the paired repetitions.", "",
                 "| scope | batch | dense ms | compact ms | speedup |", "|---|---|---|---|---|"]
        for r in self.rows:
            o, c = r["original"], r["compact"]
            ci = f" [{r['speedup_ci'][0]:.2f}–{r['speedup_ci'][1]:.2f}]" if "speedup_ci" in r else ""
            mark = " (not significant)" if r.get("significant") is False else ""
            lines.append(f"| {r['scope']} | {r['batch']} | {o['median_ms']:.3f} [{o['q1_ms']:.3f}–{o['q3_ms']:.3f}] | "
                         f"{c['median_ms']:.3f} [{c['q1_ms']:.3f}–{c['q3_ms']:.3f}] | {r['speedup']:.2f}×{ci}{mark} |")
        lines += [f"\n**Warning:** {w}." for w in self.warnings()]
        return "\n".join(lines)


def _layer_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0].detach()))
             for n in names if n in modules]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def same_forms_baseline(original: nn.Module, compact: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``original`` run as ``compact`` runs its plain modules (:func:`structsparse.layers.fast_form`, and
    channels-last weights and input where ``compact`` runs so), as one call; None where that would be
    ``original`` itself. Against it, a speedup is the compaction's alone, not the faster forms'."""
    dense, changed = copy.deepcopy(original), False
    for name, m in list(dense.named_modules()):
        fast = fast_form(m) if name else m
        if fast is not m:
            parent, _, leaf = name.rpartition(".")
            setattr(dense.get_submodule(parent), leaf, fast)
            changed = True
    if not getattr(compact, "channels_last", False):
        return dense if changed else None
    dense = dense.to(memory_format=torch.channels_last)
    return lambda x: dense(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x)


def _compact_layer(compact: nn.Module, name: str) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The compact version of layer ``name`` with any input gather placed before it, as one call."""
    modules = dict(compact.named_modules())
    if isinstance(compact, CompactNet):
        steps = compact.steps()
        for i, (n, m) in enumerate(steps):
            if n == name and i > 0 and isinstance(steps[i - 1][1], IndexSelect) \
                    and compact.step_inputs(n) == [steps[i - 1][0]]:
                gather = steps[i - 1][1]
                return steps[i - 1][0], lambda x, g=gather, m=m: m(g(x))
    return name, modules[name]


def measure_speedup(original: nn.Module, compact: nn.Module, example_input: torch.Tensor,
                    batch_sizes: Sequence[int] = (1, 64), threads: int | None = 1, repeats: int = 30,
                    warmup: int = 5, layers: bool = True, seed: int = 0, same_forms: bool = True) -> SpeedReport:
    """Time ``compact`` against ``original`` end to end and per Conv2d/Linear layer, in eval mode.

    Inputs are uniform random tensors shaped like ``example_input`` (one sample or a batch:
    only its shape past the batch dimension is used) at each batch size.
    ``threads`` pins torch's intra-op threads for the measurement (default 1, as ``structsparse bench`` and
    the recipes' ``measure``; None or 0: as set now). Each speedup comes with a 95% bootstrap interval over
    the paired repetitions and whether it lies beyond 1× ± 5% (:func:`significant`);
    :meth:`SpeedReport.warnings` says when the machine looked busy. With ``same_forms`` (the default), a row
    :data:`SAME_FORMS` also times ``compact`` against :func:`same_forms_baseline` (where that differs from
    ``original``).
    """
    if any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be >= 1, got {list(batch_sizes)}")
    old_threads = torch.get_num_threads()
    threads = threads or old_threads
    torch.set_num_threads(threads)
    device = next(original.parameters()).device
    modes = original.training, compact.training
    original.eval(), compact.eval()
    gen = torch.Generator().manual_seed(seed)
    baseline = same_forms_baseline(original, compact) if same_forms else None
    rows = []
    try:
        with torch.inference_mode():
            for b in batch_sizes:
                x = torch.rand((int(b), *example_input.shape[1:]), generator=gen).to(device)
                scopes = [("model", original, compact, x, x)]
                if baseline is not None:
                    scopes.append((SAME_FORMS, baseline, compact, x, x))
                if layers:
                    names = list(covered_modules(original))
                    mods_o, mods_c = dict(original.named_modules()), dict(compact.named_modules())
                    ins_o = _layer_inputs(original, names, x)
                    for name in names:
                        if name not in ins_o or name not in mods_c:
                            continue
                        first, layer_c = _compact_layer(compact, name)
                        ins_c = _layer_inputs(compact, [first], x)
                        scopes.append((name, mods_o[name], layer_c, ins_o[name], ins_c[first]))
                for scope, fo, fc, xo, xc in scopes:
                    so, sc = time_interleaved([lambda: fo(xo), lambda: fc(xc)], repeats, warmup, device)
                    o, c = summarize(so), summarize(sc)
                    lo, hi = ratio_interval(so, sc)
                    rows.append({"scope": scope, "batch": int(b), "original": o, "compact": c,
                                 "speedup": o["median_ms"] / c["median_ms"], "speedup_ci": [lo, hi],
                                 "significant": significant((lo, hi)), "spread": max(spread(so), spread(sc))})
    finally:
        torch.set_num_threads(old_threads)
        original.train(modes[0]), compact.train(modes[1])
    return SpeedReport(rows, threads, repeats, machine_info(measure_threads=threads))
