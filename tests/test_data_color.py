"""fastjepa.data.color against Pillow, the PIL backend's implementation of the same augmentations.

Tolerance against Pillow: none. Every op (brightness, contrast, saturation, hue, grayscale,
blur) and every drawn composition must equal Pillow's result bit for bit; that is what
the implementation achieves on x86-64 with Pillow 13 (max abs difference 0, mean abs 0).
"""

import math
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter

from fastjepa.data.color import BRIGHTNESS, CONTRAST, HUE, SATURATION, _apply_params, _draw_params, color_and_blur
from fastjepa.data.images import _adjust_hue

ENHANCERS = {BRIGHTNESS: ImageEnhance.Brightness, CONTRAST: ImageEnhance.Contrast, SATURATION: ImageEnhance.Color}


def random_images(batch, height, width, seed=0):
    """Noise, and the same noise quantised to 4 levels (flat regions, grey pixels, ties)."""
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.integers(0, 256, (batch, 3, height, width), dtype=np.uint8))
    noise[1::2] = noise[1::2] // 64 * 85
    return noise


def pillow(image, ops=(), factors=None, gray=False, radius=0.0):
    """The PIL backend's ops on one (3, H, W) uint8 image, with given parameters, in order."""
    img = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
    for op in ops:
        if op == HUE:
            img = _adjust_hue(img, float(factors[HUE]))
        elif op >= 0:
            img = ENHANCERS[op](img).enhance(float(factors[op]))
    if gray:
        img = img.convert("L").convert("RGB")
    if radius > 0:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(radius)))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def apply_one(images, ops=(), factors=None, gray=False, radius=0.0):
    """_apply_params with the same parameters for every image."""
    batch = images.shape[0]
    op_row = list(ops) + [-1] * (4 - len(ops))
    return _apply_params(
        images,
        torch.tensor([op_row] * batch),
        torch.tensor([factors or [1.0] * 4] * batch, dtype=torch.float64),
        torch.full((batch,), gray),
        torch.full((batch,), radius, dtype=torch.float64),
    )


def assert_matches_pillow(out, images, **params):
    expected = torch.stack([pillow(image, **params) for image in images])
    diff = (out.int() - expected.int()).abs()
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert diff.max() == 0, f"{params}: max abs {diff.max()}, mean abs {diff.float().mean():.4f} against Pillow"


def with_factor(op, value):
    factors = [1.0] * 4
    factors[op] = value
    return factors


@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION])
@pytest.mark.parametrize("factor", [0.0, 0.37, 1.0, 1.8])
def test_enhance_ops_match_pillow(op, factor):
    images = random_images(8, 9, 11, seed=op)
    out = apply_one(images, [op], with_factor(op, factor))
    assert_matches_pillow(out, images, ops=[op], factors=with_factor(op, factor))
    if factor != 1.0:
        assert not torch.equal(out, images)


def test_contrast_rounds_a_half_mean_up():
    image = torch.tensor([10, 11], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)  # L mean 10.5 -> 11
    assert_matches_pillow(apply_one(image, [CONTRAST], with_factor(CONTRAST, 0.0)), image, ops=[CONTRAST], factors=with_factor(CONTRAST, 0.0))


@pytest.mark.parametrize("shift", [-0.5, -0.2, -0.013, 0.0, 0.002, 0.1, 0.2])
def test_hue_matches_pillow(shift):
    images = random_images(8, 9, 11, seed=1)
    out = apply_one(images, [HUE], with_factor(HUE, shift))
    assert_matches_pillow(out, images, ops=[HUE], factors=with_factor(HUE, shift))


@pytest.mark.parametrize("shift", [0.0, -0.37])
def test_hue_matches_pillow_across_the_rgb_cube(shift):
    colours = torch.arange(0, 2**24, 31)  # every 31st of the 2**24 colours
    rgb = torch.stack([colours >> 16, (colours >> 8) & 255, colours & 255]).to(torch.uint8)
    image = rgb.view(1, 3, 1, -1)
    out = apply_one(image, [HUE], with_factor(HUE, shift))
    assert_matches_pillow(out, image, ops=[HUE], factors=with_factor(HUE, shift))


