"""The tables of ``results/mnist/README.md`` (between its ``<!-- table -->`` markers): our rows beside the
paper's, the measured speedups, the seed spreads and the provenance of every row."""
from __future__ import annotations

import os
from pathlib import Path

from structsparse.paper import PAPER_MNIST

from .mnist import ORDER, README, RESULTS
from .mnist_select import verdict
from .runs import ROOT, read_json, write_between_markers

CONVS, FCS = ("conv1", "conv2"), ("fc1", "fc2", "fc3")


def pct(v, digits=1):
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def compact_channels(r: dict) -> str:
    """Channels the compact model's convs really read, when they differ from the layers' own nonzero channels."""
    L, S = {l["name"]: l for l in r["layers"]}, r["compact_shapes"]
    own = [L[n]["channels_kept"] for n in CONVS]
    real = [S[n]["in_channels"] for n in CONVS]
    return "" if own == real else f" (compact: {real[0]}—{real[1]})"


def describe(r: dict) -> str:
    """A row's kept structures and FLOP in one line."""
    L = {l["name"]: l for l in r["layers"]}
    if r["paper"]["model"] == "lenet":
        c1, c2 = L["conv1"], L["conv2"]
        return (f"filters {c1['filters_kept']}—{c2['filters_kept']}, channels {c1['channels_kept']}—"
                f"{c2['channels_kept']}{compact_channels(r)}, filter size {c1['columns_kept']}—{c2['columns_kept']}, "
                f"FLOP {pct(c1['flop_fraction'])}—{pct(c2['flop_fraction'])}")
    return (f"neurons {'—'.join(map(str, r['neurons'] or []))}, FLOP "
            + "—".join(pct(L[n]["flop_fraction"], 2) for n in FCS))


def load_rows(results: Path = RESULTS) -> dict[str, dict]:
    """Every committed row's metrics, by name."""
    rows = {}
    for p in sorted(results.glob("*/metrics.json")):
        r = read_json(p)
        rows[r["name"]] = r
    return rows


def _two(layers, key, fmt=str):
    return "—".join(fmt(layers[n][key]) for n in CONVS)


def _fc(layers, key):
    return "—".join(pct(layers[n][key], 2) for n in FCS)


def _paper_pair(p, key, fmt=str):
    return f"{fmt(p[key][0])}—{fmt(p[key][1])}"


def table_specs() -> list:
    """Per table: (title, columns after "test error", rows, the paper's cells, our cells from (metrics, layers))."""
    return [
        ("LeNet, filter-wise + channel-wise (conv1—conv2)",
         ["filters kept", "channels kept", "FLOP (paper's, per layer)", "FLOP after compact"], ("lenet1", "lenet2", "lenet3"),
         lambda p: [_paper_pair(p, "filters"), _paper_pair(p, "channels"), _paper_pair(p, "flop", pct), ""],
         lambda r, L: [_two(L, "filters_kept"), _two(L, "channels_kept") + compact_channels(r),
                       _two(L, "flop_fraction", pct), _two(L, "compact_flop_fraction", pct)]),
        ("LeNet, filter shapes (filter size = kept weights per filter; conv1—conv2)",
         ["filter size", "filters kept", "channels kept", "FLOP (paper's, per layer)", "FLOP after compact"],
         ("lenet1", "lenet4", "lenet5"),
         lambda p: [_paper_pair(p, "filter_size"), "", _paper_pair(p, "channels"), _paper_pair(p, "flop", pct), ""],
         lambda r, L: [_two(L, "columns_kept"), _two(L, "filters_kept"), _two(L, "channels_kept") + compact_channels(r),
                       _two(L, "flop_fraction", pct), _two(L, "compact_flop_fraction", pct)]),
        ("MLP 784-500-300-10 (neurons: input pixels—hidden 1—hidden 2—output; FLOP fc1—fc2—fc3)",
         ["neurons", "FLOP (paper's, per layer)", "FLOP after compact"], ("mlp1", "mlp2", "mlp3"),
         lambda p: ["—".join(map(str, p["neurons"])), "—".join(pct(f, 2) for f in p["flop"]), ""],
         lambda r, L: ["—".join(map(str, r["neurons"] or [])), _fc(L, "flop_fraction"), _fc(L, "compact_flop_fraction")]),
    ]


