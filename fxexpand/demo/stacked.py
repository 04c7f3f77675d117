"""K independent :class:`~fxexpand.demo.models.TinyConv1d` trained at once, as one grouped network.

A 606-parameter model spends almost all of a training step in per-op overhead (Python, the
dispatcher, autograd), not in arithmetic. K copies with *different* initialisations and data orders
can share every op: model ``k`` owns the ``k``-th channel slice of every layer, and

* the stem conv with ``groups = K`` reads input channel ``k`` (= model ``k``'s own mini-batch),
* the depthwise convs are already per-channel (``groups = K·C``), the pointwise convs and the two FCs
  (as kernel-1 convs) get ``groups = K``,
* BatchNorm is per channel (its batch statistics and running statistics are model ``k``'s own),

so the stacked forward is the K forwards side by side. The loss is the *sum* of the K models' mean
cross-entropies (:func:`stacked_cross_entropy`), so each slice receives exactly its own model's
gradient; SGD (momentum, Nesterov, weight decay) and a per-step learning-rate schedule are
element-wise, so every slice follows its own model's trajectory. Results equal K separate runs up to
floating-point rounding (a grouped kernel sums in another order): ``tests/test_study.py`` checks
float64 and float32 parameters after training, ``benchmarks/study_speed.py`` measures the speed-up.

:func:`stack` builds the stacked model from K trained-or-fresh models, :meth:`StackedTinyConv1d.unstack`
returns K ordinary :class:`TinyConv1d` with the slices' weights (strict ``load_state_dict``), and
:class:`StackedLoader` yields the K paired loaders' batches side by side.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..core import InputError
from .common import Loader
from .models import TinyConv1d

__all__ = ["StackedLoader", "StackedTinyConv1d", "stack", "stacked_cross_entropy"]


class _StackedBlock(nn.Module):
    """K side-by-side ``_DwPw1d`` blocks: depthwise (per channel) then pointwise with ``groups=K``."""

    def __init__(self, k: int, cin: int, cout: int, kernel_size: int, stride: int):
        super().__init__()
        self.dw = nn.Conv1d(k * cin, k * cin, kernel_size, stride=stride, padding=kernel_size // 2, groups=k * cin,
                            bias=False)
        self.bn1 = nn.BatchNorm1d(k * cin)
        self.pw = nn.Conv1d(k * cin, k * cout, 1, groups=k, bias=False)
        self.bn2 = nn.BatchNorm1d(k * cout)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn2(self.pw(self.act(self.bn1(self.dw(x))))))


class StackedTinyConv1d(nn.Module):
    """``k`` :class:`TinyConv1d` (same arguments) as one grouped network.

    Input ``(N, k·in_channels, L)``: model ``i``'s batch in channels ``i·in_channels ...``; output
    ``(N, k, num_classes)``: model ``i``'s logits at ``[:, i]``. The state-dict keys are
    :class:`TinyConv1d`'s; every tensor is the ``k`` models' tensors concatenated along dim 0 (the
    FCs as kernel-1 convs).
    """

    def __init__(self, k: int, width: int = 6, hidden: int = 16, num_classes: int = 10, in_channels: int = 1,
                 kernel_size: int = 5):
        super().__init__()
        if int(k) < 1:
            raise InputError(f"k must be >= 1, got {k}")
        self.k, w = int(k), int(width)
        if w < 1 or hidden < 1:
            raise InputError("width and hidden must be >= 1")
        self.config = {"width": w, "hidden": int(hidden), "num_classes": int(num_classes),
                       "in_channels": int(in_channels), "kernel_size": int(kernel_size)}
        k = self.k
        self.stem = nn.Sequential(nn.Conv1d(k * in_channels, k * w, kernel_size, padding=kernel_size // 2, groups=k,
                                            bias=False), nn.BatchNorm1d(k * w), nn.ReLU())
        self.blocks = nn.Sequential(_StackedBlock(k, w, w, kernel_size, 1), _StackedBlock(k, w, 2 * w, kernel_size, 2),
                                    _StackedBlock(k, 2 * w, 2 * w, kernel_size, 2))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc1 = nn.Conv1d(k * 2 * w, k * hidden, 1, groups=k)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv1d(k * hidden, k * num_classes, 1, groups=k)

    def forward(self, x):
        n = x.shape[0]
        x = self.pool(self.blocks(self.stem(x)))  # (N, k·2w, 1)
        return self.fc2(self.act(self.fc1(x))).view(n, self.k, self.config["num_classes"])

    def unstack(self) -> list[TinyConv1d]:
        """The ``k`` models as ordinary :class:`TinyConv1d` (copies of the slices, in ``self``'s mode and dtype)."""
        sd = self.state_dict()
        ref = TinyConv1d(**self.config).state_dict()
        out = []
        for i in range(self.k):
            piece = {}
            for key, tmpl in ref.items():
                t = sd[key]
                if t.dim() == 0:  # num_batches_tracked: the same count in every slice
                    piece[key] = t.clone()
                else:
                    piece[key] = t.chunk(self.k, 0)[i].reshape(tmpl.shape).clone()
            m = TinyConv1d(**self.config).to(self.fc2.weight.dtype)
            m.load_state_dict(piece, strict=True)
            out.append(m.train(self.training))
        return out


def stack(models: Sequence[TinyConv1d]) -> StackedTinyConv1d:
    """One :class:`StackedTinyConv1d` holding copies of ``models`` (equal architectures) side by side."""
    models = list(models)
    if not models or not all(isinstance(m, TinyConv1d) for m in models):
        raise InputError("stack needs one or more fxexpand.demo.models.TinyConv1d")
    m0 = models[0]
    config = {"width": m0.stem[0].out_channels, "hidden": m0.fc1.out_features, "num_classes": m0.fc2.out_features,
              "in_channels": m0.stem[0].in_channels, "kernel_size": m0.stem[0].kernel_size[0]}
    sds = [m.state_dict() for m in models]
    if any(sd.keys() != sds[0].keys() or any(sd[k].shape != sds[0][k].shape for k in sd) for sd in sds):
        raise InputError("stack needs models of one architecture (same width, hidden, classes, kernel)")
    out = StackedTinyConv1d(len(models), **config).to(next(m0.parameters()).dtype)
    target = out.state_dict()
    merged = {}
    for key, t in target.items():
        if t.dim() == 0:
            counts = {int(sd[key]) for sd in sds}
            if len(counts) != 1:
                raise InputError(f"stack: the models' {key} differ ({sorted(counts)}); they must have trained "
                                 "the same number of steps")
            merged[key] = sds[0][key].clone()
        else:
            merged[key] = torch.cat([sd[key] for sd in sds], 0).reshape(t.shape)
    out.load_state_dict(merged, strict=True)
    return out.train(m0.training)


class StackedLoader:
    """The batches of ``Loader(x, y, batch_size, seed)`` for each seed, side by side: inputs
    concatenated along the channels ``(N, k·C, L)``, targets stacked ``(N, k)``. Every seed's
    loader has its own generator, so seed ``s`` sees exactly the batches it sees alone."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seeds: Sequence[int]):
        if not seeds:
            raise InputError("StackedLoader needs at least one seed")
        self.loaders = [Loader(x, y, batch_size, s) for s in seeds]

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batches in zip(*self.loaders):
            yield torch.cat([b[0] for b in batches], 1), torch.stack([b[1] for b in batches], 1)


def stacked_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the ``k`` models of each one's mean cross-entropy (logits ``(N, k, C)``, target
    ``(N, k)``): the gradient each slice receives is its own model's."""
    per = nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (N, k)
    return per.mean(0).sum()
