"""The reference trainer's image augmentation (twin of the reference's ``src/transforms.py``).

    transform = make_transforms(crop_size=224, crop_scale=(0.3, 1.0), horizontal_flip=True)
    x = transform(pil_image)        # (3, 224, 224) float32, normalised

Which implementation serves ``make_transforms`` is decided once, at import, and recorded in
``USES_TORCHVISION``:

* torchvision importable: a ``torchvision.transforms.Compose`` built like the reference's, so
  it draws from the global torch RNG exactly as the reference does and returns the same tensors.
* otherwise: ``NativeTransform``, built on ``fastjepa.data.images.make_transforms`` with its draws
  taken from the global torch generator. Same distribution, other draws.

``GaussianBlur`` needs only PIL and torch.
"""

from __future__ import annotations

import logging

import torch
from PIL import Image, ImageFilter

from fastjepa.data import images

logger = logging.getLogger(__name__)

try:
    import torchvision.transforms as tv_transforms
except Exception as error:  # absent, or a build that does not match this torch: fail at import in many ways
    tv_transforms = None
    TORCHVISION_PROBLEM: str | None = f"{type(error).__name__}: {error}".splitlines()[0]
else:
    TORCHVISION_PROBLEM = None

USES_TORCHVISION: bool = tv_transforms is not None
IMAGENET_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class GaussianBlur:
    """With probability p, blur a PIL image with a radius uniform in [radius_min, radius_max];
    otherwise return the image itself. Both draws come from the global torch RNG, in the
    reference's order (``torch.bernoulli`` of p, then ``torch.rand(1)`` only when it blurs)."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.0):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.bernoulli(torch.tensor(self.prob)) == 0:
            return img
        radius = self.radius_min + torch.rand(1) * (self.radius_max - self.radius_min)
        # a Python float holding the tensor's float32 value: recent Pillow (13 checked) rejects a tensor radius
        return img.filter(ImageFilter.GaussianBlur(radius=float(radius)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.prob}, radius_min={self.radius_min}, radius_max={self.radius_max})"


class NativeTransform:
    """PIL image -> normalised (3, crop_size, crop_size) float32 tensor, without torchvision.

    The augmentation of ``fastjepa.data.images.make_transforms`` (random resized crop, optional
    flip, colour distortion and blur: the reference's distribution) with every draw taken from
    the global torch generator (``torch.default_generator``), so ``torch.manual_seed`` makes it
    repeatable; the draws differ from torchvision's. Then x / 255, minus mean, over std."""

    def __init__(self, crop_size=224, crop_scale=(0.3, 1.0), color_jitter=1.0, horizontal_flip=False, color_distortion=False,
                 gaussian_blur=False, normalization=IMAGENET_NORMALIZATION):
        mean, std = (torch.as_tensor(values, dtype=torch.float32) for values in normalization)
        if mean.shape != (3,) or std.shape != (3,):
            raise ValueError(f"normalization must be (mean, std) with 3 values each, got {normalization!r}")
        if (std == 0).any():
            raise ValueError(f"normalization std must not contain 0, got {normalization[1]!r}")
        self.settings = dict(crop_size=crop_size, crop_scale=tuple(crop_scale), color_jitter=color_jitter, horizontal_flip=horizontal_flip,
                             color_distortion=color_distortion, gaussian_blur=gaussian_blur, normalization=normalization)
        self.uint8_transform = images.make_transforms(
            crop_size, tuple(crop_scale), use_horizontal_flip=horizontal_flip, use_color_distortion=color_distortion,
            color_jitter_strength=color_jitter if color_distortion else 0.0, use_gaussian_blur=gaussian_blur)
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        pixels = self.uint8_transform(img, torch.default_generator)
        return pixels.to(torch.float32).div(255).sub_(self.mean).div_(self.std)  # ToTensor then Normalize, in their order

    def __getstate__(self) -> dict:  # the uint8 transform is a closure: pickle the settings (DataLoader workers under spawn)
        return self.settings

    def __setstate__(self, settings: dict) -> None:
        self.__init__(**settings)

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={value!r}" for name, value in self.settings.items())
        return f"{type(self).__name__}({settings})"


def make_torchvision_transforms(crop_size=224, crop_scale=(0.3, 1.0), color_jitter=1.0, horizontal_flip=False, color_distortion=False,
                                gaussian_blur=False, normalization=IMAGENET_NORMALIZATION):
    """The reference's ``torchvision.transforms.Compose``: RandomResizedCrop, optional
    RandomHorizontalFlip, optional colour distortion (ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with
    p=0.8, then RandomGrayscale(p=0.2)), optional GaussianBlur(p=0.5), ToTensor, Normalize."""
    if tv_transforms is None:
        raise ImportError(f"torchvision is not importable ({TORCHVISION_PROBLEM}); use NativeTransform")
    steps = [tv_transforms.RandomResizedCrop(crop_size, scale=crop_scale)]
    if horizontal_flip:
        steps.append(tv_transforms.RandomHorizontalFlip())
    if color_distortion:
        s = color_jitter
        jitter = tv_transforms.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        steps.append(tv_transforms.Compose([tv_transforms.RandomApply([jitter], p=0.8), tv_transforms.RandomGrayscale(p=0.2)]))
    if gaussian_blur:
        steps.append(GaussianBlur(p=0.5))
    steps += [tv_transforms.ToTensor(), tv_transforms.Normalize(normalization[0], normalization[1])]
    return tv_transforms.Compose(steps)


def make_transforms(crop_size=224, crop_scale=(0.3, 1.0), color_jitter=1.0, horizontal_flip=False, color_distortion=False,
                    gaussian_blur=False, normalization=IMAGENET_NORMALIZATION):
    """The reference's training transform: PIL image -> normalised (3, crop_size, crop_size) float32.

    With torchvision (``USES_TORCHVISION``) the reference's Compose, the same draws from the
    global torch RNG and the same tensors; without it a ``NativeTransform``: the same
    distribution, other draws (still from the global torch generator)."""
    logger.info("making imagenet data transforms (%s)", "torchvision" if USES_TORCHVISION else "fastjepa, no torchvision")
    build = make_torchvision_transforms if USES_TORCHVISION else NativeTransform
    return build(crop_size, crop_scale, color_jitter, horizontal_flip, color_distortion, gaussian_blur, normalization)
