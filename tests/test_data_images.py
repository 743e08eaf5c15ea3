import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastjepa.data import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    SeededSampler,
    collate_images,
    default_photos_dir,
    list_images,
    load_rgb,
    make_eval_transform,
    make_transforms,
)
from fastjepa.data.images import random_resized_crop_box, random_resized_crop_boxes

SHIPPED_PHOTOS = 12


def save(path, size=(8, 6), mode="RGB", color=(10, 20, 30), **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color).save(path, **kwargs)
    return str(path)


def touch(path, content=b"not an image"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return str(path)


def noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def coordinate_image(width, height):
    """Red = x, green = y (both < 256), so a crop's values reveal its box."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------- listing


def test_flat_folder_is_one_class_and_non_images_are_skipped(tmp_path):
    save(tmp_path / "b.PNG", format="PNG")
    save(tmp_path / "a.jpg")
    touch(tmp_path / "notes.txt")
    listing = list_images(tmp_path)
    assert listing.paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b.PNG")]
    assert listing.labels == [0, 0] and listing.classes == ["."]
    assert listing.skipped == [str(tmp_path / "notes.txt")]


def test_class_subfolders_nested_sorted_and_root_images(tmp_path):
    save(tmp_path / "dog" / "x.png")
    save(tmp_path / "cat" / "sub" / "deep" / "2.jpg")
    save(tmp_path / "cat" / "1.jpeg")
    save(tmp_path / "top.gif")
    touch(tmp_path / "empty" / "readme.md")  # holds no image: not a class
    touch(tmp_path / "cat" / "labels.csv")
    listing = list_images(tmp_path)
    assert listing.classes == [".", "cat", "dog"]
    rel = [os.path.relpath(p, tmp_path) for p in listing.paths]
    assert rel == ["top.gif", os.path.join("cat", "1.jpeg"), os.path.join("cat", "sub", "deep", "2.jpg"), os.path.join("dog", "x.png")]
    assert listing.labels == [0, 1, 1, 2]
    assert [os.path.relpath(p, tmp_path) for p in listing.skipped] == [os.path.join("cat", "labels.csv"), os.path.join("empty", "readme.md")]
    again = list_images(tmp_path)  # deterministic
    assert (again.paths, again.labels, again.classes, again.skipped) == (listing.paths, listing.labels, listing.classes, listing.skipped)


def test_class_folders_only_label_like_imagefolder(tmp_path):
    for name in ["zebra", "ant", "Moose"]:
        save(tmp_path / name / "img.jpg")
    listing = list_images(tmp_path)
    assert listing.classes == ["Moose", "ant", "zebra"] and listing.labels == [0, 1, 2]


def test_every_extension_any_case(tmp_path):
    for i, ext in enumerate(IMAGE_EXTENSIONS):
        touch(tmp_path / f"{i}{ext.upper() if i % 2 else ext}")
    assert len(list_images(tmp_path).paths) == len(IMAGE_EXTENSIONS)


def test_empty_and_missing_folders_raise_naming_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"empty dataset.*" + str(tmp_path) + r".*\.jpg"):
        list_images(tmp_path)
    touch(tmp_path / "only.txt")
    with pytest.raises(ValueError, match="empty dataset"):
        ImageDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    with pytest.raises(NotADirectoryError, match="only.txt"):
        list_images(tmp_path / "only.txt")


# --------------------------------------------------------------------------- embedded photos


def test_embedded_photos_decode_and_are_attributed():
    root = default_photos_dir()
    listing = list_images(root)
    assert len(listing.paths) == SHIPPED_PHOTOS and listing.classes == ["."]
    assert listing.skipped == []
    with open(os.path.join(os.path.dirname(root), "PHOTOS.md"), encoding="utf-8") as f:
        rows = [line for line in f if line.startswith("| skimage_")]
    assert len(rows) == SHIPPED_PHOTOS
    total = 0
    for path in listing.paths:
        name = os.path.basename(path)
        assert any(row.startswith(f"| {name} |") for row in rows), f"{name} is not in PHOTOS.md"
        img = load_rgb(path)
        assert img.mode == "RGB" and min(img.size) == 160
        total += os.path.getsize(path)
    assert total < 1.5e6


# ------------------------------------------------------------------------------- transforms

ALL_AUGMENTATIONS = dict(use_horizontal_flip=True, use_color_distortion=True, color_jitter_strength=0.5, use_gaussian_blur=True)


@pytest.mark.parametrize("size", [(37, 91), (500, 20), (20, 500), (1, 1)])
def test_output_shape_and_dtype_for_odd_sizes(size):
    img = noise_image(*size)
    out = make_transforms(24, **ALL_AUGMENTATIONS)(img, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)
    out = make_eval_transform(24)(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)


def test_same_seed_same_output_different_seeds_differ():
    transform, img = make_transforms(32, **ALL_AUGMENTATIONS), noise_image(90, 70)
    a = transform(img, torch.Generator().manual_seed(7))
    assert torch.equal(a, transform(img, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, transform(img, torch.Generator().manual_seed(8)))


def test_crop_boxes_follow_scale_and_ratio():
    width, height, crop = 240, 180, 32
    transform, img = make_transforms(crop, crop_scale=(0.3, 1.0)), coordinate_image(width, height)
    fractions = []
    for seed in range(200):
        left, top, w, h = random_resized_crop_box(width, height, torch.Generator().manual_seed(seed), (0.3, 1.0))
        fraction = w * h / (width * height)
        assert 0.3 - 0.02 <= fraction <= 1.0 and 0.74 <= w / h <= 1.35
        fractions.append(fraction)
        if seed < 40:  # the transform crops that box: recover it from the coordinates
            out = transform(img, torch.Generator().manual_seed(seed)).double()
            xs, ys = out[0, crop // 2], out[1, :, crop // 2]
            w_seen, h_seen = (xs[-1] - xs[0]) * crop / (crop - 1), (ys[-1] - ys[0]) * crop / (crop - 1)
            assert abs(xs.mean() - (left + (w - 1) / 2)) <= 1.5 and abs(ys.mean() - (top + (h - 1) / 2)) <= 1.5
            assert abs(w_seen - w) <= 0.06 * w + 2 and abs(h_seen - h) <= 0.06 * h + 2
    assert min(fractions) < 0.4 and max(fractions) > 0.9
    # the area is uniform in [0.3, 1] but large areas miss (w > W) more often and are redrawn
    assert 0.47 < float(np.median(fractions)) < 0.6

    # a narrower scale range narrows the crops
    for seed in range(50):
        _, _, w, h = random_resized_crop_box(width, height, torch.Generator().manual_seed(seed), (0.5, 0.6))
        assert 0.48 <= w * h / (width * height) <= 0.62


def test_impossible_crop_falls_back_to_a_central_crop_with_clamped_ratio():
    g = torch.Generator().manual_seed(0)
    assert random_resized_crop_box(500, 20, g, (0.3, 1.0)) == ((500 - 27) // 2, 0, 27, 20)
    assert random_resized_crop_box(20, 500, g, (0.3, 1.0)) == (0, (500 - 27) // 2, 20, 27)


def full_image_transform(**kwargs):
    """scale (1, 1) on a square image always crops the whole image, so the output is the
    input unless a switched-on augmentation changes it."""
    return make_transforms(48, crop_scale=(1.0, 1.0), **kwargs)


def test_flip_half_the_time_when_enabled_never_when_disabled():
    img = noise_image(48, 48)
    plain = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    flipped = plain.flip(-1)
    on, off = full_image_transform(use_horizontal_flip=True), full_image_transform()
    n_flipped = 0
    for seed in range(200):
        out = on(img, torch.Generator().manual_seed(seed))
        assert torch.equal(out, plain) or torch.equal(out, flipped)
        n_flipped += torch.equal(out, flipped)
        assert torch.equal(off(img, torch.Generator().manual_seed(seed)), plain)
    assert 70 <= n_flipped <= 130


@pytest.mark.parametrize(
    "switch, low, high",
    [
        (dict(use_color_distortion=True, color_jitter_strength=0.5), 0.7, 0.95),  # p = 1 - 0.2 * 0.2 = 0.84
        (dict(use_color_distortion=True, color_jitter_strength=0.0), 0.1, 0.3),  # grayscale only, p = 0.2
        (dict(use_gaussian_blur=True), 0.35, 0.65),
    ],
)
def test_colour_and_blur_change_pixels_only_when_enabled(switch, low, high):
    img = noise_image(48, 48)
    plain = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    on, off = full_image_transform(**switch), full_image_transform()
    changed = sum(not torch.equal(on(img, torch.Generator().manual_seed(s)), plain) for s in range(100))
    assert low * 100 <= changed <= high * 100
    assert all(torch.equal(off(img, torch.Generator().manual_seed(s)), plain) for s in range(20))


def test_eval_transform_resizes_the_short_side_and_center_crops():
    out = make_eval_transform(16)(coordinate_image(200, 100)).double()
    # short side 100 -> round(16 * 256 / 224) = 18, so the image is 36 x 18 and the crop [10, 26) x [1, 17)
    assert abs(out[0].mean() - 100) < 3 and abs(out[1].mean() - 50) < 3
    assert out[0, 8, -1] - out[0, 8, 0] == pytest.approx(15 * 200 / 36, abs=3)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="crop_scale"):
        make_transforms(32, crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="crop_size"):
        make_transforms(0)
    with pytest.raises(ValueError, match="color_jitter_strength"):
        make_transforms(32, color_jitter_strength=-1)


# -------------------------------------------------------------------------- dataset and files


def make_mixed_folder(root):
    good = {
        "gray.png": lambda p: save(p, (9, 7), "L", 128),
        "cmyk.jpg": lambda p: save(p, (9, 7), "CMYK", (0, 255, 255, 0)),
        "palette.png": lambda p: save(p, (9, 7), "P", 3, transparency=3),
        "rgba.png": lambda p: save(p, (9, 7), "RGBA", (255, 0, 0, 100)),
        "deep16.png": lambda p: Image.fromarray(np.full((7, 9), 40000, dtype=np.uint16)).save(p),
        "rgb.webp": lambda p: save(p, (9, 7)),
    }
    for name, make in good.items():
        make(str(root / name))
    Image.new("RGB", (64, 48), (1, 2, 3)).save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "full.jpg").unlink()
    touch(root / "text.jpg", b"hello, I am text\n" * 10)
    touch(root / "zero.png", b"")
    return sorted(good), ["text.jpg", "truncated.jpg", "zero.png"]


@pytest.mark.filterwarnings("error")  # no PIL warning about palette transparency either
def test_valid_modes_decode_to_rgb_and_bad_files_give_none_with_one_warning(tmp_path, caplog):
    good, bad = make_mixed_folder(tmp_path)
    dataset = ImageDataset(tmp_path)
    names = [os.path.basename(p) for p in dataset.paths]
    caplog.set_level(logging.WARNING, logger="fastjepa.data.images")
    for i, name in enumerate(names):
        item = dataset[i]
        if name in good:
            image, label = item
            assert image.dtype == torch.uint8 and image.shape == (3, 7, 9) and label == 0, name
        else:
            assert item is None, name
    warned = sorted(os.path.basename(r.args[0]) for r in caplog.records)
    assert warned == bad and all("Error" in r.getMessage() for r in caplog.records)
    assert torch.equal(dataset[names.index("cmyk.jpg")][0][:, 0, 0], torch.tensor([255, 0, 0], dtype=torch.uint8))
    assert dataset[names.index("deep16.png")][0][0, 0, 0] == 40000 // 257
    assert dataset[names.index("gray.png")][0][:, 0, 0].tolist() == [128, 128, 128]

    caplog.clear()
    images, labels, n_bad = collate_images([dataset[i] for i in range(len(dataset))])
    assert images.shape == (len(good), 3, 7, 9) and labels.dtype == torch.int64 and n_bad == len(bad)
    assert caplog.records == []  # each bad file warns once


def test_dataset_with_a_random_transform_uses_the_sample_seed(tmp_path):
    for i in range(3):
        noise_image(40, 30, seed=i).save(tmp_path / f"{i}.png")
    dataset = ImageDataset(tmp_path, make_transforms(16, **ALL_AUGMENTATIONS))
    assert torch.equal(dataset[1][0], dataset[(1, 1)][0])
    assert torch.equal(dataset[(1, 99)][0], dataset[(1, 99)][0])
    assert not torch.equal(dataset[(1, 99)][0], dataset[(1, 98)][0])
    eval_dataset = ImageDataset(tmp_path, make_eval_transform(16))
    assert torch.equal(eval_dataset[(2, 5)][0], eval_dataset[(2, 6)][0])
    with pytest.raises(IndexError):
        dataset[3]


def test_collate_all_bad():
    images, labels, n_bad = collate_images([None, None])
    assert images.shape[0] == 0 and images.dtype == torch.uint8 and labels.shape == (0,) and n_bad == 2


def test_dataloader_with_sampler_and_collate(tmp_path):
    for i in range(5):
        noise_image(30, 30, seed=i).save(tmp_path / f"{i}.png")
    touch(tmp_path / "broken.png")
    dataset = ImageDataset(tmp_path, make_transforms(8, **ALL_AUGMENTATIONS))
    sampler = SeededSampler(len(dataset), seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, collate_fn=collate_images)
    batches = list(loader)
    assert sum(b[0].shape[0] for b in batches) == 5 and sum(b[2] for b in batches) == 1
    again = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


# ---------------------------------------------------------------------------------- sampler


def test_sampler_is_a_seeded_permutation_per_epoch():
    sampler = SeededSampler(50, seed=11)
    first = list(sampler)
    assert len(sampler) == 50 and first == list(SeededSampler(50, seed=11))
    assert sorted(i for i, _ in first) == list(range(50))
    assert len({s for _, s in first}) == 50 and all(0 <= s < 2**63 for _, s in first)
    assert [i for i, _ in first] != list(range(50))
    assert list(SeededSampler(50, seed=12)) != first
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(i for i, _ in second) == list(range(50)) and [i for i, _ in second] != [i for i, _ in first]
    assert {s for _, s in second}.isdisjoint({s for _, s in first})
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_sampler_without_shuffle_keeps_order_but_seeds_vary():
    pairs = list(SeededSampler(6, seed=0, shuffle=False))
    assert [i for i, _ in pairs] == list(range(6)) and len({s for _, s in pairs}) == 6


def test_sampler_repeats_a_smaller_dataset_in_whole_passes():
    sampler = SeededSampler(25, seed=2, dataset_size=10)
    indices = [i for i, _ in sampler]
    assert len(indices) == 25 and len({s for _, s in sampler}) == 25
    assert sorted(indices[:10]) == sorted(indices[10:20]) == list(range(10)) and len(set(indices[20:])) == 5
    assert indices[:10] != indices[10:20]
    assert [i for i, _ in SeededSampler(25, seed=2, dataset_size=10, shuffle=False)] == (list(range(10)) * 3)[:25]
    assert [i for i, _ in SeededSampler(10, seed=2, dataset_size=10)] == indices[:10]  # one pass = a plain permutation
    with pytest.raises(ValueError, match="dataset_size"):
        SeededSampler(5, seed=0, dataset_size=0)


def test_sampler_skip_resumes_the_same_epoch():
    sampler = SeededSampler(20, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.skip(7)
    assert len(sampler) == 13 and list(sampler) == full[7:]
    sampler.set_epoch(3)  # the same epoch keeps the skip
    assert list(sampler) == full[7:]
    sampler.set_epoch(4)  # a new epoch starts at its beginning
    assert len(sampler) == 20
    sampler.skip(20)
    assert list(sampler) == [] and len(sampler) == 0
    with pytest.raises(ValueError, match="skip"):
        sampler.skip(21)
    with pytest.raises(ValueError, match="num_samples"):
        SeededSampler(0, seed=0)


def test_sampler_shards_disjoint_equal_and_rank_0_of_1_is_unsharded():
    whole = SeededSampler(23, seed=4, dataset_size=10)
    whole.set_epoch(2)
    positions = []
    for rank in range(3):
        shard = SeededSampler(23, seed=4, dataset_size=10, rank=rank, world_size=3)
        shard.set_epoch(2)
        assert len(shard) == 7 and shard.per_rank == 7  # 23 // 3: the last 2 positions go to no rank
        items = list(shard)
        assert items == [list(whole)[p] for p in shard.positions()]  # same indices and seeds as unsharded
        positions += list(shard.positions())
        shard.skip(3)
        assert list(shard) == items[3:]
    assert sorted(positions) == list(range(21))  # disjoint, every rank the same count
    assert list(SeededSampler(23, seed=4, dataset_size=10, rank=0, world_size=1)) == list(SeededSampler(23, seed=4, dataset_size=10))
    with pytest.raises(ValueError, match="rank"):
        SeededSampler(10, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="each of 4 ranks"):
        SeededSampler(3, seed=0, world_size=4)


def test_batched_crop_boxes_follow_scale_and_ratio_like_the_scalar_version():
    widths, heights = np.array([500, 375, 40, 3000, 10] * 400), np.array([375, 500, 40, 10, 3000] * 400)
    g = torch.Generator().manual_seed(0)
    left, top, w, h = random_resized_crop_boxes(widths, heights, g, (0.3, 1.0))
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= widths).all() and (top + h <= heights).all()
    assert (w >= 1).all() and (h >= 1).all()
    normal = np.arange(len(widths)) % 5 < 3  # images on which a try always fits sooner or later
    area = w * h / (widths * heights)
    assert (area[normal] > 0.3 - 0.05).all() and (area[normal] <= 1.0 + 0.05).all()
    assert (w[normal] / h[normal] > 3 / 4 - 0.1).all() and (w[normal] / h[normal] < 4 / 3 + 0.1).all()
    # a 3000 x 10 strip never fits a crop of ratio <= 4/3 covering 30%: the clamped central crop, as the scalar version
    strip = np.arange(len(widths)) % 5 == 3
    assert {(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(left[strip], top[strip], w[strip], h[strip])} == {
        random_resized_crop_box(3000, 10, torch.Generator().manual_seed(0), (0.3, 1.0))}
    again = random_resized_crop_boxes(widths, heights, torch.Generator().manual_seed(0), (0.3, 1.0))
    assert all((a == b).all() for a, b in zip((left, top, w, h), again))
    # the same distribution as the scalar version: mean area fraction and offsets spread over the image
    scalar = [random_resized_crop_box(500, 375, torch.Generator().manual_seed(s), (0.3, 1.0)) for s in range(400)]
    scalar_area = np.mean([c * d / (500 * 375) for _, _, c, d in scalar])
    assert abs(area[::5].mean() - scalar_area) < 0.05
    assert left[::5].max() > 150 and top[::5].max() > 100
