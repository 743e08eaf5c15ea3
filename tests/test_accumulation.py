"""Gradient accumulation (optimization.grad_accum_steps) and activation checkpointing
(meta.activation_checkpointing): both change memory, never the math.

Tolerance: accumulation only reorders fp32 sums (the micro-batches' gradients add up instead of
one batch mean), so every weight, target and AdamW moment agrees with k = 1 within 1e-5
(rtol and atol, as the distributed tests) after several steps, and to 1e-4 of each tensor's
norm; the losses to 1e-6 relative. Recomputing a block in the
backward repeats the same CPU ops, so checkpointing is compared bit for bit."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from conftest import tensors

from fastjepa.config import ConfigError, tiny_preset, validate
from fastjepa.distributed import gradient_sync
from fastjepa.helper import init_model, init_opt, read_checkpoint
from fastjepa.masks.multiblock import MultiBlockMaskSampler
from fastjepa.step import ContextPredictor, split_batch, train_step
from fastjepa.train import fit
from fastjepa.utils.masking import PackedMasks
from fastjepa.utils.schedulers import MomentumSchedule

SMALL = dict(crop_size=48, batch_size=4, repeat=1, pred_depth=1, min_keep=1, epochs=4, warmup=1, progress=False)
CROP, PATCH = 48, 8
TOL = dict(rtol=1e-5, atol=1e-5)  # as tests/test_distributed.py: fp32, only the order of the gradient sums differs


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def trained_state(folder) -> dict:
    checkpoint = read_checkpoint(folder / "jepa-latest.pth.tar")
    return {part: checkpoint[part] for part in ("encoder", "predictor", "target_encoder", "opt")}


@pytest.mark.parametrize("mode, ks", [({}, (2, 4)), ({"ragged": True}, (4,)), ({"shared_context_predictor": True}, (4,))],
                         ids=["dense", "ragged", "shared-context"])
def test_accumulation_equals_the_whole_batch(tmp_path, mode, ks):
    runs = {k: fit(out=tmp_path / f"k{k}", max_steps=4, grad_accum_steps=k, **SMALL, **mode) for k in (1, *ks)}
    whole = dict(tensors(trained_state(tmp_path / "k1")))
    moments = [name for name in whole if name.endswith(("exp_avg", "exp_avg_sq"))]
    assert len(moments) > 10 and all(whole[name].abs().sum() > 0 for name in moments)
    for k in ks:
        assert runs[k].steps == 4
        assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(runs[k].losses, runs[1].losses)), (runs[k].losses, runs[1].losses)
        accumulated = dict(tensors(trained_state(tmp_path / f"k{k}")))
        assert accumulated.keys() == whole.keys()
        for name, expected in whole.items():
            if expected.is_floating_point():
                torch.testing.assert_close(accumulated[name], expected, **TOL, msg=lambda m: f"k={k} {name}: {m}")
                assert relative_error(accumulated[name], expected) <= 1e-4, (k, name)  # and close relative to each tensor's size
    # the comparison can fail: one step fewer ends further away than the tolerance
    fit(out=tmp_path / "k1-short", max_steps=3, **SMALL, **mode)
    shorter = dict(tensors(trained_state(tmp_path / "k1-short")))
    assert max((shorter[name] - whole[name]).abs().max().item() for name in whole if whole[name].is_floating_point()) > 10 * TOL["atol"]


def test_accumulated_run_resumes_exactly(tmp_path):
    straight = fit(out=tmp_path / "straight", max_steps=5, grad_accum_steps=2, **SMALL)
    fit(out=tmp_path / "split", max_steps=2, grad_accum_steps=2, **SMALL)
    resumed = fit(out=tmp_path / "split", max_steps=3, grad_accum_steps=2, resume="latest", **SMALL)
    assert straight.losses[2:] == resumed.losses
    a, b = trained_state(tmp_path / "straight"), trained_state(tmp_path / "split")
    for part in ("encoder", "predictor", "target_encoder"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


# ---------------------------------------------------------------------------- the step


def tiny_training():
    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", patch_size=PATCH, model_name="vit_tiny", crop_size=CROP, pred_depth=1, pred_emb_dim=48)
    target = copy.deepcopy(encoder).requires_grad_(False)
    optimizer, _, lr_sched, wd_sched = init_opt(encoder, predictor, iterations_per_epoch=100, start_lr=1e-3, ref_lr=1e-3,
                                                warmup=0, num_epochs=1, wd=0.04, final_wd=0.04, ipe_scale=1.0)
    return encoder, predictor, target, optimizer, lr_sched, wd_sched, MomentumSchedule(0.9, 1.0, 100)


def batch(size: int, ragged: bool = False, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    sampler = MultiBlockMaskSampler(input_size=CROP, patch_size=PATCH, min_keep=1)
    masks_enc, masks_pred = sampler.sample(size, generator=generator, ragged=ragged)
    return torch.randn(size, 3, CROP, CROP, generator=generator), masks_enc, masks_pred


@pytest.mark.parametrize("ragged", [False, True], ids=["dense", "packed"])
def test_split_batch_slices_images_and_masks_in_order(ragged):
    imgs, masks_enc, masks_pred = batch(7, ragged)
    parts = split_batch(imgs, masks_enc, masks_pred, 3)
    assert [len(p[0]) for p in parts] == [2, 2, 3]
    assert torch.equal(torch.cat([p[0] for p in parts]), imgs)
    for i, mask in enumerate(masks_pred):
        assert torch.equal(torch.cat([p[2][i] for p in parts]), mask)
    for i, mask in enumerate(masks_enc):
        rows = [row for p in parts for row in (p[1][i].split() if ragged else p[1][i])]
        assert all(torch.equal(a, b) for a, b in zip(rows, mask.split() if ragged else mask)) and len(rows) == 7
    assert split_batch(imgs, masks_enc, masks_pred, 1)[0][0] is imgs
    assert [len(p[0]) for p in split_batch(imgs[:1], [m[:1] if not ragged else m.select_rows(0, 1) for m in masks_enc],
                                             [m[:1] for m in masks_pred], 4)] == [1]  # a single image: one micro-batch


def test_packed_select_rows_offsets_and_bad_ranges():
    packed = PackedMasks.from_rows([torch.tensor([1, 2]), torch.tensor([5]), torch.tensor([0, 3, 4])])
    middle = packed.select_rows(1, 3)
    assert middle.lengths == (1, 3) and middle.max_len == 3
    assert middle.cu_seqlens.tolist() == [0, 1, 4] and middle.index.tolist() == [5, 0, 3, 4]
    for start, stop in ((2, 2), (-1, 1), (0, 4)):
        with pytest.raises(ValueError, match="select_rows"):
            packed.select_rows(start, stop)


def test_a_nonfinite_micro_batch_leaves_the_step_out():
    encoder, predictor, target, optimizer, lr_sched, wd_sched, momentum = tiny_training()
    imgs, masks_enc, masks_pred = batch(4)
    imgs[3, 0, 0, 0] = float("nan")  # only the second micro-batch sees it
    before = copy.deepcopy(encoder.state_dict()), copy.deepcopy(target.state_dict())
    result = train_step(ContextPredictor(encoder, predictor), target, optimizer, lr_sched, wd_sched, momentum, imgs, masks_enc, masks_pred,
                        accum_steps=2)
    assert result.nonfinite is not None and "loss is nan" in result.nonfinite
    assert all(torch.equal(v, before[0][k]) for k, v in encoder.state_dict().items())
    assert all(torch.equal(v, before[1][k]) for k, v in target.state_dict().items())
    assert not optimizer.state  # no update: no moments yet


def test_gradient_sync_reduces_in_the_last_micro_batch_only(monkeypatch):
    """DDP over a one-process gloo group with a hook that counts reductions."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        reductions = []

        def counting_hook(state, bucket):
            reductions.append(bucket.index())
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        model.register_comm_hook(None, counting_hook)
        for i in range(3):
            with gradient_sync(model, enabled=i == 2):
                model(torch.randn(2, 4)).sum().backward()
            assert len(reductions) == (1 if i == 2 else 0), (i, reductions)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- activation checkpointing


