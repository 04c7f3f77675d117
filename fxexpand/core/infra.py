"""Pass infrastructure: :class:`Pass`, :class:`PassResult`, :class:`PassManager` and the registry.

A pass is a keyword-only dataclass. Calling it on a :class:`torch.fx.GraphModule` runs
``requires`` (precondition), ``call`` (the rewrite, which may mutate the module in place) and
``ensures`` (postcondition, checked on the *result*), and returns ``PassResult(graph_module,
modified, notes)``. ``notes`` records what the pass did and what it skipped, with reasons; the
contraction report is built from them.

:class:`PassManager` is itself a pass: it runs its passes in order (optionally to a fixed point),
lints the graph after each one that changed it, generates its code (``recompile``) before any pass
that runs the module and before returning (once for a run of graph-only passes), and names the failing pass *and the passes that ran
before it* in any error. With ``verify_each=True`` it checks numerical equivalence after every pass
and names the first pass that changed the model's function.

Ordering constraints are declared, not written in prose: a pass class lists in ``after`` the
registered names of passes that must run before it when both are in one manager (RestoreOriginal
runs after the folding and fusion passes), and ``PassManager(constraints=[(a, b), ...])`` adds
"a before b" for one manager. A manager whose order breaks a constraint is refused when it is built.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Sequence

import torch.fx as fx

from .errors import (
    EquivalenceError,
    FxExpandError,
    PassError,
    PostconditionError,
    PreconditionError,
)
from .verify import verify

__all__ = [
    "Note",
    "PassResult",
    "Pass",
    "PassManager",
    "ScopedPass",
    "register_pass",
    "unregister_pass",
    "get_pass",
    "registered_passes",
    "build_pass",
]

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
    """What a pass returns: the (possibly same, possibly mutated) module, whether it changed, notes,
    and typed records (e.g. :class:`~fxexpand.core.provenance.ModuleRenames`) for the caller."""

    graph_module: fx.GraphModule
    modified: bool
    notes: list[Note] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)


def register_pass(name: str) -> Callable[[type["Pass"]], type["Pass"]]:
    """Class decorator registering a pass under a string name usable in ``compile(passes=[...])``."""

    def deco(cls: type[Pass]) -> type[Pass]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a pass is already registered as {name!r}: {_REGISTRY[name].__name__}")
        _REGISTRY[name] = cls
        cls.registered_name = name
        return cls

    return deco


def unregister_pass(name: str) -> None:
    """Remove a registered name (e.g. a pass a test or a notebook registered); unknown names are ignored."""
    cls = _REGISTRY.pop(name, None)
    if cls is not None and cls.registered_name == name:
        cls.registered_name = ""


def registered_passes() -> dict[str, type["Pass"]]:
    """The registry (name -> pass class), for discovery and the CLI. The built-in passes register
    when :mod:`fxexpand.passes` is imported (``import fxexpand`` does)."""
    return dict(_REGISTRY)


def get_pass(name: str) -> type["Pass"]:
    reg = registered_passes()
    try:
        return reg[name]
    except KeyError:
        raise PassError(
            f"no pass is registered as {name!r}; registered passes: {', '.join(sorted(reg))}"
        ) from None


def required_arguments(cls: type["Pass"]) -> list[str]:
    """The keyword arguments a pass class cannot be built without (empty: buildable by name)."""
    params = inspect.signature(cls).parameters.values()
    return [p.name for p in params if p.default is inspect.Parameter.empty
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def build_pass(spec: "Pass | str") -> "Pass":
    """Turn a pass object or a registered name into a pass object (a name uses default arguments;
    a pass with required arguments cannot be built by name, and the error says which it needs)."""
    if isinstance(spec, Pass):
        return spec
    if isinstance(spec, str):
        cls = get_pass(spec)
        needed = required_arguments(cls)
        if needed:
            raise PassError(
                f"pass {spec!r} cannot be built by name: it needs the argument(s) {', '.join(needed)}; "
                f"pass an object instead, e.g. {cls.__name__}({', '.join(f'{a}=...' for a in needed)})")
        return cls()
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
    if origin in (typing.Union, types.UnionType):
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
    #: registered names of passes that must run before this one when both are in one PassManager
    after: ClassVar[tuple[str, ...]] = ()
    #: whether the pass runs the module (``gm(...)``, ``gm.code``) and so needs code generated for
    #: the current graph; a pass that only reads and edits ``gm.graph`` and its submodules sets this
    #: to False, and a :class:`PassManager` then generates the code once after a run of such passes
    #: instead of after each one (FX code generation is a large part of contraction time)
    needs_code: ClassVar[bool] = True

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
        except FxExpandError:
            raise
        except Exception as e:  # a check that crashed is a failed precondition
            raise PreconditionError(f"{self.name}: precondition check failed: {e}") from e
        result = self.call(graph_module)
        if not isinstance(result, PassResult):
            raise PassError(f"{self.name}.call() must return a PassResult, got {type(result).__name__}")
        try:
            self.ensures(result.graph_module)
        except FxExpandError:
            raise
        except Exception as e:
            raise PostconditionError(f"{self.name}: postcondition check failed: {e}") from e
        return result

    @abc.abstractmethod
    def call(self, graph_module: fx.GraphModule) -> PassResult:
        """Rewrite ``graph_module`` (in place is allowed) and return a :class:`PassResult`.

        Everything that can reject the input is checked in :meth:`requires` or before the first
        change, so a refused input is never left half rewritten. Per-call state lives in local
        variables, never on ``self``."""

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
        lint: run ``graph.lint()`` after every pass that changed the graph. The code is generated
            (``recompile``) before the manager returns and before any pass whose ``needs_code`` is
            True; a run of graph-only passes (``needs_code = False``) is recompiled once.
        verify_each: after every pass, check numerical equivalence with the module as it was
            before that pass (needs ``example_inputs``) and name the first pass that broke it.
        example_inputs: inputs for ``verify_each``.
        rtol, atol: tolerances for ``verify_each`` (float32 comparison; float64 uses 1e-9).
        constraints: extra ordering constraints ``(a, b)``: pass ``a`` (a registered name) must
            run before pass ``b`` wherever both appear; checked with each pass's own ``after``.
    """

    passes: Sequence[Any] = ()
    fixed_point: bool = False
    max_iterations: int = 20
    lint: bool = True
    verify_each: bool = False
    example_inputs: Any = None
    rtol: float = 1e-4
    atol: float = 0.0
    constraints: Sequence[Any] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.passes = [build_pass(p) for p in self.passes]
        if self.verify_each and self.example_inputs is None:
            raise ValueError("PassManager(verify_each=True) needs example_inputs=")
        if self.max_iterations < 1:
            raise ValueError("max_iterations must be >= 1")
        self.constraints = tuple(tuple(c) for c in self.constraints)
        if not all(len(c) == 2 and all(isinstance(x, str) for x in c) for c in self.constraints):
            raise TypeError("constraints must be pairs (a, b) of registered pass names: a runs before b")
        self._check_order()

    def _check_order(self) -> None:
        """Refuse an order that breaks a declared constraint (``after`` or ``constraints``)."""
        names = [getattr(type(p), "registered_name", "") for p in self.passes]
        rules = list(self.constraints)
        rules += [(before, getattr(type(p), "registered_name", "") or p.name)
                  for p in self.passes for before in type(p).after]
        for before, later in rules:
            later_at = [i for i, (n, p) in enumerate(zip(names, self.passes)) if later in (n, p.name)]
            before_at = [i for i, n in enumerate(names) if n == before]
            if later_at and before_at and max(before_at) > min(later_at):
                raise PassError(f"pass order breaks a constraint: {before} must run before {later} "
                                f"(order: {', '.join(p.name for p in self.passes)})")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        ran: list[str] = []
        notes: list[Note] = []
        records: list[Any] = []
        any_modified = False
        stale: list[str] = []  # passes that changed the graph since the code was last generated
        for iteration in range(self.max_iterations):
            round_modified = False
            for p in self.passes:
                if stale and (p.needs_code or self.verify_each):
                    self._recompile(gm, stale, history=", ".join(ran))
                before = copy.deepcopy(gm) if self.verify_each else None
                history = ", ".join(ran) if ran else "none"
                try:
                    result = p(gm)
                except FxExpandError as e:
                    raise _with_context(e, f"pass {p.name} failed (passes run before it: {history}): ", p.name) from e
                except Exception as e:
                    raise _with_context(PassError(f"{type(e).__name__}: {e}"),
                                        f"pass {p.name} failed (passes run before it: {history}): ", p.name) from e
                gm = result.graph_module
                ran.append(p.name)
                notes.extend(result.notes)
                records.extend(result.records)
                if result.modified:
                    round_modified = True
                    try:
                        if self.lint:
                            gm.graph.lint()
                    except Exception as e:
                        invalid = PassError(f"pass {p.name} produced an invalid graph (passes run before it: "
                                            f"{history}): {type(e).__name__}: {e}")
                        invalid.pass_name = p.name
                        raise invalid from e
                    stale.append(p.name)
                    if before is not None or p.needs_code:
                        self._recompile(gm, stale, history=history)
                    if before is not None:
                        try:
                            verify(before, gm, self.example_inputs, rtol=self.rtol, atol=self.atol)
                        except EquivalenceError as e:
                            changed = EquivalenceError(
                                f"pass {p.name} changed the model's function (first pass to do so; "
                                f"passes run before it: {history}): {e}",
                                report=e.report,
                            )
                            changed.pass_name = p.name
                            raise changed from e
            any_modified |= round_modified
            if not self.fixed_point or not round_modified:
                break
        else:
            if self.fixed_point:
                raise PassError(
                    f"PassManager did not reach a fixed point in {self.max_iterations} rounds "
                    f"(passes: {', '.join(p.name for p in self.passes)})"
                )
        if stale:
            self._recompile(gm, stale, history=", ".join(ran[:-1]) if ran else "none")
        return PassResult(gm, any_modified, notes, records)

    @staticmethod
    def _recompile(gm: fx.GraphModule, stale: list[str], *, history: str) -> None:
        """Generate the code of ``gm``'s graph; a failure names the passes that changed the graph
        since the code was last generated (the last of them first)."""
        try:
            gm.recompile()
        except Exception as e:
            last = stale[-1]
            others = f"; it also follows changes by {', '.join(dict.fromkeys(stale[:-1]))}" if len(stale) > 1 else ""
            invalid = PassError(f"pass {last} produced an invalid graph (passes run before it: {history or 'none'}"
                                f"{others}): {type(e).__name__}: {e}")
            invalid.pass_name = last
            raise invalid from e
        stale.clear()


def _with_context(error: FxExpandError, prefix: str, pass_name: str) -> FxExpandError:
    """The same error (type and attributes, e.g. an EquivalenceError's report) with ``prefix``
    before its message and ``pass_name`` set; an error a nested manager already named (its
    ``pass_name`` is set) is not named twice."""
    if error.pass_name is not None:
        return error
    new = copy.copy(error)
    new.args = (prefix + str(error),) + tuple(error.args[1:])
    new.pass_name = pass_name
    return new


@dataclass(kw_only=True)
class ScopedPass(Pass):
    """A pass with ``scope``: ``"all"`` rewrites everywhere, ``"expanded"`` only inside
    :class:`~fxexpand.core.provenance.ExpandedRegion` containers (target "original" of ``contract``)."""

    scope: Literal["all", "expanded"] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scope not in ("all", "expanded"):
            raise ValueError(f"{type(self).__name__}: scope must be 'all' or 'expanded', got {self.scope!r}")
