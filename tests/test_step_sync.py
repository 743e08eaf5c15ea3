"""``train_step`` never waits for the device, and its device-side non-finite guard trains
exactly as the old host-side one.

1. No host read inside the step: on the CPU every way a tensor's values reach Python
   (``item``, ``tolist``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``cpu``,
   ``numpy``, ``nonzero``) is counted by ``fastjepa.profiling.HostReads`` (a
   ``TorchFunctionMode``, also bench_host's counter) around five steps in each mode, and none is allowed; on a GPU the steps run under
   ``torch.cuda.set_sync_debug_mode("error")``.
2. The guard: the same seeded steps (one with a NaN image, one with an infinite gradient)
   through ``train_step`` and through the old step kept here as the plain reference (the
   flag read on the host before ``optimizer.step()``, a bad step left out, then
   ``ema_update_``): weights, AdamW state, target and shadow are the same bits.
3. ``meta.skip_nonfinite: false``: the host reads a bad step after it queued the next one, so
   the guard's halt flag leaves that next step out too.
"""

import copy

import pytest
import torch

from fastjepa.helper import init_model, init_opt
from fastjepa.masks.multiblock import MultiBlockMaskSampler
from fastjepa.models.shadow import Bf16Shadow
from fastjepa.ops import ema_update_
from fastjepa.profiling import HostReads
from fastjepa.step import ContextPredictor, FusedUpdate, NonfiniteGuard, jepa_loss, nonfinite_flag, train_step
from fastjepa.utils.schedulers import MomentumSchedule

CROP, PATCH, BATCH = 48, 8, 4
MODES = {
    "default": {},
    "skip_nonfinite": {"skip_nonfinite": True},
    "accum_steps-2": {"accum_steps": 2},
    "bf16-shadow": {"bf16": True},
    "fused-adamw-ema": {"fused": True},
    "fused-bf16-shadow": {"fused": True, "bf16": True},
    "ragged": {"ragged": True},
}


