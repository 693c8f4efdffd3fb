#!/usr/bin/env python
"""The paper's motivating contrast on MNIST: LeNet with unstructured (elementwise) ℓ1 sparsity.

Same start, schedule and protocol as our SSL LeNet 2 row (results/mnist/table/lenet2: its chosen
candidate's recipe on the 50k training images, then its final run on train + val), only the
regulariser differs:

1. start from the same dense LeNet (the ``dense`` phase of the row's recipes, recreated by
   ``structsparse run recipes/mnist/lenet_dense4.yaml --out runs/mnist/lenet_dense4``, and for the
   final run on train + val by ``recipes/mnist/lenet_dense4_final.yaml``);
2. ``l1`` phase = the row's ``ssl`` phase (8 epochs, lr 0.01, momentum 0.9, weight decay
   5e-4, same batches), but after each SGD step the elementwise ℓ1 proximal step
   w ← sign(w)·max(|w| − lr·λ, 0) on the weights of conv1, conv2 and fc1 (the layers SSL
   regularises), then the paper's zeroing of |w| < 1e-4. structsparse has no elementwise group
   kind for a conv (``filter2d`` of a conv is a whole 5×5 kernel; of a Linear it is one weight),
   so the step is written here;
3. ``finetune`` = the row's fine-tuning phase (6 epochs, lr 0.02 cosine), with every zero
   weight frozen at zero (:class:`structsparse.Masks` with elementwise masks).

``--train`` runs one λ (same λ for the three layers) per value on the 50k training images into
runs/mnist/peers/l1/. ``--refit`` picks one of them without looking at test error — the sparsest
in conv1+conv2 whose final validation error is within 0.2 points of our LeNet 2's chosen
candidate's (the slack of scripts/reproduce_mnist.py's rule) — and trains that λ again on train
+ val from the dense start on train + val, as the row's final run was. ``--assemble`` writes
results/mnist/peers/l1.json and l1.md: that final model's test error, per-layer sparsity (zero
weights; and how little of it is structure: all-zero filters and columns, and the FLOP left
after :func:`structsparse.compaction.surgery`), and the time of conv1/conv2 as the paper timed ℓ1 (im2col then CSR sparse × dense, ``torch.sparse.mm``) against dense
(PyTorch's ``conv2d``, and im2col + dense GEMM, the paper's baseline), beside our compact LeNet 2
layer, all in the same interleaved repetitions on one thread, batch 1 and 64::

    OMP_NUM_THREADS=1 python benchmarks/l1_lenet.py --train 1e-3 3e-3 1e-2
    OMP_NUM_THREADS=1 python benchmarks/l1_lenet.py --refit
    OMP_NUM_THREADS=1 python benchmarks/l1_lenet.py --assemble
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: experiments/
from experiments.mnist import PEERS, RESULTS, row_metrics, row_recipe_path  # noqa: E402
from experiments.peers import train_phase  # noqa: E402
from experiments.runs import ROOT, command_line  # noqa: E402

from structsparse import Masks, compact, load_compact, sparsity_report  # noqa: E402
from structsparse.runner.recipe import load_recipe  # noqa: E402
from structsparse.runner.trainer import evaluate, load_splits  # noqa: E402
from structsparse.speed.layer_bench import ConvShape, lowered_conv  # noqa: E402
from structsparse.timing import machine_info, time_interleaved  # noqa: E402
from structsparse.zoo.models import LeNet  # noqa: E402

LAYERS = ("conv1", "conv2", "fc1")
WORK = ROOT / "runs" / "mnist" / "peers" / "l1"
OUT = PEERS
ROW = "lenet2"   # the SSL row this peer is set beside (results/mnist/table/lenet2)
VAL_SLACK = 0.002
SCRIPT = "benchmarks/l1_lenet.py"
LENET_CONVS = (ConvShape("conv1", 1, 20, 5, 1, 0, 1, 28), ConvShape("conv2", 20, 50, 5, 1, 0, 1, 12))


def _tag(lam: float, final: bool = False) -> str:
    return f"lam{lam:g}" + ("_final" if final else "")


def candidates() -> list[dict]:
    """The λs trained on the 50k training images (``--train``)."""
    return [json.loads(p.read_text()) for p in sorted(WORK.glob("lam*.json")) if not p.stem.endswith("_final")]


def train(lam: float, dense_dir: Path, zero_below: float = 1e-4, final: bool = False) -> dict:
    recipe_path = ROOT / row_recipe_path(row_metrics(ROW), final)   # candidate's (50k) or final run's (train + val)
    recipe = load_recipe(recipe_path)
    ssl_index = next(i for i, p in enumerate(recipe.phases) if p.sparsifying)
    ft_index = len(recipe.phases) - 1
    l1_phase = dataclasses.replace(recipe.phases[ssl_index], name="l1", lambdas={})
    ft_phase = recipe.phases[ft_index]
    splits = load_splits(recipe)
    torch.manual_seed(recipe.seed)
    model = LeNet()
    model.load_state_dict(load_file(dense_dir / "trained.safetensors"))
    weights = [getattr(model, n).weight for n in LAYERS]

    @torch.no_grad()
    def prox(opt):
        step = opt.param_groups[0]["lr"] * lam
        for w in weights:
            w.copy_(w.sign() * (w.abs() - step).clamp_min_(0))
            w.masked_fill_(w.abs() < zero_below, 0.0)

    t0 = time.perf_counter()
    hist = train_phase(model, splits, recipe, ssl_index, l1_phase, after_step=prox)
    masks = Masks(model, {n: getattr(model, n).weight.ne(0) for n in LAYERS})
    hist += train_phase(model, splits, recipe, ft_index, ft_phase, after_step=lambda opt: masks.apply_())
    masks.detach()
    secs = time.perf_counter() - t0
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"{_tag(lam, final)}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    rec = {"lambda": lam, "recipe": str(recipe_path.relative_to(ROOT)), "train_with_val": recipe.train_with_val,
           "layers": list(LAYERS), "zero_below": zero_below, "weights": str(path.relative_to(ROOT)),
           "dense_start": str(dense_dir), "val_error": hist[-1]["val_error"], "history": hist,
           "train_seconds": secs, "phases": {"l1": {**dataclasses.asdict(l1_phase), "phase_index_for_shuffles": ssl_index},
                                             "finetune": {**dataclasses.asdict(ft_phase),
                                                          "phase_index_for_shuffles": ft_index}},
           "zero_fraction": {n: float(getattr(model, n).weight.eq(0).float().mean()) for n in LAYERS},
           "command": command_line(SCRIPT), "machine": machine_info(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    (WORK / f"{_tag(lam, final)}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"λ={lam:g}{' (train + val)' if final else ''}: val {100 * rec['val_error']:.2f}%, zeros "
          + ", ".join(f"{n} {100 * z:.1f}%" for n, z in rec["zero_fraction"].items()) + f" ({secs:.0f} s)", flush=True)
    return rec


def select(cands: list[dict], lenet2_val: float) -> dict:
    ok = [c for c in cands if c["val_error"] <= lenet2_val + VAL_SLACK + 1e-12]
    if not ok:
        raise SystemExit(f"no λ reached validation error within {100 * VAL_SLACK:.1f} points of LeNet 2's "
                         f"{100 * lenet2_val:.2f}%: " + ", ".join(f"{c['lambda']:g}: {100 * c['val_error']:.2f}%" for c in cands))

    def conv_zeros(c):
        return c["zero_fraction"]["conv1"] * 500 + c["zero_fraction"]["conv2"] * 25000
    return max(ok, key=lambda c: (conv_zeros(c), -c["val_error"]))


def layer_stats(model: LeNet) -> dict:
    out = {}
    for name in ("conv1", "conv2", "fc1", "fc2"):
        w = getattr(model, name).weight.detach()
        mat = w.flatten(1)
        nz = mat.ne(0)
        out[name] = {"weights": mat.numel(), "nonzero": int(nz.sum()), "sparsity": 1 - float(nz.float().mean()),
                     "zero_filters": int((~nz.any(1)).sum()), "filters": mat.shape[0],
                     "zero_columns": int((~nz.any(0)).sum()), "columns": mat.shape[1]}
        if w.dim() == 4:
            ch = w.ne(0).flatten(2).any(2).any(0)
            out[name].update({"zero_channels": int((~ch).sum()), "channels": w.shape[1]})
    return out


def time_convs(model: LeNet, ours, repeats: int, warmup: int, l1_small=None) -> list[dict]:
    """conv1/conv2 of the ℓ1 model: dense conv2d, im2col+GEMM, im2col+CSR, the ℓ1 model's own compacted
    layer (``l1_small``: :func:`structsparse.compaction.surgery` of it, which removes the filters ℓ1 zeroed whole); and
    our compact LeNet 2's layer."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    ours_mods = dict(ours.named_modules())
    l1_mods = dict(l1_small.named_modules()) if l1_small is not None else {}
    rows = []
    with torch.inference_mode():
        for shape in LENET_CONVS:
            conv = getattr(model, shape.name)
            w, bias = conv.weight.detach().contiguous(), conv.bias.detach().contiguous()
            gemm, csr = lowered_conv(w, bias, shape, 1, sparse=False), lowered_conv(w, bias, shape, 1, sparse=True)
            mine = ours_mods[shape.name]
            for b in (1, 64):
                x = torch.rand(b, shape.in_channels, shape.in_size, shape.in_size, generator=gen)
                xo = torch.rand(b, mine.in_channels, shape.in_size, shape.in_size, generator=gen)
                ref = torch.nn.functional.conv2d(x, w, bias)
                assert torch.allclose(csr(x), ref, atol=1e-4) and torch.allclose(gemm(x), ref, atol=1e-4)
                fns = {"conv2d": lambda: torch.nn.functional.conv2d(x, w, bias), "gemm": lambda: gemm(x),
                       "csr": lambda: csr(x), "ssl_compact": lambda: mine(xo)}
                if shape.name in l1_mods:
                    lm = l1_mods[shape.name]
                    xl = torch.rand(b, lm.in_channels, shape.in_size, shape.in_size, generator=gen)
                    fns["l1_compact"] = lambda: lm(xl)
                samples = time_interleaved(list(fns.values()), repeats, warmup)
                ms = {k: 1e3 * statistics.median(s) for k, s in zip(fns, samples)}
                q = {k: [1e3 * v for v in (statistics.quantiles(s, n=4)[0], statistics.quantiles(s, n=4)[2])]
                     for k, s in zip(fns, samples)}
                rows.append({"layer": shape.name, "batch": b, "ms": ms, "ms_q1_q3": q,
                             "csr_vs_conv2d": ms["conv2d"] / ms["csr"], "csr_vs_gemm": ms["gemm"] / ms["csr"],
                             "ssl_compact_vs_conv2d": ms["conv2d"] / ms["ssl_compact"],
                             "ssl_compact_vs_gemm": ms["gemm"] / ms["ssl_compact"],
                             "ssl_compact_shape": [mine.out_channels, mine.in_channels],
                             **({"l1_compact_vs_conv2d": ms["conv2d"] / ms["l1_compact"],
                                 "l1_compact_shape": [l1_mods[shape.name].out_channels, l1_mods[shape.name].in_channels]}
                                if "l1_compact" in ms else {})})
                print(f"{shape.name} batch {b}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()), flush=True)
    return rows


def markdown(res: dict) -> str:
    m = res["machine"]
    o = res["ssl_lenet2"]
    ch = res["chosen"]["lambda"]
    lines = ["# ℓ1 (unstructured) LeNet vs our SSL LeNet 2 (MNIST)", "",
             f"Command: `{res['command']}` (training: `python benchmarks/l1_lenet.py --train LAMBDA...`, one run "
             "per λ, then `--refit`)  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; timing on 1 thread, median of "
             f"{res['repeats']} interleaved repetitions  ", f"Date: {res['date']}", "",
             "Same dense start, schedule, batches and protocol as LeNet 2 (candidates on the 50k training images, "
             "chosen on validation, the chosen λ trained again on train + val; val error of the final model: its "
             "candidate's); elementwise ℓ1 (one λ on conv1, conv2, fc1; proximal "
             "step) instead of group Lasso. Chosen before looking at test error: " + res["selection_rule"], "",
             "| model | test error | val error | zero weights conv1—conv2—fc1 | zero filters conv1—conv2 | "
             "zero columns conv1—conv2 | FLOP after compact conv1—conv2 | whole model |",
             "|---|---|---|---|---|---|---|---|"]
    final = {**res["chosen"], "val_error": res["chosen"]["candidate_val_error"], "timing": res["timing"], "final": True}
    for c in sorted(res["candidates"], key=lambda c: c["lambda"]) + [final]:
        s = c["layers"]
        tag = (f"ℓ1, λ={c['lambda']:g}, final (train + val)" if c.get("final") else
               f"ℓ1, λ={c['lambda']:g}, candidate (50k)" + (" (chosen)" if c["lambda"] == ch else ""))
        lines.append(f"| {tag} | {'**' if c.get('final') else ''}{100 * c['test_error']:.2f}%"
                     f"{'**' if c.get('final') else ''} | {100 * c['val_error']:.2f}% | "
                     f"{100 * s['conv1']['sparsity']:.1f}%—{100 * s['conv2']['sparsity']:.1f}%—{100 * s['fc1']['sparsity']:.1f}% | "
                     f"{s['conv1']['zero_filters']}/20—{s['conv2']['zero_filters']}/50 | "
                     f"{s['conv1']['zero_columns']}/25—{s['conv2']['zero_columns']}/500 | "
                     f"{100 * c['compact_flop'][0]:.1f}%—{100 * c['compact_flop'][1]:.1f}% | {100 * c['compact_flop_total']:.1f}% |")
    sp = o["sparsity"]
    lines.append(f"| SSL LeNet 2 (ours) | **{100 * o['test_error']:.2f}%** | {100 * o['val_error']:.2f}% | "
                 f"{100 * sp['conv1']:.1f}%—{100 * sp['conv2']:.1f}%—{100 * sp['fc1']:.1f}% | "
                 f"{o['zero_filters'][0]}/20—{o['zero_filters'][1]}/50 | {o['zero_columns'][0]}/25—{o['zero_columns'][1]}/500 | "
                 f"{100 * o['compact_flop'][0]:.1f}%—{100 * o['compact_flop'][1]:.1f}% | {100 * o['compact_flop_total']:.1f}% |")
    lines += ["", "Time of one conv layer in ms (speedup against PyTorch's dense conv2d). ℓ1 CSR: the layer's weights as "
              "CSR after im2col (`torch.sparse.mm`, as the paper timed ℓ1); ℓ1 compact: `structsparse.compaction.surgery` of the ℓ1 "
              "model (keeps only its nonzero filters / read channels); SSL compact: our compact LeNet 2's layer. "
              "im2col + GEMM is the paper's dense baseline.", "",
              "| λ | layer | batch | dense conv2d | im2col + GEMM | ℓ1: im2col + CSR | ℓ1 compact | SSL compact |",
              "|---|---|---|---|---|---|---|---|"]
    for c in [final] + sorted(res["candidates"], key=lambda c: c["lambda"]):
        for r in c["timing"]:
            ms = r["ms"]
            f = lambda k: f"{ms[k]:.3f} ({ms['conv2d'] / ms[k]:.2f}×)" if k in ms else "–"  # noqa: E731
            lines.append(f"| {c['lambda']:g}{' final' if c.get('final') else ''} | {r['layer']} | {r['batch']} | "
                         f"{ms['conv2d']:.3f} | {f('gemm')} | {f('csr')} | "
                         f"{f('l1_compact')} ({r.get('l1_compact_shape', ['?', '?'])[0]} filters) | "
                         f"{f('ssl_compact')} ({r['ssl_compact_shape'][0]} filters) |")
    return "\n".join(lines) + "\n"


def chosen_lambda(cands: list[dict], row: dict) -> dict:
    """The λ :func:`select` picks among the trained ``cands`` (``--train``), beside the SSL ``row``'s metrics."""
    if not cands:
        raise SystemExit(f"no trained λ in {WORK}; run --train first")
    return select(cands, row["val_error"])


def compacted(model: LeNet, example: torch.Tensor) -> tuple:
    """``model``'s compacted copy and its sparsity report (as a dict)."""
    model.eval()
    with torch.no_grad():
        small = compact(model, example)
    return small, sparsity_report(model, example, compacted=small).to_dict()


def conv_flops(rep: dict) -> list[float]:
    """conv1's and conv2's FLOP fractions after compaction, from a sparsity report."""
    L = {l["name"]: l for l in rep["layers"]}
    return [L["conv1"]["compact_flop_fraction"], L["conv2"]["compact_flop_fraction"]]


def load_lenet(weights: str) -> LeNet:
    model = LeNet()
    model.load_state_dict(load_file(ROOT / weights))
    return model.eval()


def ssl_row(lenet2: dict) -> dict:
    """What the table shows of our LeNet 2 row: errors, zero weights, zero filters and columns, FLOP."""
    OL = {l["name"]: l for l in lenet2["layers"]}
    trained2 = ROOT / lenet2["selection"]["final"]["run"] / "trained.safetensors"
    if trained2.is_file():
        sd = load_file(trained2)
        sparsity = {n: float(sd[f"{n}.weight"].eq(0).float().mean()) for n in LAYERS}
    else:   # the run is gone: the kept parameters of the committed row
        sparsity = {n: 1 - OL[n]["params_kept"] / OL[n]["params"] for n in LAYERS}
    return {"result": f"{RESULTS.relative_to(ROOT).as_posix()}/{ROW}/metrics.json", "test_error": lenet2["test_error"],
            "val_error": lenet2["val_error"], "sparsity": sparsity,
            "zero_columns": [OL[n]["columns"] - OL[n]["columns_kept"] for n in ("conv1", "conv2")],
            "zero_filters": [OL[n]["filters"] - OL[n]["filters_kept"] for n in ("conv1", "conv2")],
            "compact_flop": [OL["conv1"]["compact_flop_fraction"], OL["conv2"]["compact_flop_fraction"]],
            "compact_flop_total": lenet2["compact_flop_fraction"]}


def time_candidates(cands: list[dict], splits, ours_model, args) -> None:
    """Every λ (after the choice): structure, compaction, test error, timing (added to its record)."""
    ex = splits["test"].images[:1]
    for c in cands:
        cm = load_lenet(c["weights"])
        cs, crep = compacted(cm, ex)
        c.update({"test_error": evaluate(cm, splits["test"], 1000), "layers": layer_stats(cm),
                  "compact_flop": conv_flops(crep), "compact_flop_total": crep["compact_flop_fraction"],
                  "timing": time_convs(cm, ours_model, args.repeats, args.warmup, cs)})


def assemble(args) -> dict:
    cands = candidates()
    lenet2 = row_metrics(ROW)
    chosen = chosen_lambda(cands, lenet2)
    final_json = WORK / f"{_tag(chosen['lambda'], final=True)}.json"
    if not final_json.is_file():
        raise SystemExit(f"{final_json} missing: run --refit first (the chosen λ on train + val)")
    final = json.loads(final_json.read_text())
    splits = load_splits(load_recipe(ROOT / row_recipe_path(lenet2, final=False)))   # the test images; the val images of the candidates
    model = load_lenet(final["weights"])
    small, rep = compacted(model, splits["test"].images[:1])
    err = evaluate(model, splits["test"], 1000)
    assert evaluate(small, splits["test"], 1000) == err
    ours_model = load_compact(RESULTS / ROW / "model").eval()
    res = {"benchmark": "elementwise ℓ1 LeNet vs SSL LeNet 2, MNIST",
           "command": command_line(SCRIPT), "machine": machine_info(1),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "repeats": args.repeats, "warmup": args.warmup,
           "selection_rule": f"among the trained λs, those whose final validation error is within {100 * VAL_SLACK:.1f} "
                             "points of our LeNet 2's chosen candidate's; of these, the one with the most zero "
                             "weights in conv1+conv2; then that λ trained on train + val (the final model). "
                             "Test error not used.",
           "candidates": [{k: c[k] for k in ("lambda", "val_error", "zero_fraction", "weights", "train_seconds",
                                             "command", "date")} for c in cands],
           "chosen": {**final, "candidate_val_error": chosen["val_error"], "test_error": err,
                      "test_wrong": round(err * len(splits["test"])),
                      "layers": layer_stats(model), "sparsity_report": rep, "compact_flop": conv_flops(rep),
                      "compact_flop_total": rep["compact_flop_fraction"]},
           "ssl_lenet2": ssl_row(lenet2)}
    res["timing"] = time_convs(model, ours_model, args.repeats, args.warmup, small)
    time_candidates(res["candidates"], splits, ours_model, args)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "l1.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    md = markdown(res)
    (OUT / "l1.md").write_text(md, encoding="utf-8")
    print(md)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", nargs="+", type=float, metavar="LAMBDA", help="train one model per λ")
    ap.add_argument("--refit", action="store_true", help="select among the trained λs, train it on train + val")
    ap.add_argument("--assemble", action="store_true", help="time the final model and the λs, write results")
    ap.add_argument("--dense", default="runs/mnist/lenet_dense4", help="run dir of recipes/mnist/lenet_dense4.yaml")
    ap.add_argument("--dense-final", default="runs/mnist/lenet_dense4_final",
                    help="run dir of recipes/mnist/lenet_dense4_final.yaml (the dense start on train + val)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args(argv)
    if not (args.train or args.refit or args.assemble):
        ap.error("pass --train LAMBDA..., --refit and/or --assemble")
    for lam in args.train or []:
        train(lam, ROOT / args.dense)
    if args.refit:
        train(chosen_lambda(candidates(), row_metrics(ROW))["lambda"], ROOT / args.dense_final, final=True)
    if args.assemble:
        assemble(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
