#!/usr/bin/env python
"""Peer comparison: Torch-Pruning (DepGraph, magnitude importance) against our SSL LeNet 2 and LeNet 3.

Optional dependency, only for this benchmark (not a dependency of structsparse)::

    pip install torch-pruning        # tested with torch-pruning 1.6.1

Same start, same target structure, same fine-tuning budget:

1. Start: the dense LeNet our LeNet 2 / LeNet 3 rows start from, i.e. the model after the
   ``dense`` phase of their recipes (results/mnist/table/<row>/metrics.json ``recipe``; LeNet 2's and
   LeNet 3's dense phases are the same). Their run checkpoints keep only the last epoch, so it is
   recreated by ``recipes/mnist/lenet_dense4_final.yaml`` (that phase alone, same seed, shuffles
   and training images: train + val, as the final rows)::

       structsparse run recipes/mnist/lenet_dense4_final.yaml --out runs/mnist/lenet_dense4_final --no-progress

2. Prune it one-shot with Torch-Pruning: ``tp.DependencyGraph`` (conv1's filters are coupled to
   conv2's input channels, conv2's filters to fc1's 16 input columns each, through the flatten),
   ``tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="mean")`` (the L1
   norm of each coupled group, Torch-Pruning's "group L1"), keeping, per layer, exactly as many
   filters/neurons as our compact model has (read from results/mnist/table/<row>/metrics.json
   ``compact_shapes``: conv1 and conv2 filters, fc1 neurons).
3. Fine-tune with exactly our fine-tuning phase (the recipe's last phase: epochs, lr schedule,
   momentum, weight decay, batch 64, and the same batches in the same order).
4. Evaluate test error (10k MNIST test images) and time the dense model, our compact model
   (results/mnist/table/<row>/model) and the Torch-Pruning model on one thread, batch 1 and 64,
   in interleaved repetitions (:func:`structsparse.timing.time_interleaved`), plus the
   per-layer speedups of each against the dense model (:func:`structsparse.measure_speedup`).

Our pipeline trains 4 dense + 8 SSL + 6 fine-tuning epochs; Torch-Pruning here gets
4 dense + 6 fine-tuning (the budget of our fine-tuning phase, as asked), and also, with
``--equal-total``, 4 dense + 14 (our SSL and fine-tuning epochs together, same lr schedule
stretched), so that neither side has fewer epochs in all.

Writes results/mnist/peers/torch_pruning.json and torch_pruning.md::

    OMP_NUM_THREADS=1 python benchmarks/peer_torch_pruning.py                 # train + time
    python benchmarks/peer_torch_pruning.py --time-only                       # re-time saved models
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: experiments/
from experiments.mnist import PEERS, RESULTS, row_metrics, row_recipe_path  # noqa: E402
from experiments.peers import layer_macs, lenet_from_state, total_flops, train_phase  # noqa: E402
from experiments.runs import ROOT, read_json, repo_path  # noqa: E402

from structsparse import load_compact, measure_speedup  # noqa: E402
from structsparse.runner.recipe import load_recipe  # noqa: E402
from structsparse.runner.trainer import evaluate, load_splits  # noqa: E402
from structsparse.timing import machine_info, time_interleaved  # noqa: E402
from structsparse.zoo.models import LeNet  # noqa: E402

ROWS = ("lenet2", "lenet3")
OUT = PEERS
SCRIPT = "benchmarks/peer_torch_pruning.py"
WORK = ROOT / "runs" / "mnist" / "peers" / "torch_pruning"


def targets(row: str) -> dict[str, int]:
    """Filters / neurons our compact model keeps per layer (what Torch-Pruning must keep)."""
    s = row_metrics(row)["compact_shapes"]
    return {"conv1": s["conv1"]["out_channels"], "conv2": s["conv2"]["out_channels"], "fc1": s["fc1"]["out_features"]}


def tp_prune(dense: LeNet, keep: dict[str, int]) -> tuple[LeNet, dict]:
    """One-shot Torch-Pruning of a copy of ``dense`` to ``keep`` filters/neurons per layer."""
    import torch_pruning as tp
    model = copy.deepcopy(dense).eval()
    example = torch.zeros(1, 1, 28, 28)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    imp = tp.importance.MagnitudeImportance(p=1, normalizer=None, group_reduction="mean")
    fns = {"conv1": tp.prune_conv_out_channels, "conv2": tp.prune_conv_out_channels,
           "fc1": tp.prune_linear_out_channels}
    pruned = {}
    for name in ("conv1", "conv2", "fc1"):   # in forward order; importance on the current weights
        layer = getattr(model, name)
        n = layer.out_channels if name.startswith("conv") else layer.out_features
        group = dg.get_pruning_group(layer, fns[name], idxs=list(range(n)))
        scores = imp(group)
        drop = sorted(torch.argsort(scores)[: n - keep[name]].tolist())
        if drop:
            group = dg.get_pruning_group(layer, fns[name], idxs=drop)
            if not dg.check_pruning_group(group):
                raise RuntimeError(f"Torch-Pruning refuses to prune {name} to {keep[name]}")
            group.prune()
        pruned[name] = {"kept": n - len(drop), "of": n, "group": [str(dep) for dep, _ in group]}
    return model, pruned


def shapes(model: LeNet) -> dict:
    return {"conv1": list(model.conv1.weight.shape), "conv2": list(model.conv2.weight.shape),
            "fc1": list(model.fc1.weight.shape), "fc2": list(model.fc2.weight.shape)}


def longer(phase, epochs: int):
    return dataclasses.replace(phase, epochs=epochs, name=f"{phase.name}_{epochs}ep")


def row_recipe(row: str):
    return load_recipe(repo_path(row_recipe_path(row_metrics(row))))


def train_rows(args, splits, dense: LeNet) -> dict:
    out = {}
    for row in args.rows:
        recipe = row_recipe(row)
        ft_index = len(recipe.phases) - 1
        ft = recipe.phases[ft_index]
        ssl_epochs = sum(p.epochs for p in recipe.phases[1:ft_index])
        keep = targets(row)
        model0, pruned = tp_prune(dense, keep)
        res = {"targets": keep, "pruned": pruned, "shapes": shapes(model0),
               "test_error_pruned_no_finetune": evaluate(model0, splits["test"], 1000),
               "val_error_pruned_no_finetune": evaluate(model0, splits["val"], 1000), "variants": {}}
        print(f"{row}: pruned to {res['shapes']}; before fine-tuning test error "
              f"{100 * res['test_error_pruned_no_finetune']:.2f}%", flush=True)
        variants = [("ft", ft)]
        if args.equal_total:
            variants.append(("ft_equal_total", longer(ft, ft.epochs + ssl_epochs)))
        for tag, phase in variants:
            model = copy.deepcopy(model0)
            t0 = time.perf_counter()
            hist = train_phase(model, splits, recipe, ft_index, phase)
            secs = time.perf_counter() - t0
            path = WORK / f"{row}_{tag}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            err = evaluate(model, splits["test"], 1000)
            res["variants"][tag] = {
                "finetune": {**dataclasses.asdict(phase), "phase_index_for_shuffles": ft_index, "seed": recipe.seed,
                             "batch_size": recipe.batch_size},
                "test_error": err, "test_wrong": round(err * len(splits["test"])),
                "val_error": hist[-1]["val_error"], "history": hist, "train_seconds": secs,
                "weights": str(path.relative_to(ROOT))}
            print(f"{row} {tag}: test error {100 * err:.2f}%, val {100 * hist[-1]['val_error']:.2f}% ({secs:.0f} s)",
                  flush=True)
        out[row] = res
    return out


def _med(samples):
    return 1e3 * statistics.median(samples)


def timing(rows: list[str], dense: LeNet, models: dict, repeats: int, warmup: int) -> dict:
    """Whole-model time of dense, ours and Torch-Pruning, interleaved; per-layer speedups vs dense."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    out = {"threads": 1, "repeats": repeats, "warmup": warmup, "rows": {}}
    for row in rows:
        ours = load_compact(RESULTS / row / "model").eval()
        peer = models[row].eval()
        r = {}
        with torch.inference_mode():
            for b in (1, 64):
                x = torch.rand(b, 1, 28, 28, generator=gen)
                s = time_interleaved([lambda: dense(x), lambda: ours(x), lambda: peer(x)], repeats, warmup)
                d, o, p = (_med(v) for v in s)
                r[f"batch{b}"] = {"dense_ms": d, "ours_ms": o, "torch_pruning_ms": p,
                                  "ours_speedup": d / o, "torch_pruning_speedup": d / p, "ours_vs_torch_pruning": p / o}
                print(f"{row} batch {b}: dense {d:.3f} ms, ours {o:.3f} ms ({d / o:.2f}×), "
                      f"Torch-Pruning {p:.3f} ms ({d / p:.2f}×)", flush=True)
        ex = torch.rand(1, 1, 28, 28, generator=gen)
        r["per_layer"] = {
            "ours": measure_speedup(dense, ours, ex, (1, 64), threads=1, repeats=repeats, warmup=warmup).to_dict()["rows"],
            "torch_pruning": measure_speedup(dense, peer, ex, (1, 64), threads=1, repeats=repeats,
                                             warmup=warmup).to_dict()["rows"]}
        out["rows"][row] = r
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Torch-Pruning vs our SSL LeNet 2 and LeNet 3 (MNIST)", "",
             f"Command: `{res['command']}`  ", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
             f"torch-pruning {res['torch_pruning_version']}; timing on 1 thread, median of {res['timing']['repeats']} "
             f"interleaved repetitions  ", f"Date: {res['date']}", "",
             f"Dense start: `{res['dense']['run']}` (the dense phase of {res['dense']['dense_phase_of']}; test error "
             f"{100 * res['dense']['test_error']:.2f}%, val {100 * res['dense']['val_error']:.2f}%). "
             "Torch-Pruning: DependencyGraph + group-L1 magnitude importance, one shot, to our compact model's "
             "filter/neuron counts, then our fine-tuning phase (same epochs, lr schedule, batches).", "",
             "| row | method | training epochs | test error | filters conv1—conv2 | fc1 neurons | FLOP per layer "
             "conv1—conv2 | FLOP whole model | ms batch 1 | ms batch 64 | speedup vs dense, batch 1 / 64 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, r in res["rows"].items():
        t = res["timing"]["rows"].get(row, {})
        b1, b64 = t.get("batch1", {}), t.get("batch64", {})
        o = r["ours"]
        lines.append(f"| {row} | dense start | 4 | {100 * res['dense']['test_error']:.2f}% | 20—50 | 500 | 100%—100% | 100% | "
                     f"{b1.get('dense_ms', float('nan')):.3f} | {b64.get('dense_ms', float('nan')):.3f} | 1.00× / 1.00× |")
        lines.append(f"| {row} | **SSL (ours)** | {o['epochs']} | **{100 * o['test_error']:.2f}%** | "
                     f"{o['filters'][0]}—{o['filters'][1]} | {o['fc1']} | "
                     f"{100 * o['flop'][0]:.1f}%—{100 * o['flop'][1]:.1f}% | {100 * o['flop_total']:.1f}% | "
                     f"{b1.get('ours_ms', float('nan')):.3f} | {b64.get('ours_ms', float('nan')):.3f} | "
                     f"{b1.get('ours_speedup', float('nan')):.2f}× / {b64.get('ours_speedup', float('nan')):.2f}× |")
        p = r["torch_pruning"]
        lines.append(f"| {row} | Torch-Pruning, no fine-tuning | 4 | {100 * r['test_error_pruned_no_finetune']:.2f}% | "
                     f"{p['filters'][0]}—{p['filters'][1]} | {p['fc1']} | {100 * p['flop'][0]:.1f}%—{100 * p['flop'][1]:.1f}% | "
                     f"{100 * p['flop_total']:.1f}% | | | |")
        for tag, v in r["variants"].items():
            eps = 4 + v["finetune"]["epochs"]
            lines.append(f"| {row} | Torch-Pruning + fine-tune {v['finetune']['epochs']} ep | {eps} | "
                         f"**{100 * v['test_error']:.2f}%** | {p['filters'][0]}—{p['filters'][1]} | {p['fc1']} | "
                         f"{100 * p['flop'][0]:.1f}%—{100 * p['flop'][1]:.1f}% | {100 * p['flop_total']:.1f}% | "
                         + (f"{b1['torch_pruning_ms']:.3f} | {b64['torch_pruning_ms']:.3f} | "
                            f"{b1['torch_pruning_speedup']:.2f}× / {b64['torch_pruning_speedup']:.2f}× |"
                            if tag == res["timed_variant"] and b1 else "(same shapes) | | |"))
    lines += ["", "Per layer, speedup against the same dense layer (`structsparse.measure_speedup`, each model timed "
              "interleaved with the dense one), batch 1 / batch 64:", "",
              "| row | model | conv1 | conv2 | fc1 | fc2 | whole model |", "|---|---|---|---|---|---|---|"]
    for row, t in res["timing"]["rows"].items():
        for who, label in (("ours", "SSL (ours)"), ("torch_pruning", "Torch-Pruning")):
            sp = {(r["scope"], r["batch"]): r["speedup"] for r in t["per_layer"][who]}
            cells = [f"{sp.get((s, 1), float('nan')):.2f}× / {sp.get((s, 64), float('nan')):.2f}×"
                     for s in ("conv1", "conv2", "fc1", "fc2", "model")]
            lines.append(f"| {row} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "FLOP = multiply-adds kept, of the dense LeNet's (conv1 288k, conv2 1.6M, whole model 2.29M), "
              "counted on the models as they run (for ours: metrics.json `compact_flop_fraction`). "
              "Same per-layer counts give the same FLOP; the time differences between ours and Torch-Pruning are "
              "then noise or layout (ours: CompactNet steps, Torch-Pruning: the original nn.Module with smaller layers)."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", default="runs/mnist/lenet_dense4_final",
                    help="run dir of recipes/mnist/lenet_dense4_final.yaml (the rows' dense phase)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--equal-total", action="store_true",
                    help="also fine-tune for our SSL + fine-tuning epochs together (equal total budget)")
    ap.add_argument("--time-only", action="store_true", help="re-time the saved models of an earlier run")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=str(OUT))
    return ap


