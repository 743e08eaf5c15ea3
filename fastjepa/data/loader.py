"""One interface over the image pipelines, chosen by ``data.backend``.

    loader = make_loader(config, device, seed, root, rank=0, world_size=1)
    loader.steps_per_epoch                      # the same on every rank
    for images, masks_enc, masks_pred, bad in loader.epoch(epoch, start_itr, first_step):
        ...                                     # images already normalised on the device

Backends (each in its own module):

* ``pil`` (``fastjepa/data/pil.py``): PIL decoding and the reference's augmentations in
  DataLoader workers, every draw seeded per sample; the default on a machine without GPU.
* ``dali`` (``fastjepa/data/dali.py``): NVIDIA DALI, decoding (nvJPEG on a GPU, libjpeg-turbo
  on the CPU), crop, resize and flip in one DALI graph kept across epochs.
* ``torchvision`` (``fastjepa/data/torchvision_gpu.py``): file reads in DataLoader workers,
  batched ``torchvision.io.decode_jpeg`` on the GPU, crop, resize and flip on the GPU.

``auto`` takes dali on a GPU when DALI imports, else torchvision on a GPU when it imports,
else pil. The dali and torchvision backends hand uint8 crops to ``finish_on_device``: the
colour distortion and blur of the config (``fastjepa.data.color``, the whole batch at once)
and the normalisation, on the device.

What every backend shares: the images (files and webdataset tar shards, ``list_images``),
the image order (``SeededSampler``: a seeded permutation per
epoch, sharded by rank with equal counts, so every rank runs ``steps_per_epoch`` steps), the
skip of the first ``start_itr`` batches of an epoch without reading them (exact mid-epoch
resume), the masks: step s of rank r draws them from a generator seeded with
``mix_seed(seed, r, s)``, one step ahead (``MaskStream``), and the end of an epoch of which no
file decoded: ``ValueError`` unless some image of the folder decodes (a folder of unreadable
files stops the run instead of training nothing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, NamedTuple

import numpy as np
import torch

from fastjepa.config import ConfigError, mask_sampler
from fastjepa.data.color import color_and_blur
from fastjepa.data.images import ImageList, SeededSampler, load_rgb, mix_seed
from fastjepa.data.normalize import normalize
from fastjepa.masks.multiblock import MultiBlockMaskSampler
from fastjepa.ops.backend import import_problem

COLOR_STREAM = 1  # mixed into the seed of a batch's colour and blur draws, apart from its crops


class Batch(NamedTuple):
    images: torch.Tensor  # (n, 3, crop, crop) float32, normalised, on the device; n = 0 when no file of the batch decoded
    masks_enc: list | None  # None when n = 0
    masks_pred: list | None
    bad: int  # files of this batch that could not be decoded and were left out


def backend_problem(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    if name == "dali":
        problem = import_problem("nvidia.dali.plugin.pytorch")
        return f"NVIDIA DALI is not importable ({problem}); pip install 'fastjepa[dali]'" if problem else None
    if name == "torchvision":
        problem = import_problem("torchvision.io")
        return f"torchvision is not importable ({problem}); install the torchvision build of your torch" if problem else None
    return None


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend ``data.backend: requested`` runs on ``device``; ``ConfigError`` when it cannot."""
    if requested == "auto":
        if device.type == "cuda":
            for name in ("dali", "torchvision"):
                if backend_problem(name, device) is None:
                    return name
        return "pil"
    problem = backend_problem(requested, device)
    if problem:
        raise ConfigError(f"data.backend {requested}: {problem}")
    return requested


