"""The shape docs/architecture.md promises, checked: layers (import-linter), passes using only
public engine names, no function-local imports, one name per pass, a test file per pass."""

import ast
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fxexpand
import fxexpand.core as core
import fxexpand.passes as passes
from fxexpand.core import Pass

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fxexpand"

# function-local imports that are allowed: optional dependencies and documented lazy loads
ALLOWED_LOCAL_IMPORTS = {
    ("core/trace.py", "torchvision.ops"),  # torchvision is optional for the engine
    ("io.py", "timm"),  # optional extra fxexpand[timm], only a timm:<name> factory needs it (~4 s to import)
    ("training/train.py", "lightning.pytorch"),  # optional extra
    ("training/train.py", "pytorch_lightning"),  # optional extra (old package name)
    ("testing/__init__.py", "hypothesis.strategies"),  # dev extra
    # documented lazy loads of heavy imports that one function needs (import time of `import fxexpand`)
    ("io.py", "torchvision.models"),  # pulls in torch._dynamo: ~2 s
    ("demo/compare.py", "sklearn.datasets"),  # scikit-learn: ~1 s, only for the digits data
    ("demo/compare.py", "sklearn.model_selection"),
    ("demo/compare.py", "scipy"),  # ~0.3 s, only the demo's confidence intervals
    ("demo/compare.py", "matplotlib.figure"),  # only the demo's plot
    ("demo/early_exits.py", "matplotlib.figure"),  # only the exits demo's plot
    ("demo/data.py", "mnist1d.data"),  # imports requests and matplotlib (~0.5 s); only MNIST-1D needs it
    ("demo/data.py", "sklearn.datasets"),
    ("core/channels.py", "networkx"),  # ~0.13 s, only width growth needs it
    ("deploy/export.py", "onnx"),  # ~0.05 s, only export needs it
    ("deploy/export.py", "onnxruntime"),  # ~0.07 s, only export and timing need it
    ("deploy/bench.py", "onnxruntime"),
    ("exits/runtime.py", "onnxruntime"),  # ~0.07 s, only the early-exit runner needs it
}


def _lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.fail("import-linter is a dev dependency: pip install -e '.[dev]'")
    env = None
    if pythonpath is not None:
        import os

        env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([exe, "--config", str(cwd / "pyproject.toml")], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_import_linter_contracts_are_kept():
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 kept, 0 broken" in res.stdout


def _lint_copy_with(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """``lint-imports`` on a copy of the package where ``module`` (a path under fxexpand/, a new
    module if there is none) ends with ``line``."""
    shutil.copytree(PKG, tmp_path / "fxexpand", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "fxexpand" / module
    text = path.read_text() if path.exists() else '"""A new module."""\n'
    path.write_text(text + f"\n{line}  # noqa\n")
    return _lint_imports(tmp_path, pythonpath=tmp_path)


@pytest.mark.parametrize("module, line, chain", [
    # the engine importing a pass
    ("core/fx.py", "from fxexpand.passes import fold_batchnorm", "fxexpand.core.fx -> fxexpand.passes"),
    # a new module in an application package inherits its layer: deploy is below training
    ("deploy/new_module.py", "from fxexpand.training import schedule",
     "fxexpand.deploy.new_module -> fxexpand.training"),
    # the engine importing an application through a deprecated old path: a chain through the alias
    ("api.py", "import fxexpand.train", "fxexpand.api -> fxexpand.train"),
    # an application composing passes itself instead of asking pipelines
    ("exits/model.py", "from fxexpand.passes import RemoveExits", "fxexpand.exits.model -> fxexpand.passes"),
])
def test_import_linter_contracts_bite(tmp_path, module, line, chain):
    """The contracts can fail: a copy of the package with one forbidden import is refused."""
    res = _lint_copy_with(tmp_path, module, line)
    assert res.returncode != 0, res.stdout
    assert chain in res.stdout, res.stdout


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, tree


def test_passes_import_only_public_core_names():
    public = set(core.__all__)
    for path in sorted((PKG / "passes").glob("*.py")):
        for node, _ in _imports(path):
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("fxexpand") for a in node.names), f"{path.name}: {ast.unparse(node)}"
                continue
            if node.level == 0:
                assert not (node.module or "").startswith("fxexpand"), f"{path.name}: use relative imports of ..core"
                continue
            if node.level == 1:  # the package's own modules (only __init__ does this)
                assert path.name == "__init__.py", f"{path.name} imports another pass module: {ast.unparse(node)}"
                continue
            assert node.level == 2 and node.module == "core", f"{path.name}: {ast.unparse(node)} (only ..core)"
            bad = [a.name for a in node.names if a.name not in public]
            assert not bad, f"{path.name} imports non-public core names {bad}"


def test_no_private_names_imported_across_modules():
    """No module imports another module's ``_``-prefixed names: what two modules share has a public
    name (demo/common.py, deploy.bench.time_alternately). Importing a private *module* of the
    package (``from . import _deprecated``, ``from ._helpers import snapshot``) is fine."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        for node, _ in _imports(path):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0 and not (node.module or "").startswith("fxexpand"):
                continue
            base = PKG.joinpath(*rel.parts[:-1][:len(rel.parts) - node.level]) if node.level else ROOT
            target = base.joinpath(*(node.module or "").split(".")) if node.module else base
            for a in node.names:
                is_module = (target / f"{a.name}.py").is_file() or (target / a.name / "__init__.py").is_file()
                if a.name.startswith("_") and not a.name.startswith("__") and not is_module:
                    found.append(f"{rel.as_posix()}:{node.lineno} {ast.unparse(node)}")
    assert not found, "private names imported from another module (give them a public home):\n" + "\n".join(found)


def test_no_function_local_imports():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if (rel, mod) not in ALLOWED_LOCAL_IMPORTS:
                        found.append(f"{rel}:{node.lineno} {ast.unparse(node)}")
    assert not found, "function-local imports (hoist them, or allow an optional dependency):\n" + "\n".join(found)


def test_one_name_per_pass():
    classes = [getattr(passes, n) for n in passes.__all__]
    assert all(inspect.isclass(c) and issubclass(c, Pass) for c in classes)
    assert len({id(c) for c in classes}) == len(classes), "a pass is exported under two names"
    assert all(c.__name__ == n for c, n in zip(classes, passes.__all__))
    # no alias anywhere in the package: every pass class is bound to its own name only
    for c in classes:
        module = sys.modules[c.__module__]
        names = [k for k, v in vars(module).items() if v is c]
        assert names == [c.__name__], f"{c.__name__} is also bound as {names}"
    assert set(fxexpand.registered_passes().values()) == set(classes)


@pytest.mark.parametrize("name", sorted(fxexpand.registered_passes()))
def test_every_pass_has_its_test_file(name):
    path = ROOT / "tests" / "passes" / f"test_{name}.py"
    assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    text = path.read_text()
    for what in ("def test_before_expected", "def test_negative", "float64", "float32", "assert_graph_matches"):
        assert what in text, f"{path.name} has no `{what}` (Before/Expected, negative, float64 and float32 tests)"


def test_pass_docstrings_state_pattern_and_preconditions():
    for name in passes.__all__:
        module_doc = sys.modules[getattr(passes, name).__module__].__doc__ or ""
        assert name in module_doc.split("\n")[0], f"{name}: the module docstring starts with the pass name"
        assert "Pattern" in module_doc or "pattern" in module_doc, f"{name}: no pattern in the docstring"