def load_dense(run: str, rows: list[str]) -> tuple[LeNet, dict, object]:
    """The dense start (a finished run of the rows' dense phase): model, its metrics, its recipe."""
    dense_dir = ROOT / run
    dm = read_json(dense_dir / "metrics.json")
    dense = LeNet()
    dense.load_state_dict(load_file(dense_dir / "trained.safetensors"))
    dense.eval()
    recipe = load_recipe(repo_path(dm["recipe"]))
    for row in rows:   # the dense run must be the rows' dense phase, on the same training images
        rr = row_recipe(row)
        if (rr.phases[0], rr.seed, rr.train_with_val) != (recipe.phases[0], recipe.seed, recipe.train_with_val):
            raise SystemExit(f"{run}: not the dense phase of {row}'s recipe {row_recipe_path(row_metrics(row))}")
    return dense, dm, recipe


def ours_record(row: str, example: torch.Tensor, dense_flops: int) -> dict:
    """Our committed row as the table shows it: errors, epochs, filters, FLOP."""
    ours = row_metrics(row)
    L = {l["name"]: l for l in ours["layers"]}
    shapes = ours["compact_shapes"]
    return {"result": f"{RESULTS.relative_to(ROOT).as_posix()}/{row}/metrics.json", "test_error": ours["test_error"],
            "val_error": ours["val_error"], "epochs": sum(p.epochs for p in row_recipe(row).phases),
            "filters": [shapes["conv1"]["out_channels"], shapes["conv2"]["out_channels"]],
            "conv2_channels_read": shapes["conv2"]["in_channels"], "fc1": shapes["fc1"]["out_features"],
            "flop": [L["conv1"]["compact_flop_fraction"], L["conv2"]["compact_flop_fraction"]],
            "flop_total": ours["compact_flop_fraction"],
            "flop_total_flop_counter": total_flops(load_compact(RESULTS / row / "model"), example) / dense_flops}


