"""Mutation fuzzing of model files: ``python -m fxexpand.testing fuzz --iterations 10000``.

Valid files (written by :func:`fxexpand.save` — a plain model, a generated model, an expanded
model with its recipe — and a ``torch.save``'d state_dict) are mutated at random and handed to
:func:`fxexpand.load` (every iteration) and to ``fxexpand contract`` (every ``cli_every``-th). The
property: loading either succeeds or raises one of fxexpand's typed errors (``FxExpandError``);
the CLI exits with 0 or 2 (never 1, "internal error"), prints no traceback and leaves no output
file behind on failure. Anything else is a bug; the offending file is kept under
``<workdir>/failures`` with the iteration number, which reproduces it.

Mutations: on the raw bytes (flip, overwrite, insert, delete, duplicate a span, truncate); inside
the zip archive (the same byte mutations applied to one member — the pickle, a tensor's storage,
the version record — then re-zipped with valid CRCs, so the damage reaches the unpickler instead
of being caught by the zip layer); and structure-aware ones (one payload field or state_dict entry
replaced by an odd value — wrong type, huge number, NaN, another factory, a bogus recipe — and
re-saved, so the damage reaches the payload checks).
"""

from __future__ import annotations

import contextlib
import io as _io
import random
import shutil
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import api, io, recipes
from ..cli import main
from ..core import FxExpandError
from ._generator import random_model

__all__ = ["fuzz", "fuzz_case", "FuzzReport", "make_corpus", "mutate", "FACTORY"]

#: the factory name under which generated models are saved (registered by :func:`make_corpus`)
FACTORY = "fxexpand.testing:random_net"


def _random_net(seed: int = 0, **limits):
    return random_model(seed, **limits)[0]


def make_corpus(workdir: Path) -> list[Path]:
    """Write the valid seed files of the fuzzer into ``workdir``."""

    io.register_factory(FACTORY, _random_net)
    workdir.mkdir(parents=True, exist_ok=True)
    files = []
    small = io.build_model("fxexpand:SmallNet")
    files.append(io.save(small, workdir / "smallnet.pt", input_shape=(1, 3, 32, 32)))
    net = io.build_model(FACTORY, seed=3, max_blocks=2, max_channels=6)

    _, (inp,) = random_model(3, max_blocks=2, max_channels=6)
    files.append(io.save(net, workdir / "random_net.pt", input_shape=tuple(inp.shape)))
    expanded = api.compile(small, passes=recipes.netbooster())
    files.append(io.save(expanded, workdir / "expanded.pt", input_shape=(1, 3, 32, 32)))
    sd = workdir / "state_dict.pt"
    torch.save(small.state_dict(), sd)
    files.append(sd)
    return files


def _mutate_bytes(data: bytes, r: random.Random) -> bytes:
    b = bytearray(data)
    if not b:
        return bytes(r.randrange(256) for _ in range(r.randint(1, 16)))
    kind = r.choice(["flip", "set", "insert", "delete", "duplicate", "truncate", "small_int"])
    n = len(b)
    if kind == "flip":
        for _ in range(r.randint(1, 8)):
            i = r.randrange(n)
            b[i] ^= 1 << r.randrange(8)
    elif kind == "set":
        for _ in range(r.randint(1, 8)):
            b[r.randrange(n)] = r.randrange(256)
    elif kind == "small_int":  # interesting values where a length or an opcode argument may sit
        i = r.randrange(n)
        b[i] = r.choice([0, 1, 0x7F, 0x80, 0xFF])
    elif kind == "insert":
        i = r.randrange(n + 1)
        b[i:i] = bytes(r.randrange(256) for _ in range(r.randint(1, 32)))
    elif kind == "delete":
        i = r.randrange(n)
        del b[i:i + r.randint(1, 64)]
    elif kind == "duplicate":
        i = r.randrange(n)
        j = min(n, i + r.randint(1, 64))
        k = r.randrange(n + 1)
        b[k:k] = b[i:j]
    else:  # truncate
        del b[r.randrange(n):]
    return bytes(b)


_ODD_VALUES = [None, 0, -1, 1, 2**40, 1.5, float("nan"), "", "x", "torchvision:resnet18", "os:system", [], {},
               [1, -2], [[1, 2]], {"a": 1}, ("t",), b"bytes", True]


def _odd_value(r: random.Random):
    v = r.choice(_ODD_VALUES + ["tensor"])
    return torch.zeros(r.randint(0, 3)) if v == "tensor" else v


