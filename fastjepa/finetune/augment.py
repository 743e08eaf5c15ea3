"""MAE's fine-tuning augmentation (timm's RandAugment, RandomErasing and Mixup/CutMix) as
batched tensor ops on whatever device the images are.

``FinetuneAugment`` takes (B, 3, H, W) uint8 crops (already random-resized-cropped and flipped
by the loader) and int64 labels and does what MAE's recipe does to them, in its order:
RandAugment on uint8, normalisation with ImageNet statistics, random erasing, then mixup or
cutmix with label smoothing, giving float32 images and (B, num_classes) soft targets.

Randomness: every draw comes from the caller's CPU ``torch.Generator``, on the host, in the
order each class's docstring gives; each part moves its parameters to the device in one copy
and never reads device data back, so a call never synchronises with the device. The same
generator state gives the same output on any device. Same distributions as timm, other draws: timm draws per image from
Python's ``random`` and NumPy's global state.

Each RandAugment op follows Pillow's arithmetic, as timm runs it through PIL: ImageEnhance's
blends in float32 truncated to uint8, the fixed-point RGB -> L, ImageOps' equalize and
autocontrast look-up tables, the SMOOTH filter rounded with its border pixels kept, and
Image.transform's affine sampling (pixel centres, border pixels repeated, the fill outside
the source). The point ops and enhancements equal Pillow bit for bit; the geometric ops are
bilinear (timm picks bilinear or bicubic at random, MAE asks timm for bicubic), in double
as Pillow computes them, and equal Pillow but for rare rounding differences of 1
(tests/test_finetune_augment.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from fastjepa.data.normalize import IMAGENET_MEAN, normalize

__all__ = [
    "DEFAULT_OPS",
    "INCREASING_OPS",
    "FinetuneAugment",
    "Mixup",
    "RandAugment",
    "RandomErasing",
    "rand_augment_from_config",
]

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS ("inc1"), in timm's order
DEFAULT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
APPLY_PROB = 0.5  # timm's rand_augment_ops: each chosen op applies with this probability
MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10] and scaled by 1/10
FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # (124, 116, 104): timm's img_mean, the fill of the geometric ops
ERASE_ATTEMPTS = 10  # timm's RandomErasing tries this many boxes per image


def _check_uint8_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must have shape (B, 3, H, W) with H, W >= 1, got {tuple(images.shape)}")


def _check_float_images(images: torch.Tensor) -> None:
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point (normalised), got {images.dtype}")
    if images.dim() != 4 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must have shape (B, C, H, W) with H, W >= 1, got {tuple(images.shape)}")


def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One host -> device copy that does not make the host wait."""
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


