"""Typed errors raised by fxexpand.

Every error fxexpand raises on purpose derives from :class:`FxExpandError`, so callers (and the
CLI) can tell a problem with the *input* apart from a bug. Messages say what went wrong and what
to do about it.
"""

from __future__ import annotations

__all__ = [
    "FxExpandError",
    "TraceError",
    "PassError",
    "PreconditionError",
    "PostconditionError",
    "EquivalenceError",
    "ContractionError",
    "ExportError",
    "LoadError",
    "InputError",
    "ShapePropagationError",
    "NothingExpandedError",
    "SparseExpansionWarning",
]


class FxExpandError(Exception):
    """Base class of every error fxexpand raises deliberately.

    ``pass_name``: the pass that failed, set by the :class:`~fxexpand.core.PassManager` that ran it
    (which also names it in the message); None for an error raised outside a pass."""

    pass_name: str | None = None


class TraceError(FxExpandError):
    """The model could not be symbolically traced by torch.fx."""


class PassError(FxExpandError):
    """A pass failed; the message names the pass and the passes that ran before it."""


class PreconditionError(PassError):
    """A pass's ``requires`` check rejected its input graph."""


class PostconditionError(PassError):
    """A pass's ``ensures`` check rejected the graph the pass produced."""


class EquivalenceError(FxExpandError):
    """A rewritten model does not compute the same function as its reference."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ContractionError(FxExpandError):
    """Contraction cannot be done exactly (for example an activation that is not yet linear)."""


class ExportError(FxExpandError):
    """ONNX export, checking or onnxruntime comparison failed."""


class LoadError(FxExpandError):
    """A model file could not be loaded safely (missing, corrupt, untrusted or not a model)."""


class InputError(FxExpandError):
    """Example inputs (or an input shape) do not fit the model."""


class ShapePropagationError(FxExpandError):
    """Shape propagation (:func:`fxexpand.core.propagate_shapes`) failed on a node although the model
    runs on the example inputs. ``node``: the name of the node that failed (None if unknown);
    ``cause``: the exception it raised (also the ``__cause__``)."""

    def __init__(self, message: str, *, node: str | None = None, cause: BaseException | None = None):
        super().__init__(message)
        self.node = node
        self.cause = cause


class NothingExpandedError(PassError):
    """The expansion passes of a :func:`fxexpand.compile` call (a recipe, or expansion passes given
    one by one) expanded no layer, so the "expanded" model would be the original one. The message
    names the recipe and passes and summarises why the layers were skipped.

    ``recipe``: the recipe's name (None for a plain pass list); ``passes``: the expansion passes'
    names; ``skipped``: ``{(pass name, reason): [layer names]}`` from the passes' notes."""

    def __init__(self, message: str, *, recipe: str | None = None, passes: tuple[str, ...] = (),
                 skipped: dict[tuple[str, str], list[str]] | None = None):
        super().__init__(message)
        self.recipe = recipe
        self.passes = tuple(passes)
        self.skipped = dict(skipped or {})


class SparseExpansionWarning(UserWarning):
    """An expansion expanded so little of the model that it is close to a no-op: fewer than 10 % of
    its conv/linear layers *and* less than 10 % more parameters (:func:`fxexpand.compile`)."""
