"""Pass infrastructure: :class:`Pass`, :class:`PassResult`, :class:`PassManager` and the registry.

A pass is a keyword-only dataclass. Calling it on a :class:`torch.fx.GraphModule` runs
``requires`` (precondition), ``call`` (the rewrite, which may mutate the module in place) and
``ensures`` (postcondition, checked on the *result*), and returns ``PassResult(graph_module,
modified, notes)``. ``notes`` records what the pass did and what it skipped, with reasons; the
contraction report is built from them.

:class:`PassManager` is itself a pass: it runs its passes in order (optionally to a fixed point),
recompiles and lints the graph after each one, and names the failing pass *and the passes that ran
before it* in any error. With ``verify_each=True`` it checks numerical equivalence after every pass
and names the first pass that changed the model's function.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch.fx as fx

from .errors import EquivalenceError, FxExpandError, PassError, PostconditionError, PreconditionError

__all__ = [
    "Note",
    "PassResult",
    "Pass",
    "PassManager",
    "register_pass",
    "get_pass",
    "registered_passes",
    "build_pass",
]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type["Pass"]] = {}


@dataclass(frozen=True)
class Note:
    """One entry of a pass report.

    ``action`` is ``"fused"``, ``"folded"``, ``"removed"``, ``"skipped"`` or ``"info"``; ``where``
    names the nodes/modules involved; ``reason`` explains a skip (or details an action).
    """

    pass_name: str
    action: str
    where: str
    reason: str = ""

    def __str__(self) -> str:
        tail = f" ({self.reason})" if self.reason else ""
        return f"[{self.pass_name}] {self.action}: {self.where}{tail}"


@dataclass
class PassResult:
    """What a pass returns: the (possibly same, possibly mutated) module, whether it changed, notes."""

    graph_module: fx.GraphModule
    modified: bool
    notes: list[Note] = field(default_factory=list)


def register_pass(name: str) -> Callable[[type["Pass"]], type["Pass"]]:
    """Class decorator registering a pass under a string name usable in ``compile(passes=[...])``."""

    def deco(cls: type[Pass]) -> type[Pass]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a pass is already registered as {name!r}: {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.registered_name = name
        return cls

    return deco


def registered_passes() -> dict[str, type["Pass"]]:
    """The registry (name -> pass class), for discovery and the CLI."""
    from . import passes as _  # noqa: F401  (importing registers the built-in passes)

    return dict(_REGISTRY)


def get_pass(name: str) -> type["Pass"]:
    reg = registered_passes()
    try:
        return reg[name]
    except KeyError:
        raise PassError(
            f"no pass is registered as {name!r}; registered passes: {', '.join(sorted(reg))}"
        ) from None


def build_pass(spec: "Pass | str") -> "Pass":
    """Turn a pass object or a registered name into a pass object (a name uses default arguments)."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        return get_pass(spec)()
    raise TypeError(f"expected a Pass instance or a registered pass name, got {type(spec).__name__}")