class Training:
    """A seeded ViT-tiny pair, its AdamW and schedules, and what the trainer builds once per
    run (``FusedUpdate``, ``NonfiniteGuard``), in one of ``MODES``."""

    def __init__(self, bf16=False, fused=False, accum_steps=1, ragged=False, skip_nonfinite=False, seed=0):
        torch.manual_seed(seed)
        self.encoder, self.predictor = init_model("cpu", PATCH, "vit_tiny", CROP, 1, 48)
        self.target = copy.deepcopy(self.encoder).requires_grad_(False)
        self.optimizer, _, self.lr, self.wd = init_opt(self.encoder, self.predictor, 10, 1e-3, 2e-3, 1, 1, 0.04, 0.4)
        self.momentum = MomentumSchedule(0.99, 1.0, 10)
        self.shadow = Bf16Shadow(self.target, self.encoder) if bf16 else None
        self.model = ContextPredictor(self.encoder, self.predictor)
        self.bf16, self.accum_steps, self.ragged = bf16, accum_steps, ragged
        self.update = FusedUpdate(self.optimizer, self.encoder, self.target, self.shadow, fuse_ema=fused)
        self.guard = NonfiniteGuard(self.model, halt=not skip_nonfinite)
        self.sampler = MultiBlockMaskSampler(input_size=CROP, patch_size=PATCH, min_keep=1)
        self.generator = torch.Generator().manual_seed(seed)

    def batch(self, nan=False):
        masks_enc, masks_pred = self.sampler.sample(BATCH, generator=self.generator, ragged=self.ragged)
        images = torch.randn(BATCH, 3, CROP, CROP, generator=self.generator)
        if nan:
            images[1, 0, 3, 3] = float("nan")
        return images, masks_enc, masks_pred

    def step(self, images, masks_enc, masks_pred):
        return train_step(self.model, self.target, self.optimizer, self.lr, self.wd, self.momentum, images, masks_enc, masks_pred,
                          use_bfloat16=self.bf16, target_shadow=self.shadow, accum_steps=self.accum_steps,
                          fused_optimizer_ema=self.update, guard=self.guard)

    def state(self) -> dict:
        """Every tensor training changes, by name (shadow included)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"target.{k}": v for k, v in self.target.state_dict().items()})
        if self.shadow is not None:
            tensors.update({f"shadow.{k}": v for k, v in self.shadow.module.state_dict().items()})
        for i, s in self.optimizer.state_dict()["state"].items():
            tensors.update({f"adamw.{i}.{k}": v for k, v in s.items()})
        return {k: v.detach().clone() for k, v in tensors.items()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def assert_same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(bits(a[k]), bits(b[k]))]
    assert not different, f"{len(different)} tensors differ: {different[:5]}"


# ---------------------------------------------------------------------------- no host sync


@pytest.mark.parametrize("mode", MODES)
def test_no_host_read_inside_the_step(mode):
    """Five steps, the third with a NaN image: no value reaches the host inside ``train_step``,
    and the results still say what happened once read (after the steps)."""
    training = Training(**MODES[mode])
    batches = [training.batch(nan=i == 2) for i in range(5)]
    reads, results = HostReads(), []
    for batch in batches:
        with reads:
            results.append(training.step(*batch))
    assert reads.seen == [], f"{mode}: {len(reads.seen)} host reads in 5 steps: {sorted(set(reads.seen))}"
    said = [r.nonfinite for r in results]
    assert said[:2] == [None, None] and said[2].startswith("loss is nan")
    if mode == "skip_nonfinite":
        assert said[3:] == [None, None]
    else:  # the halt: what was queued after the bad step is left out too
        assert said[3:] == ["left out after an earlier non-finite step"] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: torch.cuda.set_sync_debug_mode reports syncs only on CUDA")
@pytest.mark.parametrize("fused", [False, True], ids=["adamw-then-ema", "fused-adamw-ema"])
def test_no_sync_on_the_gpu(fused):
    torch.manual_seed(0)
    encoder, predictor = init_model("cuda", PATCH, "vit_tiny", CROP, 1, 48)
    target = copy.deepcopy(encoder).requires_grad_(False)
    optimizer, _, lr, wd = init_opt(encoder, predictor, 10, 1e-3, 2e-3, 1, 1, 0.04, 0.4)
    shadow, model = Bf16Shadow(target, encoder), ContextPredictor(encoder, predictor)
    update, guard = FusedUpdate(optimizer, encoder, target, shadow, fuse_ema=fused), NonfiniteGuard(model, halt=True)
    sampler, g, momentum = MultiBlockMaskSampler(input_size=CROP, patch_size=PATCH, min_keep=1), torch.Generator(), MomentumSchedule(0.99, 1.0, 10)
    batches = [(torch.randn(BATCH, 3, CROP, CROP, device="cuda"), *sampler.sample(BATCH, generator=g, device="cuda")) for _ in range(6)]
    results = [train_step(model, target, optimizer, lr, wd, momentum, *batches[0], use_bfloat16=True, target_shadow=shadow,
                          fused_optimizer_ema=update, guard=guard)]  # the first step makes the AdamW state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            results.append(train_step(model, target, optimizer, lr, wd, momentum, *batch, use_bfloat16=True, target_shadow=shadow,
                                      fused_optimizer_ema=update, guard=guard))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [r.nonfinite for r in results] == [None] * 6


# ------------------------------------------------------------- the old step, as the reference


def old_step(training: Training, images, masks_enc, masks_pred):
    """The step before the guard moved to the device: the flag and the loss read on the host
    after the backward; a bad step zeroes the gradients and returns; else ``optimizer.step()``
    (``torch.optim.AdamW``) and ``ema_update_`` (the shadow's, with one). Returns the loss read."""
    training.lr.step(), training.wd.step()
    parts = 2 if training.accum_steps == 2 else 1
    bounds = [BATCH * i // parts for i in range(parts + 1)]
    loss = 0.0
    for a, b in zip(bounds, bounds[1:]):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=training.bf16):
            target = training.shadow.module if training.shadow is not None else training.target
            micro = jepa_loss(training.model, target, images[a:b], [m[a:b] for m in masks_enc], [m[a:b] for m in masks_pred])
        if parts > 1:
            micro = micro * ((b - a) / BATCH)
        micro.backward()
        loss = micro.detach() if a == 0 else loss + micro.detach()
    momentum = next(training.momentum)
    grads = [p.grad for p in training.model.parameters() if p.grad is not None]
    if nonfinite_flag(loss, grads)[0].item():
        training.optimizer.zero_grad(set_to_none=True)
        return loss.item()
    training.optimizer.step()
    training.optimizer.zero_grad(set_to_none=True)
    if training.shadow is not None:
        training.shadow.update_(momentum)
    else:
        ema_update_(list(training.target.parameters()), list(training.encoder.parameters()), momentum)
    return loss.item()


@pytest.mark.parametrize("mode", ["default", "accum_steps-2", "bf16-shadow", "fused-bf16-shadow"])
def test_the_same_bits_as_the_old_step_with_bad_steps_left_out(mode):
    """Six steps: a NaN image at the second, an infinite gradient at the fourth (a finite loss);
    the old step and ``train_step`` leave both out and end with the same bits everywhere, and
    the same losses. (The default's halt is off here: the old step went on after a bad step.)"""
    options = {**MODES[mode], "skip_nonfinite": True}
    new, old = Training(**options), Training(**options)
    new_losses, old_losses = [], []
    for i in range(6):
        batch = new.batch(nan=i == 1)
        old.batch()
        hooks = [t.predictor.predictor_embed.weight.register_hook(lambda g: g * float("inf")) for t in (new, old)] if i == 3 else []
        result = new.step(*batch)
        old_losses.append(old_step(old, *batch))
        for hook in hooks:
            hook.remove()
        new_losses.append(result.loss_value)
        assert (result.nonfinite is not None) == (i in (1, 3)), i
        if i == 1:
            assert_same_bits(new.state(), old.state())
    assert_same_bits(new.state(), old.state())
    assert new_losses[0] == old_losses[0] and all(a == b or a != a and b != b for a, b in zip(new_losses, old_losses))


def test_a_halted_run_changes_nothing_after_the_bad_step():
    """``halt`` (meta.skip_nonfinite: false): the bad step and every step queued after it
    leave every tensor as it was before the bad step, AdamW's step counts included."""
    training = Training()
    training.step(*training.batch())
    before = training.state()
    results = [training.step(*training.batch(nan=i == 0)) for i in range(3)]
    assert_same_bits(training.state(), before)
    assert results[0].nonfinite.startswith("loss is nan; non-finite gradients in")
    assert [r.nonfinite for r in results[1:]] == ["left out after an earlier non-finite step"] * 2


def test_a_bad_first_step_leaves_no_adamw_state_once_read():
    """A skipped first step made AdamW's zero state on the device; reading the result drops it
    (AdamW makes none for a step it never took), unless a later step has used it."""
    training = Training(skip_nonfinite=True)
    first = training.step(*training.batch(nan=True))
    assert first.nonfinite is not None and not training.optimizer.state
    second = training.step(*training.batch(nan=True))
    third = training.step(*training.batch())
    assert second.nonfinite is not None and third.nonfinite is None
    assert {s["step"].item() for s in training.optimizer.state.values()} == {1.0}
