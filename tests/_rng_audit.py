"""A pytest plugin that lists the tests whose values come from an unseeded global RNG.

    python -m pytest -q -p tests._rng_audit [tests ...]          # report at the end of the run
    FXEXPAND_RNG_AUDIT=audit.json python -m pytest -p tests._rng_audit ...   # also write JSON

For every test (setup, call and teardown together) it records whether torch's, Python's
``random`` or numpy's global generator was drawn from before anything seeded it: a draw counts
as *unseeded* when the generator's state at the test's start differs from its state at the first
``manual_seed`` / ``seed`` call of the test, or, if nothing was seeded, at the test's end. With
``tests/conftest.py``'s autouse seed fixture every test is seeded in its setup, so the unseeded
count should be 0; ``drew`` counts the tests that use the global RNG at all (the ones the fixture
makes deterministic). It also lists test modules that draw while being collected (module-level
tensors or ``nn.Module`` instances in ``parametrize`` lists): those values depend on which files
were collected before, whatever the fixture does. Hypothesis seeds ``random`` (and numpy) itself
around each example, so those two are not audited for ``@given`` tests.

This is a diagnostic, not part of the suite: it patches the seeding functions while it runs.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict

import pytest
import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
    np = None


def _states() -> dict[str, object]:
    out: dict[str, object] = {"torch": torch.random.get_rng_state().clone(), "random": random.getstate()}
    if np is not None:
        out["numpy"] = repr(np.random.get_state()[1][:4].tolist()) + repr(np.random.get_state()[2:])
    return out


def _same(kind: str, a: object, b: object) -> bool:
    if kind == "torch":
        return torch.equal(a, b)  # type: ignore[arg-type]
    return a == b


class _Audit:
    def __init__(self) -> None:
        self.start: dict[str, object] | None = None
        self.seeded_at: dict[str, object] = {}  # kind -> state at the first seed call
        self.results: dict[str, dict[str, list[str]]] = {}
        self.collect_draws: list[str] = []
        self._patch()

    def _patch(self) -> None:
        def wrap(kind: str, fn):
            def seeded(*args, **kwargs):
                self._note_seed(kind)
                return fn(*args, **kwargs)

            seeded.__wrapped__ = fn  # type: ignore[attr-defined]
            return seeded

        torch.manual_seed = wrap("torch", torch.manual_seed)
        torch.random.manual_seed = wrap("torch", torch.random.manual_seed)
        torch.seed = wrap("torch", torch.seed)
        random.seed = wrap("random", random.seed)
        if np is not None:
            np.random.seed = wrap("numpy", np.random.seed)

    def _note_seed(self, kind: str) -> None:
        if self.start is not None and kind not in self.seeded_at:
            self.seeded_at[kind] = _states()[kind]

    def begin(self) -> None:
        self.start, self.seeded_at = _states(), {}

    def end(self, item: pytest.Item) -> None:
        assert self.start is not None
        now = _states()
        hypothesis = getattr(item.obj, "is_hypothesis_test", False) if hasattr(item, "obj") else False
        drew, unseeded = [], []
        for kind, first in self.start.items():
            if hypothesis and kind != "torch":
                continue
            at_seed = self.seeded_at.get(kind)
            if at_seed is not None:
                if not _same(kind, first, at_seed):
                    unseeded.append(kind)
                drew.append(kind)  # seeded: it may or may not draw afterwards; it is deterministic
            elif not _same(kind, first, now[kind]):
                unseeded.append(kind)
                drew.append(kind)
        self.results[item.nodeid] = {"drew": drew, "unseeded": unseeded}
        self.start = None


_AUDIT: _Audit | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _AUDIT
    _AUDIT = _Audit()


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    if not isinstance(collector, pytest.Module):
        yield
        return
    before = _states()["torch"]
    yield
    if not torch.equal(before, _states()["torch"]) and _AUDIT is not None:
        _AUDIT.collect_draws.append(collector.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    assert _AUDIT is not None
    _AUDIT.begin()
    yield
    _AUDIT.end(item)


def _function(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _AUDIT is None:
        return
    res = _AUDIT.results
    funcs_all = {_function(n) for n in res}
    drew = {n for n, r in res.items() if r["drew"]}
    unseeded = {n for n, r in res.items() if r["unseeded"]}
    by_kind: dict[str, int] = defaultdict(int)
    for r in res.values():
        for k in r["unseeded"]:
            by_kind[k] += 1
    w = terminalreporter.write_line
    w("")
    w("== global RNG audit (tests._rng_audit) ==")
    w(f"test items: {len(res)} ({len(funcs_all)} test functions)")
    w(f"drew from or seeded a global RNG: {len(drew)} items ({len({_function(n) for n in drew})} functions)")
    w(f"drew before anything seeded it: {len(unseeded)} items ({len({_function(n) for n in unseeded})} "
      f"functions); by generator: {dict(by_kind)}")
    w(f"test modules drawing from torch's RNG while collected: {len(_AUDIT.collect_draws)} "
      f"{sorted(_AUDIT.collect_draws)}")
    out = os.environ.get("FXEXPAND_RNG_AUDIT")
    if out:
        with open(out, "w") as f:
            json.dump({"results": res, "collect_draws": _AUDIT.collect_draws}, f, indent=1, sort_keys=True)
        w(f"written to {out}")
