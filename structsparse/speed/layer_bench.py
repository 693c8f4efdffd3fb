"""Speed benchmarks: the paper's AlexNet Table 4 layers, and a column-sparsity sweep of one layer.

Every configuration is timed in interleaved repetitions after a warm-up, with the thread
count pinned (:func:`structsparse.speed.measure.time_interleaved`), and only ratios from the same
run are compared. Four implementations of one conv layer:

* ``conv2d``: PyTorch's dense ``F.conv2d`` (oneDNN / cuDNN), the strongest dense baseline;
* ``gemm``: the paper's dense baseline, a lowered conv: im2col (``F.unfold``) then one GEMM;
* ``compact``: our compacted layer, zero rows dropped and a :class:`LoweredConv2d` over the
  kept columns (gathering only kept im2col rows);
* ``csr``: unstructured sparsity as the paper timed it, im2col then CSR sparse × dense.
"""
from __future__ import annotations

import json
import statistics
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..compaction.surgery import lower_conv
from ..paper import ALEXNET, PAPER_TABLE4, ConvShape
from ..timing import machine_info, summarize, time_interleaved

__all__ = ["ALEXNET", "PAPER_TABLE4", "ConvShape", "lowered_conv", "sparse_conv_weight", "time_conv_layer",
           "alexnet_table4", "column_sweep", "table4_markdown", "table4_plot", "sweep_markdown", "sweep_plot", "write",
           "onnx_model_timing", "onnx_markdown"]