def _mutate_payload(data: bytes, r: random.Random) -> bytes | None:
    """Structure-aware: change one field of an fxexpand payload (or one state_dict entry) and re-save."""
    try:
        obj = torch.load(_io.BytesIO(data), weights_only=True)
    except Exception:
        return None
    if not isinstance(obj, dict) or not obj:
        return None
    sd = obj.get("state_dict") if isinstance(obj.get("state_dict"), dict) else obj
    choice = r.random()
    if choice < 0.4 and sd:
        key = r.choice(sorted(sd))
        t = sd[key]
        op = r.choice(["drop", "reshape", "dtype", "value", "extra"])
        if op == "drop":
            del sd[key]
        elif op == "reshape" and isinstance(t, torch.Tensor):
            sd[key] = torch.zeros(t.numel() + r.choice([-1, 1, 5]) if t.numel() else 1)
        elif op == "dtype" and isinstance(t, torch.Tensor):
            sd[key] = t.to(r.choice([torch.int64, torch.float16, torch.bool, torch.float64]))
        elif op == "value":
            sd[key] = _odd_value(r)
        else:
            sd[key + r.choice(["", ".x", "_extra"]) + "2"] = _odd_value(r)
    else:
        field_ = r.choice(["format", "version", "factory", "kwargs", "input_shape", "recipe", "state_dict"])
        if field_ == "kwargs" and isinstance(obj.get("kwargs"), dict) and r.random() < 0.6:
            obj["kwargs"][r.choice(["seed", "max_blocks", "max_channels", "nd", "num_classes", "zzz"])] = _odd_value(r)
        elif field_ == "recipe" and r.random() < 0.6:
            obj["recipe"] = [[r.choice(["insert_inverted_residual", "linear_expand", "decay_activations", "verify",
                                        "nope"]), {r.choice(["ratio", "fraction", "mode", "targets"]): _odd_value(r)}]]
        elif r.random() < 0.2:
            obj.pop(field_, None)
        else:
            obj[field_] = _odd_value(r)
    buf = _io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def mutate(data: bytes, r: random.Random) -> bytes:
    """One random mutation of a torch zip file: of its raw bytes, of one member re-zipped, or of one
    field of the payload (re-saved, so it is well-formed down to the pickle)."""
    if r.random() < 0.25:
        out = _mutate_payload(data, r)
        if out is not None:
            return out
    if r.random() < 0.4:
        return _mutate_bytes(data, r)
    try:
        zin = zipfile.ZipFile(_io.BytesIO(data))
        members = [(i, zin.read(i.filename)) for i in zin.infolist()]
    except Exception:
        return _mutate_bytes(data, r)
    pkl = [k for k, (i, _) in enumerate(members) if i.filename.endswith("data.pkl")]
    idx = r.choice(pkl) if pkl and r.random() < 0.7 else r.randrange(len(members))
    out = _io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zout:
        for k, (info, content) in enumerate(members):
            if k == idx:
                content = _mutate_bytes(content, r)
            zout.writestr(info.filename, content)
    return out.getvalue()


def fuzz_case(blobs: list[tuple[str, bytes]], seed: int, iteration: int) -> tuple[str, bytes]:
    """The mutated file of ``iteration`` (deterministic: ``seed`` and ``iteration`` reproduce it)."""
    r = random.Random(seed * 1_000_003 + iteration)
    name, data = blobs[r.randrange(len(blobs))]
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        data = mutate(data, r)
    return name, data


@dataclass
class FuzzReport:
    iterations: int
    seed: int
    outcomes: Counter = field(default_factory=Counter)
    cli_outcomes: Counter = field(default_factory=Counter)
    bugs: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.bugs

    def summary(self) -> str:
        lines = [f"fuzz: {self.iterations} iterations (seed {self.seed}) in {self.seconds:.0f}s",
                 "  fxexpand.load: " + ", ".join(f"{k} {v}" for k, v in self.outcomes.most_common()),
                 "  fxexpand contract (CLI): " + (", ".join(f"{k} {v}" for k, v in self.cli_outcomes.most_common())
                                                 or "not run"),
                 f"  bugs (non-fxexpand exceptions, exit code 1, tracebacks, leftover output): {len(self.bugs)}"]
        lines += [f"    {b}" for b in self.bugs[:30]]
        return "\n".join(lines)


def _run_cli(path: Path, out: Path) -> tuple[int, str]:
    err = _io.StringIO()
    with contextlib.redirect_stdout(_io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(["contract", str(path), "-o", str(out), "--no-verify"])
        except SystemExit as e:  # argparse
            rc = int(e.code or 0)
    return rc, err.getvalue()


def fuzz(iterations: int, *, seed: int = 0, cli_every: int = 100, workdir: str | Path | None = None,
         progress: int = 0) -> FuzzReport:
    """Run the fuzzer; returns a :class:`FuzzReport` (``report.ok`` is False if a bug was found)."""

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="fxexpand-fuzz-")
        workdir = tmp.name
    root = Path(workdir)
    corpus = make_corpus(root / "corpus")
    blobs = [(p.name, p.read_bytes()) for p in corpus]
    report = FuzzReport(iterations, seed)
    start = time.time()
    case = root / "case.pt"
    out = root / "out.onnx"
    try:
        for it in range(iterations):
            name, data = fuzz_case(blobs, seed, it)
            case.write_bytes(data)
            where = f"iteration {it} ({name})"
            try:
                io.load(case)
                report.outcomes["loaded"] += 1
            except FxExpandError as e:
                report.outcomes[type(e).__name__] += 1
            except Exception as e:  # noqa: BLE001 - the property under test
                report.outcomes["BUG"] += 1
                report.bugs.append(f"{where}: fxexpand.load raised {type(e).__name__}: {str(e)[:200]}")
                _keep(root, case, it)
            if cli_every and it % cli_every == 0:
                if out.exists():
                    out.unlink()
                rc, err = _run_cli(case, out)
                report.cli_outcomes[f"exit {rc}"] += 1
                problem = ("exit code 1 (internal error)" if rc == 1 else
                           "a traceback on stderr" if "Traceback" in err else
                           "an output file after a failure" if rc != 0 and out.exists() else
                           f"unexpected exit code {rc}" if rc not in (0, 2) else "")
                if problem:
                    report.bugs.append(f"{where}: CLI gave {problem}: {' '.join(err.split())[:200]}")
                    _keep(root, case, it)
            if progress and (it + 1) % progress == 0:
                print(f"... {it + 1} iterations, {len(report.bugs)} bugs, {time.time() - start:.0f}s", flush=True)
    finally:
        report.seconds = time.time() - start
        if tmp is not None and report.ok:
            tmp.cleanup()
        elif tmp is not None:
            print(f"failing files kept in {root / 'failures'}")
    return report


def _keep(root: Path, case: Path, it: int) -> None:
    d = root / "failures"
    d.mkdir(exist_ok=True)
    shutil.copy(case, d / f"iteration{it}.pt")
