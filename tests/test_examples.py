"""Every script in examples/ runs (with small settings)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Bounds learned from the data (2026-11-29, seeds 0-4 of each example at these settings): NetBooster
# after 3 epochs reached 0.30-0.54 test accuracy, ExpandNets-CL+preserve after 5 epochs 0.64-0.93;
# chance on digits is 0.10. A bound near the lowest seed, well above chance, catches a broken
# training loop, decay schedule or contraction without flaking on the seed's spread.
def test_netbooster_digits():
    assert _load("netbooster_digits").main(["--epochs", "3"]) > 0.25


def test_expandnets_digits():
    assert _load("expandnets_digits").main(["--epochs", "5", "--init", "preserve"]) > 0.55


def test_torchvision_synthetic():
    small = _load("torchvision_synthetic").main(["--steps", "2", "--epochs", "2", "--size", "32"])
    assert small.fxexpand_report.verification.passed
