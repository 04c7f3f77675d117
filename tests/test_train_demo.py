"""The training helper and the digits demo."""

import pytest
import torch
from torch import nn

import fxexpand
from fxexpand.cli import main
from fxexpand.demo import DigitsNet, load_digits, run_demo
from fxexpand.train import DecaySchedule, Trainer, unwrap


def test_decay_schedule_places_the_decay_at_the_end():
    e = fxexpand.compile(DigitsNet(), passes=fxexpand.recipes.netbooster())
    sched = DecaySchedule(e, epochs=10, steps_per_epoch=5, decay_fraction=0.2, finetune_epochs=1)
    assert (sched.decay_start_epoch, sched.decay_epochs) == (7, 2)
    alphas = [sched.step() for _ in range(50)]
    assert alphas[:34] == [0.0] * 34 and alphas[44:] == [1.0] * 6
    assert all(b >= a for a, b in zip(alphas, alphas[1:]))
    with pytest.raises(ValueError):
        DecaySchedule(e, epochs=2, steps_per_epoch=5, finetune_epochs=2)


def test_trainer_runs_the_schedule_and_contracts():
    xtr, ytr, xte, yte = load_digits()
    e = fxexpand.compile(DigitsNet(), passes=fxexpand.recipes.netbooster())
    events = []
    loader = [(xtr[i:i + 128], ytr[i:i + 128]) for i in range(0, 512, 128)]
    tr = Trainer(e, torch.optim.SGD(e.parameters(), lr=0.05), epochs=3,
                 callbacks=[lambda ev, t, **info: events.append((ev, info.get("alpha")))])
    tr.fit(loader)
    assert fxexpand.get_decay(e) == 1.0
    assert [ev for ev, _ in events].count("epoch") == 3 and events[-1][1] == 1.0
    small = tr.contract((xte[:8],))
    net = DigitsNet()
    net.load_state_dict(small.state_dict())
    assert unwrap(nn.DataParallel(e)) is e


def test_demo_small_run(capsys):
    results = run_demo(epochs=2, seeds=1, recipes=("vanilla", "netbooster", "expandnets"))
    assert [r.recipe for r in results] == ["vanilla", "netbooster", "expandnets"]
    base = results[0]
    for r in results:
        assert 0.0 <= r.accuracies[0] <= 1.0 and r.latency_ms > 0
        assert r.parameters == base.parameters and r.flops == base.flops  # contracted to the tiny CNN
    assert results[1].max_rel_error64 <= 1e-9 and results[2].max_rel_error64 <= 1e-9
    assert results[1].train_parameters > base.parameters


def test_demo_cli_help_and_bad_args(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["demo", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "--epochs" in out and "--seeds" in out and "--recipe" in out
    assert main(["demo", "--epochs", "0"]) == 2
