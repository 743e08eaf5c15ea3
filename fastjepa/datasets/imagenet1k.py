"""ImageNet-1k for the reference trainer (twin of the reference's ``src/datasets/imagenet1k.py``).

    dataset, loader, sampler = make_imagenet1k(transform, batch_size=64, collator=mask_collator,
                                               root_path="/data", image_folder="imagenet_full_size/061417/")

The images are ``<root_path>/<image_folder>/train/<class>/...`` (``val/`` with training=False).
``ImageNet`` subclasses ``torchvision.datasets.ImageFolder`` when torchvision imports (decided at
import, ``USES_TORCHVISION``), else ``fastjepa.datasets.folder.ImageFolder``, which lists the same
samples in the same order. With ``copy_data`` under SLURM, local rank 0 of each node first
extracts ``<root_path>/<tar_file>`` to ``SCRATCH_DIR/<job id>/`` (``copy_imgnt_locally``).
"""

from __future__ import annotations

import logging
import os
import tarfile
import time
import zlib

import numpy as np
import torch

from fastjepa.datasets.folder import load_image

logger = logging.getLogger(__name__)

try:
    from torchvision.datasets import ImageFolder as BaseImageFolder
except Exception as error:  # absent, or a build that does not match this torch
    from fastjepa.datasets.folder import ImageFolder as BaseImageFolder

    TORCHVISION_PROBLEM: str | None = f"{type(error).__name__}: {error}".splitlines()[0]
else:
    TORCHVISION_PROBLEM = None

USES_TORCHVISION: bool = TORCHVISION_PROBLEM is None
SCRATCH_DIR = "/scratch/slurm_tmpdir"  # node-local copies go to SCRATCH_DIR/<job id>/
COPY_POLL_SECONDS = 60  # how often the other local ranks look for the copy's signal file
COPY_SIGNAL_FILE = "copy_signal.txt"


def make_imagenet1k(transform, batch_size, collator=None, pin_mem=True, num_workers=8, world_size=1, rank=0, root_path=None, image_folder=None,
                    training=True, copy_data=False, drop_last=True, subset_file=None):
    """(dataset, data_loader, dist_sampler): ``ImageNet`` (restricted to ``subset_file`` when
    given), a ``DistributedSampler`` over it for ``rank`` of ``world_size`` (torch's defaults:
    shuffled, seed 0) and a ``DataLoader`` batching it through ``collator``."""
    dataset = ImageNet(root=root_path, image_folder=image_folder, transform=transform, train=training, copy_data=copy_data, index_targets=False)
    if subset_file is not None:
        dataset = ImageNetSubset(dataset, subset_file)
    logger.info("ImageNet dataset created")
    dist_sampler = torch.utils.data.distributed.DistributedSampler(dataset=dataset, num_replicas=world_size, rank=rank)
    data_loader = torch.utils.data.DataLoader(dataset, collate_fn=collator, sampler=dist_sampler, batch_size=batch_size, drop_last=drop_last,
                                              pin_memory=pin_mem, num_workers=num_workers, persistent_workers=False)
    logger.info("ImageNet unsupervised data loader created")
    return dataset, data_loader, dist_sampler


class ImageNet(BaseImageFolder):
    """The images of ``root/image_folder/train/`` (``val/`` when not ``train``) as an ImageFolder.

    ``copy_data``: first extract ``root/tar_file`` to node-local scratch (``copy_imgnt_locally``;
    without SLURM it reads ``root`` directly). ``index_targets``: ``targets`` and ``samples``
    become numpy arrays and ``target_indices[c]`` lists the indices of class c's images.
    Reading an image that is missing or corrupt raises an ``OSError`` naming the file."""

    def __init__(self, root, image_folder="imagenet_full_size/061417/", tar_file="imagenet_full_size-061417.tar.gz", transform=None, train=True,
                 job_id=None, local_rank=None, copy_data=True, index_targets=False):
        if root is None:
            raise ValueError("ImageNet needs a root folder (data.root_path in the config), got None")
        if image_folder is None:
            raise ValueError("ImageNet needs an image folder inside root (data.image_folder in the config), got None")
        suffix = "train/" if train else "val/"
        data_path = None
        if copy_data:
            logger.info("copying data locally")
            data_path = copy_imgnt_locally(root=root, suffix=suffix, image_folder=image_folder, tar_file=tar_file, job_id=job_id, local_rank=local_rank)
        if not copy_data or data_path is None:
            data_path = os.path.join(root, image_folder, suffix)
            origin = f"root {os.fspath(root)!r} / image_folder {os.fspath(image_folder)!r} / {suffix!r}"
        else:
            origin = f"extracted from {os.path.join(root, tar_file)!r}"
        logger.info(f"data-path {data_path}")
        if not os.path.isdir(data_path):
            raise FileNotFoundError(f"ImageNet images not found: expected the folder {data_path!r} ({origin}) holding one sub-folder per class")
        super().__init__(root=data_path, transform=transform)
        logger.info("Initialized ImageNet")
        if index_targets:
            self.targets = np.array([target for _, target in self.samples])
            self.samples = np.array(self.samples)
            self.target_indices = [np.flatnonzero(self.targets == t).tolist() for t in range(len(self.classes))]
            for t, indices in enumerate(self.target_indices):
                logger.debug(f"num-labeled target {t} {len(indices)}")
            logger.info(f"min. labeled indices {min(map(len, self.target_indices), default=0)}")

    def __getitem__(self, index):
        path, target = self.samples[index]
        sample = load_image(self.loader, path)
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


