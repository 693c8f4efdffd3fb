"""The speed issue's GPU check, in one run: AlexNet Table 4 layers and whole compact models against dense, on CUDA.

    PYTHONPATH=. python3 benchmarks/gpu_speed.py --out DIR [--repeats 15]

1. ``alexnet_table4`` on ``cuda`` (rows 2 and 5, and ℓ1 row 1 as CSR; groups=1; batch 1 and 64), timed with CUDA
   events in interleaved repetitions (:func:`structsparse.timing.time_interleaved`).
2. The committed compact models (``results/mnist/main``, the LeNet rows by per-layer budget, the ResNet-20 latency
   budget) against their dense architecture with random weights (speed does not depend on the values), by
   :func:`structsparse.measure_speedup` on ``cuda`` at batch 1, 64 and 1024.

Writes ``gpu_speed.json`` and ``gpu_speed.md`` into ``--out``. Each part is tried on its own: a failure is written
down and the next part runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structsparse import load_compact, measure_speedup  # noqa: E402
from structsparse.speed.layer_bench import alexnet_table4, table4_markdown  # noqa: E402
from structsparse.timing import machine_info  # noqa: E402
from structsparse.zoo.models import build_model  # noqa: E402

MODELS = ["results/mnist/main", *(f"results/mnist/budget_rows_held/lenet{n}" for n in (2, 3, 4, 5)),
          "results/fmnist/latency50"]


def whole_models(repeats: int, batches: tuple[int, ...]) -> tuple[list[dict], list[str]]:
    """Each committed compact model against its dense architecture: the rows, and their tables in markdown."""
    rows, md = [], []
    for run in MODELS:
        metrics = json.loads((Path(run) / "metrics.json").read_text())
        dense = build_model(metrics["model"], **metrics.get("model_args", {})).cuda().eval()
        compact = load_compact(Path(run) / "compact").cuda().eval()
        shape = json.loads((Path(run) / "compact" / "architecture.json").read_text())["input_shape"]
        report = measure_speedup(dense, compact, torch.zeros(1, *shape, device="cuda"), batch_sizes=batches,
                                 repeats=repeats, warmup=5, layers=False, same_forms=False)
        md += [f"### {run}", "", report.to_markdown(), ""]
        for r in report.rows:
            rows.append({"run": run, **r})
            print(json.dumps(rows[-1], default=str), flush=True)
    return rows, md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_speed: no CUDA device here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine_info(), "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "command": "python3 benchmarks/gpu_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    md = [f"GPU check on {result['gpu']}, torch {result['torch']}, {when}", ""]
    try:
        t4 = alexnet_table4(rows=(2, 5, 1), batch_sizes=(1, 64), threads=(1,), groups=("1",), repeats=args.repeats,
                            warmup=3, device="cuda", progress=lambda r: print(json.dumps(
                                {k: r[k] for k in ("row", "layer", "batch", "vs_conv2d", "vs_gemm")}), flush=True))
        result["alexnet_table4"] = t4
        md += [table4_markdown(t4), ""]
    except Exception:
        result["alexnet_table4_error"] = traceback.format_exc()
        print(result["alexnet_table4_error"], file=sys.stderr)
    (args.out / "gpu_speed.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        result["models"], tables = whole_models(args.repeats, (1, 64, 1024))
        md += tables
    except Exception:
        result["models_error"] = traceback.format_exc()
        print(result["models_error"], file=sys.stderr)
    (args.out / "gpu_speed.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "gpu_speed.md").write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
