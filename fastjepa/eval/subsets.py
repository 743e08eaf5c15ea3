"""Which training images a probe sees: class-balanced low-shot subsets, the reference's
``ImageNetSubset`` list files, and the held-out part of train used to choose among heads.

Every draw is a seeded ``torch.Generator`` permutation per class, so a seed gives the same
images on every machine and run. The subsets are taken from the train split only, so they
are disjoint from val by construction.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def _per_class_permutations(labels: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """For each class present, its sample indices in a seeded random order."""
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be a 1-D int64 tensor, got {tuple(labels.shape)} {labels.dtype}")
    generator = torch.Generator().manual_seed(int(seed))
    members = []
    for c in labels.unique(sorted=True).tolist():
        indices = (labels == c).nonzero().flatten()
        members.append(indices[torch.randperm(len(indices), generator=generator)])
    return members


def class_balanced_subset(labels: torch.Tensor, per_class: int | None = None, fraction: float | None = None, seed: int = 0,
                          classes: list[str] | None = None) -> torch.Tensor:
    """Sorted indices of a seeded class-balanced subset: ``per_class`` images of every class, or
    ``fraction`` of each class's images (rounded, at least one). A class with fewer than
    ``per_class`` images is an error naming it (``classes`` gives the names)."""
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class or fraction")
    if per_class is not None and (not isinstance(per_class, int) or per_class < 1):
        raise ValueError(f"per_class must be an int >= 1, got {per_class!r}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    chosen = []
    for members in _per_class_permutations(labels, seed):
        if per_class is not None:
            if len(members) < per_class:
                c = int(labels[members[0]])
                name = classes[c] if classes is not None else str(c)
                raise ValueError(f"class {name!r} has {len(members)} training images, fewer than --per-class {per_class}")
            chosen.append(members[:per_class])
        else:
            chosen.append(members[: max(1, round(fraction * len(members)))])
    return torch.cat(chosen).sort().values


def subset_from_file(ids: list[str], path: str | os.PathLike) -> torch.Tensor:
    """Sorted indices of the images a subset file names: one image file name per line (the
    reference's ``ImageNetSubset`` format, e.g. ``n01440764_10026.JPEG``), matched against the
    file names in ``ids``. Blank lines are ignored; a name that matches no image is an error
    that names it (and counts the others)."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text().splitlines()]
    except OSError as e:
        raise OSError(f"cannot read subset file {path}: {e.strerror or e}") from None
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"subset file {path} names no image")
    index = {}
    for i, image_id in enumerate(ids):
        index.setdefault(os.path.basename(image_id), i)
    missing = [name for name in names if name not in index]
    if missing:
        raise ValueError(f"subset file {path} names {len(missing)} images the train split lacks, e.g. {', '.join(missing[:3])}")
    return torch.tensor(sorted({index[name] for name in names}), dtype=torch.int64)


def holdout_split(labels: torch.Tensor, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit, heldout)``: sorted indices splitting the training images for model selection.
    Each class with at least two images gives ``fraction`` of them (rounded, at least one, never
    all) to held-out; a class with one image stays in fit. Raises when nothing can be held out."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction!r}")
    fit, heldout = [], []
    for members in _per_class_permutations(labels, seed + 1):  # another stream than the low-shot subset's
        k = min(max(1, round(fraction * len(members))), len(members) - 1)
        heldout.append(members[:k])
        fit.append(members[k:])
    heldout = torch.cat(heldout)
    if len(heldout) == 0:
        raise ValueError("every class has a single training image: nothing can be held out to choose among heads")
    return torch.cat(fit).sort().values, heldout.sort().values
