"""The Python examples in README.md and docs/ run as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"tracing.md[{block}]", "exec"), {"__name__": "__doc__"})
