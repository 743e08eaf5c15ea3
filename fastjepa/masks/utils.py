"""Token selection by mask indices (the reference's ``src/masks/utils.py``)."""

from __future__ import annotations

from typing import Sequence

import torch

from fastjepa.ops import gather_tokens


def _as_list(masks) -> list[torch.Tensor]:
    return list(masks) if isinstance(masks, (list, tuple)) else [masks]


def stack_masks(masks: torch.Tensor | Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Masks (B, K) each, one K, stacked mask-major into one (len(masks) * B, K) index."""
    masks = _as_list(masks)
    if not masks or len({m.shape for m in masks}) != 1 or masks[0].dim() != 2 or masks[0].shape[0] != batch_size:
        shapes = [tuple(m.shape) for m in masks]
        raise ValueError(f"every mask must be (B={batch_size}, K) with one K, got {shapes}")
    if masks[0].dtype not in (torch.int32, torch.int64):
        raise ValueError(f"masks must be int32 or int64, got {masks[0].dtype}")
    return masks[0] if len(masks) == 1 else torch.cat(masks)


def apply_masks(x: torch.Tensor, masks: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Gather the tokens of ``x`` (B, N, D) named by each mask (B, K) and stack the
    results mask-major: row ``i * B + b`` holds sample ``b`` under mask ``i``.

    Same result as the reference, which builds an int64 (B, K, D) index per mask and
    concatenates; here one ``fastjepa.ops.gather_tokens`` reads the (M * B, K) indices
    and writes the stacked result directly.
    """
    if x.dim() != 3:
        raise ValueError(f"apply_masks: x must be (B, N, D), got shape {tuple(x.shape)}")
    try:
        index = stack_masks(masks, x.shape[0])
    except ValueError as e:
        raise ValueError(f"apply_masks: {e}") from None
    return gather_tokens(x, index.to(x.device))
