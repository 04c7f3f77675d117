"""Modules fxexpand inserts into expanded models.

:class:`DecayActivation` is an activation that can be faded into the identity. Its coefficient
``alpha`` is a *buffer*, so it is saved in ``state_dict`` and a resumed run continues its schedule.
``alpha = 0`` is the wrapped activation, ``alpha = 1`` the identity; only at exactly 1 can
contraction remove it (DESIGN.md rule 6).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DecayActivation", "Residual", "GradientScale"]

_KINDS = ("leaky", "blend")


class DecayActivation(nn.Module):
    """An activation with a decay coefficient ``alpha`` (buffer) that interpolates to the identity.

    * ``kind="leaky"`` (NetBooster's PLT): ``max(alpha * x, x)``, a leaky ReLU whose slope is
      ``alpha``. For ReLU6 the upper clamp fades out too (``6 + alpha·(x − 6)`` above 6); for
      LeakyReLU the slope rises from the module's own ``negative_slope`` to 1. For the ReLU family
      this is the same function as the blend below; the kind records the paper's form.
    * ``kind="blend"``: ``alpha * x + (1 - alpha) * act(x)`` for any activation.

    fxexpand's tracer keeps this module as a single (leaf) call so passes can see and remove it.
    """

    def __init__(self, activation: nn.Module, kind: str = "blend", alpha: float = 0.0):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"DecayActivation kind must be one of {_KINDS}, got {kind!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if kind == "leaky" and not isinstance(activation, (nn.ReLU, nn.ReLU6, nn.LeakyReLU)):
            raise ValueError(
                f"kind='leaky' works for ReLU, ReLU6 and LeakyReLU, not {type(activation).__name__}; "
                "use kind='blend'"
            )
        self.activation = activation
        self.kind = kind
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        # the schedule's global step (an integer, so every process and a resumed run agree)
        self.register_buffer("decay_step", torch.tensor(0, dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, alpha={float(self.alpha):.4g}"

    @property
    def is_identity(self) -> bool:
        """True only when alpha is exactly 1 (the activation is linear and removable). Read from the
        buffer only when it changed (its version counter moves with every in-place write: schedules,
        ``load_state_dict``), so a training forward that asks does not synchronise an accelerator."""
        key = (id(self.alpha), self.alpha.data_ptr(), self.alpha._version)
        cached = getattr(self, "_identity_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, bool(self.alpha.item() == 1.0))
            self._identity_cache = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One form covers every kind: with h = act(x), x − (1 − alpha)·(x − h)
        #   blend:          alpha·x + (1 − alpha)·act(x)
        #   leaky, ReLU:    max(alpha·x, x)                     (h = relu(x))
        #   leaky, ReLU6:   the same with the clamp at 6 fading (h = relu6(x))
        #   leaky, Leaky:   slope rising from negative_slope to 1
        # and alpha = 1 gives exactly x (the product is exactly zero). Three elementwise ops
        # instead of max/relu chains keep the training step and its memory close to the plain
        # activation's.
        a = self.alpha.to(x.dtype)
        return x - (1 - a) * (x - self.activation(x))


class Residual(nn.Module):
    """``x + body(x)``: the identity shortcut around an expanded block."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()  # not a view: the trunk after an exit may modify its input in place

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class GradientScale(nn.Module):
    """The identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass
    (BoostNet's gradient rescaling, Eq. 7). fxexpand's tracer keeps it as one call; contraction
    and early-exit export remove it (it computes nothing at inference)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return x
        return _ScaleGrad.apply(x, self.scale)