class MaskStream:
    """The masks of consecutive training steps, drawn one step ahead.

    ``take(n)`` returns step s's masks for a batch of n images and starts drawing step
    s + 1's for a full batch in a background thread, so the draw and the copy to the
    device overlap the training step. Step s of rank r draws from a generator seeded with
    ``mix_seed(seed, r, s)``: the values do not depend on the prefetch, and ranks differ.
    A batch of another size (a file of it failed) draws its masks on the spot, from the
    same seed."""

    def __init__(self, sampler: MultiBlockMaskSampler, seed: int, rank: int, first_step: int, batch_size: int, device: torch.device,
                 ragged: bool):
        self.sampler, self.seed, self.rank, self.step = sampler, int(seed), int(rank), int(first_step)
        self.batch_size, self.device, self.ragged = batch_size, device, ragged
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastjepa-masks")
        self.ahead = self.pool.submit(self._draw, self.step, batch_size)

    def _draw(self, step: int, n: int):
        generator = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, step))
        return self.sampler.sample(n, generator=generator, device=self.device, ragged=self.ragged)

    def take(self, n: int):
        """(masks_enc, masks_pred) of the next step, for a batch of n images."""
        if n == self.batch_size:
            masks = self.ahead.result()
        else:
            self.ahead.cancel()  # drawn for a full batch
            masks = self._draw(self.step, n)
        self.step += 1
        self.ahead = self.pool.submit(self._draw, self.step, self.batch_size)
        return masks

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class ImageLoader(ABC):
    """What every backend shares: the seeded, sharded order, the epoch length, the mask
    stream. A backend implements ``_batches(epoch, start_itr)``: the remaining batches of
    the epoch as (images on the device, bad count), reading only this rank's files from
    ``self.order`` (already set to the epoch, its first start_itr batches skipped)."""

    backend = ""

    def __init__(self, config: dict, root: str, images: ImageList, device, seed: int, rank: int, world_size: int,
                 rejected: list[tuple[str, str]]):
        data, mask = config["data"], config["mask"]
        self.root, self.images, self.paths = root, images, images.paths  # paths: the images' names
        self.skipped_files = images.skipped  # files without an image extension, never read
        self.rejected = rejected  # (name, reason): images left out before training (header check)
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.batch_size, self.crop_size = data["batch_size"], data["crop_size"]
        self.crop_scale = tuple(data["crop_scale"])
        self.flip = data["use_horizontal_flip"]
        self.color_distortion, self.color_strength = data["use_color_distortion"], data["color_jitter_strength"]
        self.blur = data["use_gaussian_blur"]
        self.num_workers = data["num_workers"]
        self.sampler, self.ragged = mask_sampler(config), mask["ragged"]
        self.num_images = len(images)
        self.order = SeededSampler(len(images) * data["repeat"], seed, dataset_size=len(images), rank=rank, world_size=world_size)
        self.steps_per_epoch = self.order.per_rank // self.batch_size
        if self.steps_per_epoch == 0:
            ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
            raise ConfigError(f"data.batch_size {self.batch_size} is larger than the {self.order.per_rank} images of an epoch{ranks} in {root}")

    def epoch(self, epoch: int, start_itr: int, first_step: int) -> Iterator[Batch]:
        """Batches start_itr .. steps_per_epoch - 1 of ``epoch``; the first is training step
        ``first_step`` (it seeds the masks). The skipped batches are not read."""
        if not 0 <= start_itr <= self.steps_per_epoch:
            raise ValueError(f"start_itr must be in [0, {self.steps_per_epoch}], got {start_itr}")
        self.order.set_epoch(epoch)
        self.order.skip(start_itr * self.batch_size)
        masks = None
        decoded = False
        try:
            for images, bad in self._batches(epoch, start_itr):
                if masks is None:  # started once the first batch is in: DataLoader workers fork before this thread exists
                    masks = MaskStream(self.sampler, self.seed, self.rank, first_step, self.batch_size, self.device, self.ragged)
                if len(images) == 0:
                    yield Batch(torch.empty((0, 3, self.crop_size, self.crop_size), device=self.device), None, None, bad)
                else:
                    decoded = True
                    yield Batch(images, *masks.take(len(images)), bad)
            if masks is not None and not decoded:
                self._fail_unless_an_image_decodes()
        finally:
            if masks is not None:
                masks.close()

    def _fail_unless_an_image_decodes(self) -> None:
        """After an epoch of which no file decoded: return at the first image of the folder
        that decodes with PIL (that epoch was bad luck), else raise ValueError naming a bad
        file (a folder of unreadable files stops the run instead of training nothing)."""
        first_problem = None
        for i in range(self.num_images):
            try:
                load_rgb(self.images.ref(i))
                return
            except Exception as error:  # any decoding failure, as ImageDataset
                first_problem = first_problem or f"{self.paths[i]}: {type(error).__name__}: {error}".splitlines()[0]
        raise ValueError(f"none of the {len(self.paths)} image files under {self.root!r} decodes (e.g. {first_problem}); "
                         f"`fastjepa data verify {self.root}` lists them")

    def epoch_indices(self) -> np.ndarray:
        """The image indices of this rank's remaining samples of the epoch, in whole batches
        (int64; the backends that draw a whole batch's crops at once need no per-sample seeds)."""
        positions = self.order.positions()[: self.steps_per_epoch * self.batch_size - self.order.start]
        return np.asarray(self.order.order(), dtype=np.int64)[np.asarray(positions, dtype=np.int64)]

    def crop_generator(self, epoch: int, itr: int) -> torch.Generator:
        """The generator of batch itr's crops and flips (backends that draw a whole batch at once)."""
        return torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, itr))

    def finish_on_device(self, images: torch.Tensor, epoch: int, itr: int) -> torch.Tensor:
        """Batch itr's uint8 crops on the device -> the config's colour distortion and blur
        (drawn from a generator seeded by seed, epoch, rank and batch) -> normalised. For the
        backends that crop on the device; pil does all of it per sample in its workers."""
        if self.color_distortion or self.blur:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, itr, COLOR_STREAM))
            images = color_and_blur(images, g, self.color_distortion, self.color_strength, self.blur)
        return normalize(images)

    def flips(self, n: int, generator: torch.Generator) -> np.ndarray:
        """Which of n images to mirror: each with p = 0.5 when flipping is on."""
        draws = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
        return (draws < 0.5) if self.flip else np.zeros(n, dtype=bool)

    @abstractmethod
    def _batches(self, epoch: int, start_itr: int):
        """(images normalised on the device, bad-file count) for each remaining batch of the epoch."""


def make_loader(config: dict, device, seed: int, root: str, rank: int = 0, world_size: int = 1, gather=None) -> ImageLoader:
    """The loader of ``config``'s ``data.backend`` over the images under root (see
    ``list_images``) for this rank. ``gather``: an all-gather of Python objects over the
    ranks, with which the ranks share the indexing of tar shards and the header check of
    the dali and torchvision backends (``fastjepa.data.scan``); without it every rank reads
    every shard index and checks every file."""
    device = torch.device(device)
    backend = resolve_backend(config["data"]["backend"], device)
    if backend == "pil":
        from fastjepa.data.pil import PilLoader

        return PilLoader(config, root, device, seed, rank, world_size, gather)
    if backend == "dali":
        from fastjepa.data.dali import DaliLoader

        return DaliLoader(config, root, device, seed, rank, world_size, gather)
    from fastjepa.data.torchvision_gpu import TorchvisionLoader

    return TorchvisionLoader(config, root, device, seed, rank, world_size, gather)
