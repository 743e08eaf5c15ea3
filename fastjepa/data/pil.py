"""``data.backend: pil``: PIL decoding and the reference's augmentations in DataLoader workers.

Every random draw of a sample comes from its own seed (``SeededSampler``), so the images do
not depend on the number of workers; uint8 batches move to the device and are normalised
there (``labelled_epoch``: uint8, as they come). A file that fails to decode is left out of its
batch and counted (``Batch.bad``).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from fastjepa.data.base import ImageLoader, LoaderSettings
from fastjepa.data.images import ImageDataset, ImageList, collate_images, list_images, make_transforms
from fastjepa.data.normalize import normalize


class PilLoader(ImageLoader):
    backend = "pil"

    def __init__(self, settings: LoaderSettings, sampler, root: str, device, seed: int, rank: int = 0, world_size: int = 1,
                 gather=None, listing: ImageList | None = None):
        self.dataset = ImageDataset(root, make_transforms(
            settings.crop_size, settings.crop_scale, settings.flip, settings.color_distortion, settings.color_strength, settings.blur),
            listing if listing is not None else list_images(root, rank, world_size, gather))
        super().__init__(settings, sampler, root, self.dataset.images, device, seed, rank, world_size, [])
        self.loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.order, num_workers=self.num_workers,
                                 pin_memory=settings.pin_memory and self.device.type == "cuda", drop_last=True,
                                 collate_fn=collate_images, persistent_workers=self.num_workers > 0)  # workers live across epochs

    def _batches(self, epoch: int, start_itr: int):
        for images, labels, bad in self.loader:
            yield images.to(self.device, non_blocking=True), labels, bad

    def _finish(self, images, epoch: int, itr: int):
        return normalize(images)  # the colour distortion and blur ran in the workers
