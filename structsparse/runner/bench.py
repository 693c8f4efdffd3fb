"""What ``structsparse bench ...`` does: run one benchmark, write JSON, markdown and plots, return the
markdown. The command line parses the arguments; these functions take plain values."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..report import sparsity_report
from ..speed import layer_bench
from ..speed.measure import measure_speedup
from ..storage.export import ONNXExportError
from .rundir import RunError, load_run

__all__ = ["table4", "sweep", "model"]


def table4(rows: Sequence[int], batches: Sequence[int], threads: Sequence[int], groups: Sequence[str], repeats: int,
           warmup: int, device: str, out: Path, command: str, progress: Callable[[dict], None] | None = None) -> str:
    """CaffeNet conv1–conv5 at the paper's Table 4 sparsities; writes ``out/alexnet_table4.*`` and a plot per
    thread count, batch and groups mode."""
    bad = [r for r in rows if r not in layer_bench.PAPER_TABLE4]
    if bad:
        raise RunError(f"--rows: no Table 4 row {bad}; rows are {sorted(layer_bench.PAPER_TABLE4)}")
    if any(g not in ("1", "caffe") for g in groups):
        raise RunError(f"--groups: expected 1 and/or caffe, got {','.join(groups)!r}")
    res = layer_bench.alexnet_table4(rows, batches, threads, groups, repeats, warmup, device, progress)
    res["command"] = command
    md = layer_bench.table4_markdown(res)
    layer_bench.write(res, out, "alexnet_table4", md)
    for th in {r["threads"] for r in res["results"]}:
        for b in batches:
            for g in groups:
                layer_bench.table4_plot(res, out / f"alexnet_table4_t{th}_b{b}_groups-{g}.png", th, b, g)
    return md


def sweep(layer: str, batch: int, threads: int, repeats: int, warmup: int, device: str, out: Path, command: str,
          progress: Callable[[dict], None] | None = None) -> str:
    """One AlexNet layer's speedup against column sparsity, structured vs CSR; writes ``out/sweep_LAYER.*``."""
    shape = next((s for s in layer_bench.ALEXNET if s.name == layer), None)
    if shape is None:
        raise RunError(f"--layer: unknown layer {layer!r}; choose from {[s.name for s in layer_bench.ALEXNET]}")
    res = layer_bench.column_sweep(shape, batch=batch, threads=threads, repeats=repeats, warmup=warmup,
                                   device=device, progress=progress)
    res["command"] = command
    md = layer_bench.sweep_markdown(res)
    layer_bench.write(res, out, f"sweep_{layer}", md)
    layer_bench.sweep_plot(res, out / f"sweep_{layer}.png")
    return md


def model(run_dir: str, batches: Sequence[int], threads: int, repeats: int, warmup: int, device: str, out: Path,
          command: str, onnx: bool = False) -> str:
    """A run's compact model against its trained original, per layer and whole (and in ONNX Runtime with
    ``onnx``); writes ``out/model.*``."""
    original, small, _ = load_run(run_dir)
    example = torch.rand(1, *small.input_shape)
    original, small = original.to(device), small.to(device)
    speed = measure_speedup(original, small, example.to(device), batch_sizes=batches, threads=threads,
                            repeats=repeats, warmup=warmup)
    report = sparsity_report(original.cpu(), example, compacted=small.cpu())
    md = speed.to_markdown() + "\n\n" + report.to_markdown()
    res = {"benchmark": "model", "run_dir": str(run_dir), "speed": speed.to_dict(), "sparsity": report.to_dict(),
           "command": command}
    if onnx:
        try:
            res["onnx"] = layer_bench.onnx_model_timing(original, small, example, out, batch_sizes=batches,
                                                        threads=threads, repeats=repeats, warmup=warmup)
        except ONNXExportError as e:
            raise RunError(f"--onnx: {e}") from e
        md += "\n\n" + layer_bench.onnx_markdown(res["onnx"])
    layer_bench.write(res, out, "model", md)
    return md
