"""fastjepa.transforms: the reference's make_transforms and GaussianBlur, with and without torchvision."""

import importlib
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import fastjepa.transforms as transforms
from fastjepa.data.images import default_photos_dir, load_rgb
from fastjepa.data.images import make_transforms as make_uint8_transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SWITCHES = ("horizontal_flip", "color_distortion", "gaussian_blur")


@pytest.fixture(scope="module")
def photos():
    folder = default_photos_dir()
    return [load_rgb(os.path.join(folder, name)).resize((96, 72)) for name in sorted(os.listdir(folder))[:4]]


def torchvision_imports() -> bool:
    try:
        importlib.import_module("torchvision.transforms")
    except Exception:
        return False
    return True


def test_uses_torchvision_says_whether_torchvision_imports():
    assert transforms.USES_TORCHVISION == torchvision_imports()
    assert (transforms.TORCHVISION_PROBLEM is None) == transforms.USES_TORCHVISION


def test_without_torchvision_make_transforms_is_the_native_transform():
    if transforms.USES_TORCHVISION:
        pytest.skip("torchvision imports here: make_transforms is torchvision's Compose")
    transform = transforms.make_transforms(crop_size=32, horizontal_flip=True)
    assert isinstance(transform, transforms.NativeTransform)
    assert "horizontal_flip=True" in repr(transform)
    with pytest.raises(ImportError, match="torchvision is not importable"):
        transforms.make_torchvision_transforms()


@pytest.mark.parametrize("switches", [(), SWITCHES, ("color_distortion",)])
def test_native_transform_is_the_uint8_transform_normalised_with_global_draws(photos, switches):
    settings = {name: name in switches for name in SWITCHES}
    transform = transforms.NativeTransform(crop_size=40, crop_scale=(0.4, 1.0), color_jitter=0.7, **settings)
    uint8_transform = make_uint8_transforms(40, (0.4, 1.0), use_horizontal_flip=settings["horizontal_flip"],
                                            use_color_distortion=settings["color_distortion"], color_jitter_strength=0.7,
                                            use_gaussian_blur=settings["gaussian_blur"])
    torch.manual_seed(11)
    got = [transform(img) for img in photos]
    g = torch.Generator().manual_seed(11)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    expected = [(uint8_transform(img, g).float() / 255 - mean) / std for img in photos]
    for x, y in zip(got, expected):
        assert x.shape == (3, 40, 40) and x.dtype == torch.float32
        assert torch.equal(x, y)
    low, high = (0 - mean) / std, (1 - mean) / std
    assert all(bool(((x >= low - 1e-6) & (x <= high + 1e-6)).all()) for x in got)
    assert torch.equal(torch.get_rng_state(), g.get_state())  # the same draws, from the global generator


def test_native_transform_is_repeatable_under_manual_seed(photos):
    transform = transforms.NativeTransform(crop_size=32, horizontal_flip=True, color_distortion=True, gaussian_blur=True)

    def draw(seed):
        torch.manual_seed(seed)
        return torch.stack([transform(img) for img in photos])

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def test_native_transform_pickles(photos):
    transform = transforms.NativeTransform(crop_size=24, crop_scale=[0.5, 1.0], color_distortion=True, color_jitter=0.5)
    copy = pickle.loads(pickle.dumps(transform))
    assert repr(copy) == repr(transform)
    torch.manual_seed(1)
    first = transform(photos[0])
    torch.manual_seed(1)
    assert torch.equal(copy(photos[0]), first)


@pytest.mark.parametrize("change", [dict(horizontal_flip=True), dict(color_distortion=True), dict(gaussian_blur=True), dict(crop_scale=(0.1, 0.2)),
                                    dict(normalization=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))])
def test_each_setting_of_the_native_transform_changes_the_output(photos, change):
    def draw(**settings):
        transform = transforms.NativeTransform(crop_size=32, **settings)
        torch.manual_seed(5)
        return torch.stack([transform(img) for img in photos for _ in range(3)])

    assert not torch.equal(draw(), draw(**change))


