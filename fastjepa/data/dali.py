"""``data.backend: dali``: NVIDIA DALI decodes, crops, resizes, flips and normalises.

One DALI graph per epoch and rank:

    fn.readers.file(this rank's files of the epoch, in order)
      -> fn.decoders.image_slice(crop window)   device "mixed" (nvJPEG, the hardware JPEG
                                                decoder where present) on a GPU, "cpu"
                                                (libjpeg-turbo, device_id=None) without one;
                                                only the crop window is decoded
      -> fn.resize(crop_size x crop_size, linear, antialiased)
      -> fn.crop_mirror_normalize(flip, ImageNet mean/std, float32, CHW)
    DALIGenericIterator -> torch tensors on the device

The order, the sharding and the skip of a resumed epoch's first batches are fastjepa's
(``SeededSampler``), not the reader's: each rank's reader gets exactly its own files, in
whole batches, so no sample is dropped or read twice and every rank runs the same number of
steps. (The reader's own sharding drops samples under the DROP last-batch policy and moves
the shard boundaries from epoch to epoch; its shuffle is a buffer, not a permutation, and
cannot start mid-epoch without reading the skipped files.) The crop windows and flips come
from the host, drawn per batch from a generator seeded by (seed, epoch, rank, batch), with
the image sizes read from the file headers at start: the same augmentation distribution as
the pil backend's RandomResizedCrop (scale ``data.crop_scale``, ratio 3/4 to 4/3), and exact
on resume.

Bad files: DALI stops the whole pipeline on a file it cannot decode, so the files are
checked first (``fastjepa.data.scan``: header and end marker, no decode); the ones that fail
(not images, truncated JPEG and PNG, GIF, which DALI does not decode) are left out and
counted. A complete file damaged inside its compressed data passes that check: DALI decodes
some of those with warnings, and stops on others, naming the file; the loader then leaves
that file out (its batch comes one image short, counted) and restarts the epoch's pipeline
at the batch it stopped on. An error that names no file of the next batches is raised, in
one line. ``fastjepa data verify`` decodes every file and finds them all beforehand.

A pipeline is built per epoch (a few ms on the CPU; on a GPU also nvJPEG's buffers) and
decodes up to two batches past the epoch's end that are thrown away.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from fastjepa.data.images import random_resized_crop_boxes
from fastjepa.data.loader import ImageLoader
from fastjepa.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from fastjepa.data.scan import scan_folder

logger = logging.getLogger(__name__)

FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM"})  # PIL format names DALI decodes
# nvJPEG's buffers, one per DALI thread (host: two), allocated at their full size up front so
# that they do not grow and reallocate as larger images come: room for a 21-megapixel RGB image,
# larger than nearly every ImageNet photo
DEVICE_MEMORY_PADDING = 64 << 20
HOST_MEMORY_PADDING = 64 << 20


class DaliLoader(ImageLoader):
    backend = "dali"

    def __init__(self, config: dict, root: str, device, seed: int, rank: int = 0, world_size: int = 1):
        listing, scan = scan_folder(root, FORMATS)
        super().__init__(config, root, scan.paths, device, seed, rank, world_size, listing.skipped, scan.rejected)
        self.widths, self.heights = scan.widths, scan.heights
        self.failed: set[int] = set()  # files that passed the header check but DALI cannot decode
        self.threads = max(1, self.num_workers)  # DALI's CPU threads (decoding on the CPU, the mixed decoder's host stage)
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None

    def _batches(self, epoch: int, start_itr: int):
        index = self.epoch_indices().reshape(-1, self.batch_size)
        done = 0  # batches yielded
        while done < len(index):
            try:
                for images, bad in self._run(epoch, start_itr + done, index[done:]):
                    yield images, bad
                    done += 1
            except RuntimeError as error:  # a file DALI cannot decode stops its pipeline
                self._exclude(error, index[done : done + 4])  # DALI decodes a few batches ahead

    def _run(self, epoch: int, first_itr: int, index: np.ndarray):
        """One pipeline over the batches index (n, batch_size), the first one being batch
        first_itr of the epoch; a file known to fail is read as a good file of its batch, and
        its row is left out of the output."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        bad = np.isin(index, list(self.failed))
        read = index.copy()
        for b in np.flatnonzero(bad.any(axis=1)):
            good = index[b][~bad[b]]
            read[b][bad[b]] = good[0] if len(good) else next(i for i in range(self.num_images) if i not in self.failed)
        pipe = self._pipeline([self.paths[i] for i in read.ravel()], self._windows(epoch, first_itr, read))
        # the reader holds whole batches only, so DROP drops nothing
        iterator = DALIGenericIterator([pipe], ["images"], reader_name="reader", last_batch_policy=LastBatchPolicy.DROP)
        try:
            for b, outputs in enumerate(iterator):
                images = outputs[0]["images"]
                yield (images[torch.from_numpy(~bad[b]).to(images.device)] if bad[b].any() else images), int(bad[b].sum())
        finally:
            del iterator, pipe  # frees DALI's threads and buffers now, not at the next collection

    def _exclude(self, error: RuntimeError, window: np.ndarray) -> None:
        """Add the file DALI names in ``error`` to the failed ones, if it is one of the
        window's (or the spare file read in place of a batch of failed ones); else raise a
        one-line error."""
        named = re.search(r"Failed to decode sample #\d+ : (.+)", str(error))
        window_files = {self.paths[i]: i for i in window.ravel()}
        spare = next((i for i in range(self.num_images) if i not in self.failed), None)  # _run reads it for a batch of failed files
        candidates = window_files if spare is None else {**window_files, self.paths[spare]: spare}
        path = named.group(1).strip() if named else None
        detail = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        if path not in candidates or candidates[path] in self.failed:
            raise ValueError(f"DALI failed to decode one of {len(window_files)} files ({', '.join(list(window_files)[:3])}, ...): {detail}; "
                             f"`fastjepa data verify {self.root} --move-to DIR` moves unreadable files aside") from error
        self.failed.add(candidates[path])
        if len(self.failed) == self.num_images:
            raise ValueError(f"DALI can decode none of the {self.num_images} images under {self.root!r} (the last: {path}: {detail})")
        logger.warning("skipping %s from now on: DALI cannot decode it (%s)", path, detail)

    def _windows(self, epoch: int, first_itr: int, index: np.ndarray):
        """The external source of the crop windows ((x, y) anchors and (w, h) shapes, int32)
        and flips of the batches index (n, batch_size), the first one being batch first_itr."""
        def source(info):
            rows = index[info.iteration % len(index)]  # DALI runs a batch or two ahead past the end; those are dropped
            g = self.crop_generator(epoch, first_itr + info.iteration % len(index))
            left, top, w, h = random_resized_crop_boxes(self.widths[rows], self.heights[rows], g, self.crop_scale)
            mirror = self.flips(len(rows), g)
            return (np.stack([left, top], axis=1).astype(np.int32), np.stack([w, h], axis=1).astype(np.int32),
                    mirror.astype(np.int32))

        return source

    def _pipeline(self, files: list[str], windows):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device_id is not None
        size = self.crop_size
        decoder = dict(device="mixed", device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING) if gpu else dict(device="cpu")

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id, prefetch_queue_depth=2)
        def graph():
            encoded, _ = fn.readers.file(files=files, name="reader", random_shuffle=False)
            anchor, shape, mirror = fn.external_source(source=windows, num_outputs=3, batch=True, batch_info=True)
            images = fn.decoders.image_slice(encoded, anchor, shape, output_type=types.RGB, adjust_orientation=False,
                                             normalized_anchor=False, normalized_shape=False, **decoder)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop_mirror_normalize(images, mirror=mirror, mean=[255 * m for m in IMAGENET_MEAN],
                                            std=[255 * s for s in IMAGENET_STD], dtype=types.FLOAT, output_layout="CHW")

        pipe = graph()
        pipe.build()
        return pipe
