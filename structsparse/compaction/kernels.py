"""The lowered convolution that removes filter-shape columns (shape-wise sparsity).

Caffe computes a conv as a GEMM of the weight matrix (N filters × C·M·K columns) with the
im2col buffer (C·M·K × output positions). When a column is zero in every filter, its row of
the im2col buffer is never needed. :class:`LoweredConv2d` keeps only the K' nonzero columns
and gathers only those K' rows straight from the (padded) input, then runs one dense GEMM.
Unfolding everything and then indexing would copy all C·M·K rows first and throw most of the
gain away.

Five forms of the gather and the GEMM, all exact (up to float rounding). On the CPU each layer times them at
each input shape and layout it meets, once, and keeps the fastest unless the rule's form is within 10% of it
(:func:`structsparse.timing.fastest`; off with ``STRUCTSPARSE_TUNE=0``); elsewhere the rule decides
(:meth:`LoweredConv2d._rule`):

* positions: every output position's K' entries, gathered with one flat index (positions × K') from the
  unpadded input as it lies (N × C × H × W, or channels-last, as a lowered conv's output is; the entries in
  the padding are then set to zero), then cols (N·positions × K') by Wᵀ, returned as a channels-last view.
  It is also the form used while tracing for export (there from the padded input: no data-dependent step);
* filters (the rule's at batch 1): the same gather, then W by cols (K' × positions) per image, N × C × H × W;
* oneDNN (the rule's at larger batches from :data:`ONEDNN_FROM` multiply-adds, on the CPU and on CUDA): the same
  gather, then the entries as a channels-last image of K' channels by a 1×1 conv, oneDNN's kernels (cuDNN's on
  CUDA);
* images (the rule's on the CPU at batches > 1 where the flat index is large, positions × K' over
  :data:`LARGE_INDEX_FROM`): the filters form image by image, each image gathered alone, so that the index is
  read while it is in the cache;
* columns: each kept column's im2col row is a strided window of one input channel, copied for the whole batch
  by one indexing of a strided view of the padded input (three K'-long indices), then W (N × K') by cols
  (K' × positions) per image, written in N × C × H × W order. It was the fastest form on AlexNet's conv2 until
  the forms above; now only timing picks it.

On AlexNet's conv3–conv5 (SSL row 2) at batch 1 the GEMM by filters ran at 1.11–1.25× the positions form's
speed, and at batch 64 oneDNN's at 1.09–1.48×; on conv2 (729 positions, 883 of 2400 columns kept, an index of
644k) the GEMM by filters ran at 1.14× the column form's speed at batch 1, and the images form at 1.14× the
fastest batched form's (oneDNN's) at batch 64 (``python benchmarks/lowered_forms.py --repeats 21``, 2-core Xeon
VM, one thread, 2026-12-04; results/speed/lowered_forms.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..layers import _is_compiling, remembered_choice
from ..timing import fastest

__all__ = ["LoweredConv2d", "LARGE_INDEX_FROM", "ONEDNN_FROM"]

# Above this many entries (positions × kept columns) of the positions form's flat gather index, the images
# form runs first at batches > 1 (see the module's docstring).
LARGE_INDEX_FROM = 1 << 18
# From this many multiply-adds a call (batch > 1, CPU), the positions form with oneDNN's GEMM runs first.
ONEDNN_FROM = 1 << 26


def _conv_gemm(x: torch.Tensor) -> bool:
    """Whether the GEMM as a 1×1 conv is a form for ``x``: oneDNN's on the CPU, cuDNN's on CUDA (on an H200 it
    was the fastest form at batch 64 on AlexNet's conv2, conv4 and conv5, results/speed/gpu)."""
    return (x.device.type == "cpu" and torch.backends.mkldnn.is_available()) or x.device.type == "cuda"


def forms(x: torch.Tensor) -> tuple[str, ...]:
    """The forms of :class:`LoweredConv2d` for input ``x``, in a fixed order (:meth:`LoweredConv2d.form_names`
    puts the rule's first)."""
    return ("positions", "columns", "filters", "images") + ("onednn",) * _conv_gemm(x)


def _take(rows: torch.Tensor, index: torch.Tensor, outside: torch.Tensor | None) -> torch.Tensor:
    """``rows`` (one image's entries, or a row of them per image) at ``index`` along the last dim, the entries
    listed in ``outside`` (those in the padding) zero."""
    cols = rows.index_select(rows.dim() - 1, index)
    return cols if outside is None else cols.index_fill_(rows.dim() - 1, outside, 0)


class LoweredConv2d(nn.Module):
    """A Conv2d restricted to the weight columns listed in ``columns``.

    ``columns`` holds flat indices into the C·M·K columns of the original weight, ordered
    as ``weight.reshape(N, -1)`` orders them. ``weight`` is N × K' (the kept columns).
    The module computes exactly what the original conv computes when every other column is
    zero. Only ``padding_mode='zeros'`` and ``groups=1`` are supported.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, columns: torch.Tensor,
                 stride=1, padding=0, dilation=1, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        columns = torch.as_tensor(columns, dtype=torch.long).flatten()
        total = in_channels * self.kernel_size[0] * self.kernel_size[1]
        if columns.numel() == 0 or int(columns.min()) < 0 or int(columns.max()) >= total:
            raise ValueError(f"columns must be a non-empty set of indices in [0, {total})")
        if columns.unique().numel() != columns.numel():
            raise ValueError("columns must not repeat")
        self.register_buffer("columns", columns)
        self.weight = nn.Parameter(torch.empty(out_channels, columns.numel()))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self._index_cache: dict = {}
        self._window_cache: tuple | None = None  # see _window_index
        self._columns_key: int | None = None  # see _tuning_key
        self._names: dict = {}  # see form_names

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, keep: torch.Tensor | None = None) -> "LoweredConv2d":
        """The lowered form of ``conv`` keeping the columns in boolean ``keep`` (default: nonzero ones)."""
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("LoweredConv2d needs groups=1, padding_mode='zeros' and numeric padding")
        w = conv.weight.detach().reshape(conv.out_channels, -1)
        if keep is None:
            keep = w.ne(0).any(dim=0)
        columns = keep.nonzero().flatten()
        if columns.numel() == 0:  # keep one column so that shapes stay valid
            columns = torch.zeros(1, dtype=torch.long)
        lowered = cls(conv.in_channels, conv.out_channels, conv.kernel_size, columns, conv.stride,
                      conv.padding, conv.dilation, bias=conv.bias is not None)
        with torch.no_grad():
            lowered.weight.copy_(w[:, columns])
            if conv.bias is not None:
                lowered.bias.copy_(conv.bias.detach())
        return lowered.to(conv.weight.device)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _gather_index(self, h: int, w: int, device: torch.device, channels_last: bool = False,
                      padded: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Flat index into an h × w input of every kept im2col entry, positions × K': into its C·H·W entries,
        or with ``channels_last`` its H·W·C; and the entries (of positions × K') that fall in the padding, which
        index entry 0 and are then to be set to zero (None where none do). With ``padded`` the input comes padded
        (h, w its size before), and nothing falls outside.

        Cached per input size and layout in eager mode. While tracing (torch.export, torch.compile, the
        ONNX exporters) it is computed from the ``columns`` buffer in the graph and not cached,
        so that no traced value is kept and the exported graph does not depend on earlier calls.
        """
        tracing = _is_compiling() or torch.jit.is_tracing()
        key = (h, w, device, channels_last, padded)
        cached = None if tracing else self._index_cache.get(key)
        if cached is not None:
            return cached
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        ho, wo = self.output_size(h, w)
        if padded:
            h, w, ph, pw = h + 2 * ph, w + 2 * pw, 0, 0
        c, m, k = self._split_columns(device)
        y = (torch.arange(ho, device=device) * sh - ph)[:, None, None] + (m * dh)  # ho × 1 × K'
        x = (torch.arange(wo, device=device) * sw - pw)[None, :, None] + (k * dw)  # 1 × wo × K'
        pixel = y * w + x
        index = (pixel * self.in_channels + c if channels_last else c * h * w + pixel).flatten()
        outside = None
        if not padded:
            inside = ((y >= 0) & (y < h) & (x >= 0) & (x < w)).flatten()
            index = index.where(inside, 0)
            if not bool(inside.all()):
                outside = (~inside).nonzero().flatten()
        if not tracing:  # int32: half the index bytes to read, 1.1-1.3x faster at batch 1 to 4, same at 64
            index = index.int() if self.in_channels * h * w < 2 ** 31 else index
            self._index_cache[key] = index, outside
        return index, outside

    def _split_columns(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Channel, kernel row and kernel column of every kept column, from the ``columns`` buffer."""
        kh, kw = self.kernel_size
        cols = self.columns.to(device)
        return cols // (kh * kw), cols % (kh * kw) // kw, cols % kw

    def _window_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_split_columns`, cached (the column form runs in eager mode only)."""
        if self._window_cache is None or self._window_cache[0].device != device:
            self._window_cache = self._split_columns(device)
        return self._window_cache

    def _column_form(self, x: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
        """K' strided windows of every (padded) image, then W × cols per image (N × C × H × W output)."""
        n, c, hp, wp = x.shape
        (sh, sw), (dh, dw) = self.stride, self.dilation
        x = x.contiguous()
        windows = x.as_strided((n, c, *self.kernel_size, ho, wo), (c * hp * wp, hp * wp, dh * wp, dw, sh * wp, sw))
        channel, row, col = self._window_index(x.device)
        return self._by_filters(windows[:, channel, row, col].view(n, -1, ho * wo), ho, wo)

    def _by_filters(self, cols: torch.Tensor, ho: int, wo: int) -> torch.Tensor:
        """W (N × K') by each image's ``cols`` (n × K' × positions), plus the bias: N × C × H × W."""
        n, weight = cols.shape[0], self.weight.expand(cols.shape[0], -1, -1)
        out = torch.bmm(weight, cols) if self.bias is None else torch.baddbmm(self.bias.view(1, -1, 1), weight, cols)
        return out.view(n, self.out_channels, ho, wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One of the forms with the same values (up to float rounding): the positions form, one GEMM,
        (N·positions × K') by (K' × filters), written channels-last and returned as an N × filters × Ho × Wo view
        (``torch.channels_last`` memory format); the same gather with the GEMM by filters (N × C × H × W out) or
        with oneDNN's (CPU only); the GEMM by filters image by image; or the column form. On the CPU the fastest
        at this input's shape is kept, timed once (:func:`structsparse.layers.tunable`); otherwise :meth:`_rule`
        chooses, and while tracing the positions form runs."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"LoweredConv2d expects N×{self.in_channels}×H×W input, got {list(x.shape)}")
        h, w = x.shape[2:]
        ho, wo = self.output_size(h, w)
        if _is_compiling() or torch.jit.is_tracing() or x.is_meta:  # no data-dependent steps (meta: a check)
            return self._positions_form(self._pad(x), h, w, ho, wo, padded=True)
        names = self.form_names(x)
        choice = remembered_choice(self, x, lambda: fastest(
            self._tuning_key(x), [lambda f=f: self._form(f, x, h, w, ho, wo) for f in names]))
        return self._form(names[choice or 0], x, h, w, ho, wo)

    def _form(self, name: str, x: torch.Tensor, h: int, w: int, ho: int, wo: int) -> torch.Tensor:
        """Form ``name`` (one of :meth:`form_names`) on ``x``."""
        if name == "columns":
            return self._column_form(self._pad(x), ho, wo)
        if name == "images":
            return self._images_form(x, h, w, ho, wo)
        return self._positions_form(x, h, w, ho, wo, gemm=name)  # positions, filters, onednn: the GEMM's form

    def form_names(self, x: torch.Tensor) -> list[str]:
        """The forms :meth:`forward` may run on ``x``, the rule's first; the index of the one it keeps (timed, for
        this input's shape, layout and thread count) is in ``self._choices``. The same order for the same shapes,
        so that the choice timed for a key means one form. Remembered per input shape and device."""
        key = (x.shape, x.device, LARGE_INDEX_FROM, ONEDNN_FROM)  # the rule's constants: tests change them
        names = self._names.get(key)
        if names is None:
            ho, wo = self.output_size(*x.shape[2:])
            first = self._rule(x, ho, wo)
            names = self._names[key] = [first, *(f for f in forms(x) if f != first)]
        return names

    def _rule(self, x: torch.Tensor, ho: int, wo: int) -> str:
        """The form that runs without timing, and that timing keeps unless another takes under 0.9 of its time:
        at batch 1 the GEMM by filters; at larger batches image by image where the positions form's index would
        be large (over :data:`LARGE_INDEX_FROM` entries), else oneDNN's GEMM from :data:`ONEDNN_FROM`
        multiply-adds, else the GEMM by positions. These were the fastest on AlexNet's conv2-conv5 at batch 1 and
        64 (oneDNN's fixed cost rules it out of small calls: about 130 µs in the CPU build the README installs)."""
        n, kept = x.shape[0], self.weight.shape[1]
        if n == 1:
            return "filters"
        if ho * wo * kept > LARGE_INDEX_FROM and x.device.type == "cpu":  # a CPU cache's matter
            return "images"
        if n * ho * wo * kept * self.out_channels >= ONEDNN_FROM and _conv_gemm(x):
            return "onednn"
        return "positions"

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.padding
        return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x

    def _positions_form(self, x: torch.Tensor, h: int, w: int, ho: int, wo: int, gemm: str = "positions",
                        padded: bool = False) -> torch.Tensor:
        """Every output position's K' entries by one flat index, then one GEMM: ``gemm`` "positions", (positions
        × K') by Wᵀ, a channels-last output; "filters", W by (K' × positions) per image, N × C × H × W (on
        AlexNet's conv2 at batch 1, 729 positions, the GEMM took 0.84 of the other's time); "onednn", oneDNN's
        1×1 conv of the gathered entries as a channels-last image (1.11-1.23× the speed of ``addmm``'s on AlexNet's
        conv3-conv5 at batch 64, the same at batch 1, but each call has a fixed cost). Which is fastest is timed,
        see :meth:`forward`. The entries that fall in the padding are set to zero after the gather, unless ``x``
        comes padded (as while tracing): on AlexNet's conv3-conv5 (a tenth of the entries in the padding)
        padding first took 1.2-1.6× the time at batch 64, 1.15-1.3× at batch 1."""
        n = x.shape[0]
        flat, index, outside = self._source(x, h, w, padded)
        # one image's as a 1-d gather: along dim 1 of a single row took 1.3-1.6x the time
        cols = _take(flat[0] if n == 1 else flat, index, outside)
        if gemm == "onednn":
            cols = cols.view(n, ho, wo, self.weight.shape[1]).permute(0, 3, 1, 2)
            return F.conv2d(cols, self.weight[:, :, None, None], self.bias)
        if gemm == "filters":
            return self._by_filters(cols.view(n, ho * wo, -1).transpose(1, 2), ho, wo)
        cols = cols.view(n * ho * wo, self.weight.shape[1])
        if self.bias is not None:
            out = torch.addmm(self.bias, cols, self.weight.t())
        else:
            out = torch.mm(cols, self.weight.t())
        return out.view(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def _images_form(self, x: torch.Tensor, h: int, w: int, ho: int, wo: int) -> torch.Tensor:
        """Image by image: one image's kept entries by a 1-d gather, then W by them (K' × positions), written
        N × C × H × W (in place where no gradient is asked for). Where the positions form's index is larger
        than the cache (AlexNet's conv2: 644k entries an image) this ran at 1.14× the fastest batched form's speed
        at batch 64: the batched gather re-reads the index for every image, 1.3 ms an image against 0.4 alone."""
        flat, index, outside = self._source(x, h, w)
        n, bias = x.shape[0], (None if self.bias is None else self.bias[:, None])
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, bias))
        out = None if grad else torch.empty(n, self.out_channels, ho * wo, dtype=x.dtype, device=x.device)
        outs = []
        for i in range(n):
            cols = _take(flat[i], index, outside).view(ho * wo, -1).t()
            kw = {} if out is None else {"out": out[i]}
            if bias is None:
                outs.append(torch.mm(self.weight, cols, **kw))
            else:
                outs.append(torch.addmm(bias, self.weight, cols, **kw))
        return (torch.stack(outs) if out is None else out).view(n, self.out_channels, ho, wo)

    def _source(self, x: torch.Tensor, h: int, w: int,
                padded: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``x`` as one row of entries per image, and :meth:`_gather_index`'s index and padding entries into it.
        A channels-last input (a lowered conv's output is) is read in place: a copy to N×C×H×W first took
        1.7-2.6x the time of the gather from it (AlexNet's conv3-conv5, batch 1 and 64)."""
        n = x.shape[0]
        last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) and not padded
        flat = x.permute(0, 2, 3, 1).reshape(n, -1) if last else x.reshape(n, -1)
        return (flat, *self._gather_index(h, w, x.device, last, padded))

    def _tuning_key(self, x: torch.Tensor) -> tuple:
        """What the two forms' times depend on: the layer's settings, its kept columns and the input's shape."""
        if self._columns_key is None:
            self._columns_key = hash(tuple(self.columns.tolist()))
        return ("lowered", tuple(x.shape), x.is_contiguous(), x.dtype, self.in_channels, self.out_channels,
                self.kernel_size, self.stride, self.dilation, self.bias is not None, self._columns_key)

    def clear_caches(self) -> None:
        """Forget the gather indices (they are rebuilt on the next call)."""
        self._index_cache, self._window_cache, self._columns_key, self._choices, self._names = {}, None, None, {}, {}

    def _apply(self, fn, *args, **kwargs):
        self.clear_caches()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        total = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, columns={self.columns.numel()}/{total}")
