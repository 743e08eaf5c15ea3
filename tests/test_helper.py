"""init_opt's groups and schedules; checkpoints: round trip, DDP prefixes, failures."""

import contextlib
import copy
import os

import pytest
import torch

from fastjepa.helper import CheckpointError, init_model, init_opt, load_checkpoint, read_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    encoder, predictor = init_model("cpu", patch_size=8, model_name="vit_tiny", crop_size=16, pred_depth=1, pred_emb_dim=48)
    return encoder, predictor


def make_opt(encoder, predictor):
    return init_opt(encoder, predictor, iterations_per_epoch=10, start_lr=1e-4, ref_lr=1e-3, warmup=2, num_epochs=5, wd=0.04, final_wd=0.4, ipe_scale=1.0)


def test_init_opt_returns_the_reference_grad_scaler_with_bfloat16(models):
    """A fork of the reference's train.py calls scaler.scale(loss).backward() when use_bfloat16;
    without CUDA torch disables the scaler (with a warning) and it passes values through."""
    encoder, predictor = models
    with pytest.warns(UserWarning, match="CUDA is not available") if not torch.cuda.is_available() else contextlib.nullcontext():
        optimizer, scaler, _, _ = init_opt(encoder, predictor, 10, 1e-4, 1e-3, 2, 5, use_bfloat16=True)
    assert isinstance(scaler, torch.amp.GradScaler)
    assert scaler.is_enabled() == torch.cuda.is_available()
    assert init_opt(encoder, predictor, 10, 1e-4, 1e-3, 2, 5, use_bfloat16=False)[1] is None


def test_init_opt_groups_and_schedules(models):
    encoder, predictor = models
    optimizer, scaler, scheduler, wd_scheduler = make_opt(encoder, predictor)
    assert scaler is None and isinstance(optimizer, torch.optim.AdamW)
    groups = optimizer.param_groups
    names = {id(p): n for model in models for n, p in model.named_parameters()}
    assert [len(g["params"]) for g in groups] == [50, 8, 99, 12]
    assert all("bias" not in names[id(p)] and p.dim() > 1 for g in groups[:2] for p in g["params"])
    assert all("bias" in names[id(p)] or p.dim() == 1 for g in groups[2:] for p in g["params"])
    assert any(p is predictor.mask_token for p in groups[1]["params"])  # mask_token is decayed
    assert groups[2]["WD_exclude"] and groups[2]["weight_decay"] == 0
    assert (scheduler.warmup_steps, scheduler.T_max, wd_scheduler.T_max) == (20, 30, 50)


def test_checkpoint_round_trip_and_ddp_prefixes(models, tmp_path):
    encoder, predictor = models
    target = copy.deepcopy(encoder)
    optimizer = make_opt(encoder, predictor)[0]
    def wrapped(m):
        return {f"module.{k}": v for k, v in m.state_dict().items()}  # as DDP saves them
    path = tmp_path / "jepa-latest.pth.tar"
    save_checkpoint({"encoder": wrapped(encoder), "predictor": wrapped(predictor), "target_encoder": wrapped(target),
                     "opt": optimizer.state_dict(), "scaler": None, "epoch": 7, "loss": 0.5, "batch_size": 4, "world_size": 1, "lr": 1e-3}, path)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    torch.manual_seed(1)
    fresh_encoder, fresh_predictor = init_model("cpu", patch_size=8, model_name="vit_tiny", crop_size=16, pred_depth=1, pred_emb_dim=48)
    fresh_target = copy.deepcopy(fresh_encoder)
    fresh_opt = make_opt(fresh_encoder, fresh_predictor)[0]
    *_, epoch = load_checkpoint("cpu", path, fresh_encoder, fresh_predictor, fresh_target, fresh_opt, None)
    assert epoch == 7
    for a, b in ((encoder, fresh_encoder), (predictor, fresh_predictor), (target, fresh_target)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_failed_loads_raise_with_the_reason(models, tmp_path):
    encoder, predictor = models
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth.tar")
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint({"encoder": encoder.state_dict(), "predictor": predictor.state_dict(), "epoch": 1}, path)
    truncated = tmp_path / "truncated.pth.tar"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="lacks target_encoder"):
        load_checkpoint("cpu", path, encoder, predictor, copy.deepcopy(encoder), None, None)
    other, _ = init_model("cpu", patch_size=8, model_name="vit_small", crop_size=16, pred_depth=1, pred_emb_dim=48)
    with pytest.raises(CheckpointError, match="'encoder' does not fit"):
        load_checkpoint("cpu", path, other, predictor, None, None, None)


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.pth.tar"
    save_checkpoint({"epoch": 1}, path)
    with pytest.raises(Exception):
        save_checkpoint({"epoch": 2, "bad": lambda: None}, path)  # not picklable: fails half way
    assert read_checkpoint(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["ckpt.pth.tar"]
