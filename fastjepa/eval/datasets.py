"""The labelled data a probe reads: a train and a val ``Split`` of one data set.

* ``digits``: scikit-learn's 1,797 8x8 digits, upsampled (the default; offline);
* ``shapes-count`` / ``shapes-dist``: generated scenes of 1-8 shapes labelled by their count and
  by the binned size of the nearest (largest) shape, stand-ins for Clevr/Count and Clevr/Dist
  (``fastjepa.eval.shapes``);
* a folder ``DIR`` with ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (ImageNet, Clevr, ...),
  listed as fastjepa's trainer lists images; val's classes must all be train's.

In-memory sets hold uint8 images; folders are decoded when features are extracted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fastjepa.data.images import ImageList, list_images
from fastjepa.eval.shapes import shapes_split

GENERATED = ("digits", "shapes-count", "shapes-dist")


@dataclass
class Split:
    """One split: ``labels`` index ``classes``; ``ids`` name the images (file paths for folders,
    ``<class>_<index>.png`` for generated sets); the pixels are ``images`` (uint8 (N, 3, H, W))
    or the files of ``listing``."""

    name: str
    labels: torch.Tensor
    classes: list[str]
    ids: list[str]
    images: torch.Tensor | None = None
    listing: ImageList | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: torch.Tensor) -> "Split":
        """The images at ``indices`` (same classes)."""
        chosen = indices.tolist()
        return replace(self, labels=self.labels[indices], ids=[self.ids[i] for i in chosen],
                       images=None if self.images is None else self.images[indices],
                       listing=None if self.listing is None else self.listing.take(chosen))


def load_digits(image_size: int = 32, test_fraction: float = 0.3, seed: int = 0):
    """scikit-learn's 1,797 8x8 digits as ``(train_images, train_labels, test_images, test_labels)``.

    Images are uint8 (N, 3, S, S): the 0..16 grey levels scaled to 0..255, bilinearly upsampled
    to ``image_size`` and replicated to three channels. Labels are int64. The split is
    stratified (each digit contributes ``round(test_fraction * count)`` test images) and depends
    only on ``seed``.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise ImportError("the digits need scikit-learn: pip install 'fastjepa[eval]'") from e
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = sklearn_load_digits()
    grey = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)  # (N, 1, 8, 8)
    if image_size != grey.shape[-1]:
        grey = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = grey.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        is_test[members[: round(test_fraction * len(members))]] = True
    return images[~is_test], labels[~is_test], images[is_test], labels[is_test]


def _in_memory(name: str, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> Split:
    ids = [f"{classes[c]}_{i:05d}.png" for i, c in enumerate(labels.tolist())]
    return Split(name, labels, classes, ids, images=images)


def _folder_split(data: str, split: str) -> Split:
    root = os.path.join(data, split)
    listing = list_images(root)
    if listing.classes == ["."]:
        raise ValueError(f"{root} holds images but no class folders: the probes need {split}/<class>/<images>")
    return Split(root, torch.tensor(listing.labels, dtype=torch.int64), listing.classes, list(listing.paths), listing=listing)


def load_splits(data: str, image_size: int) -> tuple[Split, Split]:
    """``(train, val)`` of ``data``: one of GENERATED, or a folder with train/ and val/ class
    folders (val labelled by train's class names; a val class train lacks is an error)."""
    if data == "digits":
        train_x, train_y, val_x, val_y = load_digits(image_size=image_size)
        classes = [str(d) for d in range(10)]
        return _in_memory("digits/train", train_x, train_y, classes), _in_memory("digits/val", val_x, val_y, classes)
    if data in ("shapes-count", "shapes-dist"):
        task = data.split("-")[1]
        splits = []
        for split in ("train", "val"):
            images, labels, classes = shapes_split(task, split, image_size=image_size)
            splits.append(_in_memory(f"{data}/{split}", images, labels, list(classes)))
        return splits[0], splits[1]
    if not os.path.isdir(data):
        raise FileNotFoundError(f"--data {data}: neither {', '.join(GENERATED)} nor a folder")
    missing = [split for split in ("train", "val") if not os.path.isdir(os.path.join(data, split))]
    if missing:
        lacking = " and ".join(f"{split}/" for split in missing)
        raise FileNotFoundError(f"data folder {os.fspath(data)} lacks {lacking} (expected train/<class>/* and val/<class>/*)")
    train, val = _folder_split(data, "train"), _folder_split(data, "val")
    unknown = [name for name in val.classes if name not in train.classes]
    if unknown:
        raise ValueError(f"{val.name} has classes the train split lacks: {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else ""))
    relabel = torch.tensor([train.classes.index(name) for name in val.classes], dtype=torch.int64)
    return train, replace(val, labels=relabel[val.labels], classes=train.classes)
