"""Compaction: a new, smaller, dense model whose eval-mode outputs equal the original's.

The model is read as a chain (see :mod:`structsparse.graph`) and cut into *segments*: a
producer (Conv2d or Linear), the channel-wise steps after it (BatchNorm, activations,
pooling, dropout, flatten), and the consumer that reads its channels. In each segment:

* a channel that the consumer never reads (its columns are all zero) is removed from the
  producer (its filter, bias and BatchNorm entries) and from the consumer;
* a channel whose producer filter is all zero carries a known value (the bias passed
  through the segment). Its contribution to the consumer is folded into the consumer's bias
  when it is the same at every output position (always for a Linear consumer; for a conv
  only where padding does not make it position-dependent); otherwise the channel stays;
* input features that a Linear (or the first conv) never reads are skipped by a gather
  right before it, so a compact MLP reads only the pixels it uses;
* convs whose remaining weight matrix has all-zero columns become :class:`LoweredConv2d`.

The result is checked against the original on ``example_input`` before it is returned.
"""
from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from .graph import CONV, DROPOUT, ELEMENTWISE, FLATTEN, LINEAR, NORM, POOL, WEIGHTED, Step, trace_chain
from .kernels import LoweredConv2d
from .timing import time_interleaved

__all__ = ["compact", "lower_conv", "CompactNet", "IndexSelect", "RTOL", "ATOL"]

RTOL, ATOL = 1e-4, 1e-5
_CHANNELWISE = (NORM, ELEMENTWISE, POOL, FLATTEN, DROPOUT)


class IndexSelect(nn.Module):
    """Keeps the entries ``index`` of dimension ``dim`` (the features a layer reads)."""

    def __init__(self, dim: int, index: torch.Tensor):
        super().__init__()
        self.dim = dim
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.index)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kept={self.index.numel()}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    *parents, leaf = name.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(leaf, module)


class CompactNet(nn.Module):
    """A chain of named steps, run in order. Shrunk modules keep their original names."""

    def __init__(self, steps: list[tuple[str, nn.Module]], input_shape: list[int] | None = None):
        super().__init__()
        self.input_shape = input_shape
        self.order = [name for name, _ in steps]
        registered = {}
        for name, module in steps:
            if name in registered:
                if registered[name] is not module:
                    raise ValueError(f"two different modules named {name!r}")
                continue
            _set_submodule(self, name, module)
            registered[name] = module
        self._steps = [registered[name] for name in self.order]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self._steps:
            x = step(x)
        return x

    def steps(self) -> list[tuple[str, nn.Module]]:
        return list(zip(self.order, self._steps))


# ---- slicing modules in place -------------------------------------------------------------

def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


def _slice_rows(m: nn.Module, keep: torch.Tensor) -> None:
    m.weight = _param(m.weight[keep], m.weight)
    if m.bias is not None:
        m.bias = _param(m.bias[keep], m.bias)
    if isinstance(m, nn.Conv2d):
        m.out_channels = keep.numel()
    else:
        m.out_features = keep.numel()


def _slice_cols(m: nn.Module, keep: torch.Tensor) -> None:
    m.weight = _param(m.weight[:, keep], m.weight)
    if isinstance(m, nn.Conv2d):
        m.in_channels = keep.numel()
    else:
        m.in_features = keep.numel()


