"""LR schedules: warmup then constant (unchanged), cosine and linear decay to min_lr, checked against torch's own
schedulers stepped the same number of times."""
from __future__ import annotations

import pytest
import torch

from orchestration.lr_schedule import lr_factor, warmup_factor

KW = {"warmup_steps": 10, "start_factor": 1e-3, "total_steps": 110}


def test_constant_is_exactly_the_warmup_factor():
    for step in range(0, 120, 7):
        assert lr_factor(step, **KW) == warmup_factor(step, 10, 1e-3)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_matches_torch_schedulers(schedule):
    lr, min_lr = 1e-3, 1e-5
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    if schedule == "cosine":
        ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=min_lr)
    else:
        ref = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=min_lr / lr, total_iters=100)
    for step in range(10, 111):
        ours = lr * lr_factor(step, **KW, schedule=schedule, min_ratio=min_lr / lr)
        assert ours == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15), step
        opt.step()
        ref.step()
    assert lr * lr_factor(500, **KW, schedule=schedule, min_ratio=min_lr / lr) == pytest.approx(min_lr)


def test_warmup_still_applies_before_the_decay():
    assert lr_factor(0, **KW, schedule="cosine", min_ratio=0.1) == pytest.approx(1e-3)
    assert lr_factor(5, **KW, schedule="linear", min_ratio=0.1) == warmup_factor(5, 10, 1e-3)


def test_min_lr_above_lr_is_a_config_error():
    from pathlib import Path

    from orchestration.config import ConfigError, load_config

    tiny = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    assert load_config(tiny, ["train.lr_schedule=cosine", "train.min_lr=1e-5"]).train.lr_schedule == "cosine"
    with pytest.raises(ConfigError, match="train.min_lr=0.1 exceeds train.lr"):
        load_config(tiny, ["train.min_lr=0.1"])
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        load_config(tiny, ["train.lr_schedule=step"])
