"""fastjepa.finetune.augment against plain per-image references, Pillow (what timm runs) and,
where it is installed, torchvision.

Tolerances: every op equals Pillow, given the same parameters, bit for bit, and the point
ops and enhancements also equal a per-image reference written from their definitions. Against
Image.rotate (which rounds its matrix to 15 digits), torchvision and the identity: see
assert_close_to and test_against_torchvision. Mixup/cutmix and random erasing equal a loop over images of the same draw exactly.
"""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from fastjepa.finetune.augment import (
    _APPLY,
    DEFAULT_OPS,
    FILL,
    INCREASING_OPS,
    FinetuneAugment,
    Mixup,
    RandAugment,
    RandomErasing,
    _op_params,
    rand_augment_from_config,
)

SIZES = [(4, 17, 23), (1, 32, 32), (0, 8, 8)]
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def random_images(batch, height, width, seed=0):
    """Noise, and every other image quantised to 4 levels (flat regions, ties, few levels),
    the last one constant in its green channel (a channel with one level)."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (batch, 3, height, width), dtype=np.uint8))
    images[1::2] = images[1::2] // 64 * 85
    if batch:
        images[-1, 1] = 77
    return images


def params_for(name, fraction, sign, height, width, batch):
    """The op's parameters at one magnitude for every image of the batch, as RandAugment makes them."""
    return _op_params(name, torch.full((batch,), fraction, dtype=torch.float64), torch.full((batch,), sign, dtype=torch.float64), height, width)


def to_pil(image):
    return Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")


