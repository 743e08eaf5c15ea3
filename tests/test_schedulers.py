"""Schedules against their closed forms at chosen steps, and exact resume."""

import math

import pytest
import torch

from fastjepa.utils.schedulers import CosineWDSchedule, MomentumSchedule, WarmupCosineSchedule, momentum_schedule


def optimizer_with_groups():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [w]}, {"params": [b], "WD_exclude": True, "weight_decay": 0}])


def run(schedule, steps):
    return [schedule.step() for _ in range(steps)]


def test_warmup_cosine_lr_closed_form():
    opt = optimizer_with_groups()
    schedule = WarmupCosineSchedule(opt, warmup_steps=10, start_lr=2e-4, ref_lr=1e-3, T_max=110, final_lr=1e-6)
    lrs = run(schedule, 120)
    assert lrs[0] == pytest.approx(2e-4 + 0.1 * 8e-4)  # stepped first: the first value is step 1's
    assert lrs[4] == pytest.approx(2e-4 + 0.5 * 8e-4)
    assert lrs[9] == pytest.approx(1e-3)  # step 10: cosine at progress 0
    assert lrs[59] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[109] == pytest.approx(1e-6)
    assert min(lrs) >= 1e-6  # past T_max it stays at final_lr
    assert all(group["lr"] == lrs[-1] for group in opt.param_groups)


def test_cosine_weight_decay_increases_and_skips_excluded_groups():
    opt = optimizer_with_groups()
    schedule = CosineWDSchedule(opt, ref_wd=0.04, T_max=100, final_wd=0.4)
    wds = run(schedule, 120)
    assert wds[0] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * 0.01)))
    assert wds[49] == pytest.approx(0.22)
    assert wds[99] == pytest.approx(0.4) and max(wds) <= 0.4
    assert all(a <= b for a, b in zip(wds[:100], wds[1:100]))  # past T_max the cosine turns back, as in the reference
    assert opt.param_groups[0]["weight_decay"] == wds[-1] and opt.param_groups[1]["weight_decay"] == 0


def test_cosine_weight_decay_decreasing_is_clamped_at_final():
    schedule = CosineWDSchedule(optimizer_with_groups(), ref_wd=0.4, T_max=10, final_wd=0.04)
    wds = run(schedule, 15)
    assert wds[9] == pytest.approx(0.04) and min(wds) >= 0.04


def test_momentum_is_linear_and_reaches_the_end():
    schedule = momentum_schedule((0.996, 1.0), iterations_per_epoch=10, num_epochs=30)
    values = [next(schedule) for _ in range(305)]
    assert values[0] == 0.996
    assert values[150] == pytest.approx(0.998)
    assert values[300] == pytest.approx(1.0)
    assert values[304] == values[300]  # past the horizon it keeps its last value
    fractional = MomentumSchedule(0.9, 1.0, horizon=2.5)
    assert [next(fractional) for _ in range(4)] == pytest.approx([0.9, 0.94, 0.98, 0.98])


def test_schedules_resume_exactly_from_state_dict():
    a = WarmupCosineSchedule(optimizer_with_groups(), 5, 1e-4, 1e-3, 50)
    run(a, 17)
    b = WarmupCosineSchedule(optimizer_with_groups(), 5, 1e-4, 1e-3, 50)
    b.load_state_dict(a.state_dict())
    assert run(a, 5) == run(b, 5)
    m = MomentumSchedule(0.99, 1.0, 100)
    [next(m) for _ in range(33)]
    m2 = MomentumSchedule(0.99, 1.0, 100)
    m2.load_state_dict(m.state_dict())
    assert next(m) == next(m2)


def test_momentum_rejects_an_empty_horizon():
    with pytest.raises(ValueError, match="horizon"):
        MomentumSchedule(0.99, 1.0, 0)
