"""``data.backend: pil``: PIL decoding and the reference's augmentations in DataLoader workers.

Every random draw of a sample comes from its own seed (``SeededSampler``), so the images do
not depend on the number of workers; uint8 batches move to the device and are normalised
there. A file that fails to decode is left out of its batch and counted (``Batch.bad``); an
epoch of which no file decodes raises ``ValueError`` unless some image of the folder does (a
folder of unreadable files stops the run instead of training nothing).
"""

from __future__ import annotations

from torch.utils.data import DataLoader

from fastjepa.data.images import ImageDataset, collate_images, load_rgb, make_transforms
from fastjepa.data.loader import ImageLoader
from fastjepa.data.normalize import normalize


class PilLoader(ImageLoader):
    backend = "pil"

    def __init__(self, config: dict, root: str, device, seed: int, rank: int = 0, world_size: int = 1):
        data = config["data"]
        self.dataset = ImageDataset(root, make_transforms(
            data["crop_size"], tuple(data["crop_scale"]), data["use_horizontal_flip"], data["use_color_distortion"],
            data["color_jitter_strength"], data["use_gaussian_blur"]))
        super().__init__(config, root, self.dataset.paths, device, seed, rank, world_size, self.dataset.skipped_files, [])
        self.loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.order, num_workers=self.num_workers,
                                 pin_memory=data["pin_mem"] and self.device.type == "cuda", drop_last=True,
                                 collate_fn=collate_images, persistent_workers=self.num_workers > 0)  # workers live across epochs

    def _batches(self, epoch: int, start_itr: int):
        read = decoded = False
        for images, _, bad in self.loader:
            read, decoded = True, decoded or len(images) > 0
            yield (normalize(images.to(self.device, non_blocking=True)) if len(images) else images), bad
        if read and not decoded:
            self._fail_unless_an_image_decodes()

    def _fail_unless_an_image_decodes(self) -> None:
        """After an epoch of which no file decoded: return at the first image of the folder
        that decodes (that epoch was bad luck), else raise ValueError naming a bad file."""
        first_problem = None
        for path in self.dataset.paths:
            try:
                load_rgb(path)
                return
            except Exception as error:  # any decoding failure, as ImageDataset
                first_problem = first_problem or f"{path}: {type(error).__name__}: {error}".splitlines()[0]
        raise ValueError(f"none of the {len(self.dataset.paths)} image files under {self.root!r} decodes (e.g. {first_problem}); "
                         f"`fastjepa data verify {self.root}` lists them")
