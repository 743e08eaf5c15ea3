"""fastjepa/eval/shapes.py: the generated Clevr/Count and Clevr/Dist stand-ins: shapes, balance,
determinism, labels that the pixels really show, and arguments."""

import numpy as np
import pytest
import torch

from fastjepa.eval.shapes import COUNT_CLASSES, DIST_CLASSES, _render_shapes, render_scenes, shapes_split

CLASSES = {"count": COUNT_CLASSES, "dist": DIST_CLASSES}
FOREGROUND_DISTANCE = 50.0  # RGB distance from the scene's background colour: above the gradient (<= 30), below any shape (>= 100)


@pytest.fixture(scope="module")
def default_splits():
    """Every task's default train and val sets, generated once for the module."""
    return {(task, split): shapes_split(task, split) for task in CLASSES for split in ("train", "val")}


def _foreground(images: torch.Tensor, scenes) -> np.ndarray:
    """(N, H, W) bool: pixels far from their scene's background colour."""
    pixels = images.permute(0, 2, 3, 1).numpy().astype(np.float32)
    backgrounds = np.array([scene.background for scene in scenes], dtype=np.float32)[:, None, None, :]
    return np.linalg.norm(pixels - backgrounds, axis=-1) > FOREGROUND_DISTANCE


def _components(masks: np.ndarray) -> np.ndarray:
    """8-connected component ids of (N, H, W) bool masks (0 outside), by spreading the largest
    pixel id over each component until nothing changes."""
    n, height, width = masks.shape
    ids = np.where(masks, np.arange(1, n * height * width + 1).reshape(n, height, width), 0)
    while True:
        padded = np.pad(ids, ((0, 0), (1, 1), (1, 1)))
        spread = ids.copy()
        for dy in range(3):
            for dx in range(3):
                np.maximum(spread, padded[:, dy:dy + height, dx:dx + width], out=spread)
        spread[~masks] = 0
        if np.array_equal(spread, ids):
            return ids
        ids = spread


@pytest.mark.parametrize("task", ["count", "dist"])
def test_default_splits_have_the_documented_shapes_dtypes_and_balanced_labels(default_splits, task):
    for split, count in (("train", 1600), ("val", 400)):
        images, labels, classes = default_splits[task, split]
        assert images.shape == (count, 3, 32, 32) and images.dtype == torch.uint8
        assert labels.shape == (count,) and labels.dtype == torch.int64
        assert classes == list(CLASSES[task])
        per_class = torch.bincount(labels, minlength=len(classes))
        assert len(per_class) == len(classes) and per_class.max() - per_class.min() <= 1, per_class
        assert not torch.equal(labels[: len(classes)], labels[: len(classes)].sort().values)  # shuffled, not in class order
    assert len(COUNT_CLASSES) == 8 and COUNT_CLASSES[0] == "1" and COUNT_CLASSES[-1] == "8"
    assert len(DIST_CLASSES) == 6


def test_other_image_sizes_and_counts_round_balance():
    images, labels, classes = shapes_split("dist", "train", image_size=48, count=20, seed=3)
    assert images.shape == (20, 3, 48, 48)
    assert sorted(torch.bincount(labels, minlength=6).tolist()) == [3, 3, 3, 3, 4, 4]


def test_same_arguments_give_identical_tensors_and_splits_seeds_and_tasks_differ():
    images, labels, _ = shapes_split("count", "train", count=24, seed=5)
    again_images, again_labels, _ = shapes_split("count", "train", count=24, seed=5)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
    for other in (shapes_split("count", "val", count=24, seed=5), shapes_split("count", "train", count=24, seed=6),
                  shapes_split("dist", "train", count=24, seed=5)):
        assert not torch.equal(images, other[0])


def test_train_and_val_share_no_image(default_splits):
    for task in CLASSES:
        train = {bytes(image.numpy()) for image in default_splits[task, "train"][0]}
        val = {bytes(image.numpy()) for image in default_splits[task, "val"][0]}
        assert len(train) == 1600 and len(val) == 400 and not train & val


