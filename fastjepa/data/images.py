"""Image folders, the reference trainer's augmentations, and a resumable seeded sampler.

Everything returns uint8 tensors; normalisation happens on the device
(``fastjepa.data.normalize``). Every random draw of a transform comes from a
``torch.Generator`` seeded per sample, so a sample's crop depends only on its seed,
not on worker count, process or call order.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from fastjepa.data.shards import MemberFile, index_shard

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ROOT_CLASS = "."  # class name of the images lying directly in root


def is_image_file(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------
# listing


class ImageRef(NamedTuple):
    """Where an image's bytes are: a whole file, or bytes [offset, offset + size) of a
    webdataset tar shard (``fastjepa.data.shards``)."""

    name: str  # the file's path; for a tar member "<shard path>/<member name>"
    file: str  # the file holding the bytes
    offset: int = 0
    size: int = -1  # -1: the whole file


def open_image(ref: ImageRef | str) -> BinaryIO:
    """A binary file object over the image's bytes (close it after use)."""
    if isinstance(ref, str) or ref.size < 0:
        return open(ref if isinstance(ref, str) else ref.file, "rb")
    return io.BufferedReader(MemberFile(ref.file, ref.offset, ref.size))


def read_image_bytes(ref: ImageRef | str) -> bytes:
    with open_image(ref) as f:
        return f.read()


@dataclass
class ImageList:
    """The images of a folder: ``paths`` names them (see ``ImageRef.name``), ``ref(i)``
    says where image i's bytes are."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # files without an image extension
    shards: list[str] = field(default_factory=list)  # the tar shards holding some of the images
    # per image: its shard's index in ``shards`` (-1 for a loose file), and its bytes' offset and size there
    shard: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.paths)

    def ref(self, i: int) -> ImageRef:
        shard = int(self.shard[i])
        if shard < 0:
            return ImageRef(self.paths[i], self.paths[i])
        return ImageRef(self.paths[i], self.shards[shard], int(self.offsets[i]), int(self.sizes[i]))

    def take(self, indices) -> "ImageList":
        """The images at ``indices``, in that order (same classes, skipped files and shards)."""
        indices = np.asarray(indices, dtype=np.int64)
        return ImageList([self.paths[i] for i in indices], [self.labels[i] for i in indices], self.classes, self.skipped,
                         self.shards, self.shard[indices], self.offsets[indices], self.sizes[indices])


def require_folder(root) -> str:
    """root as a str; ``FileNotFoundError`` or ``NotADirectoryError`` when it is not a folder."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        if os.path.exists(root.rstrip(os.sep) or root):  # "file/" does not exist, "file" does
            raise NotADirectoryError(f"image folder {root!r} is not a directory")
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    return root


