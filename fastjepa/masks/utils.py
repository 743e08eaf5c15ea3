"""Token selection by mask indices (the reference's ``src/masks/utils.py``)."""

from __future__ import annotations

from typing import Sequence

import torch


def _as_list(masks) -> list[torch.Tensor]:
    return list(masks) if isinstance(masks, (list, tuple)) else [masks]


def apply_masks(x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Gather the tokens of ``x`` (B, N, D) named by each mask (B, K) and stack the
    results mask-major: row ``i * B + b`` holds sample ``b`` under mask ``i``.

    Same result as the reference, which builds an int64 (B, K, D) index per mask
    and concatenates; here one ``index_select`` over flattened rows reads a
    (M * B * K) index instead.
    """
    masks = _as_list(masks)
    if x.dim() != 3:
        raise ValueError(f"apply_masks: x must be (B, N, D), got shape {tuple(x.shape)}")
    B, N, D = x.shape
    if len({m.shape for m in masks}) != 1 or masks[0].dim() != 2 or masks[0].shape[0] != B:
        shapes = [tuple(m.shape) for m in masks]
        raise ValueError(f"apply_masks: every mask must be (B={B}, K) with one K, got {shapes}")
    if masks[0].dtype not in (torch.int32, torch.int64):
        raise ValueError(f"apply_masks: masks must be int32 or int64, got {masks[0].dtype}")
    index = torch.stack(masks).to(device=x.device, dtype=torch.int64)  # (M, B, K)
    K = index.shape[-1]
    row_offset = torch.arange(B, device=x.device, dtype=torch.int64).mul_(N).view(1, B, 1)
    rows = x.reshape(B * N, D).index_select(0, (index + row_offset).view(-1))
    return rows.view(len(masks) * B, K, D)
