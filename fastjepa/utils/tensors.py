"""Tensor helpers with the reference's names (``src/utils/tensors.py``). Its ``apply_masks``, a
duplicate of ``src/masks/utils.py``'s there, is the one of ``fastjepa.utils.masking`` here."""

from __future__ import annotations

import math

import torch

from fastjepa.utils.masking import apply_masks

__all__ = ["apply_masks", "repeat_interleave_batch", "trunc_normal_"]


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """Fill ``tensor`` in place from N(mean, std) truncated to [a, b] (absolute bounds).

    Inverse-CDF sampling: uniform on [2 cdf(a) - 1, 2 cdf(b) - 1], then erfinv. The
    reference draws the same way, so a given RNG state gives the same values.
    """

    def normal_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    low, high = normal_cdf((a - mean) / std), normal_cdf((b - mean) / std)
    tensor.uniform_(2 * low - 1, 2 * high - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    tensor.add_(mean)
    return tensor.clamp_(min=a, max=b)


def repeat_interleave_batch(x: torch.Tensor, B: int, repeat: int) -> torch.Tensor:
    """Repeat each consecutive chunk of B rows ``repeat`` times in place of the chunk.

    x (N * B, ...) -> (N * repeat * B, ...): [c0, c0, ..., c1, c1, ...].
    With ``repeat == 1`` the input is returned as is (no copy).
    """
    if B < 1 or len(x) % B != 0:
        raise ValueError(f"repeat_interleave_batch: len(x)={len(x)} is not a multiple of B={B}")
    if repeat < 1:
        raise ValueError(f"repeat_interleave_batch: repeat must be >= 1, got {repeat}")
    if repeat == 1:
        return x
    return x.unflatten(0, (len(x) // B, B)).repeat_interleave(repeat, dim=0).flatten(0, 1)