def from_pil(img):
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def pillow(name, image, param):
    """timm's op on one (3, H, W) uint8 image through Pillow, with RandAugment's parameters."""
    img, arg = to_pil(image), float(param[0])
    if name.startswith("Posterize"):  # Pillow 13 refuses 0 bits, which older Pillows (and timm) turn black
        return from_pil(ImageOps.posterize(img, int(arg))) if arg else torch.zeros_like(image)
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return from_pil(ImageOps.solarize(img, int(arg)))
    if name == "SolarizeAdd":
        return from_pil(img.point([min(255, i + int(arg)) if i < 128 else i for i in range(256)] * 3))
    enhancers = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast, "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}
    if name.replace("Increasing", "") in enhancers:
        return from_pil(enhancers[name.replace("Increasing", "")](img).enhance(arg))
    if name in GEOMETRIC:
        matrix = tuple(float(p) for p in param)
        return from_pil(img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=FILL))
    return from_pil({"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize, "Invert": ImageOps.invert}[name](img))


# --- plain per-image references, from the ops' definitions ----------------------------------


def reference_lut_op(name, image, arg):
    """One image, channel by channel, level by level."""
    out = torch.empty_like(image)
    for c in range(3):
        channel = image[c].long()
        hist = torch.bincount(channel.flatten(), minlength=256).tolist()
        lut = list(range(256))
        if name == "AutoContrast":
            low, high = int(channel.min()), int(channel.max())
            if high > low:
                scale = 255.0 / (high - low)
                lut = [min(255, max(0, int(i * scale - low * scale))) for i in range(256)]
        elif name == "Equalize":
            present = [h for h in hist if h]
            step = (sum(present) - present[-1]) // 255
            if step:
                below = 0
                for i in range(256):
                    lut[i] = min(255, (step // 2 + below) // step)
                    below += hist[i]
        elif name == "Invert":
            lut = [255 - i for i in range(256)]
        elif name.startswith("Posterize"):
            lut = [i - i % 2 ** (8 - int(arg)) for i in range(256)]
        elif name == "SolarizeAdd":
            lut = [min(255, i + int(arg)) if i < 128 else i for i in range(256)]
        else:  # Solarize
            lut = [i if i < arg else 255 - i for i in range(256)]
        out[c] = torch.tensor(lut, dtype=torch.uint8)[channel]
    return out


def reference_enhance(name, image, factor):
    """ImageEnhance's blend with its degenerate image, in float32, truncated."""
    x = image.float()
    luma = torch.floor((x[0] * 19595 + x[1] * 38470 + x[2] * 7471 + 32768) / 65536)
    base = name.replace("Increasing", "")
    if base == "Color":
        degenerate = luma.expand_as(x)
    elif base == "Contrast":
        degenerate = torch.full_like(x, math.floor(luma.double().mean().item() + 0.5))
    elif base == "Brightness":
        degenerate = torch.zeros_like(x)
    else:  # Sharpness: SMOOTH inside, the border kept
        degenerate = x.clone()
        for y in range(1, x.shape[1] - 1):
            for col in range(1, x.shape[2] - 1):
                window = x[:, y - 1 : y + 2, col - 1 : col + 2].sum(dim=(1, 2)) + 4 * x[:, y, col]
                degenerate[:, y, col] = torch.floor((window + 6) / 13)
    f = torch.tensor(factor, dtype=torch.float32)
    return torch.floor(degenerate + f * (x - degenerate)).clamp(0, 255).to(torch.uint8)


POINT_CASES = [
    ("AutoContrast", 0.0),
    ("Equalize", 0.0),
    ("Invert", 0.0),
    ("Posterize", 0.5),
    ("PosterizeIncreasing", 0.0),
    ("PosterizeIncreasing", 1.0),
    ("Solarize", 0.3),
    ("SolarizeIncreasing", 0.9),
    ("SolarizeIncreasing", 0.0),
    ("SolarizeAdd", 0.9),
]
ENHANCERS = ("Color", "Contrast", "Brightness", "Sharpness")
ENHANCE_CASES = [(name, fraction, 1.0) for name in ENHANCERS for fraction in (0.9, 0.3)] + [
    (name + "Increasing", fraction, sign) for name in ENHANCERS for fraction, sign in [(0.9, 1.0), (0.9, -1.0), (1.0, -1.0)]
]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name,fraction", POINT_CASES)
def test_point_ops_match_the_reference_and_pillow(name, fraction, size):
    images = random_images(*size)
    params = params_for(name, fraction, 1.0, size[1], size[2], size[0])
    out = _APPLY[name](images, params)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for image, result, param in zip(images, out, params):
        assert torch.equal(result, reference_lut_op(name, image, float(param[0])))
        assert torch.equal(result, pillow(name, image, param))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name,fraction,sign", ENHANCE_CASES)
def test_enhance_ops_match_the_reference_and_pillow(name, fraction, sign, size):
    images = random_images(*size, seed=1)
    params = params_for(name, fraction, sign, size[1], size[2], size[0])
    out = _APPLY[name](images, params)
    for image, result, param in zip(images, out, params):
        assert torch.equal(result, reference_enhance(name, image, float(param[0])))
        assert torch.equal(result, pillow(name, image, param))


def test_op_arguments_are_timms():
    """timm's *_level_to_arg at magnitude 9 (fraction 0.9)."""
    def arg(name, sign=1.0):
        return float(params_for(name, 0.9, sign, 10, 10, 1)[0, 0])

    assert arg("PosterizeIncreasing") == 4 - int(0.9 * 4) and arg("Posterize") == int(0.9 * 4)
    assert arg("SolarizeIncreasing") == 256 - int(0.9 * 256) and arg("Solarize") == int(0.9 * 256)
    assert arg("SolarizeAdd") == int(0.9 * 110)
    assert arg("Color") == pytest.approx(0.9 * 1.8 + 0.1)
    assert arg("ColorIncreasing") == pytest.approx(1.81) and arg("ColorIncreasing", -1.0) == pytest.approx(0.19)
    assert float(params_for("ContrastIncreasing", 1.0, -1.0, 10, 10, 1)[0, 0]) == pytest.approx(0.1)
    rotate = params_for("Rotate", 0.9, -1.0, 10, 20, 1)[0]
    theta = math.radians(27.0)  # Image.rotate(-27) samples the input at R(27)
    assert rotate[:2].tolist() == pytest.approx([math.cos(theta), math.sin(theta)])
    assert params_for("ShearX", 0.9, -1.0, 10, 20, 1)[0, 1] == pytest.approx(-0.27)
    assert params_for("TranslateXRel", 0.9, 1.0, 10, 20, 1)[0, 2] == pytest.approx(0.405 * 20)
    assert params_for("TranslateYRel", 0.9, 1.0, 10, 20, 1)[0, 5] == pytest.approx(0.405 * 10)


def assert_close_to(out, expected):
    """At most 2% of the elements differ, at most 0.5% by more than 1."""
    if out.numel() == 0:
        return
    diff = (out.int() - expected.int()).abs()
    assert (diff > 1).float().mean() <= 0.005, f"{(diff > 1).sum()} elements differ by more than 1"
    assert (diff > 0).float().mean() <= 0.02, f"{(diff > 0).sum()} elements differ"


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", GEOMETRIC)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_geometric_ops_match_pillow(name, sign, size):
    images = random_images(*size, seed=2)
    params = params_for(name, 0.87, sign, size[1], size[2], size[0])
    out = _APPLY[name](images, params)
    expected = torch.stack([pillow(name, image, param) for image, param in zip(images, params)]) if size[0] else out
    assert torch.equal(out, expected)
    if name == "Rotate" and size[0]:  # timm calls Image.rotate, which builds the same matrix
        rotated = torch.stack([from_pil(to_pil(image).rotate(26.1 * sign, resample=Image.BILINEAR, fillcolor=FILL)) for image in images])
        assert_close_to(out, rotated)
        assert (out != images).any()


def test_identity_affine_keeps_the_image():
    images = random_images(3, 17, 23)
    identity = torch.tensor([[1.0, 0, 0, 0, 1, 0]], dtype=torch.float64).expand(3, 6)
    assert torch.equal(_APPLY["ShearX"](images, identity), images)


@pytest.fixture
def tvf():
    return pytest.importorskip("torchvision.transforms.v2.functional", reason="torchvision is not installed: the cross-checks against it are skipped")


def test_against_torchvision(tvf):
    """torchvision's ops on the same images. Exact for posterize, solarize, invert,
    autocontrast and equalize; sharpness within 1 (torchvision rounds the blend, Pillow
    truncates); rotation within 1 away from the edges (torchvision rounds where Pillow
    truncates, and blends the fill by the sampled mask where Pillow cuts it)."""
    images = random_images(4, 32, 32, seed=3)

    def ours(name, fraction=0.9, sign=1.0):
        return _APPLY[name](images, params_for(name, fraction, sign, 32, 32, 4))

    assert torch.equal(ours("PosterizeIncreasing"), tvf.posterize(images, 4 - int(0.9 * 4)))
    assert torch.equal(ours("Solarize", 0.5), tvf.solarize(images, 128))
    assert torch.equal(ours("Invert"), tvf.invert(images))
    assert torch.equal(ours("AutoContrast"), tvf.autocontrast(images))
    assert torch.equal(ours("Equalize"), tvf.equalize(images))
    sharp = (ours("Sharpness", 0.9).int() - tvf.adjust_sharpness(images, 1.72).int()).abs()
    assert sharp.max() <= 1
    rotated = ours("Rotate", 0.5)  # 15 degrees counter-clockwise
    expected = tvf.rotate(images, 15.0, interpolation=tvf.InterpolationMode.BILINEAR, fill=list(FILL))
    assert (rotated.int() - expected.int()).abs()[:, :, 6:-6, 6:-6].max() <= 1


# --- RandAugment: the draw, the batching, the config string ---------------------------------


def redraw(augment, batch, seed):
    """The documented draws of RandAugment, re-made from an identically seeded generator."""
    g = torch.Generator().manual_seed(seed)
    ops = torch.randint(len(augment.ops), (batch, augment.num_ops), generator=g)
    u = torch.rand((batch, augment.num_ops, 3), generator=g, dtype=torch.float64)
    noise = torch.randn((batch, augment.num_ops), generator=g, dtype=torch.float64)
    return ops, u, noise


@pytest.mark.parametrize("size", SIZES)
def test_rand_augment_is_its_draw_applied_image_by_image(size):
    augment = rand_augment_from_config("rand-m9-mstd0.5-inc1")
    images = random_images(*size, seed=4)
    out = augment(images, torch.Generator().manual_seed(5))
    ops, u, noise = redraw(augment, size[0], 5)
    for i, image in enumerate(images):
        x = image[None]
        for slot in range(augment.num_ops):
            if u[i, slot, 0] <= 0.5:
                name = augment.ops[int(ops[i, slot])]
                fraction = float(min(max(9 + 0.5 * noise[i, slot], 0), 10)) / 10
                sign = -1.0 if u[i, slot, 1] > 0.5 else 1.0
                x = _APPLY[name](x, params_for(name, fraction, sign, size[1], size[2], 1))
        assert torch.equal(out[i], x[0])


def test_rand_augment_draws_ops_uniformly_and_applies_half():
    augment = rand_augment_from_config("rand-m9-mstd0.5-inc1")
    ops, u, _ = redraw(augment, 3000, 6)
    counts = torch.bincount(ops.flatten(), minlength=15)
    assert counts.min() > 6000 / 15 * 0.75 and counts.max() < 6000 / 15 * 1.25
    assert 0.45 < (u[..., 0] <= 0.5).double().mean() < 0.55
    images = random_images(64, 16, 16, seed=7)
    changed = (augment(images, torch.Generator().manual_seed(8)) != images).flatten(1).any(1).double().mean()
    assert 0.6 < changed < 0.9  # 1 - 0.5 ** 2 = 0.75 of the images see at least one op (a few ops can leave an image as it is)


def test_rand_augment_is_deterministic_and_leaves_its_input_alone():
    augment = rand_augment_from_config("rand-m9-mstd0.5-inc1")
    images = random_images(8, 17, 23, seed=9)
    before = images.clone()
    a = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, augment(images, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, augment(images, torch.Generator().manual_seed(2)))
    assert torch.equal(images, before)


def test_config_strings():
    assert rand_augment_from_config("rand-m9-mstd0.5-inc1") == RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5, increasing=True)
    assert rand_augment_from_config("rand-n3-m7") == RandAugment(num_ops=3, magnitude=7)
    assert rand_augment_from_config("rand-mstd101").magnitude_std == math.inf
    assert rand_augment_from_config("rand-inc0").ops == DEFAULT_OPS and rand_augment_from_config("rand-inc1").ops == INCREASING_OPS
    assert rand_augment_from_config(None) is None and rand_augment_from_config("") is None
    for bad, message in [
        ("augmix-m9", "must start with 'rand'"),
        ("rand-m9-w0", "unsupported section 'w0'"),
        ("rand-m", "malformed section 'm'"),
        ("rand-mstd0.5x", "bad number in section 'mstd0.5x'"),
        ("rand-m9.5", "bad number"),
    ]:
        with pytest.raises(ValueError, match=message):
            rand_augment_from_config(bad)


def test_magnitude_noise_uniform_when_mstd_is_inf():
    augment = RandAugment(num_ops=1, magnitude=9, magnitude_std=math.inf)
    images = random_images(2, 8, 8)
    assert torch.equal(augment(images, torch.Generator().manual_seed(0)), augment(images, torch.Generator().manual_seed(0)))


# --- Mixup / CutMix --------------------------------------------------------------------------


def smooth_onehot(labels, num_classes, smoothing):
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off).scatter_(1, labels[:, None], 1 - smoothing + off)


def centred_box(cy, cx, lam, height, width):
    """timm's rand_bbox around (cy, cx): sides int(side * sqrt(1 - lam)), halved, clipped."""
    half_h, half_w = int(height * math.sqrt(1 - lam)) // 2, int(width * math.sqrt(1 - lam)) // 2
    return (min(max(cy - half_h, 0), height), min(cy + half_h, height), min(max(cx - half_w, 0), width), min(cx + half_w, width))


def reference_box(rng, lam, height, width, minmax):
    """timm's cutmix_bbox_and_lam for one image, drawing one value at a time."""
    if minmax is not None:
        cut_h, cut_w = int(rng.integers(int(height * minmax[0]), int(height * minmax[1]))), int(rng.integers(int(width * minmax[0]), int(width * minmax[1])))
        top, left = int(rng.integers(0, height - cut_h)), int(rng.integers(0, width - cut_w))
        box = (top, top + cut_h, left, left + cut_w)
    else:
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        box = centred_box(cy, cx, lam, height, width)
    return box, 1 - (box[1] - box[0]) * (box[3] - box[2]) / (height * width)


def reference_mixup(mixup, images, labels, seed):
    """timm's Mixup, image by image, on the documented draw of an identically seeded generator."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(int(torch.randint(2**63 - 1, (), generator=g)))
    batch, _, height, width = images.shape
    both = mixup.mixup_alpha > 0 and mixup.cutmix_on
    cut_alpha = 1.0 if mixup.cutmix_minmax is not None else mixup.cutmix_alpha
    if mixup.mode == "batch":
        lam, cutmix = 1.0, False
        if rng.random() < mixup.prob:
            cutmix = bool(rng.random() < mixup.switch_prob) if both else mixup.cutmix_on
            alpha = cut_alpha if cutmix else mixup.mixup_alpha
            lam = float(rng.beta(alpha, alpha))
        box = None
        if cutmix:
            box, lam = reference_box(rng, lam, height, width, mixup.cutmix_minmax)
        lams, cutmixes, boxes = [lam] * batch, [cutmix] * batch, [box] * batch
    else:
        n = batch if mixup.mode == "elem" else batch // 2
        if both:
            cutmixes = list(rng.random(n) < mixup.switch_prob)
            from_cut, from_mix = rng.beta(cut_alpha, cut_alpha, n), rng.beta(mixup.mixup_alpha, mixup.mixup_alpha, n)
            lams = [float(from_cut[i] if cutmixes[i] else from_mix[i]) for i in range(n)]
        else:
            cutmixes = [mixup.cutmix_on] * n
            alpha = cut_alpha if mixup.cutmix_on else mixup.mixup_alpha
            lams = [float(v) for v in rng.beta(alpha, alpha, n)]
        mixes = rng.random(n) < mixup.prob
        lams = [lams[i] if mixes[i] else 1.0 for i in range(n)]
        cutmixes = [bool(cutmixes[i]) and lams[i] != 1 for i in range(n)]
        # the boxes of all n, drawn vectorised: re-draw each image's from the same arrays
        if mixup.cutmix_minmax is not None:
            lo, hi = mixup.cutmix_minmax
            cut_h, cut_w = rng.integers(int(height * lo), int(height * hi), n), rng.integers(int(width * lo), int(width * hi), n)
            tops, lefts = rng.integers(0, height - cut_h), rng.integers(0, width - cut_w)
            drawn = [(int(tops[i]), int(tops[i] + cut_h[i]), int(lefts[i]), int(lefts[i] + cut_w[i])) for i in range(n)]
        else:
            cys, cxs = rng.integers(0, height, n), rng.integers(0, width, n)
            drawn = [centred_box(int(cys[i]), int(cxs[i]), lams[i], height, width) for i in range(n)]
        boxes = [drawn[i] if cutmixes[i] else None for i in range(n)]
        lams = [1 - (b[1] - b[0]) * (b[3] - b[2]) / (height * width) if b else lam for b, lam in zip(boxes, lams)]
        if mixup.mode == "pair":
            lams, cutmixes, boxes = lams + lams[::-1], cutmixes + cutmixes[::-1], boxes + boxes[::-1]
    out = images.clone()
    for i in range(batch):
        j = batch - 1 - i
        if cutmixes[i]:
            top, bottom, left, right = boxes[i]
            out[i, :, top:bottom, left:right] = images[j, :, top:bottom, left:right]
        elif lams[i] != 1:
            lam = torch.tensor(lams[i], dtype=images.dtype)
            out[i] = images[i] * lam + images[j] * (1 - lam)
    onehot = smooth_onehot(labels, mixup.num_classes, mixup.label_smoothing)
    lam = torch.tensor(lams, dtype=torch.float32)[:, None]
    return out, onehot * lam + onehot.flip(0) * (1 - lam), lams, boxes


MIXUPS = [
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1),
    dict(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1),
    dict(mixup_alpha=0.0, cutmix_alpha=1.0),
    dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8), prob=0.7),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5, switch_prob=0.7),
]


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
@pytest.mark.parametrize("options", MIXUPS)
def test_mixup_matches_the_reference_of_its_draw(mode, options, poisoned_empty):
    images = torch.randn(8, 3, 17, 23)
    labels = torch.tensor([0, 3, 5, 9, 9, 1, 2, 7])
    mixup = Mixup(num_classes=10, mode=mode, **options)
    for seed in range(6):
        out, targets = mixup(images, labels, torch.Generator().manual_seed(seed))
        expected, expected_targets, lams, boxes = reference_mixup(mixup, images, labels, seed)
        assert torch.equal(out, expected)
        assert torch.equal(targets, expected_targets)
        assert targets.dtype == torch.float32 and targets.shape == (8, 10)
        assert torch.allclose(targets.sum(1), torch.ones(8), atol=1e-6)
        for i, box in enumerate(boxes):
            if box:  # the corrected lam is the share of the image left: the pasted box's area
                pasted = (out[i] != images[i]).any(0)
                assert 1 - pasted.double().mean() == pytest.approx(lams[i])


def test_mixup_draws_vary_and_repeat():
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8)
    mixup = Mixup(num_classes=8, mixup_alpha=0.8, cutmix_alpha=1.0, mode="elem")
    a = mixup(images, labels, torch.Generator().manual_seed(0))
    b = mixup(images, labels, torch.Generator().manual_seed(0))
    c = mixup(images, labels, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("options", [dict(mixup_alpha=0.0, cutmix_alpha=0.0), dict(mixup_alpha=0.8, prob=0.0)])
def test_label_smoothing_alone(options):
    images, labels = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    mixup = Mixup(num_classes=5, label_smoothing=0.1, **options)
    out, targets = mixup(images, labels, torch.Generator().manual_seed(0))
    assert torch.equal(out, images) and out.data_ptr() != images.data_ptr()
    assert torch.allclose(targets, torch.full((5, 5), 0.02) + 0.9 * torch.eye(5))
    assert torch.allclose(targets.sum(1), torch.ones(5), atol=1e-6)


@pytest.mark.parametrize("mode", ["batch", "pair", "elem"])
def test_mixup_refuses_an_odd_batch(mode):
    with pytest.raises(ValueError, match="even batch size"):
        Mixup(num_classes=4, mode=mode)(torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]), torch.Generator())


def test_mixup_bad_arguments():
    g = torch.Generator()
    for kwargs, message in [
        (dict(num_classes=1), "num_classes must be >= 2"),
        (dict(num_classes=4, mode="half"), "mode must be"),
        (dict(num_classes=4, label_smoothing=1.0), "label_smoothing"),
        (dict(num_classes=4, cutmix_minmax=(0.8, 0.2)), "cutmix_minmax"),
        (dict(num_classes=4, prob=1.5), "prob"),
    ]:
        with pytest.raises(ValueError, match=message):
            Mixup(**kwargs)
    mixup = Mixup(num_classes=4)
    with pytest.raises(ValueError, match="labels must be in"):
        mixup(torch.randn(2, 3, 8, 8), torch.tensor([0, 4]), g)
    with pytest.raises(ValueError, match="labels must be int64"):
        mixup(torch.randn(2, 3, 8, 8), torch.tensor([0, 1], dtype=torch.int32), g)
    with pytest.raises(ValueError, match="floating point"):
        mixup(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]), g)


# --- Random erasing ---------------------------------------------------------------------------


def reference_erasing(erasing, images, seed):
    """timm's RandomErasing image by image, attempt by attempt, on the documented draw."""
    g = torch.Generator().manual_seed(seed)
    batch, channels, height, width = images.shape
    u = torch.rand((batch, 41), generator=g, dtype=torch.float64).tolist()
    log_low, log_high = math.log(erasing.min_aspect), math.log(erasing.max_aspect or 1 / erasing.min_aspect)
    boxes = []
    for i in range(batch):
        box = None
        if u[i][0] < erasing.probability:
            for attempt in range(10):
                ua, ur, ut, ul = u[i][1 + 4 * attempt : 5 + 4 * attempt]
                area = (erasing.min_area + (erasing.max_area - erasing.min_area) * ua) * height * width
                aspect = math.exp(log_low + (log_high - log_low) * ur)
                h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
                if w < width and h < height:
                    box = (int(ut * (height - h + 1)), h, int(ul * (width - w + 1)), w)
                    break
        boxes.append(box)
    out = images.clone()
    if erasing.mode == "rand":
        colors = torch.randn((batch, channels), generator=g)
    elif erasing.mode == "pixel":
        noise = torch.randn(sum(channels * b[1] * b[3] for b in boxes if b), generator=g)
    used = 0
    for i, box in enumerate(boxes):
        if box:
            top, h, left, w = box
            if erasing.mode == "pixel":
                out[i, :, top : top + h, left : left + w] = noise[used : used + channels * h * w].view(channels, h, w)
                used += channels * h * w
            else:
                out[i, :, top : top + h, left : left + w] = colors[i].view(channels, 1, 1) if erasing.mode == "rand" else 0.0
    return out, boxes


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
@pytest.mark.parametrize("size", [(16, 17, 23), (1, 32, 32), (0, 8, 8), (6, 3, 4)])
def test_random_erasing_matches_the_reference_of_its_draw(mode, size, poisoned_empty):
    images = torch.randn(size[0], 3, size[1], size[2])
    erasing = RandomErasing(probability=0.5, mode=mode)
    out = erasing(images, torch.Generator().manual_seed(3))
    expected, boxes = reference_erasing(erasing, images, 3)
    assert torch.equal(out, expected)
    for i, box in enumerate(boxes):
        changed = (out[i] != images[i]).any(0)
        if box is None:
            assert not changed.any()  # bit-identical
        else:
            assert changed.double().mean() <= 1 / 3 + 1e-9
            if mode != "const" and size[1] > 10:
                assert changed.double().mean() >= 0.02 * 0.7  # the rounded box's area, from at least min_area's


def test_random_erasing_probabilities():
    images = torch.randn(64, 3, 24, 24)
    untouched = RandomErasing(probability=0.0)(images, torch.Generator().manual_seed(0))
    assert torch.equal(untouched, images)
    erased = RandomErasing(probability=1.0)(images, torch.Generator().manual_seed(0))
    _, boxes = reference_erasing(RandomErasing(probability=1.0), images, 0)
    assert all(box is not None for box in boxes)  # a 24x24 image always fits a box within 10 attempts here
    assert (erased != images).flatten(1).any(1).all()
    fraction = (erased != images).double().mean()
    assert 0.1 < fraction < 0.25  # mean area (0.02 + 1/3) / 2


def test_random_erasing_bad_arguments():
    for kwargs in [dict(probability=1.5), dict(mode="zero"), dict(min_area=0.5, max_area=0.1), dict(min_aspect=0.0)]:
        with pytest.raises(ValueError, match="RandomErasing"):
            RandomErasing(**kwargs)


# --- The composition -------------------------------------------------------------------------


def full_augment(mode="batch"):
    return FinetuneAugment(
        mixup=Mixup(num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, mode=mode),
        rand_augment=rand_augment_from_config("rand-m9-mstd0.5-inc1"),
        random_erasing=RandomErasing(probability=0.25),
    )


def test_finetune_augment_is_its_parts_in_mae_order():
    from fastjepa.data.normalize import normalize

    augment = full_augment()
    images, labels = random_images(8, 17, 23), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    out, targets = augment(images, labels, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    x = augment.random_erasing(normalize(augment.rand_augment(images, g)), g)
    expected, expected_targets = augment.mixup(x, labels, g)
    assert torch.equal(out, expected) and torch.equal(targets, expected_targets)
    assert out.dtype == torch.float32 and targets.shape == (8, 10)
    assert torch.equal(out, augment(images, labels, torch.Generator().manual_seed(11))[0])
    assert not torch.equal(out, augment(images, labels, torch.Generator().manual_seed(12))[0])


@pytest.mark.parametrize("batch", [0, 2])
def test_finetune_augment_small_batches(batch):
    out, targets = full_augment("elem")(random_images(batch, 9, 7), torch.arange(batch), torch.Generator())
    assert out.shape == (batch, 3, 9, 7) and targets.shape == (batch, 10)


def test_bad_images():
    g = torch.Generator()
    bad = [(torch.zeros(2, 3, 8, 8), "uint8"), (torch.zeros(3, 8, 8, dtype=torch.uint8), "shape"), (torch.zeros(2, 1, 8, 8, dtype=torch.uint8), "shape")]
    for images, message in bad:
        with pytest.raises(ValueError, match=message):
            full_augment()(images, torch.tensor([0, 1]), g)
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        RandAugment()(random_images(2, 8, 8), None)


class SyncRecorder(torch.overrides.TorchFunctionMode):
    """Records the calls that would read a tensor derived from the images back to the host:
    the images are tainted, and so is every output of a call with a tainted input."""

    SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__int__, torch.Tensor.__float__}

    def __init__(self, tainted):
        super().__init__()
        self.tainted = torch.utils.weak.WeakIdKeyDictionary({t: True for t in tainted})
        self.syncs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tainted = any(t in self.tainted for t in inputs)
        if tainted and func in self.SYNCS:
            self.syncs.append(func.__name__)
        out = func(*args, **kwargs)
        if tainted:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.tainted[t] = True
        return out


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_no_reads_of_image_data_to_the_host(mode):
    images = random_images(8, 17, 23)
    augment = FinetuneAugment(
        mixup=Mixup(num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, mode=mode),
        rand_augment=RandAugment(num_ops=6, magnitude=9, magnitude_std=0.5, increasing=True),  # many ops: most run
        random_erasing=RandomErasing(probability=1.0),
    )
    with SyncRecorder([images]) as recorder:
        augment(images, torch.arange(8), torch.Generator().manual_seed(0))
    assert recorder.syncs == []
    with SyncRecorder([images]) as recorder:  # the recorder sees a read when there is one
        images.float().mean().item()
    assert recorder.syncs == ["item"]
