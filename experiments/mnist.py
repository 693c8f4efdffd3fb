"""The MNIST rows: where they live, and what their compact models compute.

A row is one of the paper's MNIST rows (LeNet 1–5, MLP 1–3; their figures in
:data:`structsparse.paper.PAPER_MNIST`), committed as ``results/mnist/table/<row>/``.
"""
from __future__ import annotations

from pathlib import Path

from structsparse.paper import PAPER_MNIST

from .runs import ROOT, read_json

RESULTS = ROOT / "results" / "mnist" / "table"   # one folder per row
PEERS = ROOT / "results" / "mnist" / "peers"     # the peer comparisons beside the rows
README = ROOT / "results" / "mnist" / "README.md"
RECIPES = "recipes/mnist"                        # <row>.yaml: the committed row's recipe; search/, seeds/
ORDER = list(PAPER_MNIST)
PAPER_ROWS = {p["paper_row"] for p in PAPER_MNIST.values()}   # "LeNet 1", ... as metrics.json names them
SCRIPT = "scripts/reproduce_mnist.py"             # the command line that writes the rows


def row_metrics(row: str, results: Path = RESULTS) -> dict:
    """The committed row's ``metrics.json``."""
    return read_json(results / row / "metrics.json")


def row_recipe_path(metrics: dict, final: bool = True) -> str:
    """A row's recipe, relative to the repository: its final run's (train + val), or with ``final=False``
    its chosen candidate's (the 50k training images)."""
    if final:
        return metrics["recipe"]
    return next(c for c in metrics["selection"]["candidates"] if c["chosen"])["recipe"]


def compact_shapes(model) -> dict:
    """Shapes of the weighted steps of a compact model (what really runs), and MLP neuron counts."""
    from torch import nn

    from structsparse.compaction.kernels import LoweredConv2d
    from structsparse.compaction.surgery import IndexSelect
    out, gathers = {}, {}
    for name, m in model.steps():
        if isinstance(m, IndexSelect):
            gathers[name] = int(m.index.numel())
        elif isinstance(m, LoweredConv2d):
            out[name] = {"type": "LoweredConv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                         "columns": int(m.columns.numel())}
        elif isinstance(m, nn.Conv2d):
            out[name] = {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                         "columns": m.in_channels * m.kernel_size[0] * m.kernel_size[1]}
        elif isinstance(m, nn.Linear):
            out[name] = {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features}
    for g, n in gathers.items():
        layer = g[: -len("_inputs")] if g.endswith("_inputs") else g
        if layer in out:
            out[layer]["inputs_read"] = n
    return out


def neurons(shapes: dict) -> list[int] | None:
    """An MLP's neuron counts (input pixels read, then each layer's outputs); None for a model with convs."""
    lin = [v for v in shapes.values() if v["type"] == "Linear"]
    if len(lin) != len(shapes):
        return None
    first = lin[0].get("inputs_read", lin[0]["in_features"])
    return [first] + [v["out_features"] for v in lin]
