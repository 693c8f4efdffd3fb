"""Timing primitives: interleaved, warmed-up repetitions, their summary, and a stamp of the machine they
ran on. Every measurement times with these (:mod:`structsparse.speed`, and compaction when it chooses a
kernel by measuring); it imports only torch."""
from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Callable, Sequence

import torch

__all__ = ["time_interleaved", "summarize", "machine_info", "spread", "ratio_interval", "fastest", "pick_fastest"]

_FASTEST: dict[tuple, int] = {}  # fastest()'s choices in this process


def machine_info(measure_threads: int | None = None) -> dict:
    """Where a measurement ran: CPU model, cores, platform, torch version, threads, GPU, date (UTC), and
    the thread count the measurement pinned (``measure_threads``; ``None``: torch's setting at the time)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.lower().startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "measure_threads": measure_threads}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Sequence[Callable[[], object]], repeats: int = 30, warmup: int = 5,
                     device: torch.device | str = "cpu", min_time: float = 2e-3) -> list[list[float]]:
    """Seconds per call of each function, timed in interleaved rounds (order alternating).

    Each sample times enough back-to-back calls to last at least ``min_time`` seconds
    (calibrated during warm-up), so sub-millisecond calls are not swamped by timer noise.
    On CUDA, samples are measured with CUDA events.
    """
    device = torch.device(device)
    inner = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - t0, 1e-7)
        inner.append(max(1, int(min_time / once)))
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            if device.type == "cuda":  # CUDA events time the GPU's work, not the launch
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner[i]):
                    fns[i]()
                end.record()
                end.synchronize()
                samples[i].append(start.elapsed_time(end) / 1e3 / inner[i])
                continue
            t0 = time.perf_counter()
            for _ in range(inner[i]):
                fns[i]()
            samples[i].append((time.perf_counter() - t0) / inner[i])
    return samples


def summarize(samples: Sequence[float]) -> dict:
    """Median and quartiles of timing samples (seconds), in milliseconds."""
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
    return {"median_ms": 1e3 * statistics.median(samples), "q1_ms": 1e3 * q[0], "q3_ms": 1e3 * q[2]}


def spread(samples: Sequence[float]) -> float:
    """Run-to-run spread of timing samples: their interquartile range over their median."""
    q = summarize(samples)
    return (q["q3_ms"] - q["q1_ms"]) / q["median_ms"] if q["median_ms"] > 0 else 0.0


def ratio_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """A bootstrap confidence interval for median(a) / median(b) from paired samples (a[i] and b[i] timed in the
    same interleaved round): rounds are resampled with replacement, so what disturbed a round disturbs both."""
    if len(a) != len(b) or not a:
        raise ValueError("ratio_interval needs paired samples of equal, nonzero length")
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    idx = torch.randint(len(a), (resamples, len(a)), generator=torch.Generator().manual_seed(seed))
    ratios = ta[idx].quantile(0.5, dim=1) / tb[idx].quantile(0.5, dim=1)  # medians as statistics.median
    lo, hi = torch.quantile(ratios, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def fastest(key: tuple, forms: Sequence[Callable[[], object]], margin: float = 0.9) -> int:
    """:func:`pick_fastest` of ``forms`` (calls that compute the same values in different ways), timed once per
    ``key`` and thread count in this process and remembered. ``key`` names everything else the times depend on
    (the operation, its shapes, dtype and device); equal keys get the same choice, so two copies of a model
    compute the same values."""
    key = (*key, torch.get_num_threads())
    choice = _FASTEST.get(key)
    if choice is None:
        _FASTEST[key] = choice = pick_fastest(forms, margin)
    return choice


def pick_fastest(forms: Sequence[Callable[[], object]], margin: float = 0.9, repeats: int = 5,
                 device: torch.device | str = "cpu") -> int:
    """The index of the fastest of ``forms``, timed now on ``device`` (interleaved, medians of ``repeats``, no
    autograd): the first form unless another takes under ``margin`` of its time."""
    with torch.no_grad():
        times = [statistics.median(t) for t in time_interleaved(forms, repeats, warmup=1, device=device, min_time=5e-4)]
    best = min(range(len(forms)), key=times.__getitem__)
    return best if times[best] < margin * times[0] else 0