class ImageNetSubset:
    """The images of ``dataset`` named in ``subset_file``, in the file's order.

    ``subset_file`` is a text file of image file names ``<class>_<id>.JPEG``, one a line; an
    image's class is the part of its name before the first '_' and its path
    ``dataset.root/<class>/<name>``. Blank lines are skipped; a class that is not one of the
    dataset's is a ``ValueError`` naming the line."""

    def __init__(self, dataset, subset_file):
        self.dataset = dataset
        self.subset_file = subset_file
        self.filter_dataset_(subset_file)

    def filter_dataset_(self, subset_file):
        """Set ``samples`` to the (path, target) pairs of the images listed in ``subset_file``."""
        root, class_to_idx = self.dataset.root, self.dataset.class_to_idx
        logger.info(f"Using {subset_file}")
        samples = []
        with open(subset_file) as lines:
            for number, line in enumerate(lines, start=1):
                name = line.rstrip("\r\n")
                if not name.strip():
                    continue
                class_name = name.split("_")[0]
                if class_name not in class_to_idx:
                    raise ValueError(f"{os.fspath(subset_file)}, line {number}: {name!r} names class {class_name!r}, which is not a class of "
                                     f"the dataset in {os.fspath(root)!r} ({len(class_to_idx)} classes)")
                samples.append((os.path.join(root, class_name, name), class_to_idx[class_name]))
        self.samples = samples

    @property
    def classes(self):
        return self.dataset.classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = load_image(self.dataset.loader, path)
        if self.dataset.transform is not None:
            img = self.dataset.transform(img)
        if self.dataset.target_transform is not None:
            target = self.dataset.target_transform(target)
        return img, target


def extract_tar(tar_path: str, destination: str) -> None:
    """Extract the (possibly compressed) tar archive into destination; an error naming the
    archive when it is missing or corrupt."""
    if not os.path.isfile(tar_path):
        raise FileNotFoundError(f"ImageNet archive {tar_path!r} not found (copy_data extracts it to node-local scratch)")
    try:
        with tarfile.open(tar_path) as archive:
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+, 3.12+
                archive.extractall(destination, filter="data")
            else:
                archive.extractall(destination)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise RuntimeError(f"cannot extract ImageNet archive {tar_path!r} to {destination!r}: {type(error).__name__}: {error}") from error


def copy_imgnt_locally(root, suffix, image_folder="imagenet_full_size/061417/", tar_file="imagenet_full_size-061417.tar.gz", job_id=None,
                       local_rank=None):
    """Extract ``root/tar_file`` to ``SCRATCH_DIR/<job_id>/`` once per node and return the path
    of the images there, ``SCRATCH_DIR/<job_id>/<image_folder>/<suffix>``.

    job_id and local_rank default to SLURM_JOBID and SLURM_LOCALID; without them it returns None
    (read from ``root`` directly). When the images are not there yet, local rank 0 extracts the
    archive and then writes ``copy_signal.txt``; the other local ranks wait for that file,
    looking every ``COPY_POLL_SECONDS``."""
    if job_id is None:
        job_id = os.environ.get("SLURM_JOBID")
        if job_id is None:
            logger.info("No job-id, will load directly from network file")
            return None
    if local_rank is None:
        try:
            local_rank = int(os.environ["SLURM_LOCALID"])
        except (KeyError, ValueError):
            logger.info("No local rank (SLURM_LOCALID), will load directly from network file")
            return None

    source_file = os.path.join(root, tar_file)
    target = f"{SCRATCH_DIR}/{job_id}/"
    data_path = os.path.join(target, image_folder, suffix)
    signal_file = os.path.join(target, COPY_SIGNAL_FILE)
    logger.info(f"{source_file}\n{target}\n{os.path.join(target, tar_file)}\n{data_path}")

    if not os.path.exists(data_path):
        if local_rank == 0:
            os.makedirs(target, exist_ok=True)
            start = time.time()
            logger.info(f"extracting {source_file} to {target}")
            extract_tar(source_file, target)
            logger.info(f"extraction took {(time.time() - start) / 60.0} min.")
            with open(signal_file, "w") as f:
                print("Done copying locally.", file=f)
        else:
            while not os.path.exists(signal_file):
                time.sleep(COPY_POLL_SECONDS)
                logger.info(f"{local_rank}: Checking {signal_file}")
    return data_path
