"""The application packages (docs/architecture.md) and the old flat module paths they replaced:
every old path still imports, warns with a DeprecationWarning, and gives the very objects of its
new home; the public names users import stay where they were."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

import fxexpand
from fxexpand._deprecated import MOVED

OLD_PATHS = sorted(MOVED)


def _forget(monkeypatch, old: str) -> None:
    """Make the next ``import old`` run the alias module again (restored after the test)."""
    monkeypatch.delitem(sys.modules, old, raising=False)
    name = old.rsplit(".", 1)[1]
    if name in vars(fxexpand):  # not hasattr: that would import the alias through fxexpand.__getattr__
        monkeypatch.delattr(fxexpand, name)


@pytest.mark.parametrize("old", OLD_PATHS)
def test_old_module_path_warns_and_is_the_new_module(monkeypatch, old):
    _forget(monkeypatch, old)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(MOVED[old])
    assert sys.modules[old] is mod


@pytest.mark.parametrize("old", OLD_PATHS)
def test_old_module_as_an_attribute_of_the_package_warns(monkeypatch, old):
    """``import fxexpand; fxexpand.schedule.decay_modules(...)`` worked before the move."""
    _forget(monkeypatch, old)
    with pytest.warns(DeprecationWarning, match="moved to"):
        mod = getattr(fxexpand, old.rsplit(".", 1)[1])
    assert mod is importlib.import_module(MOVED[old])


def test_unknown_attribute_of_the_package_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_module'"):
        fxexpand.no_such_module  # noqa: B018


def test_old_names_resolve_to_the_same_objects(monkeypatch):
    for old in OLD_PATHS:
        _forget(monkeypatch, old)
    with pytest.warns(DeprecationWarning):
        from fxexpand.bench import _alternate_in_child, compare_onnx
        from fxexpand.data import mnist1d
        from fxexpand.models import SmallNet
        from fxexpand.protocols import netbooster
        from fxexpand.schedule import decay_modules
        from fxexpand.train import Trainer
    from fxexpand.demo import data, models
    from fxexpand.deploy import bench
    from fxexpand.training import protocols, schedule, train
    assert compare_onnx is bench.compare_onnx is fxexpand.compare_onnx
    assert _alternate_in_child is bench._alternate_in_child  # the alias is the module: private names too
    assert mnist1d is data.mnist1d and SmallNet is models.SmallNet and netbooster is protocols.netbooster
    assert decay_modules is schedule.decay_modules and Trainer is train.Trainer


def test_exit_policy_alias_keeps_its_names_and_warns(monkeypatch):
    _forget(monkeypatch, "fxexpand.exit_policy")
    with pytest.warns(DeprecationWarning, match="fxexpand.exit_policy moved to fxexpand.exits.policy"):
        ep = importlib.import_module("fxexpand.exit_policy")
    from fxexpand.demo.early_exits import plot_curves
    from fxexpand.exits import policy
    assert ep.ExitPolicy is policy.Policy is fxexpand.exits.Policy  # one policy type
    assert ep.plot_curves is plot_curves
    assert ep.fit_policy is policy.fit_policy and set(policy.__all__) | {"plot_curves"} == set(ep.__all__)


def test_new_homes_import_without_warnings():
    code = ("import warnings; warnings.simplefilter('error')\n"
            "import fxexpand, fxexpand.cli, fxexpand.testing, fxexpand.demo, fxexpand.exits\n"
            "from fxexpand.demo import DigitsNet, load_digits, DemoConfig\n"
            "from fxexpand.exits import fit, Runner, Policy, loss\n"
            "from fxexpand.training import Trainer, DecaySchedule, protocols\n"
            "from fxexpand.deploy import export_onnx, compare_onnx, count_flops, expansion_report\n"
            "import fxexpand.deploy._ort_child\n"
            "assert not any(m in __import__('sys').modules for m in %r)\n" % (OLD_PATHS + ["fxexpand.exit_policy"]))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_python_dash_m_fxexpand_runs_the_cli():
    res = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-m", "fxexpand", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "demo" in res.stdout and "expand" in res.stdout


def test_policy_reads_a_policy_json_written_before_the_merge():
    """exits.Policy and exit_policy.ExitPolicy are one type; a policy.json without "fractions"
    (written before the merge) still loads, and a fitted policy round-trips."""
    from fxexpand.exits import Policy

    torch.manual_seed(0)
    old = {"thresholds": [0.9, None], "temperatures": [0.5], "boost": True, "step_costs": [1.0, 2.0], "p": 0.3,
           "budget": 2.1}
    pol = Policy.from_dict(old)
    assert pol == Policy(thresholds=[0.9, float("-inf")], p=0.3, budget=2.1, temperatures=[0.5], boost=True,
                         step_costs=[1.0, 2.0])
    back = Policy.from_dict(json.loads(json.dumps(pol.to_dict(), allow_nan=False)))
    assert back == pol and back.fractions == []


def test_fit_returns_one_policy_with_the_model_side_filled_in():
    from fxexpand import exits
    from fxexpand.demo import DigitsNet
    from fxexpand.passes import InsertEarlyExits

    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8)
    multi = fxexpand.compile(DigitsNet(), passes=[InsertEarlyExits(at="stages")], example_inputs=(x,)).eval()
    data = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    pol = exits.fit(multi, data, budget=0.7, example_inputs=x[:1])
    rec = exits.exit_record(multi)
    assert type(pol) is exits.Policy
    assert pol.temperatures == list(rec.temperatures) and pol.boost is rec.boost
    assert pol.step_costs == exits.exit_costs(multi, x[:1])["flops"]
    assert len(pol.fractions) == len(pol.thresholds) == rec.num_exits and sum(pol.fractions) == pytest.approx(1.0)
    assert pol.budget == pytest.approx(0.7 * sum(pol.step_costs))