def peer_record(model: LeNet, example: torch.Tensor, dense_macs: dict, dense_flops: int) -> dict:
    """The Torch-Pruning model's filters, neurons and FLOP, counted on the model as it runs."""
    macs = layer_macs(model, example)
    return {"filters": [model.conv1.out_channels, model.conv2.out_channels],
            "conv2_channels_read": model.conv2.in_channels, "fc1": model.fc1.out_features,
            "macs": macs, "flop_per_layer": {k: macs[k] / dense_macs[k] for k in macs},
            "flop": [macs["conv1"] / dense_macs["conv1"], macs["conv2"] / dense_macs["conv2"]],
            "flop_total": total_flops(model, example) / dense_flops}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dense, dm, recipe = load_dense(args.dense, args.rows)
    splits = load_splits(recipe)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "torch_pruning.json"
    command = f"python {SCRIPT} " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.time_only:
        res = json.loads(json_path.read_text())
        res["timing_command"] = command
    else:
        res = {"benchmark": "Torch-Pruning (DepGraph, group-L1 magnitude, one shot) vs SSL, MNIST LeNet",
               "command": command, "torch_pruning_version": importlib.metadata.version("torch-pruning"),
               "dense": {"run": args.dense, "recipe": dm["recipe"], "command": dm["command"],
                         "test_error": evaluate(dense, splits["test"], 1000), "val_error": evaluate(dense, splits["val"], 1000),
                         "dense_phase_of": ", ".join(row_recipe_path(row_metrics(r)) for r in args.rows)},
               "rows": train_rows(args, splits, dense)}
    res["machine"] = machine_info(1)
    res["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    res["timed_variant"] = "ft"
    models, example = {}, torch.zeros(1, 1, 28, 28)
    dense_macs, dense_flops = layer_macs(dense, example), total_flops(dense, example)
    for row, r in res["rows"].items():
        r["ours"] = ours_record(row, example, dense_flops)
        models[row] = lenet_from_state(load_file(ROOT / r["variants"][res["timed_variant"]]["weights"])).eval()
        r["torch_pruning"] = peer_record(models[row], example, dense_macs, dense_flops)
    res["dense_macs"] = dense_macs
    res["timing"] = timing(list(res["rows"]), dense, models, args.repeats, args.warmup)
    json_path.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    md = markdown(res)
    (out_dir / "torch_pruning.md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
