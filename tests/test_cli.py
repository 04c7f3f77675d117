"""The `fxexpand` CLI and fxexpand.save/load: success paths and every bad-input path (exit 2)."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import fxexpand
from fxexpand import LoadError
from fxexpand.cli import main
from fxexpand.testing import randomize_bn

from . import factories


def run_cli(*args):
    return main(["contract", *map(str, args)])


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["contract", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--input-shape", "--no-verify", "--bench", "--trust-pickle", "--allow-factory", "--target"):
        assert opt in out


def test_torchvision_name_contract_and_bench(tmp_path, capsys):
    out = tmp_path / "r.onnx"
    assert run_cli("torchvision:resnet18", "-o", out, "--input-shape", "1,3,32,32", "--bench", "--runs", "3") == 0
    text = capsys.readouterr().out
    assert out.exists()
    for word in ("parameters", "FLOPs", "ORT latency", "max abs error", "wrote"):
        assert word in text


def test_fxexpand_file_round_trip(tmp_path, capsys):
    fxexpand.register_factory("tests:tiny", factories.tiny)
    model = randomize_bn(fxexpand.build_model("tests:tiny", width=6)).eval()
    path = fxexpand.save(model, tmp_path / "tiny.pt", input_shape=(2, 3, 10, 10))
    # weights-only loadable: no code runs
    payload = torch.load(path, weights_only=True)
    assert payload["factory"] == "tests:tiny" and payload["kwargs"] == {"width": 6}
    loaded = fxexpand.load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    assert run_cli(path, "-o", tmp_path / "tiny.onnx", "--no-verify") == 0
    assert "(2, 3, 10, 10)" in capsys.readouterr().out


def test_allow_factory_flag(tmp_path):
    fxexpand.save(factories.tiny(), tmp_path / "t.pt", factory="tests.factories:tiny", input_shape=(1, 3, 8, 8))
    assert run_cli(tmp_path / "t.pt", "-o", tmp_path / "t.onnx") == 2
    assert run_cli(tmp_path / "t.pt", "-o", tmp_path / "t.onnx", "--allow-factory", "tests.factories:tiny") == 0


def test_disallowed_factory_is_never_imported(tmp_path, capsys):
    fxexpand.save(factories.tiny(), tmp_path / "e.pt", factory="tests.factories:evil")
    out = tmp_path / "e.onnx"
    assert run_cli(tmp_path / "e.pt", "-o", out) == 2
    err = capsys.readouterr().err
    assert "not on the allow-list" in err and "--allow-factory" in err
    assert factories.CALLED == [] and not out.exists()
    with pytest.raises(LoadError):
        fxexpand.load(tmp_path / "e.pt")


def test_pickled_module_needs_trust(tmp_path, capsys):
    path = tmp_path / "pickled.pt"
    torch.save(factories.tiny(), path)
    out = tmp_path / "p.onnx"
    assert run_cli(path, "-o", out, "--input-shape", "1,3,8,8") == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "runs code" in err and not out.exists()
    assert run_cli(path, "-o", out, "--input-shape", "1,3,8,8", "--trust-pickle") == 0 and out.exists()


def _bad_files(tmp_path):
    good = tmp_path / "good.pt"
    fxexpand.save(fxexpand.build_model("torchvision:resnet18"), good)
    data = good.read_bytes()
    files = {}
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["garbage"] = tmp_path / "garbage.pt"
    files["garbage"].write_bytes(bytes(range(256)) * 10)
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["tensor"] = tmp_path / "tensor.pt"
    torch.save(torch.randn(3), files["tensor"])
    files["state_dict"] = tmp_path / "sd.pt"
    torch.save(nn.Linear(2, 2).state_dict(), files["state_dict"])
    files["missing"] = tmp_path / "missing.pt"
    files["directory"] = tmp_path
    return files


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "tensor", "state_dict", "missing", "directory"])
def test_bad_model_files(tmp_path, capsys, kind):
    path = _bad_files(tmp_path)[kind]
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")  # an existing output must survive a failure
    assert run_cli(path, "-o", out) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert out.read_bytes() == b"previous"
    with pytest.raises(LoadError):
        fxexpand.load(path)
    if kind == "state_dict":
        assert "state_dict" in err


def test_wrong_input_shape_and_untraceable(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert run_cli("torchvision:resnet18", "-o", out, "--input-shape", "1,5,32,32") == 2
    assert "input" in capsys.readouterr().err
    path = tmp_path / "dd.pt"
    torch.save(factories.DataDependentNet(), path)
    assert run_cli(path, "-o", out, "--input-shape", "1,3,8,8", "--trust-pickle") == 2
    err = capsys.readouterr().err
    assert "could not trace" in err and "leaf_modules" in err
    assert not out.exists()


@pytest.mark.parametrize("bad", ["1,x,3", "0,3,8,8", ""])
def test_bad_input_shape_syntax(tmp_path, bad):
    with pytest.raises(SystemExit) as ei:
        run_cli("torchvision:resnet18", "-o", tmp_path / "o.onnx", "--input-shape", bad)
    assert ei.value.code == 2


def test_bad_output_paths(tmp_path, capsys):
    assert run_cli("torchvision:resnet18", "-o", tmp_path / "nope" / "o.onnx") == 2
    assert "does not exist" in capsys.readouterr().err
    assert run_cli("torchvision:not_a_model", "-o", tmp_path / "o.onnx") == 2
    assert "no model builder" in capsys.readouterr().err


def test_console_script_errors_without_traceback(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00\x01junk")
    proc = subprocess.run([sys.executable, "-m", "fxexpand", "contract", str(bad), "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not a readable model file" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_save_requires_factory():
    with pytest.raises(ValueError, match="factory"):
        fxexpand.save(nn.Linear(2, 2), "/tmp/never.pt")