def comparison_tables(rows: dict, link: str) -> list[str]:
    """Markdown lines: per table of :func:`table_specs`, the paper's row and ours (linked as ``link<row>/``)."""
    out = []
    for title, columns, names, paper_cells, our_cells in table_specs():
        header = ["row", "", "test error", *columns, "val error", "target (error and FLOP per layer ≤ paper)", "source"]
        out += ([""] if out else []) + [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names:
            p = PAPER_MNIST[name]
            cells = [p["paper_row"], "paper", pct(p["error"], 2 if name.startswith("mlp") else 1), *paper_cells(p),
                     "", "", ""]
            out.append("| " + " | ".join(cells) + " |")
            r = rows.get(name)
            if r is None:
                cells = [p["paper_row"], "**ours**", "not done"] + [""] * (len(header) - 3)
            else:
                L = {l["name"]: l for l in r["layers"]}
                cells = [p["paper_row"], "**ours**", f"**{pct(r['test_error'], 2)}**", *our_cells(r, L),
                         pct(r["val_error"], 2), verdict(name, r["test_error"], r["layers"]),
                         f"[{r['name']}]({link}{r['name']}/metrics.json)"]
            out.append("| " + " | ".join(cells) + " |")
    return out


def provenance_table(rows: dict) -> list[str]:
    """Markdown lines: each row's command, machine, date, training time and selection."""
    out = ["", "### Provenance of each of our rows", "",
           "| row | command | machine | date (UTC) | training time | selection |", "|---|---|---|---|---|---|"]
    for name in ORDER:
        r = rows.get(name)
        if r is None:
            continue
        mc = r["machine"]
        machine = f"{mc.get('cpu')}, {mc.get('threads')} threads, torch {mc.get('torch')}"
        n = len(r["selection"]["candidates"])
        sel = ("1 run, no selection" if n == 1 else
               f"chosen among {n} runs by validation error and structure (rule below; metrics.json `selection`)")
        if "final" in r["selection"]:
            sel += "; then trained on train + val (the command shown)"
        out.append(f"| {r['paper_row']} | `{r['command']}` | {machine} | {r['date']} | {r['train_seconds']:.0f} s | {sel} |")
    return out


def speed_table(rows: dict, results: Path = RESULTS, link: str = "") -> list[str]:
    """Markdown lines: each row's measured speedup (compact vs trained model): from
    ``<row>/bench/model.json`` (``structsparse bench model``) where present, else the run's ``speed``."""
    where = results.relative_to(ROOT).as_posix() if results.is_relative_to(ROOT) else results
    out = ["", "### Measured speedup of our compact models (compact vs the trained model before compaction)", "",
           "One thread, medians of interleaved, warmed-up repetitions, on the machine of the provenance table. "
           f"Source \"bench\": `structsparse bench model runs/mnist/<final run> --out {where}/<row>/bench` "
           f"on the otherwise idle machine (`{link}<row>/bench/model.md` has the date and the quartiles); \"in run\": "
           "measured at the end of the run (`measure` in its recipe), often with a second run on the other "
           "core. Per layer: that layer's forward alone. The paper's column: its CPU speedup per conv layer "
           "(lowered GEMM only, batch 1).", "",
           "| row | layers | paper, batch 1 (GEMM) | ours, batch 1 | ours, batch 64 | whole model, batch 1 / 64 | source |",
           "|---|---|---|---|---|---|---|"]
    for name in ORDER:
        r = rows.get(name)
        bench = results / name / "bench" / "model.json"
        speed = read_json(bench)["speed"] if bench.is_file() else (r or {}).get("speed")
        if r is None or not speed:
            continue
        sp = {(x["scope"], x["batch"]): x["speedup"] for x in speed["rows"]}
        names = CONVS if r["paper"]["model"] == "lenet" else FCS

        def per_layer(batch):
            return "—".join(f"{sp[(n, batch)]:.2f}×" if (n, batch) in sp else "removed" for n in names)
        paper = "—".join(f"{v:.2f}×" for v in PAPER_MNIST[name].get("speedup", [])) or "–"
        whole = " / ".join(f"{sp[('model', b)]:.2f}×" for b in (1, 64) if ("model", b) in sp)
        out.append(f"| {r['paper_row']} | {'—'.join(names)} | {paper} | {per_layer(1)} | {per_layer(64)} | {whole} | "
                   f"{'bench' if bench.is_file() else 'in run'} |")
    return out


def _spread_cell(d, digits=1):
    return f"{pct(d['mean'], digits)} ({pct(d['min'], digits)}–{pct(d['max'], digits)})"


def seed_row(r: dict) -> str:
    """One row of the seeds table."""
    s, runs = r["seeds"]["summary"], r["seeds"]["runs"]
    lenet = r["paper"]["model"] == "lenet"
    names, digits = (CONVS, 1) if lenet else (FCS, 2)
    te = s["test_error"]
    if lenet:
        kept = "; ".join(f"s{e['seed']}: {e['layers']['conv1']['filters_kept']}—{e['layers']['conv2']['filters_kept']} "
                         f"filters, {e['compact_shapes']['conv2']['in_channels'] if e.get('compact_shapes') else '?'}"
                         " conv2 channels read" for e in runs)
    else:
        kept = "; ".join(f"s{e['seed']}: {'—'.join(map(str, e['neurons'] or []))}" for e in runs)
    L = s["layers"]
    return " | ".join([
        f"| {r['paper_row']}", ", ".join(map(str, s["seeds"])),
        f"{pct(te['mean'], 2)} ± {100 * te['std']:.2f} ({pct(te['min'], 2)}–{pct(te['max'], 2)})",
        ", ".join(pct(e["test_error"], 2) for e in runs), kept,
        "—".join(_spread_cell(L[n]["flop_fraction"], digits) for n in names),
        "—".join(_spread_cell(L[n]["compact_flop_fraction"], digits) for n in names),
        _spread_cell(s["compact_flop_fraction"], 1)]) + " |"


def seeds_table(rows: dict) -> list[str]:
    """Markdown lines: the rows repeated with several seeds (``seeds`` in their metrics.json)."""
    done = [rows[n] for n in ORDER if n in rows and "seeds" in rows[n]]
    if not done:
        return []
    return ["", "### Spread over three seeds (seed 0 = our row above; the same recipe with only `seed` changed)", "",
            "Mean (min–max) over the seeds; test error also ± the sample standard deviation. Structures and FLOP "
            "per layer: conv1—conv2 for LeNet, fc1—fc2—fc3 for the MLP.", "",
            "| row | seeds | test error: mean ± std (min–max) | test error per seed | kept per seed | "
            "FLOP (paper's, per layer) | FLOP after compact, per layer | FLOP after compact, whole model |",
            "|---|---|---|---|---|---|---|---|"] + [seed_row(r) for r in done]


def tables(results: Path = RESULTS, readme: Path = README) -> str:
    """All the tables, as the README holds them (row links relative to ``readme``)."""
    rows = load_rows(results)
    link = Path(os.path.relpath(results, readme.parent)).as_posix() + "/"
    link = "" if link == "./" else link
    out = comparison_tables(rows, link) + speed_table(rows, results, link) + seeds_table(rows)
    return "\n".join(out + provenance_table(rows)) + "\n"


def write_tables(readme: Path = README, results: Path = RESULTS) -> None:
    write_between_markers(readme, tables(results, readme))
