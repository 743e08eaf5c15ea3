"""Model, optimizer and checkpoint set-up with the reference's signatures (``src/helper.py``).

Differences from the reference, on purpose:
* ``init_opt`` returns the reference's GradScaler for ``use_bfloat16`` (a fork of the
  reference's train.py calls it), but fastjepa's own trainer asks for none: bf16 needs no loss
  scaling, and its non-finite guard, ``fastjepa.step.nonfinite_flag``, catches what the
  scaler's inf check would, without its host sync;
* AdamW is fused on a GPU (``fused=True``: the same update in one kernel);
* a checkpoint that cannot be loaded raises ``CheckpointError`` instead of being
  logged and silently replaced by a fresh start (``UnsafeCheckpointError`` when its pickle
  would run code: it is never unpickled);
* ``save_checkpoint`` checks the free space first and raises ``DiskFullError`` on a full disk.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile

import torch

from fastjepa.errors import DiskFullError as DiskFullError  # save_checkpoint's error, importable from here
from fastjepa.files import replaced_atomically, space_needed
from fastjepa.models import vision_transformer as vit
from fastjepa.utils.schedulers import CosineWDSchedule, WarmupCosineSchedule
from fastjepa.utils.tensors import trunc_normal_

logger = logging.getLogger(__name__)

MODEL_NAMES = tuple(vit.VIT_EMBED_DIMS)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, truncated or does not fit the models."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle names Python objects (classes, functions) beyond tensors and plain
    values: unpickling it could run any code, so it is refused before anything in it runs."""


def init_model(device, patch_size=16, model_name="vit_base", crop_size=224, pred_depth=6, pred_emb_dim=384):
    """Build the encoder and the predictor and re-initialise every Linear (trunc-normal
    std 0.02, zero bias) and LayerNorm (1, 0), as the reference trainer does. The
    predictor has the encoder's number of heads."""
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model_name {model_name!r}; choose one of {', '.join(MODEL_NAMES)}")
    encoder = getattr(vit, model_name)(img_size=[crop_size], patch_size=patch_size)
    predictor = vit.vit_predictor(
        num_patches=encoder.patch_embed.num_patches,
        embed_dim=encoder.embed_dim,
        predictor_embed_dim=pred_emb_dim,
        depth=pred_depth,
        num_heads=encoder.num_heads,
    )
    for module in list(encoder.modules()) + list(predictor.modules()):
        if isinstance(module, torch.nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
    encoder.to(device)
    predictor.to(device)
    return encoder, predictor


def _param_groups(encoder, predictor):
    """The reference's four AdamW groups, in its order: decayed encoder / predictor
    weights, then encoder / predictor biases and 1-D parameters without decay."""

    def decayed(name, p):
        return "bias" not in name and p.dim() != 1

    return [
        {"params": [p for n, p in encoder.named_parameters() if decayed(n, p)]},
        {"params": [p for n, p in predictor.named_parameters() if decayed(n, p)]},
        {"params": [p for n, p in encoder.named_parameters() if not decayed(n, p)], "WD_exclude": True, "weight_decay": 0},
        {"params": [p for n, p in predictor.named_parameters() if not decayed(n, p)], "WD_exclude": True, "weight_decay": 0},
    ]


def init_opt(
    encoder,
    predictor,
    iterations_per_epoch,
    start_lr,
    ref_lr,
    warmup,
    num_epochs,
    wd=1e-6,
    final_wd=1e-6,
    final_lr=0.0,
    use_bfloat16=False,
    ipe_scale=1.25,
):
    """AdamW over the four parameter groups plus the lr and weight-decay schedules, fused
    (one kernel over all parameters, same update) when the parameters are on a GPU.
    Returns ``(optimizer, scaler, scheduler, wd_scheduler)``: ``scaler`` is a CUDA GradScaler
    with ``use_bfloat16`` (disabled, with torch's warning, where CUDA is absent), else None."""
    on_gpu = next(encoder.parameters()).device.type == "cuda"
    optimizer = torch.optim.AdamW(_param_groups(encoder, predictor), fused=on_gpu or None)
    total_steps = int(ipe_scale * num_epochs * iterations_per_epoch)
    scheduler = WarmupCosineSchedule(
        optimizer,
        warmup_steps=int(warmup * iterations_per_epoch),
        start_lr=start_lr,
        ref_lr=ref_lr,
        final_lr=final_lr,
        T_max=total_steps,
    )
    wd_scheduler = CosineWDSchedule(optimizer, ref_wd=wd, final_wd=final_wd, T_max=total_steps)
    scaler = torch.amp.GradScaler("cuda") if use_bfloat16 else None
    return optimizer, scaler, scheduler, wd_scheduler


def _fit_prefix(state: dict, model: torch.nn.Module) -> dict:
    """Add or strip DDP's ``module.`` prefix so the keys match the model's own."""
    model_wrapped = next(iter(model.state_dict()), "").startswith("module.")
    state_wrapped = next(iter(state), "").startswith("module.")
    if state_wrapped and not model_wrapped:
        return {k.removeprefix("module."): v for k, v in state.items()}
    if model_wrapped and not state_wrapped:
        return {f"module.{k}": v for k, v in state.items()}
    return state


def first_problem(error: Exception, limit: int = 300) -> str:
    """An error message in one line: ``load_state_dict``'s (a header, then a line per problem)
    as its first problem and how many more there are; any other as its first non-empty line.
    Cut at ``limit`` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    problems = lines[1:] if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict") else lines[:1]
    first = problems[0] if len(problems[0]) <= limit else problems[0][:limit] + " ..."
    return first + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")


def read_checkpoint(path) -> dict:
    """The checkpoint dict at ``path``, loaded on the CPU; ``CheckpointError`` names the problem."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a write that never finished?")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise load_failure(path, e) from e
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict")
    return checkpoint


