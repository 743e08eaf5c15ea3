"""Argument checks the probes share."""

from __future__ import annotations

import torch


def check_labels(name: str, labels: torch.Tensor, count: int, num_classes: int, unit: str) -> None:
    """``labels``: 1-D, one integer label in [0, num_classes) per ``unit`` (image, feature row) of
    the ``count`` of split ``name``, which is not empty; ``ValueError`` names the problem."""
    if labels.dim() != 1 or len(labels) != count:
        raise ValueError(f"{name} labels must be 1-D with one label per {unit}: {tuple(labels.shape)} labels for {count} {unit}s")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} labels must be integers, got dtype {labels.dtype}")
    if count == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} labels must lie in [0, num_classes={num_classes}), got labels from {low} to {high}")
