"""Hostile and broken inputs not already covered by tests/test_cli.py, test_trace.py, test_verify.py,
test_expansion.py and test_expanded_io.py (docs/testing.md maps every case to its test).

Library: a typed FxExpandError whose message says what to do. CLI: one paragraph, exit code 2, no
traceback, no output file left behind.
"""

import os
import random

import pytest
import torch
from torch import nn

import fxexpand
from fxexpand import EquivalenceError, InputError, LoadError
from fxexpand.cli import main
from fxexpand.testing import randomize_bn

from . import factories


def run_cli(*args):
    return main(["contract", *map(str, args)])


def _assert_clean_failure(capsys, out, *words):
    err = capsys.readouterr().err
    assert "fxexpand: error:" in err and "Traceback" not in err, err
    assert err.strip().count("\n\n") == 0  # one paragraph
    for w in words:
        assert w in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no temporary left
    return err


# -- a layer type no pass knows: skipped, named in the report, not a crash -------------------------
class Opaque(nn.Module):
    """A user layer kept as a leaf call (it has data-dependent control flow)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return x * self.scale if x.sum() > 0 else -x * self.scale


def _unknown_layers_model():
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm([6, 6]), nn.PReLU(),
                                      Opaque(), nn.GroupNorm(2, 4), nn.Conv2d(4, 2, 1))).eval()


@pytest.mark.parametrize("target", ["deploy", "original"])
def test_unknown_layer_types_are_skipped_and_named(target):
    model, x = _unknown_layers_model(), torch.randn(2, 3, 8, 8)
    small = fxexpand.contract(model, (x,), target=target, leaf_modules=[Opaque])
    report = small.fxexpand_report
    skipped = {n.where: n.reason for n in report.skipped}
    for name, kind in (("2", "LayerNorm"), ("3", "PReLU"), ("4", "Opaque"), ("5", "GroupNorm")):
        assert kind in skipped[name] and "no fxexpand pass rewrites" in skipped[name]
    assert "skipped" in str(report) and report.verification.passed
    if target == "deploy":
        assert any(n.action == "folded" for n in report.notes)  # the rest is still contracted
    assert not any(n.where in ("0", "1", "6") for n in report.skipped)  # known layers are not listed


def test_unknown_layer_types_on_the_cli(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([6, 6]), nn.PReLU()), path)
    out = tmp_path / "m.onnx"
    assert run_cli(path, "-o", out, "--input-shape", "1,3,8,8", "--trust-pickle", "--report") == 0
    text = capsys.readouterr().out
    assert "LayerNorm is a layer type no fxexpand pass rewrites" in text and out.exists()


# -- example inputs of the wrong shape or dtype ----------------------------------------------------
@pytest.mark.parametrize("shape,dtype", [((2, 5, 8, 8), torch.float32), ((2, 3, 8), torch.float32),
                                         ((2, 3, 8, 8), torch.float64), ((2, 3, 8, 8), torch.int64),
                                         ((2, 3, 8, 8), torch.float16)])
def test_wrong_example_inputs_are_input_errors(shape, dtype):
    bad = torch.ones(shape, dtype=dtype)
    model = factories.tiny().eval()
    for call in (lambda: fxexpand.contract(model, (bad,)),
                 lambda: fxexpand.compile(model, passes=fxexpand.recipes.netbooster(), example_inputs=(bad,))):
        with pytest.raises(InputError, match="example inputs .* that the model accepts") as ei:
            call()
        assert str(tuple(bad.shape)) in str(ei.value) and str(bad.dtype) in str(ei.value)
    with pytest.raises(InputError, match="example_inputs"):
        fxexpand.verify(model, model, (bad,))
    with pytest.raises(InputError, match="tensor or a tuple"):
        fxexpand.contract(model, "not a tensor")


# -- NaN / Inf weights: never verified silently -----------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["0.weight", "1.running_var", "5.bias"])
def test_nonfinite_weights_are_refused(value, where):
    model = factories.tiny().eval()
    with torch.no_grad():
        dict(model.named_parameters(), **dict(model.named_buffers()))[where].view(-1)[0] = value
    for verify in (True, False):
        with pytest.raises(InputError, match=rf"NaN or Inf weights: {where.replace('.', '[.]')} \(1 of"):
            fxexpand.contract(model, (torch.randn(1, 3, 8, 8),), verify=verify)
    # verify() on its own never passes non-finite weights either (an Inf running_var gives finite outputs)
    with pytest.raises(EquivalenceError, match=rf"reference model has NaN or Inf weights: {where.replace('.', '[.]')}"):
        fxexpand.verify(model, model, (torch.randn(1, 3, 8, 8),))


@pytest.mark.parametrize("flag", [[], ["--no-verify"]])
def test_nonfinite_weights_on_the_cli(tmp_path, capsys, flag):
    fxexpand.register_factory("tests:tiny", factories.tiny)
    model = fxexpand.build_model("tests:tiny")
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    path = fxexpand.save(model, tmp_path / "nan.pt", input_shape=(1, 3, 8, 8))
    out = tmp_path / "nan.onnx"
    assert run_cli(path, "-o", out, *flag) == 2
    _assert_clean_failure(capsys, out, "NaN or Inf weights", "0.weight")


# -- output paths ----------------------------------------------------------------------------------
def test_output_directory_not_writable(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "o.onnx"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    assert run_cli("torchvision:resnet18", "-o", out, "--input-shape", "1,3,32,32") == 2
    _assert_clean_failure(capsys, out, "not writable", "choose another output path")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_output_directory_read_only_for_real(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert run_cli("torchvision:resnet18", "-o", ro / "o.onnx", "--input-shape", "1,3,32,32") == 2
        _assert_clean_failure(capsys, ro / "o.onnx", "not writable")
    finally:
        ro.chmod(0o700)


def test_output_directory_that_refuses_files(capsys):
    """Regression: os.access says yes (e.g. to root, or on /proc) but creating the file fails; this
    was an 'internal error' (exit 1, FileNotFoundError from mkstemp)."""
    from pathlib import Path

    out = Path("/proc/fxexpand-test.onnx")
    if not Path("/proc").is_dir():
        pytest.skip("no /proc")
    assert run_cli("torchvision:resnet18", "-o", out, "--input-shape", "1,3,32,32") == 2
    err = capsys.readouterr().err
    assert "cannot create files in the directory /proc" in err and "Traceback" not in err
    with pytest.raises(fxexpand.ExportError, match="choose another output path"):
        fxexpand.export_onnx(nn.Linear(2, 2), (torch.randn(1, 2),), out)


def test_output_path_under_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run_cli("torchvision:resnet18", "-o", f / "o.onnx", "--input-shape", "1,3,32,32") == 2
    assert "is not a directory" in capsys.readouterr().err


# -- malformed fxexpand payloads (valid torch files, wrong content) ---------------------------------
def _payload(**over):
    p = {"format": "fxexpand.model", "version": 1, "factory": "torchvision:resnet18", "kwargs": {},
         "input_shape": [1, 3, 32, 32], "recipe": [], "state_dict": {}}
    p.update(over)
    return p


@pytest.mark.parametrize("over,words", [
    (dict(version=99), "format version"),
    (dict(factory=123), "invalid model factory"),
    (dict(factory="os:system"), "not on the allow-list"),
    (dict(factory="torchvision:not_a_model"), "no model builder"),
    (dict(kwargs=[1, 2]), "malformed payload"),
    (dict(kwargs={"num_classes": -3}), "failed with arguments"),
    (dict(kwargs={"no_such_argument": 1}), "failed with arguments"),
    (dict(state_dict={"fc.weight": torch.zeros(2, 2)}), "do not fit"),
    (dict(recipe="netbooster"), "malformed pass recipe"),
    (dict(recipe=[["no_such_pass", {}]]), "not registered"),
    (dict(recipe=[["insert_inverted_residual", {"ratio": "six"}]]), "rejected its recorded arguments"),
])
def test_malformed_payloads(tmp_path, capsys, over, words):
    path = tmp_path / "bad.pt"
    torch.save(_payload(**over), path)
    with pytest.raises(LoadError, match=words):
        fxexpand.load(path)
    out = tmp_path / "bad.onnx"
    assert run_cli(path, "-o", out) == 2
    _assert_clean_failure(capsys, out, words)


def test_bad_input_shape_recorded_in_file(tmp_path):
    model = fxexpand.build_model("torchvision:resnet18")
    path = tmp_path / "r.pt"
    torch.save(_payload(state_dict=model.state_dict(), input_shape=[1, -3, 32]), path)
    with pytest.raises(LoadError, match="invalid input shape"):
        fxexpand.load(path)


# -- fuzzing: mutated model files only ever raise fxexpand's errors ----------------------------------
def test_fuzz_short_run(tmp_path):
    """A short run of `python -m fxexpand.testing fuzz` (the 10,000-iteration run is in docs/testing.md)."""
    from fxexpand.testing import fuzz

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = fuzz(300, seed=7, cli_every=60, workdir=tmp_path)
    finally:
        torch.set_num_threads(n)
    assert report.ok, report.summary()
    assert report.outcomes["LoadError"] > 100 and sum(report.cli_outcomes.values()) == 5
    assert report.outcomes["loaded"] > 0  # some mutations (e.g. of weight bytes) still load: a real mix


def test_fuzz_mutations_are_reproducible():
    from fxexpand.testing import mutate

    data = bytes(range(256)) * 4
    a = [mutate(data, random.Random(i)) for i in range(20)]
    b = [mutate(data, random.Random(i)) for i in range(20)]
    assert a == b and sum(x != data for x in a) >= 18


def test_regression_fuzz_seed3_iteration6(tmp_path):
    """Found by `fuzz --seed 3`: iteration 6 replaced the recipe of expanded.pt with an empty tensor
    and `obj.get("recipe") or []` raised RuntimeError (ambiguous truth value) instead of LoadError."""
    from fxexpand.testing import fuzz_case, make_corpus

    blobs = [(p.name, p.read_bytes()) for p in make_corpus(tmp_path / "corpus")]
    name, data = fuzz_case(blobs, 3, 6)
    path = tmp_path / "case.pt"
    path.write_bytes(data)
    with pytest.raises(LoadError):
        fxexpand.load(path)


@pytest.mark.parametrize("over", [dict(recipe=torch.zeros(0)), dict(recipe=torch.ones(2)), dict(version=torch.ones(1)),
                                  dict(version=True), dict(kwargs={1: 2}), dict(recipe={"a": 1})])
def test_payload_fields_of_the_wrong_type(tmp_path, over):
    path = tmp_path / "bad.pt"
    torch.save(_payload(**over), path)
    with pytest.raises(LoadError):
        fxexpand.load(path)
