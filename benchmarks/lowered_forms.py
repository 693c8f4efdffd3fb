"""The forms of LoweredConv2d on the AlexNet Table 4 layers (SSL row 2), against dense conv2d.

Per layer and batch size: dense ``F.conv2d`` and each form of the same compact layer (positions, columns, the
GEMM by filters, image by image, oneDNN's GEMM; see :mod:`structsparse.compaction.kernels`), timed in
interleaved repetitions on one thread after a warm-up (``--device cuda``: on the GPU). Prints each form's
speedup over conv2d (ratio of medians), which form ``LoweredConv2d`` picks by its rule, and the layer as compact
models run it (the forms timed once on the first call, the fastest kept unless the rule's is within 10% of it)
with the form it kept.

    .venv/bin/python benchmarks/lowered_forms.py [--repeats 30] [--batch 1,64]
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from structsparse.compaction import kernels  # noqa: E402
from structsparse.paper import ALEXNET, PAPER_TABLE4  # noqa: E402
from structsparse.speed.layer_bench import _GroupedCompact, sparse_conv_weight  # noqa: E402
from structsparse.timing import machine_info  # noqa: E402


def forced(module, x, form: str):
    """``module(x)`` in one form, whatever the rule or timing would pick."""
    h, w = x.shape[2:]
    return module._form(form, x, h, w, *module.output_size(h, w))


def rounds(fns, repeats: int, warmup: int = 3, device: str = "cpu") -> list[list[float]]:
    """Seconds per call of each function, interleaved, the order reversed every other round (on CUDA each call
    synchronised before and after: its latency, launches included)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = [[] for _ in fns]
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns:
                f()
        for r in range(repeats):
            for i, f in (list(enumerate(fns)) if r % 2 else list(enumerate(fns))[::-1]):
                sync()
                t = time.perf_counter()
                f()
                sync()
                times[i].append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=30, help="interleaved rounds at batch 1 (a third at larger)")
    p.add_argument("--batch", default="1,64", help="batch sizes, comma-separated")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: every form timed there (its 'onednn' is then cuDNN's 1×1 conv); no form is timed by "
                        "the layer itself there, so 'timing kept' is '?'")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    row = PAPER_TABLE4[2]
    dev = args.device
    forms = kernels.forms(torch.empty(0, device=dev))
    print(f"| layer | batch | positions × K' | rule picks | {' | '.join(forms)} | timing kept | its speedup |")
    print("|---|---|---|---|" + "---|" * len(forms) + "---|---|")
    for li in range(1, 5):
        shape = ALEXNET[li]
        w = sparse_conv_weight(shape, 1, row["row"][li], row["column"][li], seed=li)
        b = torch.randn(shape.out_channels)
        m = _GroupedCompact(w, b, shape, 1).parts[0].to(dev)
        w, b = w.to(dev), b.to(dev)
        out = (shape.in_size + 2 * shape.padding - shape.kernel) // shape.stride + 1
        entries = out * out * m.weight.shape[1]
        for batch in (int(v) for v in args.batch.split(",")):
            x = torch.rand(batch, shape.in_channels, shape.in_size, shape.in_size, device=dev)
            fns = [lambda: F.conv2d(x, w, b, shape.stride, shape.padding)]
            fns += [(lambda f: lambda: forced(m, x, f))(f) for f in forms] + [lambda: m(x)]
            t = rounds(fns, args.repeats if batch == 1 else max(5, args.repeats // 3), device=dev)
            med = [statistics.median(v) for v in t]
            names = m.form_names(x)
            kept = [v for k, v in m._choices.items() if k[0][0] == batch]  # an index into names
            timed = names[kept[0]] if kept else "?"
            speedups = " | ".join(f"{med[0] / v:.2f}" for v in med[1:-1])
            print(f"| {shape.name} | {batch} | {entries:,} | {names[0]} | {speedups} | {timed} | "
                  f"{med[0] / med[-1]:.2f} |", flush=True)
    m = machine_info()
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    where = torch.cuda.get_device_name(0) if dev == "cuda" else f"{m['cpu']}, 1 thread"
    print(f"\n{where}, torch {m['torch']}, {when}; "
          f"python benchmarks/lowered_forms.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
