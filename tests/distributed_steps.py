"""A few ``train_step`` calls of a tiny I-JEPA on a fixed global batch: run by
tests/test_distributed.py in one process (the whole batch) or under torchrun (each rank
its slice, under DDP or FSDP2). Rank 0 saves the losses (averaged over the ranks) and the
whole state (weights, target, optimizer moments) with ``torch.save``.

    torchrun --nproc-per-node 2 tests/distributed_steps.py OUT.pt --sharding fsdp [--accum 2]
"""

import argparse
import copy

import torch
import torch.distributed as dist

from fastjepa.config import mask_sampler, validate
from fastjepa.distributed import full_state, rank, setup, world_size, wrap
from fastjepa.helper import init_model, init_opt
from fastjepa.models.vision_transformer import compile_blocks
from fastjepa.step import ContextPredictor, FusedUpdate, train_step
from fastjepa.utils.schedulers import momentum_schedule

CROP, PATCH = 48, 8
SCHEDULE_STEPS = 10  # the lr, weight-decay and momentum schedules' length: one epoch of 10 steps


def config(sharding: str = "ddp", grad_reduce_dtype: str = "float32") -> dict:
    return validate({
        "data": {"crop_size": CROP, "batch_size": 4},
        "mask": {"patch_size": PATCH, "min_keep": 1},
        "meta": {"model_name": "vit_tiny", "pred_depth": 2, "pred_emb_dim": 48, "use_bfloat16": False,
                 "sharding": sharding, "grad_reduce_dtype": grad_reduce_dtype},
        "optimization": {"epochs": 1, "warmup": 0, "start_lr": 1e-3, "lr": 1e-3, "ema": [0.9, 1.0]},
    })


def global_batch(step: int, size: int):
    """The step's images and masks for the whole batch; the sampler truncates every context
    to the batch's shortest, so any slice of rows is a valid batch with the same lengths."""
    generator = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(size, 3, CROP, CROP, generator=generator)
    masks_enc, masks_pred = mask_sampler(config()).sample(size, generator=generator)
    return images, masks_enc, masks_pred


def run(steps: int, batch: int, sharding: str = "ddp", grad_reduce_dtype: str = "float32", accum_steps: int = 1,
        compiled: bool = False, fused: bool = False) -> dict:
    """``steps`` steps over a global batch of ``batch`` images, this rank taking its slice in
    ``accum_steps`` micro-batches; ``compiled``: the blocks compiled (aot_eager) inside the
    wrapper, as the trainer does; ``fused``: AdamW and the EMA as one pass."""
    device, started = setup("cpu")
    cfg = config(sharding, grad_reduce_dtype)
    meta, opt = cfg["meta"], cfg["optimization"]
    torch.manual_seed(0)
    encoder, predictor = init_model(device, PATCH, meta["model_name"], CROP, meta["pred_depth"], meta["pred_emb_dim"])
    target = copy.deepcopy(encoder).requires_grad_(False)
    if compiled:
        for module in (encoder, predictor, target):
            compile_blocks(module, True, backend="aot_eager")
    model = wrap(ContextPredictor(encoder, predictor), target, meta, device, accumulating=accum_steps > 1)
    optimizer, _, lr_schedule, wd_schedule = init_opt(encoder, predictor, SCHEDULE_STEPS, opt["start_lr"], opt["lr"], opt["warmup"], 1,
                                                      opt["weight_decay"], opt["final_weight_decay"], opt["final_lr"], False, 1.0)
    momentum = momentum_schedule(opt["ema"], SCHEDULE_STEPS, 1, 1.0)
    fused_update = FusedUpdate(optimizer, encoder, target) if fused else None
    share = batch // world_size()
    rows = slice(rank() * share, (rank() + 1) * share)
    losses = []
    for step in range(steps):
        images, masks_enc, masks_pred = global_batch(step, batch)
        result = train_step(model, target, optimizer, lr_schedule, wd_schedule, momentum,
                            images[rows], [m[rows] for m in masks_enc], [m[rows] for m in masks_pred], accum_steps=accum_steps,
                            fused_optimizer_ema=fused_update)
        assert result.nonfinite is None, result.nonfinite
        loss = result.loss.clone()
        if world_size() > 1:  # every rank's loss is a mean over the same number of elements
            dist.all_reduce(loss)
            loss /= world_size()
        losses.append(loss.item())
    state = full_state({"encoder": encoder.state_dict(), "predictor": predictor.state_dict(), "target_encoder": target.state_dict(),
                        "opt": optimizer.state_dict()})
    this_rank = rank()
    if started:
        dist.destroy_process_group()
    return {"losses": losses, "state": state, "rank": this_rank}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sharding", default="ddp")
    parser.add_argument("--grad-reduce-dtype", default="float32")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fused", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args.steps, args.batch, args.sharding, args.grad_reduce_dtype, args.accum, args.compile, args.fused)
    if result["rank"] == 0:
        torch.save(result, args.out)
