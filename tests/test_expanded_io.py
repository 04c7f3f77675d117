"""Saving, loading and CLI use of expanded models."""

import pytest
import torch
from torch import nn

import fxexpand
from fxexpand import LoadError
from fxexpand.cli import main
from fxexpand.passes import InsertInvertedResidual
from fxexpand.testing import rel_error


def _expanded():
    base = fxexpand.build_model("fxexpand:SmallNet")
    e = fxexpand.compile(base, passes=fxexpand.recipes.netbooster(fraction=1.0) + fxexpand.recipes.expandnets("FC", ratio=2))
    with torch.no_grad():
        for p in e.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "trained" weights
    return e


def test_save_load_rebuilds_expanded_model(tmp_path):
    e = _expanded()
    fxexpand.LinearDecay(e, total_steps=10).step(4)
    path = fxexpand.save(e, tmp_path / "e.pt", input_shape=(2, 3, 32, 32))
    payload = torch.load(path, weights_only=True)  # no code runs to read it
    assert [r[0] for r in payload["recipe"]] == ["insert_inverted_residual", "decay_activations", "linear_expand"]
    loaded = fxexpand.load(path)
    x = torch.randn(2, 3, 32, 32)
    e.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(e(x), loaded(x))
    assert fxexpand.get_decay(loaded) == pytest.approx(0.4)
    assert fxexpand.LinearDecay(loaded, total_steps=10).global_step == 4  # the schedule resumes


def test_expanded_file_contracts_on_the_cli(tmp_path, capsys):
    e = _expanded()
    fxexpand.set_decay(e, 1.0)
    path = fxexpand.save(e, tmp_path / "e.pt", input_shape=(2, 3, 32, 32))
    out = tmp_path / "small.onnx"
    assert main(["contract", str(path), "-o", str(out), "--target", "original"]) == 0
    assert out.exists() and "expanded by" in capsys.readouterr().out
    small = fxexpand.contract(fxexpand.load(path).eval(), (torch.randn(2, 3, 32, 32),))
    fresh = fxexpand.demo.models.SmallNet().eval()
    fresh.load_state_dict(small.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_error(e.eval()(x), fresh(x)) <= 1e-4


def test_cli_expand_then_contract(tmp_path, capsys):
    path = tmp_path / "exp.pt"
    assert main(["expand", "--model", "fxexpand:SmallNet", "--recipe", "netbooster", "-o", str(path),
                 "--input-shape", "1,3,32,32"]) == 0
    text = capsys.readouterr().out
    assert "expanded" in text and "contracted" in text and path.exists()
    # alpha = 0: contraction must refuse, with exit code 2 and no output
    out = tmp_path / "m.onnx"
    assert main(["contract", str(path), "-o", str(out)]) == 2
    assert "not linear yet" in capsys.readouterr().err and not out.exists()
    assert main(["expand", "--model", "fxexpand:SmallNet", "--recipe", "netbooster", "-o", str(path),
                 "--input-shape", "1,3,32,32", "--alpha", "1"]) == 0
    assert main(["contract", str(path), "-o", str(out)]) == 0 and out.exists()


def test_recipe_with_unknown_pass_is_refused(tmp_path):
    e = _expanded()
    path = fxexpand.save(e, tmp_path / "e.pt")
    payload = torch.load(path, weights_only=True)
    payload["recipe"][0][0] = "os_system"
    torch.save(payload, path)
    with pytest.raises(LoadError, match="not registered"):
        fxexpand.load(path)


def test_unrecordable_recipe_cannot_be_saved(tmp_path):
    base = fxexpand.build_model("fxexpand:SmallNet")
    e = fxexpand.compile(base, passes=[InsertInvertedResidual(targets=lambda n, m: True, kernel_size="match")])
    with pytest.raises(ValueError, match="cannot be recorded"):
        fxexpand.save(e, tmp_path / "e.pt")
    assert not (tmp_path / "e.pt").exists()


def test_torch_save_round_trips_fxexpand_graph_modules(tmp_path):
    """DESIGN: provenance survives torch.save. The tracer rebuilds with no arguments, and the
    weak references of ParameterOrigins are not pickled (torch.save of a compiled model raised)."""
    from fxexpand.core import Recipe, find_regions, get_record

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(1, 3, 5, 5)
    compiled = fxexpand.compile(model, passes=fxexpand.recipes.netbooster(targets=None, fraction=1.0))
    for gm in (fxexpand.trace(model), compiled, fxexpand.contract(model, (x,))):
        torch.save(gm, tmp_path / "gm.pt")
        loaded = torch.load(tmp_path / "gm.pt", weights_only=False)
        assert rel_error(gm.eval()(x), loaded.eval()(x)) == 0.0
    torch.save(compiled, tmp_path / "compiled.pt")
    loaded = torch.load(tmp_path / "compiled.pt", weights_only=False)
    assert set(find_regions(loaded)) == set(find_regions(compiled)) == {"0"}
    assert get_record(loaded, Recipe) == get_record(compiled, Recipe)
    fxexpand.set_decay(loaded, 1.0)
    model.load_state_dict(fxexpand.contract(loaded.eval(), (x,)).state_dict())
