"""The regime study's runner (benchmarks/study.py, fxexpand.demo.study) and the K-seed stacked model
(fxexpand.demo.stacked): tiny designs only — the study itself never runs in the test suite."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fxexpand.core import InputError
from fxexpand.demo import common, study
from fxexpand.demo.models import TinyConv1d
from fxexpand.demo.stacked import StackedLoader, StackedTinyConv1d, stack, stacked_cross_entropy
from fxexpand.training import protocols

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "benchmarks" / "study.py"
REGIME = {"dataset": "mnist1d", "num_samples": 500, "width": 2, "batch_size": 128, "schedule": "cosine"}


def _design(tmp_path, runs, name="tiny"):
    path = tmp_path / "design.json"
    path.write_text(json.dumps({"name": name, "regimes": {"r": REGIME}, "runs": runs}))
    return path


def _runner(*args, **kw):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False, **kw)


def test_tiny_design_runs_writes_valid_rows_and_a_rerun_skips_them(tmp_path):
    torch.manual_seed(0)
    design = _design(tmp_path, [{"regimes": ["r"], "methods": ["vanilla"], "seeds": [0, 1], "epochs": [1],
                                 "lr": [0.1]}])
    results = tmp_path / "results.jsonl"
    res = _runner(design, "--results", results, "--workers", "2")
    assert res.returncode == 0, res.stderr
    lines = results.read_text().splitlines()
    assert len(lines) == 2
    rows = [json.loads(line) for line in lines]
    assert sorted(r["seed"] for r in rows) == [0, 1]
    d = common.cached_splits("mnist1d", 500)
    steps = -(-len(d.y_train) // 128)
    flops = protocols.step_flops(TinyConv1d(width=2), d.x_train[:128], d.y_train[:128]) * steps
    for r in rows:
        assert (r["regime"], r["method"], r["epochs"], r["lr"], r["num_samples"], r["width"]) == \
            ("r", "vanilla", 1, 0.1, 500, 2)
        for k in ("test_acc", "val_acc", "train_acc"):
            assert 0.0 <= r[k] <= 1.0
        assert r["train_flops"] == flops
        assert r["seconds"] > 0 and r["params"] == sum(p.numel() for p in TinyConv1d(width=2).parameters())
        assert r["torch"] == torch.__version__ and r["stacked"] == 1 and r["diverged"] is False
    before = results.read_bytes()
    again = _runner(design, "--results", results, "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert "2 done" in again.stderr and "0 to run" in again.stderr
    assert results.read_bytes() == before
    assert study.pending(study.load_design(design), results) == []


def test_a_killed_run_leaves_no_partial_line_and_resumes(tmp_path):
    torch.manual_seed(0)
    # a 1-epoch run first (cheapest first), then one long enough to be killed while it trains
    design = _design(tmp_path, [{"regimes": ["r"], "methods": ["vanilla"], "seeds": [0], "epochs": [1, 3000],
                                 "lr": [0.1]}])
    results = tmp_path / "results.jsonl"
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(design), "--results", str(results), "--workers", "1"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and results.read_text().count("\n") >= 1):
            assert proc.poll() is None, "the runner ended before its first row"
            assert time.monotonic() < deadline, "no row within 120 s"
            time.sleep(0.05)
        time.sleep(1.0)  # the long run is training now (3,000 epochs take well over a minute)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its worker, mid-run
        proc.wait(timeout=30)
    text = results.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    row = json.loads(text)
    assert row["epochs"] == 1
    left = study.pending(study.load_design(design), results)
    assert [(r.epochs, r.seed) for r in left] == [(3000, 0)]


def test_append_row_starts_a_new_line_after_a_torn_write(tmp_path, caplog):
    torch.manual_seed(0)
    path = tmp_path / "results.jsonl"
    full = {k: 1 for k in study.KEY_FIELDS}
    path.write_text(json.dumps(full) + "\n" + '{"regime": "r", "meth')  # a write cut off by a crash
    assert len(study.read_rows(path)) == 1
    assert "incomplete last line" in caplog.text
    second = dict(full, seed=2)
    study.append_row(path, second)
    rows = study.read_rows(path)
    assert rows == [full, second]
    assert path.read_text().endswith(json.dumps(second, sort_keys=True) + "\n")


def _append_many(path: str, tag: int, n: int) -> None:
    for i in range(n):
        study.append_row(path, {**{k: 0 for k in study.KEY_FIELDS}, "seed": i, "tag": tag, "pad": "x" * 20000})


def test_concurrent_writers_never_interleave(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "results.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), t, 60)) for t in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 180
    rows = [json.loads(line) for line in lines]  # every line whole
    assert sorted((r["tag"], r["seed"]) for r in rows) == [(t, i) for t in range(3) for i in range(60)]


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("name"), "needs a name"),
    (lambda d: d.update(extra=1), "unknown top-level fields"),
    (lambda d: d["regimes"]["r"].update(width=0), "width must be >= 1"),
    (lambda d: d["regimes"]["r"].update(width="4"), "width must be an integer"),
    (lambda d: d["regimes"]["r"].update(schedule="step"), "unknown schedule"),
    (lambda d: d["regimes"]["r"].update(dataset="cifar"), "unknown dataset"),
    (lambda d: d["regimes"]["r"].update(depth=3), "unknown fields"),
    (lambda d: d["regimes"]["r"].pop("batch_size"), "missing fields"),
    (lambda d: d["runs"][0].update(methods=["vanila"]), "unknown method"),
    (lambda d: d["runs"][0].update(regimes=["q"]), "unknown regime"),
    (lambda d: d["runs"][0].update(lr=[0.1, -1]), "learning rates must be positive"),
    (lambda d: d["runs"][0].update(seeds=[]), "non-empty list"),
    (lambda d: d["runs"][0].pop("epochs"), "exactly the fields"),
])
def test_malformed_design_raises_a_design_error(change, message):
    torch.manual_seed(0)
    d = {"name": "t", "regimes": {"r": dict(REGIME)},
         "runs": [{"regimes": ["r"], "methods": ["vanilla"], "seeds": [0], "epochs": [1], "lr": [0.1]}]}
    study.parse_design(d)  # the unchanged design is fine
    change(d)
    with pytest.raises(study.DesignError, match=message):
        study.parse_design(d)
    assert issubclass(study.DesignError, InputError)


def test_runner_refuses_a_malformed_design_file(tmp_path):
    torch.manual_seed(0)
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "t", "regimes": {}')
    res = _runner(bad, "--results", tmp_path / "r.jsonl")
    assert res.returncode == 2
    assert "not valid JSON" in res.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_stack_and_unstack_round_trip():
    torch.manual_seed(0)
    models = [TinyConv1d(width=3) for _ in range(3)]
    for m in models:  # non-default running statistics
        for b in m.modules():
            if isinstance(b, torch.nn.BatchNorm1d):
                b.running_mean.normal_()
                b.running_var.uniform_(0.5, 2)
    s = stack(models)
    assert isinstance(s, StackedTinyConv1d) and s.k == 3
    xs = [torch.randn(8, 1, 40) for _ in models]
    out = s.eval()(torch.cat(xs, 1))
    for i, (m, u) in enumerate(zip(models, s.unstack())):
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), u.state_dict().values()))
        torch.testing.assert_close(out[:, i], m.eval()(xs[i]), rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="one architecture"):
        stack([TinyConv1d(width=2), TinyConv1d(width=3)])


def _train(model, loader, dtype, loss_fn=F.cross_entropy):
    model.to(dtype)
    protocols.run(model, protocols.vanilla(), loader, epochs=2, make_optimizer=common.sgd_cosine(0.05),
                  loss_fn=loss_fn)
    return model


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_stacked_seeds_train_as_separate_runs(dtype, tol):
    """K seeds trained as one grouped model end with each seed's own weights (same init, same data
    order, same gradients, same SGD steps) up to rounding."""
    torch.manual_seed(0)
    d = common.cached_splits("mnist1d", 500)
    x = d.x_train.to(dtype)
    seeds = [3, 4, 5]
    tinies = []
    for s in seeds:
        torch.manual_seed(s)
        tinies.append(TinyConv1d(width=2))
    stacked = _train(stack(tinies), StackedLoader(x, d.y_train, 128, seeds), dtype, stacked_cross_entropy)
    for s, got in zip(seeds, stacked.unstack()):
        torch.manual_seed(s)
        ref = _train(TinyConv1d(width=2), common.Loader(x, d.y_train, 128, s), dtype)
        for (k, a), b in zip(got.state_dict().items(), ref.state_dict().values()):
            if a.is_floating_point():
                assert a.dtype == dtype
                assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), k
            else:
                assert torch.equal(a, b), k


def test_stacked_rows_match_separate_rows(tmp_path):
    """study.execute on a 2-seed group gives the rows two single runs give (accuracies, FLOPs)."""
    torch.manual_seed(0)
    design = study.parse_design({"name": "t", "regimes": {"r": REGIME}, "runs": [
        {"regimes": ["r"], "methods": ["vanilla"], "seeds": [0, 1], "epochs": [1], "lr": [0.05]}]})
    (group,) = study.groups(design.runs, stack=2)
    assert len(group) == 2
    stacked = study.execute(study.task_of(group, design, tmp_path / "a.jsonl"))
    single = [study.execute(study.task_of([r], design, tmp_path / "b.jsonl"))[0] for r in design.runs]
    torch.set_num_threads(1)
    for a, b in zip(stacked, single):
        assert (a["stacked"], b["stacked"]) == (2, 1)
        assert study.row_key(a) == study.row_key(b)
        for k in ("test_acc", "val_acc", "train_acc", "train_flops", "params"):
            assert a[k] == b[k], k
    assert [study.row_key(r) for r in study.read_rows(tmp_path / "a.jsonl")] == [r.key for r in group]


def test_groups_stack_only_vanilla_seeds_of_one_cell():
    torch.manual_seed(0)
    design = study.parse_design({"name": "t", "regimes": {"r": REGIME}, "runs": [
        {"regimes": ["r"], "methods": ["vanilla", "netaug"], "seeds": [0, 1, 2], "epochs": [1, 2], "lr": [0.1]}]})
    gs = study.groups(design.runs, stack=2)
    assert sum(len(g) for g in gs) == len(design.runs) == 12
    for g in gs:
        assert len({(r.method, r.epochs, r.lr) for r in g}) == 1
        assert len(g) == 1 or g[0].method == "vanilla"
    assert sorted(len(g) for g in gs if g[0].method == "vanilla") == [1, 1, 2, 2]
    assert all(len(g) == 1 for g in study.groups(design.runs))
    with pytest.raises(InputError):
        study.groups(design.runs, stack=0)
