#!/usr/bin/env python
"""Budget SSL against its peers on one protocol: ResNet-20 on Fashion-MNIST, shrunk to 50% and 25% of the
dense multiply-adds (issue 16).

Methods (each from the same dense weights, on the same images in the same order, for the same epochs):

* ``ssl``: ours. A phase with ``target: {flops: f}`` and no λ (the model-wide default groups, the λ-free
  starting strength and the controller), then fine-tuning with the zeros frozen; ``compact`` gives the model.
* ``tp``: Torch-Pruning 1.6.1's ``GroupNormPruner``: its group-norm regulariser during the sparse epochs
  (``pruner.regularize`` between backward and step), then pruning to the target, then fine-tuning.
* ``slim``: network slimming (Liu et al. 2017): ℓ1 on every BatchNorm γ during the sparse epochs, then
  pruning the channels of smallest |γ| (Torch-Pruning's ``BNScaleImportance``, global) to the target, then
  fine-tuning.
* ``oto``: OTO 3.0.1's HESSO optimizer during the sparse epochs, its target group sparsity chosen to land on
  the target, then its ``construct_subnet``, then fine-tuning. Needs its own environment (see ``--methods``).

Protocol: the dense start is a ``structsparse run recipes/fmnist/peers/resnet20b_dense.yaml`` (``--dense``); the data
are its recipe's (6k training, 2k validation, the 10k test images); the sparse phase (``--sparse-epochs``, lr 0.1,
momentum 0.9, weight decay 1e-4, constant lr) and the fine-tuning (``--tune-epochs``, lr 0.02, cosine) are
recipe phases trained by structsparse's ``Trainer`` for every method (a peer's regulariser and optimizer go in
through its hooks). Multiply-adds: ``torch.utils.flop_counter`` on the final model of each method; the test
error is read once, on the final model. Latency: every final model against the dense one, one thread, batch 1
and 64, interleaved repetitions, the ratio with its paired-bootstrap 95% interval.

``--seeds``: the same runs with other recipe seeds (the order of the images; the dense start stays the same).
Each (method, target, seed) writes ``WORK/<method>_<target>[_s<seed>]/`` (result.json, the final model), so an
interrupted benchmark goes on where it stopped; ``--assemble`` times the finished models and writes
OUT/peers.{json,md,png}::

    structsparse run recipes/fmnist/peers/resnet20b_dense.yaml --out runs/peers/dense --no-progress
    python benchmarks/peers_resnet20.py --methods ssl tp slim           # in an environment with torch-pruning
    python benchmarks/peers_resnet20.py --methods oto                   # in an environment with only_train_once
    python benchmarks/peers_resnet20.py --assemble --out results/fmnist/peers
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import itertools
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the repository root: experiments/
from experiments.peers import train_phase  # noqa: E402
from structsparse import compact, load_compact, save_compact  # noqa: E402
from structsparse.report import count_macs, count_params  # noqa: E402
from structsparse.runner.recipe import parse_recipe  # noqa: E402
from structsparse.runner.trainer import Trainer, evaluate, load_splits, load_weights  # noqa: E402
from structsparse.timing import machine_info, ratio_interval, time_interleaved  # noqa: E402
from structsparse.zoo.models import build_model  # noqa: E402

METHODS = ("ssl", "tp", "slim", "oto")
SSL_PHASE: dict = {}  # ours: more keys of the sparse phase (lambdas: none by default, a target phase's default)
LABELS = {"ssl": "budget SSL (ours)", "tp": "Torch-Pruning GroupNormPruner", "slim": "network slimming",
          "oto": "OTO HESSO"}


def label(rec: dict) -> str:
    """A run's method as the tables and the plot name it; ours with the groups that shrink, its cost weighting and
    whether it holds its zeros (a record without them is from before them: every group, λ unweighted, not held)."""
    if rec["method"] != "ssl":
        return LABELS[rec["method"]]
    weight = rec.get("cost_weight", 0.0)
    groups = "chosen groups" if rec.get("shrink", "all") == "chosen" else "every group"
    by_cost = "λ unweighted" if not weight else "λ × cost" if weight == 1 else f"λ × cost^{weight:g}"
    return f"{LABELS['ssl'][:-1]}, {groups}, {by_cost}{', zeros held' * rec.get('hold', False)})"


def protocol(dense_run: Path, sparse_epochs: int, tune_epochs: int, target: float | None = None,
             seed: int | None = None):
    """The recipe every method trains through: phase 0 the dense start (not trained here), phase 1 the sparse
    epochs (ours with ``target``), phase 2 the fine-tuning (ours with the zeros frozen); ``seed``: another order of
    the images than the dense recipe's."""
    base = json.loads((dense_run / "metrics.json").read_text())
    dense = yaml.safe_load(Path(base["recipe"]).read_text())
    if seed:
        dense["seed"] = seed
    sparse = {"name": "sparse", "epochs": sparse_epochs, "lr": 0.1, "weight_decay": 1e-4}
    if target is not None:
        sparse.update(target={"flops": target}, **SSL_PHASE)
    tune = {"name": "tune", "epochs": tune_epochs, "lr": 0.02, "weight_decay": 1e-4,
            "lr_schedule": {"kind": "cosine"}, "freeze": target is not None}
    dense.pop("init_from", None)
    return parse_recipe({**dense, "phases": [dense["phases"][0], sparse, tune]})


