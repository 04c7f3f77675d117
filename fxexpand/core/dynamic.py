"""Width-dynamic layers: each holds its largest (augmented) parameters and computes on a slice.

NetAug (Cai et al., ICLR 2022, §3.2) keeps only the largest augmented model; every smaller
augmented model, and the tiny model itself, is a sub-network of it made of the *leading channels*
of each channel group. A :class:`DynamicLayer` replaces one conv / linear / BatchNorm / LayerNorm
of the traced model at its own qualified name:

* its input is described by ``in_spec``, the channel groups that make up its input's channel
  dimension, in order: ``(group id, largest width, features per channel)`` (several groups after a
  ``torch.cat``; ``features per channel`` > 1 after ``flatten`` into a Linear). Its active input
  channels are, for each segment, the first ``active width × features`` positions of the segment;
* a conv / linear writes ``out_group``; depthwise convs and norms keep their input's channels;
* :meth:`DynamicLayer.set_widths` sets the active width of every group it touches. With the base
  widths active the layer computes exactly the original layer (same weights, same arithmetic on a
  slice); :meth:`DynamicLayer.extract` returns the original layer type with the base slice.

BatchNorm (:class:`DynamicBatchNorm`): running statistics describe the *tiny* model. In the base
configuration the layer is an ordinary BatchNorm on its base channels; in an augmented
configuration (``augmented=True``, set for every layer at once) it normalises with the batch's own
statistics and leaves the running statistics untouched, in training and in eval mode, because the
tiny model's channels see different inputs inside a wider model. A BatchNorm followed by its own
parameter-free ``drop`` and ``act`` modules (timm's ``BatchNormAct2d``: ``act(drop(bn(x)))``) is
made dynamic the same way and applies them after the slice; :meth:`DynamicBatchNorm.extract`
returns that class again.

fxexpand's tracer keeps every :class:`DynamicLayer` as one call (a leaf), so contraction sees them.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _reverse_repeat_tuple

__all__ = ["DynamicLayer", "DynamicConv", "DynamicLinear", "DynamicBatchNorm", "DynamicLayerNorm", "Segment",
           "DYNAMIC_SOURCES", "norm_act_parts"]

#: (group id, largest width, features per channel)
Segment = tuple[str, int, int]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class DynamicLayer(nn.Module):
    """Common part: which groups the layer reads and writes, their base and active widths."""

    depthwise = False

    def __init__(self, original: nn.Module, in_spec: list[Segment], out_group: str | None,
                 base: dict[str, int]):
        super().__init__()
        self.original_cls = type(original)
        self.in_spec = [tuple(s) for s in in_spec]
        self.out_group = out_group
        gids = [g for g, _, _ in self.in_spec] + ([out_group] if out_group is not None else [])
        self.base_widths = {g: int(base[g]) for g in gids}
        self.widths = dict(self.base_widths)
        self.augmented = False
        self._in_index, self._in_width = self._width_of(self.base_widths)

    # -- widths ---------------------------------------------------------------------------------
    def _width_of(self, widths: dict[str, int]) -> tuple[torch.Tensor | None, int]:
        """(index of the active input positions or None for a leading slice, active input width)."""
        if len(self.in_spec) == 1:
            g, _, per = self.in_spec[0]
            return None, widths[g] * per
        parts, off = [], 0
        for g, mx, per in self.in_spec:
            parts.append(torch.arange(off * per, (off + widths[g]) * per))
            off += mx
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return idx, int(idx.numel())

    def base_positions(self) -> torch.Tensor:
        """Positions of the base (tiny model's) input channels in the largest input."""
        idx, width = self._width_of(self.base_widths)
        return torch.arange(width) if idx is None else idx

    def set_widths(self, widths: dict[str, int], augmented: bool) -> None:
        """Activate ``widths`` (group id -> width; groups not named keep their width)."""
        self.widths = {g: int(widths.get(g, w)) for g, w in self.widths.items()}
        self.augmented = bool(augmented)
        self._in_index, self._in_width = self._width_of(self.widths)

    @property
    def is_base(self) -> bool:
        return not self.augmented and self.widths == self.base_widths

    def _in_cols(self, t: torch.Tensor, dim: int, widths: dict[str, int] | None = None) -> torch.Tensor:
        """The active (or given widths') input positions of ``t`` along ``dim``."""
        idx, width = (self._in_index, self._in_width) if widths is None else self._width_of(widths)
        if idx is None:
            return t.narrow(dim, 0, width)
        return t.index_select(dim, idx.to(t.device))

    def _out_rows(self, widths: dict[str, int] | None = None) -> int:
        return (self.widths if widths is None else widths)[self.out_group]

    def extract(self) -> nn.Module:
        """The original layer type holding the base slice of the parameters (and buffers)."""
        raise NotImplementedError

    def permuters(self, group: str, perm: torch.Tensor) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """For each parameter/buffer name, the function that reorders the channels of ``group`` by
        ``perm`` (a permutation of its largest width) in a tensor of that parameter's shape."""
        raise NotImplementedError

    def _segment_perm(self, group: str, perm: torch.Tensor) -> torch.Tensor | None:
        """Permutation of the whole input dimension that applies ``perm`` to ``group``'s segments."""
        if not any(g == group for g, _, _ in self.in_spec):
            return None
        parts, off = [], 0
        for g, mx, per in self.in_spec:
            pos = torch.arange(mx * per).view(mx, per)
            if g == group:
                pos = pos[perm]
            parts.append(off + pos.reshape(-1))
            off += mx * per
        return torch.cat(parts)

    def extra_repr(self) -> str:
        return f"{self.original_cls.__name__}, widths={self.widths}, augmented={self.augmented}"


def _param_like(t: torch.Tensor | None, shape: tuple[int, ...]) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.new_empty(shape), requires_grad=t.requires_grad)


