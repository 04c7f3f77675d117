"""Every script in examples/ runs (with small settings)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_netbooster_digits():
    assert 0.0 <= _load("netbooster_digits").main(["--epochs", "3"]) <= 1.0


def test_expandnets_digits():
    assert _load("expandnets_digits").main(["--epochs", "5", "--init", "preserve"]) > 0.5


def test_torchvision_synthetic():
    small = _load("torchvision_synthetic").main(["--steps", "2", "--epochs", "2", "--size", "32"])
    assert small.fxexpand_report.verification.passed