def _walk_files(top: str) -> list[str]:
    """All files under top (symlinks followed), as paths relative to top, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, top)
        found.extend(name if rel == "." else os.path.join(rel, name) for name in filenames)
    return sorted(found)


def map_over_ranks(fn, items: list, rank: int = 0, world_size: int = 1, gather=None) -> list:
    """``[fn(item) for item in items]``, the work shared by the ranks when ``gather`` (an
    all-gather of Python objects over the ranks, in rank order) is given: rank r computes
    items r, r + world_size, ... and the ranks exchange the results. An exception on any
    rank is raised on every rank, after the exchange (a rank that raised before it would
    leave the others waiting in the collective)."""
    if gather is None:
        return [fn(item) for item in items]
    mine = []
    for item in items[rank::world_size]:
        try:
            mine.append((True, fn(item)))
        except Exception as error:
            mine.append((False, error))
            break
    results = [None] * len(items)
    for r, part in enumerate(gather(mine)):
        for k, (ok, value) in enumerate(part):
            if not ok:
                raise value
            results[r + k * world_size] = value
    return results


def is_shard(path: str) -> bool:
    return path.lower().endswith(".tar")


def list_images(root: str, rank: int = 0, world_size: int = 1, gather=None) -> ImageList:
    """List the images under root, ImageFolder style.

    The rule: each top-level subdirectory of root that holds at least one image
    (at any depth) is a class, named after the subdirectory; classes are sorted by
    name. Images lying directly in root form one more class named "." that comes
    first (label 0). So a flat folder of images is the single class "." and a
    folder of class subfolders labels exactly like torchvision's ImageFolder.
    A ``.tar`` file is a webdataset shard: its image members are images of the class
    of the folder holding it (``fastjepa.data.shards``), in the shard's order.
    Files without an image extension are not loaded; they are listed in ``skipped``.

    With ``gather`` the ranks share the indexing of the shards (``map_over_ranks``).
    """
    root = require_folder(root)
    files = _walk_files(root)
    shard_files = [rel for rel in files if is_shard(rel)]
    indexes = dict(zip(shard_files, map_over_ranks(lambda rel: index_shard(os.path.join(root, rel), is_image_file), shard_files,
                                                   rank, world_size, gather)))
    per_class: dict[str, list[tuple[str, int, int, int]]] = {}  # class -> (name, shard, offset, size)
    skipped: list[str] = []
    shards: list[str] = []
    for rel in files:
        path = os.path.join(root, rel)
        parts = rel.split(os.sep)
        name = ROOT_CLASS if len(parts) == 1 else parts[0]
        if is_shard(rel):
            members = indexes[rel]
            if members:
                per_class.setdefault(name, []).extend((f"{path}/{member}", len(shards), offset, size) for member, offset, size in members)
                shards.append(path)
        elif is_image_file(rel):
            per_class.setdefault(name, []).append((path, -1, 0, -1))
        else:
            skipped.append(path)

    if not per_class:
        raise ValueError(
            f"empty dataset: no images under {root!r} (looked for extensions {', '.join(IMAGE_EXTENSIONS)}, any case, "
            f"as files and in .tar shards)"
        )
    classes = sorted(per_class, key=lambda name: (name != ROOT_CLASS, name))
    entries = [entry for name in classes for entry in per_class[name]]
    labels = [label for label, name in enumerate(classes) for _ in per_class[name]]
    return ImageList([e[0] for e in entries], labels, classes, skipped, shards, np.array([e[1] for e in entries], dtype=np.int32),
                     np.array([e[2] for e in entries], dtype=np.int64), np.array([e[3] for e in entries], dtype=np.int64))


def default_photos_dir() -> str:
    """Folder of the photographs shipped inside the package (attributions in fastjepa/data/PHOTOS.md)."""
    path = resources.files("fastjepa.data").joinpath("photos")
    if not path.is_dir():
        raise FileNotFoundError(f"the embedded photos are missing: {str(path)!r} is not a directory")
    return str(path)


# ---------------------------------------------------------------------------------------
# transforms


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g, dtype=torch.float64).item()


def _coin(g: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=g, dtype=torch.float64).item() < p


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in [low, high], both included."""
    return int(torch.randint(low, high + 1, (), generator=g).item())


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def random_resized_crop_box(width: int, height: int, g: torch.Generator, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, w, h) of a random crop covering a ``scale`` fraction of the area with
    aspect ratio (w / h) in ``ratio``; after 10 misses, a central crop with the image's
    aspect ratio clamped into ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(g, scale[0], scale[1])
        aspect = math.exp(_uniform(g, log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(g, 0, width - w), _randint(g, 0, height - h), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop_boxes(widths, heights, g: torch.Generator, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
    """``random_resized_crop_box`` for a whole batch in array operations: the same
    distribution (10 tries, then the clamped central crop), other draws. ``widths`` and
    ``heights`` are integer arrays of the images' sizes; returns (left, top, w, h), four
    int64 arrays."""
    widths, heights = np.asarray(widths, dtype=np.int64), np.asarray(heights, dtype=np.int64)
    n, tries = len(widths), 10
    u = torch.rand((3, n, tries), generator=g, dtype=torch.float64).numpy()
    target_area = (widths * heights)[:, None] * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_low + (log_high - log_low) * u[1])
    w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= widths[:, None]) & (h > 0) & (h <= heights[:, None])
    first, rows = fits.argmax(axis=1), np.arange(n)
    w, h, found = w[rows, first], h[rows, first], fits.any(axis=1)
    # the fallback: a central crop with the image's aspect ratio clamped into ratio
    image_aspect = widths / heights
    fallback_w = np.where(image_aspect > ratio[1], np.round(heights * ratio[1]), widths).astype(np.int64)
    fallback_h = np.where(image_aspect < ratio[0], np.round(widths / ratio[0]), heights).astype(np.int64)
    w, h = np.where(found, w, fallback_w), np.where(found, h, fallback_h)
    # offsets uniform over [0, size - crop] (u[2]'s first two tries), central for the fallback
    left = np.minimum((u[2, :, 0] * (widths - w + 1)).astype(np.int64), widths - w)
    top = np.minimum((u[2, :, 1] * (heights - h + 1)).astype(np.int64), heights - h)
    left, top = np.where(found, left, (widths - w) // 2), np.where(found, top, (heights - h) // 2)
    return left, top, w, h


def _adjust_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` turns (shift in [-0.5, 0.5] covers the circle)."""
    hue, sat, val = img.convert("HSV").split()
    rotated = (np.array(hue, dtype=np.int16) + int(round(shift * 255))) % 256
    hue = Image.fromarray(rotated.astype(np.uint8), "L")
    return Image.merge("HSV", (hue, sat, val)).convert("RGB")


def _color_distortion(img: Image.Image, g: torch.Generator, strength: float) -> Image.Image:
    """The reference's colour distortion: with p=0.8 jitter brightness, contrast,
    saturation (factors in [max(0, 1-0.8s), 1+0.8s]) and hue (shift in [-0.2s, 0.2s])
    in a random order; then grayscale with p=0.2."""
    if _coin(g, 0.8) and strength > 0:  # at strength 0 every jitter is the identity
        amount = 0.8 * strength
        low, high = max(0.0, 1.0 - amount), 1.0 + amount
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0:
                img = ImageEnhance.Brightness(img).enhance(_uniform(g, low, high))
            elif op == 1:
                img = ImageEnhance.Contrast(img).enhance(_uniform(g, low, high))
            elif op == 2:
                img = ImageEnhance.Color(img).enhance(_uniform(g, low, high))
            else:
                img = _adjust_hue(img, _uniform(g, -0.2 * strength, 0.2 * strength))
    if _coin(g, 0.2):
        img = img.convert("L").convert("RGB")
    return img


def make_transforms(
    crop_size: int,
    crop_scale=(0.3, 1.0),
    use_horizontal_flip: bool = False,
    use_color_distortion: bool = False,
    color_jitter_strength: float = 0.0,
    use_gaussian_blur: bool = False,
):
    """The reference trainer's training augmentation, as
    ``transform(img, g) -> (3, crop_size, crop_size) uint8``: random resized crop
    (ratio 3/4 to 4/3, bilinear), then optional flip (p=0.5), colour distortion and
    Gaussian blur (p=0.5, radius in [0.1, 2]). All draws come from the generator g."""
    if int(crop_size) != crop_size or crop_size < 1:
        raise ValueError(f"crop_size must be a positive integer, got {crop_size!r}")
    low, high = crop_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
    if color_jitter_strength < 0:
        raise ValueError(f"color_jitter_strength must be >= 0, got {color_jitter_strength}")
    crop_size = int(crop_size)
    scale = (float(low), float(high))

    def transform(img: Image.Image, g: torch.Generator) -> torch.Tensor:
        img = img.convert("RGB")
        left, top, w, h = random_resized_crop_box(img.width, img.height, g, scale)
        img = img.crop((left, top, left + w, top + h)).resize((crop_size, crop_size), Image.Resampling.BILINEAR)
        if use_horizontal_flip and _coin(g, 0.5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if use_color_distortion:
            img = _color_distortion(img, g, color_jitter_strength)
        if use_gaussian_blur and _coin(g, 0.5):
            img = img.filter(ImageFilter.GaussianBlur(radius=_uniform(g, 0.1, 2.0)))
        return to_uint8_chw(img)

    return transform


def make_eval_transform(size: int):
    """``transform(img, g=None) -> (3, size, size) uint8``: resize the shorter side to
    round(size * 256 / 224) (bilinear), then take the central size x size crop. The
    generator argument is accepted and ignored, so ImageDataset can call any transform
    the same way."""
    if int(size) != size or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    size = int(size)
    short_side = round(size * 256 / 224)

    def transform(img: Image.Image, g: torch.Generator | None = None) -> torch.Tensor:
        img = img.convert("RGB")
        w, h = img.size
        if w <= h:
            new_w, new_h = short_side, max(short_side, int(short_side * h / w))
        else:
            new_w, new_h = max(short_side, int(short_side * w / h)), short_side
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
        return to_uint8_chw(img.crop((left, top, left + size, top + size)))

    return transform


# ---------------------------------------------------------------------------------------
# dataset


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit gray: keep the top 8 bits
        gray = np.clip(np.array(img, dtype=np.int64) // 257, 0, 255).astype(np.uint8)
        img = Image.fromarray(gray, "L")
    elif img.mode in ("LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # converting straight to RGB would warn about the transparency
    return img.convert("RGB")  # alpha is dropped


def load_rgb(image: ImageRef | str) -> Image.Image:
    """Decode an image (a path or an ``ImageRef``) fully into an RGB image (raises on an unreadable one)."""
    with open_image(image) as f, Image.open(f) as img:
        img.load()
        return _to_rgb(img)


class ImageDataset(torch.utils.data.Dataset):
    """The images under root (see ``list_images``; or ``listing``, a listing of root),
    decoded to RGB and transformed.

    ``transform`` is always called as ``transform(img, g)`` where ``g`` is a fresh
    ``torch.Generator().manual_seed(seed)``; deterministic transforms (such as
    ``make_eval_transform``) ignore ``g``. Without a transform the whole image comes
    back as a (3, H, W) uint8 tensor.

    ``dataset[i]`` uses seed i; ``dataset[(i, seed)]`` (what ``SeededSampler``
    yields) uses the given seed. An item is ``(image, label)``, or None when the
    file cannot be decoded; that file is logged once as a warning and never raises.
    """

    def __init__(self, root: str, transform=None, listing: ImageList | None = None):
        listing = list_images(root) if listing is None else listing
        self.root = os.fspath(root)
        self.transform = transform
        self.images = listing
        self.paths = listing.paths
        self.labels = listing.labels
        self.classes = listing.classes
        self.skipped_files = listing.skipped
        self.bad_files: set[str] = set()  # warned about (in this process)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, item)
        index = int(index)
        if not 0 <= index < len(self.paths):
            raise IndexError(f"index {index} out of range for a dataset of {len(self.paths)} images")
        path = self.paths[index]
        try:
            img = load_rgb(self.images.ref(index))
        except Exception as error:  # any decoding failure: skip the sample, never crash the run
            if path not in self.bad_files:
                self.bad_files.add(path)
                logger.warning("skipping unreadable image %s: %s: %s", path, type(error).__name__, error)
            return None
        if self.transform is None:
            image = to_uint8_chw(img)
        else:
            image = self.transform(img, torch.Generator().manual_seed(int(seed)))
        return image, self.labels[index]


def collate_images(batch):
    """[(image, label) or None, ...] -> (images (B, 3, H, W) uint8, labels (B,) int64,
    number of None entries dropped). With no valid entry, images is (0, 3, 0, 0)."""
    good = [sample for sample in batch if sample is not None]
    bad = len(batch) - len(good)
    if not good:
        return torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty((0,), dtype=torch.int64), bad
    shapes = {tuple(image.shape) for image, _ in good}
    if len(shapes) > 1:
        raise ValueError(f"images in a batch must share one shape, got {sorted(shapes)}")
    images = torch.stack([image for image, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.int64)
    return images, labels, bad


# ---------------------------------------------------------------------------------------
# sampler

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value and their order."""
    h = 0
    for value in values:
        h = _splitmix64(h ^ (int(value) & _MASK64))
    return h >> 1


class SeededSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample_seed)`` pairs for ``ImageDataset``, sharded by rank.

    An epoch has num_samples positions over indices in range(dataset_size) (default
    num_samples). The order is a run of passes, each a permutation of
    range(dataset_size) drawn from one generator seeded with mix_seed(seed, e) (range
    order with shuffle=False), cut at num_samples; so with num_samples = k *
    dataset_size every image comes exactly k times. The item at position p gets
    sample_seed = mix_seed(seed, e, p). The same seed and epoch give the same indices
    and the same augmentations on any machine.

    Sharding: rank r of world_size gets positions r, r + world_size, r + 2 * world_size,
    ... and every rank the same count, num_samples // world_size (the last
    num_samples % world_size positions are left out), so the ranks see disjoint
    positions and run the same number of steps. rank 0 of 1 gets every position.

    Resuming: ``skip(n)`` drops the first n positions of this rank's current epoch
    (positions and seeds of the rest are unchanged). A skip belongs to its epoch:
    ``set_epoch`` with another epoch clears it, with the same epoch keeps it.
    """

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True, dataset_size: int | None = None,
                 rank: int = 0, world_size: int = 1):
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if dataset_size is None:
            dataset_size = num_samples
        if int(dataset_size) != dataset_size or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer, got {dataset_size!r}")
        if int(world_size) != world_size or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size >= 1, got rank {rank!r} of {world_size!r}")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples per epoch cannot give each of {world_size} ranks one")
        self.num_samples = int(num_samples)
        self.dataset_size = int(dataset_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.rank, self.world_size = int(rank), int(world_size)
        self.per_rank = self.num_samples // self.world_size
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.start = 0
        self.epoch = int(epoch)

    def skip(self, n: int) -> None:
        if int(n) != n or not 0 <= n <= self.per_rank:
            raise ValueError(f"can skip 0 to {self.per_rank} samples, got {n!r}")
        self.start = int(n)

    def order(self) -> list[int]:
        """The full index order of the current epoch, every rank's positions (skipped ones included)."""
        passes = -(-self.num_samples // self.dataset_size)
        if not self.shuffle:
            return (list(range(self.dataset_size)) * passes)[: self.num_samples]
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        return torch.cat([torch.randperm(self.dataset_size, generator=g) for _ in range(passes)])[: self.num_samples].tolist()

    def positions(self) -> range:
        """This rank's remaining positions in the epoch's order."""
        return range(self.rank + self.start * self.world_size, self.per_rank * self.world_size, self.world_size)

    def __iter__(self):
        order = self.order()
        for position in self.positions():
            yield order[position], mix_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.per_rank - self.start