def dense_model(dense_run: Path, recipe) -> nn.Module:
    model = build_model(recipe.model, **recipe.model_args)
    load_weights(model, dense_run / "trained.safetensors")
    return model


HISTORY = ("phase", "epoch", "train_loss", "train_error", "val_error", "compact_flop_fraction", "budget_goal",
           "strength", "budget_reached")  # what result.json keeps of each epoch


def run_ssl(model, splits, recipe, log) -> tuple[nn.Module, list[dict]]:
    """Ours, as ``structsparse run`` trains a target phase and a frozen fine-tune."""
    trainer = Trainer(recipe, splits, model=model, checkpoint_dir=None, progress=False, log=log)
    trainer.run_phase(1)
    trainer.run_phase(2)
    return compact(trainer.model.eval(), splits["train"].images[:2]), trainer.history


def run_method(method: str, target: float, seed: int, args, splits, log) -> tuple[dict, nn.Module]:
    """Train one method to one target; returns its record and its final model."""
    recipe = protocol(args.dense, args.sparse_epochs, args.tune_epochs, target if method == "ssl" else None, seed)
    model = dense_model(args.dense, recipe)
    x = splits["train"].images[:1]
    t0 = time.perf_counter()
    if method == "ssl":
        final, history = run_ssl(model, splits, recipe, log)
    else:
        final, history = PEERS[method](model, splits, recipe, target, log)
    seconds = time.perf_counter() - t0
    final.eval()
    dense_macs = count_macs(dense_model(args.dense, recipe), x)
    macs = count_macs(final, x)
    ssl = recipe.phases[1]
    extra = {"cost_weight": ssl.cost_weight, "shrink": ssl.shrink, "hold": ssl.hold} if method == "ssl" else {}
    return {"method": method, **extra, "target": target, "seed": recipe.seed, "macs": macs, "dense_macs": dense_macs,
            "flop_fraction": macs / dense_macs, "params": count_params(final),
            "test_error": evaluate(final, splits["test"]), "val_error": evaluate(final, splits["val"]),
            "train_seconds": seconds, "epochs": {"sparse": args.sparse_epochs, "tune": args.tune_epochs},
            "versions": versions(method), "history": [{k: h[k] for k in HISTORY if k in h} for h in history]}, final


def versions(method: str) -> dict:
    out = {"torch": torch.__version__}
    package = {"tp": "torch-pruning", "slim": "torch-pruning", "oto": "only_train_once"}.get(method)
    if package:
        out[package] = importlib.metadata.version(package)
    return out


def _tp_pruner(method: str, model: nn.Module, x: torch.Tensor, ratio: float = 0.5):
    """Torch-Pruning's pruner of ``method`` with the package's own defaults (GroupNormPruner: group L2 importance,
    reg 1e-4; BNScalePruner: |γ| importance, reg 1e-5), global ranking, the classifier's outputs kept."""
    import torch_pruning as tp
    common = dict(global_pruning=True, pruning_ratio=ratio, ignored_layers=[model.fc])
    if method == "tp":
        return tp.pruner.GroupNormPruner(model, x, tp.importance.GroupMagnitudeImportance(p=2), **common)
    return tp.pruner.BNScalePruner(model, x, tp.importance.BNScaleImportance(), **common)


