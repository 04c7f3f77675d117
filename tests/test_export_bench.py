import os

import onnx
import pytest
import torch
from torch import nn

import fxexpand
from fxexpand import ExportError, InputError
from fxexpand.testing import randomize_bn


def _model():
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))).eval()


def test_export_checks_and_writes(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    path = fxexpand.export_onnx(fxexpand.contract(_model(), (x,), target="deploy"), (x,), tmp_path / "m.onnx")
    assert path.exists()
    onnx.checker.check_model(str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left behind


def test_failed_export_leaves_no_file_and_keeps_old_one(tmp_path, monkeypatch):
    def half_written(model, args, f, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a model")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    dest = tmp_path / "m.onnx"
    dest.write_bytes(b"previous")
    with pytest.raises(ExportError, match="exporter crashed"):
        fxexpand.export_onnx(_model(), (torch.randn(1, 3, 8, 8),), dest)
    assert dest.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_mismatch_is_detected(tmp_path, monkeypatch):
    """If onnxruntime disagrees with torch, the file is not written."""
    import onnxruntime as ort

    real = ort.InferenceSession

    class Skewed(real):
        def run(self, *a, **k):
            return [o + 1.0 for o in super().run(*a, **k)]

    monkeypatch.setattr(ort, "InferenceSession", Skewed)
    with pytest.raises(ExportError, match="differs from torch"):
        fxexpand.export_onnx(_model(), (torch.randn(1, 3, 8, 8),), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bad", ["missing_dir/m.onnx", "."])
def test_export_bad_paths(tmp_path, bad):
    with pytest.raises(ExportError):
        fxexpand.export_onnx(_model(), (torch.randn(1, 3, 8, 8),), tmp_path / bad)


def test_export_unwritable_dir(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):  # running as root: simulate the permission check
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(ro) else real(p, m))
    with pytest.raises(ExportError, match="not writable"):
        fxexpand.export_onnx(_model(), (torch.randn(1, 3, 8, 8),), ro / "m.onnx")
    assert list(ro.iterdir()) == []


def test_benchmark_onnx_stats(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    p = fxexpand.export_onnx(_model(), (x,), tmp_path / "m.onnx")
    stats = fxexpand.benchmark_onnx(p, threads=1, warmup=2, runs=7)
    assert stats.runs == 7 and stats.threads == 1 and stats.warmup == 2
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    both = fxexpand.compare_onnx([p, p], runs=5, warmup=1, threads=2)
    assert [s.runs for s in both] == [5, 5] and all(s.threads == 2 for s in both)


def test_compare_onnx_multithread_errors(tmp_path):
    """threads > 1 runs in a child process (one shared onnxruntime pool); its errors are the same types."""
    x = torch.randn(1, 3, 16, 16)
    p = fxexpand.export_onnx(_model(), (x,), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match="does not exist"):
        fxexpand.compare_onnx([p, tmp_path / "nope.onnx"], threads=2)
    with pytest.raises(InputError, match="2 shapes"):
        fxexpand.compare_onnx([p], threads=2, input_shapes=[[1, 3, 16, 16]] * 2)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError):
        fxexpand.compare_onnx([p, tmp_path / "junk.onnx"], threads=2, runs=1, warmup=0)


def test_benchmark_errors(tmp_path):
    with pytest.raises(ExportError):
        fxexpand.benchmark_onnx(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError):
        fxexpand.benchmark_onnx(tmp_path / "junk.onnx")
    with pytest.raises(ValueError):
        fxexpand.benchmark_onnx(tmp_path / "junk.onnx", runs=0)