def block_calls(models) -> list[int]:
    calls = [0]
    for model in models:
        for block in list(getattr(model, "blocks", [])) + list(getattr(model, "predictor_blocks", [])):
            block.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # a recompute stops early: no post hook
    return calls


@pytest.mark.parametrize("ragged, shared", [(False, False), (True, False), (False, True)], ids=["dense", "ragged", "shared-context"])
def test_activation_checkpointing_recomputes_the_blocks_with_the_same_results(ragged, shared):
    runs = []
    for recompute in (False, True):
        encoder, predictor, target, optimizer, lr_sched, wd_sched, momentum = tiny_training()
        encoder.grad_checkpointing = predictor.grad_checkpointing = recompute
        calls = block_calls([encoder, predictor])
        imgs, masks_enc, masks_pred = batch(3, ragged)
        model = ContextPredictor(encoder, predictor, shared_context=shared)
        losses = [train_step(model, target, optimizer, lr_sched, wd_sched, momentum, imgs, masks_enc, masks_pred).loss for _ in range(2)]
        runs.append((losses, copy.deepcopy(encoder.state_dict()), copy.deepcopy(predictor.state_dict()), calls[0]))
    (plain_losses, plain_encoder, plain_predictor, plain_calls), (losses, encoder_state, predictor_state, calls) = runs
    assert torch.equal(torch.stack(plain_losses), torch.stack(losses))
    assert all(torch.equal(encoder_state[k], v) for k, v in plain_encoder.items())
    assert all(torch.equal(predictor_state[k], v) for k, v in plain_predictor.items())
    blocks_per_step = 12 + 1  # the context encoder's blocks and the predictor's (the target is a copy without the hooks)
    assert plain_calls == 2 * blocks_per_step and calls == 2 * plain_calls  # with checkpointing, each ran again in the backward


def test_the_trainer_switches_checkpointing_on(tmp_path):
    from fastjepa.train import set_up

    config = tiny_preset()
    config["meta"]["activation_checkpointing"] = True
    config["logging"]["folder"] = str(tmp_path)
    run = set_up(config, torch.device("cpu"), None, 0, None, False)
    assert run.model.encoder.grad_checkpointing and run.model.predictor.grad_checkpointing
    assert not run.target_encoder.grad_checkpointing  # no backward through it


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("optimization, data, message", [
    ({"grad_accum_steps": 0}, {}, "optimization.grad_accum_steps must be >= 1 (micro-batches per step), got 0"),
    ({"grad_accum_steps": -2}, {}, "optimization.grad_accum_steps must be >= 1"),
    ({"grad_accum_steps": 32}, {"batch_size": 16}, "optimization.grad_accum_steps 32 is larger than data.batch_size 16"),
    ({"grad_accum_steps": 3}, {"batch_size": 16}, "data.batch_size 16 is not divisible by optimization.grad_accum_steps 3"),
])
def test_bad_accumulation_settings_are_one_line_config_errors(optimization, data, message):
    config = tiny_preset()
    config["optimization"].update(optimization)
    config["data"].update(data)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        validate(config)
    assert "\n" not in str(info.value)
