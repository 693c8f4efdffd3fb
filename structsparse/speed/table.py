"""A per-layer latency table: what a compact model of a network will cost, in seconds, without timing it.

Built once for a network (:meth:`LatencyTable.build`): each Conv2d and Linear layer of the network compacted
with every structure kept -- the dense model in the forms compact models run -- is timed shrunk to a grid of
widths (:data:`GRID`); the whole model is timed with every structure kept and with a quarter of each layer's
filters kept (:data:`THIN`), and what the layers do not explain is the *rest* (activations, pooling, adds, the
calls themselves) at those two sizes. A compact model of the same network is then estimated layer by layer
from the table (by its multiply-adds, interpolated), plus the rest interpolated by the activation elements it
computes. A latency budget (``zero_to_budget_(..., latency=f)``, ``target: {latency: f}``) counts with it; it
is saved with a run and reused (:meth:`save`, :meth:`load`), so the budget does not move with the machine's
noise.
"""
from __future__ import annotations

import bisect
import copy
import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compaction import CollapseWarning, compact
from ..layers import fast_form
from ..report import count_macs
from ..sparsity import GroupLasso
from ..storage.files import atomic_write
from ..timing import time_interleaved

__all__ = ["LatencyTable", "GRID", "THIN", "MEASURABLE"]

GRID = (1.0, 0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05)  # the widths each layer is timed at, as fractions
THIN = 0.25  # the fraction of each layer's filters kept in the second whole-model timing
MEASURABLE = ("cpu", "cuda")  # the device types a latency table can be built on
VERSION = 1