def _tp_prune_to(method: str, model: nn.Module, x: torch.Tensor, target: float, log, tries: int = 14) -> nn.Module:
    """One-shot global pruning of a copy of ``model`` at the largest channel ratio (by bisection) whose model does at
    most ``target`` of the multiply-adds of ``model``. Torch-Pruning prunes a share of channels, not of
    multiply-adds, and its multiply-adds need not fall monotonically with the ratio: the best try at or under the
    target is kept."""
    import copy
    dense = count_macs(model, x)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(tries):
        ratio = (lo + hi) / 2
        trial = copy.deepcopy(model)
        _tp_pruner(method, trial, x, ratio).step()
        macs = count_macs(trial, x)
        if macs <= target * dense:
            hi = ratio
            if best is None or macs > best[1]:
                best = (trial, macs, ratio)
        else:
            lo = ratio
    if best is None:
        raise RuntimeError(f"{method}: no pruning ratio up to 0.95 reaches {target:g} of the multiply-adds")
    log(f"pruned at channel ratio {best[2]:.4f}: {best[1] / dense:.4f} of the multiply-adds")
    return best[0]


def run_tp(method: str, model: nn.Module, splits, recipe, target: float, log) -> nn.Module:
    """Torch-Pruning's sparse training (its ``regularize`` between backward and step), pruning to the target,
    fine-tuning."""
    x = splits["train"].images[:1]
    pruner = _tp_pruner(method, model, x)
    history = train_phase(model, splits, recipe, 1, before_step=lambda opt: pruner.regularize(model), log=log)
    pruned = _tp_prune_to(method, model.eval(), x, target, log)
    return pruned, history + train_phase(pruned, splits, recipe, 2, log=log)


# OTO's target group sparsity (a fraction of its groups, not of the cost) for each FLOP target, from short
# calibration runs of HESSO on this model and data (ResNet-20 B, 448 groups: 0.6 of them gave 0.47-0.49 of the
# multiply-adds, 0.75 gave 0.25-0.36, 0.8 gave 0.20). OTO 3.0.1 cannot target FLOPs itself.
OTO_GROUP_SPARSITY = {0.5: 0.6, 0.25: 0.78}


def _oto_compat() -> None:
    """What only_train_once 3.0.1 needs on torch 2.13 and on a CPU: the two ``torch.onnx`` names it imports, which
    moved into ``torch.onnx._internal.torchscript_exporter``, and a CPU device for HESSO's masks (its
    ``identify_redundant_groups`` calls ``.cuda()``)."""
    import torch.onnx
    from torch.onnx._internal.torchscript_exporter import _globals, utils
    sys.modules.setdefault("torch.onnx._globals", _globals)
    if not hasattr(torch.onnx, "_optimize_graph"):
        torch.onnx._optimize_graph = utils._optimize_graph
    from only_train_once.optimizer.hesso import HESSO
    if getattr(HESSO, "_on_cpu", False):
        return
    original = HESSO.identify_redundant_groups

    def identify_redundant_groups(self):
        cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda t, *a, **k: t
        try:
            original(self)
        finally:
            torch.Tensor.cuda = cuda
        for g in self.param_groups:
            if "active_redundant_bool" in g and g["params"]:
                g["active_redundant_bool"] = g["active_redundant_bool"].to(g["params"][0].device)

    HESSO.identify_redundant_groups, HESSO._on_cpu = identify_redundant_groups, True


