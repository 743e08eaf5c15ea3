"""I-JEPA training: the step (this module's core), shared by the trainer and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from fastjepa.masks.utils import apply_masks
from fastjepa.utils.tensors import repeat_interleave_batch


@dataclass
class StepResult:
    loss: torch.Tensor  # 0-d, detached, still on the device: reading it is the caller's sync
    lr: float
    wd: float
    momentum: float


@torch.no_grad()
def ema_update_(target_params: Iterable[torch.Tensor], online_params: Iterable[torch.Tensor], momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for every pair."""
    targets, onlines = list(target_params), list(online_params)
    if len(targets) != len(onlines):
        raise ValueError(f"ema_update_: {len(targets)} target tensors but {len(onlines)} online tensors")
    torch._foreach_mul_(targets, momentum)
    torch._foreach_add_(targets, onlines, alpha=1.0 - momentum)


def jepa_loss(encoder, predictor, target_encoder, imgs, masks_enc: Sequence[torch.Tensor], masks_pred: Sequence[torch.Tensor]) -> torch.Tensor:
    """Smooth-L1 (beta 1, mean) between the predictor's output and the target
    encoder's output after a LayerNorm without affine (eps 1e-5), at the target blocks."""
    with torch.no_grad():
        h = target_encoder(imgs)
        h = F.layer_norm(h, (h.size(-1),))
        h = repeat_interleave_batch(apply_masks(h, masks_pred), len(imgs), repeat=len(masks_enc))
    z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)
    dtype = torch.promote_types(z.dtype, torch.float32)  # fp32 under bf16 autocast, fp64 stays fp64
    return F.smooth_l1_loss(z.to(dtype), h.to(dtype))


def train_step(
    encoder,
    predictor,
    target_encoder,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    wd_scheduler,
    momentum_scheduler: Iterator[float],
    imgs: torch.Tensor,
    masks_enc: Sequence[torch.Tensor],
    masks_pred: Sequence[torch.Tensor],
    use_bfloat16: bool = False,
) -> StepResult:
    """One I-JEPA iteration in the reference's order: schedules, forward under bf16
    autocast (when asked), loss, backward, optimizer step, zero_grad, EMA."""
    lr = lr_scheduler.step()
    wd = wd_scheduler.step()
    with torch.autocast(device_type=imgs.device.type, dtype=torch.bfloat16, enabled=use_bfloat16):
        loss = jepa_loss(encoder, predictor, target_encoder, imgs, masks_enc, masks_pred)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    momentum = next(momentum_scheduler)
    ema_update_(target_encoder.parameters(), encoder.parameters(), momentum)
    return StepResult(loss.detach(), lr, wd, momentum)
