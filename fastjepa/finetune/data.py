"""The fine-tuning data: the labelled train, held-out and val splits, and their loaders.

Training batches come from the trainer's own image loaders (``fastjepa.data.loader``: DALI,
torchvision on the GPU, or PIL workers) through ``labelled_epoch``: uint8 crops
(RandomResizedCrop with ``data.crop_scale``, horizontal flips) and labels on the device, which
``fastjepa.finetune.augment`` finishes there. A built-in set held in memory (digits, shapes)
is written once as PNG files under the run folder, so that it goes through the same loaders.

The held-out part of train (``data.holdout`` of each class, never trained on) chooses the best
checkpoint; val only reports. Both are read with the evaluation transform (shorter side to
crop x 256 / 224, centre crop), as the probes read them (``fastjepa.eval.features``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastjepa.data.base import ImageLoader, LoaderSettings
from fastjepa.data.images import ImageList
from fastjepa.data.loader import make_loader
from fastjepa.eval.datasets import Split, load_splits
from fastjepa.eval.runner import train_subset
from fastjepa.eval.subsets import holdout_split


@dataclass
class Splits:
    train: Split  # what the model trains on
    heldout: Split  # chooses the best checkpoint
    val: Split  # reported only
    subset: dict  # how the low-shot subset was chosen (for the results)

    @property
    def classes(self) -> list[str]:
        return self.train.classes


def load_finetune_splits(data: str, image_size: int, holdout: float, per_class=None, fraction=None, subset=None, seed: int = 0) -> Splits:
    """train (its low-shot subset, if asked) less its held-out part, the held-out part, and val.
    Every class must keep a training image; an empty class is an error naming it."""
    train, val = load_splits(data, image_size)
    train, subset_context = train_subset(train, per_class, fraction, subset, seed)
    counts = torch.bincount(train.labels, minlength=len(train.classes))
    empty = [train.classes[c] for c in (counts == 0).nonzero().flatten().tolist()]
    if empty:
        raise ValueError(f"{data}: class {empty[0]!r} has no training image" + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else "")
                         + ": fine-tuning needs every class in train")
    fit, heldout = holdout_split(train.labels, holdout, seed)
    return Splits(train.take(fit), train.take(heldout), val, subset_context)


def listing_of(split: Split, folder: Path) -> ImageList:
    """The files of ``split``: its own listing, or (a set held in memory) its images written
    once as ``folder/<class>/<id>`` PNG files, kept for a resumed run."""
    if split.listing is not None:
        return split.listing
    paths = []
    for image, label, image_id in zip(split.images, split.labels.tolist(), split.ids):
        path = folder / split.classes[label] / image_id
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.stem}.{os.getpid()}.partial.png")  # ranks may write the same file
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(partial)
            os.replace(partial, path)
        paths.append(os.fspath(path))
    n = len(paths)
    return ImageList(paths, split.labels.tolist(), list(split.classes), [], [], np.full(n, -1, dtype=np.int32),
                     np.zeros(n, dtype=np.int64), np.full(n, -1, dtype=np.int64))


def loader_settings(config: dict, crop_size: int) -> LoaderSettings:
    """The loader's settings for fine-tuning: crops and flips only (the rest runs on the device)."""
    data = config["data"]
    return LoaderSettings(backend=data["backend"], batch_size=data["batch_size"], crop_size=crop_size, crop_scale=tuple(data["crop_scale"]),
                          flip=data["flip"], color_distortion=False, color_strength=0.0, blur=False, num_workers=data["num_workers"],
                          repeat=1, pin_memory=True, ragged=False)


def train_loader(config: dict, split: Split, folder: Path, crop_size: int, device, seed: int, rank: int = 0, world_size: int = 1,
                 gather=None) -> ImageLoader:
    """The trainer's loader of ``data.backend`` over ``split``'s files, labelled, without masks."""
    listing = listing_of(split, folder)
    root = os.path.commonpath(listing.paths) if listing.paths else os.fspath(folder)
    return make_loader(loader_settings(config, crop_size), None, device, seed, root, rank, world_size, gather, listing)