def test_grayscale_matches_pillow():
    images = random_images(8, 9, 11, seed=2)
    out = apply_one(images, gray=True)
    assert_matches_pillow(out, images, gray=True)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


@pytest.mark.parametrize("radius", [0.1, 0.5, 1.0, 1.5, 2.0, 4.3])
@pytest.mark.parametrize("size", [(16, 21), (1, 1), (2, 5)])  # images smaller than the kernel too
def test_blur_matches_pillow(radius, size):
    images = random_images(6, *size, seed=3)
    out = apply_one(images, radius=radius)
    assert_matches_pillow(out, images, radius=radius)


def test_drawn_compositions_match_pillow():
    generator = torch.Generator().manual_seed(4)
    for size, strength in [((7, 13), 0.5), ((12, 10), 1.0), ((5, 5), 1.4)]:
        images = random_images(40, *size, seed=size[0])
        ops, factors, gray, radii = _draw_params(generator, len(images), True, strength, True)
        out = _apply_params(images, ops, factors, gray, radii)
        for i in range(len(images)):
            expected = pillow(images[i], ops[i].tolist(), factors[i], bool(gray[i]), float(radii[i]))
            assert torch.equal(out[i], expected), f"image {i}: ops {ops[i].tolist()}, factors {factors[i].tolist()}"


def test_order_matters_and_is_followed():
    images = random_images(4, 9, 11, seed=5)
    factors = [1.6, 0.4, 1.0, 1.0]  # brightness 1.6, contrast 0.4
    forward = apply_one(images, [BRIGHTNESS, CONTRAST], factors)
    backward = apply_one(images, [CONTRAST, BRIGHTNESS], factors)
    assert not torch.equal(forward, backward)
    assert_matches_pillow(forward, images, ops=[BRIGHTNESS, CONTRAST], factors=factors)
    assert_matches_pillow(backward, images, ops=[CONTRAST, BRIGHTNESS], factors=factors)


def within_binomial(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_drawn_rates_ranges_and_orders():
    n, strength = 20000, 0.5
    ops, factors, gray, radii = _draw_params(torch.Generator().manual_seed(6), n, True, strength, True)
    jittered = ops[:, 0] >= 0
    assert within_binomial(int(jittered.sum()), n, 0.8)
    assert within_binomial(int(gray.sum()), n, 0.2)
    assert within_binomial(int((radii > 0).sum()), n, 0.5)
    assert torch.equal(ops[~jittered], torch.full((int((~jittered).sum()), 4), -1))
    # each jittered row a permutation, every op at every position about a quarter of the time, all 24 orders
    orders = ops[jittered]
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand_as(orders))
    for position in range(4):
        for op in range(4):
            assert within_binomial(int((orders[:, position] == op).sum()), len(orders), 0.25)
    assert len({tuple(row) for row in orders.tolist()}) == 24
    # factors in [1 - 0.8s, 1 + 0.8s], hue in [-0.2s, 0.2s] turns, radius in [0.1, 2]
    enhance, hue, blur = factors[:, :HUE], factors[:, HUE], radii[radii > 0]
    assert 0.6 <= enhance.min() < 0.61 and 1.39 < enhance.max() <= 1.4
    assert -0.1 <= hue.min() < -0.099 and 0.099 < hue.max() <= 0.1
    assert 0.1 <= blur.min() < 0.11 and 1.99 < blur.max() <= 2.0
    assert (radii[radii <= 0] == 0).all()
    # strong jitter: the lower factor bound clamps at 0
    assert _draw_params(torch.Generator().manual_seed(7), 2000, True, 2.0, False)[1][:, :HUE].min() >= 0


def test_switches_off_is_the_identity():
    images = random_images(16, 9, 11, seed=8)
    out = color_and_blur(images, torch.Generator().manual_seed(0), False, 0.5, False)
    assert torch.equal(out, images)
    assert out.data_ptr() != images.data_ptr()


