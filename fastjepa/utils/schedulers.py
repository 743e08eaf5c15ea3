"""Per-iteration schedules of the reference trainer (``src/utils/schedulers.py``).

Each ``step()`` advances one iteration first and then applies the new value, so
the first optimizer step already runs with the step-1 value, as in the reference.
Each schedule's position is ``_step``; ``state_dict``/``load_state_dict`` carry it
for exact resume.
"""

from __future__ import annotations

import math


class _StepSchedule:
    _step: int

    def state_dict(self) -> dict:
        return {"step": self._step}

    def load_state_dict(self, state: dict) -> None:
        self._step = int(state["step"])


class WarmupCosineSchedule(_StepSchedule):
    """Linear warmup from ``start_lr`` to ``ref_lr`` over ``warmup_steps``, then cosine
    decay to ``final_lr`` at ``T_max`` (never below ``final_lr``). Sets every group's lr."""

    def __init__(self, optimizer, warmup_steps, start_lr, ref_lr, T_max, last_epoch=-1, final_lr=0.0):
        self.optimizer = optimizer
        self.start_lr = start_lr
        self.ref_lr = ref_lr
        self.final_lr = final_lr
        self.warmup_steps = warmup_steps
        self.T_max = T_max - warmup_steps  # length of the cosine part
        self._step = 0

    def value(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_lr + step / max(1, self.warmup_steps) * (self.ref_lr - self.start_lr)
        progress = (step - self.warmup_steps) / max(1, self.T_max)
        cosine = self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_lr, cosine)

    def step(self) -> float:
        self._step += 1
        lr = self.value(self._step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr


class CosineWDSchedule(_StepSchedule):
    """Cosine from ``ref_wd`` to ``final_wd`` over ``T_max`` steps, clamped at ``final_wd``
    (an increase when final > ref, as in every published config). Groups marked
    ``WD_exclude`` keep their weight decay."""

    def __init__(self, optimizer, ref_wd, T_max, final_wd=0.0):
        self.optimizer = optimizer
        self.ref_wd = ref_wd
        self.final_wd = final_wd
        self.T_max = T_max
        self._step = 0

    def value(self, step: int) -> float:
        progress = step / self.T_max
        wd = self.final_wd + (self.ref_wd - self.final_wd) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(self.final_wd, wd) if self.final_wd <= self.ref_wd else min(self.final_wd, wd)

    def step(self) -> float:
        self._step += 1
        wd = self.value(self._step)
        for group in self.optimizer.param_groups:
            if not group.get("WD_exclude", False):
                group["weight_decay"] = wd
        return wd


class MomentumSchedule(_StepSchedule):
    """EMA momentum, linear from ``start`` to ``end`` over ``horizon`` iterations: the
    i-th ``next()`` (from 0) yields start + i * (end - start) / horizon, as the
    reference's generator does. The reference's generator ends after
    int(horizon) + 1 values; this one then keeps yielding its last value."""

    def __init__(self, start: float, end: float, horizon: float):
        if not horizon > 0:
            raise ValueError(f"MomentumSchedule: horizon must be > 0 iterations, got {horizon}")
        self.start = start
        self.end = end
        self.horizon = horizon
        self._step = 0

    def value(self, step: int) -> float:
        return self.start + min(step, int(self.horizon)) * (self.end - self.start) / self.horizon

    def __iter__(self):
        return self

    def __next__(self) -> float:
        m = self.value(self._step)
        self._step += 1
        return m


def momentum_schedule(ema, iterations_per_epoch: int, num_epochs: int, ipe_scale: float = 1.0) -> MomentumSchedule:
    """The trainer's EMA schedule, over ``iterations_per_epoch * num_epochs * ipe_scale`` iterations."""
    return MomentumSchedule(ema[0], ema[1], iterations_per_epoch * num_epochs * ipe_scale)