def _slice_norm(m: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        p = getattr(m, name)
        if p is not None:
            setattr(m, name, _param(p[keep], p))
    for name in ("running_mean", "running_var"):
        b = getattr(m, name)
        if b is not None:
            setattr(m, name, b[keep].clone())
    m.num_features = keep.numel()


def _add_bias(m: nn.Module, delta: torch.Tensor) -> None:
    if not bool(delta.ne(0).any()):
        return
    if m.bias is None:
        m.bias = nn.Parameter(delta.detach().clone(), requires_grad=m.weight.requires_grad)
    else:
        with torch.no_grad():
            m.bias.add_(delta)


# ---- one segment -------------------------------------------------------------------------

def _column_usage(cons: nn.Module, channels: int, block: int) -> torch.Tensor:
    """True for every input channel (of ``block`` features each) that ``cons`` reads."""
    w = cons.weight.detach()
    if isinstance(cons, nn.Conv2d):
        return w.ne(0).any(dim=3).any(dim=2).any(dim=0)
    return w.ne(0).any(dim=0).view(channels, block).any(dim=1)


def _fold_conv(cons: nn.Conv2d, u: torch.Tensor, cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which candidate channels contribute a position-independent amount to ``cons``, and its sum."""
    idx = cand.nonzero().flatten()
    w = cons.weight.detach()[:, idx]  # N × D × M × K
    n, d = w.shape[:2]
    x, padding = u[:, idx], cons.padding
    if cons.padding_mode != "zeros":
        x, padding = F.pad(x, cons._reversed_padding_repeated_twice, mode=cons.padding_mode), 0
    # One grouped conv gives every candidate channel's contribution map separately.
    per = F.conv2d(x, w.transpose(0, 1).reshape(d * n, 1, *w.shape[2:]), None, cons.stride, padding,
                   cons.dilation, groups=d).view(d, n, -1)
    first = per[:, :, :1]
    tol = 1e-6 * first.abs().clamp_min(1.0)
    foldable = ((per - first).abs() <= tol).all(dim=2).all(dim=1)
    return _mask(cand, idx, foldable), first[foldable, :, 0].sum(dim=0)


def _mask(like: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(like)
    out[idx[values]] = True
    return out


def _expand(channels: torch.Tensor, block: int) -> torch.Tensor:
    """Feature indices of ``channels`` after flattening ``block`` features per channel."""
    return (channels[:, None] * block + torch.arange(block, device=channels.device)[None, :]).flatten()


def _constant_input(prod: Step) -> torch.Tensor:
    """The producer's output when every filter is zero: its bias at every position (batch 1)."""
    m = prod.module
    c = prod.out_shape[1]
    b = m.bias.detach() if m.bias is not None else torch.zeros(c, device=m.weight.device)
    return b.view(1, c, *([1] * (len(prod.out_shape) - 2))).expand(1, *prod.out_shape[1:]).clone()


def _remove_channels(steps: list[Step], p: int, q: int) -> None:
    """Remove the producer's channels that the consumer ignores or that fold into its bias."""
    prod, cons, ops = steps[p], steps[q], steps[p + 1:q]
    if any(op.role not in _CHANNELWISE for op in ops):
        return
    if any(getattr(s.module, "groups", 1) != 1 for s in (prod, cons)):
        return
    if prod.role == CONV and len(prod.out_shape) != 4 or prod.role == LINEAR and len(prod.out_shape) != 2:
        return
    if cons.role == CONV and len(cons.in_shape) != 4 or cons.role == LINEAR and len(cons.in_shape) != 2:
        return
    channels = prod.out_shape[1]
    features = cons.in_shape[1]
    block = features // channels
    flat_at = next((i for i, op in enumerate(ops) if op.role == FLATTEN), None)
    if cons.role == CONV and flat_at is not None or block * channels != features:
        return
    with torch.no_grad():
        read = _column_usage(cons.module, channels, block)
        zero_filter = prod.module.weight.detach().flatten(1).eq(0).all(dim=1)
        cand = zero_filter & read
        u = _constant_input(prod)
        for op in ops:
            u = op(u)
        if cons.role == LINEAR:
            foldable = cand
        else:
            foldable, _ = _fold_conv(cons.module, u, cand) if bool(cand.any()) else (cand, None)
        remove = ~read | foldable
        if bool(remove.all()):  # keep one channel so that every shape stays non-empty
            remove[0] = False
            foldable[0] = False
        if not bool(remove.any()):
            return
        keep = (~remove).nonzero().flatten()
        feat_keep = _expand(keep, block)
        # Fold the removed constant channels into the consumer's bias.
        if bool(foldable.any()):
            if cons.role == LINEAR:
                cols = _expand(foldable.nonzero().flatten(), block)
                delta = cons.module.weight.detach()[:, cols] @ u.reshape(-1)[cols]
            else:
                _, delta = _fold_conv(cons.module, u, foldable)
            _add_bias(cons.module, delta)
        _slice_rows(prod.module, keep)
        for i, op in enumerate(ops):
            if op.role == NORM:
                _slice_norm(op.module, keep if flat_at is None or i < flat_at else feat_keep)
        _slice_cols(cons.module, feat_keep if cons.role == LINEAR else keep)


def _gather_inputs(cons: Step, at_input: bool) -> torch.Tensor | None:
    """Features (Linear) or, at the model input, channels (conv) that ``cons`` never reads."""
    m = cons.module
    if cons.role == LINEAR and len(cons.in_shape) == 2:
        read = m.weight.detach().ne(0).any(dim=0)
    elif cons.role == CONV and at_input and m.groups == 1 and len(cons.in_shape) == 4:
        read = _column_usage(m, m.in_channels, 1)
    else:
        return None
    if bool(read.all()):
        return None
    if not bool(read.any()):
        read[0] = True
    keep = read.nonzero().flatten()
    with torch.no_grad():
        _slice_cols(m, keep)
    return keep


def lower_conv(m: nn.Module, lowered_below: float | str = 0.5,
               input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """``m`` as a :class:`LoweredConv2d` if it keeps at most ``lowered_below`` of its weight-matrix
    columns (and is a plain zero-padded, ungrouped Conv2d); otherwise ``m`` itself.

    With ``lowered_below="measure"``, both forms are timed on a random input of
    ``input_shape`` (interleaved, medians) and the faster one is returned.
    """
    if not isinstance(m, nn.Conv2d) or m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
        return m
    keep = m.weight.detach().flatten(1).ne(0).any(dim=0)
    kept = int(keep.sum())
    if kept == keep.numel():
        return m
    if lowered_below == "measure":
        if input_shape is None:
            raise ValueError("lowered_below='measure' needs the layer's input_shape")
        lowered = LoweredConv2d.from_conv(m, keep)
        x = torch.rand(input_shape, device=m.weight.device)
        with torch.inference_mode():
            dense_t, lowered_t = time_interleaved([lambda: m(x), lambda: lowered(x)], repeats=7, warmup=2,
                                                  device=m.weight.device)
        return lowered if statistics.median(lowered_t) < statistics.median(dense_t) else m
    if not isinstance(lowered_below, (int, float)) or isinstance(lowered_below, bool) or not 0 <= lowered_below <= 1:
        raise ValueError(f"lowered_below must be a fraction in [0, 1] or 'measure', got {lowered_below!r}")
    if kept > lowered_below * keep.numel():
        return m
    return LoweredConv2d.from_conv(m, keep)


def compact(model: nn.Module, example_input: torch.Tensor, *, lowered_below: float | str = 0.5,
            check: bool = True) -> CompactNet:
    """A new smaller dense model with the same eval-mode outputs as ``model`` (which is not changed).

    ``example_input`` (a batch of real or random inputs of the right shape) is used to
    trace shapes and to check the result. Convs keeping at most ``lowered_below`` of their
    weight-matrix columns become :class:`LoweredConv2d`; ``lowered_below="measure"`` instead
    times both forms of each such conv at the example input's size and keeps the faster. Modules keep their names.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compact expects an nn.Module, got {type(model).__name__}")
    work = copy.deepcopy(model).eval()
    steps = trace_chain(work, example_input)
    with torch.no_grad():
        reference = work(example_input)
    weighted = [i for i, s in enumerate(steps) if s.role in WEIGHTED]
    for p, q in zip(weighted, weighted[1:]):
        _remove_channels(steps, p, q)
    gathers = {}
    for j, q in enumerate(weighted):
        keep = _gather_inputs(steps[q], at_input=(j == 0))
        if keep is not None:
            gathers[q] = keep
    names = {s.name for s in steps}
    out: list[tuple[str, nn.Module]] = []
    for i, s in enumerate(steps):
        if i in gathers:
            name = f"{s.name}_inputs"
            while name in names:
                name += "_"
            names.add(name)
            out.append((name, IndexSelect(1, gathers[i])))
        out.append((s.name, lower_conv(s.module, lowered_below, s.in_shape)))
    net = CompactNet(out).eval()
    net.input_shape = list(example_input.shape[1:])  # one input, without the batch dimension
    if check:
        with torch.no_grad():
            got = net(example_input)
        if got.shape != reference.shape or not torch.allclose(got, reference, rtol=RTOL, atol=ATOL):
            diff = (got - reference).abs().max().item() if got.shape == reference.shape else "shape"
            raise RuntimeError(f"internal error: the compacted model differs from the original (max diff {diff}); "
                               "please report it with the model")
    return net
