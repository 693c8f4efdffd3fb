#!/usr/bin/env python
"""Any model a user brings: torchvision's zoo through GroupLasso, compact, save/load and ONNX, beside
Torch-Pruning at the same ratio.

Per model (random weights, random BatchNorm statistics, one input of --batch images of --size, seeded): build
``GroupLasso(model, {"filter": 1e-3, "channel": 1e-3}, example_input=x)`` and backpropagate its penalty;
zero --fraction of every Conv2d / Linear's filters (with the BatchNorm γ/β right after them), of every
self-attention's heads (the output columns that read them) and of GroupLasso's coupled channel groups (the
channel units that several layers read: every reader's columns; for a unit that a LayerNorm normalises, everything
that writes it too); then ``compact`` and check it on the
example and on a new input (max abs difference against the output's scale), save/load, export to ONNX,
count multiply-adds with ``torch.utils.flop_counter`` on both models, count the channel units that stay
pinned and why, and time dense, compact and Torch-Pruning's ``MagnitudePruner`` (the same fraction per
layer, the classifier left alone) in the same interleaved repetitions on one thread (``--device cuda``: on a GPU).

Needs torchvision and torch-pruning, in an environment of their own (not the README's set-up)::

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 torch-pruning==1.6.1
    /tmp/tvenv/bin/pip install -e '.[export]'
    /tmp/tvenv/bin/python benchmarks/zoo.py --out results/zoo
    /tmp/tvenv/bin/python benchmarks/zoo.py --batch 16 --out results/zoo/batch16          # fixed costs amortised
    PYTHONPATH=. python3 benchmarks/zoo.py --device cuda --batch 64 --out OUT              # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from structsparse import GroupLasso, compact, export_onnx, load_compact, save_compact
from structsparse.graph import trace_graph
from structsparse.report import count_macs, pinned_summary
from structsparse.timing import machine_info, summarize, time_interleaved

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "vgg11_bn",
          "densenet121", "googlenet", "convnext_tiny", "regnet_x_400mf", "shufflenet_v2_x1_0", "vit_b_16")
EXACT = 1e-4   # max abs difference, as a fraction of the output's largest magnitude


def build(name: str, size: int, seed: int) -> nn.Module:
    """A torchvision model (``timm:NAME``: a timm model) with random weights and random BatchNorm statistics,
    in eval mode."""
    torch.manual_seed(seed)
    if name.startswith("timm:"):
        import timm
        name = name[len("timm:"):]
        kwargs = {"img_size": size} if name.startswith(("vit", "deit")) else {}
        model = timm.create_model(name, pretrained=False, **kwargs)
    else:
        import torchvision
        kwargs = {"image_size": size} if name.startswith("vit") else {}
        if name == "googlenet":
            kwargs.update(aux_logits=False, init_weights=True)
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not bool(m.weight.ne(0).any()):  # ViT's zero head
                nn.init.normal_(m.weight, std=0.02, generator=g)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


@torch.no_grad()
def zero_pattern(model: nn.Module, gl: GroupLasso, x: torch.Tensor, fraction: float, seed: int) -> dict:
    """Zero ``fraction`` of every weighted layer's filters (and the BatchNorm entries right after) and of
    ``gl``'s coupled channel groups (all readers' columns; for a channel under LayerNorm, all that writes it
    too); the model's output layer keeps its filters."""
    g = torch.Generator().manual_seed(seed)
    graph = trace_graph(model, x)
    users = graph.consumers()
    filters = 0
    for node in graph.nodes.values():
        if node.role not in ("conv", "linear") or node.name == graph.output:
            continue
        w = node.module.weight
        pick = torch.randperm(w.shape[0], generator=g)[:round(fraction * w.shape[0])]
        w[pick] = 0
        if node.module.bias is not None:
            node.module.bias[pick] = 0
        after = users[node.name]
        if len(after) == 1 and graph.nodes[after[0]].role == "norm" and graph.nodes[after[0]].module.weight is not None:
            graph.nodes[after[0]].module.weight[pick] = 0
            graph.nodes[after[0]].module.bias[pick] = 0
        filters += len(pick)
    for node in graph.nodes.values():  # attention: whole heads (the output columns that read them)
        if node.role == "attention":
            m = node.module
            heads = torch.randperm(m.num_heads, generator=g)[:round(fraction * m.num_heads)]
            m.out.weight.view(m.embed_dim, m.num_heads, m.head_dim)[:, heads] = 0
            mha = model.get_submodule(node.name)
            mha.out_proj.weight.view(m.embed_dim, m.num_heads, m.head_dim)[:, heads] = 0
    n = len(gl.coupled) if gl.coupled is not None else 0
    chosen = torch.randperm(n, generator=g)[:round(fraction * n)]
    if n:
        scale = torch.ones(n)
        scale[chosen] = 0
        gl.coupled.scale_(scale)
    return {"filters_zeroed": filters, "coupled_units": n, "coupled_zeroed": len(chosen)}


