"""What every image pipeline shares (``fastjepa.data.loader`` picks one): the settings, the
batches, the mask stream and the base class ``ImageLoader`` of the backends.

The trainer builds the settings and the mask sampler from its config
(``fastjepa.config.loader_settings``, ``mask_sampler``) and hands them in: this layer reads
no config.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

from fastjepa.data.color import color_and_blur
from fastjepa.data.images import ImageList, SeededSampler, load_rgb, mix_seed
from fastjepa.data.normalize import normalize
from fastjepa.errors import ConfigError
from fastjepa.masks.multiblock import MultiBlockMaskSampler


@dataclass(frozen=True)
class LoaderSettings:
    """The ``data`` keys a loader reads (see ``fastjepa.config``), and ``mask.ragged``."""

    backend: str  # auto | pil | dali | torchvision
    batch_size: int
    crop_size: int
    crop_scale: tuple[float, float]
    flip: bool
    color_distortion: bool
    color_strength: float
    blur: bool
    num_workers: int
    repeat: int  # passes over the images per epoch
    pin_memory: bool
    ragged: bool  # mask.ragged: packed context masks


COLOR_STREAM = 1  # mixed into the seed of a batch's colour and blur draws, apart from its crops


class Batch(NamedTuple):
    images: torch.Tensor  # (n, 3, crop, crop) float32, normalised, on the device; n = 0 when no file of the batch decoded
    masks_enc: list | None  # None when n = 0
    masks_pred: list | None
    bad: int  # files of this batch that could not be decoded and were left out


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
    the epoch as (uint8 crops on the device, their labels, bad count), reading only this
    rank's files from ``self.order`` (already set to the epoch, its first start_itr batches
    skipped). ``epoch`` finishes the crops for pretraining and adds the masks;
    ``labelled_epoch`` hands the uint8 crops and labels to a caller that augments them
    itself (fine-tuning; ``sampler`` may then be None)."""

    backend = ""

    def __init__(self, settings: LoaderSettings, sampler: MultiBlockMaskSampler | None, root: str, images: ImageList, device, seed: int,
                 rank: int, world_size: int, rejected: list[tuple[str, str]]):
        self.root, self.images, self.paths = root, images, images.paths  # paths: the images' names
        self.skipped_files = images.skipped  # files without an image extension, never read
        self.rejected = rejected  # (name, reason): images left out before training (header check)
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.batch_size, self.crop_size, self.crop_scale = settings.batch_size, settings.crop_size, settings.crop_scale
        self.flip = settings.flip
        self.color_distortion, self.color_strength, self.blur = settings.color_distortion, settings.color_strength, settings.blur
        self.num_workers = settings.num_workers
        self.sampler, self.ragged = sampler, settings.ragged
        self.num_images = len(images)
        self.labels = torch.as_tensor(images.labels, dtype=torch.int64)  # each image's class, for labelled_epoch
        self.order = SeededSampler(len(images) * settings.repeat, seed, dataset_size=len(images), rank=rank, world_size=world_size)
        self.steps_per_epoch = self.order.per_rank // self.batch_size
        if self.steps_per_epoch == 0:
            ranks = f" on each of {world_size} ranks" if world_size > 1 else ""
            raise ConfigError(f"data.batch_size {self.batch_size} is larger than the {self.order.per_rank} images of an epoch{ranks} in {root}")

    def epoch(self, epoch: int, start_itr: int, first_step: int) -> Iterator[Batch]:
        """Batches start_itr .. steps_per_epoch - 1 of ``epoch``; the first is training step
        ``first_step`` (it seeds the masks). The skipped batches are not read."""
        if self.sampler is None:
            raise ValueError("this loader was made without a mask sampler: it serves labelled_epoch only")
        masks = None
        try:
            for itr, (images, _, bad) in enumerate(self.labelled_epoch(epoch, start_itr), start=start_itr):
                if masks is None:  # started once the first batch is in: DataLoader workers fork before this thread exists
                    masks = MaskStream(self.sampler, self.seed, self.rank, first_step, self.batch_size, self.device, self.ragged)
                if len(images) == 0:
                    yield Batch(torch.empty((0, 3, self.crop_size, self.crop_size), device=self.device), None, None, bad)
                else:
                    yield Batch(self._finish(images, epoch, itr), *masks.take(len(images)), bad)
        finally:
            if masks is not None:
                masks.close()

    def labelled_epoch(self, epoch: int, start_itr: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Batches start_itr .. steps_per_epoch - 1 of ``epoch`` as (uint8 crops (n, 3, crop,
        crop) on the device, cropped and flipped only, their int64 labels on the device, files
        left out); n = 0 when no file of the batch decoded. The skipped batches are not read."""
        if not 0 <= start_itr <= self.steps_per_epoch:
            raise ValueError(f"start_itr must be in [0, {self.steps_per_epoch}], got {start_itr}")
        self.order.set_epoch(epoch)
        self.order.skip(start_itr * self.batch_size)
        decoded = False
        started = False
        for images, labels, bad in self._batches(epoch, start_itr):
            started = True
            decoded = decoded or len(images) > 0
            yield images, labels.to(self.device, non_blocking=True), bad
        if started and not decoded:
            self._fail_unless_an_image_decodes()

    def _finish(self, images: torch.Tensor, epoch: int, itr: int) -> torch.Tensor:
        """Pretraining's batch itr from its uint8 crops: ``finish_on_device``."""
        return self.finish_on_device(images, epoch, itr)

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
        """(uint8 crops on the device, their int64 labels, bad-file count) for each remaining batch of the epoch."""
