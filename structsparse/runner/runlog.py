"""Run logs of ``structsparse run``: ``OUT/log.csv``, ``OUT/sparsity.png``, TensorBoard scalars.

All of them are functions of the trainer's history (one record per epoch, stored in every
checkpoint), so they are rewritten from it, not appended to: after an interrupted and
resumed run, ``log.csv`` holds every epoch exactly once. The CSV is rewritten (atomically)
after every epoch; the plot at the end of the run, and during it at most every
``plot_every_s`` seconds; TensorBoard scalars (``OUT/tensorboard/``) only when asked for and
``torch.utils.tensorboard`` works (it needs the ``tensorboard`` package).
"""
from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path
from typing import Sequence

from ..report import KEPT
from ..storage.files import atomic_write

__all__ = ["RunLog", "csv_table", "plot_history", "CSV_NAME", "PLOT_NAME", "COLUMNS"]

CSV_NAME = "log.csv"
PLOT_NAME = "sparsity.png"
TENSORBOARD_DIR = "tensorboard"
# One row per epoch; then, per Conv2d/Linear layer, <layer>_filters_kept, <layer>_filters,
# <layer>_channels_kept, <layer>_channels (non-zero groups, as in the history's "kept").
COLUMNS = ("phase", "epoch", "lr", "train_loss", "penalty", "train_error", "val_error", "train_s", "flop_fraction",
           "compact_flop_fraction")
BUDGET_COLUMNS = ("budget_goal", "strength", "budget_reached")  # after COLUMNS, in runs with a budget phase


def _layers(history: Sequence[dict]) -> list[str]:
    names: dict[str, None] = {}
    for rec in history:
        names.update(dict.fromkeys(rec.get("kept", {})))
    return list(names)


def _budget_layers(history: Sequence[dict]) -> list[str]:
    """The layers of per-layer budgets (whose record keeps ``budget_goal`` as ``{layer: goal}``)."""
    names: dict[str, None] = {}
    for rec in history:
        if isinstance(rec.get("budget_goal"), dict):
            names.update(dict.fromkeys(rec["budget_goal"]))
    return list(names)


def _value(rec: dict, key: str, layer: str | None = None):
    """``rec[key]`` (``rec[key][layer]`` for a layer of a per-layer budget); None where the record has no such
    number."""
    v = rec.get(key)
    if isinstance(v, dict):
        return v.get(layer) if layer is not None else None
    return v if layer is None else None


def csv_table(history: Sequence[dict]) -> tuple[list[str], list[list]]:
    """Header and rows of ``log.csv`` for ``history`` (missing values are empty cells); a per-layer budget's
    columns are ``<column>_<layer>``."""
    layers = _layers(history)
    budget = [(c, c, None) for c in BUDGET_COLUMNS] if any("budget_goal" in rec for rec in history) else []
    budget += [(f"{c}_{layer}", c, layer) for c in BUDGET_COLUMNS for layer in _budget_layers(history)]
    header = list(COLUMNS) + [b[0] for b in budget] + [f"{layer}_{what}" for layer in layers for what in KEPT]
    rows = []
    for rec in history:
        row = [rec.get(c) for c in COLUMNS] + [_value(rec, key, layer) for _, key, layer in budget]
        for layer in layers:
            row += rec.get("kept", {}).get(layer, [None] * 4)
        rows.append(["" if v is None else v for v in row])
    return header, rows


def write_csv(path: str | Path, history: Sequence[dict]) -> None:
    header, rows = csv_table(history)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


