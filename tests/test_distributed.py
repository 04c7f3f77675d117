"""DDP with torchrun: 2 CPU processes (gloo) agree on weights, alpha and the contracted model,
and a checkpoint from rank 0 resumes the decay schedule."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(tmp_path, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "ddp_digits.py"), "--out", str(out), "--epochs", "4", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _load(out, rank):
    return torch.load(Path(out) / f"rank{rank}.pt", weights_only=True)


def test_ddp_ranks_agree_and_contract_identically(tmp_path):
    out = tmp_path / "full"
    _torchrun(tmp_path, out)
    r0, r1 = _load(out, 0), _load(out, 1)
    assert r0["alpha"] == r1["alpha"] == 1.0 and r0["global_step"] == r1["global_step"] > 0
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    for k in r0["contracted"]:
        assert torch.equal(r0["contracted"][k], r1["contracted"][k]), k
    assert r0["accuracy"] > 0.5


def test_ddp_checkpoint_resumes_the_schedule(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _torchrun(tmp_path, full)
    _torchrun(tmp_path, part, "--stop-after", "3")
    mid = _load(part, 0)
    assert 0.0 < mid["alpha"] < 1.0  # stopped inside the decay phase (epochs 2-3 of 4)
    _torchrun(tmp_path, part, "--resume", str(part / "checkpoint.pt"))
    resumed, straight = _load(part, 0), _load(full, 0)
    assert resumed["global_step"] == straight["global_step"]
    assert resumed["alpha"] == straight["alpha"] == 1.0
    for k in straight["weights"]:  # same data order, same steps: the same run
        assert torch.allclose(resumed["weights"][k].double(), straight["weights"][k].double(), atol=1e-5), k


def _torchrun_netaug(tmp_path, out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "ddp_netaug.py"), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_netaug_ranks_run_the_same_augmented_models_and_resume(tmp_path):
    """Both ranks draw the same configuration at every step (no communication), end with the same
    weights and contract identically, with one or two backward passes; a resumed run continues the
    same sequence of configurations."""
    for extra in ((), ("--separate-backward",)):
        out = tmp_path / ("two" if extra else "one")
        _torchrun_netaug(tmp_path, out, *extra)
        r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1))
        assert r0["configs"] == r1["configs"] and len(r0["configs"]) > 10
        assert len({tuple(sorted(c.items())) for c in r0["configs"]}) > 1  # it really samples
        for k in r0["weights"]:
            assert torch.equal(r0["weights"][k], r1["weights"][k]), k
        for k in r0["contracted"]:
            assert torch.equal(r0["contracted"][k], r1["contracted"][k]), k
        assert r0["accuracy"] > 0.3
    straight = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)["configs"]
    part = tmp_path / "part"
    _torchrun_netaug(tmp_path, part, "--stop-after", "1")
    first = torch.load(part / "rank0.pt", weights_only=False)["configs"]
    _torchrun_netaug(tmp_path, part, "--resume", str(part / "checkpoint.pt"))
    rest = torch.load(part / "rank0_resumed.pt", weights_only=False)["configs"]
    assert first + rest == straight


def test_ddp_early_exits_every_head_gets_gradients(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "ddp_exits.py"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / "out" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["exits"] == 2 and len(r0["heads_had_grad"]) > 10 and all(r0["heads_had_grad"] + r1["heads_had_grad"])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    for k in r0["contracted"]:
        assert torch.equal(r0["contracted"][k], r1["contracted"][k]), k
