"""The Python examples in README.md and docs/ run as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import fxexpand
from fxexpand.core import unregister_pass

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _doc_passes_stay_local():
    """Examples register passes of their own (``my_pass``, ``remove_unit_scale``); the registry the
    other tests see (tests/test_architecture.py compares it with fxexpand.passes) stays as it was."""
    before = set(fxexpand.registered_passes())
    yield
    for name in set(fxexpand.registered_passes()) - before:
        unregister_pass(name)


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = _blocks(ROOT / "README.md")
    assert blocks, "README has a Python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("block", range(len(_blocks(ROOT / "docs" / "tracing.md"))))
def test_tracing_doc_examples_run(block, tmp_path, monkeypatch):
    code = _blocks(ROOT / "docs" / "tracing.md")[block]
    if "model" in code and "fxexpand.trace(model" in code and "class " not in code:
        pytest.skip("a usage sketch with placeholder names, not a complete example")
    assert "assert " in code, "an executed example states what it shows (an assert), or it tests nothing"
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"tracing.md[{block}]", "exec"), {"__name__": "__doc__"})


@pytest.mark.parametrize("doc,block", [(d, i) for d in ("index.md", "expansion.md", "training.md", "testing.md", "growth.md",
                                                                 "netaug.md", "exits.md")
                                       for i in range(len(_blocks(ROOT / "docs" / d)))])
def test_guide_examples_run(doc, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _blocks(ROOT / "docs" / doc)[block]
    assert "assert " in code, "an executed example states what it shows (an assert), or it tests nothing"
    exec(compile(code, f"{doc}[{block}]", "exec"), {"__name__": "__doc__"})


def test_architecture_worked_example_runs(tmp_path, monkeypatch):
    """docs/architecture.md's blocks (a pass module, its test file, its use) run in order in one
    namespace; then every ``test_*`` function the page defines is called, as pytest would."""
    blocks = _blocks(ROOT / "docs" / "architecture.md")
    assert len(blocks) >= 3, "architecture.md has the worked example: pass, tests, use"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__architecture__"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"architecture.md[{i}]", "exec"), namespace)
    tests = {name: fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)}
    assert {"test_before_expected", "test_float64_same_function", "test_float32_same_function"} <= set(tests)
    assert any(name.startswith("test_negative") for name in tests)
    for fn in tests.values():
        fn()


def test_api_reference_is_current():
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_api.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
