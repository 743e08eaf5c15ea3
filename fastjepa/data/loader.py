"""The factory of the image pipelines: ``make_loader`` picks the backend of ``data.backend`` (the
base class and what the backends share are in ``fastjepa.data.base``).

    loader = make_loader(settings, sampler, device, seed, root, rank=0, world_size=1)   # or fastjepa.config.build_loader(config, ...)
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

import torch

from fastjepa.data.base import ImageLoader, LoaderSettings
from fastjepa.data.images import ImageList
from fastjepa.errors import ConfigError
from fastjepa.masks.multiblock import MultiBlockMaskSampler
from fastjepa.ops.backend import import_problem


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


def make_loader(settings: LoaderSettings, sampler: MultiBlockMaskSampler | None, device, seed: int, root: str, rank: int = 0,
                world_size: int = 1, gather=None, listing: ImageList | None = None) -> ImageLoader:
    """The loader of ``settings.backend`` (its masks drawn by ``sampler``) over the images under root (see
    ``list_images``), or the images of ``listing`` (a listing of part of root: a low-shot
    subset), for this rank. ``gather``: an all-gather of Python objects over the
    ranks, with which the ranks share the indexing of tar shards and the header check of
    the dali and torchvision backends (``fastjepa.data.scan``); without it every rank reads
    every shard index and checks every file. Without a ``sampler`` the loader serves
    ``labelled_epoch`` only (fine-tuning)."""
    device = torch.device(device)
    backend = resolve_backend(settings.backend, device)
    if backend == "pil":
        from fastjepa.data.pil import PilLoader

        return PilLoader(settings, sampler, root, device, seed, rank, world_size, gather, listing)
    if backend == "dali":
        from fastjepa.data.dali import DaliLoader

        return DaliLoader(settings, sampler, root, device, seed, rank, world_size, gather, listing)
    from fastjepa.data.torchvision_gpu import TorchvisionLoader

    return TorchvisionLoader(settings, sampler, root, device, seed, rank, world_size, gather, listing)
