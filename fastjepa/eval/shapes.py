"""Generated stand-ins for Clevr/Count and Clevr/Dist, so that CPU runs can probe whether features
keep low-level information (how many objects, how near the nearest one is) without the real Clevr.

A scene is a light background (one random colour per image under a faint linear gradient) with
1 to 8 filled circles, squares and triangles in colours far from the background. Shapes may
overlap only slightly, so they stay countable. Scenes are drawn with PIL at 4x the image size and
box-downsampled, so edges are antialiased.

- ``count``: the label is the number of shapes minus one (classes ``"1"`` .. ``"8"``).
- ``dist``: Clevr/Dist bins the distance to the closest object; here the closest object is the
  one a viewer would see closest, the largest shape, and the label is its size binned in 6 ranges.
  The largest size is drawn from the label's bin first and every other shape is smaller.

A shape's size is its radius (circle) or half side (square, and the half base of a triangle whose
height equals its base), as a fraction of the image side: its bounding box is 2 * size wide.
Everything is drawn from one numpy generator seeded by (seed, split, task), so a split is the same
on every machine, and train and val are different streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

TASKS = ("count", "dist")
SPLITS = ("train", "val")
DEFAULT_COUNTS = {"train": 1600, "val": 400}
SUPERSAMPLE = 4  # drawn at this multiple of the image size, then box-downsampled

MAX_SHAPES = 8
COUNT_CLASSES = tuple(str(n) for n in range(1, MAX_SHAPES + 1))
MIN_SIZE = 0.05  # 1.6 pixels of radius at 32 pixels: the smallest shape still covers a few pixels
# count: sizes up to COUNT_SIZE_SCALE / sqrt(n), clipped, so that the ink covered grows slower than
# the count (a pixel sum alone should not read the count) and 8 shapes still fit
COUNT_SIZE_SCALE = 0.25
COUNT_SIZE_RANGE = (0.09, 0.18)
# dist: the largest shape's size in 6 equal bins; every other shape at most OTHERS_RATIO of it
# (and OTHERS_MAX, so that 8 shapes fit beside the largest)
DIST_EDGES = (0.08, 0.11, 0.14, 0.17, 0.20, 0.23, 0.26)
DIST_CLASSES = tuple(f"{low:.2f}-{high:.2f}" for low, high in zip(DIST_EDGES[:-1], DIST_EDGES[1:]))
OTHERS_RATIO = 0.8
OTHERS_MAX = 0.10

KINDS = ("circle", "square", "triangle")
# two shapes' centres at least R_i + R_j - OVERLAP * min(R_i, R_j) apart, R the distance from a
# centre to the shape's farthest point: the smaller may reach into the larger's bounding circle by
# OVERLAP of its own R, so that it stays visible and countable
OVERLAP = 0.3
PLACEMENT_TRIES = 64  # candidate centres drawn at once for one shape
SCENE_TRIES = 100  # fresh sizes for a scene whose shapes did not fit
BACKGROUND_VALUE = (0.8, 0.95)  # HSV ranges of the light, pale background
BACKGROUND_SATURATION = (0.0, 0.25)
GRADIENT_MAX = 12.0  # brightness change, in 8-bit levels, from the centre to the middle of an edge along the gradient
SHAPE_VALUE = (0.3, 0.85)
SHAPE_SATURATION = (0.55, 1.0)
MIN_CONTRAST = 100.0  # Euclidean RGB distance between a shape's colour and the background


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    x: float  # centre, fraction of the image width
    y: float
    size: float  # radius or half side, fraction of the image side
    color: tuple[int, int, int]
    orientation: int  # triangle: apex up, right, down, left


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]  # colour at the centre of the image, before the gradient
    gradient: tuple[float, float]  # brightness change per image side along x and y, in 8-bit levels
    shapes: tuple[Shape, ...]


def _class_names(task: str) -> list[str]:
    return list(COUNT_CLASSES if task == "count" else DIST_CLASSES)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")


def _scene_sizes(task: str, label: int, rng: np.random.Generator) -> np.ndarray:
    """The sizes of one scene's shapes, largest first."""
    if task == "count":
        n = label + 1
        high = min(max(COUNT_SIZE_SCALE / math.sqrt(n), COUNT_SIZE_RANGE[0]), COUNT_SIZE_RANGE[1])
        return np.sort(rng.uniform(MIN_SIZE, high, n))[::-1]
    largest = rng.uniform(DIST_EDGES[label], DIST_EDGES[label + 1])
    others = rng.uniform(MIN_SIZE, min(OTHERS_RATIO * largest, OTHERS_MAX), int(rng.integers(0, MAX_SHAPES)))
    return np.concatenate([[largest], np.sort(others)[::-1]])


