"""``fastjepa finetune --dry-run``: the param groups, the schedule and the memory a checked config
will use, from the weights' shape and the data's listing, without training."""

from __future__ import annotations

import torch

from fastjepa.finetune.data import load_finetune_splits
from fastjepa.finetune.model import Classifier
from fastjepa.finetune.recipe import base_lr, lr_at, param_groups
from fastjepa.models import vision_transformer as vit
from fastjepa.weights import read_weights

SAVED_PER_TOKEN = 18  # values kept per token and channel in a block for the backward, as the trainer's plan counts them


def describe(config: dict, weights, data: str, device=None, seed: int = 0, per_class=None, fraction=None, subset=None) -> str:
    data_cfg, opt, meta = config["data"], config["optimization"], config["meta"]
    if weights is None:
        return "fastjepa finetune --dry-run: the config is valid (give --weights to see the param groups, schedule and memory)"
    _, shape = read_weights(weights, config["model"]["encoder"])
    crop = data_cfg["crop_size"] or shape.crop_size
    splits = load_finetune_splits(data, crop, data_cfg["holdout"], per_class, fraction, subset, seed)
    with torch.device("meta"):
        encoder = getattr(vit, shape.model_name)(img_size=[shape.crop_size], patch_size=shape.patch_size)
        model = Classifier(encoder, len(splits.classes), config["model"]["head_norm"])
    groups = param_groups(model, opt["weight_decay"], opt["layer_decay"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    processes = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    global_batch = data_cfg["batch_size"] * processes
    ipe = len(splits.train) // global_batch
    peak = base_lr(config, global_batch)
    rule = f"lr {opt['lr']:g}" if opt["lr"] is not None else f"blr {opt['blr']:g} x {global_batch} / 256"

    params_m = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    tokens = (crop // shape.patch_size) ** 2
    value_bytes = 2 if meta["use_bfloat16"] else 4
    micro_batch = data_cfg["batch_size"] // opt["grad_accum_steps"]
    blocks = len(encoder.blocks)
    per_image = tokens * encoder.embed_dim * (blocks + SAVED_PER_TOKEN if meta["activation_checkpointing"] else SAVED_PER_TOKEN * blocks)
    activation_gb = micro_batch * per_image * value_bytes / 1e9
    lines = [
        "fastjepa finetune --dry-run: the config is valid",
        f"  model          {shape.model_name}/{shape.patch_size} at {crop} px (pretrained at {shape.crop_size}) from {weights}: "
        f"{params_m:.1f} M trained parameters, "
        f"head {encoder.embed_dim} -> {len(splits.classes)} classes" + (" (BatchNorm first)" if config["model"]["head_norm"] else "")
        + f", drop path {config['model']['drop_path']:g}",
        f"  data           {data}: {len(splits.train)} training images, {len(splits.heldout)} held out (choose the best epoch), "
        f"{len(splits.val)} val",
        f"  schedule       {opt['epochs']} epochs x {ipe} steps (global batch {global_batch}); peak lr {peak:.3g} ({rule}), "
        f"warmup {opt['warmup_epochs']:g} epochs from 0, then a half-cycle cosine to {opt['min_lr']:g}; "
        f"lr at epoch 1: {lr_at(1.0, peak, opt['min_lr'], opt['warmup_epochs'], opt['epochs']):.3g}",
        f"  memory         about {16 * params_m * 1e6 / 1e9:.2f} GB of weights, gradients and AdamW moments + {activation_gb:.2f} GB of "
        f"activations per process ({'bf16' if meta['use_bfloat16'] else 'fp32'}, micro-batch {micro_batch}, activation checkpointing "
        f"{'on' if meta['activation_checkpointing'] else 'off'}; a rough estimate)",
        f"  device         {device}",
        f"  param groups   {len(groups)} (MAE's layer-wise lr decay {opt['layer_decay']:g}):",
        f"    {'group':<22} {'tensors':>7} {'params':>10} {'lr scale':>10} {'weight decay':>12}",
    ]
    for group in groups:
        count = sum(p.numel() for p in group["params"])
        lines.append(f"    {group['name']:<22} {len(group['params']):>7} {count:>10,} {group['lr_scale']:>10.4g} {group['weight_decay']:>12g}")
    return "\n".join(lines)