def sparse_conv_weight(shape: ConvShape, groups: int, row: float = 0.0, column: float = 0.0,
                       unstructured: float = 0.0, seed: int = 0) -> torch.Tensor:
    """A random conv weight with exactly round(row·N) zero filters and round(column·columns) zero
    columns in every conv group (or, with ``unstructured``, that fraction of single weights)."""
    g = torch.Generator().manual_seed(seed)
    n, cg = shape.out_channels, shape.in_channels // groups
    w = torch.randn(n, cg, shape.kernel, shape.kernel, generator=g)
    if unstructured:
        flat = w.view(-1)
        flat[torch.randperm(flat.numel(), generator=g)[:round(unstructured * flat.numel())]] = 0
        return w
    w[torch.randperm(n, generator=g)[:round(row * n)]] = 0
    per_group = w.view(groups, n // groups, -1)
    cols = per_group.shape[2]
    for gi in range(groups):
        per_group[gi][:, torch.randperm(cols, generator=g)[:round(column * cols)]] = 0
    return w


class _GroupedCompact(nn.Module):
    """The compacted form of one (possibly grouped) conv, per conv group as :func:`compact` builds it:
    kept filters only, and a LoweredConv2d where at most half of the columns are kept."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, shape: ConvShape, groups: int):
        super().__init__()
        self.groups = groups
        n = weight.shape[0] // groups
        parts = []
        for gi in range(groups):
            w = weight[gi * n:(gi + 1) * n]
            rows = w.flatten(1).ne(0).any(dim=1)
            if not bool(rows.any()):
                rows[0] = True
            conv = nn.Conv2d(w.shape[1], int(rows.sum()), shape.kernel, shape.stride, shape.padding)
            with torch.no_grad():
                conv.weight.copy_(w[rows])
                conv.bias.copy_(bias[gi * n:(gi + 1) * n][rows])
            parts.append(lower_conv(conv))
        self.parts = nn.ModuleList(parts)

    def forward(self, x):
        if self.groups == 1:
            return self.parts[0](x)
        return torch.cat([p(xi) for p, xi in zip(self.parts, x.chunk(self.groups, dim=1))], dim=1)


def lowered_conv(weight, bias, shape: ConvShape, groups: int, sparse: bool):
    """im2col then GEMM per group (dense or CSR weight), as the paper's lowered conv."""
    n = weight.shape[0] // groups
    mats = [weight[i * n:(i + 1) * n].flatten(1) for i in range(groups)]
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        mats = [m.to_sparse_csr() if sparse else m.contiguous() for m in mats]
    k, s, p = shape.kernel, shape.stride, shape.padding
    out_size = (shape.in_size + 2 * p - k) // s + 1

    def run(x):
        outs = []
        for m, xi in zip(mats, x.chunk(groups, dim=1)):
            cols = F.unfold(xi, k, padding=p, stride=s)  # B × CMK × P
            if sparse:
                b, ck, pos = cols.shape
                y = torch.sparse.mm(m, cols.transpose(0, 1).reshape(ck, b * pos))
                outs.append(y.view(-1, b, pos).transpose(0, 1))
            else:
                outs.append(torch.matmul(m, cols))
        y = outs[0] if groups == 1 else torch.cat(outs, dim=1)
        return (y + bias[:, None]).view(x.shape[0], -1, out_size, out_size)
    return run


def time_conv_layer(shape: ConvShape, weight: torch.Tensor, groups: int, batch: int, repeats: int,
                    warmup: int, device: str = "cpu", impls: Sequence[str] = ("conv2d", "gemm", "compact", "csr"),
                    seed: int = 0, spread: dict | None = None) -> dict[str, float]:
    """Median seconds of each implementation on one random input batch; quartiles go into ``spread``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, shape.in_channels, shape.in_size, shape.in_size, generator=g).to(device)
    bias = torch.randn(shape.out_channels, generator=g).to(device)
    weight = weight.to(device)
    fns = {
        "conv2d": lambda: F.conv2d(x, weight, bias, shape.stride, shape.padding, 1, groups),
        "gemm": (lambda f: lambda: f(x))(lowered_conv(weight, bias, shape, groups, sparse=False)),
    }
    if "compact" in impls:
        fns["compact"] = (lambda m: lambda: m(x))(_GroupedCompact(weight.cpu(), bias.cpu(), shape, groups).to(device))
    if "csr" in impls:
        fns["csr"] = (lambda f: lambda: f(x))(lowered_conv(weight, bias, shape, groups, sparse=True))
    names = [n for n in impls if n in fns]
    with torch.inference_mode():
        samples = time_interleaved([fns[n] for n in names], repeats, warmup, device)
    out = {n: statistics.median(s) for n, s in zip(names, samples)}
    if spread is not None:
        for n, s in zip(names, samples):
            q = summarize(s)
            spread[n] = [q["q1_ms"] / 1e3, q["q3_ms"] / 1e3]
    return out


def alexnet_table4(rows: Sequence[int] = (1, 2, 4, 5), batch_sizes: Sequence[int] = (1, 64),
                   threads: Sequence[int] = (1, 0), groups: Sequence[str] = ("1", "caffe"),
                   repeats: int = 10, warmup: int = 2, device: str = "cpu", progress=None) -> dict:
    """Time CaffeNet conv1–conv5 at Table 4's sparsities. ``threads`` 0 means all cores.
    ``groups``: "1" (every layer groups=1) and/or "caffe" (groups=2 where CaffeNet has it)."""
    old = torch.get_num_threads()
    results = []
    try:
        for th in threads:
            torch.set_num_threads(th or _all_threads())
            for gmode in groups:
                for row in rows:
                    paper = PAPER_TABLE4[row]
                    for li, shape in enumerate(ALEXNET):
                        gr = shape.groups if gmode == "caffe" else 1
                        if paper["method"] == "ssl":
                            w = sparse_conv_weight(shape, gr, paper["row"][li], paper["column"][li], seed=li)
                            impls = ("conv2d", "gemm", "compact")
                        else:
                            w = sparse_conv_weight(shape, gr, unstructured=paper["sparsity"][li], seed=li)
                            impls = ("conv2d", "gemm", "csr")
                        for b in batch_sizes:
                            q: dict = {}
                            t = time_conv_layer(shape, w, gr, b, repeats, warmup, device, impls, spread=q)
                            sparse_impl = "compact" if paper["method"] == "ssl" else "csr"
                            results.append({
                                "row": row, "method": paper["method"], "layer": shape.name, "groups": gr,
                                "groups_mode": gmode,
                                "batch": b, "threads": torch.get_num_threads(),
                                "seconds": t, "seconds_q1_q3": q, "vs_conv2d": t["conv2d"] / t[sparse_impl],
                                "vs_gemm": t["gemm"] / t[sparse_impl],
                                "flop_fraction": _flop_fraction(w, gr, paper["method"] == "l1"),
                                "paper_cpu": paper["cpu"][li], "paper_gpu": paper["gpu"][li]})
                            if progress is not None:
                                progress(results[-1])
    finally:
        torch.set_num_threads(old)
    return {"benchmark": "alexnet-table4", "device": device, "machine": machine_info(), "results": results}


def _all_threads() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _flop_fraction(w: torch.Tensor, groups: int, unstructured: bool) -> float:
    """Multiply-adds kept: nonzero weights if unstructured, else kept rows × kept columns per group."""
    if unstructured:
        return int(w.ne(0).sum()) / w.numel()
    n = w.shape[0] // groups
    kept = 0
    for gi in range(groups):
        m = w[gi * n:(gi + 1) * n].flatten(1)
        kept += int(m.ne(0).any(dim=1).sum()) * int(m.ne(0).any(dim=0).sum())
    return kept / w.numel()


def column_sweep(shape: ConvShape = ALEXNET[2], sparsities: Sequence[float] = tuple(i / 20 for i in range(20)),
                 batch: int = 1, threads: int = 1, repeats: int = 10, warmup: int = 2, device: str = "cpu",
                 progress=None) -> dict:
    """One layer's speed against column sparsity: structured (compact) vs unstructured (CSR) at the
    same fraction of zero weights, both against dense conv2d and lowered GEMM."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads or _all_threads())
    results = []
    try:
        for s in sparsities:
            ws = sparse_conv_weight(shape, 1, column=s, seed=1)
            wu = sparse_conv_weight(shape, 1, unstructured=s, seed=1)
            qs, qu = {}, {}
            ts = time_conv_layer(shape, ws, 1, batch, repeats, warmup, device, ("conv2d", "gemm", "compact"), spread=qs)
            tu = time_conv_layer(shape, wu, 1, batch, repeats, warmup, device, ("conv2d", "gemm", "csr"), spread=qu)
            results.append({"sparsity": s, "structured": ts, "unstructured": tu,
                            "structured_q1_q3": qs, "unstructured_q1_q3": qu,
                            "compact_vs_conv2d": ts["conv2d"] / ts["compact"], "csr_vs_conv2d": tu["conv2d"] / tu["csr"],
                            "compact_vs_gemm": ts["gemm"] / ts["compact"], "csr_vs_gemm": tu["gemm"] / tu["csr"]})
            if progress is not None:
                progress(results[-1])
    finally:
        torch.set_num_threads(old)
    return {"benchmark": "sweep", "layer": shape.__dict__, "batch": batch, "threads": threads or _all_threads(),
            "device": device, "machine": machine_info(), "results": results}


# ---- rendering -------------------------------------------------------------------------

def table4_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"AlexNet Table 4 layers on {m['cpu']} ({res['device']}), torch {m['torch']}, {m['date']}. "
             "Speedup of the sparse layer (compact for SSL rows, CSR for ℓ1 rows) against PyTorch's dense "
             "conv2d and against the paper's lowered GEMM baseline; the paper's figure is against lowered GEMM.", "",
             "| row | method | groups | threads | batch | layer | FLOP kept | × conv2d | × GEMM | paper CPU × | paper GPU × |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = table4_summary(res)
    if summary:
        lines[1:1] = ["", *summary]
    for r in res["results"]:
        lines.append(f"| {r['row']} | {r['method']} | {r['groups']} | {r['threads']} | {r['batch']} | {r['layer']} | "
                     f"{100 * r['flop_fraction']:.1f}% | {r['vs_conv2d']:.2f} | {r['vs_gemm']:.2f} | "
                     f"{r['paper_cpu']:.2f} | {r['paper_gpu']:.2f} |")
    return "\n".join(lines)


def table4_summary(res: dict) -> list[str]:
    """Per thread count, batch and groups mode: mean speedup over conv2–conv5 of SSL row 2 (compact)
    and ℓ1 row 1 (CSR) against conv2d, and on how many of those layers compact beats CSR."""
    out = []
    keys = sorted({(r["threads"], r["batch"], r.get("groups_mode", "1")) for r in res["results"]})
    for th, b, g in keys:
        sel = {(r["row"], r["layer"]): r["vs_conv2d"] for r in res["results"]
               if (r["threads"], r["batch"], r.get("groups_mode", "1")) == (th, b, g) and r["layer"] != "conv1"}
        layers = sorted({layer for _, layer in sel})
        if not all((2, l) in sel for l in layers) or not layers:
            continue
        ssl = [sel[2, l] for l in layers]
        text = (f"- {th} thread(s), batch {b}, groups {'1' if g == '1' else 'as CaffeNet'}: SSL row 2 compact "
                f"{sum(ssl) / len(ssl):.2f}× dense conv2d on average over {layers[0]}–{layers[-1]}")
        if all((1, l) in sel for l in layers):
            csr = [sel[1, l] for l in layers]
            wins = sum(a > c for a, c in zip(ssl, csr))
            text += f"; ℓ1 row 1 CSR {sum(csr) / len(csr):.2f}×; compact faster than CSR on {wins} of {len(layers)}"
        out.append(text)
    return out


def table4_plot(res: dict, path: Path, threads: int, batch: int, groups_mode: str = "1") -> None:
    """Bar chart: per layer, speedup vs conv2d of each Table 4 row, beside the paper's CPU figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = [r for r in res["results"] if r["threads"] == threads and r["batch"] == batch
           and r["groups_mode"] == groups_mode]
    rows = sorted({r["row"] for r in sel})
    layers = [s.name for s in ALEXNET]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / (2 * len(rows))
    for i, row in enumerate(rows):
        ours = [next((r["vs_conv2d"] for r in sel if r["row"] == row and r["layer"] == l), 0) for l in layers]
        paper = PAPER_TABLE4[row]["cpu"]
        xs = [j + (2 * i) * width for j in range(len(layers))]
        ax.bar(xs, ours, width, label=f"row {row} ({PAPER_TABLE4[row]['method']}): ours vs conv2d")
        ax.bar([x + width for x in xs], paper, width, alpha=0.45, label=f"row {row}: paper CPU vs GEMM")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers)
    ax.set_ylabel("speedup (×)")
    ax.set_title(f"AlexNet Table 4 layers, {threads} thread(s), batch {batch}, groups={'1' if groups_mode == '1' else 'as CaffeNet'}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [100 * r["sparsity"] for r in res["results"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["compact_vs_conv2d"] for r in res["results"]], "o-", label="structured (columns), compact layer")
    ax.plot(xs, [r["csr_vs_conv2d"] for r in res["results"]], "s-", label="unstructured, CSR")
    ax.axhline(1.0, color="k", lw=0.8, label="dense conv2d")
    ax.set_yscale("log")
    ax.set_xlabel("zero weights (%)")
    ax.set_ylabel("speedup vs dense conv2d (×, log)")
    lay = res["layer"]
    ax.set_title(f"{lay['name']} ({lay['in_channels']}→{lay['out_channels']}, {lay['kernel']}×{lay['kernel']}), "
                 f"batch {res['batch']}, {res['threads']} thread(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_markdown(res: dict) -> str:
    m, lay = res["machine"], res["layer"]
    lines = [f"Column sweep of {lay['name']} ({lay['in_channels']}→{lay['out_channels']}, {lay['kernel']}×{lay['kernel']}, "
             f"{lay['in_size']}×{lay['in_size']} input), batch {res['batch']}, {res['threads']} thread(s), on {m['cpu']}, "
             f"torch {m['torch']}, {m['date']}.", "",
             "| zero weights | compact × conv2d | CSR × conv2d | compact × GEMM | CSR × GEMM |", "|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {100 * r['sparsity']:.0f}% | {r['compact_vs_conv2d']:.2f} | {r['csr_vs_conv2d']:.2f} | "
                     f"{r['compact_vs_gemm']:.2f} | {r['csr_vs_gemm']:.2f} |")
    return "\n".join(lines)


def write(res: dict, out: Path, name: str, markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{name}.md").write_text(markdown + "\n")


# ---- bench model --onnx: ONNX Runtime beside PyTorch ------------------------------------

ONNX_IMPLS = ("torch_original", "torch_compact", "ort_original", "ort_compact")


def onnx_model_timing(original: nn.Module, compact: nn.Module, example: torch.Tensor, out: Path,
                      batch_sizes: Sequence[int] = (1, 64), threads: int = 1, repeats: int = 30, warmup: int = 2,
                      seed: int = 0) -> dict:
    """Export both models to ``out/{original,compact}.onnx`` (checked against PyTorch) and time them
    in ONNX Runtime beside PyTorch, all four in the same interleaved repetitions, on the CPU.
    ``threads`` (0: all cores) is used by torch and by ONNX Runtime's intra-op pool alike."""
    import onnxruntime

    from ..storage.export import export_onnx, ort_session
    out.mkdir(parents=True, exist_ok=True)
    original, compact, example = original.cpu().eval(), compact.cpu().eval(), example.cpu()
    files = {n: export_onnx(m, example, out / f"{n}.onnx") for n, m in (("original", original), ("compact", compact))}
    threads = threads or _all_threads()
    sessions = {n: ort_session(f, threads=threads) for n, f in files.items()}
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    try:
        for b in batch_sizes:
            x = torch.rand((int(b), *example.shape[1:]), generator=gen)
            feed = {n: {s.get_inputs()[0].name: x.numpy()} for n, s in sessions.items()}
            fns = [lambda: original(x), lambda: compact(x),
                   lambda: sessions["original"].run(None, feed["original"]),
                   lambda: sessions["compact"].run(None, feed["compact"])]
            with torch.inference_mode():
                samples = time_interleaved(fns, repeats, warmup)
            t = {n: summarize(s) for n, s in zip(ONNX_IMPLS, samples)}
            med = {n: v["median_ms"] for n, v in t.items()}
            rows.append({"batch": int(b), **t,
                         "speedup_torch": med["torch_original"] / med["torch_compact"],
                         "speedup_ort": med["ort_original"] / med["ort_compact"],
                         "ort_vs_torch_compact": med["torch_compact"] / med["ort_compact"],
                         "ort_compact_vs_torch_original": med["torch_original"] / med["ort_compact"]})
    finally:
        torch.set_num_threads(old)
    return {"rows": rows, "threads": threads, "repeats": repeats, "onnxruntime": onnxruntime.__version__,
            "files": {n: str(f) for n, f in files.items()}}


def onnx_markdown(res: dict) -> str:
    lines = [f"ONNX Runtime {res['onnxruntime']} (CPU) beside PyTorch, {res['threads']} thread(s), median of "
             f"{res['repeats']} interleaved repetitions of all four; ratios are speedups (× faster).", "",
             "| batch | torch dense ms | torch compact ms | ORT dense ms | ORT compact ms | compact × dense (torch) | "
             "compact × dense (ORT) | ORT compact × torch compact | ORT compact × torch dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ms = " | ".join(f"{r[n]['median_ms']:.3f}" for n in ONNX_IMPLS)
        lines.append(f"| {r['batch']} | {ms} | {r['speedup_torch']:.2f}× | {r['speedup_ort']:.2f}× | "
                     f"{r['ort_vs_torch_compact']:.2f}× | {r['ort_compact_vs_torch_original']:.2f}× |")
    return "\n".join(lines)
