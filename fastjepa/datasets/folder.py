"""An ImageFolder for machines without torchvision, with torchvision's documented semantics.

    root/<class>/**/<image>         classes: the sub-folders of root, sorted by name

``ImageFolder(root)`` lists the same classes, ``class_to_idx`` and ``samples`` (same paths, same
order) as ``torchvision.datasets.ImageFolder(root)``: for each class in order, every file under
its folder (symlinks followed), walked folders sorted by path and file names sorted within each,
kept when its lower-cased name ends with one of ``IMG_EXTENSIONS``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from PIL import Image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def has_file_allowed_extension(filename: str, extensions) -> bool:
    """Whether the lower-cased file name ends with one of ``extensions`` (lower-case)."""
    return filename.lower().endswith(extensions if isinstance(extensions, str) else tuple(extensions))


def find_classes(directory) -> tuple[list[str], dict[str, int]]:
    """The sorted names of the sub-folders of ``directory`` (links to folders count) and their indices."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"image folder {os.fspath(directory)!r} does not exist or is not a directory")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {os.fspath(directory)}.")
    return classes, {name: index for index, name in enumerate(classes)}


def make_dataset(directory, class_to_idx: dict[str, int], extensions=IMG_EXTENSIONS, is_valid_file: Callable[[str], bool] | None = None,
                 allow_empty: bool = False) -> list[tuple[str, int]]:
    """(path, class index) of every valid file, class by class in name order. A class folder
    without a valid file is a ``FileNotFoundError`` unless ``allow_empty``."""
    directory = os.path.expanduser(directory)
    if not class_to_idx:
        raise ValueError("'class_to_index' must have at least one entry to collect any samples.")
    if (extensions is None) == (is_valid_file is None):
        raise ValueError("Both extensions and is_valid_file cannot be None or not None at the same time")
    if is_valid_file is None:
        def is_valid_file(path: str) -> bool:
            return has_file_allowed_extension(path, extensions)

    samples, found = [], set()
    for name in sorted(class_to_idx):
        class_dir = os.path.join(directory, name)
        if not os.path.isdir(class_dir):
            continue
        for folder, _, file_names in sorted(os.walk(class_dir, followlinks=True)):  # whole walk sorted by folder path
            for file_name in sorted(file_names):
                path = os.path.join(folder, file_name)
                if is_valid_file(path):
                    samples.append((path, class_to_idx[name]))
                    found.add(name)
    empty = set(class_to_idx) - found
    if empty and not allow_empty:
        message = f"Found no valid file for the classes {', '.join(sorted(empty))} in {os.fspath(directory)}. "
        if extensions is not None:
            message += f"Supported extensions are: {extensions if isinstance(extensions, str) else ', '.join(extensions)}"
        raise FileNotFoundError(message)
    return samples


def pil_loader(path) -> Image.Image:
    """The image at path, converted to RGB."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def load_image(loader: Callable[[str], Any], path) -> Any:
    """``loader(path)``; an ``OSError`` naming the file when it is missing, unreadable or corrupt."""
    try:
        return loader(path)
    except Exception as error:
        raise OSError(f"cannot read image {os.fspath(path)!r}: {type(error).__name__}: {error}") from error


class ImageFolder(torch.utils.data.Dataset):
    """``torchvision.datasets.ImageFolder`` without torchvision: the same signature, attributes
    (root, transform, target_transform, loader, extensions, classes, class_to_idx, samples, imgs,
    targets), listing and errors. An item is (transform(image), target_transform(target)); a file
    that cannot be read raises an ``OSError`` naming it."""

    def __init__(self, root, transform: Callable | None = None, target_transform: Callable | None = None,
                 loader: Callable[[str], Any] = pil_loader, is_valid_file: Callable[[str], bool] | None = None, allow_empty: bool = False):
        self.root = os.path.expanduser(root) if isinstance(root, str) else root
        self.transform = transform
        self.target_transform = target_transform
        self.classes, self.class_to_idx = self.find_classes(self.root)
        self.extensions = IMG_EXTENSIONS if is_valid_file is None else None
        self.samples = self.make_dataset(self.root, self.class_to_idx, self.extensions, is_valid_file, allow_empty)
        self.loader = loader
        self.targets = [target for _, target in self.samples]
        self.imgs = self.samples

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False) -> list[tuple[str, int]]:
        return make_dataset(directory, class_to_idx, extensions=extensions, is_valid_file=is_valid_file, allow_empty=allow_empty)

    def find_classes(self, directory) -> tuple[list[str], dict[str, int]]:
        return find_classes(directory)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        sample = load_image(self.loader, path)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, {len(self)} images, {len(self.classes)} classes, transform={self.transform!r})"