class DynamicConv(DynamicLayer):
    """A ``Conv1d/2d/3d`` with ``groups == 1``, or depthwise (``depthwise=True``: one filter per
    channel of its input, which it keeps)."""

    def __init__(self, original: nn.Module, in_spec: list[Segment], out_group: str | None,
                 base: dict[str, int], max_in: int, max_out: int, *, depthwise: bool = False):
        super().__init__(original, in_spec, None if depthwise else out_group, base)
        self.depthwise = depthwise
        self.dims = len(original.kernel_size)
        self.stride, self.padding, self.dilation = original.stride, original.padding, original.dilation
        self.padding_mode = original.padding_mode
        self._reversed_padding = tuple(getattr(original, "_reversed_padding_repeated_twice", None)
                                       or _reverse_repeat_tuple(original.padding, 2))
        k = tuple(original.kernel_size)
        shape = (max_in, 1, *k) if depthwise else (max_out, max_in, *k)
        self.weight = _param_like(original.weight, shape)
        self.bias = _param_like(original.bias, (shape[0],))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depthwise:
            w = self._in_cols(self.weight, 0)
            b = None if self.bias is None else self._in_cols(self.bias, 0)
            groups = w.shape[0]
        else:
            o = self._out_rows()
            w = self._in_cols(self.weight[:o], 1)
            b = None if self.bias is None else self.bias[:o]
            groups = 1
        conv = _CONV_FN[self.dims]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding, mode=self.padding_mode)
            return conv(x, w, b, self.stride, 0, self.dilation, groups)
        return conv(x, w, b, self.stride, self.padding, self.dilation, groups)

    def _base_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.base_widths
        if self.depthwise:
            return (self._in_cols(self.weight, 0, base),
                    None if self.bias is None else self._in_cols(self.bias, 0, base))
        o = self._out_rows(base)
        return self._in_cols(self.weight[:o], 1, base), None if self.bias is None else self.bias[:o]

    def extract(self) -> nn.Module:
        w, b = self._base_tensors()
        groups = w.shape[0] if self.depthwise else 1
        cin = w.shape[0] if self.depthwise else w.shape[1]
        with torch.device("meta"):
            m = self.original_cls(cin, w.shape[0], tuple(w.shape[2:]), stride=self.stride, padding=self.padding,
                                  dilation=self.dilation, groups=groups, bias=b is not None,
                                  padding_mode=self.padding_mode)
        m = m.to_empty(device=w.device).to(w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        m.weight.requires_grad_(self.weight.requires_grad)
        return m.train(self.training)

    def permuters(self, group, perm):
        out: dict[str, Callable] = {}
        seg = self._segment_perm(group, perm)
        if self.depthwise:
            if seg is not None:
                out = {"weight": lambda t: t[seg.to(t.device)], "bias": lambda t: t[seg.to(t.device)]}
            return out
        fns = []
        if self.out_group == group:
            fns.append((0, perm))
        if seg is not None:
            fns.append((1, seg))

        def weight(t: torch.Tensor) -> torch.Tensor:
            for d, p in fns:
                t = t.index_select(d, p.to(t.device))
            return t
        if fns:
            out["weight"] = weight
            if self.out_group == group:
                out["bias"] = lambda t: t[perm.to(t.device)]
        return out


class DynamicLinear(DynamicLayer):
    """An ``nn.Linear`` (on ``(N, C)`` or ``(N, ..., C)`` inputs)."""

    def __init__(self, original: nn.Linear, in_spec: list[Segment], out_group: str | None,
                 base: dict[str, int], max_in: int, max_out: int):
        super().__init__(original, in_spec, out_group, base)
        self.weight = _param_like(original.weight, (max_out, max_in))
        self.bias = _param_like(original.bias, (max_out,))

    def _slices(self, widths=None):
        o = self._out_rows(widths)
        return self._in_cols(self.weight[:o], 1, widths), None if self.bias is None else self.bias[:o]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._slices()
        return F.linear(x, w, b)

    def extract(self) -> nn.Module:
        w, b = self._slices(self.base_widths)
        with torch.device("meta"):
            m = self.original_cls(w.shape[1], w.shape[0], bias=b is not None)
        m = m.to_empty(device=w.device).to(w.dtype)
        with torch.no_grad():
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        return m.train(self.training)

    def permuters(self, group, perm):
        return DynamicConv.permuters(self, group, perm)  # same layout: rows = outputs, columns = inputs


_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BN_TENSORS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


def norm_act_parts(mod: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(drop, act)`` of a BatchNorm subclass made of a batch norm followed by parameter-free
    ``drop`` and ``act`` submodules and nothing else (timm's ``BatchNormAct2d``, whose forward is
    ``act(drop(batch_norm(x)))``); None for any other module (plain BatchNorms included)."""
    if not isinstance(mod, nn.modules.batchnorm._BatchNorm) or type(mod) in _BN_TYPES:
        return None
    children = dict(mod.named_children())
    if set(children) != {"drop", "act"}:
        return None
    if any(True for c in children.values() for _ in (*c.parameters(), *c.buffers())):
        return None
    own = {n for n, _ in mod.named_parameters(recurse=False)} | {n for n, _ in mod.named_buffers(recurse=False)}
    if not own <= _BN_TENSORS:
        return None
    return children["drop"], children["act"]


class DynamicBatchNorm(DynamicLayer):
    """A ``BatchNorm1d/2d/3d`` on its input's channels; running statistics belong to the base model.
    Also a BatchNorm + activation module (:func:`norm_act_parts`): its ``drop`` and ``act`` follow."""

    @staticmethod
    def accepts(mod: nn.Module) -> bool:
        """Whether ``mod`` can become a :class:`DynamicBatchNorm`."""
        return type(mod) in _BN_TYPES or norm_act_parts(mod) is not None

    def __init__(self, original: nn.Module, in_spec: list[Segment], base: dict[str, int], max_c: int):
        super().__init__(original, in_spec, None, base)
        parts = norm_act_parts(original)
        # the subclass's structure without its tensors (rebuilt by extract()); not a submodule, so
        # it adds nothing to state_dict; drop and act are parameter-free submodules
        self._norm_act_template = None
        if parts is not None:
            self.drop, self.act = copy.deepcopy(parts[0]), copy.deepcopy(parts[1])
            object.__setattr__(self, "_norm_act_template", copy.deepcopy(original).to("meta"))
        self.eps, self.momentum = original.eps, original.momentum
        self.affine, self.track_running_stats = original.affine, original.track_running_stats
        self.weight = _param_like(original.weight, (max_c,))
        self.bias = _param_like(original.bias, (max_c,))
        if original.track_running_stats:
            self.register_buffer("running_mean", original.running_mean.new_zeros(max_c))
            self.register_buffer("running_var", original.running_var.new_ones(max_c))
            self.register_buffer("num_batches_tracked", original.num_batches_tracked.clone())
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self._in_cols(self.weight, 0)
        b = None if self.bias is None else self._in_cols(self.bias, 0)
        y = self._normalise(x, w, b)
        return y if self._norm_act_template is None else self.act(self.drop(y))

    def _normalise(self, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
        if self.augmented or self.running_mean is None:
            # an augmented model: its own batch statistics; the tiny model's running statistics stay
            return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        if self._in_index is None:  # a leading slice is a view: updated in place
            rm, rv = self.running_mean[:self._in_width], self.running_var[:self._in_width]
            return F.batch_norm(x, rm, rv, w, b, self.training, factor, self.eps)
        idx = self._in_index.to(x.device)
        rm, rv = self.running_mean[idx], self.running_var[idx]
        y = F.batch_norm(x, rm, rv, w, b, self.training, factor, self.eps)
        if self.training:
            with torch.no_grad():
                self.running_mean.index_copy_(0, idx, rm)
                self.running_var.index_copy_(0, idx, rv)
        return y

    def extract(self) -> nn.Module:
        base = self.base_widths
        c = self._width_of(base)[1]
        if self._norm_act_template is not None:  # the original subclass (at base width: it was the tiny layer)
            m = copy.deepcopy(self._norm_act_template)
        else:
            with torch.device("meta"):
                m = self.original_cls(c, eps=self.eps, momentum=self.momentum, affine=self.affine,
                                      track_running_stats=self.track_running_stats)
        ref = self.weight if self.weight is not None else self.running_mean
        m = m.to_empty(device=ref.device if ref is not None else "cpu")
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                src = getattr(self, name)
                if src is not None:
                    getattr(m, name).data = self._in_cols(src, 0, base).clone()
            if self.num_batches_tracked is not None:
                m.num_batches_tracked.data = self.num_batches_tracked.clone()
        return m.train(self.training)

    def permuters(self, group, perm):
        seg = self._segment_perm(group, perm)
        if seg is None:
            return {}
        return {n: (lambda t: t[seg.to(t.device)]) for n in ("weight", "bias", "running_mean", "running_var")}


class DynamicLayerNorm(DynamicLayer):
    """An ``nn.LayerNorm`` over the last (channel) dimension: normalises the active channels."""

    def __init__(self, original: nn.LayerNorm, in_spec: list[Segment], base: dict[str, int], max_c: int):
        super().__init__(original, in_spec, None, base)
        self.eps = original.eps
        self.weight = _param_like(original.weight, (max_c,))
        self.bias = _param_like(original.bias, (max_c,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self._in_cols(self.weight, 0)
        b = None if self.bias is None else self._in_cols(self.bias, 0)
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)

    def extract(self) -> nn.Module:
        base = self.base_widths
        c = self._width_of(base)[1]
        with torch.device("meta"):
            m = self.original_cls((c,), eps=self.eps, elementwise_affine=self.weight is not None,
                                  bias=self.bias is not None)
        ref = self.weight
        m = m.to_empty(device=ref.device if ref is not None else "cpu")
        with torch.no_grad():
            for name in ("weight", "bias"):
                src = getattr(self, name)
                if src is not None:
                    getattr(m, name).data = self._in_cols(src, 0, base).clone()
        return m.train(self.training)

    def permuters(self, group, perm):
        seg = self._segment_perm(group, perm)
        if seg is None:
            return {}
        return {n: (lambda t: t[seg.to(t.device)]) for n in ("weight", "bias")}


#: the exact layer types a :class:`DynamicLayer` can stand for (subclasses such as timm's
#: ``BatchNormAct2d`` add behaviour and are not replaced)
DYNAMIC_SOURCES: dict[type, Any] = {
    nn.Conv1d: DynamicConv, nn.Conv2d: DynamicConv, nn.Conv3d: DynamicConv, nn.Linear: DynamicLinear,
    nn.BatchNorm1d: DynamicBatchNorm, nn.BatchNorm2d: DynamicBatchNorm, nn.BatchNorm3d: DynamicBatchNorm,
    nn.LayerNorm: DynamicLayerNorm,
}
