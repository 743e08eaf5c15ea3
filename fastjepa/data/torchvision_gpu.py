"""``data.backend: torchvision``: batched ``torchvision.io.decode_jpeg`` on the GPU.

DataLoader workers read the files' bytes (this rank's files of the epoch, in
``SeededSampler`` order, whole batches); the main process decodes every colour JPEG of a
batch in one ``decode_jpeg(..., device=...)`` call (nvJPEG on a GPU), then crops, resizes
(bilinear, antialiased) and flips each image on the device and normalises the batch there.
Crop windows and flips are drawn per batch as in the dali backend (seeded by seed, epoch,
rank and batch; image sizes from the file headers). Files that are not colour JPEGs
(grayscale and CMYK JPEGs, PNG and the other formats) are decoded with PIL in the workers
and join the batch on the device.

Bad files: the header check (``fastjepa.data.scan``) leaves out files that are not images
or are truncated; a file that still fails to decode is left out of its batch and counted.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from fastjepa.data.base import ImageLoader, LoaderSettings
from fastjepa.data.images import ImageList, load_rgb, random_resized_crop_boxes, read_image_bytes, to_uint8_chw
from fastjepa.data.scan import scan_folder

logger = logging.getLogger(__name__)


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes (uint8 tensors) -> (3, H, W) uint8 RGB images on ``device``, one call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


class _Files(Dataset):
    """Item i: (i, bytes) for a colour JPEG (decoded on the device later), (i, image) for
    any other file (decoded here with PIL, (3, H, W) uint8), (i, None) when PIL fails."""

    def __init__(self, images: ImageList, on_device: list[bool]):
        self.images, self.on_device = images, on_device

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        ref = self.images.ref(i)
        if self.on_device[i]:
            return i, torch.frombuffer(bytearray(read_image_bytes(ref)), dtype=torch.uint8)
        try:
            return i, to_uint8_chw(load_rgb(ref))
        except Exception as error:  # counted as bad by the main process
            logger.warning("skipping unreadable image %s: %s: %s", ref.name, type(error).__name__, error)
            return i, None


class _EpochBatches:
    """The DataLoader's batch sampler: this rank's remaining batches of the current epoch."""

    def __init__(self, loader: "TorchvisionLoader"):
        self.loader = loader

    def __iter__(self):
        yield from self.loader.epoch_indices().reshape(-1, self.loader.batch_size).tolist()


class TorchvisionLoader(ImageLoader):
    backend = "torchvision"

    def __init__(self, settings: LoaderSettings, sampler, root: str, device, seed: int, rank: int = 0, world_size: int = 1,
                 gather=None, listing: ImageList | None = None):
        scan = scan_folder(root, None, rank, world_size, gather, listing)  # PIL decodes what the GPU does not: any format
        super().__init__(settings, sampler, root, scan.images, device, seed, rank, world_size, scan.rejected)
        self.widths, self.heights = scan.widths, scan.heights
        self.on_device = [h.format in ("JPEG", "MPO") and h.mode == "RGB" for h in scan.headers]
        self.reader = DataLoader(_Files(self.images, self.on_device), batch_sampler=_EpochBatches(self), num_workers=self.num_workers,
                                 collate_fn=list, persistent_workers=self.num_workers > 0)

    def _batches(self, epoch: int, start_itr: int):
        for b, batch in enumerate(self.reader):
            index = np.array([i for i, _ in batch], dtype=np.int64)
            g = self.crop_generator(epoch, start_itr + b)
            left, top, w, h = random_resized_crop_boxes(self.widths[index], self.heights[index], g, self.crop_scale)
            mirror = self.flips(len(batch), g)
            crops, kept = [], []
            for k, image in enumerate(self._decode(batch)):
                if image is None:
                    continue
                crop = image[None, :, top[k] : top[k] + h[k], left[k] : left[k] + w[k]].float()
                crop = F.interpolate(crop, size=(self.crop_size, self.crop_size), mode="bilinear", antialias=True, align_corners=False)
                crops.append(crop.flip(-1) if mirror[k] else crop)
                kept.append(index[k])
            bad = len(batch) - len(crops)
            if not crops:
                yield torch.empty((0, 3, self.crop_size, self.crop_size), dtype=torch.uint8, device=self.device), self.labels[:0], bad
                continue
            images = torch.cat(crops).round_().clamp_(0, 255).to(torch.uint8)  # uint8, as the other backends' crops
            yield images, self.labels[kept], bad

    def _decode(self, batch) -> list[torch.Tensor | None]:
        """The batch's images on the device (None for a file that failed)."""
        images = [None if self.on_device[i] or data is None else data.to(self.device, non_blocking=True) for i, data in batch]
        jpegs = [k for k, (i, _) in enumerate(batch) if self.on_device[i]]
        if not jpegs:
            return images
        try:
            decoded = decode_jpegs([batch[k][1] for k in jpegs], self.device)
        except RuntimeError:  # one bad file fails the whole call: decode them one by one
            decoded = [self._decode_one(*batch[k]) for k in jpegs]
        for k, image in zip(jpegs, decoded):
            images[k] = image
        return images

    def _decode_one(self, i: int, data: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpegs([data], self.device)[0]
        except RuntimeError as error:
            logger.warning("skipping unreadable image %s: %s", self.paths[i], error)
            return None