# --- RandAugment ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment: ``num_ops`` ops per image, each chosen uniformly with replacement
    from ``ops`` and applied with probability 0.5, at magnitude ``magnitude`` (0..10) plus
    gaussian noise of std ``magnitude_std`` (``inf``: uniform in [0, magnitude]), clipped to
    [0, 10]; signed ops (rotate, shear, translate, the increasing enhancements) negated with
    probability 0.5. Geometric ops are bilinear and fill with ``FILL``.

    Draws, per call, for a batch of B, from the generator in this order:
    ``torch.randint(len(ops), (B, num_ops))`` (the ops), ``torch.rand((B, num_ops, 3),
    dtype=float64)`` (applied if [..., 0] <= 0.5; negated if [..., 1] > 0.5; [..., 2] the
    uniform magnitude when magnitude_std is inf), ``torch.randn((B, num_ops), dtype=float64)``
    (the magnitude noise). Every draw is made whatever the configuration."""

    num_ops: int = 2
    magnitude: int = 10
    magnitude_std: float = 0.0
    increasing: bool = False

    def __post_init__(self):
        if self.num_ops < 0:
            raise ValueError(f"RandAugment num_ops must be >= 0, got {self.num_ops}")
        if self.magnitude < 0:
            raise ValueError(f"RandAugment magnitude must be >= 0, got {self.magnitude}")
        if not self.magnitude_std >= 0:
            raise ValueError(f"RandAugment magnitude_std must be >= 0, got {self.magnitude_std}")

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else DEFAULT_OPS

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> a new (B, 3, H, W) uint8 tensor on the same device."""
        _check_uint8_images(images)
        _check_generator(generator)
        batch, _, height, width = images.shape
        ops = torch.randint(len(self.ops), (batch, self.num_ops), generator=generator)
        u = torch.rand((batch, self.num_ops, 3), generator=generator, dtype=torch.float64)
        noise = torch.randn((batch, self.num_ops), generator=generator, dtype=torch.float64)

        applied = u[..., 0] <= APPLY_PROB
        sign = torch.where(u[..., 1] > 0.5, -1.0, 1.0).double()
        if math.isinf(self.magnitude_std):
            level = u[..., 2] * self.magnitude
        else:
            level = self.magnitude + self.magnitude_std * noise
        fraction = level.clamp(0, MAX_LEVEL) / MAX_LEVEL
        params = torch.zeros((batch, self.num_ops, 6), dtype=torch.float64)
        for code, name in enumerate(self.ops):
            chosen = ops == code
            params[chosen] = _op_params(name, fraction[chosen], sign[chosen], height, width)

        # per slot, the applied images grouped by op (unapplied last), so that each op's
        # images are one contiguous run of ``order``
        key = torch.where(applied, ops, len(self.ops))
        order = key.argsort(dim=0, stable=True).T  # (num_ops, B)
        counts = [torch.bincount(key[:, slot], minlength=len(self.ops) + 1).tolist() for slot in range(self.num_ops)]
        slot_params = params.transpose(0, 1).gather(1, order[..., None].expand(-1, -1, 6))
        packed = _to_device(torch.cat([order[..., None].double(), slot_params], dim=2), images.device)
        index, device_params = packed[..., 0].long(), packed[..., 1:]

        out = images.clone()
        for slot in range(self.num_ops):
            start = 0
            for name, count in zip(self.ops, counts[slot]):
                if count:
                    rows = index[slot, start : start + count]
                    out.index_copy_(0, rows, _APPLY[name](out.index_select(0, rows), device_params[slot, start : start + count]))
                start += count
        return out


def rand_augment_from_config(config: str | None) -> RandAugment | None:
    """timm's RandAugment config string -> ``RandAugment``; None or "" -> None (off).
    Sections after "rand", separated by "-": m<int> magnitude (default 10), n<int> ops per
    image (default 2), mstd<float> magnitude noise std (> 100: uniform), inc<0|1> the
    increasing op set. E.g. "rand-m9-mstd0.5-inc1" (MAE's)."""
    if not config:
        return None
    head, *sections = config.split("-")
    if head != "rand":
        raise ValueError(f"RandAugment config {config!r} must start with 'rand'")
    fields = {}
    for section in sections:
        match = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if match is None:
            raise ValueError(f"RandAugment config {config!r}: malformed section {section!r} (a key then a number, e.g. m9)")
        key, value = match.groups()
        try:
            if key == "m":
                fields["magnitude"] = int(value)
            elif key == "n":
                fields["num_ops"] = int(value)
            elif key == "mstd":
                std = float(value)
                fields["magnitude_std"] = math.inf if std > 100 else std
            elif key == "inc":
                fields["increasing"] = int(value) != 0
            else:
                raise ValueError(f"RandAugment config {config!r}: unknown or unsupported section {section!r} (supported: m, n, mstd, inc)")
        except ValueError as error:
            if "RandAugment config" in str(error):
                raise
            raise ValueError(f"RandAugment config {config!r}: bad number in section {section!r}") from None
    return RandAugment(**fields)


