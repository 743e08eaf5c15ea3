"""Image data: folders of images, augmentations, seeded sampling, device-side normalisation.
The training pipelines (pil, dali, torchvision) are in ``fastjepa.data.loader``."""

from .images import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    ImageList,
    SeededSampler,
    collate_images,
    default_photos_dir,
    is_image_file,
    list_images,
    load_rgb,
    make_eval_transform,
    make_transforms,
    mix_seed,
)
from .normalize import IMAGENET_MEAN, IMAGENET_STD, normalize

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "ImageList",
    "SeededSampler",
    "collate_images",
    "default_photos_dir",
    "is_image_file",
    "list_images",
    "load_rgb",
    "make_eval_transform",
    "make_transforms",
    "mix_seed",
    "normalize",
]