def pinned(model: nn.Module, x: torch.Tensor) -> dict:
    """The fraction of channel units that stay whatever their weights, and the four commonest reasons."""
    p = pinned_summary(model, x)
    return {"units": p["units"], "pinned_fraction": p["pinned"] / p["units"] if p["units"] else 0.0,
            "reasons": dict(list(p["reasons"].items())[:4])}


def max_rel_diff(a: nn.Module, b: nn.Module, xs: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return max(float((a(x) - b(x)).abs().max() / a(x).abs().max().clamp_min(1e-12)) for x in xs)


def ours(model: nn.Module, x: torch.Tensor, fraction: float, seed: int,
         grouped: str = "pad") -> tuple[dict, nn.Module | None]:
    """GroupLasso, the zero pattern, compact, save/load, ONNX: a row, and the compact model."""
    row: dict = {}
    gl = GroupLasso(model, {"filter": 1e-3, "channel": 1e-3}, example_input=x)
    gl.penalty().backward()
    row["group_lasso"] = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    row.update(zero_pattern(model, gl, x, fraction, seed))
    row.update(pinned(model, x))
    t0 = time.perf_counter()
    small = compact(model, x, grouped=grouped)
    row["compact_s"] = time.perf_counter() - t0
    fresh = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    row["max_rel_diff"] = max_rel_diff(model, small, [x, fresh])
    row["exact"] = row["max_rel_diff"] <= EXACT
    with tempfile.TemporaryDirectory() as tmp:
        try:
            loaded = load_compact(save_compact(small, Path(tmp) / "m"))
            row["save_load"] = "identical" if torch.equal(loaded(fresh), small(fresh)) else "DIFFERS"
        except TypeError as e:  # a step kept as the model's own code is not stored
            row["save_load"] = f"not stored: {str(e).split(' (')[0]}"
        try:
            export_onnx(small, x, Path(tmp) / "m.onnx")
            row["onnx"] = "ok"
        except Exception as e:  # noqa: BLE001  reported per model
            row["onnx"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    row["flop_ratio"] = count_macs(small, x) / count_macs(model, x)
    row["param_ratio"] = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    return row, small


def torch_pruning(dense: nn.Module, x: torch.Tensor, fraction: float) -> tuple[dict, nn.Module | None]:
    """Torch-Pruning 1.6.1's MagnitudePruner at ``fraction`` per layer; the output Linear is left alone."""
    import torch_pruning as tp
    model = copy.deepcopy(dense)
    out = model(x).shape[-1]
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == out]
    heads = {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=fraction, ignored_layers=ignored, num_heads=heads)
    pruner.step()
    for m, h in heads.items():  # keep the attention layers' own head_dim in step with their new width
        m.head_dim = m.embed_dim // h
    model.eval()
    return {"flop_ratio": count_macs(model, x) / count_macs(dense, x),
            "param_ratio": sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in dense.parameters())}, \
        model


def latency(calls: dict[str, object], repeats: int, device: str = "cpu") -> dict:
    """Median ms of each call, timed in the same interleaved repetitions: on one thread on the CPU, with CUDA
    events on a GPU."""
    names = [n for n, f in calls.items() if f is not None]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            samples = time_interleaved([calls[n] for n in names], repeats=repeats, warmup=2, device=device)
    finally:
        torch.set_num_threads(old)
    return {n: summarize(s) for n, s in zip(names, samples)}