def test_colour_jitter_strength_matters_only_with_colour_distortion(photos):
    def draw(**settings):
        transform = transforms.NativeTransform(crop_size=32, **settings)
        torch.manual_seed(2)
        return torch.stack([transform(img) for img in photos for _ in range(3)])

    assert not torch.equal(draw(color_distortion=True, color_jitter=1.0), draw(color_distortion=True, color_jitter=0.3))
    assert torch.equal(draw(color_jitter=1.0), draw(color_jitter=-1.0))  # unused, like the reference
    with pytest.raises(ValueError, match="normalization std"):
        transforms.NativeTransform(normalization=(MEAN, (0.2, 0.0, 0.2)))


def test_gaussian_blur_draws_from_the_global_rng(photos):
    img = photos[0]
    blur = transforms.GaussianBlur(p=0.5)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    blur(img)
    assert not torch.equal(before, torch.get_rng_state())

    torch.manual_seed(9)
    out = transforms.GaussianBlur(p=1.0, radius_min=0.5, radius_max=1.5)(img)
    torch.manual_seed(9)
    assert torch.bernoulli(torch.tensor(1.0)) == 1
    radius = 0.5 + torch.rand(1) * (1.5 - 0.5)
    assert np.array_equal(np.asarray(out), np.asarray(img.filter(ImageFilter.GaussianBlur(radius=float(radius)))))
    assert not np.array_equal(np.asarray(out), np.asarray(img))


def test_gaussian_blur_with_p_0_returns_the_image_itself(photos):
    img = photos[1]
    torch.manual_seed(0)
    assert all(transforms.GaussianBlur(p=0.0)(img) is img for _ in range(10))
    assert isinstance(transforms.GaussianBlur(p=1.0)(img), Image.Image)
    assert "p=0.5" in repr(transforms.GaussianBlur())


def test_with_torchvision_make_transforms_is_the_references_compose():
    pytest.importorskip("torchvision", reason="the Compose path needs torchvision (a CUDA/CPU build matching torch)")
    tv = pytest.importorskip("torchvision.transforms", reason="torchvision.transforms does not import here")
    assert transforms.USES_TORCHVISION
    plain = transforms.make_transforms()
    assert isinstance(plain, tv.Compose)
    crop, to_tensor, normalize = plain.transforms
    assert isinstance(crop, tv.RandomResizedCrop) and crop.size == (224, 224) and crop.scale == (0.3, 1.0)
    assert isinstance(to_tensor, tv.ToTensor) and isinstance(normalize, tv.Normalize)
    assert tuple(normalize.mean) == MEAN and tuple(normalize.std) == STD

    full = transforms.make_transforms(crop_size=96, crop_scale=(0.5, 1.0), color_jitter=0.5, horizontal_flip=True, color_distortion=True,
                                      gaussian_blur=True, normalization=((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
    crop, flip, distortion, blur, to_tensor, normalize = full.transforms
    assert crop.size == (96, 96) and crop.scale == (0.5, 1.0)
    assert isinstance(flip, tv.RandomHorizontalFlip) and flip.p == 0.5
    jitter_step, gray = distortion.transforms
    assert isinstance(jitter_step, tv.RandomApply) and jitter_step.p == 0.8 and isinstance(gray, tv.RandomGrayscale) and gray.p == 0.2
    (jitter,) = jitter_step.transforms
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.6, 1.4)) and jitter.hue == pytest.approx((-0.1, 0.1))
    assert isinstance(blur, transforms.GaussianBlur) and blur.prob == 0.5 and (blur.radius_min, blur.radius_max) == (0.1, 2.0)
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.2, 0.2, 0.2)
    img = load_rgb(os.path.join(default_photos_dir(), sorted(os.listdir(default_photos_dir()))[0]))
    torch.manual_seed(0)
    out = full(img)
    assert out.shape == (3, 96, 96) and out.dtype == torch.float32
