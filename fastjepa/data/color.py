"""The reference trainer's colour distortion and Gaussian blur for a whole batch on any device.

``color_and_blur`` does to a (B, 3, H, W) uint8 batch what the PIL backend
(``fastjepa.data.images``: ``_color_distortion``, then ``GaussianBlur`` with p=0.5 in
``make_transforms``) does to one image, with batched tensor operations, so that the
backends that crop on the GPU can use these augmentations too. Same distribution,
other draws: the batch's parameters come from one vectorised draw of the host
generator (``_draw_params``), not from the PIL path's per-image sequence, and reach the
device in one copy (``_apply_params``).

Each op follows Pillow's arithmetic: the blends of ImageEnhance in float32 truncated to
uint8, the fixed-point "L" conversion, the HSV round trip with its float/double mix, and
the blur as Pillow's three extended box passes per axis, edge pixels repeated, rounded
after each pass in its 2**-24 fixed point. The result is bit-exact against Pillow 13 on
x86-64 (tests/test_data_color.py), for every op and for drawn compositions.
"""

from __future__ import annotations

import torch

__all__ = ["color_and_blur"]

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # the jitter ops, as _draw_params codes them


def color_and_blur(
    images: torch.Tensor, generator: torch.Generator, color_distortion: bool, strength: float, blur: bool
) -> torch.Tensor:
    """(B, 3, H, W) uint8 images on any device -> the same shape, uint8, same device."""
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    return _apply_params(images, *_draw_params(generator, images.shape[0], color_distortion, strength, blur))


def _draw_params(generator: torch.Generator, batch: int, color_distortion: bool, strength: float, blur: bool):
    """Host tensors (ops, factors, gray, radii) for ``_apply_params``: with p=0.8 (if
    strength > 0) the 4 jitter ops in a random order, factors in [max(0, 1-0.8s), 1+0.8s]
    and hue shift in [-0.2s, 0.2s] turns; grayscale with p=0.2; blur with p=0.5 and radius
    in [0.1, 2]."""
    u = torch.rand((batch, 12), generator=generator, dtype=torch.float64)
    jitter = (u[:, 0] < 0.8) & bool(color_distortion and strength > 0)
    ops = torch.where(jitter[:, None], u[:, 8:].argsort(dim=1), -1)
    low, high = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
    factors = low + (high - low) * u[:, 1:5]
    factors[:, HUE] = 0.2 * strength * (2 * u[:, 4] - 1)
    gray = (u[:, 5] < 0.2) & bool(color_distortion)
    radii = torch.where((u[:, 6] < 0.5) & bool(blur), 0.1 + 1.9 * u[:, 7], 0.0)
    return ops, factors, gray, radii


def _apply_params(
    images: torch.Tensor, ops: torch.Tensor, factors: torch.Tensor, gray: torch.Tensor, radii: torch.Tensor
) -> torch.Tensor:
    """Apply host parameters to a (B, 3, H, W) uint8 batch: ops (B, 4) int, the op
    (BRIGHTNESS, CONTRAST, SATURATION, HUE) at each position, -1 for none; factors (B, 4)
    float, per op, the enhance factor or (HUE) the shift in turns; gray (B,) bool; radii
    (B,) float, the blur's standard deviation, 0 for none."""
    if images.numel() == 0:
        return images.clone()
    at = factors.double().gather(1, ops.clamp(min=0))  # the factor of the op at each position
    at = torch.where(ops == HUE, torch.round(at * 255), at)  # the hue shift in bytes, as _adjust_hue rounds it
    columns = [ops, at, gray[:, None], _box_weights(radii)]
    packed = torch.cat([c.double() for c in columns], dim=1).float()
    if images.is_cuda:
        packed = packed.pin_memory()
    packed = packed.to(images.device, non_blocking=True)
    p = packed.view(*packed.shape, 1, 1)  # p[:, j:j + 1] broadcasts over (B, C, H, W)

    x = images.float()
    for k in range(4):
        op, f = p[:, k : k + 1], p[:, 4 + k : 5 + k]
        if ((ops[:, k] >= 0) & (ops[:, k] < HUE)).any():  # ImageEnhance: blend with a degenerate image
            luma = _luma(x)
            mean = torch.floor(luma.sum(dim=(2, 3), keepdim=True, dtype=torch.float64) / luma[0].numel() + 0.5)
            degenerate = torch.where(op == BRIGHTNESS, 0.0, torch.where(op == CONTRAST, mean.float(), luma))
            blended = torch.floor(degenerate + f * (x - degenerate)).clamp(0, 255)
            x = torch.where((op >= 0) & (op < HUE), blended, x)
        if (ops[:, k] == HUE).any():
            x = torch.where(op == HUE, _rotate_hue(x, f), x)
    if gray.any():
        x = torch.where(p[:, 8:9] > 0, _luma(x), x)
    if (radii > 0).any():
        # radius 0 gives the exact identity (a weight of 2**24 on the centre)
        x, weights = x.long(), packed[:, 9:].long()  # the weights (<= 2**24) are exact in float32
        for dim in (3, 2):
            for _ in range(3):
                x = _box_pass(x, weights, dim)
    return x.to(torch.uint8)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """Pillow's fixed-point RGB -> L, (B, 1, H, W); every partial sum stays below 2**24,
    so float32 computes it exactly."""
    return torch.floor((x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 32768) / 65536)


