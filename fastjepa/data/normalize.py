"""uint8 images -> normalised floats, on whatever device the images are."""

from __future__ import annotations

import functools

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) uint8 in [0, 255] -> (x / 255 - mean) / std with ImageNet statistics."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"normalize expects (B, 3, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
    mean, std = _statistics(images.device, dtype)
    return images.to(dtype).sub_(mean).div_(std)  # one new tensor: on the CPU each fresh batch-sized buffer costs page faults


@functools.lru_cache(maxsize=None)
def _statistics(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std in 0..255 units, (1, 3, 1, 1), made once per device: no copy to the device per batch."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype).view(1, 3, 1, 1).mul(255).to(device)
    std = torch.tensor(IMAGENET_STD, dtype=dtype).view(1, 3, 1, 1).mul(255).to(device)
    return mean, std