def _place(kinds: np.ndarray, sizes: np.ndarray, rng: np.random.Generator, overlap: float) -> np.ndarray | None:
    """Centres (n, 2) inside the image, kept apart by the OVERLAP rule with ``overlap``, placed
    largest first; None when one does not fit."""
    radii = np.where(kinds == KINDS.index("circle"), sizes, sizes * math.sqrt(2.0))  # centre to the farthest point
    candidates = rng.uniform(sizes[:, None, None], 1.0 - sizes[:, None, None], (len(sizes), PLACEMENT_TRIES, 2))
    centres = candidates[:, 0].copy()
    for i in range(1, len(sizes)):
        squared_distances = ((candidates[i, :, None, :] - centres[None, :i, :]) ** 2).sum(axis=-1)
        fits = (squared_distances >= (radii[i] + radii[:i] - overlap * np.minimum(radii[i], radii[:i])) ** 2).all(axis=1)
        if not fits.any():
            return None
        centres[i] = candidates[i, fits.argmax()]
    return centres


def _layout(task: str, label: int, rng: np.random.Generator, overlap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene's shapes: kinds (indices into KINDS), centres (n, 2) and sizes, largest first."""
    for _ in range(SCENE_TRIES):
        sizes = _scene_sizes(task, label, rng)
        kinds = rng.integers(0, len(KINDS), len(sizes))
        centres = _place(kinds, sizes, rng, overlap)
        if centres is not None:
            return kinds, centres, sizes
    raise RuntimeError(f"no placement of a {task} scene with label {label} in {SCENE_TRIES} tries (overlap {overlap})")


def _hsv_colors(rng: np.random.Generator, n: int, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    """``n`` colours (n, 3) in 0..255, hue uniform and saturation and value uniform in their ranges."""
    hue, sat, val = rng.uniform(0.0, 6.0, n), rng.uniform(*saturation, n), rng.uniform(*value, n)
    sector = hue.astype(np.int64) % 6
    fraction = hue - np.floor(hue)
    low, falling, rising = val * (1.0 - sat), val * (1.0 - sat * fraction), val * (1.0 - sat * (1.0 - fraction))
    rgb = [np.choose(sector, channel) for channel in ((val, falling, low, low, rising, val), (rising, val, val, falling, low, low),
                                                       (low, low, rising, val, val, falling))]
    return np.round(np.stack(rgb, axis=1) * 255.0)


def _shape_colors(rng: np.random.Generator, backgrounds: np.ndarray) -> np.ndarray:
    """One colour per row of ``backgrounds`` (the background behind that shape), at least
    MIN_CONTRAST from it: the colours too close are drawn again until none is."""
    colors = _hsv_colors(rng, len(backgrounds), SHAPE_SATURATION, SHAPE_VALUE)
    close = ((colors - backgrounds) ** 2).sum(axis=1) < MIN_CONTRAST**2
    while close.any():
        colors[close] = _hsv_colors(rng, int(close.sum()), SHAPE_SATURATION, SHAPE_VALUE)
        close = ((colors - backgrounds) ** 2).sum(axis=1) < MIN_CONTRAST**2
    return colors.astype(np.int64)


def _draw_scenes(task: str, labels: np.ndarray, rng: np.random.Generator, overlap: float) -> list[Scene]:
    """Lay out every scene, then draw the colours, gradients and orientations of all at once."""
    layouts = [_layout(task, int(label), rng, overlap) for label in labels]
    shape_counts = np.array([len(sizes) for _, _, sizes in layouts], dtype=np.int64)
    backgrounds = _hsv_colors(rng, len(labels), BACKGROUND_SATURATION, BACKGROUND_VALUE)
    angles = rng.uniform(0.0, 2.0 * math.pi, len(labels))
    strengths = 2.0 * rng.uniform(0.0, GRADIENT_MAX, len(labels))  # per image side: GRADIENT_MAX at most from the centre to an edge
    gradients = np.stack([strengths * np.cos(angles), strengths * np.sin(angles)], axis=1)
    colors = _shape_colors(rng, np.repeat(backgrounds, shape_counts, axis=0)).tolist()
    orientations = rng.integers(0, 4, int(shape_counts.sum())).tolist()
    scenes, first = [], 0
    for (kinds, centres, sizes), background, gradient in zip(layouts, backgrounds.astype(np.int64).tolist(), gradients.tolist()):
        shapes = tuple(Shape(KINDS[kind], x, y, size, tuple(colors[first + j]), orientations[first + j])
                       for j, (kind, (x, y), size) in enumerate(zip(kinds.tolist(), centres.tolist(), sizes.tolist())))
        scenes.append(Scene(tuple(background), tuple(gradient), shapes))
        first += len(shapes)
    return scenes


def _render_shapes(shapes: tuple[Shape, ...], image_size: int) -> np.ndarray:
    """The shapes alone, (S, S, 4) RGBA: drawn at SUPERSAMPLE x on transparent black, then box-downsampled.
    Smallest first, so that where two overlap the larger (the nearer, for dist) is on top."""
    side = image_size * SUPERSAMPLE
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for shape in reversed(shapes):
        x, y, half = shape.x * side, shape.y * side, shape.size * side
        fill = (*shape.color, 255)
        if shape.kind == "circle":
            draw.ellipse((x - half, y - half, x + half, y + half), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
        else:
            apex, left, right = (0.0, -half), (-half, half), (half, half)  # apex up, then turned by quarter turns
            for _ in range(shape.orientation):
                apex, left, right = ((-dy, dx) for dx, dy in (apex, left, right))
            draw.polygon([(x + dx, y + dy) for dx, dy in (apex, left, right)], fill=fill)
    return np.asarray(canvas.reduce(SUPERSAMPLE))


def _composite(scenes: list[Scene], layers: np.ndarray) -> torch.Tensor:
    """Lay the (N, S, S, 4) shape layers over each scene's background: (N, 3, S, S) uint8."""
    size = layers.shape[1]
    ramp = (np.arange(size) + 0.5) / size - 0.5
    gradients = np.array([scene.gradient for scene in scenes])
    backgrounds = np.array([scene.background for scene in scenes], dtype=np.float32)
    light = gradients[:, 0, None, None] * ramp[None, None, :] + gradients[:, 1, None, None] * ramp[None, :, None]
    background = backgrounds[:, None, None, :] + light[..., None].astype(np.float32)
    alpha = layers[..., 3:].astype(np.float32) / 255.0
    images = layers[..., :3].astype(np.float32) * alpha + background * (1.0 - alpha)
    images = np.clip(np.rint(images), 0, 255).astype(np.uint8)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def render_scenes(task: str, labels: np.ndarray, image_size: int, rng: np.random.Generator,
                  overlap: float = OVERLAP) -> tuple[torch.Tensor, list[Scene]]:
    """Draw one scene per label (a class index of ``task``): ``(images uint8 (N, 3, S, S), scenes)``.
    ``shapes_split`` calls it; tests call it with a larger image and a negative ``overlap`` (a gap of
    that fraction of the smaller bounding radius between every two shapes) to read the scenes back
    from the pixels."""
    _check_task(task)
    _check_image_size(image_size)
    labels = np.asarray(labels)
    classes = _class_names(task)
    if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= len(classes):
        raise ValueError(f"labels must be a non-empty 1-D array of ints in [0, {len(classes)}) for {task}, got {labels!r}")
    if not -1.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [-1, 1), got {overlap!r}")
    scenes = _draw_scenes(task, labels, rng, overlap)
    layers = np.stack([_render_shapes(scene.shapes, image_size) for scene in scenes])
    return _composite(scenes, layers), scenes


def shapes_split(task: str, split: str, image_size: int = 32, count: int | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(images uint8 (N, 3, S, S), labels int64 (N,), class names) for task "count" or "dist", split
    "train" or "val". Classes are balanced (equal up to rounding) and shuffled; ``count`` defaults to
    1600 train and 400 val images."""
    _check_task(task)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    _check_image_size(image_size)
    classes = _class_names(task)
    count = DEFAULT_COUNTS[split] if count is None else count
    if isinstance(count, bool) or not isinstance(count, int) or count < len(classes):
        raise ValueError(f"count must be an int >= {len(classes)} (the number of {task} classes), got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task)])
    labels = rng.permutation(np.arange(count) % len(classes))
    images, _ = render_scenes(task, labels, image_size, rng)
    return images, torch.from_numpy(labels.astype(np.int64)), classes
