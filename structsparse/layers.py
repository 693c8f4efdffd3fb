"""Small modules that residual graphs and their compact forms are made of.

``ChannelPad`` is the CIFAR ResNets' option-A shortcut (subsample, then put the channels
among zero channels); ``Add``, ``Cat``, ``Broadcast`` and ``Constant`` are the multi-input steps and the
folded constants of compact graphs. All are plain modules that torch.fx treats as leaves.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.utils._python_dispatch import _get_current_dispatch_mode

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling

from .timing import fastest

__all__ = ["ChannelPad", "Add", "Cat", "Broadcast", "Constant", "IndexSelect", "Param", "SelfAttention",
           "SlicedLayerNorm", "TiledMaxPool2d", "TunedConv2d", "WithinChannelLRN", "fast_form", "FAST_FORMS", "TUNE"]

# Whether compact models' layers choose among their exact forms by timing them (structsparse.timing.fastest).
# STRUCTSPARSE_TUNE=0 in the environment, or setting this to False, keeps each layer's default form.
TUNE = os.environ.get("STRUCTSPARSE_TUNE", "1") != "0"


def tunable(x: torch.Tensor) -> bool:
    """Whether a call on ``x`` may choose its form by timing: :data:`TUNE` is on, ``x`` is on the CPU, and
    nothing traces, compiles or watches the call (a dispatch mode, such as the FLOP counter, would count the
    timed calls too)."""
    return (TUNE and x.is_cpu and not (torch._C._is_tracing() or _is_compiling())
            and _get_current_dispatch_mode() is None)


def remembered_choice(module: nn.Module, x: torch.Tensor, choose: Callable[[], int]) -> int | None:
    """``choose()`` (a :func:`structsparse.timing.fastest` choice among ``module``'s forms for input ``x``),
    remembered in ``module`` per input shape, layout and thread count, so that a call costs one dict lookup; None
    (nothing remembered) while :data:`TUNE` is off, while compiling, and where a first call may not time (see
    :func:`tunable`)."""
    if not TUNE or _is_compiling():  # compiling: shapes may be symbolic
        return None
    memo = module.__dict__.get("_choices")
    if memo is None:
        memo = module.__dict__["_choices"] = {}
    state = (x.shape, x.is_contiguous(), torch.get_num_threads())
    choice = memo.get(state)
    if choice is None and tunable(x):
        choice = memo[state] = choose()
    return choice


class TunedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that, on CPU calls of fewer than :attr:`TUNE_BELOW` multiply-adds, times oneDNN's
    convolution against PyTorch's own (im2col and one GEMM; neither oneDNN nor NNPACK) once per input shape and
    thread count (:func:`structsparse.timing.fastest`) and runs PyTorch's own where it took under :attr:`MARGIN`
    of oneDNN's time. It switches oneDNN off for the call (a process-wide flag, put back after it), so convs
    running in other threads at that moment skip oneDNN too. oneDNN's fixed cost differs a lot
    between torch builds: about 130 µs a call on LeNet's compact convs in the CPU build the README installs,
    where PyTorch's own takes 28–40 µs; 28–230 µs on torchvision's small convs in torch 2.14.1+cu130, where it
    is mostly the faster (2-core Xeon VM, one thread). The two differ by float rounding only. Larger calls,
    other devices and tracing run ``nn.Conv2d`` itself. :func:`structsparse.compact` and
    :func:`structsparse.load_compact` put one in place of each plain conv.
    """

    TUNE_BELOW = 1 << 23
    MARGIN = 0.6  # PyTorch's own conv only where it took under this fraction of oneDNN's time: closer calls,
    # timed alone, did not hold up inside models (torchvision's zoo ran 3-6% slower with a margin of 0.9)
    saved_as = "Conv2d"  # save_compact writes the plain module; compact and load_compact choose this form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if remembered_choice(self, x, lambda: self._choose(x)):
            return self._native(x)
        return self._conv_forward(x, self.weight, self.bias)

    def _choose(self, x: torch.Tensor) -> int:
        """1 if PyTorch's own conv is the faster on ``x``, timed once per setting and shape; else 0."""
        sh, sw = self.stride  # multiply-adds: batch × output positions × weights
        if x.dim() != 4 or x.shape[0] * x.shape[2] * x.shape[3] * self.weight.numel() // (sh * sw) >= self.TUNE_BELOW:
            return 0
        key = ("conv2d", tuple(x.shape), x.is_contiguous(), x.dtype, tuple(self.weight.shape), self.stride,
               self.padding, self.dilation, self.groups, self.padding_mode, self.bias is not None)
        return fastest(key, (lambda: nn.Conv2d.forward(self, x), lambda: self._native(x)), margin=self.MARGIN)

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        mkldnn, nnpack = torch._C._get_mkldnn_enabled(), torch._C._get_nnpack_enabled()
        torch._C._set_mkldnn_enabled(False)
        torch._C._set_nnpack_enabled(False)
        try:
            return nn.Conv2d.forward(self, x)
        finally:
            torch._C._set_mkldnn_enabled(mkldnn)
            torch._C._set_nnpack_enabled(nnpack)


class TiledMaxPool2d(nn.MaxPool2d):
    """An ``nn.MaxPool2d`` whose windows tile the input (stride = kernel, no padding, dilation 1, floor
    mode), computed as the elementwise maximum of kernel-row and then kernel-column strided views: the
    same values as ``F.max_pool2d``, 4–7× faster than its CPU kernel on LeNet's pools at batch 64.
    Small inputs (under :attr:`SHIFTS_FROM` values, where the extra operations cost more) and other
    settings run ``nn.MaxPool2d`` itself. :func:`structsparse.compact` puts one in place of each such pool.
    """

    SHIFTS_FROM = 1 << 14
    saved_as = "MaxPool2d"  # save_compact writes the plain module; compact and load_compact choose this form

    @staticmethod
    def tiles(m: nn.Module) -> bool:
        """Whether ``m`` is an ``nn.MaxPool2d`` whose windows tile its input."""
        return (isinstance(m, nn.MaxPool2d) and _pair(m.kernel_size) == _pair(m.stride or m.kernel_size)
                and _pair(m.padding) == (0, 0) and _pair(m.dilation) == (1, 1) and not m.ceil_mode
                and not m.return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_compiling() or x.numel() < self.SHIFTS_FROM or x.dim() != 4 or torch.jit.is_tracing() \
                or not self.tiles(self):
            return super().forward(x)
        kh, kw = _pair(self.kernel_size)
        ho, wo = x.shape[2] // kh, x.shape[3] // kw
        x = x[:, :, :ho * kh, :wo * kw]
        rows = x[:, :, 0::kh]
        for r in range(1, kh):
            rows = torch.maximum(rows, x[:, :, r::kh])
        out = rows[:, :, :, 0::kw]
        for c in range(1, kw):
            out = torch.maximum(out, rows[:, :, :, c::kw])
        return out


FAST_FORMS = (TunedConv2d, TiledMaxPool2d)  # what fast_form makes; each is saved as its plain module (saved_as)


def fast_form(m: nn.Module) -> nn.Module:
    """``m`` as the faster module with the same values that compact models use: a plain ``nn.Conv2d`` as a
    :class:`TunedConv2d` (sharing ``m``'s parameters), a plain ``nn.MaxPool2d`` whose windows tile as a
    :class:`TiledMaxPool2d`; any other module as it is."""
    if type(m) is nn.Conv2d:
        tuned = TunedConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                            m.bias is not None, m.padding_mode, device="meta")
        tuned.weight, tuned.bias = m.weight, m.bias
        return tuned
    if type(m) is nn.MaxPool2d and TiledMaxPool2d.tiles(m):
        return TiledMaxPool2d(m.kernel_size, m.stride)
    return m


class ChannelPad(nn.Module):
    """``x[:, :, ::stride, ::stride]`` written into channels ``index`` of ``out_channels`` zero channels.

    ``ChannelPad.centered(in_channels, out_channels, stride)`` is the option-A shortcut of
    He et al.'s CIFAR ResNets (the input in the middle, zeros on both sides).
    """

    def __init__(self, out_channels: int, index: torch.Tensor | list[int], stride: int = 1):
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if out_channels < 1 or stride < 1:
            raise ValueError(f"ChannelPad needs out_channels >= 1 and stride >= 1, got {out_channels}, {stride}")
        self.out_channels, self.stride = int(out_channels), int(stride)
        self.register_buffer("index", index)

    @classmethod
    def centered(cls, in_channels: int, out_channels: int, stride: int = 1) -> "ChannelPad":
        before = (out_channels - in_channels) // 2
        return cls(out_channels, torch.arange(before, before + in_channels), stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        out = x.new_zeros(x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        return out.index_copy(1, self.index, x)

    def extra_repr(self) -> str:
        return f"{self.index.numel()} → {self.out_channels} channels, stride={self.stride}"


class Add(nn.Module):
    """The sum of its inputs (a residual add)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Broadcast(nn.Module):
    """``op(a, b)`` of two tensors of different shapes that broadcast (a squeeze-excite gate
    ``x * g`` with ``g`` of shape N × C × 1 × 1, say); ``op`` is ``mul``, ``add``, ``sub`` or ``truediv``."""

    OPS = {"mul": torch.mul, "add": torch.add, "sub": torch.sub, "truediv": torch.div}

    def __init__(self, op: str = "mul"):
        super().__init__()
        if op not in self.OPS:
            raise ValueError(f"Broadcast op must be one of {sorted(self.OPS)}, got {op!r}")
        self.op = op

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.OPS[self.op](a, b)

    def extra_repr(self) -> str:
        return self.op


class Cat(nn.Module):
    """Concatenation of its inputs along ``dim``."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = int(dim)

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class IndexSelect(nn.Module):
    """Keeps the entries ``index`` of dimension ``dim``, in that order: the features a layer reads, or a
    channel shuffle as the permutation it is."""

    def __init__(self, dim: int, index: torch.Tensor):
        super().__init__()
        self.dim = dim
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(self.dim, self.index)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kept={self.index.numel()}"


class Constant(nn.Module):
    """An input-independent tensor (one sample's worth, ``value``), repeated over the batch of its input."""

    def __init__(self, shape: list[int] | tuple[int, ...]):
        super().__init__()
        self.register_buffer("value", torch.zeros(tuple(shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value.expand(x.shape[0], *self.value.shape)

    def extra_repr(self) -> str:
        return f"shape={list(self.value.shape)}"


class SlicedLayerNorm(nn.LayerNorm):
    """A LayerNorm over the last dim from which constant entries were cut: it normalises its ``normalized_shape``
    entries as if the ``full_size - normalized_shape`` cut ones were still there, each with its constant value
    (``absent_sum`` and ``absent_sq`` are their sum and sum of squares). So removing channels that a LayerNorm
    normalises over, but that are constant (zero) wherever it reads them, changes nothing."""

    def __init__(self, normalized_shape: int | list[int], full_size: int, absent_sum: float = 0.0,
                 absent_sq: float = 0.0, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        super().__init__(normalized_shape, eps, elementwise_affine, bias=bias)
        if len(self.normalized_shape) != 1 or not 1 <= self.normalized_shape[0] <= int(full_size):
            raise ValueError(f"SlicedLayerNorm normalises one dim of at most full_size={full_size} entries, "
                             f"got normalized_shape={list(self.normalized_shape)}")
        self.full_size, self.absent_sum, self.absent_sq = int(full_size), float(absent_sum), float(absent_sq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, cut, s = self.full_size, self.full_size - x.shape[-1], self.absent_sum
        mean = x.sum(-1, keepdim=True).add_(s).div_(n)
        d = x - mean
        # n·var = Σ_kept (x - mean)² + Σ_cut (k - mean)², the second being Σk² - 2·mean·Σk + cut·mean²
        var = torch.linalg.vector_norm(d, dim=-1, keepdim=True).square_()
        var += mean * (cut * mean - 2 * s) + self.absent_sq
        y = d.mul_(var.div_(n).add_(self.eps).rsqrt_())
        if self.weight is None:
            return y if self.bias is None else y.add_(self.bias)
        return y.mul_(self.weight) if self.bias is None else torch.addcmul(self.bias, y, self.weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_size={self.full_size}"


class Param(nn.Module):
    """A model's parameter (or buffer) read as a tensor by its graph (a layer scale, a class token, a position
    embedding), without a batch dimension; the step's input only places it in the graph."""

    def __init__(self, value: torch.Tensor | list[int] | tuple[int, ...]):
        super().__init__()
        if isinstance(value, nn.Parameter):  # the model's own parameter, shared
            self.value = value
        elif isinstance(value, torch.Tensor):
            self.value = nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad)
        else:
            self.value = nn.Parameter(torch.zeros(tuple(value)))

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.value

    def extra_repr(self) -> str:
        return f"shape={list(self.value.shape)}"


class SelfAttention(nn.Module):
    """Multi-head self-attention of ``N × T × embed_dim`` tokens, each head ``head_dim`` wide: what
    ``nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)(x, x, x, need_weights=False)[0]`` computes
    (in eval mode), with the number of heads free, so that heads can be removed."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True):
        super().__init__()
        if min(embed_dim, num_heads, head_dim) < 1:
            raise ValueError(f"SelfAttention needs sizes >= 1, got {embed_dim}, {num_heads}, {head_dim}")
        self.embed_dim, self.num_heads, self.head_dim = int(embed_dim), int(num_heads), int(head_dim)
        self.qkv = nn.Linear(embed_dim, 3 * num_heads * head_dim, bias=bias)
        self.out = nn.Linear(num_heads * head_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "SelfAttention":
        att = cls(mha.embed_dim, mha.num_heads, mha.head_dim, bias=mha.in_proj_bias is not None)
        with torch.no_grad():
            att.qkv.weight.copy_(mha.in_proj_weight)
            att.out.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                att.qkv.bias.copy_(mha.in_proj_bias)
                att.out.bias.copy_(mha.out_proj.bias)
        return att

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(n, t, self.num_heads * self.head_dim))

    @property
    def bias(self) -> torch.Tensor | None:
        return self.qkv.bias

    def dead_heads(self) -> torch.Tensor:
        """True for each head whose output is zero whatever the input: its value rows (and biases) are zero,
        or the output columns that read it are."""
        d = self.head_dim
        v = self.qkv.weight.detach()[2 * self.num_heads * d:].view(self.num_heads, -1)
        if self.qkv.bias is not None:
            v = torch.cat([v, self.qkv.bias.detach()[2 * self.num_heads * d:].view(self.num_heads, d)], 1)
        out = self.out.weight.detach().view(self.embed_dim, self.num_heads, d).transpose(0, 1).reshape(self.num_heads, -1)
        return v.eq(0).all(1) | out.eq(0).all(1)

    @torch.no_grad()
    def keep_heads(self, keep: torch.Tensor) -> None:
        """Only the heads ``keep`` (a mask) stay; removed heads must be dead (see :meth:`dead_heads`)."""
        h, d = self.num_heads, self.head_dim
        rows = keep.view(1, h, 1).expand(3, h, d).reshape(-1)
        cols = keep.view(h, 1).expand(h, d).reshape(-1)
        self.qkv.weight = nn.Parameter(self.qkv.weight[rows].clone(), self.qkv.weight.requires_grad)
        if self.qkv.bias is not None:
            self.qkv.bias = nn.Parameter(self.qkv.bias[rows].clone(), self.qkv.bias.requires_grad)
        self.out.weight = nn.Parameter(self.out.weight[:, cols].clone(), self.out.weight.requires_grad)
        self.num_heads = int(keep.sum())
        self.qkv.out_features, self.out.in_features = 3 * self.num_heads * d, self.num_heads * d

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"


class WithinChannelLRN(nn.Module):
    """Caffe's ``LRN`` with ``norm_region: WITHIN_CHANNEL``: ``x / (1 + α·mean(x²))^β``.

    The mean is over the ``size × size`` spatial window around each position in the same
    channel, zero-padded, always divided by ``size²`` (Caffe computes it with an average
    pooling whose padding counts). Unlike ``nn.LocalResponseNorm`` (Caffe's
    ``ACROSS_CHANNELS``), it never mixes channels.
    """

    def __init__(self, size: int = 3, alpha: float = 5e-5, beta: float = 0.75):
        super().__init__()
        if size < 1 or size % 2 == 0:
            raise ValueError(f"WithinChannelLRN needs an odd size >= 1, got {size}")
        self.size, self.alpha, self.beta = int(size), float(alpha), float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_sq = F.avg_pool2d(x * x, self.size, 1, self.size // 2, count_include_pad=True)
        return x * (1 + self.alpha * mean_sq).pow(-self.beta)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha:g}, beta={self.beta:g}"