def run_oto(model: nn.Module, splits, recipe, target: float, log) -> nn.Module:
    """HESSO through the sparse epochs (pruning from the end of the first epoch over the next half of the phase, in
    3 periods; the group sparsity of :data:`OTO_GROUP_SPARSITY`), ``construct_subnet``, fine-tuning."""
    import tempfile
    _oto_compat()
    from only_train_once import OTO
    oto = OTO(model=model, dummy_input=splits["train"].images[:1])
    steps = len(splits["train"]) // recipe.batch_size
    sparse = recipe.phases[1]
    make = lambda phase: oto.hesso(  # noqa: E731
        variant="sgd", lr=phase.lr, weight_decay=phase.weight_decay, first_momentum=phase.momentum,
        target_group_sparsity=OTO_GROUP_SPARSITY[target], start_pruning_step=steps,
        pruning_periods=3, pruning_steps=max(3, steps * sparse.epochs // 2))
    model.train()
    history = train_phase(model, splits, recipe, 1, make_optimizer=make, log=log)
    with tempfile.TemporaryDirectory() as tmp:
        oto.construct_subnet(out_dir=tmp)   # prunes ``model`` in place (and pickles it into tmp)
    log(f"OTO: target group sparsity {OTO_GROUP_SPARSITY[target]}")
    return model, history + train_phase(model, splits, recipe, 2, log=log)


PEERS = {  # method -> (model, splits, recipe, target, log) -> the pruned model, fine-tuned, and its epochs
    "tp": lambda *a: run_tp("tp", *a),
    "slim": lambda *a: run_tp("slim", *a),
    "oto": run_oto,
}


def save_final(folder: Path, method: str, model: nn.Module) -> None:
    """Ours as a compact model (safetensors, checked on load); a peer's pruned module as it is (a pickle of this
    benchmark's own working folder, read back only by ``--assemble``)."""
    if method == "ssl":
        save_compact(model, folder / "model")
    else:
        torch.save(model, folder / "model.pt")


def load_final(folder: Path, method: str) -> nn.Module:
    if method == "ssl":
        return load_compact(folder / "model")
    return torch.load(folder / "model.pt", weights_only=False)  # written by run_method of this benchmark


def time_models(dense: nn.Module, models: dict[str, nn.Module], batch: int, repeats: int) -> dict:
    """Latency of each model against ``dense`` in the same interleaved rounds, one thread: the ratio of medians
    (dense / model: the speedup) with its paired-bootstrap 95% interval."""
    x = torch.randn(batch, 1, 28, 28)
    names = list(models)
    fns = [lambda m=m: m(x) for m in [dense, *models.values()]]
    with torch.no_grad():
        samples = time_interleaved(fns, repeats=repeats, warmup=3)
    base = samples[0]
    out = {}
    for name, s in zip(names, samples[1:]):
        lo, hi = ratio_interval(base, s)
        out[name] = {"ms": 1e3 * statistics.median(s), "dense_ms": 1e3 * statistics.median(base),
                     "speedup": statistics.median(base) / statistics.median(s), "speedup_ci": [lo, hi]}
    return out


def assemble(args) -> None:
    records = {}
    for folder in sorted(args.work.glob("*_*")):
        if (folder / "result.json").is_file():
            rec = json.loads((folder / "result.json").read_text())
            records[folder.name] = (rec, load_final(folder, rec["method"]).eval())
    if not records:
        raise SystemExit(f"{args.work}: no finished runs")
    recipe = protocol(args.dense, args.sparse_epochs, args.tune_epochs)
    dense = dense_model(args.dense, recipe).eval()
    torch.set_num_threads(1)
    speed = {b: time_models(dense, {k: m for k, (_, m) in records.items()}, b, args.repeats) for b in (1, 64)}
    rows = []
    for key, (rec, _) in records.items():
        rows.append({**rec, "latency": {str(b): speed[b][key] for b in speed}})
    rows.sort(key=lambda r: (-r["target"], METHODS.index(r["method"]), label(r), r.get("seed", 0)))
    splits = load_splits(recipe)
    out = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "machine": machine_info(1),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "dense": {"test_error": evaluate(dense, splits["test"]),
                     "macs": count_macs(dense, splits["test"].images[:1]), "params": count_params(dense)},
           "repeats": args.repeats, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out / "peers.md").write_text(markdown(out))
    plot(out, args.out / "peers.png")
    print(markdown(out))


def markdown(res: dict) -> str:
    d = res["dense"]
    lines = ["# ResNet-20 on Fashion-MNIST: budget SSL against its peers\n",
             f"`{res['command']}`, {res['machine'].get('cpu', '')}, {res['date']}. "
             "Dense start: "
             f"{100 * d['test_error']:.2f}% test error, {d['macs']:,} multiply-adds, {d['params']:,} parameters. "
             f"Speedup: dense / model, median of {res['repeats']} interleaved repetitions, one thread, with the 95% "
             "paired-bootstrap interval.\n",
             "| target | method | seed | test error | multiply-adds | params | speedup b1 | speedup b64 | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        sp = [r["latency"][b] for b in ("1", "64")]
        cells = [f"{s['speedup']:.2f}× [{s['speedup_ci'][0]:.2f}–{s['speedup_ci'][1]:.2f}]" for s in sp]
        lines.append(f"| {r['target']:.0%} | {label(r)} | {r.get('seed', 0)} | "
                     f"{100 * r['test_error']:.2f}% | {r['flop_fraction']:.1%} | {r['params']:,} | {cells[0]} | "
                     f"{cells[1]} | {r['train_seconds']:.0f} |")
    groups = _by_method(res["rows"])
    if any(len(errors) > 1 for errors in groups.values()):
        lines += ["\nOver the seeds: mean test error (lowest–highest).\n", "| target | method | runs | test error |",
                  "|---|---|---|---|"]
        lines += [f"| {t:.0%} | {m} | {len(e)} | {100 * statistics.mean(e):.2f}% ({100 * min(e):.2f}–"
                  f"{100 * max(e):.2f}%) |" for (t, m), e in groups.items()]
    return "\n".join(lines) + "\n"


def _by_method(rows: list[dict]) -> dict[tuple[float, str], list[float]]:
    """The test errors of each (target, method as :func:`label` names it), over its seeds."""
    out: dict[tuple[float, str], list[float]] = {}
    for r in rows:
        out.setdefault((r["target"], label(r)), []).append(r["test_error"])
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for i, name in enumerate(dict.fromkeys(label(r) for r in res["rows"])):
        rows = [r for r in res["rows"] if label(r) == name]
        err = [100 * r["test_error"] for r in rows]  # every run a point; the line joins the seed-0 runs
        first = [r for r in rows if not r.get("seed")]
        for ax, x in ((axes[0], lambda r: r["flop_fraction"]), (axes[1], lambda r: 1 / r["latency"]["64"]["speedup"])):
            ax.plot([x(r) for r in rows], err, "o", color=f"C{i}", label=name if ax is axes[0] else None)
            ax.plot([x(r) for r in first], [100 * r["test_error"] for r in first], "-", color=f"C{i}")
    for ax in axes:
        ax.axhline(100 * res["dense"]["test_error"], color="grey", ls=":", label="dense")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("multiply-adds kept (fraction of dense)")
    axes[1].set_xlabel("measured latency, batch 64 (fraction of dense)")
    axes[0].set_ylabel("test error (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", type=Path, default=Path("runs/peers/dense"), help="the dense start's run folder")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=["ssl", "tp", "slim"])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.25])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="recipe seeds (0: the dense recipe's)")
    ap.add_argument("--sparse-epochs", type=int, default=4)
    ap.add_argument("--tune-epochs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/peers_resnet20"))
    ap.add_argument("--assemble", action="store_true", help="time the finished models and write OUT")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("runs/peers_resnet20/results"))
    ap.add_argument("--ssl-lambdas", type=json.loads, default=None,
                    help="ours: the sparse phase's lambdas as JSON (default: none, the target phase's default)")
    ap.add_argument("--ssl-cost-weight", type=float, default=None,
                    help="ours: the sparse phase's cost_weight (default: the recipe default)")
    ap.add_argument("--ssl-shrink", choices=("chosen", "all"), default=None,
                    help="ours: the sparse phase's shrink (default: the recipe default)")
    ap.add_argument("--ssl-hold", choices=("true", "false"), default=None,
                    help="ours: the sparse phase's hold (default: the recipe default)")
    args = ap.parse_args()
    SSL_PHASE.update({k: v for k, v in (("lambdas", args.ssl_lambdas), ("cost_weight", args.ssl_cost_weight),
                                        ("shrink", args.ssl_shrink),
                                        ("hold", None if args.ssl_hold is None else args.ssl_hold == "true"))
                       if v is not None})
    if args.assemble:
        return assemble(args)
    splits = load_splits(protocol(args.dense, args.sparse_epochs, args.tune_epochs))
    for seed, target, method in itertools.product(args.seeds, args.targets, args.methods):
        folder = args.work / (f"{method}_{target:g}" + (f"_s{seed}" if seed else ""))
        if (folder / "result.json").is_file():
            print(f"{folder}: done before", flush=True)
            continue
        folder.mkdir(parents=True, exist_ok=True)
        log = lambda s, f=folder: print(f"[{f.name}] {s}", flush=True)  # noqa: E731
        rec, final = run_method(method, target, seed, args, splits, log)
        save_final(folder, method, final)
        (folder / "result.json").write_text(json.dumps(rec, indent=1) + "\n")
        log(f"test error {100 * rec['test_error']:.2f}%, {rec['flop_fraction']:.1%} of the multiply-adds")


if __name__ == "__main__":
    main()
