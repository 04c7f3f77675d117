"""Random models and property checks for testing passes (``import fxexpand.testing``).

* :func:`random_model` — ``model, example_inputs = random_model(seed, **limits)``: a random, valid,
  traceable CNN reproducible from its seed (see its docstring for what it covers).
* :func:`models` / :func:`seeds` — hypothesis strategies built on it (hypothesis is a dev extra).
* ``check_*`` — the properties fxexpand's CI checks on every generated model; call them on your
  own passes (``check_pass(lambda: MyPass(), model, inputs)``).
* helpers shared by tests and benchmarks: :func:`randomize_bn`, :func:`rel_error`,
  :func:`snapshot` / :func:`assert_unchanged`, :func:`graph_signature` / :func:`assert_graph_matches`
  (Before/Expected graph tests), and the model-file fuzzer (:func:`fuzz`, :func:`mutate`,
  :func:`fuzz_case`, :func:`make_corpus`).
* ``python -m fxexpand.testing sweep --seeds 2000`` runs the properties on thousands of seeds;
  ``python -m fxexpand.testing fuzz --iterations 10000`` feeds mutated model files to
  :func:`fxexpand.load` and the CLI. See docs/testing.md.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._checks import (
    CONTRACTION_PASSES,
    EXPANSIONS,
    BreakOutput,
    CheckResult,
    check_deploy,
    check_expansion,
    check_early_exits,
    check_netaug,
    check_pass,
    check_verify_each,
)
from ._fuzz import fuzz, fuzz_case, make_corpus, mutate
from ._generator import LIMITS, RandomBlock, RandomNet, check_limits, random_model
from ._helpers import (
    assert_graph_matches,
    assert_unchanged,
    graph_signature,
    randomize_bn,
    rel_error,
    snapshot,
)

__all__ = [
    "random_model", "RandomNet", "RandomBlock", "LIMITS", "RandomCase", "seeds", "models",
    "check_expansion", "check_deploy", "check_netaug", "check_early_exits", "check_pass", "check_verify_each", "BreakOutput", "CheckResult",
    "EXPANSIONS", "CONTRACTION_PASSES",
    "randomize_bn", "rel_error", "snapshot", "assert_unchanged", "graph_signature", "assert_graph_matches",
    "fuzz", "fuzz_case", "make_corpus", "mutate",
]


class RandomCase(NamedTuple):
    """A generated model with its seed (what :func:`models` draws)."""

    seed: int
    model: RandomNet
    example_inputs: tuple[torch.Tensor, ...]

    def __repr__(self) -> str:  # hypothesis prints this for a failing example: the seed reproduces it
        return f"RandomCase(seed={self.seed})  # reproduce: fxexpand.testing.random_model({self.seed}, **limits)"


def _hypothesis():
    try:
        import hypothesis.strategies as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "fxexpand.testing's strategies need hypothesis, a development dependency: "
            "pip install hypothesis (or pip install -e '.[dev]'). random_model() itself does not need it."
        ) from e
    return st


def seeds(max_seed: int = 2**31 - 1):
    """A hypothesis strategy of model seeds (non-negative integers)."""
    st = _hypothesis()
    return st.integers(min_value=0, max_value=max_seed)


def models(**limits: Any):
    """A hypothesis strategy of :class:`RandomCase` ``(seed, model, example_inputs)``; ``limits`` are
    :func:`random_model`'s keyword limits. Shrinking moves towards small seeds."""

    check_limits(limits)  # fail at definition time, not inside a test
    return seeds().map(lambda s: RandomCase(s, *random_model(s, **limits)))