def run_model(name: str, size: int, fraction: float, repeats: int, seed: int, peer: bool = True,
              batch: int = 1, device: str = "cpu", time_batch: int | None = None, grouped: str = "pad") -> dict:
    """One model's row: built, compacted and checked on the CPU on ``batch`` images; timed on ``device`` on
    ``time_batch`` (default ``batch``)."""
    row: dict = {"model": name}
    dense = build(name, size, seed)
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    timed = {"dense": dense}
    for key, fn in (("structsparse", lambda: ours(copy.deepcopy(dense), x, fraction, seed, grouped)),
                    ("torch_pruning",
                     lambda: torch_pruning(dense, x, fraction) if peer else ({"error": "not run"}, None))):
        try:
            row[key], timed[key] = fn()
        except Exception as e:  # noqa: BLE001  a failure is a result
            row[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                        "where": traceback.format_exc().splitlines()[-3].strip()[:200]}
            timed[key] = None
    if time_batch not in (None, batch):
        x = torch.rand(time_batch, *x.shape[1:], generator=torch.Generator().manual_seed(seed + 2))
    dense_cl, x_cl = copy.deepcopy(dense).to(memory_format=torch.channels_last), x.contiguous(
        memory_format=torch.channels_last)  # the dense model in the other layout, as a fair second baseline
    x, x_cl = x.to(device), x_cl.to(device)
    try:
        calls = {k: (lambda m=m.to(device): m(x)) if m is not None else None for k, m in timed.items()}
        ms = latency({**calls, "dense_channels_last": lambda m=dense_cl.to(device): m(x_cl)}, repeats, device)
    except Exception as e:  # noqa: BLE001  a model that does not run on the device is a result
        row["latency_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        return row
    row["latency_ms"] = ms
    best_dense = min(ms["dense"]["median_ms"], ms["dense_channels_last"]["median_ms"])
    for key in ("structsparse", "torch_pruning"):
        if key in ms:
            row[key]["latency_ratio"] = ms[key]["median_ms"] / ms["dense"]["median_ms"]
            row[key]["latency_ratio_best_dense"] = ms[key]["median_ms"] / best_dense
            if "flop_ratio" in row[key]:  # the speed issue's target: at most 1.25
                row[key]["latency_per_flop"] = row[key]["latency_ratio"] / row[key]["flop_ratio"]
    if timed.get("structsparse") is not None:
        row["structsparse"]["channels_last"] = timed["structsparse"].channels_last
    return row


def markdown(res: dict) -> str:
    m = res["machine"]
    where = f"{m['cpu']}, torch {m['torch']}, one thread" if res.get("device", "cpu") == "cpu" else \
        f"{m.get('gpu', res['device'])} (CUDA events), torch {m['torch']}"
    tb = res.get("time_batch", res.get("batch", 1))
    timed_on = f" (timed on {tb})" if tb != res.get("batch", 1) else ""
    lines = [f"`{res['command']}` on {where}, {res['date']}; input "
             f"{res.get('batch', 1)}×3×{res['size']}×{res['size']}{timed_on}, {res['fraction']:.0%} of the groups "
             "zeroed; "
             "latency: median of "
             f"{res['repeats']} interleaved repetitions, as a ratio to the dense model's, and to the dense model's in "
             "its faster memory format (NCHW or channels-last weights and input, timed in the same repetitions); "
             "layout: the one `compact` kept (channels-last where it timed over 10% faster)"
             + (f"; `compact(..., grouped={res['grouped']!r})`" if "grouped" in res else "") + ".", "",
             "| model | exact (max rel diff) | save/load | ONNX | FLOP ratio (ours / TP) | params (ours / TP) | "
             "latency ratio (ours / TP) | latency ÷ FLOP ratio (ours / TP) | vs the faster dense (ours / TP) | "
             "layout | units pinned | commonest reasons |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        s, t = r["structsparse"], r["torch_pruning"]
        if "error" in s:
            ours_cells = [f"fails: {s['error']}", "–", "–"]
        else:
            ours_cells = [f"{'yes' if s['exact'] else 'NO'} ({s['max_rel_diff']:.1e})",
                          s["save_load"], s["onnx"]]
        def pair(k, fmt="{:.2f}"):
            a = "–" if k not in s else fmt.format(s[k])
            b = ("not run" if t["error"] == "not run" else "fails") if "error" in t else \
                fmt.format(t[k]) if k in t else "–"
            return f"{a} / {b}"
        reasons = "; ".join(f"{k} ({v})" for k, v in s.get("reasons", {}).items()) or "–"
        pin = f"{s['pinned_fraction']:.0%} of {s['units']}" if "units" in s else "–"
        layout = "–" if "channels_last" not in s else "channels-last" if s["channels_last"] else "NCHW"
        lines.append(f"| {r['model']} | " + " | ".join(ours_cells) + f" | {pair('flop_ratio')} | "
                     f"{pair('param_ratio')} | {pair('latency_ratio')} | {pair('latency_per_flop')} | "
                     f"{pair('latency_ratio_best_dense')} | "
                     f"{layout} | {pin} | {reasons} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated torchvision model names; timm:NAME for a timm model (pip install timm)")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=1, help="images in the input that builds, checks and times each model")
    ap.add_argument("--time-batch", type=int, default=None, help="images in the timed input (default: --batch)")
    ap.add_argument("--device", default="cpu", help="where to time the models (cuda: a GPU, with CUDA events); "
                    "they are built, compacted and checked on the CPU")
    ap.add_argument("--grouped", default="measure", choices=("pad", "keep", "measure"),
                    help="compact's grouped=: what becomes of the channels a grouped conv keeps only for its balance")
    ap.add_argument("--fraction", type=float, default=0.4)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning (it ran out of memory on swin_t)")
    ap.add_argument("--out", default=None, help="folder for zoo.json and zoo.md (default: print only)")
    args = ap.parse_args(argv)
    res = {"command": "python benchmarks/zoo.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
           "machine": machine_info(measure_threads=1), "device": args.device,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "size": args.size, "batch": args.batch,
           "time_batch": args.time_batch or args.batch, "grouped": args.grouped,
           "fraction": args.fraction, "repeats": args.repeats,
           "results": []}
    out = Path(args.out) if args.out else None
    for name in args.models.split(","):
        t0 = time.perf_counter()
        res["results"].append(run_model(name, args.size, args.fraction, args.repeats, args.seed, not args.no_peer,
                                          args.batch, args.device, args.time_batch, args.grouped))
        print(f"{name}: {json.dumps(res['results'][-1]['structsparse'])[:300]} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        if out is not None:  # after each model, so that an interrupted run keeps the models it finished
            out.mkdir(parents=True, exist_ok=True)
            (out / "zoo.json").write_text(json.dumps(res, indent=1) + "\n")
            (out / "zoo.md").write_text(markdown(res) + "\n")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