def _op_params(name: str, fraction: torch.Tensor, sign: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(n, 6) float64 host parameters of op ``name`` at magnitudes ``fraction`` (level / 10):
    Pillow's affine (a, b, c, d, e, f) for the geometric ops, [argument, 0, ...] for the others.
    The arguments are timm's *_level_to_arg."""
    params = torch.zeros((fraction.shape[0], 6), dtype=torch.float64)
    ones, zeros = torch.ones_like(fraction), torch.zeros_like(fraction)
    if name == "Rotate":
        # Image.rotate(degrees) about the centre: output (x, y) samples the input at R(-degrees)
        theta = -torch.deg2rad(30 * fraction * sign)
        cos, sin = torch.cos(theta), torch.sin(theta)
        cx, cy = width / 2, height / 2
        matrix = (cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    elif name == "ShearX":
        matrix = (ones, 0.3 * fraction * sign, zeros, zeros, ones, zeros)
    elif name == "ShearY":
        matrix = (ones, zeros, zeros, 0.3 * fraction * sign, ones, zeros)
    elif name == "TranslateXRel":
        matrix = (ones, zeros, 0.45 * fraction * sign * width, zeros, ones, zeros)
    elif name == "TranslateYRel":
        matrix = (ones, zeros, zeros, zeros, ones, 0.45 * fraction * sign * height)
    else:
        params[:, 0] = _op_argument(name, fraction, sign)
        return params
    return torch.stack(matrix, dim=1)


def _op_argument(name: str, fraction: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    if name in ("AutoContrast", "Equalize", "Invert"):
        return torch.zeros_like(fraction)
    if name == "Posterize":  # bits kept
        return torch.floor(4 * fraction)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(4 * fraction)
    if name == "Solarize":  # threshold
        return torch.floor(256 * fraction)
    if name == "SolarizeIncreasing":
        return 256 - torch.floor(256 * fraction)
    if name == "SolarizeAdd":  # added below 128
        return torch.floor(110 * fraction)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):  # enhance factor
        return 1.8 * fraction + 0.1
    if name.endswith("Increasing"):
        return (1 + sign * 0.9 * fraction).clamp(min=0.1)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _apply_lut(images: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) uint8 through per image and channel tables (n, 3, 256)."""
    return lut.to(torch.uint8).gather(2, images.flatten(2).long()).view_as(images)


def _autocontrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast: each channel's [min, max] stretched to [0, 255], the table in
    double and truncated as Pillow builds it; a constant channel is left alone."""
    low = images.amin(dim=(2, 3)).double()[..., None]
    high = images.amax(dim=(2, 3)).double()[..., None]
    scale = 255 / (high - low).clamp(min=1)
    levels = torch.arange(256, device=images.device, dtype=torch.float64)
    lut = torch.trunc(levels * scale - low * scale).clamp(0, 255)
    return _apply_lut(images, torch.where(high > low, lut, levels))


def _equalize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per image and channel: lut[i] = (step // 2 + pixels below i) // step,
    step = (pixels - pixels of the highest level present) // 255, clipped to 255; a channel
    with step 0 (one level present, or too few pixels) is left alone."""
    n = images.shape[0]
    offsets = torch.arange(n * 3, device=images.device).view(n, 3, 1) * 256
    hist = torch.bincount((images.flatten(2).long() + offsets).flatten(), minlength=n * 3 * 256).view(n, 3, 256)
    levels = torch.arange(256, device=images.device)
    highest = torch.where(hist > 0, levels, -1).amax(dim=2, keepdim=True)
    step = (hist.sum(dim=2, keepdim=True) - hist.gather(2, highest)) // 255
    lut = ((step // 2 + hist.cumsum(dim=2) - hist) // step.clamp(min=1)).clamp(max=255)
    return _apply_lut(images, torch.where(step > 0, lut, levels))


def _invert(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    return 255 - images


def _posterize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Keep the top ``bits`` bits (0..4); 0 bits is black, as Pillow before 13 gives it to timm
    (Pillow 13 refuses 0)."""
    bits = params[:, 0].long()
    mask = torch.bitwise_left_shift(torch.full_like(bits, 255), 8 - bits) & 255
    return images & mask.to(torch.uint8).view(-1, 1, 1, 1)


def _solarize(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Invert the levels >= threshold (0..256)."""
    return torch.where(images < params[:, 0].view(-1, 1, 1, 1), images, 255 - images)


def _solarize_add(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """timm's solarize_add: levels below 128 get ``add`` added, saturating at 255."""
    added = (images.float() + params[:, 0].view(-1, 1, 1, 1)).clamp(max=255).to(torch.uint8)
    return torch.where(images < 128, added, images)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's fixed-point RGB -> L, (n, 1, H, W); exact in float32 (partial sums < 2**24)."""
    return torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, image, factor) as ImageEnhance calls it: float32, truncated."""
    factor = params[:, 0].float().view(-1, 1, 1, 1)  # Pillow's alpha is a C float
    return torch.floor(degenerate + factor * (x - degenerate)).clamp(0, 255).to(torch.uint8)


def _color(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    x = images.float()
    return _blend(_luma(x), x, params)


def _contrast(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma, rounded half up, as ImageEnhance.Contrast."""
    x = images.float()
    luma = _luma(x)
    mean = torch.floor(luma.sum(dim=(2, 3), keepdim=True, dtype=torch.float64) / (luma.shape[2] * luma.shape[3]) + 0.5)
    return _blend(mean.float(), x, params)


def _brightness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    x = images.float()
    return _blend(torch.zeros_like(x), x, params)


def _sharpness(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Blend with Pillow's SMOOTH filter (3x3, 1 around a 5, / 13, rounded; border pixels
    kept). The 3x3 sums are integers, summed exactly in float32 (no convolution: TF32)."""
    x = images.float()
    height, width = x.shape[2:]
    window = sum(x[:, :, dy : dy + height - 2, dx : dx + width - 2] for dy in range(3) for dx in range(3))
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = torch.floor((window + 4 * x[:, :, 1:-1, 1:-1] + 6) / 13)
    return _blend(smooth, x, params)


def _affine(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor=FILL): the output
    pixel centre (u, v) samples the input at (a u + b v + c, d u + e v + f), in pixels from the
    top-left corner; inside [0, W) x [0, H) bilinearly with the border pixels repeated, in
    Pillow's form and arithmetic (a + (b - a) * t along x, then along y, in double) and
    truncated to uint8; outside, the fill."""
    n, _, height, width = images.shape
    a, b, c, d, e, f = (params[:, j].view(n, 1, 1) for j in range(6))
    u = (torch.arange(width, device=images.device, dtype=torch.float64) + 0.5).view(1, 1, width)
    v = (torch.arange(height, device=images.device, dtype=torch.float64) + 0.5).view(1, height, 1)
    source_x, source_y = a * u + b * v + c, d * u + e * v + f
    inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
    left, top = torch.floor(source_x - 0.5), torch.floor(source_y - 0.5)
    dx, dy = (source_x - 0.5 - left)[:, None], (source_y - 0.5 - top)[:, None]
    x0, x1 = left.clamp(0, width - 1).long(), (left + 1).clamp(0, width - 1).long()
    y0, y1 = top.clamp(0, height - 1).long(), (top + 1).clamp(0, height - 1).long()
    flat = images.double().flatten(2)

    def at(y, x):  # the input at (y, x) (n, H, W) for every channel: (n, 3, H, W)
        return flat.gather(2, (y * width + x).view(n, 1, height * width).expand(-1, 3, -1)).view(n, 3, height, width)

    upper, lower = at(y0, x0), at(y1, x0)
    upper = upper + (at(y0, x1) - upper) * dx
    lower = lower + (at(y1, x1) - lower) * dx
    sampled = upper + (lower - upper) * dy
    fill = torch.tensor(FILL, device=images.device, dtype=torch.float64).view(1, 3, 1, 1)
    return torch.where(inside[:, None], sampled.floor(), fill).to(torch.uint8)


_APPLY = {
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _affine,
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize,
    "Solarize": _solarize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "Color": _color,
    "ColorIncreasing": _color,
    "Contrast": _contrast,
    "ContrastIncreasing": _contrast,
    "Brightness": _brightness,
    "BrightnessIncreasing": _brightness,
    "Sharpness": _sharpness,
    "SharpnessIncreasing": _sharpness,
    "ShearX": _affine,
    "ShearY": _affine,
    "TranslateXRel": _affine,
    "TranslateYRel": _affine,
}


# --- Random erasing ------------------------------------------------------------------------


@dataclass(frozen=True)
class RandomErasing:
    """timm's RandomErasing (one box per image) on a normalised float batch: each image, with
    probability ``probability``, gets the first of 10 attempted boxes that fits (area uniform
    in [min_area, max_area] of the image, aspect log-uniform in [min_aspect, max_aspect],
    max_aspect defaulting to 1 / min_aspect, sides rounded half to even, strictly smaller
    than the image, position uniform) filled with per-pixel standard normal values ("pixel"),
    one normal value per channel ("rand") or zeros ("const").

    Draws, per call, for a batch of B and C channels, from the generator in this order:
    ``torch.rand((B, 41), dtype=float64)`` ([:, 0] < probability erases; [:, 1:] as (10, 4):
    per attempt area, log-aspect, top and left, top = floor(u * (H - h + 1))); then for
    "rand" ``torch.randn((B, C))``, for "pixel" ``torch.randn(N)`` with N the erased elements,
    laid out image by image, each box as (C, h, w). The noise is drawn on the host, so the
    output is the same on every device; it is a fraction of the batch (at most
    probability * max_area of it, in expectation)."""

    probability: float = 0.25
    mode: str = "pixel"
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    max_aspect: float | None = None

    def __post_init__(self):
        if not 0 <= self.probability <= 1:
            raise ValueError(f"RandomErasing probability must be in [0, 1], got {self.probability}")
        if self.mode not in ("pixel", "rand", "const"):
            raise ValueError(f"RandomErasing mode must be 'pixel', 'rand' or 'const', got {self.mode!r}")
        if not 0 < self.min_area <= self.max_area <= 1:
            raise ValueError(f"RandomErasing needs 0 < min_area <= max_area <= 1, got {self.min_area}, {self.max_area}")
        if not 0 < self.min_aspect <= (self.max_aspect or 1 / self.min_aspect):
            raise ValueError(f"RandomErasing needs 0 < min_aspect <= max_aspect, got {self.min_aspect}, {self.max_aspect}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) float -> a new tensor of the same shape, dtype and device."""
        _check_float_images(images)
        _check_generator(generator)
        batch, channels, height, width = images.shape
        u = torch.rand((batch, 1 + ERASE_ATTEMPTS * 4), generator=generator, dtype=torch.float64)
        attempts = u[:, 1:].view(batch, ERASE_ATTEMPTS, 4)
        area = (self.min_area + (self.max_area - self.min_area) * attempts[..., 0]) * (height * width)
        log_low, log_high = math.log(self.min_aspect), math.log(self.max_aspect or 1 / self.min_aspect)
        aspect = torch.exp(log_low + (log_high - log_low) * attempts[..., 1])
        box_h, box_w = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
        fits = (box_h < height) & (box_w < width)
        first = fits.int().argmax(dim=1, keepdim=True)  # the first attempt that fits
        erased = (u[:, 0] < self.probability) & fits.any(dim=1)
        box_h, box_w = box_h.gather(1, first)[:, 0], box_w.gather(1, first)[:, 0]
        top = torch.floor(attempts[..., 2].gather(1, first)[:, 0] * (height - box_h + 1))
        left = torch.floor(attempts[..., 3].gather(1, first)[:, 0] * (width - box_w + 1))
        boxes = torch.stack([erased.double(), top, top + box_h, left, left + box_w], dim=1).float()
        if self.mode == "rand":
            values = torch.randn((batch, channels), generator=generator)
        elif self.mode == "pixel":
            values = torch.randn(int((box_h * box_w)[erased].sum()) * channels, generator=generator)
        else:
            values = torch.zeros(0)
        packed = _to_device(torch.cat([boxes.flatten(), values.flatten()]), images.device)
        boxes, values = packed[: batch * 5].view(batch, 5, 1, 1, 1), packed[batch * 5 :].to(images.dtype)

        in_box = _box_mask(boxes[:, 0] > 0, boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4], height, width)
        if self.mode == "pixel":
            return images.masked_scatter(in_box.expand_as(images), values)
        if self.mode == "rand":
            return torch.where(in_box, values.view(batch, channels, 1, 1), images)
        return torch.where(in_box, torch.zeros((), dtype=images.dtype, device=images.device), images)


def _box_mask(on, top, bottom, left, right, height: int, width: int) -> torch.Tensor:
    """(B, 1, H, W) bool: rows [top, bottom) x columns [left, right) of the images where
    ``on``; every argument is (B, 1, 1, 1) on the images' device."""
    rows = torch.arange(height, device=top.device).view(1, 1, height, 1)
    cols = torch.arange(width, device=top.device).view(1, 1, 1, width)
    return on & (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)


# --- Mixup / CutMix ------------------------------------------------------------------------


@dataclass(frozen=True)
class Mixup:
    """timm's Mixup (with correct_lam) and label smoothing. With probability ``prob`` (per
    batch for mode "batch", per pair for "pair", per image for "elem") an image is mixed
    with its partner, image B-1-i: mixup (lam ~ Beta(mixup_alpha)) or cutmix (lam ~
    Beta(cutmix_alpha), a box of the partner pasted in, lam corrected to the box's clipped
    area), cutmix with probability ``switch_prob`` when both alphas are > 0. ``cutmix_minmax``
    (low, high) draws the box's sides as fractions of the image's instead (cutmix alpha 1).
    Targets: lam * smooth(y) + (1 - lam) * smooth(y of the partner), smooth(y) the one-hot
    with off = label_smoothing / num_classes and on = 1 - label_smoothing + off. With mixing
    off (prob 0, or both alphas 0 and no minmax) the targets are smooth(y) and nothing is drawn.

    Draws: ``seed = torch.randint(2**63 - 1, ())`` from the generator, then from
    ``rng = numpy.random.default_rng(seed)`` in timm's order. For "batch": rng.random() < prob
    mixes; if both are on, rng.random() < switch_prob picks cutmix; lam = rng.beta(alpha,
    alpha); for cutmix the box (below) with count 1. For "elem" (n = B) and "pair" (n = B / 2,
    image i and B-1-i share everything): if both are on, cutmix = rng.random(n) < switch_prob,
    then rng.beta(cutmix_alpha, .., n), rng.beta(mixup_alpha, .., n), lam taking from one or
    the other; else cutmix all or none and one rng.beta(alpha, .., n); then rng.random(n) <
    prob mixes (lam = 1 otherwise); then the boxes for all n. Box: with a ratio r = sqrt(1 -
    lam), centre (rng.integers(0, H, n), rng.integers(0, W, n)), half sides int(H r) // 2 and
    int(W r) // 2, clipped to the image; with minmax, sides rng.integers(int(H low), int(H
    high), n) and likewise for W, then corner rng.integers(0, H - h) and rng.integers(0, W -
    w). Images are mixed in their dtype as x * lam + partner * (1 - lam) with lam rounded to
    that dtype."""

    num_classes: int
    mixup_alpha: float = 1.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0):
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        if self.cutmix_minmax is not None and not (len(self.cutmix_minmax) == 2 and 0 <= self.cutmix_minmax[0] < self.cutmix_minmax[1] <= 1):
            raise ValueError(f"cutmix_minmax must be (low, high) with 0 <= low < high <= 1, got {self.cutmix_minmax}")
        if not (0 <= self.prob <= 1 and 0 <= self.switch_prob <= 1):
            raise ValueError(f"prob and switch_prob must be in [0, 1], got {self.prob}, {self.switch_prob}")
        if self.mode not in ("batch", "pair", "elem"):
            raise ValueError(f"mixup mode must be 'batch', 'pair' or 'elem', got {self.mode!r}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def cutmix_on(self) -> bool:
        return self.cutmix_alpha > 0 or self.cutmix_minmax is not None

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_on)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) float images, (B,) int64 labels -> (new mixed images, (B, num_classes)
        float32 targets), on the images' device. Labels are range-checked when they are on the
        CPU (on a GPU the check would synchronise)."""
        _check_float_images(images)
        _check_generator(generator)
        batch, _, height, width = images.shape
        if labels.dtype != torch.int64 or labels.shape != (batch,):
            raise ValueError(f"labels must be int64 of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}")
        if labels.device.type == "cpu" and batch and not (0 <= int(labels.min()) and int(labels.max()) < self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        labels = labels.to(images.device)
        onehot = torch.full((batch, self.num_classes), self.label_smoothing / self.num_classes, device=images.device)
        onehot.scatter_(1, labels[:, None], 1 - self.label_smoothing + self.label_smoothing / self.num_classes)
        if not self.active:
            return images.clone(), onehot
        if batch % 2:
            raise ValueError(f"mixup needs an even batch size, got {batch}")

        rng = np.random.default_rng(int(torch.randint(2**63 - 1, (), generator=generator)))
        lam, cutmix, box = self._draw_batch(rng, batch, height, width) if self.mode == "batch" else self._draw_per_image(rng, batch, height, width)
        packed = _to_device(torch.from_numpy(np.stack([lam, cutmix, *box], axis=1)), images.device)
        lam, cutmix, top, bottom, left, right = packed.T.reshape(6, batch, 1, 1, 1)

        in_box = _box_mask(cutmix > 0, top, bottom, left, right, height, width)
        lam = lam.to(images.dtype)
        partner = images.flip(0)
        mixed = torch.where(cutmix > 0, torch.where(in_box, partner, images), images * lam + partner * (1 - lam))
        lam = lam.view(batch, 1).float()
        return mixed, onehot * lam + onehot.flip(0) * (1 - lam)

    def _draw_batch(self, rng: np.random.Generator, batch: int, height: int, width: int):
        """(lam (B,), cutmix (B,), box (4, B)) for mode "batch": one draw for all images."""
        lam, cutmix = 1.0, False
        if rng.random() < self.prob:
            if self.mixup_alpha > 0 and self.cutmix_on:
                cutmix = bool(rng.random() < self.switch_prob)
            else:
                cutmix = self.cutmix_on
            alpha = self._cutmix_alpha if cutmix else self.mixup_alpha
            lam = rng.beta(alpha, alpha)
        lam, cutmix = np.full(1, lam), np.full(1, cutmix)
        box = np.zeros((4, 1))
        if cutmix[0]:
            box, lam = self._boxes(rng, lam, height, width)
        return np.repeat(lam, batch), np.repeat(cutmix, batch).astype(np.float64), np.repeat(box, batch, axis=1)

    def _draw_per_image(self, rng: np.random.Generator, batch: int, height: int, width: int):
        """(lam (B,), cutmix (B,), box (4, B)) for modes "elem" and "pair"."""
        n = batch if self.mode == "elem" else batch // 2
        if self.mixup_alpha > 0 and self.cutmix_on:
            cutmix = rng.random(n) < self.switch_prob
            lam = np.where(cutmix, rng.beta(self._cutmix_alpha, self._cutmix_alpha, n), rng.beta(self.mixup_alpha, self.mixup_alpha, n))
        else:
            cutmix = np.full(n, self.cutmix_on)
            alpha = self._cutmix_alpha if self.cutmix_on else self.mixup_alpha
            lam = rng.beta(alpha, alpha, n)
        lam = np.where(rng.random(n) < self.prob, lam, 1.0)
        cutmix &= lam != 1
        box, box_lam = self._boxes(rng, lam, height, width)
        lam = np.where(cutmix, box_lam, lam)
        box = np.where(cutmix, box, 0)
        if self.mode == "pair":
            lam, cutmix, box = np.concatenate([lam, lam[::-1]]), np.concatenate([cutmix, cutmix[::-1]]), np.concatenate([box, box[:, ::-1]], axis=1)
        return lam, cutmix.astype(np.float64), box

    @property
    def _cutmix_alpha(self) -> float:
        return 1.0 if self.cutmix_minmax is not None else self.cutmix_alpha

    def _boxes(self, rng: np.random.Generator, lam: np.ndarray, height: int, width: int):
        """timm's cutmix_bbox_and_lam for n lams: ((top, bottom, left, right) (4, n), the lams
        corrected to the boxes' clipped areas)."""
        n = lam.shape[0]
        if self.cutmix_minmax is not None:
            low, high = self.cutmix_minmax
            cut_h = rng.integers(int(height * low), int(height * high), n)
            cut_w = rng.integers(int(width * low), int(width * high), n)
            top, left = rng.integers(0, height - cut_h), rng.integers(0, width - cut_w)
            box = np.stack([top, top + cut_h, left, left + cut_w])
        else:
            ratio = np.sqrt(1 - lam)
            half_h, half_w = (height * ratio).astype(np.int64) // 2, (width * ratio).astype(np.int64) // 2
            cy, cx = rng.integers(0, height, n), rng.integers(0, width, n)
            box = np.stack([np.clip(cy - half_h, 0, height), np.clip(cy + half_h, 0, height), np.clip(cx - half_w, 0, width), np.clip(cx + half_w, 0, width)])
        area = (box[1] - box[0]) * (box[3] - box[2])
        return box.astype(np.float64), 1 - area / (height * width)


# --- The composition -----------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneAugment:
    """MAE's fine-tuning augmentation of a loader's uint8 crops, in MAE's order: RandAugment
    (None: off) on uint8, ``normalize`` (ImageNet mean and std, float32), random erasing
    (None: off), mixup/cutmix with label smoothing (``mixup`` with both alphas 0: label
    smoothing alone). One generator, drawn from by each part in that order."""

    mixup: Mixup
    rand_augment: RandAugment | None = None
    random_erasing: RandomErasing | None = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8, (B,) int64 -> ((B, 3, H, W) float32, (B, num_classes) float32 soft targets)."""
        _check_uint8_images(images)
        if self.rand_augment is not None:
            images = self.rand_augment(images, generator)
        x = normalize(images)
        if self.random_erasing is not None:
            x = self.random_erasing(x, generator)
        return self.mixup(x, labels, generator)
