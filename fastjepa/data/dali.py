"""``data.backend: dali``: NVIDIA DALI decodes, crops, resizes and flips.

One DALI graph per rank, kept across epochs:

    fn.external_source(the bytes of this rank's images of the epoch, in order; crop
                       windows; flips)
      -> fn.decoders.image_slice(crop window)   device "mixed" (nvJPEG, the hardware JPEG
                                                decoder where present) on a GPU, "cpu"
                                                (libjpeg-turbo, device_id=None) without one;
                                                only the crop window is decoded
      -> fn.resize(crop_size x crop_size, linear, antialiased)
      -> fn.crop_mirror_normalize(flip, uint8, CHW)
    DALIGenericIterator -> uint8 torch tensors on the device -> optional colour distortion
    and blur (``fastjepa.data.color``) -> normalised there, as every backend's batches

The order, the sharding and the skip of a resumed epoch's first batches are fastjepa's
(``SeededSampler``), not a DALI reader's: the external source hands the pipeline exactly
this rank's images, in whole batches, so no sample is dropped or read twice and every rank
runs the same number of steps. (DALI's file reader drops samples when it shards under the
DROP last-batch policy and moves the shard boundaries from epoch to epoch; its shuffle is a
buffer, not a permutation, and cannot start mid-epoch without reading the skipped files.)
The bytes come from image files or from the members of webdataset tar shards alike
(``fastjepa.data.shards``), read by a pool of ``data.num_workers`` threads. The crop
windows and flips are drawn per batch from a generator seeded by (seed, epoch, rank,
batch), with the image sizes read from the file headers at start: the same augmentation
distribution as the pil backend's RandomResizedCrop (scale ``data.crop_scale``, ratio 3/4
to 4/3), and exact on resume. The external source ends each epoch with StopIteration; the
next epoch resets the same pipeline (no rebuild, nvJPEG's buffers are kept).

Bad files: DALI stops the whole pipeline on a file it cannot decode, so the files are
checked first (``fastjepa.data.scan``: header and end marker, no decode); the ones that fail
(not images, truncated JPEG and PNG, GIF, which DALI does not decode) are left out and
counted. A complete file damaged inside its compressed data passes that check: DALI decodes
some of those with warnings, and stops on others, naming the sample's place in the batch
it was fetching; the loader then leaves that file out (its batch comes one image short,
counted) and builds a new pipeline that starts at that batch. An error that names no
sample is raised, in one line. ``fastjepa data verify`` decodes every file and finds them
all beforehand.
"""

from __future__ import annotations

import logging
import re
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from fastjepa.data.base import ImageLoader, LoaderSettings
from fastjepa.data.images import ImageList, random_resized_crop_boxes, read_image_bytes
from fastjepa.data.scan import scan_folder

logger = logging.getLogger(__name__)

FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM"})  # PIL format names DALI decodes
# nvJPEG's buffers, one per DALI thread (host: two), allocated at their full size up front so
# that they do not grow and reallocate as larger images come: room for a 21-megapixel RGB image,
# larger than nearly every ImageNet photo
DEVICE_MEMORY_PADDING = 64 << 20
HOST_MEMORY_PADDING = 64 << 20


class Plan(NamedTuple):
    """The batches a pipeline reads: batch first_itr of ``epoch`` and the ones after it."""

    epoch: int
    first_itr: int
    read: np.ndarray  # (n, batch_size) the images read (a known bad one replaced by a good one of its batch)
    bad: np.ndarray  # (n, batch_size) bool: rows left out of the output


