"""The regime study's runner: a declared design, one JSON line per finished run, resumable.

A **design** (JSON, :func:`load_design`) names *regimes* — a dataset, its size, the tiny model's
width, the batch size and the learning-rate schedule — and blocks of runs, each the cross product
``regimes × methods × seeds × epochs × lr``::

    {"name": "vanilla_map",
     "regimes": {"n5k-w4": {"dataset": "mnist1d", "num_samples": 5000, "width": 4, "batch_size": 128,
                            "schedule": "cosine"}},
     "runs": [{"regimes": ["n5k-w4"], "methods": ["vanilla"], "seeds": [0, 1], "epochs": [10, 20], "lr": [0.1]}]}

``epochs`` is a protocol's base epochs E (:mod:`fxexpand.training.protocols`; vanilla trains E
epochs, ``vanilla-x2`` 2E, NetBooster's two phases E each). Every run is one training of
:func:`fxexpand.demo.train_run` (the demo's code path) in a worker process with one torch thread;
:func:`execute` appends its row to the results file with :func:`append_row` — the whole line in one
``write`` + ``fsync`` under an exclusive ``flock``, so a killed worker leaves no partial line and two
workers never interleave. :func:`pending` is the design's runs whose :func:`run_key` is not yet in
the results file (:func:`read_rows`), so a re-run resumes where the last one stopped.

Vanilla runs that differ only in their seed can train *stacked* (:mod:`fxexpand.demo.stacked`: K
seeds as one grouped network, the same result per seed up to floating-point rounding, faster on a
CPU): :func:`groups` with ``stack=K``; their rows say ``"stacked": K``.

``benchmarks/study.py`` is the command (progress, ETA, workers); docs/study.md the study.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core import InputError
from ..training import protocols
from . import data as datasets
from .common import SCHEDULES, accuracy, cached_splits
from .compare import train_run
from .models import TinyConv1d
from .stacked import StackedLoader, stack, stacked_cross_entropy

__all__ = [
    "KEY_FIELDS",
    "Design",
    "DesignError",
    "Regime",
    "Run",
    "append_row",
    "estimate_seconds",
    "execute",
    "groups",
    "load_design",
    "parse_design",
    "pending",
    "read_rows",
    "row_key",
    "run_key",
    "task_of",
]

log = logging.getLogger(__name__)

#: the fields that identify a run: a row with the same values is the same run
KEY_FIELDS = ("regime", "dataset", "num_samples", "width", "batch_size", "schedule", "method", "seed", "epochs", "lr")
_REGIME_FIELDS = {"dataset", "num_samples", "width", "batch_size", "schedule"}
_BLOCK_FIELDS = {"regimes", "methods", "seeds", "epochs", "lr"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class DesignError(InputError):
    """A study design is malformed (unknown field, wrong type, unknown method or regime, ...)."""


@dataclass(frozen=True)
class Regime:
    """Where a run trains: dataset (and MNIST-1D's ``num_samples``), model width, batch, schedule."""

    name: str
    dataset: str
    num_samples: int | None
    width: int
    batch_size: int
    schedule: str


@dataclass(frozen=True)
class Run:
    """One training run of the design."""

    regime: Regime
    method: str
    seed: int
    epochs: int
    lr: float

    @property
    def key(self) -> tuple:
        return run_key(self)

    @property
    def total_epochs(self) -> int:
        """Epochs trained over all phases (``round(factor · E)`` per phase, as protocols.run)."""
        return sum(max(1, round(p.factor * self.epochs)) for p in protocols.PROTOCOLS[self.method]().phases)

    def task(self) -> dict:
        """The :func:`fxexpand.demo.train_run` task of this run."""
        r = self.regime
        t = {"dataset": r.dataset, "width": r.width, "batch_size": r.batch_size, "schedule": r.schedule,
             "method": self.method, "seed": self.seed, "epochs": self.epochs, "lr": self.lr, "split": "val",
             "evaluate": ("val", "test")}
        if r.num_samples is not None:
            t["num_samples"] = r.num_samples
        return t


@dataclass(frozen=True)
class Design:
    """A parsed design: its name, regimes by name and the runs (deduplicated, in declaration order)."""

    name: str
    description: str
    regimes: dict[str, Regime]
    runs: tuple[Run, ...]


def _int(v: Any, what: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise DesignError(f"{what} must be an integer, got {v!r}")
    if v < low:
        raise DesignError(f"{what} must be >= {low}, got {v}")
    return v


def _list(v: Any, what: str) -> list:
    if not isinstance(v, list) or not v:
        raise DesignError(f"{what} must be a non-empty list, got {v!r}")
    return v


def _regime(name: Any, spec: Any) -> Regime:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DesignError(f"regime names are letters, digits and _.+- (got {name!r})")
    if not isinstance(spec, dict):
        raise DesignError(f"regime {name!r} must be an object, got {type(spec).__name__}")
    unknown = set(spec) - _REGIME_FIELDS
    if unknown:
        raise DesignError(f"regime {name!r}: unknown fields {sorted(unknown)}; a regime has {sorted(_REGIME_FIELDS)}")
    missing = {"dataset", "width", "batch_size", "schedule"} - set(spec)
    if missing:
        raise DesignError(f"regime {name!r}: missing fields {sorted(missing)}")
    ds = spec["dataset"]
    if ds not in datasets.DATASETS:
        raise DesignError(f"regime {name!r}: unknown dataset {ds!r}; choose from {', '.join(datasets.DATASETS)}")
    num = spec.get("num_samples")
    if num is not None:
        if ds != "mnist1d":
            raise DesignError(f"regime {name!r}: num_samples applies to mnist1d only, not {ds!r}")
        num = _int(num, f"regime {name!r}: num_samples", 100)
    if spec["schedule"] not in SCHEDULES:
        raise DesignError(f"regime {name!r}: unknown schedule {spec['schedule']!r}; choose from {', '.join(SCHEDULES)}")
    return Regime(name, ds, num, _int(spec["width"], f"regime {name!r}: width", 1),
                  _int(spec["batch_size"], f"regime {name!r}: batch_size", 1), spec["schedule"])


def parse_design(obj: Any) -> Design:
    """A :class:`Design` from a decoded JSON object; raises :class:`DesignError` naming what is wrong."""
    if not isinstance(obj, dict):
        raise DesignError(f"a design is a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"name", "description", "regimes", "runs"}
    if unknown:
        raise DesignError(f"unknown top-level fields {sorted(unknown)}; a design has name, description, regimes, runs")
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise DesignError(f"the design needs a name (letters, digits and _.+-), got {name!r}")
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise DesignError("description must be a string")
    if not isinstance(obj.get("regimes"), dict) or not obj["regimes"]:
        raise DesignError("regimes must be a non-empty object {name: regime}")
    regimes = {k: _regime(k, v) for k, v in obj["regimes"].items()}
    runs: dict[tuple, Run] = {}
    for i, block in enumerate(_list(obj.get("runs"), "runs")):
        where = f"runs[{i}]"
        if not isinstance(block, dict):
            raise DesignError(f"{where} must be an object")
        if set(block) != _BLOCK_FIELDS:
            raise DesignError(f"{where} must have exactly the fields {sorted(_BLOCK_FIELDS)}, got {sorted(block)}")
        for r in _list(block["regimes"], f"{where}.regimes"):
            if r not in regimes:
                raise DesignError(f"{where}: unknown regime {r!r}; the design declares {', '.join(regimes)}")
        for m in _list(block["methods"], f"{where}.methods"):
            if m not in protocols.PROTOCOLS:
                raise DesignError(f"{where}: unknown method {m!r}; choose from {', '.join(protocols.PROTOCOLS)}")
        seeds = [_int(s, f"{where}.seeds", 0) for s in _list(block["seeds"], f"{where}.seeds")]
        epochs = [_int(e, f"{where}.epochs", 1) for e in _list(block["epochs"], f"{where}.epochs")]
        lrs = []
        for lr in _list(block["lr"], f"{where}.lr"):
            if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
                raise DesignError(f"{where}.lr: learning rates must be positive numbers, got {lr!r}")
            lrs.append(float(lr))
        for r in block["regimes"]:
            for m in block["methods"]:
                for e in epochs:
                    for lr in lrs:
                        for s in seeds:
                            run = Run(regimes[r], m, s, e, lr)
                            runs.setdefault(run.key, run)
    return Design(name, description, regimes, tuple(runs.values()))


def load_design(path: str | os.PathLike) -> Design:
    """Read and check a design file (see the module docstring); :class:`DesignError` if malformed."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise DesignError(f"no design file {p}") from None
    except json.JSONDecodeError as e:
        raise DesignError(f"{p} is not valid JSON: {e}") from None
    return parse_design(obj)


def run_key(run: Run) -> tuple:
    """What identifies a run (:data:`KEY_FIELDS`); equal to :func:`row_key` of its row."""
    r = run.regime
    return (r.name, r.dataset, r.num_samples, r.width, r.batch_size, r.schedule, run.method, run.seed, run.epochs,
            float(run.lr))


def row_key(row: dict) -> tuple:
    """The :data:`KEY_FIELDS` of a results row, as :func:`run_key` gives them."""
    return tuple(float(row[k]) if k == "lr" else row[k] for k in KEY_FIELDS)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The complete rows of a results file (none if it does not exist). A last line without its
    newline (a write cut off by a crash of the machine) and lines that are not rows are skipped with
    a warning."""
    p = Path(path)
    if not p.exists():
        return []
    text = p.read_text()
    lines = text.split("\n")
    if lines and lines[-1] != "":
        log.warning("%s: ignoring an incomplete last line (%d characters)", p, len(lines[-1]))
    rows = []
    for i, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_key(row)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("%s:%d is not a results row; ignored", p, i)
            continue
        rows.append(row)
    return rows


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` as one JSON line: one ``write`` of the whole line, ``fsync``, under an
    exclusive ``flock`` of the file (writers never interleave; a killed writer leaves no partial
    line). If the file ends in an incomplete line, the row starts on a new line."""
    line = json.dumps(row, sort_keys=True, allow_nan=True) + "\n"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = "\n" + line
            data = line.encode()
            if os.write(fd, data) != len(data):  # a regular file takes the whole line or fails
                raise OSError(f"short write to {p}")
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def pending(design: Design, results: str | os.PathLike) -> list[Run]:
    """The design's runs that have no row in ``results`` yet."""
    done = {row_key(r) for r in read_rows(results)}
    return [r for r in design.runs if r.key not in done]


def _steps(run: Run) -> int:
    # training samples: MNIST-1D keeps 80 % for training and 80 % of that outside validation; digits 1,078
    n = run.regime.num_samples
    train = 0.64 * (5000 if n is None else n) if run.regime.dataset == "mnist1d" else 1078
    return run.total_epochs * math.ceil(train / run.regime.batch_size)


def estimate_seconds(group: Sequence[Run]) -> float:
    """A rough CPU-time estimate of one group (for ordering and the progress bar, which calibrates
    its ETA on the measured rate): ``steps · (3.5 + 0.4·width·K + (K−1)) ms`` from TinyConv1d at
    batch 128 on one core (benchmarks/study_speed.py), plus 2 s of evaluation and set-up per run."""
    run, k = group[0], len(group)
    batch = run.regime.batch_size / 128
    per_step = 3.5 + 0.4 * run.regime.width * k * batch + (k - 1)
    factor = 1.0 if run.method.startswith("vanilla") else 4.0  # expanded models: several times vanilla's step
    return _steps(run) * per_step * factor / 1000 + 2.0 * k


def groups(runs: Iterable[Run], stack: int = 1) -> list[list[Run]]:
    """Runs in the order they should run (cheapest first), as groups trained together: vanilla
    runs of one regime, epochs and lr on MNIST-1D in groups of up to ``stack`` seeds, every other
    run alone."""
    if int(stack) < 1:
        raise InputError(f"stack must be >= 1, got {stack}")
    alone, together = [], {}
    for r in runs:
        if stack > 1 and r.method == "vanilla" and r.regime.dataset == "mnist1d":
            together.setdefault((r.regime, r.epochs, r.lr), []).append(r)
        else:
            alone.append([r])
    out = alone
    for rs in together.values():
        rs.sort(key=lambda r: r.seed)
        out += [rs[i:i + stack] for i in range(0, len(rs), stack)]
    return sorted(out, key=lambda g: (estimate_seconds(g) / len(g), g[0].regime.name, g[0].seed))


def _row(run: Run, design: str, **values: Any) -> dict:
    r = run.regime
    return {"design": design, "regime": r.name, "dataset": r.dataset, "num_samples": r.num_samples, "width": r.width,
            "batch_size": r.batch_size, "schedule": r.schedule, "method": run.method, "seed": run.seed,
            "epochs": run.epochs, "total_epochs": run.total_epochs, "lr": float(run.lr), **values,
            "torch": torch.__version__, "fxexpand": importlib.metadata.version("fxexpand"), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _train_one(run: Run, design: str) -> dict:
    res = train_run(run.task())
    return _row(run, design, test_acc=res["accuracies"]["test"], val_acc=res["accuracies"]["val"],
                train_acc=res["train_accuracy"], train_flops=res["train_flops"], seconds=res["train_seconds"],
                params=res["parameters"], trained_params=res["trained_parameters"], diverged=res["diverged"],
                phase_val_acc=res["phase_accuracy"], stacked=1)


def _train_stacked(runs: Sequence[Run], design: str) -> list[dict]:
    """K vanilla seeds of one regime, epochs and lr trained as one :class:`StackedTinyConv1d`;
    the same steps, data orders, initialisations and FLOPs as K :func:`train_run` calls."""
    run0 = runs[0]
    reg = run0.regime
    d = cached_splits(reg.dataset, reg.num_samples)
    proto = protocols.PROTOCOLS[run0.method]()
    tinies = []
    for r in runs:
        torch.manual_seed(r.seed)  # train_run's initialisation of seed r
        tinies.append(TinyConv1d(width=reg.width))
    model = stack(tinies)
    loader = StackedLoader(d.x_train, d.y_train, reg.batch_size, [r.seed for r in runs])
    xb, yb = d.x_train[:reg.batch_size], d.y_train[:reg.batch_size]
    t0 = time.perf_counter()
    protocols.run(model, proto, loader, epochs=run0.epochs, make_optimizer=SCHEDULES[reg.schedule](run0.lr),
                  loss_fn=stacked_cross_entropy)
    seconds = time.perf_counter() - t0
    steps = [max(1, round(p.factor * run0.epochs)) * len(loader) for p in proto.phases]
    flops = protocols.step_flops(TinyConv1d(width=reg.width), xb, yb) * sum(steps)
    rows = []
    for r, m in zip(runs, model.unstack()):
        m.eval()
        diverged = not all(torch.isfinite(t).all() for t in m.state_dict().values() if t.is_floating_point())
        val = accuracy(m, d.x_val, d.y_val)
        params = sum(p.numel() for p in m.parameters())
        rows.append(_row(r, design, test_acc=accuracy(m, d.x_test, d.y_test), val_acc=val,
                         train_acc=accuracy(m, d.x_train, d.y_train), train_flops=flops, seconds=seconds / len(runs),
                         params=params, trained_params=params, diverged=diverged, phase_val_acc=[val],
                         stacked=len(runs)))
    return rows


def execute(task: dict) -> list[dict]:
    """Train one group (``task["runs"]``: :class:`Run` dicts, as :func:`dataclasses.asdict` gives
    them) in this process with one torch thread, append each run's row to ``task["results"]`` as it
    finishes, and return the rows (the worker function of ``benchmarks/study.py``)."""
    torch.set_num_threads(1)
    runs = [Run(Regime(**r["regime"]), r["method"], r["seed"], r["epochs"], r["lr"]) for r in task["runs"]]
    if len(runs) > 1:
        rows = _train_stacked(runs, task["design"])
    else:
        rows = [_train_one(runs[0], task["design"])]
    for row in rows:
        append_row(task["results"], row)
    return rows


def task_of(group: Sequence[Run], design: Design, results: str | os.PathLike) -> dict:
    """The :func:`execute` task (picklable, plain data) of one group."""
    return {"runs": [asdict(r) for r in group], "design": design.name, "results": str(results)}

