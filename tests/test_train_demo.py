"""The training helper and the digits demo."""

import pytest
import torch
from torch import nn

import fxexpand
from fxexpand.cli import main
from fxexpand.demo import DigitsNet, load_digits
from fxexpand.training import DecaySchedule, Trainer, unwrap


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


def test_demo_cli_help_and_bad_args(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["demo", "--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "--epochs" in out and "--seeds" in out and "--methods" in out and "--full" in out
    assert main(["demo", "--epochs", "0"]) == 2


def test_decay_fraction_zero_leaves_alpha_alone():
    e = fxexpand.compile(DigitsNet(), passes=fxexpand.recipes.netbooster())
    sched = DecaySchedule(e, epochs=4, steps_per_epoch=3, decay_fraction=0.0)
    assert sched.linear is None and [sched.step() for _ in range(12)] == [0.0] * 12
    fxexpand.set_decay(e, 1.0)
    assert sched.alpha == 1.0
    with pytest.raises(ValueError):
        DecaySchedule(e, epochs=4, steps_per_epoch=3, decay_fraction=-0.1)


def test_trainer_steps_the_lr_scheduler_per_step():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    loader = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))] * 5
    Trainer(model, opt, epochs=2, lr_scheduler=sched, scheduler_interval="step").fit(loader)
    assert sched.last_epoch == 10
    with pytest.raises(ValueError):
        Trainer(model, opt, epochs=1, scheduler_interval="batch")
