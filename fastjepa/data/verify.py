"""``fastjepa data verify DIR``: the image files under DIR that training cannot use.

Every file with an image extension gets three checks: the header check the DALI and
torchvision backends run at start (``fastjepa.data.scan``: a known image header, an end
marker for JPEG and PNG), PIL's ``verify`` (the file's structure, and the CRCs of PNG
chunks) and a full decode to RGB, as the pil backend does. A file that passes all three
decodes in every backend. The image members of ``.tar`` shards are checked the same way
(a tar that cannot be read is itself a bad file). Files without an image extension are never
read by training; they are counted, not checked. Bad files can be moved aside (never
deleted); a bad member of a shard cannot, it is listed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from fastjepa.data.images import ImageRef, _walk_files, is_image_file, is_shard, load_rgb, open_image, require_folder
from fastjepa.data.scan import BadImage, check_file
from fastjepa.data.shards import index_shard

PROGRESS_FROM = 1000  # files: a progress bar from this many on


@dataclass
class VerifyReport:
    checked: int = 0  # images checked (files and shard members)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (name, reason): see ImageRef.name
    ignored: list[str] = field(default_factory=list)  # files without an image extension
    moved: list[tuple[str, str]] = field(default_factory=list)  # (from, to)


def verify_file(image: ImageRef | str) -> str | None:
    """Why training cannot use the image (a path or an ``ImageRef``; None when it can)."""
    try:
        check_file(image)
        with open_image(image) as f, Image.open(f) as img:
            img.verify()
        load_rgb(image)
    except BadImage as e:
        return str(e)
    except Exception as e:  # PIL raises many kinds of errors on damaged files
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def verify_folder(root: str, move_to: str | None = None, workers: int = 1, progress: bool = True) -> VerifyReport:
    """Check every image file under root (in ``workers`` processes); move the bad ones
    to ``move_to`` under their path relative to root when given."""
    root = require_folder(root)
    if move_to is not None and Path(move_to).resolve().is_relative_to(Path(root).resolve()):
        raise ValueError(f"the folder for bad files {move_to!r} is inside {root!r}, where training would read them; choose one outside it")
    report = VerifyReport()
    images: list[ImageRef] = []
    broken_shards = []
    for rel in _walk_files(root):
        path = os.path.join(root, rel)
        if is_shard(rel):
            try:
                images += [ImageRef(f"{path}/{name}", path, offset, size) for name, offset, size in index_shard(path, is_image_file)]
            except ValueError as error:
                broken_shards.append((path, str(error).removeprefix(f"{path} ")))
        elif is_image_file(rel):
            images.append(ImageRef(path, path))
        else:
            report.ignored.append(path)
    report.checked = len(images) + len(broken_shards)
    with contextlib.ExitStack() as stack:
        if workers > 1:
            problems = stack.enter_context(ProcessPoolExecutor(max_workers=workers)).map(verify_file, images, chunksize=32)
        else:
            problems = map(verify_file, images)
        bar = tqdm(problems, total=len(images), unit="image", desc="verify", file=sys.stderr,
                   disable=not progress or len(images) < PROGRESS_FROM)
        report.bad = broken_shards + [(image.name, problem) for image, problem in zip(images, bar) if problem is not None]
    if move_to is not None:
        members = {image.name for image in images if image.size >= 0}  # inside shards: cannot be moved
        report.moved = [(name, _move_aside(name, root, move_to)) for name, _ in report.bad if name not in members]
    return report


def _move_aside(path: str, root: str, move_to: str) -> str:
    """Move path to move_to/<path relative to root>, never over an existing file."""
    target = Path(move_to) / os.path.relpath(path, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    candidate, n = target, 0
    while candidate.exists():
        n += 1
        candidate = target.with_name(f"{target.name}.{n}")
    shutil.move(path, candidate)
    return str(candidate)