def test_strength_zero_only_grays():
    images = random_images(400, 4, 4, seed=9)
    out = color_and_blur(images, torch.Generator().manual_seed(0), True, 0.0, False)
    unchanged = (out == images).flatten(1).all(dim=1)
    grayed = torch.stack([pillow(image, gray=True) for image in images])
    assert ((out == grayed).flatten(1).all(dim=1) | unchanged).all()
    assert within_binomial(int((~unchanged).sum()), len(images), 0.2)


def test_unselected_images_are_untouched():
    images = random_images(6, 8, 8, seed=10)
    selected = torch.tensor([True, False, True, False, False, True])
    ops = torch.where(selected[:, None], torch.tensor([HUE, SATURATION, CONTRAST, BRIGHTNESS]), -1)
    factors = torch.tensor([[1.3, 0.7, 1.4, 0.1]] * 6, dtype=torch.float64)
    out = _apply_params(images, ops, factors, selected, selected.double() * 1.2)
    assert torch.equal(out[~selected], images[~selected])
    assert not (out[selected] == images[selected]).flatten(1).all(dim=1).any()


def test_color_and_blur_draws_then_applies_deterministically():
    images = random_images(32, 7, 13, seed=11)
    out = color_and_blur(images, torch.Generator().manual_seed(12), True, 0.5, True)
    assert torch.equal(out, color_and_blur(images, torch.Generator().manual_seed(12), True, 0.5, True))
    params = _draw_params(torch.Generator().manual_seed(12), len(images), True, 0.5, True)
    assert torch.equal(out, _apply_params(images, *params))
    assert not torch.equal(out, color_and_blur(images, torch.Generator().manual_seed(13), True, 0.5, True))
    # a channels-last (DALI-style) batch gives the same result
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, color_and_blur(channels_last, torch.Generator().manual_seed(12), True, 0.5, True))


def test_empty_and_single_odd_batches():
    empty = torch.zeros((0, 3, 5, 5), dtype=torch.uint8)
    out = color_and_blur(empty, torch.Generator(), True, 0.5, True)
    assert out.shape == empty.shape and out.dtype == torch.uint8
    image = random_images(1, 7, 13, seed=14)
    for seed in range(5):
        params = _draw_params(torch.Generator().manual_seed(seed), 1, True, 1.0, True)
        out = color_and_blur(image, torch.Generator().manual_seed(seed), True, 1.0, True)
        ops, factors, gray, radii = (p[0] for p in params)
        assert torch.equal(out[0], pillow(image[0], ops.tolist(), factors, bool(gray), float(radii)))


@pytest.mark.parametrize(
    "images, generator, strength, message",
    [
        (torch.zeros((2, 3, 4, 4)), torch.Generator(), 0.5, "uint8"),
        (torch.zeros((3, 4, 4), dtype=torch.uint8), torch.Generator(), 0.5, "shape"),
        (torch.zeros((2, 4, 4, 4), dtype=torch.uint8), torch.Generator(), 0.5, "shape"),
        (torch.zeros((2, 3, 4, 4), dtype=torch.uint8), types.SimpleNamespace(device=torch.device("cuda")), 0.5, "CPU torch.Generator"),
        (torch.zeros((2, 3, 4, 4), dtype=torch.uint8), torch.Generator(), -0.1, "strength"),
        (torch.zeros((2, 3, 4, 4), dtype=torch.uint8), torch.Generator(), float("nan"), "strength"),
    ],
)
def test_bad_inputs_raise(images, generator, strength, message):
    with pytest.raises(ValueError, match=message):
        color_and_blur(images, generator, True, strength, True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_synchronising():
    images = random_images(64, 31, 17, seed=15)
    expected = color_and_blur(images, torch.Generator().manual_seed(16), True, 0.8, True)
    on_device = images.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = color_and_blur(on_device, torch.Generator().manual_seed(16), True, 0.8, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.device.type == "cuda" and torch.equal(out.cpu(), expected)