def test_background_is_light_and_corner_pixels_mostly_background(default_splits):
    images = default_splits["count", "train"][0].float()
    corners = images[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # (N, 3, 4)
    assert (corners.median(dim=2).values.min(dim=1).values > 120).float().mean() > 0.9


def test_the_count_is_visible_as_separate_shapes():
    """With a gap between shapes, the connected blobs of non-background pixels are the label's count."""
    labels = np.repeat(np.arange(8), 2)
    images, scenes = render_scenes("count", labels, 128, np.random.default_rng(11), overlap=-0.5)
    assert [len(scene.shapes) for scene in scenes] == (labels + 1).tolist()
    ids = _components(_foreground(images, scenes))
    counted = [len(np.unique(scene_ids[scene_ids > 0])) for scene_ids in ids]
    assert counted == (labels + 1).tolist()


@pytest.mark.parametrize("task", ["count", "dist"])
def test_shapes_overlap_only_slightly_at_the_default_overlap(task):
    """Every shape keeps at least 80% of its (antialiased, 32-pixel) area in view under the larger
    shapes drawn over it: the smallest share seen over 3200 scenes of each task was 83%."""
    labels = np.arange(64) % len(CLASSES[task])
    _, scenes = render_scenes(task, labels, 32, np.random.default_rng(13))
    for scene in scenes:
        above = np.zeros((32, 32))
        for shape in scene.shapes:  # largest first: each is drawn under the ones before it
            coverage = _render_shapes((shape,), 32)[..., 3] / 255.0
            assert (coverage * (1.0 - above)).sum() >= 0.8 * coverage.sum(), (shape, scene)
            above = np.maximum(above, coverage)


def test_the_largest_shape_grows_with_the_dist_bin():
    """The widest blob (the largest shape, measured in pixels) is wider on average in every higher bin,
    close to the size the scene drew, and every other shape is smaller."""
    image_size = 64
    labels = np.repeat(np.arange(6), 6)
    images, scenes = render_scenes("dist", labels, image_size, np.random.default_rng(12), overlap=-0.5)
    ids = _components(_foreground(images, scenes))
    widest = []
    for scene_ids in ids:
        extents = []
        for blob in np.unique(scene_ids[scene_ids > 0]):
            rows, columns = np.nonzero(scene_ids == blob)
            extents.append(max(rows.max() - rows.min(), columns.max() - columns.min()) + 1)
        widest.append(max(extents))
    widest = np.array(widest, dtype=np.float64)
    means = [widest[labels == b].mean() for b in range(6)]
    assert all(low < high for low, high in zip(means, means[1:])), means
    drawn = np.array([2 * scene.shapes[0].size * image_size for scene in scenes])
    assert np.abs(widest - drawn).max() < 3.0
    for label, scene in zip(labels, scenes):
        low, high = DIST_CLASSES[label].split("-")
        assert float(low) <= scene.shapes[0].size < float(high)
        assert all(shape.size < scene.shapes[0].size for shape in scene.shapes[1:])


@pytest.mark.parametrize("task", ["count", "dist"])
def test_a_linear_classifier_on_raw_pixels_does_not_solve_the_task(default_splits, task):
    """Ridge one-vs-all on standardised pixels (about 0.2 for count and 0.3 for dist, chance 0.125 and
    0.167): the labels are not a linear read-out of the pixels, so a probe on features means something."""
    train_images, train_labels, classes = default_splits[task, "train"]
    val_images, val_labels, _ = default_splits[task, "val"]
    train = train_images.flatten(1).float() / 255.0
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, val = (train - mean) / std, (val_images.flatten(1).float() / 255.0 - mean) / std
    targets = torch.nn.functional.one_hot(train_labels, len(classes)).float()
    weights = train.T @ torch.linalg.solve(train @ train.T + 1000.0 * torch.eye(len(train)), targets)
    accuracy = ((val @ weights).argmax(1) == val_labels).float().mean().item()
    assert 1.0 / len(classes) - 0.05 < accuracy < 0.4, accuracy


@pytest.mark.parametrize("kwargs, name", [
    ({"task": "counting"}, "task"),
    ({"split": "test"}, "split"),
    ({"image_size": 15}, "image_size"),
    ({"image_size": 32.0}, "image_size"),
    ({"count": 7}, "count"),
    ({"count": 0}, "count"),
    ({"count": 10.0}, "count"),
    ({"seed": -1}, "seed"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, name):
    arguments = {"task": "count", "split": "train", **kwargs}
    with pytest.raises(ValueError, match=name):
        shapes_split(**arguments)


def test_dist_needs_at_least_one_image_per_bin_and_render_checks_its_arguments():
    assert len(shapes_split("dist", "val", count=6)[1]) == 6
    with pytest.raises(ValueError, match="count"):
        shapes_split("dist", "val", count=5)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="labels"):
        render_scenes("dist", np.array([6]), 32, rng)
    with pytest.raises(ValueError, match="labels"):
        render_scenes("count", np.array([], dtype=np.int64), 32, rng)
    with pytest.raises(ValueError, match="overlap"):
        render_scenes("count", np.array([0]), 32, rng, overlap=1.0)