@dataclass
class LatencyTable:
    """Seconds per call at batch ``batch`` on ``device`` with ``threads`` threads: per layer, ``[[multiply-adds,
    seconds], ...]``; ``rest``: ``[[activation elements, seconds], ...]``, the whole model's time outside those
    layers (each curve ascending, its seconds made non-decreasing); ``reference``: the dense model's measured
    time."""
    batch: int
    device: str
    threads: int
    torch: str
    layers: dict[str, list[list[float]]]
    rest: list[list[float]]
    reference: float
    input_shape: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ building

    @classmethod
    @torch.no_grad()
    def build(cls, model: nn.Module, example_input: torch.Tensor, batch: int = 1, threads: int | None = 1,
              repeats: int = 7) -> "LatencyTable":
        """Time ``model`` compacted with every structure kept (whole, and per layer at each width of
        :data:`GRID`) and with :data:`THIN` of each layer's filters kept (whole), on its own device at batch
        ``batch`` with ``threads`` intra-op threads (None: as set now)."""
        device = next(model.parameters()).device
        if device.type not in MEASURABLE:
            raise ValueError(f"latency: cannot time on device {device.type!r}; a latency table is built on "
                             f"{' or '.join(MEASURABLE)}")
        x = torch.rand((int(batch), *example_input.shape[1:]), device=device, dtype=example_input.dtype)
        dense, thin = _compacted_copies(model, example_input)
        old_threads = torch.get_num_threads()
        threads = int(threads or old_threads)
        torch.set_num_threads(threads)
        try:
            inputs = _leaf_inputs(dense, x)[0]
            modules = dict(dense.named_modules())
            layers = {name: _curve(modules[name], inputs[name], macs, repeats, device)
                      for name, macs in _leaf_macs(dense, x).items() if name in inputs}
            whole = [statistics.median(t) for t in time_interleaved([lambda: dense(x), lambda: thin(x)], repeats,
                                                                    device=device)]
        finally:
            torch.set_num_threads(old_threads)
        table = cls(int(batch), device.type, threads, torch.__version__, layers, [], whole[0],
                    list(example_input.shape[1:]))
        table.rest = _monotone([_leaf_inputs(m, x)[1], max(0.0, t - table.layer_seconds(m))]
                               for m, t in zip((dense, thin), whole))
        return table

    # ------------------------------------------------------------------ estimating

    def _input(self, compacted: nn.Module) -> torch.Tensor:
        device = next(iter(compacted.parameters()), torch.empty(0, device=self.device)).device
        return torch.rand((self.batch, *self.input_shape), device=device)

    @torch.no_grad()
    def layer_seconds(self, compacted: nn.Module) -> float:
        """The table's time of the Conv2d and Linear layers of ``compacted`` (a compact model of the table's
        network), each by its multiply-adds (interpolated; below its smallest point, that point's time: a layer's
        fixed cost stays); a layer the table lacks costs nothing here."""
        x = self._input(compacted)
        return sum(_interpolate(self.layers.get(name, []), macs) for name, macs in _leaf_macs(compacted, x).items())

    @torch.no_grad()
    def estimate(self, compacted: nn.Module) -> float:
        """Seconds per call of ``compacted`` (a compact model of the table's network) at the table's batch: its
        layers (:meth:`layer_seconds`) and the rest, by the activation elements it computes."""
        return self.layer_seconds(compacted) + _interpolate(self.rest, _leaf_inputs(compacted,
                                                                                    self._input(compacted))[1])

    def dense_seconds(self) -> float:
        """The dense model's estimate: every layer at full width and the rest at its largest (the measured
        :attr:`reference`, unless the layers timed alone took longer)."""
        return sum(points[-1][1] for points in self.layers.values()) + (self.rest[-1][1] if self.rest else 0.0)

    def fraction(self, compacted: nn.Module) -> float:
        """:meth:`estimate` as a fraction of :meth:`dense_seconds`."""
        dense = self.dense_seconds()
        return self.estimate(compacted) / dense if dense > 0 else 1.0

    def seconds_per_mac(self, name: str) -> float:
        """Layer ``name``'s time per multiply-add at full width (the mean over layers for one not in the table)."""
        rates = {n: p[-1][1] / max(p[-1][0], 1) for n, p in self.layers.items()}
        return rates.get(name, statistics.fmean(rates.values()) if rates else 0.0)

    def matches(self, batch: int, device: torch.device | str, threads: int) -> bool:
        """Whether the table was measured at ``batch`` on ``device``'s type with ``threads`` threads, by this torch."""
        return (self.batch, self.device, self.threads, self.torch) == (
            int(batch), torch.device(device).type, int(threads), torch.__version__)

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        return {"version": VERSION, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, d, where: str = "latency table") -> "LatencyTable":
        """A table from :meth:`to_dict`'s mapping; a bad entry is a ``ValueError`` naming ``where`` and the key."""
        def bad(key, what):
            return ValueError(f"{where}: {key}: {what}")
        if not isinstance(d, dict) or d.get("version") != VERSION:
            raise bad("version", f"expected a mapping of version {VERSION}")
        for key, kind in (("batch", int), ("threads", int), ("device", str), ("torch", str)):
            if not isinstance(d.get(key), kind) or isinstance(d.get(key), bool):
                raise bad(key, f"expected {kind.__name__}, got {d.get(key)!r}")
        if not _seconds(d.get("reference")):
            raise bad("reference", f"expected seconds >= 0, got {d.get('reference')!r}")
        shape, layers = d.get("input_shape"), d.get("layers")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n > 0 for n in shape):
            raise bad("input_shape", f"expected a list of positive ints, got {shape!r}")
        if not isinstance(layers, dict):
            raise bad("layers", "expected a mapping of layer names to [[multiply-adds, seconds], ...]")
        for key, points in [*((f"layers.{name}", p) for name, p in layers.items()), ("rest", d.get("rest"))]:
            ok = isinstance(points, list) and points and all(
                isinstance(p, list) and len(p) == 2 and _seconds(p[0]) and _seconds(p[1]) for p in points)
            if not ok or any(a[0] > b[0] for a, b in zip(points, points[1:])):
                raise bad(key, "expected [[count, seconds], ...] ascending, all >= 0")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def save(self, path: str | Path) -> None:
        atomic_write(Path(path), json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable latency table: {e}") from e
        return cls.from_dict(d, str(path))


def _seconds(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _interpolate(points: list[list[float]], v: float) -> float:
    """The seconds at ``v`` on a curve ``[[v, seconds], ...]`` (ascending): interpolated between its points, the
    smallest point's below it (a fixed cost stays), proportional above the largest; 0 for ``v`` <= 0."""
    if not points or v <= 0:
        return 0.0
    i = bisect.bisect_left([p[0] for p in points], v)
    if i == 0:
        return points[0][1]
    if i == len(points):
        return points[-1][1] * v / max(points[-1][0], 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (v - x0) / max(x1 - x0, 1e-12)


def _monotone(points) -> list[list[float]]:
    """``[[v, seconds], ...]`` sorted by v, one point per v, the seconds made non-decreasing."""
    out, top = [], 0.0
    for v, t in sorted(points):
        top = max(top, t)
        if out and out[-1][0] == v:
            out[-1][1] = top
        else:
            out.append([int(v), top])
    return out


@torch.no_grad()
def _compacted_copies(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """``model`` compacted with every structure kept (each zero weight of a copy set to a tiny nonzero value),
    and with only the first :data:`THIN` of each layer's filters kept."""
    dense = copy.deepcopy(model)
    for p in dense.parameters():
        p.masked_fill_(p == 0, 1e-6)
    thin = copy.deepcopy(dense)
    for fam in GroupLasso(thin, {"filter": 1.0}, example_input=x).families():
        mask = torch.ones(fam.norms().numel(), dtype=torch.bool, device=x.device)
        mask[:max(1, round(THIN * mask.numel()))] = False
        fam.zero(mask.view(fam.norms().shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CollapseWarning)
        return tuple(compact(m, x, check=False, channels_last=False).eval() for m in (dense, thin))


def _shrunk(m: nn.Module, x: torch.Tensor, f: float) -> tuple[nn.Module, torch.Tensor] | None:
    """A Conv2d or Linear like ``m`` with its input and output widths scaled by ``f`` (at least one channel per
    group), in the form compact models run it, and an input for it; None for other modules."""
    def scale(n: int) -> int:
        return max(1, round(n * f))
    if isinstance(m, nn.Conv2d):
        g = m.groups
        depthwise = g == m.in_channels == m.out_channels
        cin = scale(m.in_channels) if depthwise else g * scale(m.in_channels // g)
        cout = cin if depthwise else g * scale(m.out_channels // g)
        small = nn.Conv2d(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, cin if depthwise else g,
                          m.bias is not None, m.padding_mode, device=x.device, dtype=x.dtype)
        return fast_form(small).eval(), torch.rand((x.shape[0], cin, *x.shape[2:]), device=x.device, dtype=x.dtype)
    if isinstance(m, nn.Linear):
        small = nn.Linear(scale(m.in_features), scale(m.out_features), m.bias is not None, device=x.device,
                          dtype=x.dtype)
        return small.eval(), torch.rand((*x.shape[:-1], small.in_features), device=x.device, dtype=x.dtype)
    return None


def _curve(layer: nn.Module, x: torch.Tensor, macs: int, repeats: int, device: torch.device) -> list[list[float]]:
    """``[[multiply-adds, seconds], ...]`` of ``layer`` shrunk to each width of :data:`GRID` (just the layer as it
    is for a module other than Conv2d or Linear), ascending, the seconds made non-decreasing."""
    shrunk = [s for s in (_shrunk(layer, x, f) for f in GRID) if s is not None] or [(layer, x)]
    calls = [lambda m=m, xi=xi: m(xi) for m, xi in shrunk]
    times = [statistics.median(t) for t in time_interleaved(calls, repeats, device=device)]
    counts = [macs] if len(shrunk) == 1 else [count_macs(m, xi) for m, xi in shrunk]
    return _monotone(zip(counts, times))


def _leaf_inputs(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Each leaf module's (first) input on ``x``, and the elements all leaf modules output."""
    inputs, elements = {}, [0]

    def hook(args, out, name):
        if args and isinstance(args[0], torch.Tensor):
            inputs.setdefault(name, args[0])
        if isinstance(out, torch.Tensor):
            elements[0] += out.numel()
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: hook(a, o, n))
             for n, m in model.named_modules() if n and not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs, elements[0]


def _leaf_macs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Multiply-adds of each leaf module of ``model`` that does any, on ``x``."""
    leaves = {n for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    return {n: v for n, v in count_macs(model, x, per_module=True).items() if n in leaves and v > 0}
