"""``fastjepa train --dry-run``: what a checked config will do, without reading any image."""

from __future__ import annotations

import os

import torch

from fastjepa.config import mask_sampler
from fastjepa.data.images import is_shard
from fastjepa.data.loader import resolve_backend
from fastjepa.flops import step_flops_per_image
from fastjepa.helper import init_model

MASK_BATCHES = 20  # batches drawn to estimate the mean token counts (masks only, no data)


def _millions(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6


def _count_files(folder: str) -> tuple[int, int] | None:
    """(files, .tar shards among them) under ``folder`` (a directory listing, no file is
    opened), or None if absent."""
    if not os.path.isdir(folder):
        return None
    names = [name for _, _, files in os.walk(folder) for name in files]
    return len(names), sum(is_shard(name) for name in names)


def activation_bytes(images: int, recompute: bool, meta: dict, mask: dict, encoder, k_context: float, k_target: float) -> float:
    """Activations kept for the backward of ``images`` images, roughly: about 18 values per
    token and channel in every block, or with ``recompute`` (activation checkpointing) one
    per block (its input) plus one block's 18 while it runs again."""
    value_bytes = 2 if meta["use_bfloat16"] else 4
    saved_per_token = 18
    context_block = mask["num_enc_masks"] * k_context * encoder.embed_dim
    predictor_block = mask["num_enc_masks"] * mask["num_pred_masks"] * (k_context + k_target) * meta["pred_emb_dim"]
    every_block = len(encoder.blocks) * context_block + meta["pred_depth"] * predictor_block
    per_image = every_block + saved_per_token * max(context_block, predictor_block) if recompute else saved_per_token * every_block
    return images * per_image * value_bytes


def describe(config: dict, device=None) -> str:
    from fastjepa.train import data_root, fused_optimizer_ema

    data, mask, meta, opt = config["data"], config["mask"], config["meta"], config["optimization"]
    with torch.device("meta"):
        encoder, predictor = init_model("meta", mask["patch_size"], meta["model_name"], data["crop_size"], meta["pred_depth"], meta["pred_emb_dim"])
    sampler = mask_sampler(config)
    generator = torch.Generator().manual_seed(0)
    k_context = k_target = 0.0
    for _ in range(MASK_BATCHES):
        masks_enc, masks_pred = sampler.sample(data["batch_size"], generator=generator)
        k_context += masks_enc[0].shape[1] / MASK_BATCHES
        k_target += masks_pred[0].shape[1] / MASK_BATCHES
    flops = step_flops_per_image(meta["model_name"], data["crop_size"], mask["patch_size"], meta["pred_depth"], meta["pred_emb_dim"],
                                 k_context, k_target, mask["num_enc_masks"], mask["num_pred_masks"])

    encoder_m, predictor_m = _millions(encoder), _millions(predictor)
    state_gb = (16 * (encoder_m + predictor_m) + 4 * encoder_m) * 1e6 / 1e9  # params, grads, 2 moments; fp32 target
    accum = opt["grad_accum_steps"]
    micro_batch = data["batch_size"] // accum
    activation_gb = {recompute: activation_bytes(micro_batch, recompute, meta, mask, encoder, k_context, k_target) / 1e9
                     for recompute in (False, True)}
    checkpointing = meta["activation_checkpointing"]

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = resolve_backend(data["backend"], device)
    root = data_root(config)
    counted = _count_files(root)
    files, shards = counted or (None, 0)
    ipe = None if files is None or shards else files * data["repeat"] // data["batch_size"]
    lines = [
        "fastjepa train --dry-run: the config is valid",
        f"  model          {meta['model_name']}/{mask['patch_size']} at {data['crop_size']} px: encoder {encoder_m:.1f} M parameters, "
        f"predictor {predictor_m:.1f} M (depth {meta['pred_depth']}, width {meta['pred_emb_dim']})",
        f"  masks          {mask['num_enc_masks']} context x {k_context:.1f} tokens, {mask['num_pred_masks']} targets x {k_target:.1f} tokens "
        f"(means over {MASK_BATCHES} sampled batches of {data['batch_size']})",
        f"  FLOPs / image  {flops.total / 1e9:.1f} GFLOP per step: target forward {flops.target_forward / 1e9:.1f}, "
        f"context forward+backward {flops.context_forward_backward / 1e9:.1f}, predictor forward+backward {flops.predictor_forward_backward / 1e9:.1f}",
        f"  data           {root}: " + ("not found" if files is None else f"{files} files (listed, not read) x{data['repeat']} per epoch")
        + (f", {shards} of them .tar shards (their images are counted when training starts)" if shards else "")
        + f", backend {backend}" + (" (auto)" if data["backend"] == "auto" else ""),
        f"  steps          {ipe} per epoch x {opt['epochs']} epochs = {ipe * opt['epochs']} (batch {data['batch_size']} per process)"
        if ipe else f"  steps          unknown until the images are listed (batch {data['batch_size']} per process)",
        f"  memory         about {state_gb:.1f} GB of weights and optimizer state + {activation_gb[checkpointing]:.1f} GB of activations "
        f"({'bf16' if meta['use_bfloat16'] else 'fp32'}; a rough estimate; "
        f"activation checkpointing {'on' if checkpointing else 'off'}, {activation_gb[not checkpointing]:.1f} GB {'off' if checkpointing else 'on'})",
        f"  micro-batches  {accum} of {micro_batch} images per step (optimization.grad_accum_steps)" if accum > 1
        else "  micro-batches  none (the whole batch at once; optimization.grad_accum_steps: k runs k smaller ones)",
        "  compile        " + (f"the encoder's, predictor's and target's blocks (torch.compile, mode "
                                 f"{'default' if meta['compile'] is True else meta['compile']}, token dimension dynamic)"
                                 if meta["compile"] else "off (meta.compile)"),
        f"  optimizer      {fused_optimizer_ema(opt['fused_optimizer_ema'], device)[1]}",
        f"  device         {device}",
    ]
    if meta["init_weights"]:
        found = "" if os.path.exists(meta["init_weights"]) else " (not found)"
        lines.insert(1, f"  init weights   {meta['init_weights']}{found}: encoder and target encoder start from them, the predictor fresh")
    return "\n".join(lines)
