"""Image files for the data tests: identifiable solid colours, every mode, and broken files."""

import io
import os

import numpy as np
import torch
from PIL import Image

from fastjepa.data.normalize import IMAGENET_MEAN, IMAGENET_STD


def colour(i: int) -> tuple[int, int, int]:
    """Image i's colour: its red channel identifies it (steps of 20 survive JPEG and resizing)."""
    return 10 + 20 * i, 128, 200 - 10 * i


def write_colour_images(folder, count: int, ext: str = "jpg") -> list[str]:
    """count solid-colour images of different sizes (colour(i), the largest 80 x 60)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"{i:03d}.{ext}")
        Image.new("RGB", (40 + 3 * (i % 12), 30 + 2 * (i % 12)), colour(i)).save(path, quality=95)
        paths.append(path)
    return paths


def identify(images: torch.Tensor) -> list[int]:
    """The colour index of each normalised (n, 3, H, W) image."""
    red = images[:, 0].mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return [round((255 * r - 10) / 20) for r in red.tolist()]


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB image: resampling it with different filters gives nearly the same pixels."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(0, 1, width), np.linspace(0, 1, height))
    a, b = rng.uniform(0.3, 1.0, 2)
    rgb = np.stack([255 * x * a, 255 * y * b, 127 + 100 * np.sin(3 * x + 2 * y)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def write_every_mode(folder) -> list[str]:
    """Valid images of every kind a dataset holds: grayscale and CMYK JPEGs, RGBA, palette and 16-bit PNGs."""
    os.makedirs(folder, exist_ok=True)
    base = gradient(50, 40)
    images = {
        "gray.jpg": base.convert("L"),
        "cmyk.jpg": base.convert("CMYK"),
        "progressive.jpg": base,
        "rgba.png": base.convert("RGBA"),
        "palette.png": base.convert("P"),
        "gray16.png": Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257)),
    }
    paths = []
    for name, image in images.items():
        path = os.path.join(folder, name)
        image.save(path, progressive=name.startswith("progressive"))
        paths.append(path)
    return paths


def jpeg_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def undecodable_jpeg() -> bytes:
    """A complete JPEG (it passes the header check) whose Huffman table is zeroed: no decoder reads it."""
    data = bytearray(jpeg_bytes(gradient(160, 120)))
    table = data.index(b"\xff\xc4")  # DHT marker
    data[table + 4 : table + 30] = bytes(26)
    return bytes(data)


def write_bad_files(folder) -> dict[str, str]:
    """name -> path of a truncated JPEG, an undecodable complete JPEG, a text file named .jpg,
    an empty .png and a truncated PNG."""
    os.makedirs(folder, exist_ok=True)
    good = jpeg_bytes(gradient(160, 120))
    png = io.BytesIO()
    gradient(160, 120).save(png, "PNG")
    files = {
        "truncated.jpg": good[: len(good) // 2],
        "undecodable.jpg": undecodable_jpeg(),
        "text.jpg": b"this is not a jpeg",
        "empty.png": b"",
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
    }
    paths = {}
    for name, content in files.items():
        paths[name] = os.path.join(folder, name)
        with open(paths[name], "wb") as f:
            f.write(content)
    return paths