def _rotate_hue(x: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> HSV -> RGB with the hue byte rotated by ``units``, step by step in
    the float (float32) or double (float64) arithmetic of its C code, for bit-exact results."""
    r, g, b = x.double().split(1, dim=1)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = (v - torch.minimum(torch.minimum(r, g), b)).float()
    grey, span = chroma == 0, chroma.clamp(min=1)  # grey pixels get hue = saturation = 0
    rc, gc, bc = ((v - c).float() / span for c in (r, g, b))
    hue = torch.where(g == v, (2.0 + rc.double() - bc).float(), (4.0 + gc.double() - rc).float())
    hue = torch.where(r == v, bc - gc, hue)
    hue = torch.fmod(hue.double() / 6.0 + 1.0, 1.0).float()
    hue = torch.where(grey, 0.0, torch.trunc(hue.double() * 255.0))
    sat = torch.where(grey, 0.0, torch.trunc((chroma / v.float().clamp(min=1)).double() * 255.0))
    scaled = torch.remainder(hue + units, 256) * 6.0 / 255.0
    sector = torch.floor(scaled)
    frac, fs = (scaled - sector).float(), (sat / 255.0).float()
    # C's round() rounds halves away from zero, torch.round to even; no (h, s, v) byte
    # triple gives these an argument of exactly k + 0.5 (checked exhaustively)
    p = torch.round(v * (1.0 - fs.double()))
    q = torch.round(v * (1.0 - (fs * frac).double()))
    t = torch.round(v * (1.0 - fs.double() * (1.0 - frac.double())))

    def red(k):  # the red channel's value in sector k; green and blue are red two and four sectors on
        return torch.where((k == 0) | (k == 5), v, torch.where(k == 1, q, torch.where(k == 4, t, p)))

    return torch.cat([red(torch.remainder(sector - 2 * c, 6)) for c in range(3)], dim=1).float()


def _box_weights(radii: torch.Tensor) -> torch.Tensor:
    """(B, 2n + 3) int64 weights, in units of 2**-24, of one of Pillow's box passes for
    GaussianBlur(radius), n the largest integer box radius: the extended box of Gwosdek et
    al. whose three passes have variance radius**2, computed in Pillow's float32 arithmetic."""
    radius = radii.float()
    sigma2 = radius * radius / 3
    whole = torch.floor((torch.sqrt(12.0 * sigma2.double() + 1.0).float().double() - 1.0) / 2.0).float()
    box = whole + (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) * (whole + 1)))
    inner = torch.floor(2.0**24 / (box * 2 + 1)).long()
    n = box.long()
    outer = (2**24 - (2 * n + 1) * inner) // 2
    distance = torch.arange(-int(n.max()) - 1, int(n.max()) + 2).abs()
    weights = torch.where(distance == n[:, None] + 1, outer[:, None], 0)
    return torch.where(distance <= n[:, None], inner[:, None], weights)


def _box_pass(x: torch.Tensor, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """One box pass along ``dim`` (3: rows, 2: columns) of int64 ``x`` with edge pixels
    repeated, in Pillow's exact fixed point: float32 cannot tell its frequent near-ties apart."""
    half, size = (weights.shape[1] - 1) // 2, x.shape[dim]
    padded = x.index_select(dim, torch.arange(-half, size + half, device=x.device).clamp(0, size - 1))
    total = sum(weights[:, j].view(-1, 1, 1, 1) * padded.narrow(dim, j, size) for j in range(weights.shape[1]))
    return (total + 2**23) >> 24