class DaliLoader(ImageLoader):
    backend = "dali"

    def __init__(self, settings: LoaderSettings, sampler, root: str, device, seed: int, rank: int = 0, world_size: int = 1,
                 gather=None, listing: ImageList | None = None):
        scan = scan_folder(root, FORMATS, rank, world_size, gather, listing)
        super().__init__(settings, sampler, root, scan.images, device, seed, rank, world_size, scan.rejected)
        self.widths, self.heights = scan.widths, scan.heights
        self.failed: set[int] = set()  # images that passed the header check but DALI cannot decode
        self.threads = max(1, self.num_workers)  # DALI's CPU threads, and the file-reading threads
        self.reads = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="fastjepa-dali-read")  # reads release Python's lock
        if self.device.type == "cuda":
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None
        self.plan: Plan | None = None  # what the pipeline reads now
        self.iterator = None  # the DALIGenericIterator over the pipeline, kept across epochs
        self.finished = False  # the iterator ran to the end of its plan: reset() starts the next one

    def _batches(self, epoch: int, start_itr: int):
        index = self.epoch_indices().reshape(-1, self.batch_size)
        done = 0  # batches yielded
        while done < len(index):
            self.plan = self._plan(epoch, start_itr + done, index[done:])
            first = done
            try:
                for batch in self._run():
                    yield batch
                    done += 1
            except RuntimeError as error:  # a file DALI cannot decode stops its pipeline
                self.iterator = None
                self._exclude(error, index[done], self.plan.read[done - first])

    def _plan(self, epoch: int, first_itr: int, index: np.ndarray) -> Plan:
        """The plan of the batches index (n, batch_size), the first one being batch
        first_itr of the epoch: a file known to fail is read as a good file of its batch,
        and its row is left out of the output."""
        bad = np.isin(index, list(self.failed))
        read = index.copy()
        for b in np.flatnonzero(bad.any(axis=1)):
            good = index[b][~bad[b]]
            read[b][bad[b]] = good[0] if len(good) else next(i for i in range(self.num_images) if i not in self.failed)
        return Plan(epoch, first_itr, read, bad)

    def _run(self):
        """The batches of ``self.plan``: uint8 crops on the device, their labels, and the
        number of rows left out."""
        plan = self.plan
        if self.iterator is not None and self.finished:
            self.iterator.reset()  # the source starts the new plan
        else:  # the first epoch, after a failure, or after an epoch left before its end
            self.iterator = self._iterator()
        self.finished = False
        for b, outputs in enumerate(self.iterator):
            images = outputs[0]["images"]
            kept = plan.read[b][~plan.bad[b]]
            if plan.bad[b].any():
                images = images[torch.from_numpy(~plan.bad[b]).to(images.device)]
            yield images, self.labels[torch.from_numpy(kept)], int(plan.bad[b].sum())
        self.finished = True

    def _exclude(self, error: RuntimeError, batch: np.ndarray, read: np.ndarray) -> None:
        """Add the image DALI names in ``error`` (by its place in the batch the iterator was
        fetching: ``batch``, of which ``read`` is what the pipeline read) to the failed
        ones; else raise a one-line error."""
        named = re.search(r"Failed to decode sample #(\d+)", str(error))
        detail = (str(error).strip().splitlines() or [type(error).__name__])[-1]
        place = int(named.group(1)) if named else -1
        if not 0 <= place < len(read) or read[place] in self.failed:
            names = ", ".join(self.paths[i] for i in batch[:3])
            raise ValueError(f"DALI failed to decode one of {len(batch)} files ({names}, ...): {detail}; "
                             f"`fastjepa data verify {self.root} --move-to DIR` moves unreadable files aside") from error
        image = int(read[place])
        self.failed.add(image)
        if len(self.failed) == self.num_images:
            raise ValueError(f"DALI can decode none of the {self.num_images} images under {self.root!r} (the last: {self.paths[image]})")
        logger.warning("skipping %s from now on: DALI cannot decode it", self.paths[image])

    def _source(self, info):
        """The external source: batch info.iteration of the plan (encoded bytes, (x, y)
        anchors and (w, h) shapes of the crop windows, int32, and flips); StopIteration
        at the plan's end."""
        plan = self.plan
        if info.iteration >= len(plan.read):
            raise StopIteration
        rows = plan.read[info.iteration]
        g = self.crop_generator(plan.epoch, plan.first_itr + info.iteration)
        left, top, w, h = random_resized_crop_boxes(self.widths[rows], self.heights[rows], g, self.crop_scale)
        mirror = self.flips(len(rows), g)
        encoded = list(self.reads.map(self._read, rows))
        return (encoded, np.stack([left, top], axis=1).astype(np.int32), np.stack([w, h], axis=1).astype(np.int32),
                mirror.astype(np.int32))

    def weak_source(self):
        """``_source`` for a pipeline, without a reference to the loader: a cycle through the
        pipeline would leave it and its threads to the cyclic collector, which may run in a
        process forked later and hang there."""
        loader = weakref.ref(self)
        return lambda info: loader()._source(info)

    def _read(self, i: int) -> np.ndarray:
        return np.frombuffer(read_image_bytes(self.images.ref(int(i))), dtype=np.uint8)

    def _iterator(self):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        gpu = self.device_id is not None
        size = self.crop_size
        decoder = dict(device="mixed", device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING) if gpu else dict(device="cpu")

        source = self.weak_source()

        @pipeline_def(batch_size=self.batch_size, num_threads=self.threads, device_id=self.device_id, prefetch_queue_depth=2)
        def graph():
            encoded, anchor, shape, mirror = fn.external_source(source=source, num_outputs=4, batch=True, batch_info=True)
            images = fn.decoders.image_slice(encoded, anchor, shape, output_type=types.RGB, adjust_orientation=False,
                                             normalized_anchor=False, normalized_shape=False, **decoder)
            images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.UINT8, output_layout="CHW")

        pipe = graph()
        pipe.build()
        return DALIGenericIterator([pipe], ["images"])  # runs until the source's StopIteration