def plot_history(path: str | Path, history: Sequence[dict], title: str = "") -> None:
    """Per-layer fraction of filters (solid, filled circles) and channels (dashed, open squares) kept, the whole
    model's FLOP fraction after compaction (thick black; from each layer's own zeros: thin grey; its parameters
    after compaction: dotted grey; its latency after compaction, under a latency budget: dashed black; a budget
    phase's goal: dotted red; under a per-layer budget, each layer's goal dotted and its FLOPs after compaction
    dash-dotted, in its colour), and the validation error, against the
    epoch; phases are marked."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 6.5))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    xs = list(range(1, len(history) + 1))
    colors = [f"C{i % 10}" for i in range(len(_layers(history)))]
    for layer, color in zip(_layers(history), colors):
        kept = [rec.get("kept", {}).get(layer) for rec in history]
        for i, (style, marker, fill, what) in enumerate((("-", "o", color, "filters"),
                                                          ("--", "s", "white", "channels"))):
            ys = [None if k is None else k[2 * i] / max(k[2 * i + 1], 1) for k in kept]
            top.plot(xs, [float("nan") if y is None else y for y in ys], style, color=color, marker=marker,
                     markerfacecolor=fill, markersize=4, label=f"{layer} {what}")
    for key, style, label in (("flop_fraction", dict(color="0.55", lw=1.2, ls="-."), "FLOPs, own zeros"),
                              ("compact_flop_fraction", dict(color="k", lw=2.2, ls="-"), "FLOPs after compact"),
                              ("compact_params_fraction", dict(color="0.35", lw=1.2, ls=":"), "params after compact"),
                              ("compact_latency_fraction", dict(color="k", lw=1.5, ls="--"),
                               "latency after compact (estimated)"),
                              ("budget_goal", dict(color="C3", lw=1.5, ls=":"), "budget: the goal")):
        flops = [_value(rec, key) for rec in history]
        if any(f is not None for f in flops):
            top.plot(xs, [float("nan") if f is None else f for f in flops], marker="D", markersize=3,
                     label=label, **style)
    colour = dict(zip(_layers(history), colors))
    for layer in _budget_layers(history):  # a per-layer budget: each layer's goal and FLOPs after compaction
        for key, ls, what in (("budget_goal", ":", "goal"), ("compact_layer_flop_fractions", "-.", "FLOPs")):
            ys = [_value(rec, key, layer) for rec in history]
            top.plot(xs, [float("nan") if y is None else y for y in ys], ls, color=colour.get(layer, "C3"), lw=1.5,
                     marker="D", markersize=2, label=f"{layer} {what} (budget)")
    top.set_ylabel("fraction kept")
    top.set_ylim(0, 1.05)
    top.legend(fontsize=7, ncol=2, loc="lower left")
    bottom.plot(xs, [100 * rec["val_error"] for rec in history], "o-", color="C3", markersize=3, label="val")
    bottom.plot(xs, [100 * rec["train_error"] for rec in history], "o:", color="C7", markersize=3, label="train")
    bottom.set_ylabel("error (%)")
    bottom.set_xlabel("epoch (all phases)")
    bottom.legend(fontsize=7)
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    start = 0
    for i in range(1, len(history) + 1):   # phase boundaries and names
        if i == len(history) or history[i]["phase"] != history[start]["phase"]:
            if i < len(history):
                for ax in (top, bottom):
                    ax.axvline(i + 0.5, color="0.6", lw=0.8, ls=":")
            top.text((start + 1 + i) / 2, 1.01, history[start]["phase"], ha="center", va="bottom", fontsize=8,
                     transform=top.get_xaxis_transform())
            start = i
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, buf.getvalue())


class RunLog:
    """Writes ``log.csv``, ``sparsity.png`` and (``tensorboard=True``) TensorBoard scalars into
    ``out_dir``; call :meth:`update` with the trainer's history after every epoch and
    :meth:`close` at the end."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = False, plot_every_s: float = 30.0,
                 title: str = ""):
        self.out_dir = Path(out_dir)
        self.tensorboard = tensorboard
        self.plot_every_s = plot_every_s
        self.title = title
        self._writer = None
        self._logged = 0           # history records already sent to TensorBoard
        self._last_plot = time.monotonic()
        self._history: Sequence[dict] = []

    def update(self, history: Sequence[dict]) -> None:
        self._history = history
        write_csv(self.out_dir / CSV_NAME, history)
        self._tensorboard(history)
        if time.monotonic() - self._last_plot >= self.plot_every_s:
            self._plot()

    def close(self, history: Sequence[dict] | None = None) -> None:
        """Write the plot (and the CSV) of ``history`` (default: the last one given) and close TensorBoard."""
        if history is not None:
            self._history = history
            write_csv(self.out_dir / CSV_NAME, history)
            self._tensorboard(history)
        if self._history:
            self._plot()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _plot(self) -> None:
        plot_history(self.out_dir / PLOT_NAME, self._history, self.title)
        self._last_plot = time.monotonic()

    def _tensorboard(self, history: Sequence[dict]) -> None:
        if not self.tensorboard:
            return
        if self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as e:  # noqa: BLE001  not installed, or a broken install
                print(f"structsparse: --tensorboard: torch.utils.tensorboard is not usable ({e}); "
                      f"install the tensorboard package. Writing {CSV_NAME} only.", file=sys.stderr)
                self.tensorboard = False
                return
            # A new writer (a new process, maybe a resumed run) logs the whole history again
            # and tells TensorBoard to drop whatever an earlier writer logged from step 1 on.
            self._writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR), purge_step=1)
            self._logged = 0
        for step, rec in enumerate(history[self._logged:], start=self._logged + 1):
            w = self._writer
            for tag, key in (("loss/train", "train_loss"), ("loss/penalty", "penalty"), ("error/train", "train_error"),
                             ("error/val", "val_error"), ("lr", "lr"), ("kept/model_flops", "flop_fraction"),
                             ("kept/model_flops_after_compact", "compact_flop_fraction")):
                if rec.get(key) is not None:
                    w.add_scalar(tag, rec[key], step)
            for layer, k in rec.get("kept", {}).items():
                w.add_scalar(f"kept_filters/{layer}", k[0] / max(k[1], 1), step)
                w.add_scalar(f"kept_channels/{layer}", k[2] / max(k[3], 1), step)
        self._logged = len(history)
        self._writer.flush()