def load_failure(path, error: Exception) -> CheckpointError:
    """What ``torch.load(path, weights_only=True)`` failing with ``error`` means, in one line: a
    pickle that names globals weights_only refuses (torch's message says "GLOBAL module.name";
    nothing was unpickled past them), or a file that is truncated, corrupt or not a torch file."""
    text = str(error)
    refused = re.findall(r"GLOBAL ((?:\w+\.)+\w+)", text) if text.startswith("Weights only load failed") else []
    if refused:  # a truncated pickle can cut a name short ("GLOBAL torc."): only whole dotted names count
        names = ", ".join(dict.fromkeys(refused))
        return UnsafeCheckpointError(f"checkpoint {path} holds Python objects fastjepa will not unpickle ({names}): it is not safe to load, "
                                     "and no code in it ran")
    if isinstance(error, pickle.UnpicklingError) or not zipfile.is_zipfile(path):  # torch's own message would be about pickling
        return CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): not a torch file (or a truncated one)")
    return CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {type(error).__name__}: {first_problem(error)}")


def load_models(checkpoint: dict, path, encoder, predictor, target_encoder) -> None:
    """Load a checkpoint dict's three models (``module.`` prefixes or not); strict,
    ``CheckpointError`` names the file, the entry and what does not fit."""
    required = ["encoder", "predictor", "epoch"] + (["target_encoder"] if target_encoder is not None else [])
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}; it has {', '.join(map(str, checkpoint))}")
    for key, model in (("encoder", encoder), ("predictor", predictor), ("target_encoder", target_encoder)):
        if model is None:
            continue
        if not isinstance(checkpoint[key], dict):
            raise CheckpointError(f"checkpoint {path}: '{key}' is a {type(checkpoint[key]).__name__}, expected a state_dict")
        try:
            model.load_state_dict(_fit_prefix(checkpoint[key], model))
        except RuntimeError as e:
            raise CheckpointError(f"checkpoint {path}: '{key}' does not fit the model: {first_problem(e)}") from e


def load_optimizer(checkpoint: dict, path, opt) -> None:
    """Load a checkpoint dict's ``opt`` entry into ``opt``; under FSDP2 each state tensor
    is sharded like its parameter first."""
    from fastjepa.distributed import shard_optimizer_state

    if "opt" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} lacks opt; it has {', '.join(map(str, checkpoint))}")
    try:
        opt.load_state_dict(shard_optimizer_state(checkpoint["opt"], opt))
    except (ValueError, KeyError, RuntimeError, AttributeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: 'opt' does not fit the optimizer: {first_problem(e)}") from e


def load_checkpoint(device, r_path, encoder, predictor, target_encoder, opt, scaler):
    """Load a reference-format checkpoint into the models and the optimizer.
    Returns ``(encoder, predictor, target_encoder, opt, scaler, epoch)``. Loading is
    strict; any problem raises ``CheckpointError`` (the reference logs it and restarts
    from scratch)."""
    checkpoint = read_checkpoint(r_path)
    load_models(checkpoint, r_path, encoder, predictor, target_encoder)
    if opt is not None:
        load_optimizer(checkpoint, r_path, opt)
    if scaler is not None and checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    epoch = checkpoint["epoch"]
    logger.info("loaded checkpoint %s (epoch %s)", r_path, epoch)
    return encoder, predictor, target_encoder, opt, scaler, epoch


def save_checkpoint(state: dict, path) -> None:
    """Write ``state`` with ``torch.save`` atomically (``fastjepa.files.replaced_atomically``): a
    temporary file in the same folder, flushed to disk, then renamed over ``path``. A failed
    write leaves any previous file at ``path`` untouched and no temporary file; a full disk,
    found by the free-space check before writing or by the write itself, raises
    ``DiskFullError`` (an ``OSError``, errno ENOSPC) naming the path, the size and the space free."""
    with replaced_atomically(path, space_needed(state)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