def _check_field_types(obj: Any) -> None:
    """Validate dataclass fields against simple annotations, so bad keyword arguments fail early."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        hint = hints.get(f.name)
        if hint is None:
            continue
        allowed = _simple_types(hint)
        if allowed is None:
            continue
        if isinstance(value, bool) and bool not in allowed and int in allowed and float not in allowed:
            raise TypeError(f"{type(obj).__name__}({f.name}=...) expects {hint}, got bool")
        if not isinstance(value, allowed):
            raise TypeError(
                f"{type(obj).__name__}({f.name}=...) expects {getattr(hint, '__name__', hint)}, "
                f"got {type(value).__name__}: {value!r}"
            )


def _simple_types(hint: Any) -> tuple[type, ...] | None:
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin is None:
        if hint is float:
            return (float, int)
        if isinstance(hint, type):
            return (hint,)
        return None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        out: list[type] = []
        for arg in typing.get_args(hint):
            sub = _simple_types(arg)
            if sub is None:
                return None
            out.extend(sub)
        return tuple(out)
    if origin is typing.Literal:
        return tuple({type(a) for a in typing.get_args(hint)})
    if isinstance(origin, type):
        return (origin,)
    return None


@dataclass(kw_only=True)
class Pass(abc.ABC):
    """Base class of every pass.

    Subclasses are keyword-only dataclasses (declare them with ``@dataclass(kw_only=True)``);
    their fields are the pass's typed configuration. Implement :meth:`call`; optionally override
    :meth:`requires` / :meth:`ensures` and raise :class:`PreconditionError` /
    :class:`PostconditionError` there.
    """

    registered_name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check_field_types(self)

    @property
    def name(self) -> str:
        return type(self).__name__

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        if not isinstance(graph_module, fx.GraphModule):
            raise TypeError(
                f"{self.name} runs on a torch.fx.GraphModule, got {type(graph_module).__name__}; "
                "trace the model first with fxexpand.trace(model)"
            )
        try:
            self.requires(graph_module)
        except PreconditionError:
            raise
        except FxExpandError:
            raise
        except Exception as e:  # a check that crashed is a failed precondition
            raise PreconditionError(f"{self.name}: precondition check failed: {e}") from e
        result = self.call(graph_module)
        if not isinstance(result, PassResult):
            raise PassError(f"{self.name}.call() must return a PassResult, got {type(result).__name__}")
        try:
            self.ensures(result.graph_module)
        except PostconditionError:
            raise
        except FxExpandError:
            raise
        except Exception as e:
            raise PostconditionError(f"{self.name}: postcondition check failed: {e}") from e
        return result

    @abc.abstractmethod
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Rewrite ``graph_module`` (in place is allowed) and return a :class:`PassResult`."""

    def requires(self, graph_module: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Precondition on the input; raise :class:`PreconditionError` to reject it."""

    def ensures(self, graph_module: fx.GraphModule) -> None:  # noqa: B027 - optional hook
        """Postcondition on the result; raise :class:`PostconditionError` to reject it."""

    def note(self, action: str, where: str, reason: str = "") -> Note:
        return Note(self.name, action, where, reason)


@dataclass(kw_only=True)
class PassManager(Pass):
    """Runs passes in order; itself a :class:`Pass`.

    Args:
        passes: pass objects or registered names.
        fixed_point: repeat the whole sequence until no pass reports a modification.
        max_iterations: bound on fixed-point rounds (an error if it is reached while still changing).
        lint: run ``graph.lint()`` after every pass (and always recompile).
        verify_each: after every pass, check numerical equivalence with the module as it was
            before that pass (needs ``example_inputs``) and name the first pass that broke it.
        example_inputs: inputs for ``verify_each``.
        rtol, atol: tolerances for ``verify_each`` (float32 comparison; float64 uses 1e-9).
    """

    passes: Sequence[Any] = ()
    fixed_point: bool = False
    max_iterations: int = 20
    lint: bool = True
    verify_each: bool = False
    example_inputs: Any = None
    rtol: float = 1e-4
    atol: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.passes = [build_pass(p) for p in self.passes]
        if self.verify_each and self.example_inputs is None:
            raise ValueError("PassManager(verify_each=True) needs example_inputs=")
        if self.max_iterations < 1:
            raise ValueError("max_iterations must be >= 1")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        from .verify import verify as _verify  # local: verify imports infra

        gm = graph_module
        ran: list[str] = []
        notes: list[Note] = []
        any_modified = False
        for iteration in range(self.max_iterations):
            round_modified = False
            for p in self.passes:
                before = copy.deepcopy(gm) if self.verify_each else None
                history = ", ".join(ran) if ran else "none"
                try:
                    result = p(gm)
                except PassError as e:
                    raise type(e)(f"pass {p.name} failed (passes run before it: {history}): {e}") from e
                except FxExpandError:
                    raise
                except Exception as e:
                    raise PassError(
                        f"pass {p.name} failed (passes run before it: {history}): "
                        f"{type(e).__name__}: {e}"
                    ) from e
                gm = result.graph_module
                ran.append(p.name)
                notes.extend(result.notes)
                if result.modified:
                    round_modified = True
                    try:
                        if self.lint:
                            gm.graph.lint()
                        gm.recompile()
                    except Exception as e:
                        raise PassError(
                            f"pass {p.name} produced an invalid graph (passes run before it: "
                            f"{history}): {type(e).__name__}: {e}"
                        ) from e
                    if before is not None:
                        try:
                            _verify(before, gm, self.example_inputs, rtol=self.rtol, atol=self.atol)
                        except EquivalenceError as e:
                            raise EquivalenceError(
                                f"pass {p.name} changed the model's function (first pass to do so; "
                                f"passes run before it: {history}): {e}",
                                report=e.report,
                            ) from e
            any_modified |= round_modified
            if not self.fixed_point or not round_modified:
                break
        else:
            if self.fixed_point:
                raise PassError(
                    f"PassManager did not reach a fixed point in {self.max_iterations} rounds "
                    f"(passes: {', '.join(p.name for p in self.passes)})"
                )
        return PassResult(gm, any_modified, notes)
